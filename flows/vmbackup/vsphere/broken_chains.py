"""Chains the CBT audit found broken: the next backup of such a VM is a full.

One small JSON file per VM in ``<repository>/broken-chains/``, named by the
VM's id (``config.instanceUuid``: a renamed VM keeps its mark, as it keeps
its chain) or, without one, its name (next to the
ledger, and for the same reason: every agent that backs the VM up reads the
same repository, so whichever agent takes the next backup sees the mark; a
file on the auditing machine would not). Written atomically (write, fsync,
rename, fsync the directory). The backup reads it before planning its disks
(``cbt.plan_disks(..., chain_broken=mark.reason)``) and clears it once a full
backup is committed; :func:`clear` removes the mark only if it is still the
one that backup read, so an audit that found a new mismatch meanwhile is not
lost.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def marks_dir(repository: str | os.PathLike) -> Path:
    return Path(repository) / "broken-chains"


@dataclass
class BrokenChain:
    """The audit's finding on one VM's chain."""

    vm: str
    point: str  # the backup whose content differed from the VM's disk
    reason: str  # what a backup's full_reason says
    vm_id: str | None = None
    run_id: str | None = None
    created_unix: float = field(default_factory=time.time)
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # {"disk", "offset", "length"}
    path: Path | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "path"}, sort_keys=True, indent=1)


def _path(repository: str | os.PathLike, key: str) -> Path:
    return marks_dir(repository) / f"{_safe(key)}.json"


def mark(repository: str | os.PathLike, chain: BrokenChain) -> Path:
    """Records that ``chain.vm``'s chain is broken (replaces an older mark of the VM)."""
    d = marks_dir(repository)
    d.mkdir(parents=True, exist_ok=True)
    path = _path(repository, chain.vm_id or chain.vm)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(chain.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    chain.path = path
    return path


def read(repository: str | os.PathLike, vm: str, vm_id: str | None = None) -> BrokenChain | None:
    """The VM's mark, or None: the one with its ``vm_id`` when given (a mark
    without an id: by name), else the one with its name. A torn file of the
    VM still breaks the chain (a full is the safe side), with a reason that
    says so. Marks are rare: the directory is read whole."""
    d = marks_dir(repository)
    if not d.is_dir():
        return None
    mine = {_safe(k) for k in (vm_id, vm) if k}
    for path in sorted(d.glob("*.json")):
        try:
            chain = BrokenChain(**json.loads(path.read_text()))
        except FileNotFoundError:
            continue  # cleared meanwhile
        except (OSError, ValueError, TypeError):
            if path.stem not in mine:
                continue
            chain = BrokenChain(vm=vm, point="?", reason=f"the CBT audit's mark {path} cannot be read", vm_id=vm_id)
        if vm_id and chain.vm_id:
            if chain.vm_id != vm_id:
                continue  # another VM of the same name (another folder or host)
        elif chain.vm != vm:
            continue
        chain.path = path
        return chain
    return None


def clear(repository: str | os.PathLike, chain: BrokenChain) -> bool:
    """Removes the mark a backup read, once that backup (a full) is committed;
    False if a newer mark has replaced it since (it stays for the next backup)."""
    now = read(repository, chain.vm, chain.vm_id)
    if now is None or now.path is None:
        return False
    if (now.point, now.created_unix, now.run_id) != (chain.point, chain.created_unix, chain.run_id):
        return False
    now.path.unlink(missing_ok=True)
    return True


def reason_of(point: str, mismatches: list[dict[str, Any]]) -> str:
    """The full reason a backup gives for a chain the audit found broken."""
    where = ", ".join(f"{m['disk']} at {m['offset']}" for m in mismatches[:3])
    more = f" and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
    return f"CBT audit: backup {point} differs from the disk where CBT reported no change ({where}{more})"
