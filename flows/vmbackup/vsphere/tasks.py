"""Waiting for vSphere tasks: one read, then the PropertyCollector's updates, and a time limit.

A task that is done when first read costs one call. Otherwise the wait is a
``WaitForUpdatesEx`` on a filter of the task's ``info.state``, ``info.error``
and ``info.result``: vCenter answers when the state changes, so the number of
calls depends on the task's transitions (queued, running, done), not on how
long it takes, nor on how loaded vCenter is. Each thread keeps one
PropertyCollector of its own for this (updates of a collector go to whoever
waits on it, so waiters must not share one); the filter is destroyed after
each wait. If the server does not give updates (or the session that owned the
collector was dropped), the wait falls back to polling with back-off.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Any

from pyVmomi import vim, vmodl

from ..errors import NoTaskUpdates as _NoUpdates
from ..errors import TaskTimeoutError
from .faults import hypervisor_error

log = logging.getLogger(__name__)

FIRST_DELAY = 0.02
MAX_DELAY = 2.0
DEFAULT_TIMEOUT = 600.0
MAX_WAIT_SECONDS = 30  # one WaitForUpdatesEx at most this long (the HTTP request stays short)
TASK_PATHS = ["info.state", "info.error", "info.result"]

_local = threading.local()


def _done(info_state: Any, error: Any, result: Any, what: str) -> tuple[bool, Any]:
    """(True, result) if the task succeeded; raises its fault if it failed; (False, None) if not done."""
    if info_state == vim.TaskInfo.State.success:
        return True, result
    if info_state == vim.TaskInfo.State.error:
        fault = error if error is not None else vmodl.MethodFault(msg="no fault given")
        raise hypervisor_error(what, fault) from fault
    return False, None


def _timeout(task: Any, what: str, timeout: float) -> TaskTimeoutError:
    return TaskTimeoutError(f"{what} did not finish within {timeout:.0f} s (task {task._moId})")


def _collector(stub: Any) -> Any:
    """This thread's own PropertyCollector on ``stub``'s session (made once)."""
    cached = getattr(_local, "collector", None)
    if cached is not None and cached[0] is stub:
        return cached[1]
    root = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent().propertyCollector
    pc = root.CreatePropertyCollector()
    _local.collector = (stub, pc)
    return pc


def _forget_collector() -> None:
    _local.collector = None


def _wait_updates(task: Any, what: str, deadline: float, timeout: float) -> Any:
    try:
        pc = _collector(task._stub)
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task, skip=False)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=TASK_PATHS)],
        )
        filt = pc.CreateFilter(spec, partialUpdates=False)
    except Exception as e:  # no PropertyCollector updates here (or the session went): poll
        _forget_collector()
        raise _NoUpdates(f"{type(e).__name__}: {e}") from e
    values: dict[str, Any] = {}
    version = ""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(task, what, timeout)
            opts = vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=max(1, min(MAX_WAIT_SECONDS, math.ceil(remaining)))
            )
            try:
                updates = pc.WaitForUpdatesEx(version, opts)
            except Exception as e:
                _forget_collector()
                raise _NoUpdates(f"{type(e).__name__}: {e}") from e
            if updates is None:  # maxWaitSeconds passed without a change
                continue
            version = updates.version
            for fs in updates.filterSet or []:
                if fs.filter._moId != filt._moId:
                    continue
                for ou in fs.objectSet or []:
                    if ou.kind == "leave":
                        raise hypervisor_error(
                            what, vmodl.fault.ManagedObjectNotFound(msg=f"task {task._moId} vanished")
                        )
                    for change in ou.changeSet or []:
                        values[change.name] = change.val
            done, result = _done(values.get("info.state"), values.get("info.error"), values.get("info.result"), what)
            if done:
                return result
    finally:
        try:
            filt.DestroyPropertyFilter()
        except Exception:  # the session may be gone with it; nothing else holds the filter
            _forget_collector()


def _poll(task: Any, what: str, deadline: float, timeout: float) -> Any:
    delay = FIRST_DELAY
    while True:
        try:
            info = task.info
        except Exception as e:  # a property read can fail like any call
            raise hypervisor_error(what, e) from e
        done, result = _done(info.state, info.error, info.result, what)
        if done:
            return result
        now = time.monotonic()
        if now >= deadline:
            raise _timeout(task, what, timeout)
        time.sleep(min(delay * random.uniform(0.75, 1.25), deadline - now))
        delay = min(delay * 1.5, MAX_DELAY)


def wait_task(task: vim.Task, what: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Waits for ``task``; returns its result or raises its fault as a ``vmbackup.errors`` class.

    Reads the task once; if it is not done, waits for its state to change
    through ``WaitForUpdatesEx`` (polling with exponential back-off, x1.5 up to
    2 s with +-25 % jitter, where the server gives no updates). After
    ``timeout`` seconds it raises ``TaskTimeoutError`` (retryable); the task
    itself goes on in vSphere.
    """
    deadline = time.monotonic() + timeout
    try:
        info = task.info
    except Exception as e:  # a property read can fail like any call
        raise hypervisor_error(what, e) from e
    done, result = _done(info.state, info.error, info.result, what)
    if done:
        return result
    try:
        return _wait_updates(task, what, deadline, timeout)
    except _NoUpdates as e:
        log.info("%s: no PropertyCollector updates (%s); polling the task", what, e)
        return _poll(task, what, deadline, timeout)


def run_task(start: Any, what: str, timeout: float = DEFAULT_TIMEOUT, on_task: Any = None) -> Any:
    """Starts a task with ``start()`` and waits for it; faults of the start are mapped too.

    ``on_task(moref)``, if given, is called once the task exists and before
    waiting: a caller writes it down, so that after a time-out the next attempt
    can wait for the task that goes on in vSphere (``task_state``).
    """
    try:
        task = start()
    except vmodl.MethodFault as e:
        raise hypervisor_error(what, e) from e
    if on_task is not None:
        on_task(task._moId)
    return wait_task(task, what, timeout)


def task_state(stub: Any, moref: str) -> str:
    """``running`` (queued or running), ``success``, ``error``, or ``gone`` (vCenter forgot it)."""
    try:
        info = vim.Task(moref, stub).info
    except vmodl.fault.ManagedObjectNotFound:
        return "gone"
    except Exception:  # noqa: BLE001 (a task we cannot read is as good as gone for waiting)
        return "gone"
    if info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
        return "running"
    return str(info.state)
