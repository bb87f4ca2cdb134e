"""`vmbackup backup --plan <the lab's plan>`: every VM, full then incremental, bit-exact."""

from __future__ import annotations

import json
import re
import urllib.request

from vmbackup import _mover

from .conftest import api_headers, backup, leftovers, pyvmomi_leftovers, run, sha


def test_every_vm_full_then_incremental_restores_bit_exact(small_lab, env, tmp_path):
    lab, plan = small_lab.lab, small_lab.plan
    repository = small_lab.plan_data()["repository"]
    vms = sorted(v["name"] for v in lab.status()["vms"] if v["name"] not in lab.agents)

    first = backup("--plan", str(plan), env=env)
    assert sorted(r["vm"] for r in first) == vms
    for r in first:
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["mode"] == "full" and r["full_reason"] == "first backup", r
        assert r["transport"] == "hotadd" and r["consistency"] == "application", r
        assert r["repository"] == repository and r["backup_id"], r
        assert r["bytes_read"] > 0 and 0 < r["bytes_stored"] <= r["bytes_read"], r
        assert r["seconds"] > 0, r

    lab.write("web01", "scsi0:0", 3 << 20, 1 << 20, seed=11)
    lab.write("web01", "nvme0:0", 0, 64 << 10, seed=12)
    second = backup("--plan", str(plan), env=env)
    by_vm = {r["vm"]: r for r in second}
    assert sorted(by_vm) == vms
    for r in second:
        assert r["status"] == "ok" and r["mode"] == "incremental" and r["full_reason"] is None, r
        assert r["backup_id"] != next(f["backup_id"] for f in first if f["vm"] == r["vm"]), r
    web = by_vm["web01"]
    assert web["bytes_read"] >= (1 << 20) + (64 << 10)
    assert {d["name"]: d["changed_bytes"] for d in web["disks"]} == {"scsi0:0": 1 << 20, "nvme0:0": 64 << 10}
    assert all(r["bytes_read"] == 0 for r in second if r["vm"] != "web01"), second

    # No guest write since the run: the lab's current image is the backup's point in time.
    for disk in ("scsi0:0", "nvme0:0"):
        image, restored = tmp_path / f"lab-{disk}.img", tmp_path / f"restored-{disk}.img"
        lab.disk_image("web01", disk, image)
        _mover.restore_disk(repository, web["backup_id"], str(restored), disk=disk)
        assert sha(restored) == sha(image), disk
    assert leftovers(lab) == {"counters": {}, "snapshots": {}, "clones": []}
    assert pyvmomi_leftovers(small_lab) == []

    # The UI lists the runs under names a person reads: backup-<plan>-<when>.
    url = json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]
    req = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=json.dumps({"limit": 2, "sort": "START_TIME_DESC"}).encode(),
        headers=api_headers(env),
    )
    names = [r["name"] for r in json.load(urllib.request.urlopen(req, timeout=60))]
    assert len(names) == 2 and all(re.fullmatch(rf"backup-{plan.stem}-\d{{8}}-\d{{6}}", n) for n in names), names
