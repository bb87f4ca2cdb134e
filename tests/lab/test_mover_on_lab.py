"""The mover against the lab, the way the vSphere flow will use them:
snapshot, back up the frozen disk file from its datastore (the direct
storage transport) or from the agent's hot-added device, then an
incremental from QueryChangedDiskAreas. Every restore must equal what the
lab says the guest saw at that snapshot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyVmomi import vim

from .labkit import datastore_file, disk, disks, find, sha, snapshot, wait

DISK = "scsi0:0"


def vmbackup(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "vmbackup", *args, "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def changed_areas(vm, snap, key, change_id, capacity):
    areas, offset = [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        areas += [{"start": a.start, "length": a.length} for a in info.changedArea]
        offset = info.startOffset + info.length
    return areas


def test_full_from_the_datastore_then_cbt_incremental(si, lab, tmp_path):
    repo = str(tmp_path / "repo")
    vmbackup("init", "--repo", repo)
    vm = find(si, vim.VirtualMachine, "mover01")
    key = disks(vm)[0].key
    capacity = disks(vm)[0].capacityInBytes

    s1 = snapshot(vm, "s1", quiesce=True)
    try:
        frozen = disk(s1.config, key).backing
        change1 = frozen.changeId
        full = vmbackup(
            "backup-disk",
            "--repo",
            repo,
            "--vm",
            "mover01",
            "--disk",
            DISK,
            "--change-id",
            change1,
            str(datastore_file(lab, frozen.fileName)),
        )
        # The running disk is a delta now: read as is it would be wrong, so it is refused.
        delta = disk(vm, key).backing.fileName
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "vmbackup",
                "backup-disk",
                "--repo",
                repo,
                "--vm",
                "x",
                str(datastore_file(lab, delta)),
            ],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 2 and "hot-add or NBD" in p.stderr
        lab.write("mover01", DISK, 3 << 20, 200_000, seed=1)  # lands in the delta, not in the backup
        expected = tmp_path / "s1.img"
        lab.disk_image("mover01", DISK, expected, snapshot="s1")
    finally:
        wait(s1.RemoveSnapshot_Task(removeChildren=False))
    vmbackup("restore-disk", "--repo", repo, full["id"], str(tmp_path / "full.raw"))
    assert sha(tmp_path / "full.raw") == sha(expected)
    assert full["bytes_read"] < capacity  # unallocated areas of the thin disk were skipped

    for i, (off, n) in enumerate([(0, 4096), (10 << 20, 3 << 20), (capacity - 5000, 5000)]):
        lab.write("mover01", DISK, off, n, seed=10 + i)
    s2 = snapshot(vm, "s2", quiesce=True)
    try:
        frozen = disk(s2.config, key).backing
        areas = changed_areas(vm, s2, key, change1, capacity)
        assert areas, "CBT saw the guest writes"
        extents = tmp_path / "changed.json"
        extents.write_text(json.dumps(areas))
        inc = vmbackup(
            "backup-disk",
            "--repo",
            repo,
            "--vm",
            "mover01",
            "--disk",
            DISK,
            "--parent",
            full["id"],
            "--changed-extents",
            str(extents),
            "--change-id",
            frozen.changeId,
            str(datastore_file(lab, frozen.fileName)),
        )
        expected = tmp_path / "s2.img"
        lab.disk_image("mover01", DISK, expected, snapshot="s2")
    finally:
        wait(s2.RemoveSnapshot_Task(removeChildren=False))
    assert inc["mode"] == "changed" and inc["parent_blocks"] > 0
    assert inc["bytes_read"] < full["bytes_read"]
    vmbackup("restore-disk", "--repo", repo, inc["id"], str(tmp_path / "inc.raw"))
    assert sha(tmp_path / "inc.raw") == sha(expected)
    assert vmbackup("verify", "--repo", repo, "--read-data")["ok"]


def test_backup_from_a_hot_added_disk(si, lab, tmp_path):
    repo = str(tmp_path / "repo")
    vmbackup("init", "--repo", repo)
    vm = find(si, vim.VirtualMachine, "mover01")
    agent = next(
        a for a in (find(si, vim.VirtualMachine, n) for n in lab.agents) if a.runtime.host == vm.runtime.host
    )  # the appliance on mover01's host
    key = disks(vm)[0].key
    snap = snapshot(vm, "hot", quiesce=True)
    try:
        frozen = disk(snap.config, key).backing
        ctrl = next(d for d in agent.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=frozen.fileName, diskMode="independent_nonpersistent"
        )
        add = vim.vm.device.VirtualDeviceSpec(
            operation="add", device=vim.vm.device.VirtualDisk(key=-1, controllerKey=ctrl.key, backing=backing)
        )
        wait(agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[add])))
        added = next(d for d in disks(agent) if d.backing.fileName == frozen.fileName)
        # The agent finds the device from the disk's uuid (docs/lab.md).
        device = Path(lab.state) / "agents" / agent.name / "devices" / added.backing.uuid
        try:
            b = vmbackup("backup-disk", "--repo", repo, "--vm", "mover01", "--disk", DISK, str(device))
            expected = tmp_path / "hot.img"
            lab.disk_image("mover01", DISK, expected, snapshot="hot")
        finally:
            remove = vim.vm.device.VirtualDeviceSpec(operation="remove", device=added)
            wait(agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[remove])))
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))
    vmbackup("restore-disk", "--repo", repo, b["id"], str(tmp_path / "hot.raw"))
    assert sha(tmp_path / "hot.raw") == sha(expected)
