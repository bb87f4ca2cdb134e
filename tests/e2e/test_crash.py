"""kill -9 of `vmbackup backup` while VMs hold a snapshot and attached disks:
the next run's reconcile, or the sweep_vsphere flow, leaves nothing behind,
and the next run backs those VMs up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import backup, leftovers, pyvmomi_leftovers, run

VMS = ["big01", "big02"]
CLEAN = {"counters": {}, "snapshots": {}, "clones": []}


def _holding(lab) -> bool:
    counters = lab.status()["counters"]
    attached = sum(c["now"] for c in counters["attached_disks"]["agent"].values())
    snapshots = sum(c["now"] for c in counters["snapshots"]["host"].values())
    return attached > 0 and snapshots > 0


def _kill_while_holding(lab, plan, env) -> None:
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


@pytest.mark.parametrize("cleanup", ["next_run", "sweep"])
def test_killed_run_leaves_nothing_after_reconcile_or_sweep(small_lab, env, state_dir, tmp_path, cleanup):
    lab = small_lab.lab
    plan = small_lab.write_plan(tmp_path / "plan.yaml", repository=tmp_path / "repo")
    from vmbackup import _mover

    _mover.init_repository(str(tmp_path / "repo"))
    # Guest data, so that reading the disks takes a moment.
    for vm in VMS:
        lab.write(vm, "scsi0:0", 0, 256 << 20, seed=len(vm) + 3)
    _kill_while_holding(lab, plan, env)

    if cleanup == "sweep":
        api = json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]
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

    rows = backup("--plan", str(plan), "--vm", VMS[0], "--vm", VMS[1], env=env)
    assert sorted(r["vm"] for r in rows) == VMS
    assert all(r["status"] == "ok" and r["backup_id"] and r["error"] is None for r in rows), rows
    assert leftovers(lab) == CLEAN
    assert pyvmomi_leftovers(small_lab) == []
