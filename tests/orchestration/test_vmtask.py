"""The per-VM task on a real Prefect server: limits never exceeded, retries
only for retryable errors, a deadline that cancels a real mover call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from vmbackup.errors import BackupError, CancelledError
from vmbackup_lab.diskimage import make_image

MiB = 1024 * 1024


class Transient(BackupError):
    retryable = True


class Permanent(BackupError):
    retryable = False


def run_in_flow(jobs, **kw):
    from prefect import flow
    from vmbackup.orchestration import vmtask

    @flow(name="vmtask-test", validate_parameters=False)
    def f():
        return vmtask.run_vm_tasks(jobs, **kw)

    return f()


@pytest.fixture(scope="module")
def repo_with_backup(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    repo, img = d / "repo", d / "disk.img"
    make_image(str(img), 16 * MiB, seed=3)
    run = [sys.executable, "-m", "vmbackup"]
    subprocess.run([*run, "init", "--repo", str(repo)], check=True, capture_output=True)
    p = subprocess.run(
        [*run, "backup-disk", "--repo", str(repo), "--vm", "v", "--json", str(img)],
        check=True,
        capture_output=True,
        text=True,
    )
    import json

    return repo, img, json.loads(p.stdout)["id"]


def test_thirty_vms_never_exceed_any_limit(prefect_server, repo_with_backup, tmp_path):
    from vmbackup import _mover
    from vmbackup.orchestration import limits, vmtask

    repo, img, _ = repo_with_backup
    hosts, agents, datastores = ["h0", "h1", "h2"], ["a0", "a1"], ["ds0", "ds1"]
    values = limits.limit_values(agents, hosts, datastores, per_agent=3, per_host=2, per_datastore=3)
    limits.ensure_limits(values)
    lock = threading.Lock()
    now, peak = Counter(), Counter()
    overlap = threading.Event()  # two VMs ran at once: the limits were really exercised

    def work_for(names):
        def work(token):
            with lock:
                for n in names:
                    now[n] += 1
                    peak[n] = max(peak[n], now[n])
                now["*"] += 1
                if now["*"] >= 2:
                    overlap.set()
            try:
                # The first VM waits for a second one to run beside it (VMs on
                # other agents and hosts are free to start); the bound only
                # keeps a broken runner from hanging the test.
                overlap.wait(timeout=120)
                # Real work while the slots are held: back up a disk with the mover.
                session = _mover.BackupSession(str(repo), "load", None)
                session.add_disk(str(img), "scsi0:0", None, None, cancel=token)
                session.abort()
            finally:
                with lock:
                    for n in names:
                        now[n] -= 1
                    now["*"] -= 1
            return {"status": "ok"}

        return work

    jobs = []
    for i in range(30):
        names = limits.vm_limit_names(agents[i % 2], hosts[i % 3], [datastores[i % 2], datastores[(i // 2) % 2]])
        jobs.append(vmtask.VmJob(vm=f"vm{i:02d}", limits=names, work=work_for(names), row={"repository": str(repo)}))
    rows = run_in_flow(jobs, max_workers=30, retries=0)
    assert [r["status"] for r in rows] == ["ok"] * 30, rows
    assert [r["vm"] for r in rows] == [f"vm{i:02d}" for i in range(30)]
    for name, value in values.items():
        assert peak[name] <= value, (name, peak[name], value)
    assert overlap.is_set(), "the tasks never ran at the same time: the test measured nothing"
    assert all(active == 0 for _, active in limits.read_limits(values).values())


def test_retries_only_retryable_errors_and_rows_carry_one_line_errors(prefect_server):
    from vmbackup.orchestration import vmtask

    attempts = Counter()

    def flaky(token):
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise Transient("session dropped\nwhile reading")
        return {"status": "ok", "backup_id": "b1"}

    def wrong_password(token):
        attempts["permanent"] += 1
        raise Permanent("login as admin with password hunter2 refused")

    def bug(token):
        attempts["bug"] += 1
        raise KeyError("oops")

    names = ["vmbackup-test-retry"]
    from vmbackup.orchestration import limits

    limits.ensure_limits({names[0]: 5})
    jobs = [
        vmtask.VmJob("flaky", names, flaky, {"repository": "/r", "host": "h0"}),
        vmtask.VmJob("denied", names, wrong_password, {"repository": "/r", "host": "h1"}),
        vmtask.VmJob("bug", names, bug, {"repository": "/r"}),
    ]
    rows = run_in_flow(jobs, max_workers=3, retries=3, retry_delay_seconds=[0], secrets=["hunter2"])
    by = {r["vm"]: r for r in rows}
    assert attempts == {"flaky": 3, "permanent": 1, "bug": 1}
    assert by["flaky"]["status"] == "ok" and by["flaky"]["backup_id"] == "b1"
    assert by["denied"]["status"] == "failed" and by["denied"]["host"] == "h1"
    assert by["denied"]["error"] == "login as admin with password *** refused"
    assert by["bug"]["error"] == "KeyError: 'oops'"
    for r in rows:
        assert set(vmtask.ROW_FIELDS) <= set(r)


def test_deadline_cancels_a_running_mover_call_and_is_not_retried(prefect_server, repo_with_backup, tmp_path):
    from vmbackup import _mover
    from vmbackup.orchestration import limits, vmtask

    repo, _, backup_id = repo_with_backup
    sock = tmp_path / "nbd.sock"
    calls = Counter()
    served = threading.Event()

    def serve_until_cancelled(token):
        # A long C call on a worker thread: only the cancel token stops it.
        calls["serve"] += 1
        _mover.serve(str(repo), backup_id, socket=str(sock), ready=lambda uri: served.set(), cancel=token)
        if token.cancelled:  # as the adapter does: a cancelled procedure is a failure
            raise CancelledError("serving cancelled")
        return {"status": "ok"}

    limits.ensure_limits({"vmbackup-test-deadline": 1})
    rows = run_in_flow(
        [vmtask.VmJob("slow", ["vmbackup-test-deadline"], serve_until_cancelled, {"repository": str(repo)})],
        max_workers=1,
        deadline_seconds=1.0,
        retries=2,
        retry_delay_seconds=[0],
    )
    assert served.is_set()
    assert calls["serve"] == 1, "a timed-out VM was retried"
    assert rows[0]["status"] == "failed"
    assert rows[0]["error"] == "backup of slow exceeded 1 s and was cancelled"
    assert not sock.exists(), "the mover's cleanup did not run"
    assert limits.read_limits(["vmbackup-test-deadline"])["vmbackup-test-deadline"][1] == 0


def limits_active(name: str) -> int:
    from vmbackup.orchestration import limits

    return limits.read_limits([name])[name][1]


def test_limit_names_are_safe_and_distinct():
    from vmbackup.orchestration.limits import limit_name

    assert limit_name("host", "esx1.lab.local") == "vmbackup-host-esx1.lab.local"
    a, b = limit_name("datastore", "nfs/a"), limit_name("datastore", "nfs_a")
    assert a != b and "/" not in a and a.startswith("vmbackup-datastore-nfs_a~")
    assert os.path.basename(a) == a
    assert Path(a).name == a


INTERRUPTED = """
import sys
from prefect import flow
from vmbackup import _mover
from vmbackup.orchestration import limits, vmtask

repo, backup_id, sock = sys.argv[1:4]

def serve(token):
    try:
        _mover.serve(repo, backup_id, socket=sock, ready=lambda uri: print("serving", flush=True), cancel=token)
    finally:
        print("cleanup ran, cancelled=%s" % token.cancelled, flush=True)
    return {"status": "ok"}

@flow(validate_parameters=False)
def run():
    limits.ensure_limits({"vmbackup-test-interrupt": 2})
    jobs = [vmtask.VmJob("slow", ["vmbackup-test-interrupt"], serve)]
    return vmtask.run_vm_tasks(jobs, max_workers=1, retries=0)

try:
    run()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_cancels_running_mover_calls_and_their_cleanup_runs(prefect_server, repo_with_backup, tmp_path):
    import signal

    from .procs import child_env

    repo, _, backup_id = repo_with_backup
    sock = tmp_path / "nbd.sock"
    env = child_env(Path(prefect_server.state_dir), prefect_server.api_url)
    p = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, str(repo), backup_id, str(sock)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "serving"
        assert sock.exists()
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    assert out.splitlines() == ["cleanup ran, cancelled=True", "interrupted"], out
    assert p.returncode == 130
    assert not sock.exists()
    assert limits_active("vmbackup-test-interrupt") == 0


def test_rows_say_how_long_the_vm_waited_for_its_limits_and_held_them(prefect_server):
    """The benchmark's fields (bench/flows.py): the wait for the limits, and
    the time they were held, which covers the work's own time."""
    import hashlib
    import time

    from vmbackup.orchestration import limits, vmtask

    names = ["vmbackup-test-timing"]
    limits.ensure_limits({names[0]: 1})

    def work(token):
        t = time.monotonic()
        hashlib.sha256(bytes(8 << 20)).hexdigest()
        return {"status": "ok", "seconds": time.monotonic() - t}

    rows = run_in_flow(
        [vmtask.VmJob("a", names, work, {}), vmtask.VmJob("b", names, work, {})], max_workers=2, retries=0
    )
    for r in rows:
        assert r["status"] == "ok", r
        assert r["held_seconds"] >= r["seconds"] > 0
        assert r["limit_wait_seconds"] >= 0
