"""Another hypervisor's point (Hyper-V's) as a new vSphere VM: the create spec
built from the neutral description (``hypervisors.base.VmDescription``), and
the datastore it goes to when the user names none. docs/vsphere.md, "Across
hypervisors".

What the description gives: the firmware (Hyper-V generation 2: EFI, 1:
BIOS), processors, startup memory, the disks by name and size, the network
adapters and their switches. What it does not: the guest OS (the spec says
Other 64-bit), Secure Boot and its template, the virtual TPM and the rest of
the guest state file (``.vmgs``), the integration services: said in the
row's changes and warnings. The disks keep their names where vSphere has
the place (SCSI 0-3 units 0-15 but 7, IDE 0-1 units 0-1): a Hyper-V SCSI
location vSphere has not goes to the next free SCSI unit (said).

Devices are chosen for a guest that has no VMware Tools yet: an LSI Logic SAS
controller and E1000e adapters, whose drivers Windows and Linux carry
(PVSCSI and VMXNET3 need VMware Tools' drivers on Windows: VMware KB 1010398
and KB 1001805).

No Prefect.
"""

from __future__ import annotations

import dataclasses
from pathlib import PureWindowsPath
from typing import Any

from pyVmomi import vim

from ..errors import RestoreInputError
from ..hypervisors import base as hv
from .restore import MARK, _Disk, _split_name, disk_device, nic_device
from .transport import agent_vm

GUEST_ID = "otherGuest64"  # "Other (64-bit)": the point does not say which OS the guest runs
SCSI_UNITS = [u for u in range(16) if u != 7]  # LSI Logic SAS: 15 disks, unit 7 is the controller's
_LIMITS = {"scsi": (4, SCSI_UNITS), "sata": (4, list(range(30))), "nvme": (4, list(range(15))), "ide": (2, [0, 1])}
_CONTROLLERS = {
    "scsi": vim.vm.device.VirtualLsiLogicSASController,
    "sata": vim.vm.device.VirtualAHCIController,
    "nvme": vim.vm.device.VirtualNVMEController,
}
_GIB = 1 << 30


def default_datastore(client: Any, host: Any, agent: Any, need: int) -> tuple[Any, str]:
    """The datastore a VM of another hypervisor goes to on ``host`` when the user names none
    (ESXi has no default VM folder; the vSphere Client makes the user pick one): of the host's
    accessible datastores outside maintenance with room for ``need`` bytes, one the agent's
    host also sees (so its disks are written through hot-add), then the one with the most
    free space. Returns it and the sentence that says so; ``RestoreInputError`` when none fits."""
    agent_obj = agent_vm(client, agent) if agent is not None else None
    try:
        seen = {d.name for d in agent_obj.runtime.host.datastore} if agent_obj is not None else set()
    except AttributeError:
        seen = set()
    fits = []
    for ds in host.datastore:
        s = ds.summary
        if s.accessible is False or (s.maintenanceMode or "normal") != "normal":
            continue
        free = int(s.freeSpace or 0)
        if free >= need:
            fits.append((ds.name in seen, free, ds))
    if not fits:
        raise RestoreInputError(
            f"no datastore of host {host.name} has room for the point's {need} bytes of data; give one (--datastore)"
        )
    hot, free, ds = max(fits, key=lambda f: (f[0], f[1], [-ord(c) for c in f[2].name]))
    reach = f", one agent {agent.name}'s host sees (hot-add)" if hot else ""
    return ds, (
        f"datastore {ds.name} chosen (no --datastore): of host {host.name}'s datastores{reach}, "
        f"the one with the most free space ({free / _GIB:.1f} GiB)"
    )


def _places(disks: list[hv.DiskSpec]) -> dict[str, tuple[str, int, int]]:
    """Each disk's (bus, controller, unit) on vSphere: its own name where vSphere has it,
    else the next free SCSI unit."""
    taken: set[tuple[str, int, int]] = set()
    out: dict[str, tuple[str, int, int]] = {}
    moved = []
    for d in disks:
        try:
            bus, number, unit = _split_name(d.name)
        except ValueError:
            moved.append(d.name)
            continue
        limit = _LIMITS.get(bus)
        if limit is not None and number < limit[0] and unit in limit[1] and (bus, number, unit) not in taken:
            out[d.name] = (bus, number, unit)
            taken.add(out[d.name])
        else:
            moved.append(d.name)
    free = [("scsi", n, u) for n in range(4) for u in SCSI_UNITS if ("scsi", n, u) not in taken]
    if len(moved) > len(free):
        raise RestoreInputError(f"the point has more disks than vSphere's SCSI controllers hold ({len(disks)})")
    for name, place in zip(moved, free, strict=False):
        out[name] = place
    return out


def cross_spec(
    description: hv.VmDescription,
    request: hv.RestoreRequest,
    h: Any,
    networks: dict[str, Any],
    run_id: str,
    changes: list[str],
    warnings: list[str],
    *,
    sizes: dict[str, int],
) -> tuple[Any, dict[str, _Disk]]:
    """The ``CreateVM_Task`` spec of a VM described by another hypervisor's point, and its
    disks; ``sizes``: each disk's size in the point (a VHD's is its geometry's, above the
    size Hyper-V reports: the disk is made that large, so every byte of the point fits)."""
    d = description
    name, ds = request.restored_as, h.datastore.name
    src = {"hyperv": "Hyper-V"}.get(d.hypervisor, d.hypervisor)
    memory = -(-d.memory_mb // 4) * 4  # vSphere: a multiple of 4 MB
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId=GUEST_ID,
        numCPUs=d.cpus,
        memoryMB=memory,
        firmware=d.firmware,
        files=vim.vm.FileInfo(vmPathName=f"[{ds}]"),
        extraConfig=[vim.option.OptionValue(key=MARK, value=run_id)],
    )
    changes.append(
        f"a {src} VM made as a vSphere VM ({d.firmware.upper()} firmware, {d.cpus} vCPU, {memory} MB): "
        "each disk as a thin VMDK; the guest needs VMware's drivers (docs/vsphere.md, 'Across hypervisors')"
    )
    changes.append(f"guest OS type Other (64-bit): the {src} point does not record the guest's; set it in the VM")
    if request.restored_as != d.name:
        changes.append(f"named {request.restored_as} (was {d.name})")
    if d.memory_mb != memory:
        changes.append(f"memory {memory} MB (the source's {d.memory_mb} MB rounded up to a multiple of 4)")
    _notes(d, changes, warnings)
    devices: list[Any] = []
    ctrl_keys: dict[tuple[str, int], int] = {("ide", 0): 200, ("ide", 1): 201}
    key = -100
    places = _places(d.disks)
    disks: dict[str, _Disk] = {}
    for i, disk in enumerate(d.disks):
        bus, number, unit = places[disk.name]
        place = f"{bus}{number}:{unit}"
        if (bus, number) not in ctrl_keys:
            c = _CONTROLLERS[bus](key=key, busNumber=number)
            if bus == "scsi":
                c.sharedBus = "noSharing"
            ctrl_keys[(bus, number)] = key
            key -= 1
            devices.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=c))
        if place != disk.name:
            changes.append(f"disk {disk.name} is {place} on vSphere (vSphere has no {disk.name})")
        held = max(disk.capacity, sizes.get(disk.name, 0))
        capacity = -(-held // 1024) * 1024  # vSphere sizes disks in KB
        if capacity != disk.capacity:
            changes.append(
                f"disk {disk.name}: {capacity} bytes (the source's was {disk.capacity}; the point holds {held}, "
                "rounded up to a KB)"
            )
        add, file = disk_device(name, i, ds, capacity, ctrl_keys[(bus, number)], unit, key)
        key -= 1
        devices.append(add)
        spec_ = dataclasses.replace(disk, place=place if place != disk.name else None)
        disks[disk.name] = _Disk(spec_, file, datastore=ds, capacity=capacity)
    if any(b == "scsi" for b, _, _ in places.values()):
        changes.append(
            "SCSI disks on an LSI Logic SAS controller, whose driver the guest has without VMware Tools "
            "(PVSCSI once VMware Tools are installed)"
        )
    if d.nics:
        changes.append(
            "network adapters E1000e, whose driver the guest has without VMware Tools "
            "(VMXNET3 once VMware Tools are installed)"
        )
    for n, nic in enumerate(d.nics, 1):
        devices.append(
            nic_device(
                vim.vm.device.VirtualE1000e, n, key, nic.network, nic.mac, networks, request, changes, keep_mac=False
            )
        )
        key -= 1
    spec.deviceChange = devices
    return spec, disks


def _notes(d: hv.VmDescription, changes: list[str], warnings: list[str]) -> None:
    """What a Hyper-V VM has that a vSphere VM made from its description does not."""
    raw = d.raw if isinstance(d.raw, dict) else {}
    if d.hypervisor != "hyperv":
        return
    changes.append("Hyper-V integration services do not carry over: install VMware Tools in the guest")
    files = [str(f.get("path") or "") for f in raw.get("config_files") or [] if isinstance(f, dict)]
    if d.firmware == "efi":
        warnings.append(
            "Secure Boot is off: the point does not record Hyper-V's Secure Boot setting or its template; "
            "turn it on in the VM's boot options if the guest needs it"
        )
    if any(PureWindowsPath(f).suffix.lower() == ".vmgs" for f in files) or d.firmware == "efi":
        warnings.append(
            "the guest state file (.vmgs: UEFI variables, a virtual TPM's keys) does not carry over: the "
            "firmware boots the disk's default EFI loader, and a guest that sealed keys in the TPM "
            "(BitLocker) asks for its recovery key"
        )
