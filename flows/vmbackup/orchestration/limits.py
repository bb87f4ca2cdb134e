"""Prefect global concurrency limits named after agents, hosts and datastores.

A VM's backup holds one slot of each of ``vmbackup-agent-<agent>``,
``vmbackup-host-<host>`` and ``vmbackup-datastore-<datastore>`` (every
datastore the VM has disks on) for the whole per-VM call, snapshot included.
A Hyper-V VM holds ``vmbackup-agent-<agent>``, ``vmbackup-host-<Hyper-V
host>`` and ``vmbackup-volume-<volume key>`` for every volume (or cluster
shared volume) its files are on (``hv1:D``, ``<cluster>:Volume1``), for the
whole call, shadow copy included; volumes take the plan's ``per_datastore``.

Every limit is created (or its value updated) before any task asks for it:
Prefect ignores a name it does not know when other names in the same request
exist (and ``strict=True`` only raises when none exists), so a missing limit
would silently not limit anything.

Leases: a holder renews its lease while it runs; when it dies (kill -9, lost
machine) the server frees the slots once the lease expires, at most
``lease_duration`` plus the server's sweep interval (15 s) later.

A server that refuses a request for slots for a moment (a 503 or 429 under
load, a reset connection: one VM of 300 was lost so, docs/flows.md "Scale")
is asked again after a back-off that doubles (with jitter, so that many VMs
refused at once do not come back at once), for as long as the VM's deadline
allows (``patience``); nothing has started meanwhile. Only then is it
``LimitsUnavailableError`` (retryable: the task's own retries come after).
A request whose answer was lost after the server granted it (a reset after
the grant) leaves that grant to its lease: the slot comes back at most
``lease_duration`` later.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

PREFIX = "vmbackup"
# Prefect refuses / % & > < in names; we keep a quieter set so names are also
# readable in URLs and shells, and add a hash when anything had to be replaced
# (so two different names never share a limit).
_SAFE = re.compile(r"[^A-Za-z0-9._:@+-]")
# The server accepts leases of 60 s to one day; a holder renews its lease
# well before it ends, so this bounds only how long a dead run keeps a slot.
DEFAULT_LEASE_SECONDS = 120.0
MIN_LEASE_SECONDS = 60.0
# Asking again after a transient refusal: 0.25 s, doubling to 30 s, each
# +-50%; for the VM's deadline, or this long when it has none.
FIRST_RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 30.0
DEFAULT_PATIENCE_SECONDS = 600.0
# A refused request that had waited longer than this for its slots (the
# server answering "wait") starts a new streak of refusals, with its own patience.
STREAK_GAP_SECONDS = MAX_RETRY_SECONDS
# HTTP answers that say "not now" rather than "no": timeout, too early, too
# many requests, and every 5xx (a proxy's 502/504, the server's 503).
_TRANSIENT_STATUS = (408, 425, 429)

log = logging.getLogger(__name__)


def limit_name(kind: str, name: str) -> str:
    """``vmbackup-<kind>-<name>``, with unsafe characters replaced."""
    clean = _SAFE.sub("_", name)
    if clean != name or not clean:
        clean = f"{clean}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return f"{PREFIX}-{kind}-{clean}"


def vm_limit_names(agent: str, host: str, datastores: Iterable[str], volumes: Iterable[str] = ()) -> list[str]:
    """The limits one VM's backup holds, sorted and without duplicates
    (``volumes``: a Hyper-V VM's volume keys)."""
    names = {limit_name("agent", agent), limit_name("host", host)}
    names |= {limit_name("datastore", d) for d in datastores}
    names |= {limit_name("volume", v) for v in volumes}
    return sorted(names)


def limit_values(
    agents: Iterable[str],
    hosts: Iterable[str],
    datastores: Iterable[str],
    *,
    per_agent: int,
    per_host: int,
    per_datastore: int,
    volumes: Iterable[str] = (),
) -> dict[str, int]:
    """Every limit a run needs with its value (a Hyper-V volume takes
    ``per_datastore``: it is the same kind of shared storage)."""
    values = {limit_name("agent", a): per_agent for a in agents}
    values.update({limit_name("host", h): per_host for h in hosts})
    values.update({limit_name("datastore", d): per_datastore for d in datastores})
    values.update({limit_name("volume", v): per_datastore for v in volumes})
    return values


def ensure_limits(values: Mapping[str, int]) -> None:
    """Create each limit, or set its value when it exists (upsert by name),
    then check that every one is there and active."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name, value in sorted(values.items()):
            if value < 1:
                raise ValueError(f"limit {name} must be at least 1, not {value}")
            client.upsert_global_concurrency_limit_by_name(name=name, limit=value)
        for name, value in sorted(values.items()):
            limit = client.read_global_concurrency_limit_by_name(name)
            if not limit.active:
                client.update_global_concurrency_limit(name, _active_update(value))


def _active_update(value: int):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    return GlobalConcurrencyLimitUpdate(active=True, limit=value)


def read_limits(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``name -> (limit, active_slots)`` as the server sees them now."""
    from prefect.client.orchestration import get_client

    out = {}
    with get_client(sync_client=True) as client:
        for name in names:
            limit = client.read_global_concurrency_limit_by_name(name)
            out[name] = (limit.limit, limit.active_slots)
    return out


def transient(error: BaseException) -> bool:
    """True when a failed request for slots is worth asking again: the
    server answered "not now" (:data:`_TRANSIENT_STATUS`, 5xx) or the
    connection failed (refused, reset, timed out)."""
    import httpx

    cause = error.__cause__
    if isinstance(cause, httpx.HTTPStatusError):
        code = cause.response.status_code
        return code in _TRANSIENT_STATUS or code >= 500
    return isinstance(cause, httpx.TransportError | OSError)


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """The wait before asking again after ``attempt`` refusals (0-based)."""
    base = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2**attempt)
    return base * (rng or random).uniform(0.5, 1.5)


@contextlib.contextmanager
def hold(
    names: list[str],
    lease_duration: float = DEFAULT_LEASE_SECONDS,
    *,
    patience: float | None = None,
    stopped: Callable[[], bool] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> Iterator[None]:
    """Hold one slot of every limit in ``names`` for the body (all at once:
    the server grants them together or not at all, so there is no deadlock
    between VMs asking in different orders).

    A transient refusal (:func:`transient`) is asked again with back-off for
    up to ``patience`` seconds (:data:`DEFAULT_PATIENCE_SECONDS` when None),
    then raises ``LimitsUnavailableError``; ``stopped()`` true (the run was
    interrupted) ends the wait with ``RunInterruptedError``."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    from ..errors import LimitsUnavailableError, RunInterruptedError

    logger = logger or log
    patience = DEFAULT_PATIENCE_SECONDS if patience is None else max(0.0, patience)
    give_up: float | None = None  # set by the first refusal of a streak
    with contextlib.ExitStack() as stack:
        attempt = 0
        while True:
            asked = time.monotonic()
            try:
                stack.enter_context(
                    concurrency(
                        names,
                        occupy=1,
                        lease_duration=max(lease_duration, MIN_LEASE_SECONDS),
                        strict=True,
                        # A snapshot is open while we hold the slots: one failed renewal
                        # (a server hiccup) must not abort the backup halfway.
                        raise_on_lease_renewal_failure=False,
                    )
                )
                break
            except ConcurrencySlotAcquisitionError as e:
                # A limit that does not exist (no cause) is a mistake, not a
                # refusal: every limit is made first.
                if e.__cause__ is None:
                    raise
                what = f"the Prefect server did not grant the limits {', '.join(names)}"
                now = time.monotonic()
                # Patience counts from the first refusal of a streak: a VM that
                # queued for its slots (the server answering "wait" for minutes)
                # and is then refused once starts a new streak.
                if give_up is None or now - asked > STREAK_GAP_SECONDS:
                    give_up, attempt = now + patience, 0
                left = give_up - now
                if not transient(e) or left <= 0:
                    tries = f" ({attempt + 1} requests)" if attempt else ""
                    raise LimitsUnavailableError(f"{what}{tries}: {e}") from e
                wait = min(backoff(attempt), left)
                attempt += 1
                logger.warning("%s (%s); asking again in %.1f s", what, _cause_text(e), wait)
                _sleep(wait, stopped)
                if stopped is not None and stopped():
                    raise RunInterruptedError(
                        f"the run was interrupted while asking again for the limits {', '.join(names)}"
                    ) from e
        yield


def _cause_text(e: BaseException) -> str:
    cause = e.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(e)


def _sleep(seconds: float, stopped: Callable[[], bool] | None) -> None:
    """Sleeps ``seconds``, in short naps when ``stopped`` can end it early."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if stopped is not None and stopped():
            return
        time.sleep(min(left, 0.2))
