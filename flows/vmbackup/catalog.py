"""The repository's backups (read through the mover as typed objects)."""

from __future__ import annotations

from typing import Any

from . import _mover
from ._mover import BackupInfo, UntrustedManifest

__all__ = ["BackupInfo", "UntrustedManifest", "list_backups", "summary", "untrusted_summary"]


def summary(b: BackupInfo) -> dict[str, Any]:
    """The JSON shape `vmbackup snapshots --json` prints for a backup."""
    return {
        "id": b.id,
        "vm": b.vm,
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

    With ``vm``, untrusted manifests whose VM cannot be read are returned too:
    they may be that VM's.
    """
    infos, untrusted = _mover.list_backups(repo)
    if vm is not None:
        infos = [b for b in infos if b.vm == vm]
        untrusted = [u for u in untrusted if u.info is None or u.info.vm == vm]
    return infos, untrusted
