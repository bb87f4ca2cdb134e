"""A VM restored onto the other hypervisor, from real points of the lab (the
default lab: vCenter and the Hyper-V host hv1): each VM backed up by its own
adapter's per-VM procedure, then restored through the one restore procedure
(``hypervisors.restore.restore_one``) with the source's ``describe_point`` and
the target's restore steps, and every restored disk read back by
`vmbackup lab disk-image` under its name on the target and compared with the
backup byte for byte. docs/vsphere.md and docs/hyperv.md, "Across hypervisors".
"""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from pyVmomi import vim
from vmbackup import _mover
from vmbackup.errors import RestoreInputError
from vmbackup.hyperv.hypervisor import HyperV
from vmbackup.hyperv.inventory import connect
from vmbackup.hyperv.inventory import select_vms as hv_select
from vmbackup.hyperv.procedure import backup_vm as hv_backup
from vmbackup.hyperv.restore import describe_point as hv_describe
from vmbackup.hyperv.restore import restore_entries
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import restore_one
from vmbackup.plan import Selection, load_plan
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.hypervisor import VSphere
from vmbackup.vsphere.inventory import select_vms as vs_select
from vmbackup.vsphere.procedure import backup_vm as vs_backup
from vmbackup.vsphere.restore import VSphereRestoreSteps, destroy_vm
from vmbackup.vsphere.restore import describe_point as vs_describe
from vmbackup.vsphere.tasks import run_task

from .conftest import run, sha

DEFAULT_VM_PATH = "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V"  # the lab host's VirtualMachinePath


@pytest.fixture(scope="module")
def cross(default_lab, state_dir, tmp_path_factory):
    """The default lab with a repository of this module's own, the plan, and both adapters' sessions."""
    repo = tmp_path_factory.mktemp("cross") / "repo"
    _mover.init_repository(str(repo))
    plan_file = default_lab.write_plan(tmp_path_factory.mktemp("cross-plan") / "plan.yaml", repository=repo)
    plan = load_plan(plan_file)
    client = VSphereClient.connect(plan.connection, SecretStr(default_lab.password))
    host = plan.hyperv_host("hv1")
    hyperv = HyperV(plan, host, SecretStr(default_lab.hyperv_password))
    try:
        yield default_lab, plan, client, hyperv, default_lab.env(state_dir)
    finally:
        client.close()


def _point(plan, backup_id):
    infos, _ = _mover.list_backups(str(plan.repository))
    return next(i for i in infos if i.id == backup_id)


def _same_as_point(e2e, env, plan, backup_id, vm, disk, place, tmp_path):
    """`vmbackup lab disk-image` of the restored VM's disk ``place`` equals ``disk`` of the point."""
    want, got = tmp_path / f"want-{vm}-{disk}.raw", tmp_path / f"got-{vm}-{place}.raw"
    _mover.restore_disk(str(plan.repository), backup_id, str(want), disk=disk, overwrite=True)
    run("lab", "disk-image", "--state", str(e2e.lab.state), "--vm", vm, "--disk", place, str(got), env=env)
    assert sha(got) == sha(want), f"{vm} {place} differs from disk {disk} of point {backup_id}"


def _vsphere_backup(client, plan, name):
    (info,) = vs_select(client, Selection(vms=[name]))
    agent = next(a for a in plan.agents if info.host in a.hosts)
    r = vs_backup(client, info, plan, agent, run_id=f"cross-{name}")
    assert r.status == "ok", r.error
    return r.backup_id


def _hyperv_backup(hyperv, plan, name):
    client = connect(hyperv.host, hyperv.password)
    (vm,) = hv_select(client, hyperv.host, Selection(vms=[name]))
    r = hv_backup(client, vm, plan, hyperv.host, plan.agents[0], run_id=f"cross-{name}")
    assert r.status == "ok", r.error
    return r.backup_id


def test_vsphere_points_come_back_as_hyperv_vms(cross, tmp_path):
    """app01 (made UEFI, its disk on NVMe, a VMXNET3 adapter on "VM Network") as a
    generation 2 VM, its disk on SCSI 0:0 and the adapter on switch LAN (network
    map); db01 (BIOS, its disk on SATA) as a generation 1 VM whose disk is on IDE
    0:0, where generation 1 boots from. Both in the host's default VM path,
    rebuilt from the description; every disk equals the point."""
    e2e, plan, client, hyperv, env = cross
    app01 = client.find_vm("app01")
    nic = vim.vm.device.VirtualVmxnet3(
        key=-1, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network")
    )
    add = vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)
    run_task(lambda: app01.ReconfigVM_Task(spec=vim.vm.ConfigSpec(firmware="efi", deviceChange=[add])), "efi", 60)
    try:
        points = {name: _vsphere_backup(client, plan, name) for name in ("app01", "db01")}
    finally:  # app01 as the other tests of the session know it
        added = [d for d in app01.config.hardware.device if isinstance(d, vim.vm.device.VirtualVmxnet3)]
        rm = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in added]
        run_task(lambda: app01.ReconfigVM_Task(spec=vim.vm.ConfigSpec(firmware="bios", deviceChange=rm)), "bios", 60)
    for name, gen, places, mapping in (
        ("app01", 2, {"nvme0:0": "scsi0:0"}, {"VM Network": "LAN"}),
        ("db01", 1, {"sata0:0": "ide0:0"}, {}),
    ):
        info = _point(plan, points[name])
        new = f"{name}-on-hv1"
        req = RestoreRequest(vm=name, point=info.id, restored_as=new, host="hv1", network_map=mapping)
        r = restore_one(
            hyperv.restore_steps(req, plan, plan.agents[0], run_id=f"cross-r-{name}"),
            req,
            vs_describe(info.config, info.attributes),
            hypervisor="hyperv",
            repository=str(plan.repository),
            agent=plan.agents[0].name,
            disks_per_vm=2,
            verify=True,
        )
        try:
            assert (r.status, r.source_hypervisor, r.hypervisor, r.verified) == ("ok", "vsphere", "hyperv", True)
            assert r.location == f"{DEFAULT_VM_PATH}\\{new}"
            assert any("rebuilt from the point's description" in c for c in r.changes), r.changes
            assert [(d["disk"], d["restored_as"]) for d in r.disks] == list(places.items())
            for src, dst in places.items():
                assert any(f"disk {src} is {dst} on Hyper-V" in c for c in r.changes), r.changes
            vm = next(v for v in e2e.lab.status()["hyperv_hosts"][0]["vms"] if v["name"] == new)
            assert (vm["generation"], vm["cpus"], vm["memory_mib"]) == (gen, 2, 2048)
            assert [d["name"] for d in vm["disks"]] == list(places.values())
            if mapping:
                assert [n["switch"] for n in vm["nics"]] == ["LAN"]
            for src, dst in places.items():
                _same_as_point(e2e, env, plan, info.id, new, src, dst, tmp_path)
        finally:
            client_hv = connect(hyperv.host, hyperv.password)
            client_hv.run_script(
                "Remove-VmbackupRestore.ps1", {"RestoreId": "cross-end", "VMId": r.vm_id, "Path": r.location}
            )
        assert restore_entries(plan.repository, "hv1") == []
    names = [v["name"] for v in e2e.lab.status()["hyperv_hosts"][0]["vms"]]
    assert not [n for n in names if n.endswith("-on-hv1")]


def test_hyperv_points_come_back_as_vsphere_vms(cross, tmp_path):
    """win01 (generation 2, two SCSI disks, one a checkpoint chain; adapter on
    switch LAN mapped to "VM Network") onto esx1 and legacy01 (generation 1, a
    VHD on IDE 0:0; its switch has no port group: disconnected) onto esx2, with
    no datastore given: UEFI and BIOS VMs on the datastore chosen, the disks
    under their own names (written through hot-add; IDE through /folder),
    LSI Logic SAS and E1000e, new MACs, what does not carry over said; every
    disk equals the point; nothing left attached to the agents."""
    e2e, plan, client, hyperv, env = cross
    for name, esx, firmware, transport, mapping in (
        ("win01", "esx1", "efi", "hotadd", {"LAN": "VM Network"}),
        ("legacy01", "esx2", "bios", "folder", {}),
    ):
        info = _point(plan, _hyperv_backup(hyperv, plan, name))
        desc = hv_describe(info.config, info.attributes)
        new = f"{name}-on-{esx}"
        agent = next(a for a in plan.agents if esx in a.hosts)
        req = RestoreRequest(vm=name, point=info.id, restored_as=new, host=esx, network_map=mapping)
        r = restore_one(
            VSphereRestoreSteps(client, req, plan, agent, run_id=f"cross-r-{name}"),
            req,
            desc,
            hypervisor="vsphere",
            repository=str(plan.repository),
            agent=agent.name,
            disks_per_vm=2,
            verify=transport == "hotadd",  # read back by hot-add: SCSI disks only
        )
        try:
            assert (r.status, r.source_hypervisor, r.hypervisor, r.transport) == ("ok", "hyperv", "vsphere", transport)
            assert any(c.startswith(f"datastore {r.location} chosen (no --datastore)") for c in r.changes), r.changes
            assert any("integration services do not carry over" in c for c in r.changes)
            assert [d["disk"] for d in r.disks] == [d.name for d in desc.disks]
            assert all("restored_as" not in d for d in r.disks)  # vSphere has each Hyper-V place
            (vm,) = client.vm_index(refresh=True)[new]
            assert (vm.config.firmware, vm.config.guestId, vm.config.hardware.numCPU) == (firmware, "otherGuest64", 2)
            assert vm.config.hardware.memoryMB == desc.memory_mb
            devices = vm.config.hardware.device
            (nic,) = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
            assert isinstance(nic, vim.vm.device.VirtualE1000e) and nic.addressType == "generated"
            assert nic.connectable.startConnected == bool(mapping)
            assert any(f"new MAC address (the source's was {desc.nics[0].mac})" in c for c in r.changes)
            if firmware == "efi":
                assert any("Secure Boot is off" in w for w in r.warnings) and any(".vmgs" in w for w in r.warnings)
                assert [type(d) for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)] == [
                    vim.vm.device.VirtualLsiLogicSASController
                ]
                assert r.verified is True
            else:
                assert any("does not exist on the target: disconnected" in c for c in r.changes), r.changes
            for d in desc.disks:
                _same_as_point(e2e, env, plan, info.id, new, d.name, d.name, tmp_path)
            for v in e2e.lab.status()["vms"]:
                if v["agent"]:
                    assert not v.get("attached"), (v["name"], v["attached"])
        finally:
            for left in client.vm_index(refresh=True).get(new, []):
                destroy_vm(left, 60)
        assert client.vm_index(refresh=True).get(new, []) == []


def test_across_hypervisors_the_refusals_make_nothing(cross):
    """A Hyper-V point into vSphere needs an ESXi host (its own host is Hyper-V's)
    and is never in place; both adapters say which points they restore."""
    e2e, plan, client, hyperv, _ = cross
    assert set(VSphere.restores_from) == set(HyperV.restores_from) == {"vsphere", "hyperv"}
    info = next((i for i in _mover.list_backups(str(plan.repository))[0] if i.vm == "win01"), None)
    info = info or _point(plan, _hyperv_backup(hyperv, plan, "win01"))
    desc = hv_describe(info.config, info.attributes)
    agent = plan.agents[0]
    for kw, said in (
        ({}, "is a Hyper-V point: give the ESXi host to restore it onto \\(--host\\)"),
        ({"host": "esx1", "in_place": True}, "is restored into vSphere as a new VM, not in place"),
        ({"host": "esx1", "datastore": "nowhere"}, "datastore nowhere does not exist"),
    ):
        req = RestoreRequest(vm="win01", point=info.id, restored_as="win01-x", **kw)
        steps = VSphereRestoreSteps(client, req, plan, agent, run_id="cross-refused")
        with pytest.raises(RestoreInputError, match=said):
            restore_one(
                steps, req, desc, hypervisor="vsphere", repository=str(plan.repository), agent=agent.name,
                disks_per_vm=2,
            )  # fmt: skip
    assert client.vm_index(refresh=True).get("win01-x", []) == []
