"""The repository's backups as Python objects (read through the mover)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import _mover


@dataclass(frozen=True)
class BackupInfo:
    id: str
    vm: str
    created: str
    created_unix: float
    parent: str | None
    disks: tuple[dict[str, Any], ...]
    config: Any
    attributes: Any

    @classmethod
    def from_json(cls, text: str) -> BackupInfo:
        m = json.loads(text)
        return cls(
            id=m["id"],
            vm=m["vm"],
            created=m["created"],
            created_unix=m["created_unix"],
            parent=m.get("parent"),
            disks=tuple(m["disks"]),
            config=m.get("config"),
            attributes=m.get("attributes"),
        )

    @property
    def size(self) -> int:
        return sum(d["size"] for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.get("bytes_stored", 0) for d in self.disks)

    def summary(self) -> dict[str, Any]:
        """The JSON shape `vmbackup snapshots --json` prints for a backup."""
        return {
            "id": self.id,
            "vm": self.vm,
            "created": self.created,
            "parent": self.parent,
            "disk_size": self.size,
            "bytes_stored": self.bytes_stored,
            "disks": [
                {k: d.get(k) for k in ("name", "size", "mode", "source", "change_id", "bytes_read", "bytes_stored")}
                for d in self.disks
            ],
            "attributes": self.attributes,
        }


def list_backups(repo: str, vm: str | None = None) -> tuple[list[BackupInfo], list[str]]:
    """Backups oldest first (optionally of one VM), and messages for unreadable manifests."""
    good, bad = _mover.list_backups(repo)
    infos = [BackupInfo.from_json(t) for t in good]
    if vm is not None:
        infos = [b for b in infos if b.vm == vm]
    return infos, bad
