"""Snapshots: taken with memory off and quiesce per policy, recognised and removed.

Ours are named ``vmbackup-<run id>`` and carry ``vmbackup run-id=<run id>
attempt=<attempt id>`` in their description; reconcile and the sweeper remove
only snapshots with both, never a user's snapshot. The attempt id tells apart
the snapshots of two attempts of one run: an attempt whose
``CreateSnapshot_Task`` timed out leaves a snapshot that vSphere makes later,
and the next attempt of the same run removes it (reconcile).

Removing a snapshot merges its delta into the parent and can take hours on a
busy VM (Broadcom KB 337175, KB 316414; it cannot be cancelled): it has its
own time limit, ``REMOVE_TIMEOUT`` (the plan's ``timeouts.snapshot_remove``),
and consolidation starts only once a removal has finished.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from ..errors import BackupError, QuiesceError
from .tasks import run_task

log = logging.getLogger(__name__)

PREFIX = "vmbackup-"
_RUN = re.compile(r"\bvmbackup run-id=(\S+)")
_ATTEMPT = re.compile(r"\battempt=(\S+)")
REMOVE_TIMEOUT = 24 * 3600.0  # the default of the plan's timeouts.snapshot_remove


def snapshot_name(run_id: str) -> str:
    return f"{PREFIX}{run_id}"


def new_attempt() -> str:
    """A fresh attempt id: one per try of one VM's backup (a retry gets another)."""
    return uuid.uuid4().hex[:12]


def description(run_id: str, attempt: str | None = None) -> str:
    att = f" attempt={attempt}" if attempt else ""
    return f"vmbackup run-id={run_id}{att} pid={os.getpid()} machine={socket.gethostname()}"


def attempt_of(tree: Any) -> str | None:
    """The attempt id in one of our snapshots' description (None if it has none)."""
    m = _ATTEMPT.search(tree.description or "")
    return m.group(1) if m else None


def run_id_of(tree: Any) -> str | None:
    """The run id of one of our snapshots, or None for anyone else's."""
    if not str(tree.name).startswith(PREFIX):
        return None
    m = _RUN.search(tree.description or "")
    return m.group(1) if m else None


def walk(vm: Any) -> Iterator[Any]:
    """Every snapshot tree node of a VM, parents before children."""
    return walk_info(vm.snapshot)


def walk_info(info: Any) -> Iterator[Any]:
    """Every node of a VM's ``snapshot`` property (None: no snapshots), parents before children."""
    stack = list(reversed(info.rootSnapshotList)) if info is not None else []
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.childSnapshotList or []))


def ours(vm: Any) -> list[tuple[str, Any]]:
    """(run id, snapshot tree node) of every snapshot this system made on the VM."""
    return ours_in(vm.snapshot)


def ours_in(info: Any) -> list[tuple[str, Any]]:
    """``ours`` of a ``snapshot`` property already read (by a PropertyCollector request, say)."""
    return [(rid, n) for n in walk_info(info) if (rid := run_id_of(n)) is not None]


@dataclass
class Taken:
    snapshot: Any
    consistency: str  # "application", "crash" or "powered-off"
    note: str = ""


_QUIESCE_FAULTS = (vim.fault.ApplicationQuiesceFault, vim.fault.ToolsUnavailable, vim.fault.GuestOperationsUnavailable)


def _is_quiesce_failure(e: BackupError) -> bool:
    cause = e.__cause__
    return isinstance(cause, _QUIESCE_FAULTS) or "Quiesce" in str(e) or "ToolsUnavailable" in str(e)


def create(
    vm: Any,
    name: str,
    run_id: str,
    *,
    quiesce_policy: str,
    tools_running: bool,
    timeout: float,
    attempt: str | None = None,
    on_task: Any = None,
) -> Taken:
    """Takes the backup snapshot (memory off) following the quiesce policy.

    ``required``: a quiesce failure fails the VM (QuiesceError, permanent);
    ``preferred``: one more quiesced attempt, then a crash-consistent snapshot;
    ``off``: never quiesces. A powered-off VM needs no quiescing: its disks are
    at rest, so its consistency is ``powered-off`` (which satisfies ``required``).
    ``attempt`` goes into the description; ``on_task(moref)`` is called with
    each CreateSnapshot task before it is waited for (the ledger keeps it: a
    timed-out task goes on).
    """
    what = f"snapshot of VM {name}"

    def take(quiesce: bool) -> Any:
        return run_task(
            lambda: vm.CreateSnapshot_Task(
                name=snapshot_name(run_id), description=description(run_id, attempt), memory=False, quiesce=quiesce
            ),
            what,
            timeout,
            on_task,
        )

    powered_on = str(vm.runtime.powerState) == "poweredOn"
    if not powered_on:
        return Taken(take(False), "powered-off")
    if quiesce_policy == "off":
        return Taken(take(False), "crash", "quiesce off by policy")
    if not tools_running:
        if quiesce_policy == "required":
            raise QuiesceError(
                f"cannot quiesce VM {name}: VMware Tools are not running and the plan requires quiescing"
            )
        return Taken(take(False), "crash", "VMware Tools not running")
    attempts = 1 if quiesce_policy == "required" else 2
    last: BackupError | None = None
    for i in range(attempts):
        try:
            return Taken(take(True), "application")
        except BackupError as e:
            if not _is_quiesce_failure(e):
                raise
            last = e
            log.warning("quiescing VM %s failed (attempt %d): %s", name, i + 1, e)
    if quiesce_policy == "required":
        raise QuiesceError(f"cannot quiesce VM {name}: {last}") from last
    return Taken(take(False), "crash", f"quiescing failed twice ({last})")


def remove(snapshot: Any, what: str, timeout: float = REMOVE_TIMEOUT, on_task: Any = None) -> None:
    """Removes one snapshot (its children stay), merging its delta into the parent.

    ``timeout`` is the removal's own (hours by default, not the other tasks'
    minutes); after a ``TaskTimeoutError`` the removal still runs in vSphere:
    do not consolidate then (``on_task`` gets the task's moref to wait on later).
    """
    run_task(lambda: snapshot.RemoveSnapshot_Task(removeChildren=False), what, timeout, on_task)


def consolidate_if_needed(vm: Any, name: str, timeout: float) -> bool:
    """Consolidates the VM's disks if vSphere says it is needed; True if it did."""
    if not vm.runtime.consolidationNeeded:
        return False
    run_task(lambda: vm.ConsolidateVMDisks_Task(), f"consolidating the disks of VM {name}", timeout)
    return True
