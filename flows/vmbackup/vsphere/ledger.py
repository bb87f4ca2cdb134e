"""The cleanup ledger: what a run made in vSphere, written down before it is made.

One JSON file per run and VM in ``<repository>/ledger/`` (shared by every agent
writing to the repository), replaced atomically (write, fsync, rename, fsync
the directory) at each step. A step is recorded *before* it is taken, so a
process killed between the two leaves an entry that reconcile or the sweeper
can follow; what the entry names may not exist, and removing it is then a
no-op. The entry is deleted once everything it names is gone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def ledger_dir(repository: str | os.PathLike) -> Path:
    return Path(repository) / "ledger"


@dataclass
class Entry:
    """What one run did to one VM."""

    run_id: str
    vm: str
    vm_moref: str
    pid: int = field(default_factory=os.getpid)
    machine: str = field(default_factory=socket.gethostname)
    created_unix: float = field(default_factory=time.time)
    attempt: str | None = None  # this try of the run (snapshots.new_attempt); a retry has another
    snapshot: dict[str, str] | None = None  # {"name", "moref", "create_task", "remove_task"}
    attachments: list[dict[str, Any]] = field(default_factory=list)  # {"agent", "agent_vm", "file"}
    clones: list[dict[str, str]] = field(default_factory=list)  # {"name", "moref"}
    nbd: list[dict[str, Any]] = field(default_factory=list)  # {"pid", "socket"}
    path: Path | None = None

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        return json.dumps(d, sort_keys=True, indent=1)

    def alive_elsewhere(self) -> bool:
        """True if the run that wrote this entry is still running (on this machine, another process)."""
        if self.machine != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Ledger:
    """The ledger directory of a repository."""

    def __init__(self, repository: str | os.PathLike):
        self.dir = ledger_dir(repository)

    def path(self, run_id: str, vm: str, attempt: str | None = None) -> Path:
        # One file per attempt: a retry never overwrites what an earlier attempt left.
        att = f"--{_safe(attempt)}" if attempt else ""
        return self.dir / f"{_safe(vm)}--{_safe(run_id)}{att}.json"

    def write(self, entry: Entry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = entry.path or self.path(entry.run_id, entry.vm, entry.attempt)
        entry.path = path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(entry.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, entry: Entry) -> None:
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    def entries(self, vm: str | None = None) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        out = []
        pattern = f"{_safe(vm)}--*.json" if vm is not None else "*.json"
        for p in sorted(self.dir.glob(pattern)):
            try:
                d = json.loads(p.read_text())
                e = Entry(**d)
            except (OSError, ValueError, TypeError):
                continue  # a torn or foreign file: not ours to act on
            if vm is not None and e.vm != vm:
                continue
            e.path = p
            out.append(e)
        return out
