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
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping

PREFIX = "vmbackup"
# Prefect refuses / % & > < in names; we keep a quieter set so names are also
# readable in URLs and shells, and add a hash when anything had to be replaced
# (so two different names never share a limit).
_SAFE = re.compile(r"[^A-Za-z0-9._:@+-]")
# The server accepts leases of 60 s to one day; a holder renews its lease
# well before it ends, so this bounds only how long a dead run keeps a slot.
DEFAULT_LEASE_SECONDS = 120.0
MIN_LEASE_SECONDS = 60.0


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


@contextlib.contextmanager
def hold(names: list[str], lease_duration: float = DEFAULT_LEASE_SECONDS) -> Iterator[None]:
    """Hold one slot of every limit in ``names`` for the body (all at once:
    the server grants them together or not at all, so there is no deadlock
    between VMs asking in different orders)."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    from ..errors import LimitsUnavailableError

    with contextlib.ExitStack() as stack:
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
        except ConcurrencySlotAcquisitionError as e:
            # An HTTP error or a dropped connection (the server busy: a 503
            # was seen at 300 VMs on a loaded machine) is transient, and
            # nothing has started: the task's retry asks again. A limit that
            # does not exist (no cause) is not: every limit is made first.
            if e.__cause__ is None:
                raise
            raise LimitsUnavailableError(f"the Prefect server did not grant the limits {', '.join(names)}: {e}") from e
        yield
