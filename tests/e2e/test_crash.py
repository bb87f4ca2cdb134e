"""kill -9 of `vmbackup backup` while VMs hold a snapshot and attached disks:
the next run's reconcile, or the sweep_vsphere flow, leaves nothing behind,
and the next run backs those VMs up. The killed run, left Running on the
server, is marked Crashed by the next command that talks to the server
(`vmbackup backup`, or `vmbackup server status`); a run whose process lives
is never marked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from vmbackup.localserver.runs import MESSAGE
from vmbackup.localserver.server import _start_time

from .conftest import leftovers, pyvmomi_leftovers, run

VMS = ["big01", "big02"]
CLEAN = {"counters": {}, "snapshots": {}, "clones": []}


def _holding(lab) -> bool:
    counters = lab.status()["counters"]
    attached = sum(c["now"] for c in counters["attached_disks"]["agent"].values())
    snapshots = sum(c["now"] for c in counters["snapshots"]["host"].values())
    return attached > 0 and snapshots > 0


def _prefect(env, api: str, op: str, arg: str):
    """What tests/e2e/_prefect_runs.py says about the server at ``api``."""
    p = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_prefect_runs.py")), op, arg],
        env=dict(env, PREFECT_API_URL=api, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def _api(state_dir: Path) -> str:
    return f"http://127.0.0.1:{json.loads((state_dir / 'server.json').read_text())['port']}/api"


def _kill_while_holding(lab, plan, env) -> int:
    args = [a for vm in VMS for a in ("--vm", vm)]
    p = subprocess.Popen(
        [sys.executable, "-m", "vmbackup", "backup", "--plan", str(plan), *args, "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Watch the lab's counters (a progress counter, no sleeps) until a VM
        # holds a snapshot and a hot-added disk, then kill at once.
        while p.poll() is None and not _holding(lab):
            pass
        assert p.poll() is None, "the run ended before any VM held a snapshot and a disk"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    left = leftovers(lab)
    assert left["snapshots"] and any(k.startswith("attached_disks.agent.") for k in left["counters"]), left
    return p.pid


@pytest.mark.parametrize("cleanup", ["next_run", "sweep"])
def test_killed_run_leaves_nothing_after_reconcile_or_sweep(small_lab, env, state_dir, tmp_path, cleanup):
    lab = small_lab.lab
    plan = small_lab.write_plan(tmp_path / "plan.yaml", repository=tmp_path / "repo")
    from vmbackup import _mover

    _mover.init_repository(str(tmp_path / "repo"))
    # Guest data, so that reading the disks takes a moment.
    for vm in VMS:
        lab.write(vm, "scsi0:0", 0, 256 << 20, seed=len(vm) + 3)
    killed = _kill_while_holding(lab, plan, env)

    # The killed process's record names its run, which the server shows Running.
    record = json.loads((state_dir / "runs" / f"{killed}.json").read_text())
    api = _api(state_dir)
    assert record["pid"] == killed and record["api_url"] == api
    [left_running] = _prefect(env, api, "runs", record["tag"])
    assert left_running["name"] and left_running["state"] == "RUNNING", left_running

    # A record of a live process (this test's) and its Running run: never marked.
    live_tag = f"vmbackup-pid-{os.getpid()}-live-{cleanup}"
    live_record = state_dir / "runs" / f"{os.getpid()}.json"
    live_record.write_text(
        json.dumps({"pid": os.getpid(), "start_time": _start_time(os.getpid()), "api_url": api, "tag": live_tag})
    )
    live_id = _prefect(env, api, "create-running", live_tag)

    try:
        _marked_once_by_the_next_command(lab, small_lab, plan, env, api, cleanup, killed, record["tag"])
    finally:
        live_record.unlink()
    [live] = _prefect(env, api, "runs", live_tag)
    assert live["id"] == live_id and live["state"] == "RUNNING", live


def _marked_once_by_the_next_command(lab, small_lab, plan, env, api, cleanup, killed, tag):
    line = "marked 1 flow run that a killed vmbackup left Running as Crashed"
    if cleanup == "sweep":
        status = run("server", "status", "--json", env=env)
        assert json.loads(status.stdout)["crashed_runs_marked"] == 1
        assert line in status.stderr.splitlines(), status.stderr
        code = (
            "import json, sys; from vmbackup.orchestration.backup_vsphere import sweep_vsphere; "
            "print(json.dumps(sweep_vsphere(plan_path=sys.argv[1], older_than_seconds=0), default=str))"
        )
        p = subprocess.run(
            [sys.executable, "-c", code, str(plan)],
            env=dict(env, PREFECT_API_URL=api, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr
        swept = json.loads(p.stdout.splitlines()[-1])
        assert swept and all(item["removed"] for item in swept), swept
        assert {item["vm"] for item in swept} <= set(VMS)
        assert leftovers(lab) == CLEAN
        assert pyvmomi_leftovers(small_lab) == []

    p = run("backup", "--plan", str(plan), "--vm", VMS[0], "--vm", VMS[1], "--json", env=env)
    rows = json.loads(p.stdout)["vms"]
    # Marked once: by `server status` in the sweep case, else by this backup.
    assert (line in p.stderr.splitlines()) == (cleanup == "next_run"), p.stderr
    assert not (Path(env["VMBACKUP_STATE_DIR"]) / "runs" / f"{killed}.json").exists()
    [crashed] = _prefect(env, api, "runs", tag)
    assert crashed["state"] == "CRASHED" and crashed["message"] == MESSAGE.format(pid=killed), crashed
    newest = _prefect(env, api, "runs-of", "backup_vms")[0]
    assert newest["id"] != crashed["id"] and newest["state"] == "COMPLETED", newest
    assert sorted(r["vm"] for r in rows) == VMS
    assert all(r["status"] == "ok" and r["backup_id"] and r["error"] is None for r in rows), rows
    assert leftovers(lab) == CLEAN
    assert pyvmomi_leftovers(small_lab) == []
