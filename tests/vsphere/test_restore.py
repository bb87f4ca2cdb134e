"""Whole-VM restore into the lab's vCenter through the one restore procedure
(``hypervisors.restore.restore_one``) and the vSphere steps: every VM as a new
VM whose disks equal the backup byte for byte, the refusals that make
nothing, a failure in the middle, an in-place rollback, and a killed restore."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyVmomi import vim
from vmbackup import _mover
from vmbackup.errors import BackupError, RestoreInputError
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import restore_one
from vmbackup.vsphere.ledger import Ledger
from vmbackup.vsphere.restore import MARK, VSphereRestoreSteps, describe_point, destroy_vm
from vmbackup.vsphere.sweep import sweep
from vmbackup.vsphere.tasks import run_task

from .conftest import sha
from .helpers import backup, lab_file, run_id, vm_info

# Every lab VM a backup can read (tests/vsphere/topology.json): encx01 cannot be
# backed up by design (encrypted, and its host's agent is not). indep01's point
# holds its one snapshot-covered disk, which is what its restore has. The two
# VMs named twin01 (two folders) are test_same_name.py's.
ALL_VMS = [
    "multi01", "sata01", "off03", "xfer01", "fall01", "quiesce01", "notools03", "refuse01", "cbtreset01", "grow01",
    "crash01", "user01", "indep01", "enc01", "snapcbt01", "blind01", "epoch01", "vsan01", "amp01", "ide01",
]  # fmt: skip


def _point(plan, backup_id):
    infos, _ = _mover.list_backups(str(plan.repository))
    return next(i for i in infos if i.id == backup_id)


def _steps(client, plan, vm, backup_id, restored_as, **kw):
    info = _point(plan, backup_id)
    desc = describe_point(info.config, info.attributes)
    req = RestoreRequest(vm=vm, point=backup_id, restored_as=restored_as, **kw)
    host = req.host or desc.host
    agent = next((a for a in plan.agents if host in a.hosts), plan.agents[0])
    return VSphereRestoreSteps(client, req, plan, agent, run_id=run_id()), req, desc, agent


def restore(client, plan, vm, backup_id, restored_as, **kw):
    steps, req, desc, agent = _steps(client, plan, vm, backup_id, restored_as, **kw)
    return restore_one(
        steps, req, desc, hypervisor="vsphere", repository=str(plan.repository), agent=agent.name, disks_per_vm=2
    )


def _equal_to_point(checks, plan, vm_name, backup_id, tmp_path):
    info = _point(plan, backup_id)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for d in info.disks:
        want, got = tmp_path / f"want-{d.name}.raw", tmp_path / f"got-{d.name}.raw"
        _mover.restore_disk(str(plan.repository), backup_id, str(want), disk=d.name, overwrite=True)
        assert checks.image(vm_name, d.name, got) == sha(want), f"{vm_name} {d.name} differs from point {backup_id}"


def _vm(client, name):
    return client.vm_index(refresh=True).get(name, [])


def _no_agent_disks(checks):
    for vm in checks.lab.status()["vms"]:
        if vm["agent"]:
            assert not vm.get("attached"), (vm["name"], vm["attached"])


@pytest.fixture
def cleanup_vms(client):
    made: list[str] = []
    yield made
    for name in made:
        for vm in _vm(client, name):
            destroy_vm(vm, 60)


def test_every_lab_vm_restored_as_new_equals_its_backup(client, plan, checks, tmp_path, cleanup_vms):
    for name in ALL_VMS:
        b = backup(client, plan, name)
        assert b.status == "ok", (name, b.error)
        new = f"{name}-restored"
        cleanup_vms.append(new)
        res = restore(client, plan, name, b.backup_id, new)
        assert res.status == "ok" and res.restored_as == new
        assert sorted(d["disk"] for d in res.disks) == sorted(d.name for d in _point(plan, b.backup_id).disks)
        _equal_to_point(checks, plan, new, b.backup_id, tmp_path / name)
        src, (obj,) = _vm(client, name)[0], _vm(client, new)
        assert obj.config.instanceUuid != src.config.instanceUuid and obj.config.uuid != src.config.uuid
        assert res.vm_id == obj.config.instanceUuid
        assert any(o.key == MARK for o in obj.config.extraConfig)
        # The IDE disk cannot be hot-added: it went through /folder.
        assert ("folder" in res.transport) == (name == "ide01"), (name, res.transport)
        _no_agent_disks(checks)
        destroy_vm(obj, 60)
    checks.assert_clean(plan)


def test_new_macs_and_networks_mapped_or_disconnected(client, plan, tmp_path, cleanup_vms):
    # The lab's VMs have no NIC: give multi01 one on "VM Network", back it up, restore.
    src = client.find_vm("multi01")
    nic = vim.vm.device.VirtualVmxnet3(
        key=-1,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        addressType="manual",
        macAddress="00:50:56:01:02:03",
    )
    spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)])
    src.ReconfigVM_Task(spec=spec)
    try:
        b = backup(client, plan, "multi01")
        cleanup_vms += ["multi01-net", "multi01-gone"]
        res = restore(client, plan, "multi01", b.backup_id, "multi01-net")
        (obj,) = _vm(client, "multi01-net")
        (card,) = [d for d in obj.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert card.macAddress != "00:50:56:01:02:03" and card.backing.deviceName == "VM Network"
        assert any("new MAC address" in c for c in res.changes)
        # A network map to a network that does not exist: one line, nothing made.
        with pytest.raises(RestoreInputError, match="network nowhere does not exist"):
            restore(client, plan, "multi01", b.backup_id, "multi01-gone", network_map={"VM Network": "nowhere"})
        assert not _vm(client, "multi01-gone")
        # The source's network missing on the target (described as such): disconnected, said in the row.
        info = _point(plan, b.backup_id)
        desc = describe_point(info.config, info.attributes)
        for d in desc.raw["hardware"]["device"]:
            if d["_vimtype"] == "vim.vm.device.VirtualVmxnet3":
                d["backing"]["deviceName"] = "old-net"
        steps, req, _, agent = _steps(client, plan, "multi01", b.backup_id, "multi01-gone")
        res = restore_one(steps, req, desc, hypervisor="vsphere", repository=str(plan.repository),
                          agent=agent.name, disks_per_vm=2)  # fmt: skip
        assert any("old-net does not exist on the target: disconnected" in c for c in res.changes)
    finally:
        cur = client.find_vm("multi01")
        cards = [d for d in cur.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        if cards:
            rm = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in cards]
            cur.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=rm))


def _devices(vm, cls):
    return [d for d in vm.config.hardware.device if isinstance(d, cls)]


def test_missing_iso_disconnected_usb_dropped_and_nvram_restored(client, plan, checks, vlab, cleanup_vms):
    """off03 given two CD-ROMs (one ISO on its datastore, one gone) and a USB
    device before its backup: restored with the first CD-ROM connected, the
    second disconnected (said in the row's changes), no USB device (a
    warning), and the source's .nvram, byte for byte, in the new VM's home."""
    src = client.find_vm("off03")
    ds = src.config.files.vmPathName[1:].split("]", 1)[0]
    before = {d.key for d in src.config.hardware.device}
    present, gone = f"[{ds}] iso/present.iso", f"[{ds}] iso/gone.iso"
    iso = lab_file(vlab.state, present)
    iso.parent.mkdir(parents=True, exist_ok=True)
    iso.write_bytes(b"CD001" * 1000)

    def cdrom(key, unit, file):
        return vim.vm.device.VirtualCdrom(
            key=key,
            controllerKey=200,
            unitNumber=unit,
            backing=vim.vm.device.VirtualCdrom.IsoBackingInfo(fileName=file),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True),
        )

    usb = vim.vm.device.VirtualUSB(
        key=-3, backing=vim.vm.device.VirtualUSB.USBBackingInfo(deviceName="path:1/0/1 version:2")
    )
    add = [
        vim.vm.device.VirtualDeviceSpec(operation="add", device=d)
        for d in (cdrom(-1, 0, present), cdrom(-2, 1, gone), usb)
    ]
    run_task(lambda: src.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=add)), "adding devices to off03")
    try:
        b = backup(client, plan, "off03")
        assert b.status == "ok", b.error
        cleanup_vms.append("off03-dev")
        res = restore(client, plan, "off03", b.backup_id, "off03-dev")
        assert res.status == "ok", res
        (obj,) = _vm(client, "off03-dev")
        cds = {d.backing.fileName if isinstance(d.backing, vim.vm.device.VirtualCdrom.IsoBackingInfo) else None:
               d for d in _devices(obj, vim.vm.device.VirtualCdrom)}  # fmt: skip
        assert set(cds) == {present, None}, list(cds)
        assert cds[present].connectable.startConnected and not cds[None].connectable.startConnected
        assert any(f"ISO {gone} is missing: disconnected" in c for c in res.changes), res.changes
        assert not any(present in c for c in res.changes), res.changes
        assert _devices(obj, vim.vm.device.VirtualUSB) == []
        assert [w for w in res.warnings if "USB device" in w and "dropped" in w], res.warnings
        # The .nvram: the point's bytes, in the restored VM's home (the lab's file).
        saved = base64.b64decode(_point(plan, b.backup_id).attributes["nvram"]["data_base64"])
        obj.RefreshStorageInfo()
        (listed,) = [f.name for f in obj.layoutEx.file if f.type == "nvram"]
        assert listed.startswith(f"[{ds}] off03-dev/")
        assert lab_file(vlab.state, listed).read_bytes() == saved and saved.startswith(b"MRVN")
        _no_agent_disks(checks)
    finally:
        cur = client.find_vm("off03")
        rm = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in cur.config.hardware.device
              if d.key not in before]  # fmt: skip
        run_task(lambda: cur.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=rm)), "removing devices of off03")
        iso.unlink(missing_ok=True)
    checks.assert_clean(plan)


def test_name_in_use_and_bad_targets_are_refused_and_make_nothing(client, plan, checks):
    b = backup(client, plan, "off03")
    before = sorted(v["name"] for v in checks.lab.status()["vms"])
    with pytest.raises(RestoreInputError, match="a VM named user01 exists already"):
        restore(client, plan, "off03", b.backup_id, "user01")
    with pytest.raises(RestoreInputError, match="datastore nope does not exist"):
        restore(client, plan, "off03", b.backup_id, "off03-x", datastore="nope")
    with pytest.raises(RestoreInputError, match="host esx9 does not exist"):
        restore(client, plan, "off03", b.backup_id, "off03-x", host="esx9")
    # tiny1 is a 2 MiB datastore (the topology's datastore_capacity_mib): the point's data does not fit.
    (tiny,) = [d for d in client.objects(vim.Datastore) if d.name == "tiny1"]
    assert tiny.summary.capacity == 2 << 20 and 0 < tiny.summary.freeSpace <= 2 << 20
    with pytest.raises(RestoreInputError, match=r"datastore tiny1 has \d+ bytes free; the point's disks hold \d+"):
        restore(client, plan, "off03", b.backup_id, "off03-x", datastore="tiny1")
    # A point without the VM's configuration (its config absent): nothing to make a VM of.
    info = _point(plan, b.backup_id)
    with pytest.raises(RestoreInputError, match="the backup point of VM off03 has no VM configuration"):
        describe_point(None, info.attributes)
    with pytest.raises(RestoreInputError, match="is powered on"):
        restore(client, plan, "user01", backup(client, plan, "user01").backup_id, "user01", in_place=True)
    assert sorted(v["name"] for v in checks.lab.status()["vms"]) == before
    checks.assert_clean(plan)


def test_a_failure_in_the_middle_leaves_no_vm_and_nothing_attached(client, plan, checks, cleanup_vms):
    # ide01: scsi0:0 is hot-added while ide0:0 goes through /folder, whose PUT the host refuses.
    b = backup(client, plan, "ide01")
    cleanup_vms.append("ide01-fail")
    host = vm_info(client, "ide01").host
    checks.lab.set_faults(host=host, upload_fail=True)
    try:
        with pytest.raises(BackupError, match="HTTP 500"):
            restore(client, plan, "ide01", b.backup_id, "ide01-fail")
    finally:
        checks.lab.set_faults(host=host)
    assert not _vm(client, "ide01-fail")
    assert "ide01-fail" not in {v["name"] for v in checks.lab.status()["vms"]}
    _no_agent_disks(checks)
    checks.assert_clean(plan)


def test_in_place_rollback_writes_only_what_differs(client, plan, checks, tmp_path):
    # off03 is powered off; xfer01 has CBT (powered off for the rollback, on again after).
    for name in ("off03", "xfer01"):
        obj = client.find_vm(name)
        on = str(obj.runtime.powerState) == "poweredOn"
        b = backup(client, plan, name)
        checks.lab.write(name, "scsi0:0", 3 << 20, 100_000, seed=41)
        checks.lab.write(name, "scsi0:0", 9 << 20, 5000, seed=42)
        if on:
            run_task(lambda o=obj: o.PowerOffVM_Task(), f"powering off {name}")
        try:
            res = restore(client, plan, name, b.backup_id, name, in_place=True)
        finally:
            if on:
                run_task(lambda o=obj: o.PowerOnVM_Task(), f"powering on {name}")
        assert res.status == "ok" and res.in_place
        (d,) = res.disks
        # Only the two written areas (blocks around them), never the whole 16-32 MiB disk.
        assert 0 < d["bytes_written"] <= 4 << 20, (name, d)
        _equal_to_point(checks, plan, name, b.backup_id, tmp_path / name)
        _no_agent_disks(checks)
    checks.assert_clean(plan)


CHILD = r"""
import json, os, sys
from vmbackup import _mover
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import restore_one
from vmbackup.plan import load_plan, resolve_password
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.restore import VSphereRestoreSteps, describe_point
args = json.loads(sys.argv[1])
plan = load_plan(args["plan"]).model_copy(update={"repository": args["repo"]})
client = VSphereClient.connect(plan.connection, resolve_password(plan.connection))
info = next(i for i in _mover.list_backups(args["repo"])[0] if i.id == args["point"])
desc = describe_point(info.config, info.attributes)
req = RestoreRequest(vm=args["vm"], point=args["point"], restored_as=args["as"])
agent = next(a for a in plan.agents if desc.host in a.hosts)
steps = VSphereRestoreSteps(client, req, plan, agent, run_id="killed")
restore_one(steps, req, desc, hypervisor="vsphere", repository=args["repo"], agent=agent.name, disks_per_vm=2)
"""


def _killed_restore(plan, checks, lab_plan_path, vm, point, restored_as):
    """A restore of ``vm`` as ``restored_as`` in a child process, killed (-9)
    once the new VM exists and its disk is being hot-added to the agent (the
    host's tasks slowed to 1.5 s each): its ledger entry and half-made VM left."""
    host = next(h for h in checks.lab.status()["vms"] if h["name"] == vm)["host"]
    checks.lab.set_faults(host=host, slow_ms=1500)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    arg = {"plan": str(lab_plan_path), "repo": str(plan.repository), "point": point, "vm": vm, "as": restored_as}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(arg)], env=env)
    try:
        ledger = Path(plan.repository) / "ledger"
        while True:
            assert child.poll() is None, "the restore ended before it could be killed"
            pattern = f"{restored_as}--*.json"
            entries = [json.loads(p.read_text()) for p in ledger.glob(pattern)] if ledger.exists() else []
            if any(e.get("attachments") for e in entries):
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        checks.lab.set_faults(host=host)
        if child.poll() is None:
            child.kill()
    assert restored_as in {v["name"] for v in checks.lab.status()["vms"]}


def test_killed_restore_is_reconciled_by_the_next(client, plan, checks, lab_plan_path, tmp_path, cleanup_vms):
    b = backup(client, plan, "crash01")
    cleanup_vms.append("crash01-k")
    _killed_restore(plan, checks, lab_plan_path, "crash01", b.backup_id, "crash01-k")
    # The half-made VM exists (possibly with its disk on the agent); the next restore removes it first.
    res = restore(client, plan, "crash01", b.backup_id, "crash01-k")
    assert res.status == "ok"
    names = [v["name"] for v in checks.lab.status()["vms"] if v["name"].startswith("crash01-k")]
    assert names == ["crash01-k"]
    _equal_to_point(checks, plan, "crash01-k", b.backup_id, tmp_path)
    _no_agent_disks(checks)
    destroy_vm(_vm(client, "crash01-k")[0], 60)
    checks.assert_clean(plan)


def test_the_sweeper_removes_a_killed_restores_half_made_vm(client, plan, checks, lab_plan_path, cleanup_vms):
    """What sweep_vsphere (``vmbackup maintain sweep``) runs: a dead restore's
    entry names its half-made VM, which is detached from the agent and
    destroyed, and the entry removed."""
    b = backup(client, plan, "crash01")
    cleanup_vms.append("crash01-s")
    _killed_restore(plan, checks, lab_plan_path, "crash01", b.backup_id, "crash01-s")
    (entry,) = Ledger(plan.repository).entries("crash01-s")
    assert entry.restore is not None and not entry.alive()
    found = sweep(client, plan, older_than_seconds=0)
    assert [(x.kind, x.vm, x.removed) for x in found if x.kind == "restore"] == [("restore", "crash01-s", True)]
    assert not _vm(client, "crash01-s")
    assert "crash01-s" not in {v["name"] for v in checks.lab.status()["vms"]}
    _no_agent_disks(checks)
    checks.assert_clean(plan)


class _GuestWritesAtBoot:
    """The adapter's steps, with a guest that writes into its first disk as
    soon as the VM is powered on (a log, a journal replay): what a drill of
    a real VM meets."""

    def __init__(self, steps, lab, disk):
        self._steps, self._lab, self._disk, self.writes = steps, lab, disk, 0

    def __getattr__(self, name):
        return getattr(self._steps, name)

    def _boot(self, made):
        self._lab.write(made.handle.vm.name, self._disk, 0, 1 << 20, seed=77)
        self.writes += 1

    def finish(self, made, **kw):
        self._steps.finish(made, **kw)
        if kw.get("power_on"):  # a procedure that powers on in finish: the guest boots here
            self._boot(made)

    def power_on(self, made):
        self._steps.power_on(made)
        self._boot(made)


def test_drill_of_ide01_in_a_folder_and_pool_compares_before_the_guest_boots(client, plan, checks, cleanup_vms):
    """A drill of the lab's IDE VM: created in the drill's VM folder and
    resource pool, every disk read back (ide0:0 through /folder, scsi0:0
    hot-added) and compared while the VM is off, then powered on: the guest's
    writes at boot fail nothing; the RTO includes the power-on."""
    b = backup(client, plan, "ide01")
    assert b.status == "ok", b.error
    src = vm_info(client, "ide01")
    dc = client.datacenter_of(client.find_vm("ide01"))
    host = next(h for h in client.objects(vim.HostSystem) if h.name == src.host)

    def alloc():
        shares = vim.SharesInfo(level="normal", shares=0)
        return vim.ResourceAllocationInfo(reservation=0, limit=-1, expandableReservation=True, shares=shares)

    made = []
    try:
        made.append(folder := dc.vmFolder.CreateFolder("drills"))
        made.append(folder.CreateFolder("weekly"))
        spec = vim.ResourceConfigSpec(cpuAllocation=alloc(), memoryAllocation=alloc())
        made.append(host.parent.resourcePool.CreateResourcePool("drills", spec))
        cleanup_vms.append("drill-ide01")
        steps, req, desc, agent = _steps(
            client,
            plan,
            "ide01",
            b.backup_id,
            "drill-ide01",
            drill=True,
            power_on=True,
            folder="drills/weekly",
            resource_pool="drills",
        )
        guest = _GuestWritesAtBoot(steps, checks.lab, "scsi0:0")
        res = restore_one(
            guest, req, desc, hypervisor="vsphere", repository=str(plan.repository), agent=agent.name,
            disks_per_vm=2, verify=True,
        )  # fmt: skip
        assert res.status == "ok" and res.verified is True and res.powered_on is True, res
        assert guest.writes == 1
        (vm,) = _vm(client, "drill-ide01")
        assert str(vm.runtime.powerState) == "poweredOn"
        assert vm.parent.name == "weekly" and vm.parent.parent.name == "drills", vm.parent.name
        assert vm.resourcePool.name == "drills", vm.resourcePool.name
        assert "in VM folder drills/weekly" in res.changes and "in resource pool drills" in res.changes, res.changes
        _no_agent_disks(checks)
        destroy_vm(vm, 60)
        # A folder that does not exist: one line, nothing made.
        steps, req, desc, agent = _steps(client, plan, "ide01", b.backup_id, "drill-ide01", folder="nowhere")
        with pytest.raises(RestoreInputError, match="VM folder nowhere does not exist"):
            restore_one(
                steps, req, desc, hypervisor="vsphere", repository=str(plan.repository), agent=agent.name,
                disks_per_vm=2,
            )  # fmt: skip
        assert not _vm(client, "drill-ide01")
    finally:
        for obj in reversed(made):
            run_task(lambda o=obj: o.Destroy_Task(), f"removing {obj.name}", 60)
    checks.assert_clean(plan)
