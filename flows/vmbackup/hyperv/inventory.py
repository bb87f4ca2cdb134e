"""Which Hyper-V VMs a plan selects, and what the procedure needs to know of each.

The host answers `Get-VmbackupVmList.ps1` (every VM's name) and
`Get-VmbackupVm.ps1` (one VM: disks with their chains, configuration files,
volumes); this module matches the plan's selection against the list and turns
the answers into frozen `HvVm`/`HvDisk` values. Names are matched without
regard to case, as Hyper-V compares VM names.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import HypervVmNotFoundError
from .client import HypervClient

# A Cluster Shared Volume is a folder of the system drive but a volume of its own.
_CSV = re.compile(r"^([A-Za-z]:\\ClusterStorage\\[^\\]+\\)", re.IGNORECASE)
_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class HvDisk:
    """One virtual disk of a VM: ``scsi0:0`` (controller type, number, location)."""

    name: str
    path: str  # the file the VM writes to (the chain's top: an .avhdx under checkpoints)
    chain: tuple[str, ...]  # top file first, down to the base disk
    size: int  # virtual size in bytes
    volume: str  # the volume root holding the top file ('D:\' or 'C:\ClusterStorage\Volume1\')


@dataclass(frozen=True)
class SkippedDisk:
    """A disk of the VM that no shadow copy of its host can hold, so it is not read.

    A pass-through disk (a physical disk of the host attached to the VM: no
    virtual disk file) or a virtual disk file on an SMB share (Hyper-V over
    SMB: the host's VSS does not copy remote files). The same shape as
    vSphere's independent disks in a row's ``skipped_disks``.
    """

    disk: str  # 'scsi0:1'
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"disk": self.disk, "reason": self.reason}


@dataclass(frozen=True)
class HvVm:
    """A Hyper-V VM as the procedure backs it up."""

    name: str
    host: str  # the plan's host name
    id: str
    state: int  # Msvm state: 2 running, 3 off, 6 saved, 9 paused
    backup_enabled: bool  # the Backup (VSS) integration service
    volumes: tuple[str, ...]  # volume roots holding its files ('D:\', 'C:\ClusterStorage\Volume1\')
    volume_keys: tuple[str, ...]  # limit keys: 'hv1:D' (local volume) or '<cluster>:Volume1' (CSV)
    disks: tuple[HvDisk, ...]  # the disks a shadow copy holds (read by the backup)
    config_files: tuple[str, ...]
    skipped_disks: tuple[SkippedDisk, ...] = ()  # pass-through and SMB disks, with the reason
    # what a restore rebuilds the VM from when its configuration cannot be imported
    generation: int | None = None  # 1 (BIOS) or 2 (UEFI)
    version: str | None = None  # the configuration version ('9.0')
    cpus: int | None = None
    memory_mb: int | None = None  # startup memory
    nics: tuple[tuple[str | None, str | None], ...] = ()  # (switch, MAC) per network adapter
    configuration_location: str | None = None  # the VM's folder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skipped(self) -> list[dict[str, str]]:
        """``skipped_disks`` as a row carries them: ``[{"disk": ..., "reason": ...}]``."""
        return [d.to_dict() for d in self.skipped_disks]


def volume_of(winpath: str) -> str:
    """The root of the volume holding a Windows path ('D:\\', 'C:\\ClusterStorage\\Volume1\\')."""
    m = _CSV.match(winpath)
    if m:
        return m.group(1)
    return winpath[:2].upper() + "\\" if len(winpath) >= 2 and winpath[1] == ":" else winpath


def volume_key(host: Any, root: str) -> str:
    """The limit key of a volume: '<host>:D', or '<cluster>:Volume1' for a CSV (one per cluster)."""
    m = _CSV.match(root)
    if m:
        name = m.group(1).rstrip("\\").rsplit("\\", 1)[1]
        return f"{host.cluster or host.name}:{name}"
    return f"{host.name}:{root[:1].upper()}"


def connect(host: Any, password: Any) -> HypervClient:
    """A WinRM client to a plan's Hyper-V host (``plan.HypervHost``); nothing is sent yet."""
    return HypervClient(
        host.url,
        host.user,
        password,
        auth=host.auth,
        ca_file=host.ca_file,
    )


def vm_from_answer(host: Any, answer: dict[str, Any]) -> HvVm:
    """An `HvVm` from Get-VmbackupVm.ps1's answer."""
    disks = []
    for d in _list(answer.get("Disks")):
        chain = _list(d.get("Chain"))
        disks.append(
            HvDisk(
                name=d["Name"],
                path=d["Path"],
                chain=tuple(f["Path"] for f in chain),
                size=int(chain[0]["Size"]) if chain else 0,
                volume=volume_of(d["Path"]),
            )
        )
    volumes = tuple(_list(answer.get("Volumes")))
    backup = answer.get("Backup") or {}
    return HvVm(
        name=answer["Name"],
        host=host.name,
        id=str(answer["Id"]),
        state=int(answer["State"]),
        backup_enabled=bool(backup.get("Enabled")),
        volumes=volumes,
        volume_keys=tuple(dict.fromkeys(volume_key(host, v) for v in volumes)),
        disks=tuple(disks),
        config_files=tuple(_list(answer.get("ConfigFiles"))),
        skipped_disks=tuple(
            SkippedDisk(str(d["Name"]), str(d.get("Reason") or "not readable from a shadow copy"))
            for d in _list(answer.get("SkippedDisks"))
        ),
        generation=int(answer["Generation"]) if answer.get("Generation") is not None else None,
        version=str(answer["Version"]) if answer.get("Version") is not None else None,
        cpus=int(answer["ProcessorCount"]) if answer.get("ProcessorCount") is not None else None,
        memory_mb=int(answer["MemoryStartup"]) >> 20 if answer.get("MemoryStartup") is not None else None,
        nics=tuple(
            (n.get("SwitchName") or None, n.get("MacAddress") or None) for n in _list(answer.get("NetworkAdapters"))
        ),
        configuration_location=answer.get("ConfigurationLocation"),
    )


def describe_vm(client: HypervClient, host: Any, name: str) -> HvVm:
    """One VM as the host sees it now (`HypervVmNotFoundError` if it is gone)."""
    return vm_from_answer(host, client.run_script("Get-VmbackupVm.ps1", {"VMName": name}))


def volume_groups(vms: list[HvVm]) -> list[list[HvVm]]:
    """The VMs of one host in groups whose files share volumes (transitively).

    One shadow copy set per group freezes each VM of it once: the Hyper-V
    writer quiesces every running VM with files on a set's volumes, so N VMs
    on one volume in N sets are N^2 quiesces, in one set N. Groups keep the
    order of ``vms`` (by first member), and each group's VMs their order.
    """
    parent = list(range(len(vms)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, vm in enumerate(vms):
        for v in vm.volumes:
            j = owner.setdefault(v.lower(), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[HvVm]] = {}
    for i, vm in enumerate(vms):
        groups.setdefault(find(i), []).append(vm)
    return list(groups.values())


def _match(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def select_vms(client: HypervClient, host: Any, selection: Any, *, strict: bool = True) -> list[HvVm]:
    """The host's VMs that ``selection`` picks, sorted by name.

    ``selection.vms`` and ``selection.hosts`` patterns (wildcards ``* ? [..]``)
    match VM names and the plan's host name; ``folders``, ``clusters`` and
    ``tags`` match no Hyper-V VM; ``exclude`` removes by VM name.

    Raises:
        HypervVmNotFoundError: a literal name (no wildcard) in ``selection.vms``
            is not on this host (exit 2), unless ``strict`` is False (a plan
            with several hosts or hypervisors checks literal names over all of
            them: `missing_literals`).
    """
    answer = client.run_script("Get-VmbackupVmList.ps1")
    names = [v["Name"] for v in _list((answer or {}).get("VMs"))]
    if strict:
        missing = missing_literals(selection, names)
        if missing:
            raise HypervVmNotFoundError(
                f"VM {', '.join(missing)} does not exist on Hyper-V host {host.name}", "VmNotFound"
            )
    host_hit = _match(host.name, list(selection.hosts))
    chosen = [
        n for n in names if not _match(n, list(selection.exclude)) and (host_hit or _match(n, list(selection.vms)))
    ]
    return [describe_vm(client, host, n) for n in sorted(chosen, key=str.lower)]


def missing_literals(selection: Any, names: list[str]) -> list[str]:
    """The literal names of ``selection.vms`` that none of ``names`` is (case-insensitive)."""
    have = {n.lower() for n in names}
    return [p for p in selection.vms if not _WILDCARD.search(p) and p.lower() not in have]


def _list(v: Any) -> list:
    """PowerShell gives one object where it had a list of one; None for none."""
    if v is None:
        return []
    return v if isinstance(v, list) else [v]
