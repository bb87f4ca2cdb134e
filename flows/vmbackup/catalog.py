"""The repository's backups (read through the mover as typed objects)."""

from __future__ import annotations

from typing import Any

from . import _mover
from ._mover import BackupInfo, UntrustedManifest

__all__ = ["BackupInfo", "UntrustedManifest", "list_backups", "names_of", "summary", "untrusted_summary"]


def _attribute(b: BackupInfo, key: str) -> str | None:
    a = b.attributes
    v = a.get(key) if isinstance(a, dict) else None
    return v if isinstance(v, str) and v else None


def names_of(b: BackupInfo) -> set[str]:
    """The names a backup answers to: its ``vm`` label and the VM's name when
    the point was taken (the ``vm`` attribute; they differ for a renamed VM's
    incrementals, whose label stays the chain's)."""
    return {b.vm} | ({n} if (n := _attribute(b, "vm")) else set())


def summary(b: BackupInfo) -> dict[str, Any]:
    """The JSON shape `vmbackup snapshots --json` prints for a backup.

    ``vm`` is the repository's label; ``vm_id`` (the hypervisor's id of the
    VM) and ``host`` come from the attributes, None when the point has none
    (``backup-disk``, points written before ids were stored): they tell two
    VMs of one name apart.
    """
    return {
        "id": b.id,
        "vm": b.vm,
        "vm_id": _attribute(b, "vm_id"),
        "host": _attribute(b, "host"),
        "created": b.created,
        "parent": b.parent,
        "disk_size": b.size,
        "bytes_stored": b.bytes_stored,
        "disks": [
            {
                "name": d.name,
                "size": d.disk_size,
                "mode": d.mode,
                "source": d.source,
                "change_id": d.change_id,
                "bytes_read": d.bytes_read,
                "bytes_stored": d.bytes_stored,
            }
            for d in b.disks
        ],
        "attributes": b.attributes,
    }


def untrusted_summary(u: UntrustedManifest) -> dict[str, Any]:
    """The JSON shape `vmbackup snapshots --json` prints for an untrusted manifest (id = its file name)."""
    out: dict[str, Any] = {"id": u.file_id, "vm": None, "created": None} if u.info is None else summary(u.info)
    return out | {"id": u.file_id, "trusted": False, "problem": u.problem}


def list_backups(repo: str, vm: str | None = None) -> tuple[list[BackupInfo], list[UntrustedManifest]]:
    """Trusted backups oldest first (optionally of one VM), and the untrusted manifests.

    ``vm`` matches a backup's label or the VM's name when it was taken
    (:func:`names_of`): every VM of that name, whatever its id. With ``vm``,
    untrusted manifests whose VM cannot be read are returned too: they may
    be that VM's.
    """
    infos, untrusted = _mover.list_backups(repo)
    if vm is not None:
        infos = [b for b in infos if vm in names_of(b)]
        untrusted = [u for u in untrusted if u.info is None or vm in names_of(u.info)]
    return infos, untrusted
