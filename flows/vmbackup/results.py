"""What one VM's backup gives back, for every hypervisor: a row of the report.

`VmResult` is the same for vSphere and Hyper-V, and the one definition of
the row: the JSON fields, the table columns and the events' payload derive
from its fields (docs/flows.md lists them); `DiskProgress` sums the progress of a VM's disks read at once, and
`read_disks` reads them at once into one backup point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def col(
    default: Any = None,
    *,
    factory: Callable[[], Any] | None = None,
    title: str | None = None,
    width: int = 10,
    table: bool = True,
    event: bool = True,
) -> Any:
    """A field of :class:`VmResult` and where it shows besides the JSON row
    (every field is in it): ``title``/``width``, a column of the command
    line's table (``vmbackup backup`` without ``--json``); ``table``, a column
    of the run's table artifact; ``event``, a key of the VM's event payload."""
    meta = {"title": title, "width": width, "table": table, "event": event}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class VmResult:
    """One VM's row: the single definition of what ``vmbackup backup --json``
    prints per VM, the table columns (command line and artifact), the
    events' payload (``row_fields``, ``table_columns``, ``text_columns``,
    ``event_fields`` below derive them). A new column is one field here."""

    vm: str = field(metadata={"title": "VM", "width": 20, "table": True, "event": False})  # the VM's name (a label)
    hypervisor: str = col("", title="HYPERVISOR", width=10)  # "vsphere" or "hyperv"
    status: str = col("ok", title="STATUS", width=6)  # "ok" or "failed"
    backup_id: str | None = col(title="BACKUP", width=26)
    mode: str | None = col(title="MODE", width=11)  # "full" or "incremental"
    full_reason: str | None = col()  # a full always says why
    transport: str | None = col(title="TRANSPORT", width=9)  # vSphere: hotadd|direct|nbd; Hyper-V: local|share
    consistency: str | None = col(title="CONSISTENCY", width=11)  # "application", "crash" or "powered-off"
    bytes_read: int = col(0, title="READ", width=10)
    bytes_stored: int = col(0, title="STORED", width=10)
    seconds: float = col(0.0, title="SECONDS", width=7)
    host: str | None = col()
    agent: str | None = col()
    error: str | None = col()
    vm_id: str | None = col()  # vSphere config.instanceUuid, Hyper-V VM Id: which VM it is
    skipped_disks: list[dict[str, str]] = col(factory=list)  # [{"disk", "reason"}] not backed up
    repository: str = col("", table=False, event=False)  # an event's related resource
    datastores: list[str] = col(factory=list, table=False, event=False)  # vSphere datastores; Hyper-V volume keys
    transport_detail: str | None = col(table=False)  # e.g. "through linked clone <name>"
    consistency_note: str | None = col(table=False)  # why not application-consistent, when it is not
    snapshot_seconds: float = col(0.0, table=False)  # how long the snapshot (or shadow copy) existed
    read_seconds: float = col(0.0, table=False)
    disks: list[dict[str, Any]] = col(factory=list, table=False, event=False)
    limit_wait_seconds: float | None = col(table=False, event=False)  # the task's wait for its limits
    held_seconds: float | None = col(table=False, event=False)  # how long it held them

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


@dataclass
class RestoreResult:
    """One VM's restore row (``vmbackup restore --json``'s ``vms[]``, the
    ``restore_vm`` and ``drill`` flows' tables and events): the one definition,
    as :class:`VmResult` is for backups. ``seconds`` is the VM's RTO."""

    vm: str = field(metadata={"title": "VM", "width": 20, "table": True, "event": False})  # the source VM's name
    hypervisor: str = col("", title="HYPERVISOR", width=10)  # the target's: "vsphere" or "hyperv"
    status: str = col("ok", title="STATUS", width=6)  # "ok" or "failed"
    point: str | None = col(title="POINT", width=26)  # the backup id restored
    restored_as: str | None = col(title="RESTORED AS", width=20)
    host: str | None = col(title="HOST", width=10)
    seconds: float = col(0.0, title="SECONDS", width=7)  # the RTO: request to VM ready (powered on if asked)
    error: str | None = col()
    location: str | None = col()  # the datastore (vSphere) or folder (Hyper-V) written to
    vm_id: str | None = col()  # the restored VM's id
    source_hypervisor: str | None = col(table=False)  # differs from ``hypervisor`` across hypervisors
    in_place: bool = col(False, table=False)
    transport: str | None = col(table=False)  # "hotadd", "folder"; "share", "local"
    powered_on: bool = col(False, table=False)
    bytes_written: int = col(0, table=False)
    # [{disk, bytes_written, seconds}], and restored_as: the disk's name on the VM where it moved (no such bus)
    disks: list[dict[str, Any]] = col(factory=list, table=False, event=False)
    changes: list[str] = col(factory=list, table=False)  # what differs from the source, and why
    warnings: list[str] = col(factory=list, table=False)
    verified: bool | None = col(table=False)  # a drill: the restored disks equal the point
    agent: str | None = col(table=False, event=False)
    repository: str = col("", table=False, event=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Columns computed from a row, shown in the artifact table and the event
# payload after ``seconds``: (name, function of the row) in reports.py.
COMPUTED = ("mb_per_s", "dedup_ratio")


def row_fields(cls: type = VmResult) -> tuple[str, ...]:
    """Every key of a JSON row (``vmbackup backup --json``), in order."""
    return tuple(f.name for f in fields(cls))


def empty_row(cls: type = VmResult, **values: Any) -> dict[str, Any]:
    """A row with every field at its default, then ``values`` (a failed row
    before any work: ``status``, ``error``...)."""
    row = {}
    for f in fields(cls):
        if f.default is not MISSING:
            row[f.name] = f.default
        elif f.default_factory is not MISSING:
            row[f.name] = f.default_factory()
        else:
            row[f.name] = None
    row.update(values)
    return row


def _with_computed(names: list[str]) -> tuple[str, ...]:
    at = names.index("seconds") + 1 if "seconds" in names else len(names)
    return tuple(names[:at] + list(COMPUTED) + names[at:])


def table_columns(cls: type = VmResult) -> tuple[str, ...]:
    """The columns of the run's table artifact."""
    return _with_computed([f.name for f in fields(cls) if f.metadata.get("table", True)])


def event_fields(cls: type = VmResult) -> tuple[str, ...]:
    """The keys of a VM event's payload (the VM, host, agent, datastores and
    repository are its resources)."""
    return _with_computed([f.name for f in fields(cls) if f.metadata.get("event", True)])


def text_columns(cls: type = VmResult) -> list[tuple[str, str, int]]:
    """The command line's table: (field, title, width)."""
    return [(f.name, f.metadata["title"], f.metadata["width"]) for f in fields(cls) if f.metadata.get("title")]


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
