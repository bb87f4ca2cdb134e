"""One Prefect task per VM: limits held for the whole call, a deadline that
reaches the mover through its cancel token, retries only for retryable
errors, and a result row for every VM whatever happened.

The work itself (an adapter's per-VM procedure: vSphere's, or Hyper-V's
with its shadow copy) is a callable that takes a
:class:`vmbackup._mover.CancelToken` and returns the VM's result as a dict;
this module knows nothing of either hypervisor, so it is tested with real
Prefect and real mover calls on its own.

Why not Prefect's ``timeout_seconds``: for a task on a worker thread Prefect
enforces it by raising an exception asynchronously inside the thread
(``PyThreadState_SetAsyncExc``), which cannot interrupt a call into the
mover, and lands wherever Python code runs next, possibly in the adapter's
cleanup (a snapshot or shadow copy left behind). Our deadline cancels the token instead:
the mover stops at its next block, the adapter's ``finally`` blocks run, and
the task fails with :class:`VmTimeoutError`, which is never retried.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from .. import results
from ..errors import BackupError, RunInterruptedError, VmTimeoutError
from . import limits

Work = Callable[[Any], dict]  # (CancelToken) -> result row

DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAYS = [10.0, 30.0, 90.0]
RETRY_JITTER = 0.5  # back-off delays vary by up to +-50%, so retries of many VMs spread out

# The fields every row has (docs/operations.md, `vmbackup backup`): VmResult's.
ROW_FIELDS = results.row_fields()


class StopSignal:
    """Cancels the token of every VM running now, and stops VMs from
    starting, when the run is interrupted: each VM's cleanup then runs
    (the adapter's ``finally``) before the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: set[Any] = set()
        self.stopped = False

    def register(self, token: Any) -> None:
        with self._lock:
            self._tokens.add(token)
            if self.stopped:
                token.cancel()

    def unregister(self, token: Any) -> None:
        with self._lock:
            self._tokens.discard(token)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for token in self._tokens:
                token.cancel()


@dataclass
class VmJob:
    """What the task for one VM needs.

    ``row`` holds the fields known before the work (vm, repository, host,
    agent, datastores): they are the failure row's fields too.
    """

    vm: str
    limits: list[str]
    work: Work
    row: dict = field(default_factory=dict)


def retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only errors that say they
    are transient (``retryable = True``: dropped session, busy host, NBD
    reset); a missing VM, a wrong password or a required quiesce that
    failed would fail the same way again."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    return bool(getattr(exc, "retryable", False))


def one_line(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line message for a row: the error's text (with its class for
    errors that are not ours), secrets replaced by ``***``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, BackupError):
        text = f"{type(exc).__name__}: {text}"
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return re.sub(r"\s+", " ", text)[:1000]


class _Deadline:
    """Cancels ``token`` after ``seconds`` (None: never)."""

    def __init__(self, token: Any, seconds: float | None):
        self.token, self.seconds = token, seconds
        self.expired = threading.Event()
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.expired.set()
        self.token.cancel()

    def __enter__(self) -> _Deadline:
        if self.seconds is not None:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


@task(
    task_run_name="backup-{vm}",
    retries=DEFAULT_RETRIES,
    retry_delay_seconds=DEFAULT_RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_if_retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
    log_prints=False,
)
def backup_vm_task(
    vm: str,
    limit_names: list[str],
    work: Work,
    deadline_seconds: float | None = None,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    stop: StopSignal | None = None,
    context: dict | None = None,
    verb: str = "backup",
) -> dict:
    """Back up (``verb``: or restore, drill) one VM: hold its limits, run the
    work with a cancel token that the deadline (or the run's interruption)
    cancels, return the work's row. ``context`` (host, agent) goes on every
    log line with the VM."""
    from .. import _mover
    from .reports import vm_logger

    stop = stop or StopSignal()
    log = vm_logger(get_run_logger(), {**(context or {}), "vm": vm})
    if stop.stopped:
        raise RunInterruptedError(f"{verb} of {vm} was not started: the run was interrupted")
    log.info("waiting for limits %s", ", ".join(limit_names))
    t_wait = time.monotonic()
    # A server that refuses the request for a moment is asked again, within the VM's deadline.
    with limits.hold(limit_names, lease_seconds, patience=deadline_seconds, stopped=lambda: stop.stopped, logger=log):
        t_held = time.monotonic()
        if stop.stopped:
            raise RunInterruptedError(f"{verb} of {vm} was not started: the run was interrupted")
        log.info("limits held; %s starts", verb)
        token = _mover.CancelToken()
        stop.register(token)
        with _Deadline(token, deadline_seconds) as deadline:
            try:
                row = work(token)
            except BaseException as e:
                if deadline.expired.is_set():
                    raise VmTimeoutError(f"{verb} of {vm} exceeded {deadline_seconds:g} s and was cancelled") from e
                if stop.stopped:
                    raise RunInterruptedError(f"{verb} of {vm} was cancelled: the run was interrupted") from e
                raise
            finally:
                stop.unregister(token)
        if deadline.expired.is_set() and row.get("status") != "ok":
            raise VmTimeoutError(f"{verb} of {vm} exceeded {deadline_seconds:g} s and was cancelled")
    log.info("%s", row.get("status"))
    # Timing for the benchmark (bench/flows.py): the wait for the limits
    # and the time they were held, around the work's own ``seconds``.
    row = dict(row, limit_wait_seconds=round(t_held - t_wait, 3), held_seconds=round(time.monotonic() - t_held, 3))
    return row


def failed_row(job: VmJob, error: str, seconds: float, row_class: type = results.VmResult) -> dict:
    return results.empty_row(
        row_class, **{"vm": job.vm, **job.row, "status": "failed", "error": error, "seconds": round(seconds, 3)}
    )


def _run_pending_signal_handlers() -> None:
    """Run the Python handlers of signals that have arrived, now.

    Python 3.11 can lose track of a pending signal while worker threads
    take and drop the GIL (a mover call does so a few times a second): the
    flag that makes the main thread run the handler is recomputed by a
    thread that may not handle signals, and the main thread, waiting on a
    future, never raises KeyboardInterrupt. ``signal.signal`` runs pending
    handlers before it changes one, so setting SIGINT's handler to itself
    makes them run here, in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def _wait_all(futures: Sequence[Any]) -> None:
    """Wait for every future, in short waits that let the main thread run
    the handlers of signals that arrived meanwhile (Ctrl-C, SIGTERM)."""
    pending = [f.wrapped_future for f in futures]
    while pending:
        _, not_done = concurrent.futures.wait(pending, timeout=0.2)
        pending = list(not_done)
        _run_pending_signal_handlers()
    for future in futures:
        future.wait()


def _run_seconds(future: Any, fallback: float) -> float:
    """How long a task ran, over all its attempts, as the server counted it."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_task_run(future.task_run_id).total_run_time.total_seconds()
    except Exception:
        return fallback


def run_vm_tasks(
    jobs: Sequence[VmJob],
    *,
    max_workers: int,
    deadline_seconds: float | None = None,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: Sequence[float] = DEFAULT_RETRY_DELAYS,
    secrets: Iterable[str] = (),
    verb: str = "backup",
    row_class: type = results.VmResult,
) -> list[dict]:
    """Run one task per job (named ``<verb>-<vm>``; rows of ``row_class``), all submitted at once on a thread pool of
    ``max_workers``, inside the current flow; a row per job, in job order.
    A job that failed (after its retries) gives a ``failed`` row with a
    one-line error instead of an exception, so no VM's result is lost."""
    secrets = list(secrets)
    configured = backup_vm_task.with_options(
        task_run_name=f"{verb}-{{vm}}",
        retries=retries,
        retry_delay_seconds=list(retry_delay_seconds) or 0,
        retry_jitter_factor=RETRY_JITTER,
    )
    t0 = time.monotonic()
    rows = []
    stop = StopSignal()
    with ThreadPoolTaskRunner(max_workers=max(1, max_workers)) as runner:
        futures = [
            runner.submit(
                configured,
                parameters={
                    "vm": job.vm,
                    "limit_names": job.limits,
                    "work": quote(job.work),
                    "deadline_seconds": deadline_seconds,
                    "lease_seconds": lease_seconds,
                    "stop": quote(stop),
                    "context": {k: job.row[k] for k in ("host", "agent") if job.row.get(k)},
                    "verb": verb,
                },
            )
            for job in jobs
        ]
        try:
            _wait_all(futures)
        except BaseException:
            # Ctrl-C or SIGTERM: the mover calls on worker threads would go
            # on; cancel them so every VM's cleanup runs, wait for that,
            # then let the interruption end the run.
            stop.stop()
            _wait_all(futures)  # a second Ctrl-C abandons the wait
            raise
        for job, future in zip(jobs, futures, strict=True):
            state = future.state
            if state.is_completed():
                row = results.empty_row(row_class, **{"vm": job.vm, **job.row})
                row.update(future.result())
                rows.append(row)
            else:
                exc = state.result(raise_on_failure=False)
                err = exc if isinstance(exc, BaseException) else RuntimeError(state.message or state.name)
                seconds = _run_seconds(future, time.monotonic() - t0)
                rows.append(failed_row(job, one_line(err, secrets), seconds, row_class))
    return rows
