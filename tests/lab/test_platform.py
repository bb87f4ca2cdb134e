"""What a real vSphere does that the stock simulator does not: disk modes that
snapshots leave alone, physical-mode RDMs, encrypted VMs whose files hold
ciphertext, CBT switched on under snapshots, change ids of another epoch,
faults with names the lab knows (docs/lab.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pyVmomi import vim, vmodl

from .labkit import disk, disks, find, flat_file, pattern, snapshot, wait


def _set_mode(vm, key, mode):
    dev = disk(vm, key)
    dev.backing.diskMode = mode
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev)
    return wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))


def test_disk_mode_edit_takes_effect_powered_off_and_is_refused_running_or_with_snapshots(si, lab):
    vm = find(si, vim.VirtualMachine, "mode01")
    key = disks(vm)[1].key
    _set_mode(vm, key, "independent_persistent")
    assert disk(vm, key).backing.diskMode == "independent_persistent"
    _set_mode(vm, key, "independent_nonpersistent")
    assert disk(vm, key).backing.diskMode == "independent_nonpersistent"
    _set_mode(vm, key, "persistent")
    snap = snapshot(vm, "keep")
    try:
        with pytest.raises(vim.fault.DisallowedDiskModeChange):
            _set_mode(vm, key, "independent_persistent")
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))
    running = find(si, vim.VirtualMachine, "web01")
    with pytest.raises(vim.fault.InvalidPowerState):
        _set_mode(running, disks(running)[1].key, "independent_persistent")
    assert disk(running, disks(running)[1].key).backing.diskMode == "persistent"


def test_snapshots_leave_independent_disks_and_physical_rdms_live(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "indep01")
    dep, ind, rdm = disks(vm)
    assert ind.backing.diskMode == "independent_persistent"
    assert isinstance(rdm.backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)
    assert rdm.backing.compatibilityMode == "physicalMode"
    files = {d.key: d.backing.fileName for d in (ind, rdm)}
    snap = snapshot(vm, "s")
    try:
        now = {d.key: d for d in disks(vm)}
        assert now[dep.key].backing.parent is not None  # a delta above the frozen base
        for key, name in files.items():
            assert now[key].backing.fileName == name and now[key].backing.parent is None
        lab.write("indep01", "scsi0:1", 1 << 20, 4096, seed=5)
        # The snapshot's view of the independent disk is the live file: the write shows.
        out = tmp_path / "ind.img"
        lab.disk_image("indep01", "scsi0:1", out, snapshot="s")
        assert out.read_bytes()[1 << 20 : (1 << 20) + 4096] == pattern(5, 1 << 20, 4096)
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_encrypted_vm_files_hold_ciphertext_and_an_encrypted_agent_reads_plaintext(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "enc01")
    assert vm.config.keyId.keyId and vm.config.keyId.providerId.id
    (d,) = disks(vm)
    assert d.backing.keyId.keyId
    snap = snapshot(vm, "e")
    try:
        frozen = disk(snap.config, d.key).backing
        plain = tmp_path / "plain.img"
        lab.disk_image("enc01", "scsi0:0", plain, snapshot="e")
        raw = flat_file(lab, frozen.fileName).read_bytes()
        text = plain.read_bytes()
        assert text[510:512] == b"\x55\xaa" and raw[510:512] != b"\x55\xaa"
        plain_agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx1")
        crypt_agent = find(si, vim.VirtualMachine, "vmbackup-agent-esx2")
        assert plain_agent.config.keyId is None and crypt_agent.config.keyId is not None
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=frozen.fileName, diskMode="independent_nonpersistent"
        )
        ctrl = next(x for x in crypt_agent.config.hardware.device if isinstance(x, vim.vm.device.VirtualSCSIController))
        dev = vim.vm.device.VirtualDisk(key=-1, controllerKey=ctrl.key, unitNumber=5, backing=backing)
        add = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)])
        with pytest.raises(vim.fault.InvalidDeviceSpec):
            wait(plain_agent.ReconfigVM_Task(spec=add))
        wait(crypt_agent.ReconfigVM_Task(spec=add))
        try:
            att = next(a for v in lab.status()["vms"] if v["name"] == crypt_agent.name for a in v["attached"])
            with open(att["device"], "rb") as f:
                assert f.read() == text
        finally:
            got = [
                x for x in crypt_agent.config.hardware.device if getattr(x.backing, "fileName", "") == frozen.fileName
            ]
            rm = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=x) for x in got]
            wait(crypt_agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=rm)))
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def _areas(vm, snap, key, change_id, capacity):
    out, offset = [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        out += [(a.start, a.length) for a in info.changedArea]
        offset += info.length
    return out


def test_cbt_switched_on_under_a_snapshot_answers_star_with_writes_only(si, lab):
    vm = find(si, vim.VirtualMachine, "blind01")
    (d,) = disks(vm)
    user = snapshot(vm, "user")
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    wait(user.RemoveSnapshot_Task(removeChildren=False))
    lab.write("blind01", "scsi0:0", 4 << 20, 65536, seed=3)
    snap = snapshot(vm, "after")
    try:
        # The base disk holds an MBR and file data, but "*" knows only the write.
        assert _areas(vm, snap, d.key, "*", d.capacityInBytes) == [(4 << 20, 65536)]
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_change_id_of_another_epoch_is_invalid_argument_and_cbt_omit_loses_writes(si, lab):
    vm = find(si, vim.VirtualMachine, "cbt02")
    (d,) = disks(vm)
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    base = disks(vm)[0].backing.changeId
    lab.set_faults(vm="cbt02", cbt_omit=True)
    lab.write("cbt02", "scsi0:0", 2 << 20, 65536, seed=4)
    lab.set_faults(vm="cbt02")
    lab.write("cbt02", "scsi0:0", 6 << 20, 65536, seed=4)
    snap = snapshot(vm, "q")
    try:
        assert _areas(vm, snap, d.key, base, d.capacityInBytes) == [(6 << 20, 65536)]
        other = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1"
        with pytest.raises(vmodl.fault.InvalidArgument):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=d.key, startOffset=0, changeId=other)
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))
        wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))


def test_unknown_fault_name_is_refused_and_cbt_omit_is_known(lab):
    def fault(*args):
        cmd = [sys.executable, "-m", "vmbackup_lab", "fault", "--state", str(lab.state), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = fault("--vm", "web01", "--set", "no_such_fault")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no_such_fault" in r.stderr
    r = fault("--host", "esx1", "--set", "no_such_fault")
    assert r.returncode == 2 and "no_such_fault" in r.stderr
    assert fault("--vm", "web01", "--set", "cbt_omit").returncode == 0
    assert next(v for v in lab.status()["vms"] if v["name"] == "web01")["faults"] == {"cbt_omit": True}
    assert fault("--vm", "web01").returncode == 0
    assert next(v for v in lab.status()["vms"] if v["name"] == "web01")["faults"] == {}
