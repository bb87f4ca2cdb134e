"""Changed block tracking: switch it on, ask what changed, decide full or incremental."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from ..errors import ChangeIdRejected
from .faults import hypervisor_error
from .inventory import DiskInfo
from .tasks import run_task


def enable(vm: Any, name: str, timeout: float) -> bool:
    """Switches CBT on if it is off. True if it was off (the next backup must be full)."""
    return prepare(vm, name, timeout).just_enabled


@dataclass(frozen=True)
class CbtStart:
    """What ``prepare`` found and did: ``just_enabled`` (this backup is full
    for that), ``off_reason`` (CBT stays off: the full's reason), and
    ``enabled_clean`` (we switched it on with no snapshot present: its ``*``
    areas are then valid, Broadcom KB 320557)."""

    just_enabled: bool = False
    off_reason: str | None = None
    enabled_clean: bool = False


def prepare(vm: Any, name: str, timeout: float) -> CbtStart:
    """Switches CBT on if it is off, unless the VM has snapshots.

    VMware does not support switching CBT on while a VM has snapshots (the
    tracker never learns what the base disks hold, so its answers, ``*``
    first, are incomplete: Broadcom KB 320557). Then CBT stays off and the
    backup is a full read of every disk, with the reason. Call it after
    reconcile, so that only snapshots not ours remain.
    """
    if vm.config.changeTrackingEnabled:
        return CbtStart()
    snap = vm.snapshot
    if snap is not None and snap.rootSnapshotList:
        return CbtStart(
            off_reason=f"CBT is off and VM {name} has snapshots (VMware does not support switching CBT on then)"
        )
    spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
    run_task(lambda: vm.ReconfigVM_Task(spec=spec), f"enabling CBT on VM {name}", timeout)
    return CbtStart(just_enabled=True, enabled_clean=True)


def epoch(change_id: str | None) -> str:
    """The UUID part of a change id (``52 ab ... 9f/17`` -> ``52 ab ... 9f``): it changes when CBT is reset."""
    return (change_id or "").rpartition("/")[0]


def star_epochs(disks: Any, previous: dict[str, Any] | None, start: CbtStart) -> dict[str, str]:
    """Per disk, the CBT epoch under which its ``*`` areas are valid, if known.

    Valid (documented) only on VMFS and when CBT was switched on with no
    snapshot present. We know that only when we switched it on ourselves
    (``start.enabled_clean``), or a previous point recorded it for the same
    epoch (the manifest attribute ``cbt_star_epochs``, which this returns
    for the next point). CBT switched on by someone else is not trusted.
    """
    recorded = ((previous or {}).get("attributes") or {}).get("cbt_star_epochs") or {}
    out = {}
    for d in disks:
        e = epoch(d.change_id)
        if e and (start.enabled_clean or recorded.get(d.name) == e):
            out[d.name] = e
    return out


def star_filter_reason(disk: DiskInfo, trusted: dict[str, str]) -> str | None:
    """Why CBT's ``*`` areas must not filter a full of ``disk`` (None: they may)."""
    if disk.datastore_type.upper() != "VMFS":
        return f"datastore {disk.datastore} is {disk.datastore_type or 'of unknown type'}, not VMFS"
    if trusted.get(disk.name) != epoch(disk.change_id) or not trusted.get(disk.name):
        return "CBT was not switched on by vmbackup with no snapshot present"
    return None


def changed_areas(vm: Any, snapshot: Any, disk: DiskInfo, change_id: str) -> list[tuple[int, int]]:
    """The (start, length) areas changed since ``change_id`` (``*``: every allocated area), to the disk's end.

    vSphere answers a window at a time (``startOffset`` + ``length``), so ask
    again from the window's end until the capacity is covered.
    """
    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < disk.capacity:
        try:
            info = vm.QueryChangedDiskAreas(
                snapshot=snapshot, deviceKey=disk.key, startOffset=offset, changeId=change_id
            )
        except vim.fault.FileFault as e:
            raise ChangeIdRejected(f"change id {change_id} rejected: {type(e).__name__}") from e
        except vmodl.fault.InvalidArgument as e:
            # A change id of another CBT epoch (CBT was reset) is InvalidArgument.
            if change_id != "*" and (e.invalidProperty or "changeId") == "changeId":
                raise ChangeIdRejected(f"change id {change_id} rejected: InvalidArgument") from e
            raise hypervisor_error(f"QueryChangedDiskAreas for disk {disk.name} of VM {vm.name}", e) from e
        except vmodl.MethodFault as e:
            raise hypervisor_error(f"QueryChangedDiskAreas for disk {disk.name} of VM {vm.name}", e) from e
        areas += [(int(a.start), int(a.length)) for a in info.changedArea or []]
        end = int(info.startOffset) + int(info.length)
        if end <= offset:  # a server that makes no progress would loop forever
            raise hypervisor_error(
                f"QueryChangedDiskAreas for disk {disk.name}", RuntimeError(f"no progress at offset {offset}")
            )
        offset = end
    return areas


@dataclass
class DiskPlan:
    """How one disk is read: incremental from ``base_change_id``, or full (with the reason)."""

    disk: DiskInfo
    full_reason: str | None
    base_change_id: str | None = None


def plan_disks(
    disks: tuple[DiskInfo, ...],
    previous: dict[str, Any] | None,
    *,
    cbt_just_enabled: bool,
    full_every_days: int | None,
    now: float | None = None,
    cbt_off_reason: str | None = None,
    chain_broken: str | None = None,
) -> tuple[list[DiskPlan], str | None]:
    """Decides per disk full or incremental; returns the plans and the VM-wide full reason, if any.

    ``previous`` is the VM's latest backup metadata (manifest JSON) or None.
    ``chain_broken``: the reason of the CBT audit's mark on the VM's chain
    (``broken_chains.read(repo, vm).reason``), if any: the backup is then a full.
    """
    now = time.time() if now is None else now
    vm_reason = None
    if previous is None:
        vm_reason = "first backup" + (f"; {cbt_off_reason}" if cbt_off_reason else "")
    elif cbt_off_reason:
        vm_reason = cbt_off_reason
    elif cbt_just_enabled:
        vm_reason = "CBT was off and has been enabled"
    elif chain_broken:
        vm_reason = chain_broken
    elif full_every_days is not None:
        last_full = (previous.get("attributes") or {}).get("last_full_unix", previous.get("created_unix", 0))
        if now - float(last_full) >= full_every_days * 86400:
            vm_reason = f"periodic full (every {full_every_days} days)"
    if vm_reason is not None or previous is None:
        return [DiskPlan(d, vm_reason) for d in disks], vm_reason
    prev_disks = {d["name"]: d for d in previous.get("disks", [])}
    prev_attrs = {d.get("name"): d for d in (previous.get("attributes") or {}).get("disks", [])}
    plans = []
    for d in disks:
        p = prev_disks.get(d.name)
        a = prev_attrs.get(d.name, {})
        if p is None:
            plans.append(DiskPlan(d, "new disk"))
        elif int(p.get("size", 0)) != d.capacity:
            plans.append(DiskPlan(d, f"disk resized from {p.get('size')} to {d.capacity} bytes"))
        elif a.get("uuid") and d.uuid and a["uuid"] != d.uuid:
            plans.append(DiskPlan(d, "disk replaced (another virtual disk uuid)"))
        elif not p.get("change_id"):
            plans.append(DiskPlan(d, "no change id in the previous backup"))
        elif d.change_id and epoch(d.change_id) != epoch(p["change_id"]):
            # CBT was reset since (switched off and on, or its files recreated):
            # the old change id means nothing in the new epoch.
            plans.append(
                DiskPlan(d, f"CBT was reset (change id epoch {epoch(p['change_id'])} -> {epoch(d.change_id)})")
            )
        else:
            plans.append(DiskPlan(d, None, p["change_id"]))
    return plans, None
