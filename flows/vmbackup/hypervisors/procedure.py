"""The backup of one VM, whatever its hypervisor: one procedure, the
adapter's steps (``base.VmSteps``).

reconcile -> describe -> freeze -> expose -> plan the reads -> read every
disk at once into one mover session -> check the freeze still holds ->
commit -> release. Release runs on every path. Its problems after the commit
raise (the point exists, the error names it: someone must clean up); after
a failure they are only logged (the failure says more, and the adapter's
ledger keeps what could not be undone for the next run or the sweeper).

No Prefect here (tests/test_boundaries.py): orchestration calls
:func:`backup_one` inside a task, tests call it directly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import BackupError, HypervisorError
from ..pointmeta import PointMeta, Previous, latest
from ..results import DiskProgress, VmResult, read_disks
from .base import DiskRead, Exposed, Frozen, VmSteps

log = logging.getLogger(__name__)


def backup_one(
    steps: VmSteps,
    *,
    hypervisor: str,
    repository: str,
    agent: str | None,
    disks_per_vm: int,
    cancel: Any = None,
    progress: Callable[[int, int], None] | None = None,
    on_frozen: Callable[[str], None] | None = None,
) -> VmResult:
    """Backs up one VM into one point of ``repository`` through ``steps``.

    Args:
        steps: the adapter's steps for this VM.
        hypervisor: "vsphere" or "hyperv" (the row's and the point's).
        repository: the repository's path.
        agent: the agent's name (for the row).
        disks_per_vm: how many disks are read at once.
        cancel: a mover ``CancelToken``; cancelling stops the reads.
        progress: ``progress(done_bytes, total_bytes)`` about once a second.
        on_frozen: ``on_frozen(label)`` once the point in time exists and
            before any disk is read (the snapshot's name, the shadow copy's id).

    Raises:
        ``vmbackup.errors`` classes (``retryable`` set). A failed release after
        the commit raises with the backup id, keeping the class of the one
        problem (so a dropped session stays retryable).
    """
    from .. import _mover

    t0 = time.monotonic()
    steps.reconcile()
    result = VmResult(vm=steps.name, hypervisor=hypervisor, status="ok", repository=repository, agent=agent)
    steps.describe(result)
    previous = latest(repository, steps.name, result.vm_id)
    frozen: Frozen | None = None
    snap_t0 = time.monotonic()
    session = None
    body_error: BaseException | None = None
    try:
        frozen = steps.freeze()
        snap_t0 = time.monotonic()
        result.consistency = frozen.consistency
        result.consistency_note = frozen.note
        if on_frozen is not None:
            on_frozen(frozen.label)
        try:
            exposed = steps.expose(frozen)
            result.transport = exposed.transport
            result.transport_detail = exposed.detail
            plan = steps.plan_reads(frozen, exposed, previous)
            result.skipped_disks = [dict(x) for x in plan.skipped]
            session = _mover.BackupSession(repository, _label(steps.name, plan.parent, previous), plan.parent)
            disk_rows = read_disks(
                _reader(session, plan.disks, progress, cancel), plan.disks, max_workers=disks_per_vm, session=session
            )
        except Exception as e:
            # Did it fail because the point in time went away (a snapshot
            # removed by someone else, a shadow copy Windows deleted)? Then
            # say that, in one line, rather than what it broke.
            if (clear := steps.still_frozen(frozen, e)) is not None:
                raise clear from None
            raise
        # Every disk is read; if the snapshot or shadow copy went away
        # meanwhile, what was read may not be the point in time: commit nothing.
        if (clear := steps.still_frozen(frozen, None)) is not None:
            raise clear
        mode = "incremental" if plan.parent else "full"
        reasons = plan.full_reason or "; ".join(
            f"{d['name']}: {d['full_reason']}" for d in disk_rows if d["full_reason"]
        )
        if mode == "full" and not reasons:
            reasons = "full"  # a full always says why (the contract); the steps give a reason, this is a guard
        config, extra = steps.point(frozen, exposed, plan, disk_rows)
        meta = PointMeta(
            hypervisor=hypervisor,
            vm=steps.name,
            vm_id=result.vm_id,
            vm_moref=extra.pop("vm_moref", None),
            mode=mode,
            full_reason=reasons or None,
            snapshot_unix=frozen.point_unix,
            last_full_unix=_last_full(mode, frozen.point_unix, previous.meta if previous else None),
            disks=[
                {k: v for k, v in d.items() if k in ("name", "capacity", "change_id", *plan_keys(plan))}
                for d in disk_rows
            ],
            extra={**extra, "skipped_disks": result.skipped_disks},
        )
        info = session.commit(config=config, attributes=json.dumps(meta.to_attributes()))
        session = None
        result.backup_id = info.id
        steps.committed(info.id, mode)
        result.mode = mode
        result.full_reason = reasons or None
        result.set_disks(disk_rows)
    except BaseException as e:
        body_error = e
        raise
    finally:
        if session is not None:
            session.abort()
        problems = steps.release(frozen, succeeded=body_error is None)
        if frozen is not None:
            result.snapshot_seconds = time.monotonic() - snap_t0
        if problems and body_error is None:
            raise _after_commit(steps, result.backup_id, problems) from None
        if problems:
            log.error("VM %s: cleanup after a failure failed too: %s", steps.name, "; ".join(map(str, problems)))
    result.seconds = time.monotonic() - t0
    return result


def _reader(
    session: Any, disks: list[DiskRead], progress: Callable[[int, int], None] | None, cancel: Any
) -> Callable[[DiskRead], dict[str, Any]]:
    """``read(disk)`` for ``read_disks``: one disk into the session, its row back."""
    agg = DiskProgress(progress, sum(d.capacity for d in disks))

    def read(d: DiskRead) -> dict[str, Any]:
        r = session.add_disk(
            d.source,
            d.name,
            d.changed,
            d.change_id,
            progress=agg.for_disk(d.name),
            cancel=cancel,
            allocated_extents=d.allocated,
        )
        return {
            "name": d.name,
            **d.row,
            "capacity": d.capacity,
            "change_id": d.change_id,
            "mode": "incremental" if d.changed is not None else "full",
            "full_reason": d.full_reason if d.changed is None else None,
            "changed_bytes": sum(n for _, n in d.changed) if d.changed is not None else None,
            "allocated_bytes": sum(n for _, n in d.allocated) if d.allocated is not None else None,
            "bytes_read": r.bytes_read,
            "bytes_stored": r.bytes_stored,
            "seconds": r.seconds,
            "source_format": r.source_format,
        }

    return read


def plan_keys(plan: Any) -> tuple[str, ...]:
    """The adapter's own per-disk keys stored in the point (``DiskRead.row``'s keys)."""
    keys: list[str] = []
    for d in plan.disks:
        keys += [k for k in d.row if k not in keys]
    return tuple(keys)


def _label(name: str, parent: str | None, previous: Previous | None) -> str:
    """The point's ``vm`` label: the VM's name; an incremental of a renamed
    VM (its previous point found by ``vm_id`` under its old name) keeps its
    chain's label, since the mover takes a parent only of the same label;
    its next full takes the new name."""
    if parent is not None and previous is not None and previous.backup_id == parent and previous.label:
        if previous.label != name:
            log.info("VM %s was %s: its incremental keeps the chain's label %s", name, previous.label, previous.label)
        return previous.label
    return name


def _last_full(mode: str, point_unix: float, previous: PointMeta | None) -> float:
    if mode == "full" or previous is None:
        return point_unix
    return previous.last_full_unix


def _after_commit(steps: VmSteps, backup_id: str | None, problems: list[BaseException]) -> BaseException:
    """The error of a release that failed after the commit: the point exists,
    so the message names it; one problem keeps its class (and retryability)
    when the steps say so (Hyper-V: a dropped WinRM session is retried, the
    host's ledger keeps the run), else a HypervisorError (vSphere: not retried)."""
    message = f"VM {steps.name} was backed up ({backup_id}) but cleanup failed: {'; '.join(map(str, problems))}"
    if len(problems) == 1 and isinstance(problems[0], BackupError) and getattr(steps, "cleanup_keeps_class", False):
        return rewrap(problems[0], message)
    return HypervisorError(message)


def rewrap(e: BackupError, message: str) -> BackupError:
    """The same error class (and so the same ``retryable``) with another message."""
    code = getattr(e, "code", None)
    try:
        return type(e)(message, code) if code is not None else type(e)(message)
    except TypeError:
        return HypervisorError(message)


__all__ = ["backup_one", "rewrap", "Exposed", "Frozen"]
