"""The restore of one VM, whatever its hypervisor: one procedure, the
adapter's steps (``base.RestoreSteps``), as ``procedure.backup_one`` is for
backups.

reconcile -> prepare (check everything, make nothing) -> create -> write
every disk at once -> finish (the VM complete, powered off) -> [drill: read
back and compare, before any guest runs] -> power on (if asked; a drill's
RTO includes it) -> release. Release runs on every path and, when the restore
failed, removes the half-made VM (the adapter's ledger named it before it
existed, so a killed run's leftover is removed by the next restore or the
sweeper).

No Prefect here (tests/test_boundaries.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from ..errors import RestoreCleanupError, RestoreInputError, RestoreVerifyError
from ..results import DiskProgress, RestoreResult
from .base import DiskSpec, Made, RestoreRequest, RestoreSteps, VmDescription, Written

log = logging.getLogger(__name__)

# The drill compares this many bytes at a time.
_COMPARE_BLOCK = 4 << 20


def find_point(
    repository: str,
    vm: str,
    *,
    point: str | None = None,
    before: float | None = None,
) -> Any:
    """The point to restore for ``vm`` (a ``BackupInfo``): ``point`` if given
    (it must be ``vm``'s), else the newest trusted point of ``vm`` (by its
    ``vm`` label or, for a renamed VM, the name its attributes record),
    created before ``before`` (unix seconds) if given. Raises
    ``RestoreInputError`` naming what is missing."""
    from .. import _mover

    infos, _untrusted = _mover.list_backups(repository)
    if point is not None:
        found = next((i for i in infos if i.id == point), None)
        if found is None:
            raise RestoreInputError(f"no trusted backup point {point} in repository {repository}")
        if vm not in (found.vm, _attr(found, "vm")):
            raise RestoreInputError(f"backup point {point} is of VM {found.vm}, not {vm}")
        return found
    mine = [i for i in infos if vm in (i.vm, _attr(i, "vm"))]
    if before is not None:
        mine = [i for i in mine if i.created_unix < before]
    if not mine:
        when = f" before {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before))}" if before is not None else ""
        raise RestoreInputError(f"VM {vm} has no trusted backup point{when} in repository {repository}")
    return max(mine, key=lambda i: i.created_unix)


def _attr(info: Any, key: str) -> Any:
    attrs = info.attributes
    return attrs.get(key) if isinstance(attrs, dict) else None


def restore_one(
    steps: RestoreSteps,
    request: RestoreRequest,
    description: VmDescription,
    *,
    hypervisor: str,
    repository: str,
    agent: str | None,
    disks_per_vm: int,
    verify: bool = False,
    cancel: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreResult:
    """Restores ``request.point`` of ``request.vm`` through ``steps``.

    Args:
        steps: the target adapter's restore steps.
        request: what to restore, where.
        description: the point's VM (the source adapter's ``describe_point``).
        hypervisor: the target's kind (the row's ``hypervisor``).
        repository: the repository's path.
        agent: the agent's name (for the row).
        disks_per_vm: how many disks are written at once.
        verify: read the restored disks back and compare them with the point
            (a drill); a difference fails the restore.
        cancel: a mover ``CancelToken``.
        progress: ``progress(done_bytes, total_bytes)`` about once a second.

    Raises:
        ``vmbackup.errors`` classes: ``RestoreInputError`` (exit 2) before
        anything is made; others after, once the half-made VM is removed.
    """
    t0 = time.monotonic()
    result = RestoreResult(
        vm=request.vm,
        hypervisor=hypervisor,
        point=request.point,
        restored_as=request.restored_as,
        host=request.host,
        source_hypervisor=description.hypervisor,
        in_place=request.in_place,
        repository=repository,
        agent=agent,
    )
    steps.reconcile()
    target = steps.prepare(description)
    result.restored_as = target.restored_as
    result.host = target.host
    result.location = target.location
    result.changes = list(target.changes)
    result.warnings = list(target.warnings)
    made: Made | None = None
    failure: BaseException | None = None
    try:
        made = steps.create(target)
        result.vm_id = made.vm_id
        result.transport = made.transport
        written = _write_disks(steps, made, target.disks, request.point, disks_per_vm, cancel, progress)
        result.disks = [
            {"disk": d.name, "bytes_written": w.bytes_written, "seconds": round(w.seconds, 3)}
            # the disk's name on the restored VM, where the target has no such bus (across hypervisors)
            | ({"restored_as": d.place} if d.place and d.place != d.name else {})
            for d, w in zip(target.disks, written, strict=True)
        ]
        result.bytes_written = sum(w.bytes_written for w in written)
        steps.finish(made)
        # what finish found (Hyper-V's import: a missing switch mapped or disconnected) joins the row
        result.changes, result.warnings = list(target.changes), list(target.warnings)
        result.vm_id = made.vm_id
        if verify:
            # Compared before the power-on: a guest that writes while it boots
            # (logs, a journal replay) must not fail a sound restore.
            result.verified = compare(steps.read_back(made), repository, request.point, target.disks, cancel)
        if request.power_on:
            steps.power_on(made)
            result.powered_on = True
    except BaseException as e:
        failure = e
        raise
    finally:
        problems = steps.release(made, succeeded=failure is None)
        if problems and failure is None:
            raise RestoreCleanupError(
                f"VM {request.vm} was restored as {result.restored_as} but cleanup failed: "
                + "; ".join(map(str, problems))
            )
        if problems:
            log.error(
                "restore of VM %s: cleanup after a failure failed too: %s", request.vm, "; ".join(map(str, problems))
            )
    result.seconds = time.monotonic() - t0
    return result


def _write_disks(
    steps: RestoreSteps,
    made: Made,
    disks: list[DiskSpec],
    point: str,
    workers: int,
    cancel: Any,
    progress: Callable[[int, int], None] | None,
) -> list[Written]:
    """Every disk at once (``workers`` at a time); the first failure cancels the others."""
    agg = DiskProgress(progress, sum(d.capacity for d in disks))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [
            pool.submit(steps.write_disk, made, d, point, cancel=cancel, progress=agg.for_disk(d.name)) for d in disks
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((e for f in futures if f in done and (e := f.exception()) is not None), None)
        if error is not None:
            for f in futures:
                f.cancel()
            if cancel is not None:
                cancel.cancel()
            raise error
        return [f.result() for f in futures]


def compare(sources: dict[str, str], repository: str, point: str, disks: list[DiskSpec], cancel: Any = None) -> bool:
    """Whether every restored disk (``sources``: name -> path or NBD URI)
    equals its disk in ``point``, byte for byte. Raises ``RestoreVerifyError``
    naming the first difference."""
    from .. import _mover

    for d in disks:
        if d.name not in sources:
            raise RestoreVerifyError(f"disk {d.name} of the restored VM cannot be read back")
        restored = _mover.DiskReader.source(sources[d.name])
        saved = _mover.DiskReader.backup(repository, point, d.name)
        if restored.size < saved.size:
            raise RestoreVerifyError(f"disk {d.name}: restored {restored.size} bytes, the point has {saved.size}")
        offset = 0
        while offset < saved.size:
            if cancel is not None and cancel.cancelled:
                from ..errors import CancelledError

                raise CancelledError("cancelled")
            n = min(_COMPARE_BLOCK, saved.size - offset)
            if restored.read(offset, n) != saved.read(offset, n):
                raise RestoreVerifyError(f"disk {d.name} differs from backup point {point} at or after byte {offset}")
            offset += n
    return True


__all__ = ["find_point", "restore_one", "compare", "RestoreCleanupError", "RestoreVerifyError"]
