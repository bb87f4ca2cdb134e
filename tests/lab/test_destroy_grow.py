"""Destroying a VM (a linked clone) and growing a disk, as the backup flows use them."""

import pytest
from pyVmomi import vim

from .labkit import datastore_file, disk, disks, find, snapshot, wait


def test_destroying_a_linked_clone_removes_its_files_and_keeps_the_shared_parent(si, lab):
    vm = find(si, vim.VirtualMachine, "clonesrc01")
    snap = snapshot(vm, "for-destroy")
    key = disks(vm)[0].key
    frozen = disk(snap.config, key).backing.fileName
    spec = vim.vm.CloneSpec(
        snapshot=snap, powerOn=False, template=False,
        location=vim.vm.RelocateSpec(diskMoveType="createNewChildDiskBacking"),
    )  # fmt: skip
    clone = wait(vm.CloneVM_Task(folder=vm.parent, name="clonesrc01-gone", spec=spec))
    delta = datastore_file(lab, disk(clone, key).backing.fileName)
    assert delta.exists()
    wait(clone.Destroy_Task())
    assert not delta.exists() and datastore_file(lab, frozen).exists()
    assert "clonesrc01-gone" not in [v["name"] for v in lab.status()["vms"]]
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert vm.runtime.consolidationNeeded is False and vm.snapshot is None


def _grow_spec(vm, key, capacity):
    dev = disk(vm, key)
    dev.capacityInBytes = capacity
    dev.capacityInKB = capacity // 1024
    return vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev)])


def test_a_disk_grows_without_snapshots_only(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "off01")
    d = disks(vm)[0]
    before = tmp_path / "before.img"
    lab.disk_image("off01", "scsi0:0", before)
    snap = snapshot(vm, "no-grow")
    with pytest.raises(vim.fault.InvalidState):
        wait(vm.ReconfigVM_Task(spec=_grow_spec(vm, d.key, d.capacityInBytes + (4 << 20))))
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    wait(vm.ReconfigVM_Task(spec=_grow_spec(vm, d.key, d.capacityInBytes + (4 << 20))))
    assert disks(vm)[0].capacityInBytes == d.capacityInBytes + (4 << 20)
    after = tmp_path / "after.img"
    lab.disk_image("off01", "scsi0:0", after)
    data = after.read_bytes()
    assert len(data) == d.capacityInBytes + (4 << 20)
    assert data[: d.capacityInBytes] == before.read_bytes() and data[d.capacityInBytes :] == bytes(4 << 20)
    lab.write("off01", "scsi0:0", d.capacityInBytes + 100, 1000, seed=3)  # the new area takes writes
