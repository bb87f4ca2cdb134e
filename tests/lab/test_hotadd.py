"""Hot-add of a frozen snapshot disk or a linked clone's disk to an agent VM."""

from pathlib import Path

import pytest
from pyVmomi import vim

from .labkit import datastore_file, disk, disks, find, sha, snapshot, wait


def attach_spec(agent, file_name, mode="independent_nonpersistent"):
    ctrl = next(d for d in agent.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=file_name, diskMode=mode)
    dev = vim.vm.device.VirtualDisk(key=-1, controllerKey=ctrl.key, backing=backing)
    change = vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)
    return vim.vm.ConfigSpec(deviceChange=[change])


def detach(agent, dev, destroy=False):
    change = vim.vm.device.VirtualDeviceSpec(operation="remove", device=dev)
    if destroy:
        change.fileOperation = "destroy"
    wait(agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))


def hot_added(agent, file_name):
    return [d for d in disks(agent) if d.backing.fileName == file_name]


def test_hot_add_frozen_disk_appears_read_only_and_detaches_without_deleting(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "db01")
    agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx2")
    lab.reset_counters()
    snap = snapshot(vm, "backup")
    try:
        frozen = disk(snap.config, disks(vm)[0].key).backing
        wait(agent.ReconfigVM_Task(spec=attach_spec(agent, frozen.fileName)))
        (dev,) = hot_added(agent, frozen.fileName)
        assert dev.backing.uuid == frozen.uuid
        # The agent finds the device from the uuid its own configuration shows.
        path = Path(lab.state) / "agents" / agent.name / "devices" / dev.backing.uuid
        assert path.exists() and (path.stat().st_mode & 0o222) == 0
        expected = tmp_path / "snap.img"
        lab.disk_image("db01", "sata0:0", expected, snapshot="backup")
        assert sha(path) == sha(expected)
        # Writes that go on in the VM don't reach the attached point in time.
        lab.write("db01", "sata0:0", 0, 4096, seed=5)
        assert sha(path) == sha(expected)
        # The same file twice on one agent is refused.
        with pytest.raises(vim.fault.FileLocked):
            wait(agent.ReconfigVM_Task(spec=attach_spec(agent, frozen.fileName)))
        # Destroying it through the agent would delete another VM's disk: locked.
        with pytest.raises(vim.fault.FileLocked):
            detach(agent, dev, destroy=True)
        detach(agent, dev)
        assert hot_added(agent, frozen.fileName) == [] and not path.exists()
        assert datastore_file(lab, frozen.fileName).exists()
        c = lab.counters()
        assert c["attached_disks"]["agent"][agent.name] == {"now": 0, "peak": 1}
        assert c["attached_disks"]["datastore"]["shared1"]["peak"] == 1
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert vm.runtime.consolidationNeeded is False and vm.snapshot is None


def test_running_disk_of_a_powered_on_vm_is_locked(si, lab):
    vm = find(si, vim.VirtualMachine, "app01")
    agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx2")
    with pytest.raises(vim.fault.FileLocked):
        wait(agent.ReconfigVM_Task(spec=attach_spec(agent, disks(vm)[0].backing.fileName)))
    assert hot_added(agent, disks(vm)[0].backing.fileName) == []


def test_snapshot_removed_while_attached_leaves_consolidation_needed(si, lab):
    vm = find(si, vim.VirtualMachine, "app01")
    agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx2")
    snap = snapshot(vm, "s")
    frozen = disk(snap.config, disks(vm)[0].key).backing.fileName
    wait(agent.ReconfigVM_Task(spec=attach_spec(agent, frozen)))
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert vm.runtime.consolidationNeeded is True  # the attached file was locked
    (dev,) = hot_added(agent, frozen)
    detach(agent, dev)
    wait(vm.ConsolidateVMDisks_Task())
    assert vm.runtime.consolidationNeeded is False and disks(vm)[0].backing.parent is None


def test_linked_clone_from_snapshot_and_hot_add_of_its_disk(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "clonesrc01")
    agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx1")
    snap = snapshot(vm, "for-clone")
    key = disks(vm)[0].key
    frozen = disk(snap.config, key).backing.fileName
    spec = vim.vm.CloneSpec(
        snapshot=snap,
        powerOn=False,
        template=False,
        location=vim.vm.RelocateSpec(diskMoveType="createNewChildDiskBacking"),
    )
    clone = wait(vm.CloneVM_Task(folder=vm.parent, name="clonesrc01-clone", spec=spec))
    assert clone.name == "clonesrc01-clone" and clone.runtime.powerState == "poweredOff"
    cdisk = disk(clone, key)
    assert cdisk.backing.parent.fileName == frozen
    expected = tmp_path / "snap.img"
    lab.disk_image("clonesrc01", "scsi0:0", expected, snapshot="for-clone")
    got = tmp_path / "clone.img"
    lab.disk_image("clonesrc01-clone", "scsi0:0", got)
    assert sha(got) == sha(expected)
    wait(agent.ReconfigVM_Task(spec=attach_spec(agent, cdisk.backing.fileName)))
    (dev,) = hot_added(agent, cdisk.backing.fileName)
    path = Path(lab.state) / "agents" / agent.name / "devices" / dev.backing.uuid
    assert sha(path) == sha(expected)
    detach(agent, dev)
    assert datastore_file(lab, cdisk.backing.fileName).exists()
    # The snapshot's disk is shared with the clone: removing the snapshot keeps it.
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    assert datastore_file(lab, frozen).exists()
    lab.disk_image("clonesrc01-clone", "scsi0:0", got)
    assert sha(got) == sha(expected)
