"""Snapshots as vSphere does them: delta disks, frozen parents, merge on removal,
quiesce through VMware Tools, consolidation."""

import os
import re

import pytest
from pyVmomi import vim

from .labkit import datastore_file, disk, disks, find, flat_file, pattern, sha, snapshot, wait


def test_snapshot_freezes_parent_and_guest_writes_go_to_the_delta(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "web01")
    base = disks(vm)[0]
    base_file, key = base.backing.fileName, base.key
    before = tmp_path / "before.img"
    lab.disk_image("web01", "scsi0:0", before)
    base_flat = flat_file(lab, base_file)
    base_hash = sha(base_flat)

    snap = snapshot(vm, "backup", quiesce=True)
    d = disk(vm, key)
    assert d.backing.parent is not None and d.backing.parent.fileName == base_file
    assert d.backing.fileName != base_file and re.search(r"-\d{6}\.vmdk$", d.backing.fileName)
    assert 'createType="vmfsSparse"' in datastore_file(lab, d.backing.fileName).read_text()
    tree = vm.snapshot.rootSnapshotList[0]
    assert tree.name == "backup" and tree.quiesced and tree.state == "poweredOff"  # no memory
    assert disk(snap.config, key).backing.fileName == base_file  # the snapshot's point in time

    lab.write("web01", "scsi0:0", 5 << 20, 100_000, seed=7)
    assert sha(base_flat) == base_hash  # the frozen parent did not change
    assert not os.access(base_flat, os.W_OK) or os.getuid() == 0
    assert oct(base_flat.stat().st_mode & 0o777) == "0o444"
    at_snap = tmp_path / "at_snap.img"
    lab.disk_image("web01", "scsi0:0", at_snap, snapshot="backup")
    assert sha(at_snap) == sha(before)
    now = tmp_path / "now.img"
    lab.disk_image("web01", "scsi0:0", now)
    data = now.read_bytes()
    assert data[5 << 20 : (5 << 20) + 100_000] == pattern(7, 5 << 20, 100_000)
    old = before.read_bytes()
    assert data[: 5 << 20] == old[: 5 << 20] and data[(5 << 20) + 100_000 :] == old[(5 << 20) + 100_000 :]

    delta_file = datastore_file(lab, d.backing.fileName)
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None
    d = disk(vm, key)
    assert d.backing.fileName == base_file and d.backing.parent is None
    assert not delta_file.exists()
    after = tmp_path / "after.img"
    lab.disk_image("web01", "scsi0:0", after)
    assert sha(after) == sha(now)  # the delta was merged back
    assert sha(base_flat) != base_hash and oct(base_flat.stat().st_mode & 0o777) == "0o644"


def test_two_snapshots_removed_oldest_first_keep_every_point_in_time(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "app01")
    s1 = snapshot(vm, "s1")
    lab.write("app01", "nvme0:0", 0, 8192, seed=1)
    img2 = tmp_path / "two.img"
    s2 = snapshot(vm, "s2", memory=True)
    assert vm.snapshot.rootSnapshotList[0].childSnapshotList[0].state == "poweredOn"
    lab.disk_image("app01", "nvme0:0", img2)
    lab.write("app01", "nvme0:0", 4096, 8192, seed=2)
    now = tmp_path / "now.img"
    lab.disk_image("app01", "nvme0:0", now)
    assert len(_chain(disks(vm)[0].backing)) == 3
    wait(s1.RemoveSnapshot_Task(removeChildren=False))
    assert [t.name for t in vm.snapshot.rootSnapshotList] == ["s2"]
    assert len(_chain(disks(vm)[0].backing)) == 2
    check = tmp_path / "check.img"
    lab.disk_image("app01", "nvme0:0", check, snapshot="s2")
    assert sha(check) == sha(img2)
    lab.disk_image("app01", "nvme0:0", check)
    assert sha(check) == sha(now)
    wait(s2.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None and len(_chain(disks(vm)[0].backing)) == 1
    lab.disk_image("app01", "nvme0:0", check)
    assert sha(check) == sha(now)


def _chain(backing):
    out = []
    while backing is not None:
        out.append(backing.fileName)
        backing = backing.parent
    return out


def test_quiesce_needs_running_tools(si, lab):
    vm = find(si, vim.VirtualMachine, "notools01")
    assert vm.guest.toolsRunningStatus == "guestToolsNotRunning"
    with pytest.raises(vim.fault.ToolsUnavailable):
        snapshot(vm, "q", quiesce=True)
    assert vm.snapshot is None
    snap = snapshot(vm, "crash-consistent", quiesce=False)
    assert vm.snapshot.rootSnapshotList[0].quiesced is False
    wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_a_vm_told_to_fail_quiescing_fails_and_leaves_nothing(si, lab):
    vm = find(si, vim.VirtualMachine, "db01")
    files_before = set(os.listdir(datastore_file(lab, "[shared1] db01")))
    lab.set_faults(vm="db01", quiesce_fail=True)
    try:
        with pytest.raises(vim.fault.ApplicationQuiesceFault):
            snapshot(vm, "q", quiesce=True)
        assert vm.snapshot is None and disks(vm)[0].backing.parent is None
        assert set(os.listdir(datastore_file(lab, "[shared1] db01"))) == files_before
    finally:
        lab.set_faults(vm="db01")
    snap = snapshot(vm, "q", quiesce=True)
    assert vm.snapshot.rootSnapshotList[0].quiesced
    wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_removal_can_leave_the_vm_needing_consolidation(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "off01")
    base = disks(vm)[0].backing.fileName
    snap = snapshot(vm, "s")
    lab.write("off01", "scsi0:0", 1 << 20, 65536, seed=3)
    expected = tmp_path / "expected.img"
    lab.disk_image("off01", "scsi0:0", expected)
    lab.set_faults(vm="off01", leave_consolidation=True)
    try:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))
    finally:
        lab.set_faults(vm="off01")
    assert vm.snapshot is None
    assert vm.runtime.consolidationNeeded is True
    assert disks(vm)[0].backing.parent.fileName == base  # the delta is still there
    wait(vm.ConsolidateVMDisks_Task())
    assert vm.runtime.consolidationNeeded is False
    assert disks(vm)[0].backing.fileName == base and disks(vm)[0].backing.parent is None
    got = tmp_path / "got.img"
    lab.disk_image("off01", "scsi0:0", got)
    assert sha(got) == sha(expected)


def test_remove_all_snapshots_merges_everything(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "web01")
    snapshot(vm, "a")
    lab.write("web01", "scsi0:1", 0, 4096, seed=11)
    snapshot(vm, "b")
    lab.write("web01", "scsi0:1", 8192, 4096, seed=12)
    expected = tmp_path / "e.img"
    lab.disk_image("web01", "scsi0:1", expected)
    wait(vm.RemoveAllSnapshots_Task())
    assert vm.snapshot is None
    assert all(d.backing.parent is None for d in disks(vm))
    got = tmp_path / "g.img"
    lab.disk_image("web01", "scsi0:1", got)
    assert sha(got) == sha(expected)
