"""The repository's backups (read through the mover as typed objects)."""

from __future__ import annotations

from typing import Any

from . import _mover
from ._mover import BackupInfo

__all__ = ["BackupInfo", "list_backups", "summary"]


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


def list_backups(repo: str, vm: str | None = None) -> tuple[list[BackupInfo], list[str]]:
    """Backups oldest first (optionally of one VM), and messages for unreadable manifests."""
    infos, bad = _mover.list_backups(repo)
    if vm is not None:
        infos = [b for b in infos if b.vm == vm]
    return infos, bad
