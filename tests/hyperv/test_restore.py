"""Hyper-V restore (`vmbackup.hyperv.restore`) through the one restore
procedure (`hypervisors.restore.restore_one`) against the lab host over real
pywinrm: every lab VM comes back as a new VM whose disks equal the backup byte
for byte; a missing switch is mapped or the adapter disconnected, and said; a
name in use is refused with nothing made; a failure mid-way and a killed
restore leave no VM and no files."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
import uuid

import pytest
from conftest import MiB, sha256
from pydantic import SecretStr
from vmbackup import _mover
from vmbackup.errors import HypervScriptError, RestoreInputError
from vmbackup.hyperv.hypervisor import HyperV
from vmbackup.hyperv.inventory import connect, select_vms
from vmbackup.hyperv.procedure import backup_vm
from vmbackup.hyperv.restore import describe_point, restore_entries
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import find_point, restore_one
from vmbackup_lab.hyperv.vhdx import crc32c

from .test_procedure import make_plan

VMS = ("legacy01", "off01", "win01")


@pytest.fixture(scope="module")
def backed_up(hvlab, tmp_path_factory):
    """One backup point of every VM of the default lab (through the share)."""
    repo = tmp_path_factory.mktemp("restore") / "repo"
    _mover.init_repository(str(repo))
    plan = make_plan(hvlab, repo)
    host = plan.hyperv_host("hv1")
    client = connect(host, SecretStr(hvlab.password))
    points = {}
    for vm in select_vms(client, host, plan.selection):
        r = backup_vm(client, vm, plan, host, plan.agents[0], run_id="restore-src")
        points[vm.name] = (r.backup_id, vm.id)
    return plan, points, hvlab


def _restore(lab, plan, vm: str, as_: str, *, verify=False, **kw):
    hyperv = HyperV(plan, plan.hyperv_host("hv1"), SecretStr(lab.password))
    point = find_point(str(plan.repository), vm)
    request = RestoreRequest(vm=vm, point=point.id, restored_as=as_, **kw)
    steps = hyperv.restore_steps(request, plan, plan.agents[0], run_id="restore-run")
    return restore_one(
        steps,
        request,
        describe_point(point.config, point.attributes),
        hypervisor="hyperv",
        repository=str(plan.repository),
        agent=plan.agents[0].name,
        disks_per_vm=2,
        verify=verify,
    )


def _remove(lab, plan, r) -> None:
    client = connect(plan.hyperv_host("hv1"), SecretStr(lab.password))
    client.run_script("Remove-VmbackupRestore.ps1", {"RestoreId": "drill-end", "VMId": r.vm_id, "Path": r.location})


def _vm(lab, name):
    return next((v for v in lab.status()["vms"] if v["name"] == name), None)


def _nothing_made(lab, plan, names: list[str], folders: list[str]) -> None:
    assert [v["name"] for v in lab.status()["vms"] if v["name"] in names] == []
    for f in folders:
        assert not lab.local_path(f).exists(), f
    assert not any(lab.share_root.iterdir())
    assert restore_entries(plan.repository, "hv1") == []
    assert not lab.local_path("C:\\ProgramData\\vmbackup\\restores").exists() or not any(
        lab.local_path("C:\\ProgramData\\vmbackup\\restores").iterdir()
    )


def test_every_vm_restored_as_new_equals_its_backup(lab, backed_up, tmp_path, caplog):
    """Each lab VM (VHDX, AVHDX chains flattened, a VHD) as a new VM: a new Id,
    the lab lists it with its disks by name, and each disk (the lab's own
    reading of the VHDX the mover wrote through the share) equals the point."""
    plan, points, _ = backed_up
    caplog.set_level(logging.DEBUG)
    for name in VMS:
        new = f"{name}-r"
        r = _restore(lab, plan, name, new, verify=True)
        try:
            assert (r.status, r.restored_as, r.transport, r.verified) == ("ok", new, "share", True)
            assert r.vm_id and r.vm_id.upper() != points[name][1].upper()
            assert r.location == f"{'E' if name == 'off01' else 'D'}:\\Hyper-V\\{new}"
            assert any("new VM Id" in c for c in r.changes)
            st = _vm(lab, new)
            src = _vm(lab, name)
            assert st is not None and st["id"].lower() == r.vm_id.lower() and st["state"] == "off"
            assert [d["name"] for d in st["disks"]] == [d["name"] for d in src["disks"]]
            assert (st["generation"], st["cpus"], st["memory_mib"]) == (
                src["generation"],
                src["cpus"],
                src["memory_mib"],
            )
            assert [n["mac"] for n in st["nics"]] == [n["mac"] for n in src["nics"]]
            assert [d["disk"] for d in r.disks] == [d["name"] for d in st["disks"]]
            assert all(d["bytes_written"] > 0 for d in r.disks)
            for d in st["disks"]:
                assert d["chain"][0]["path"].startswith(r.location + "\\Virtual Hard Disks\\")
                restored = lab.disk_image(new, d["name"], tmp_path / "restored.raw")
                saved = tmp_path / "saved.raw"
                _mover.restore_disk(str(plan.repository), points[name][0], str(saved), disk=d["name"], overwrite=True)
                assert sha256(restored) == sha256(saved), f"{new} {d['name']}"
            # the staging, the share and the entries are gone; the VM stays
            assert not lab.local_path(r.location + "\\.vmbackup-staging").exists()
            assert not any(lab.share_root.iterdir()) and restore_entries(plan.repository, "hv1") == []
        finally:
            _remove(lab, plan, r)
        assert _vm(lab, new) is None and not lab.local_path(r.location).exists()
    text = caplog.text + (lab.root / "hyperv.log").read_text()
    assert lab.password not in text


def test_a_missing_switch_is_mapped_or_the_adapter_disconnected(hvlab_mixed, backed_up):
    """The default lab's legacy01 (on switch LAN) restored onto the mixed host,
    which has no switch LAN (its switches are Prod and Isolated): with a network
    map the adapter is connected to the mapped switch, without one it is
    disconnected; either is said in the row's changes."""
    lab = hvlab_mixed
    plan = make_plan(lab, backed_up[0].repository)
    for as_, mapping, switch, said in (
        ("legacy01-m", {"LAN": "Isolated"}, "Isolated", "adapter connected to Isolated (network map)"),
        ("legacy01-d", {}, None, "adapter disconnected"),
    ):
        r = _restore(lab, plan, "legacy01", as_, network_map=mapping)
        try:
            assert any(said in c and "switch LAN does not exist on hv1" in c for c in r.changes), r.changes
            mac = _vm(backed_up[2], "legacy01")["nics"][0]["mac"]
            assert _vm(lab, as_)["nics"] == [{"switch": switch, "mac": mac}]
        finally:
            _remove(lab, plan, r)


def test_a_name_in_use_or_an_unknown_switch_is_refused_with_nothing_made(lab, backed_up):
    plan, _, _ = backed_up
    with pytest.raises(RestoreInputError, match="a VM named win01 already exists on Hyper-V host hv1"):
        _restore(lab, plan, "legacy01", "win01")
    with pytest.raises(RestoreInputError, match="has no virtual switch Nowhere"):
        _restore(lab, plan, "legacy01", "legacy01-x", network_map={"LAN": "Nowhere"})
    with pytest.raises(RestoreInputError, match="folder D:\\\\Hyper-V\\\\win01 already exists"):
        _restore(lab, plan, "legacy01", "legacy01-y", path="D:\\Hyper-V\\win01")
    assert lab.local_path("D:\\Hyper-V\\win01").is_dir()  # untouched
    _nothing_made(lab, plan, ["legacy01-x", "legacy01-y"], ["D:\\Hyper-V\\legacy01-x"])


def test_a_failure_mid_way_leaves_no_vm_and_no_files(lab, backed_up):
    """Import-VM registers the VM and then fails (lab fault): release removes
    the VM, its folder, the share and both ledger entries."""
    plan, _, _ = backed_up
    lab.set_faults(import_fail=True)
    with pytest.raises(HypervScriptError, match="ImportFailed"):
        _restore(lab, plan, "win01", "win01-f")
    lab.set_faults()
    _nothing_made(lab, plan, ["win01-f"], ["D:\\Hyper-V\\win01-f"])


def test_a_killed_restore_is_removed_by_the_next_one_and_by_the_sweeper(lab, backed_up):
    """A restore killed after its disks were written (its process gone, its
    entry left): the same restore run again removes the leftover first and
    leaves exactly one VM of that name; the sweeper removes another one."""
    plan, _, _ = backed_up
    hyperv = HyperV(plan, plan.hyperv_host("hv1"), SecretStr(lab.password))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def half_made(as_: str):
        point = find_point(str(plan.repository), "legacy01")
        req = RestoreRequest(vm="legacy01", point=point.id, restored_as=as_)
        steps = hyperv.restore_steps(req, plan, plan.agents[0], run_id="killed")
        target = steps.prepare(describe_point(point.config, point.attributes))
        made = steps.create(target)
        for d in target.disks:
            steps.write_disk(made, d, point.id, cancel=None, progress=None)
        # kill -9: no release; the entry names a process that no longer runs
        from vmbackup.hyperv import restore as hr

        hr._drop_entry(steps.entry, remove=False)
        entry = json.loads(steps.entry.file.read_text())
        entry["pid"] = dead_pid
        steps.entry.file.write_text(json.dumps(entry))
        assert lab.local_path(target.location).is_dir() and any(lab.share_root.iterdir())
        return target.location

    folder = half_made("legacy01-k")
    r = _restore(lab, plan, "legacy01", "legacy01-k")
    try:
        assert [v["name"] for v in lab.status()["vms"] if v["name"].startswith("legacy01-k")] == ["legacy01-k"]
        assert r.location == folder and not any(lab.share_root.iterdir())
    finally:
        _remove(lab, plan, r)
    folder = half_made("legacy01-s")
    hyperv.connect()
    removed = hyperv.sweep(older_than_seconds=3600)
    assert [x["VMs"] for x in removed if x.get("Kind") == "restore"] == [["legacy01-s"]]
    _nothing_made(lab, plan, ["legacy01-s"], [folder])


def _drives(client, name: str) -> dict[str, str]:
    t = client.run_script("Get-VmbackupRestoreTarget.ps1", {"Name": name, "Path": ""})
    return {x["Name"]: x["Path"] for x in t["Vm"]["Disks"]}


def _dirty_the_log(path) -> None:
    """Both headers of a VHDX given a LogGuid, as Hyper-V leaves a file it did not close."""
    with open(path, "r+b") as f:
        heads = []
        for off in (64 * 1024, 128 * 1024):
            f.seek(off)
            heads.append(bytearray(f.read(4096)))
        h = max(heads, key=lambda b: struct.unpack_from("<Q", b, 8)[0])
        h[48:64] = uuid.uuid4().bytes
        for off in (64 * 1024, 128 * 1024):
            struct.pack_into("<Q", h, 8, struct.unpack_from("<Q", h, 8)[0] + 1)
            h[4:8] = b"\0\0\0\0"
            struct.pack_into("<I", h, 4, crc32c(bytes(h)))
            f.seek(off)
            f.write(h)


def test_in_place_writes_only_the_blocks_that_differ_and_keeps_the_vm(lab, backed_up, tmp_path):
    """A VM (here a restored copy of off01, so the lab's own VMs keep their
    chains) backed up, then written to by its guest, rolled back in place:
    only the written block is written, into the VM's own VHDX (its drive
    keeps its file), it keeps its Id and its disk equals the point. A VHDX
    the mover cannot write in place (its log not empty) is written whole to
    a new VHDX and swapped in, as the row's warnings say. A running VM is
    refused with nothing made."""
    plan, _, _ = backed_up
    copy = _restore(lab, plan, "off01", "off01-ip")
    try:
        host = plan.hyperv_host("hv1")
        client = connect(host, SecretStr(lab.password))
        vm = next(v for v in select_vms(client, host, plan.selection) if v.name == "off01-ip")
        point = backup_vm(client, vm, plan, host, plan.agents[0], run_id="in-place-src").backup_id
        saved = tmp_path / "saved.raw"
        _mover.restore_disk(str(plan.repository), point, str(saved), disk="scsi0:0")
        size = saved.stat().st_size
        drives = _drives(client, "off01-ip")
        # two guest writes, each inside one 1 MiB chunk: over data, and where the point has zeros
        lab.write("off01-ip", "scsi0:0", 0, 100_000, seed=77)
        lab.write("off01-ip", "scsi0:0", 3 * MiB, 100_000, seed=77)
        r = _restore(lab, plan, "off01-ip", "off01-ip", in_place=True)
        assert r.vm_id == copy.vm_id and r.point == point and r.in_place
        assert [(d["disk"], d["bytes_written"]) for d in r.disks] == [("scsi0:0", 2 * MiB)]
        assert r.bytes_written == 2 * MiB <= size // 8
        assert r.warnings == [] and not any("(was " in c for c in r.changes)
        assert any("2 of 16 blocks differed" in c for c in r.changes), r.changes
        assert _drives(client, "off01-ip") == drives
        assert sha256(lab.disk_image("off01-ip", "scsi0:0", tmp_path / "now.raw")) == sha256(saved)
        assert _vm(lab, "off01-ip")["id"].lower() == copy.vm_id.lower()
        assert not any(lab.share_root.iterdir()) and restore_entries(plan.repository, "hv1") == []

        lab.write("off01-ip", "scsi0:0", 5 * MiB, 4096, seed=78)
        _dirty_the_log(lab.local_path(drives["scsi0:0"]))
        r = _restore(lab, plan, "off01-ip", "off01-ip", in_place=True)
        assert any("log is not empty" in w and "written whole" in w for w in r.warnings), r.warnings
        assert any("(was " in c for c in r.changes) and r.bytes_written > MiB
        assert _drives(client, "off01-ip") != drives
        assert sha256(lab.disk_image("off01-ip", "scsi0:0", tmp_path / "now.raw")) == sha256(saved)
        assert not any(lab.share_root.iterdir()) and restore_entries(plan.repository, "hv1") == []
    finally:
        _remove(lab, plan, copy)
    with pytest.raises(RestoreInputError, match="win01 on Hyper-V host hv1 is not powered off"):
        _restore(lab, plan, "win01", "win01", in_place=True)
    assert not any(lab.share_root.iterdir()) and restore_entries(plan.repository, "hv1") == []


KILLED = """
import json, os, sys
from pydantic import SecretStr
from vmbackup.plan import parse_plan
from vmbackup.hyperv.hypervisor import HyperV
from vmbackup.hyperv.restore import describe_point
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import find_point, restore_one
from vmbackup_lab.hyperv.vhdx import crc32c

plan = parse_plan(json.loads(sys.argv[1]))
host = plan.hyperv_host("hv1")
hyperv = HyperV(plan, host, SecretStr(os.environ["VMBACKUP_HYPERV_PASSWORD"]))
point = find_point(str(plan.repository), "legacy01")
req = RestoreRequest(vm="legacy01", point=point.id, restored_as=sys.argv[2])
steps = hyperv.restore_steps(req, plan, plan.agents[0], run_id="restore-run")
restore_one(steps, req, describe_point(point.config, point.attributes), hypervisor="hyperv",
            repository=str(plan.repository), agent="agent1", disks_per_vm=2)
"""


def test_kill_9_mid_restore_then_the_same_restore_leaves_one_vm(lab, backed_up, tmp_path):
    """kill -9 of a restore while the host imports the VM (lab fault slow_ms
    holds each restore script): the same restore run again reconciles first
    (the entry's process is dead) and leaves exactly one VM of that name."""
    plan, _, _ = backed_up
    plan_json = {
        "hyperv": [
            {
                "name": "hv1",
                "url": lab.url,
                "user": lab.user,
                "password_env": "VMBACKUP_HYPERV_PASSWORD",
                "auth": "ntlm",
                "ca_file": lab.ca_file,
            }
        ],
        "repository": str(plan.repository),
        "agents": [
            {
                "name": "agent1",
                "windows_paths": {"\\\\HV1\\": str(lab.share_root)},
                "share_account": "HV1\\vmbackup-agent",
            }
        ],
        "selection": {"vms": ["*"]},
    }
    lab.set_faults(slow_ms=1500)
    env = dict(os.environ, VMBACKUP_HYPERV_PASSWORD=lab.password)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, json.dumps(plan_json), "legacy01-k9"], env=env)
    stage = lab.local_path("D:\\Hyper-V\\legacy01-k9\\.vmbackup-staging")
    try:
        end = time.monotonic() + 60
        # the disk is written (the mover renames its file into place when complete): Import-VM is next
        while not (stage.is_dir() and any(p.suffix == ".vhdx" for p in stage.iterdir())):
            assert proc.poll() is None and time.monotonic() < end, "the restore never wrote its disk"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert restore_entries(plan.repository, "hv1")  # what the killed restore left is named
    lab.set_faults()
    r = _restore(lab, plan, "legacy01", "legacy01-k9")
    try:
        assert [v["name"] for v in lab.status()["vms"] if v["name"].startswith("legacy01-k9")] == ["legacy01-k9"]
        assert not stage.exists() and not any(lab.share_root.iterdir())
        assert restore_entries(plan.repository, "hv1") == []
    finally:
        _remove(lab, plan, r)


def test_a_vsphere_point_comes_back_as_a_hyperv_vm(lab, tmp_path):
    """A point of a vSphere VM (UEFI, a SCSI and a SATA disk, one adapter on
    port group "VM Network"), written here by the mover as a vSphere backup
    writes it, restored onto the Hyper-V host: a generation 2 VM in the host's
    default VM path, rebuilt from the description (there is no .vmcx), the
    SATA disk on SCSI 0, the network mapped, powered on; every disk equals the point."""
    from vmbackup.hypervisors.base import DiskSpec, NicSpec, VmDescription

    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    sizes = {"scsi0:0": 8 << 20, "sata0:0": 4 << 20}
    session = _mover.BackupSession(str(repo), "vsvm")
    for k, (name, size) in enumerate(sizes.items()):
        raw = tmp_path / f"{k}.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
            f.seek(1 << 20)
            f.write(bytes([k + 1]) * 300_000)
        session.add_disk(str(raw), name)
    point = session.id
    session.commit(json.dumps({"name": "vsvm"}), json.dumps({"vm": "vsvm", "host": "esx1"}))
    desc = VmDescription(
        name="vsvm",
        hypervisor="vsphere",
        firmware="efi",
        cpus=2,
        memory_mb=1024,
        disks=[
            DiskSpec("scsi0:0", sizes["scsi0:0"], "scsi", "[ds1] vsvm/vsvm.vmdk"),
            DiskSpec("sata0:0", sizes["sata0:0"], "sata", "[ds1] vsvm/vsvm_1.vmdk"),
        ],
        nics=[NicSpec("VM Network", "00:50:56:aa:bb:cc", "vmxnet3")],
        host="esx1",
        location="ds1",
    )
    plan = make_plan(lab, repo)
    hyperv = HyperV(plan, plan.hyperv_host("hv1"), SecretStr(lab.password))
    req = RestoreRequest(
        vm="vsvm", point=point, restored_as="vsvm-hv", network_map={"VM Network": "LAN"}, power_on=True
    )
    r = restore_one(
        hyperv.restore_steps(req, plan, plan.agents[0], run_id="cross"),
        req,
        desc,
        hypervisor="hyperv",
        repository=str(repo),
        agent="agent1",
        disks_per_vm=2,
        verify=True,
    )
    try:
        assert (r.source_hypervisor, r.hypervisor, r.verified) == ("vsphere", "hyperv", True)
        assert r.location == "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V\\vsvm-hv"
        assert any("disk sata0:0 is scsi0:1 on Hyper-V" in c for c in r.changes)
        assert any("rebuilt from the point's description" in c for c in r.changes)
        vm = _vm(lab, "vsvm-hv")
        assert (vm["generation"], vm["cpus"], vm["memory_mib"]) == (2, 2, 1024)
        assert r.powered_on and vm["state"] == "running"  # Start-VM
        assert vm["nics"] == [{"switch": "LAN", "mac": "005056AABBCC"}]
        assert [d["name"] for d in vm["disks"]] == ["scsi0:0", "scsi0:1"]
        for disk, place in (("scsi0:0", "scsi0:0"), ("sata0:0", "scsi0:1")):
            saved = tmp_path / "saved.raw"
            _mover.restore_disk(str(repo), point, str(saved), disk=disk, overwrite=True)
            assert sha256(lab.disk_image("vsvm-hv", place, tmp_path / "now.raw")) == sha256(saved)
    finally:
        _remove(lab, plan, r)
