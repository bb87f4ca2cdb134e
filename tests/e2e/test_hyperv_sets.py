"""One shadow copy set per volume group in a `vmbackup backup` run (issue 16, 3.1),
through real Prefect, real pywinrm against the lab's Hyper-V host, real mover:

- 4 VMs on one volume of one host in one run: ONE set (not 4), each guest
  quiesced once (not 4 times), every row ok and every disk restored bit-exact;
  with the diagnostic switch off (a set per VM) the same run makes 4 sets;
- a VM whose read fails fails alone: the others commit and the set is completed;
- nothing is left on the host after the run, also after one interrupted mid-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from vmbackup import _mover

from .conftest import backup, hyperv_leftovers, sha

TOPOLOGY = Path(__file__).resolve().parents[2] / "lab" / "topologies" / "hyperv-20.json"
FOUR = ["hv1-vm01", "hv1-vm02", "hv1-vm05", "hv1-vm10"]  # all on D: of hv1 (lab/topologies/hyperv-20.json)


def _host(e2e):
    return next(h for h in e2e.lab.hyperv_hosts() if h.host == "hv1")


def _plan(e2e, tmp_path, **limits):
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    data = e2e.plan_data()
    lim = {"per_agent": 4, "per_host": 4, "per_datastore": 4, "disks_per_vm": 1, **limits}
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo, limits=lim, selection=dict(data["selection"]))
    return plan, repo


def _args(plan, vms):
    return ["--plan", str(plan)] + [a for v in vms for a in ("--vm", v)]


def _counts(hv):
    st = hv.status()
    return st["counters"]["shadow_sets_created"], {v["name"]: v for v in st["vms"]}


@pytest.mark.parametrize("shared", ["1", "0"])
def test_four_vms_of_one_volume_in_one_run_share_one_set(hyperv20_lab, state_dir, tmp_path, shared):
    e2e = hyperv20_lab
    hv = _host(e2e)
    topology = json.loads(TOPOLOGY.read_text())
    assert {v["name"]: v["volume"] for v in topology["hyperv"][0]["vms"] if v["name"] in FOUR} == dict.fromkeys(
        FOUR, "D"
    )
    plan, repo = _plan(e2e, tmp_path)
    env = dict(e2e.env(state_dir), VMBACKUP_HYPERV_SHARED_SETS=shared)
    created, before = _counts(hv)

    rows = backup(*_args(plan, FOUR), env=env)

    assert sorted(r["vm"] for r in rows) == FOUR
    assert all(r["status"] == "ok" and r["consistency"] == "application" for r in rows), rows
    created_after, after = _counts(hv)
    quiesces = {n: after[n]["quiesce_count"] - before[n]["quiesce_count"] for n in FOUR}
    if shared == "0":  # the diagnostic: a set per VM, every guest of D: frozen by each
        assert created_after - created == 4 and quiesces == dict.fromkeys(FOUR, 4)
    else:
        assert created_after - created == 1, created_after - created
        assert quiesces == dict.fromkeys(FOUR, 1), quiesces
        assert {n: after[n]["backup_complete"] - before[n]["backup_complete"] for n in FOUR} == dict.fromkeys(FOUR, 1)
    for r in rows:
        for d in r["disks"]:
            stem = f"{r['vm']}-{d['name'].replace(':', '_')}"
            image, restored = tmp_path / f"{stem}.img", tmp_path / f"{stem}.raw"
            hv.disk_image(r["vm"], d["name"], image)
            _mover.restore_disk(str(repo), r["backup_id"], str(restored), disk=d["name"])
            assert sha(restored) == sha(image), (r["vm"], d["name"])
    assert hyperv_leftovers(e2e) == {}


def test_a_vm_whose_read_fails_fails_alone_and_the_set_is_completed(hyperv20_lab, state_dir, tmp_path):
    """hv1-vm02's VHDX headers are broken (a read error that is not retried): it
    fails alone; the three others commit from the one set, which is completed
    with BackupComplete (their points exist) and removed."""
    e2e = hyperv20_lab
    hv = _host(e2e)
    plan, repo = _plan(e2e, tmp_path)
    env = e2e.env(state_dir)
    vm02 = next(v for v in hv.status()["vms"] if v["name"] == "hv1-vm02")
    top = Path(vm02["disks"][0]["chain"][0]["local"])
    good = top.read_bytes()[64 << 10 : 192 << 10]
    created, before = _counts(hv)
    try:
        with open(top, "r+b") as f:
            f.seek(64 << 10)
            f.write(bytes(128 << 10))
        rows = backup(*_args(plan, FOUR), env=env, expect=1)
    finally:
        with open(top, "r+b") as f:
            f.seek(64 << 10)
            f.write(good)
    by_vm = {r["vm"]: r for r in rows}
    assert by_vm["hv1-vm02"]["status"] == "failed" and "not a valid VHDX image" in by_vm["hv1-vm02"]["error"]
    others = [n for n in FOUR if n != "hv1-vm02"]
    assert all(by_vm[n]["status"] == "ok" and by_vm[n]["backup_id"] for n in others), rows
    created_after, after = _counts(hv)
    assert created_after - created == 1
    assert {n: after[n]["quiesce_count"] - before[n]["quiesce_count"] for n in FOUR} == dict.fromkeys(FOUR, 1)
    # completed with BackupComplete: committed points were the set's outcome
    assert {n: after[n]["backup_complete"] - before[n]["backup_complete"] for n in others} == dict.fromkeys(others, 1)
    assert hyperv_leftovers(e2e) == {}


def test_a_run_interrupted_while_the_set_is_open_leaves_nothing_on_the_host(hyperv20_lab, state_dir, tmp_path):
    """One VM at a time on D: (per_datastore 1) keeps the group's set open while
    the others wait for their slot; SIGINT then: the VMs' cleanup and the
    pool's close at the end of the run end the set; nothing is left."""
    e2e = hyperv20_lab
    hv = _host(e2e)
    plan, repo = _plan(e2e, tmp_path, per_datastore=1)
    env = e2e.env(state_dir)
    for name in FOUR:  # guest data, so that each VM reads a moment
        hv.write(name, "scsi0:0", 0, 4 << 20, seed=7)
    created, _ = _counts(hv)
    p = subprocess.Popen(
        [sys.executable, "-m", "vmbackup", "backup", *_args(plan, FOUR), "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Watch the host (no sleeps) until the group's set exists, then interrupt at once.
        while p.poll() is None and not (st := hv.status())["shadow_copies"]:
            pass
        assert p.poll() is None, "the run ended before the set was made"
        os.kill(p.pid, signal.SIGINT)
        # one run on the host, for the four VMs (`shadowset.set_run_id`: "<first>-and-3")
        assert len(st["runs"]) == 1 and "-hv1-vm01-and-3-" in st["runs"][0], st["runs"]
        p.wait(300)
    finally:
        p.kill()
        p.wait()
    assert p.returncode != 0
    assert _counts(hv)[0] - created == 1
    assert hyperv_leftovers(e2e) == {}
