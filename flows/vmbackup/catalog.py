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


@dataclass(frozen=True)
class Untrusted:
    """A manifest that cannot be trusted (damaged, unreadable, or not what its file name says).

    It is never counted as a kept backup and never removed by retention.
    """

    file_id: str
    problem: str
    info: BackupInfo | None

    @property
    def vm(self) -> str | None:
        return self.info.vm if self.info else None

    def summary(self) -> dict[str, Any]:
        """The JSON shape `vmbackup snapshots --json` prints for it (id = its file name)."""
        if self.info is None:
            out: dict[str, Any] = {"id": self.file_id, "vm": None, "created": None}
        else:
            out = self.info.summary() | {"id": self.file_id}
        return out | {"trusted": False, "problem": self.problem}


def list_backups(repo: str, vm: str | None = None) -> tuple[list[BackupInfo], list[Untrusted]]:
    """Trusted backups oldest first (optionally of one VM), and the untrusted manifests.

    With ``vm``, untrusted manifests whose VM cannot be read are returned too:
    they may be that VM's.
    """
    good, bad = _mover.list_backups(repo)
    infos = [BackupInfo.from_json(t) for t in good]
    untrusted = []
    for text in bad:
        u = json.loads(text)
        meta = u.get("metadata")
        untrusted.append(
            Untrusted(u["file_id"], u["problem"], BackupInfo.from_json(json.dumps(meta)) if meta else None)
        )
    if vm is not None:
        infos = [b for b in infos if b.vm == vm]
        untrusted = [u for u in untrusted if u.vm in (vm, None)]
    return infos, untrusted
