"""Waiting for vSphere tasks: back-off with jitter, and a time limit."""

from __future__ import annotations

import random
import time
from typing import Any

from pyVmomi import vim, vmodl

from ..errors import TaskTimeoutError
from .faults import hypervisor_error

FIRST_DELAY = 0.02
MAX_DELAY = 2.0
DEFAULT_TIMEOUT = 600.0


def wait_task(task: vim.Task, what: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Waits for ``task``; returns its result or raises its fault as a ``vmbackup.errors`` class.

    Polls with exponential back-off (x1.5, up to 2 s) and +-25 % jitter, so
    many waiters do not hit vCenter in step. After ``timeout`` seconds it
    raises ``TaskTimeoutError`` (retryable); the task itself goes on in vSphere.
    """
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        try:
            info = task.info
        except Exception as e:  # a property read can fail like any call
            raise hypervisor_error(what, e) from e
        if info.state == vim.TaskInfo.State.success:
            return info.result
        if info.state == vim.TaskInfo.State.error:
            fault = info.error if info.error is not None else vmodl.MethodFault(msg="no fault given")
            raise hypervisor_error(what, fault) from fault
        now = time.monotonic()
        if now >= deadline:
            raise TaskTimeoutError(f"{what} did not finish within {timeout:.0f} s (task {task._moId})")
        time.sleep(min(delay * random.uniform(0.75, 1.25), deadline - now))
        delay = min(delay * 1.5, MAX_DELAY)


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
