"""What one VM's backup gives back, for every hypervisor: a row of the report.

`VmResult` is the same for vSphere and Hyper-V (docs/flows.md lists the
fields); `DiskProgress` sums the progress of a VM's disks read at once, and
`read_disks` reads them at once into one backup point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class VmResult:
    vm: str
    status: str  # "ok" or "failed"
    backup_id: str | None = None
    repository: str = ""
    mode: str | None = None  # "full" or "incremental"
    transport: str | None = None  # vSphere: hotadd|direct|nbd; Hyper-V: local|share
    consistency: str | None = None  # "application" or "crash"
    bytes_read: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0
    error: str | None = None
    host: str | None = None
    agent: str | None = None
    datastores: list[str] = field(default_factory=list)  # vSphere datastores; Hyper-V volume keys
    full_reason: str | None = None
    transport_detail: str | None = None  # e.g. "through linked clone <name>"
    snapshot_seconds: float = 0.0  # how long the snapshot (or shadow copy) existed
    read_seconds: float = 0.0
    disks: list[dict[str, Any]] = field(default_factory=list)
    consistency_note: str | None = None  # why crash consistency, when it is
    skipped_disks: list[dict[str, str]] = field(default_factory=list)  # [{"disk", "reason"}]: never read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set_disks(self, disks: list[dict[str, Any]]) -> None:
        """The disks' rows, and their sums (bytes read and stored, mover seconds)."""
        self.disks = disks
        self.bytes_read = sum(d["bytes_read"] for d in disks)
        self.bytes_stored = sum(d["bytes_stored"] for d in disks)
        self.read_seconds = sum(d["seconds"] for d in disks)

    @classmethod
    def failed(cls, vm: Any, plan: Any, agent: Any, error: BaseException, seconds: float) -> VmResult:
        """A failed row for ``vm`` (a vSphere ``VmInfo`` or a Hyper-V ``HvVm``)."""
        keys = getattr(vm, "datastores", None)
        if keys is None:
            keys = getattr(vm, "volume_keys", ())
        return cls(
            vm=vm.name,
            status="failed",
            repository=str(plan.repository),
            error=str(error),
            host=vm.host,
            agent=agent.name if agent else None,
            datastores=list(keys),
            seconds=seconds,
        )


class DiskProgress:
    """Sums the disks' progress and calls ``progress(done, total)`` about once a second."""

    def __init__(self, progress: Any, total: int):
        self.progress = progress
        self.total = total
        self.done: dict[str, int] = {}
        self.last = 0.0
        self.lock = threading.Lock()

    def for_disk(self, name: str) -> Any:
        def cb(done: int, _total: int) -> None:
            with self.lock:
                self.done[name] = done
                now = time.monotonic()
                if self.progress is None or now - self.last < 1.0:
                    return
                self.last = now
                value = sum(self.done.values())
            self.progress(value, self.total)

        return cb


def read_disks(read: Callable[[T], R], disks: Sequence[T], *, max_workers: int, session: Any) -> list[R]:
    """``read(disk)`` for every disk, ``max_workers`` at once, into one mover
    session (the binding's ``add_disk`` runs without the GIL and without
    holding the session); the results in ``disks``' order.

    When a disk fails (or this thread is interrupted) the backup point is
    lost: the other disks are cancelled (they raise ``CancelledError``
    rather than read on to the end), the session is aborted, and the first
    error is raised."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(read, d) for d in disks]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            error = next((e for f in futures if f in done and (e := f.exception()) is not None), None)
            if error is not None:
                raise error
        except BaseException:
            for f in futures:
                f.cancel()
            session.abort()
            raise
        return [f.result() for f in futures]
