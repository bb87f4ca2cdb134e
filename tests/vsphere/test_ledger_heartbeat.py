"""A ledger entry's liveness is its heartbeat in the repository, not a local pid.

A run on another agent (here: an entry that says it was written on another
machine, with a pid that does not run here) holds its VM while its heartbeat
is fresh: a sweeper in another process leaves its snapshot, and a backup of
the VM is busy (retryable). Once the heartbeat is stale (its mtime set back
with ``os.utime``, no waiting on the clock) the run is dead: the sweeper and
the next backup remove what it left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from vmbackup.errors import HypervisorBusyError
from vmbackup.vsphere import ledger as ledger_mod
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.ledger import Entry, Ledger

from .helpers import backup, vm_info

ELSEWHERE = {"machine": "agent-b.example", "space": "another-boot-id/4026531836"}
STALE = ledger_mod.STALE_AFTER_SECONDS + ledger_mod.CLOCK_SKEW_SECONDS

SWEEP = """
import json, sys
from vmbackup.plan import load_plan, resolve_password
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.sweep import sweep
plan = load_plan(sys.argv[1]).model_copy(update={"repository": sys.argv[2]})
client = VSphereClient.connect(plan.connection, resolve_password(plan.connection))
try:
    print(json.dumps([x.to_dict() for x in sweep(client, plan, older_than_seconds=0)]))
finally:
    client.close()
"""


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _sweep_elsewhere(lab_plan_path, plan) -> list[dict]:
    """The sweeper in a process of its own, as on another agent."""
    out = subprocess.run(
        [sys.executable, "-c", SWEEP, str(lab_plan_path), str(plan.repository)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _backdate(entry: Entry, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(entry.path, (t, t))


def _run_elsewhere(client, plan, name: str, run_id: str) -> Entry:
    """A run of another machine that took a snapshot of ``name`` and is (for now) alive."""
    info = vm_info(client, name)
    entry = Entry(run_id=run_id, vm=name, vm_moref=info.moref, pid=_dead_pid(), created_unix=time.time() - 7200)
    entry.machine, entry.space = ELSEWHERE["machine"], ELSEWHERE["space"]
    entry.snapshot = {"name": snapshots.snapshot_name(run_id)}
    Ledger(plan.repository).write(entry)
    snapshots.create(client.find_vm(name), name, run_id, quiesce_policy="off", tools_running=True, timeout=60)
    return entry


def _ours(client, name: str) -> list[str]:
    return [n.name for _, n in snapshots.ours(client.find_vm(name))]


def test_a_sweeper_elsewhere_leaves_a_live_runs_snapshot_and_removes_a_dead_ones(client, plan, checks, lab_plan_path):
    entry = _run_elsewhere(client, plan, "crash01", "otheragent1")
    ledger = Ledger(plan.repository)
    # Its pid does not run here, but it is another machine's: only the heartbeat counts.
    _backdate(entry, STALE - 30)
    assert _sweep_elsewhere(lab_plan_path, plan) == []
    assert _ours(client, "crash01") == ["vmbackup-otheragent1"]
    assert [e.run_id for e in ledger.entries("crash01")] == ["otheragent1"]

    _backdate(entry, STALE + 30)  # five missed heartbeats and the clock-skew allowance: dead
    found = _sweep_elsewhere(lab_plan_path, plan)
    assert [(x["kind"], x["name"], x["removed"]) for x in found] == [("snapshot", "vmbackup-otheragent1", True)]
    assert _ours(client, "crash01") == []
    assert ledger.entries("crash01") == []
    checks.assert_clean(plan)


def test_reconcile_of_a_vm_a_live_run_elsewhere_holds_is_busy(client, plan, checks):
    entry = _run_elsewhere(client, plan, "crash01", "otheragent2")
    with pytest.raises(HypervisorBusyError) as e:
        backup(client, plan, "crash01")
    assert e.value.retryable is True
    assert "otheragent2" in str(e.value) and "agent-b.example" in str(e.value)
    assert _ours(client, "crash01") == ["vmbackup-otheragent2"]

    _backdate(entry, STALE + 30)
    assert backup(client, plan, "crash01").status == "ok"
    checks.assert_clean(plan)


def test_an_entry_of_this_machine_whose_process_is_gone_is_dead_at_once(tmp_path):
    """On the machine that wrote it the pid still counts: a crashed run is not waited for."""
    ledger = Ledger(tmp_path)
    ledger.write(Entry(run_id="crashed", vm="vm1", vm_moref="vm-1", pid=_dead_pid()))
    (e,) = ledger.entries()
    assert e.heartbeat_age() < 60 and not e.alive()
    # The same file from another machine is alive: its pid means nothing here.
    e.space = ELSEWHERE["space"]
    assert e.alive()
    # An entry of an older version (no "space") is judged by its machine name, then its mtime.
    d = json.loads(e.path.read_text())
    del d["space"]
    d["machine"] = ELSEWHERE["machine"]
    e.path.write_text(json.dumps(d))
    (old,) = ledger.entries()
    assert old.space is None and old.alive()
    _backdate(old, STALE + 30)
    assert not old.alive()


def test_an_entry_whose_pid_runs_another_process_now_is_dead_at_once(tmp_path):
    """On the machine that wrote it the pid is taken with its process's start
    time: once the kernel gives the pid to another process, the writer is
    gone, however fresh the heartbeat. A live child stands for that process:
    its entry says another start time."""
    ledger = Ledger(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        ledger.write(Entry(run_id="writer", vm="vm1", vm_moref="vm-1", pid=child.pid))
        (e,) = ledger.entries()
        started = ledger_mod.process_started(child.pid)
        assert started is not None and e.started == started and e.alive()
        d = json.loads(e.path.read_text())
        d["started"] = started - 1  # the writer, which had this pid, started earlier
        e.path.write_text(json.dumps(d))
        (reused,) = ledger.entries()
        assert reused.heartbeat_age() < 60 and not reused.alive()
        # An entry of an older version (no start time) is judged by the pid alone.
        del d["started"]
        e.path.write_text(json.dumps(d))
        (old,) = ledger.entries()
        assert old.started is None and old.alive()
    finally:
        child.kill()
        child.wait()
    assert not old.alive()


def test_the_heartbeat_thread_refreshes_the_entry_until_released(tmp_path):
    ledger = Ledger(tmp_path)
    entry = Entry(run_id="beating", vm="vm1", vm_moref="vm-1")
    beat = ledger.hold(entry, every=0.05)
    try:
        _backdate(entry, 10 * STALE)
        (seen,) = ledger.entries()
        assert seen.alive()  # held by this process: alive whatever its mtime says
        deadline = time.monotonic() + 10
        while entry.path.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen.heartbeat_age() < 60, "the heartbeat did not refresh the entry"
        assert beat.beats >= 1
        # Another process on this machine sees it alive by its heartbeat and its pid.
        check = (
            "import sys; from vmbackup.vsphere.ledger import Ledger; print(Ledger(sys.argv[1]).entries()[0].alive())"
        )
        out = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "True", out.stderr
    finally:
        ledger.release(entry)
    assert not beat._thread.is_alive()
    # Released: the file stays, and in this process it is a dead run's now.
    (left,) = ledger.entries()
    assert not left.alive()
    ledger.remove(entry)
    assert ledger.entries() == []


def test_a_tampered_sealed_entry_is_skipped_by_sweep_and_reconcile_and_nothing_it_names_is_touched(
    client, plan, checks, tmp_path, caplog
):
    """In an encrypted repository the entry is sealed (records.py): one flipped
    bit and neither the sweeper nor reconcile acts on it (one line says so); the
    same entry intact is followed. What it names: an NBD server's pid (a decoy
    process whose command line says nbd, which reconcile would stop)."""
    import base64
    import logging

    from vmbackup import _mover
    from vmbackup.vsphere.reconcile import reconcile_vm
    from vmbackup.vsphere.sweep import sweep

    repo = tmp_path / "enc"
    _mover.init_repository(str(repo), key=os.urandom(32))  # registered for this process, as after unlock
    plan = plan.model_copy(update={"repository": repo})
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "decoy-nbd-server"])
    try:
        info = vm_info(client, "crash01")
        entry = Entry(
            run_id="sealed1", vm="crash01", vm_moref=info.moref, pid=_dead_pid(), created_unix=time.time() - 7200
        )
        entry.nbd = [{"pid": decoy.pid, "socket": str(tmp_path / "nbd.sock")}]
        Ledger(repo).write(entry)
        _backdate(entry, STALE + 30)
        good = entry.path.read_text()
        envelope = json.loads(good)
        raw = bytearray(base64.b64decode(envelope["sealed"]))
        raw[20] ^= 0x01
        entry.path.write_text(json.dumps(envelope | {"sealed": base64.b64encode(bytes(raw)).decode()}))
        _backdate(entry, STALE + 30)

        with caplog.at_level(logging.WARNING):
            assert sweep(client, plan, older_than_seconds=0) == []
            assert (
                reconcile_vm(client, client.find_vm("crash01"), "crash01", plan, Ledger(repo), current_run=None) == []
            )
        lines = [r.getMessage() for r in caplog.records if "ledger entry skipped" in r.getMessage()]
        assert len(lines) == 2 and all("crash01--sealed1.json" in x and "fails authentication" in x for x in lines)
        assert decoy.poll() is None and entry.path.exists()  # nothing it names was touched

        entry.path.write_text(good)  # intact: the sweeper follows it
        _backdate(entry, STALE + 30)
        found = sweep(client, plan, older_than_seconds=0)
        assert [(x.kind, x.removed) for x in found] == [("nbd", True)]
        assert decoy.wait(timeout=30) != 0 and not entry.path.exists()
        checks.assert_clean(plan)
    finally:
        decoy.kill()
        decoy.wait()


def _flip_sealed(path) -> None:
    import base64

    envelope = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(envelope["sealed"]))
    raw[20] ^= 0x01
    path.write_text(json.dumps(envelope | {"sealed": base64.b64encode(bytes(raw)).decode()}))


def test_an_unreadable_entry_with_a_fresh_heartbeat_keeps_the_sweeper_from_its_vms_snapshot(
    client, plan, tmp_path, caplog
):
    """A sealed entry the sweeper cannot authenticate (here altered; as well:
    swept without the passphrase) may be a live 6-hour run's: its file's mtime
    is fresh, so the VM its file name says is left whole (one line), though the
    snapshot is older than the threshold. Once the mtime is stale it is swept."""
    import logging

    from vmbackup import _mover
    from vmbackup.vsphere.sweep import sweep

    repo = tmp_path / "enc"
    _mover.init_repository(str(repo), key=os.urandom(32))
    plan = plan.model_copy(update={"repository": repo})
    info = vm_info(client, "crash01")
    entry = Entry(run_id="unread1", vm="crash01", vm_moref=info.moref, pid=_dead_pid(), created_unix=time.time() - 7200)
    entry.machine, entry.space = ELSEWHERE["machine"], ELSEWHERE["space"]
    Ledger(repo).write(entry)
    snapshots.create(
        client.find_vm("crash01"), "crash01", "unread1", quiesce_policy="off", tools_running=True, timeout=60
    )
    _flip_sealed(entry.path)  # fresh mtime: the heartbeat of a live run

    with caplog.at_level(logging.INFO):
        sweep(client, plan, older_than_seconds=0)
    assert _ours(client, "crash01") == [snapshots.snapshot_name("unread1")]
    lines = [r.getMessage() for r in caplog.records if "heartbeat is fresh" in r.getMessage()]
    assert lines == [
        "VM crash01: skipped, ledger entry crash01--unread1.json cannot be authenticated here and its heartbeat is fresh"
    ]

    _backdate(entry, STALE + 30)  # the run is dead: its snapshot is swept, the entry it cannot read stays
    sweep(client, plan, older_than_seconds=0)
    assert _ours(client, "crash01") == [] and entry.path.exists()
    entry.path.unlink()


def test_a_forged_entry_naming_a_vm_that_is_no_clone_never_destroys_it(client, plan, tmp_path, caplog):
    """A plain entry (an unencrypted repository, or one downgraded to it) whose
    ``clones[].moref`` is another VM's: reconcile finds it by moref, sees its
    name lacks the clone prefix, says so in one line and destroys nothing."""
    import logging

    from vmbackup.vsphere.inventory import CLONE_PREFIX
    from vmbackup.vsphere.sweep import sweep

    victim = vm_info(client, "off03")
    info = vm_info(client, "crash01")
    entry = Entry(run_id="forged1", vm="crash01", vm_moref=info.moref, pid=_dead_pid(), created_unix=time.time() - 7200)
    entry.machine, entry.space = ELSEWHERE["machine"], ELSEWHERE["space"]
    entry.clones = [{"name": f"{CLONE_PREFIX}crash01-forged1", "moref": victim.moref}]
    Ledger(plan.repository).write(entry)
    _backdate(entry, STALE + 30)

    with caplog.at_level(logging.WARNING):
        sweep(client, plan, older_than_seconds=0)
    assert client.find_vm("off03") is not None and vm_info(client, "off03").moref == victim.moref
    lines = [r.getMessage() for r in caplog.records if "lacks the prefix" in r.getMessage()]
    assert len(lines) == 1 and "off03" in lines[0] and victim.moref in lines[0]
