"""The incremental contract a backup point carries: typed and versioned.

A point's ``attributes`` (JSON in its manifest) tell the next backup of the
VM what it needs: which VM it is (``vm_id``: vSphere ``config.instanceUuid``,
Hyper-V VM Id; ``vm_moref``), whether it was a full and why, when the last
full was (``last_full_unix``, for periodic fulls) and each disk's change id.
:class:`PointMeta` is that contract; both adapters write it through the one
procedure (``hypervisors/procedure.py``) and it is read back here, never with
``.get`` elsewhere.

Versions (``meta_version`` in the attributes):

- 0: points written before the contract was versioned (no ``meta_version``).
  They are ours, so :func:`PointMeta.from_attributes` reads them with a
  documented parser (``_from_v0``): ``hypervisor`` from ``tool``
  (``vmbackup vsphere`` / ``vmbackup hyperv``), ``vm_id`` when present (Hyper-V
  wrote it; vSphere did not), ``last_full_unix`` falling back to
  ``snapshot_unix``. Existing repositories keep their chains.
- 1: this module's :data:`VERSION`: every field below, checked on read.

A newer version than this code knows, or attributes that cannot be read as
their version, raise :class:`PointMetaError`; the next backup is then a full
whose ``full_reason`` says why (never a silent full, never a wrong
incremental).

The attributes stay one flat JSON object (the contract's fields plus the
adapter's own, ``extra``), so readers of older versions of vmbackup and of
``vmbackup snapshots --json`` see the keys they always saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import PointMetaError

VERSION = 1
VERSION_KEY = "meta_version"
# The contract's keys; every other attribute is the adapter's (``extra``).
_KEYS = (
    VERSION_KEY,
    "hypervisor",
    "vm",
    "vm_id",
    "vm_moref",
    "mode",
    "full_reason",
    "snapshot_unix",
    "last_full_unix",
    "disks",
)
_TOOLS = {"vmbackup vsphere": "vsphere", "vmbackup hyperv": "hyperv"}


@dataclass
class PointMeta:
    """The incremental contract of one backup point (version :data:`VERSION`)."""

    hypervisor: str  # "vsphere" or "hyperv"
    vm: str  # the VM's name when the point was taken (the repository's label)
    vm_id: str | None  # vSphere config.instanceUuid, Hyper-V VM Id; None in v0 vSphere points
    mode: str  # "full" or "incremental"
    full_reason: str | None  # a full's reason (never empty for a full written at version 1)
    snapshot_unix: float  # the point in time
    last_full_unix: float  # the point in time of the chain's last full
    disks: list[dict[str, Any]]  # per disk: name, capacity, change_id, and the adapter's own keys
    vm_moref: str | None = None  # vSphere: the VM's managed object id
    extra: dict[str, Any] = field(default_factory=dict)  # the adapter's other attributes
    version: int = VERSION

    def change_ids(self) -> dict[str, str | None]:
        """Each disk's change id (None when the disk has none)."""
        return {d["name"]: d.get("change_id") for d in self.disks}

    def to_attributes(self) -> dict[str, Any]:
        """The flat JSON object stored as the point's attributes."""
        out = {k: v for k, v in self.extra.items() if k not in _KEYS}
        out.update(
            {
                VERSION_KEY: self.version,
                "hypervisor": self.hypervisor,
                "vm": self.vm,
                "vm_id": self.vm_id,
                "vm_moref": self.vm_moref,
                "mode": self.mode,
                "full_reason": self.full_reason,
                "snapshot_unix": self.snapshot_unix,
                "last_full_unix": self.last_full_unix,
                "disks": [dict(d) for d in self.disks],
            }
        )
        return out

    @classmethod
    def from_attributes(cls, attrs: Any, *, vm: str = "", created_unix: float = 0.0) -> PointMeta:
        """Reads a point's attributes, of version 0 or 1.

        Args:
            attrs: the attributes as ``list_backups`` gives them.
            vm: the point's ``vm`` label (version 0 did not store the name).
            created_unix: the point's creation time (version 0's fallback
                for the point in time).

        Raises:
            PointMetaError: a newer version, or attributes that are not what
                their version says.
        """
        if not isinstance(attrs, dict):
            raise PointMetaError(f"the previous point's metadata is not a JSON object ({type(attrs).__name__})")
        version = attrs.get(VERSION_KEY)
        if version is None:
            return _from_v0(attrs, vm, created_unix)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PointMetaError(f"the previous point's metadata has an invalid version ({version!r})")
        if version > VERSION:
            raise PointMetaError(
                f"the previous point's metadata is version {version}, newer than this vmbackup reads ({VERSION})"
            )
        return _from_v1(attrs)


def _bad(what: str) -> PointMetaError:
    return PointMetaError(f"the previous point's metadata cannot be read: {what}")


def _str(attrs: dict, key: str, *, optional: bool) -> str | None:
    v = attrs.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise _bad(f"{key} is {v!r}")
    return v


def _time(attrs: dict, key: str) -> float:
    v = attrs.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise _bad(f"{key} is {v!r}")
    return float(v)


def _disks(attrs: dict) -> list[dict[str, Any]]:
    disks = attrs.get("disks")
    if not isinstance(disks, list):
        raise _bad(f"disks is {type(disks).__name__}, not a list")
    for d in disks:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise _bad(f"a disk entry has no name ({d!r:.80})")
        if d.get("change_id") is not None and not isinstance(d["change_id"], str):
            raise _bad(f"disk {d['name']}'s change_id is {d['change_id']!r}")
    return [dict(d) for d in disks]


def _mode(attrs: dict) -> str:
    mode = attrs.get("mode")
    if mode not in ("full", "incremental"):
        raise _bad(f"mode is {mode!r}")
    return mode


def _extra(attrs: dict) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in _KEYS}


def _from_v1(attrs: dict) -> PointMeta:
    hypervisor = _str(attrs, "hypervisor", optional=False)
    if hypervisor not in ("vsphere", "hyperv"):
        raise _bad(f"hypervisor is {hypervisor!r}")
    return PointMeta(
        hypervisor=hypervisor,
        vm=_str(attrs, "vm", optional=False) or "",
        vm_id=_str(attrs, "vm_id", optional=True),
        vm_moref=_str(attrs, "vm_moref", optional=True),
        mode=_mode(attrs),
        full_reason=_str(attrs, "full_reason", optional=True),
        snapshot_unix=_time(attrs, "snapshot_unix"),
        last_full_unix=_time(attrs, "last_full_unix"),
        disks=_disks(attrs),
        extra=_extra(attrs),
        version=VERSION,
    )


def _from_v0(attrs: dict, vm: str, created_unix: float) -> PointMeta:
    """Version 0: what vmbackup wrote before ``meta_version`` (up to
    December 2026). vSphere: ``tool: "vmbackup vsphere"``, ``vm_moref``, no
    ``vm_id``; Hyper-V: ``tool: "vmbackup hyperv"``, ``hypervisor``,
    ``vm_id``. Both: ``mode``, ``full_reason``, ``snapshot_unix``,
    ``last_full_unix``, ``disks`` (name, capacity, change_id...)."""
    hypervisor = attrs.get("hypervisor") or _TOOLS.get(str(attrs.get("tool")))
    if hypervisor not in ("vsphere", "hyperv"):
        raise _bad(f"version 0 metadata written by {attrs.get('tool')!r}")
    snap = attrs.get("snapshot_unix", created_unix)
    with_times = {"snapshot_unix": snap, "last_full_unix": attrs.get("last_full_unix", snap)}
    return PointMeta(
        hypervisor=hypervisor,
        vm=vm,
        vm_id=_str(attrs, "vm_id", optional=True),
        vm_moref=_str(attrs, "vm_moref", optional=True),
        mode=_mode(attrs),
        full_reason=_str(attrs, "full_reason", optional=True),
        snapshot_unix=_time(with_times, "snapshot_unix"),
        last_full_unix=_time(with_times, "last_full_unix"),
        disks=_disks(attrs),
        extra=_extra(attrs),
        version=0,
    )


@dataclass
class Previous:
    """A VM's latest point: the base of its next backup.

    ``meta`` is None when its metadata cannot be used; ``unusable`` then says
    why, and the next backup is a full with that reason.
    """

    backup_id: str
    created_unix: float
    disks: list[dict[str, Any]]  # as the manifest has them: name, size, change_id
    meta: PointMeta | None
    unusable: str | None = None
    label: str = ""  # the point's ``vm`` label in the repository

    def full_reason(self) -> str | None:
        """The reason the next backup must be a full because of this point, or None."""
        if self.meta is not None:
            return None
        return f"{self.unusable} (point {self.backup_id}): full"

    def as_dict(self) -> dict[str, Any]:
        """The shape ``vsphere.cbt.plan_disks`` reads."""
        return {
            "id": self.backup_id,
            "created_unix": self.created_unix,
            "attributes": self.meta.to_attributes() if self.meta is not None else {},
            "disks": self.disks,
        }


def _vm_id_of(b: Any) -> str | None:
    a = b.attributes
    v = a.get("vm_id") if isinstance(a, dict) else None
    return v if isinstance(v, str) and v else None


def latest(repository: str, name: str, vm_id: str | None) -> Previous | None:
    """The newest point of a VM, or None.

    Found by ``vm_id`` when the VM has one and points carry it, so a renamed
    VM keeps its chain and two VMs with one name keep two; a VM with no point
    of its id falls back to points of its name that carry no id (written
    before ids were stored: version 0 vSphere points).
    """
    from . import _mover

    infos, _untrusted = _mover.list_backups(repository)
    if vm_id:
        mine = [b for b in infos if _vm_id_of(b) == vm_id]
        if not mine:
            mine = [b for b in infos if b.vm == name and _vm_id_of(b) is None]
    else:
        mine = [b for b in infos if b.vm == name]
    if not mine:
        return None
    b = max(mine, key=lambda b: b.created_unix)
    disks = [{"name": d.name, "size": d.disk_size, "change_id": d.change_id} for d in b.disks]
    try:
        meta: PointMeta | None = PointMeta.from_attributes(b.attributes, vm=b.vm, created_unix=b.created_unix)
        why = None
    except PointMetaError as e:
        meta, why = None, str(e)
    return Previous(b.id, b.created_unix, disks, meta, why, b.vm)
