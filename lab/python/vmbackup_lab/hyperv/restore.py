"""The adapter's restore scripts as the lab host carries them out (see
flows/vmbackup/hyperv/scripts/*Restore*.ps1 for what they do on Windows).

A restore's folder is staged by New-VmbackupRestore.ps1 (a ledger entry in
C:\\ProgramData\\vmbackup\\restores first, then the folder, shared to the
agent); the agent writes the VHDX files and the configuration files into its
staging subfolder through the share (or on the host); Import-VmbackupRestore.ps1
models Compare-VM and ``Import-VM -Copy -GenerateNewId``: the staged .vmcx
(the lab's JSON stand-in, `host.Vm.vmcx`) is read, a network adapter whose
switch the host lacks is an incompatibility (message 33012) resolved by the
network map or by disconnecting it, the disks are copied into the VM's
``Virtual Hard Disks`` folder and the VM is registered under a new Id; a
configuration that cannot be read is rebuilt from the description instead
(New-VM, Add-VMHardDiskDrive, Add-VMNetworkAdapter). Remove-VmbackupRestore.ps1
undoes a restore: the VM registered in its folder, the share, the folder and
the entry; with -KeepVm only the staging, the share and the entry.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import uuid
from pathlib import PureWindowsPath

from .host import VM_OFF, VM_RUNNING, WORK_DIR, Disk, DiskFile, Host, HostError, ScriptFailure, Vm

STAGING = ".vmbackup-staging"
# The highest configuration version this host runs (Windows Server 2022: 10.0;
# Get-VMHostSupportedVersion).
MAX_VERSION = (10, 0)
MISSING_SWITCH = 33012  # Compare-VM: "Could not find Ethernet switch '<name>'."


def _entry_path(host: Host, rid: str):
    return host.local(f"{WORK_DIR}\\restores\\{rid}.json")


def _rid(rid) -> str:
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", rid):
        raise ScriptFailure(f"ScriptFailed: Cannot validate argument on parameter 'RestoreId'. {rid!r}")
    return rid


def _find(host: Host, name: str) -> Vm | None:
    return next((v for v in host.vms.values() if v.name.lower() == str(name).lower()), None)


def _exists(host: Host, winpath: str) -> bool:
    try:
        return host.local(winpath).exists()
    except HostError:
        return False


def get_restore_target(host: Host, name: str, path: str = "") -> dict:
    v = _find(host, name)
    parent = str(PureWindowsPath(path).parent) if path else ""
    free = None
    if path:
        try:
            free = host.free_bytes(host.key_of(path))
        except HostError:
            free = None
    return {
        "ComputerName": host.name.upper(),
        "Vm": None
        if v is None
        else {
            "Name": v.name,
            "Id": v.id.lower(),
            "State": v.state,
            "ConfigurationLocation": v.config_location,
            "Disks": [{"Name": d.name, "Path": d.top.winpath if d.top else None} for d in v.disks],
        },
        "Path": path,
        "PathExists": bool(path) and _exists(host, path),
        "ParentExists": bool(parent) and _exists(host, parent),
        "FreeBytes": free,
        "Switches": list(host.switches),
        "VirtualMachinePath": host.vm_path,
    }


def new_restore(
    host: Host, restoreid: str, name: str, path: str, shareto: str = "", inplace: bool = False, workdir: str = WORK_DIR
) -> dict:
    rid = _rid(restoreid)
    entry_file = _entry_path(host, rid)
    if entry_file.exists():
        raise ScriptFailure(f"ScriptFailed: a restore '{rid}' is already open on {host.name.upper()}")
    try:
        local = host.local(path)
    except HostError as e:
        raise ScriptFailure(f"PathNotFound: {e}") from None
    if not inplace and local.exists():
        raise ScriptFailure(f"PathExists: {path} exists on {host.name.upper()}: a restore never writes into it")
    if not local.parent.is_dir():
        raise ScriptFailure(f"PathNotFound: the folder {PureWindowsPath(path).parent} does not exist")
    stage = f"{path}\\{STAGING}"
    share = f"vmbr-{rid}$" if shareto else None
    entry = {
        "RestoreId": rid,
        "Name": name,
        "Path": path,
        "StagePath": stage,
        "InPlace": bool(inplace),
        "Share": share,
        "Created": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    # the entry first: whatever exists afterwards, Remove-VmbackupRestore.ps1 finds it by the entry
    entry_file.parent.mkdir(parents=True, exist_ok=True)
    entry_file.write_text(json.dumps(entry))
    host.local(stage + "\\Virtual Machines").mkdir(parents=True)
    if share:
        host.share(share, path)
    return {
        "RestoreId": rid,
        "Path": path,
        "StagePath": stage,
        "SharePath": f"\\\\{host.name.upper()}\\{share}" if share else None,
    }


def _entry(host: Host, rid: str) -> dict:
    p = _entry_path(host, _rid(rid))
    if not p.exists():
        raise ScriptFailure(f"RestoreNotFound: no restore '{rid}' in {WORK_DIR}\\restores")
    return json.loads(p.read_text())


def _read_vmcx(host: Host, configfile: str) -> dict | None:
    """Compare-VM's reading of the configuration: None when it cannot be read."""
    if not configfile:
        return None
    try:
        cfg = json.loads(host.local(configfile).read_text())
    except (OSError, ValueError, HostError):
        return None
    if not isinstance(cfg, dict) or cfg.get("vmbackup_lab_vmcx") != 1:
        return None
    major, _, minor = str(cfg.get("Version", "0.0")).partition(".")
    if (int(major), int(minor or 0)) > MAX_VERSION:
        return None  # "The virtual machine's configuration version is not supported"
    return cfg


def _virtual_size(local) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(local)], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)["virtual-size"])


def _place(name: str) -> tuple[str, int, int]:
    """('scsi', 0, 1) of 'scsi0:1'."""
    m = re.fullmatch(r"([a-z]+)(\d+):(\d+)", name)
    if m is None:
        raise ScriptFailure(f"ImportFailed: {name!r} is not a disk's place such as scsi0:0")
    return m.group(1), int(m.group(2)), int(m.group(3))


def import_restore(
    host: Host,
    restoreid: str,
    name: str,
    disks: list,
    description: dict,
    configfile: str = "",
    networkmap: dict | None = None,
    poweron: bool = False,
    inplace: bool = False,
    workdir: str = WORK_DIR,
) -> dict:
    entry = _entry(host, restoreid)
    path = entry["Path"]
    if inplace:
        return _swap(host, name, path, disks, poweron)
    if _find(host, name) is not None:
        raise ScriptFailure(f"VmExists: a VM named '{name}' exists on {host.name.upper()}")
    networkmap = dict(networkmap or {})
    cfg = _read_vmcx(host, configfile)
    method = "import" if cfg is not None else "rebuild"
    source = cfg if cfg is not None else description
    incompatibilities = []
    nics = []
    for k, n in enumerate(source.get("NetworkAdapters") or []):
        switch, mac = n.get("SwitchName"), n.get("MacAddress")
        if switch and switch not in host.switches:
            to = networkmap.get(switch)
            resolution = f"connected to {to} (network map)" if to in host.switches else "disconnected"
            incompatibilities.append(
                {
                    "MessageId": MISSING_SWITCH,
                    "Message": f"Could not find Ethernet switch '{switch}'.",
                    "Adapter": k,
                    "Switch": switch,
                    "Resolution": resolution,
                }
            )
            switch = to if to in host.switches else None
        elif switch in networkmap and networkmap[switch] in host.switches:
            switch = networkmap[switch]
        nics.append({"switch": switch, "mac": mac or f"00155D{uuid.uuid4().hex[:6].upper()}"})
    vm = Vm(
        name=name,
        id=str(uuid.uuid4()).upper(),  # -GenerateNewId
        state=VM_OFF,
        backup=True,
        generation=int(source.get("Generation") or 2),
        volume=host.key_of(path),
        disks=[],
        volume_root=host.root_of(host.key_of(path)),
        cpus=int(source.get("ProcessorCount") or 1),
        memory_mib=int(source.get("MemoryStartupBytes") or 1 << 30) >> 20,
        nics=nics,
        location=path,
    )
    vhd_dir = f"{path}\\Virtual Hard Disks"
    host.local(vhd_dir).mkdir(parents=True, exist_ok=True)
    for d in disks if isinstance(disks, list) else [disks]:
        bus, number, location = _place(str(d.get("Place") or d["Name"]))
        if vm.generation == 2 and bus == "ide":
            bus = "scsi"  # generation 2 has no IDE controller
        src = host.local(str(d["Path"]))
        if not src.is_file():
            raise ScriptFailure(f"ImportFailed: the virtual hard disk {d['Path']} does not exist")
        dst = f"{vhd_dir}\\{PureWindowsPath(str(d['Path'])).name}"
        # -Copy: the staged file is copied into the VM's folder
        subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", str(src), str(host.local(dst))], check=True, capture_output=True
        )
        vm.disks.append(Disk(bus, number, location, _virtual_size(host.local(dst)), DiskFile(dst, "vhdx", False)))
    host.vms[name] = vm
    host.write_config(vm)
    host.event(f"VM {name} ({vm.id}) {'imported' if method == 'import' else 'rebuilt'} into {path}")
    if host.faults.get("import_fail"):
        raise ScriptFailure(f"ImportFailed: Import-VM of '{name}' failed after registering it (lab fault import_fail)")
    if poweron:
        vm.state = VM_RUNNING
    return {
        "Name": vm.name,
        "VmId": vm.id.lower(),
        "Method": method,
        "Generation": vm.generation,
        "Incompatibilities": incompatibilities,
        "Disks": [{"Name": d.name, "Path": d.top.winpath} for d in vm.disks],
        "State": vm.state,
    }


def _swap(host: Host, name: str, path: str, disks, poweron: bool) -> dict:
    """In place: each staged VHDX moved into the VM's 'Virtual Hard Disks' and its drive pointed at it."""
    vm = _find(host, name)
    if vm is None:
        raise ScriptFailure(f"VmNotFound: no VM named '{name}' on {host.name.upper()}")
    if vm.state != VM_OFF:
        raise ScriptFailure(f"VmNotOff: VM '{name}' is not off (Running); an in-place restore needs it off")
    staged = {str(d["Name"]): str(d["Path"]) for d in (disks if isinstance(disks, list) else [disks])}
    vhd_dir = f"{path}\\Virtual Hard Disks"
    host.local(vhd_dir).mkdir(parents=True, exist_ok=True)
    replaced = []
    for d in vm.disks:
        if d.name not in staged or d.top is None:
            continue
        dst = f"{vhd_dir}\\{PureWindowsPath(staged[d.name]).name}"
        host.local(staged[d.name]).rename(host.local(dst))  # Move-Item on one volume
        replaced.append({"Name": d.name, "Old": d.top.winpath, "Path": dst})
        d.top = DiskFile(dst, "vhdx", False)  # Set-VMHardDiskDrive -Path
    host.write_config(vm)
    if poweron:
        vm.state = VM_RUNNING
    return {
        "Name": vm.name,
        "VmId": vm.id.lower(),
        "Method": "in-place",
        "Generation": vm.generation,
        "Incompatibilities": [],
        "Replaced": replaced,
        "Disks": [{"Name": d.name, "Path": d.top.winpath} for d in vm.disks if d.top is not None],
        "State": vm.state,
    }


def start_restore(host: Host, vmid: str, name: str) -> dict:
    """Start-VmbackupRestore.ps1: Start-VM of a restored VM by its Id."""
    vm = next((v for v in host.vms.values() if v.id.lower() == str(vmid).lower()), None)
    if vm is None:
        raise ScriptFailure(f"VmNotFound: no VM with Id '{vmid}' on {host.name.upper()}")
    if vm.name != name:
        raise ScriptFailure(f"VmNotFound: VM '{vmid}' is named '{vm.name}', not '{name}'")
    if vm.state != VM_RUNNING:
        vm.state = VM_RUNNING
        host.event(f"VM {vm.name} ({vm.id}) started")
    return {"Name": vm.name, "VmId": vm.id.lower(), "State": vm.state}


def _rm(host: Host, winpath: str) -> None:
    local = host.local(winpath)
    if local.is_symlink() or local.is_file():
        local.unlink()
    elif local.exists():
        shutil.rmtree(local)


def remove_restore(
    host: Host, restoreid: str, keepvm: bool = False, vmid: str = "", path: str = "", workdir: str = WORK_DIR
) -> dict:
    rid = _rid(restoreid)
    entry_file = _entry_path(host, rid)
    entry = json.loads(entry_file.read_text()) if entry_file.exists() else None
    folder = entry["Path"] if entry else path
    removed = []
    # an in-place restore's VM is the user's own: never removed
    if not keepvm and folder and not (entry and entry.get("InPlace")):
        for v in list(host.vms.values()):
            # only a VM registered in the restore's own folder (which did not
            # exist before the restore), and with -VMId only that VM
            if v.config_location.lower() == folder.lower() and (not vmid or v.id.lower() == vmid.lower()):
                del host.vms[v.name]
                removed.append(v.name)
                host.event(f"VM {v.name} ({v.id}) removed")
    if entry and entry.get("Share"):
        host.unshare(entry["Share"])
    if entry:
        _rm(host, entry["StagePath"])
        if not keepvm and not entry.get("InPlace"):
            _rm(host, entry["Path"])
        entry_file.unlink()
    elif folder and not keepvm:
        _rm(host, folder)
    return {"RestoreId": rid, "RemovedVMs": removed, "Path": folder}


def get_restores(host: Host, workdir: str = WORK_DIR) -> dict:
    d = host.local(f"{WORK_DIR}\\restores")
    entries = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return {"ComputerName": host.name.upper(), "Restores": entries}


SCRIPTS = {
    "Get-VmbackupRestoreTarget.ps1": get_restore_target,
    "New-VmbackupRestore.ps1": new_restore,
    "Import-VmbackupRestore.ps1": import_restore,
    "Start-VmbackupRestore.ps1": start_restore,
    "Remove-VmbackupRestore.ps1": remove_restore,
    "Get-VmbackupRestores.ps1": get_restores,
}
