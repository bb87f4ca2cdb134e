"""One shadow copy set per volume group, shared by the per-VM backups of one run on one host.

The Hyper-V writer quiesces every running VM with files on a set's volumes,
so N VMs of one volume backed up one set each are N^2 guest quiesces and N
serialized creations (VSS makes one set at a time per host). A `SetPool`
lets the per-VM procedures of one run (each in its own thread, under its own
limits) share one set per group of VMs whose files share volumes
(`inventory.volume_groups`, per exposure: a set is mounted on the host for
agents running there, or shared to one ``share_account``; agents that
read it the same way share it, each through its own ``windows_paths``):

- ``add`` every VM of the run (before any backup starts);
- ``acquire``: the first VM of a group to freeze makes one set
  (`shadowset.open_shadow_set`) for the group's VMs that have not finished
  yet; the others of the group block on that creation and then use the set;
- ``release``: a VM returns its share; the last share completes the set
  (BackupComplete if at least one member committed its point, docs/hyperv.md);
- ``leave``: a VM that fails before it freezes returns the share it was
  given, so that the set does not wait for it;
- ``close`` (the end of the run): every set still open is ended as failed.

A VM that comes back (a retry) after releasing its share gets a new set, of
the members of its group still pending, never the old one. The pool also
reconciles: before a set is made, runs that crashed backups left on the host
naming its VMs are removed, except the pool's own open sets (which a per-VM
reconcile would tear out from under the other members).

Plain Python, no Prefect: the orchestration makes one pool per host and run.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackupError, HypervisorError, InvalidInputError
from .client import HypervClient
from .inventory import HvVm, volume_groups
from .shadowset import ShadowSet, VmConsistency, on_host, open_shadow_set

log = logging.getLogger(__name__)

STATE_OFF = 3  # Msvm_ComputerSystem EnabledState: 3 is Off


@dataclass(eq=False)
class _Open:
    """A set of the pool: who still holds a share of it, and how many committed."""

    shadow: ShadowSet
    names: dict[str, str]  # member key -> the VM name the set was made with
    holders: set[str]
    made_unix: float = field(default_factory=time.time)  # the set's point in time
    committed: int = 0
    completed: bool = False


@dataclass(frozen=True)
class Share:
    """What ``acquire`` gives one VM: the set, what it gives the VM, and its point in time."""

    shadow: ShadowSet
    consistency: VmConsistency
    point_unix: float


@dataclass(eq=False)
class _Member:
    vm: HvVm
    agent: Any
    group: tuple[str, int] = ("", 0)
    set: _Open | None = None  # the set made for it (it may not have arrived yet)
    done: bool = False  # released (or left); a retry sets it back


@dataclass
class PoolStats:
    """What the pool did (for logs, tests and the benchmark)."""

    sets_made: int = 0
    sets_completed: int = 0
    backup_complete: int = 0  # sets completed with BackupComplete
    closed_open: int = 0  # sets ended as failed by ``close``
    problems: list[str] = field(default_factory=list)


def exposure(agent: Any) -> str:
    """How an agent reads a set: its mount points on the host, or a share for its account."""
    return "local" if on_host(agent) else f"share:{(getattr(agent, 'share_account', None) or agent.name).casefold()}"


def _key(name: str) -> str:
    return name.casefold()  # Hyper-V compares VM names without regard to case


class SetPool:
    """Shadow copy sets shared by the VMs of one host in one run.

    Args:
        host: the plan's `HypervHost`.
        run_id: the run's id; each set's host-side RunId is `shadowset.set_run_id`
            of it and the set's VMs.
        quiesce: the plan's policy (required, preferred, off).
        connect: makes a WinRM client of the host (for ``close``; the VMs'
            calls go through their own clients: one NTLM session per thread).
    """

    def __init__(self, host: Any, *, run_id: str, quiesce: str, connect: Callable[[], HypervClient]) -> None:
        self.host, self.run_id, self.quiesce, self.connect = host, run_id, quiesce, connect
        self.members: dict[str, _Member] = {}
        self.open: list[_Open] = []
        self.creating: set[tuple[str, int]] = set()
        self.closed = False
        self.grouped = False
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._seq = itertools.count(1)

    def add(self, vm: HvVm, agent: Any) -> None:
        """A VM of this run (as selection found it) and the agent that reads it."""
        with self._cond:
            if self.grouped:
                raise InvalidInputError(
                    f"VM {vm.name} added to the shadow set pool of {self.host.name} after its start"
                )
            self.members[_key(vm.name)] = _Member(vm, agent)

    def __contains__(self, name: str) -> bool:
        return _key(name) in self.members

    def _group(self) -> None:
        """Groups per exposure of the VMs whose files share volumes (once, at the first acquire)."""
        if self.grouped:
            return
        self.grouped = True
        by_agent: dict[str, list[_Member]] = {}
        for m in self.members.values():
            by_agent.setdefault(exposure(m.agent), []).append(m)
        for agent, ms in by_agent.items():
            by_vm = {id(m.vm): m for m in ms}
            for i, group in enumerate(volume_groups([m.vm for m in ms])):
                for vm in group:
                    by_vm[id(vm)].group = (agent, i)

    def acquire(self, name: str, now: HvVm, client: HypervClient) -> Share:
        """The set VM ``name`` reads from, and what it gives the VM: the set
        made for it by another member (waiting for its creation if needed),
        or a new one for the group's pending VMs made here through ``client``."""
        k = _key(name)
        with self._cond:
            self._group()
            m = self.members.get(k)
            if m is None:
                raise InvalidInputError(f"VM {name} is not in the shadow set pool of {self.host.name}")
            m.vm, m.done = now, False
            while True:
                if self.closed:
                    raise HypervisorError(f"VM {name}: the run ended before its shadow copy set was made")
                o = m.set
                if o is not None and not o.completed and k in o.holders:
                    return Share(o.shadow, o.shadow.of(o.names[k]), o.made_unix)
                if m.group not in self.creating:
                    break
                self._cond.wait(1.0)
            # Make the set: for this VM and the group's VMs not in an open set and not finished.
            batch = [
                x
                for x in self.members.values()
                if x is m
                or (
                    x.group == m.group
                    and not x.done
                    and (x.set is None or x.set.completed or _key(x.vm.name) not in x.set.holders)
                )
            ]
            # Reconcile (remove what crashed runs left naming these VMs) only a
            # VM that no open set of this run names: such a set is a member's,
            # the pool ends it itself.
            in_open = {n for o in self.open for n in o.names}
            reconcile = [x.vm.name for x in batch if _key(x.vm.name) not in in_open]
            self.creating.add(m.group)
        made: _Open | None = None
        try:
            for vm in reconcile:
                removed = (
                    client.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0, "VMName": vm}) or {}
                ).get("Removed")
                for r in removed if isinstance(removed, list) else [removed] if removed else []:
                    log.warning("VM %s: removed run %s left on the host since %s", vm, r.get("RunId"), r.get("Created"))
            vms = [x.vm for x in batch]
            # A VM that is off needs no quiescing; a set of VMs that are all off
            # would have no writer, which ``required`` would refuse.
            all_off = all(v.state == STATE_OFF for v in vms)
            quiesce = "preferred" if all_off and self.quiesce == "required" else self.quiesce
            shadow = open_shadow_set(
                client,
                self.host,
                m.agent,
                vms,
                run_id=f"{self.run_id}-{next(self._seq)}",
                quiesce=quiesce,
                reconcile=False,
            )
            made = _Open(shadow, {_key(v.name): v.name for v in vms}, {_key(v.name) for v in vms})
        finally:
            with self._cond:
                self.creating.discard(m.group)
                if made is not None:
                    self.stats.sets_made += 1
                    # a member that failed (left) while the set was being made holds no share
                    made.holders = {_key(x.vm.name) for x in batch if x is m or not x.done}
                    for x in batch:
                        if _key(x.vm.name) in made.holders:
                            x.set = made
                    self.open.append(made)
                    log.info(
                        "shadow copy set %s on %s for %d VM(s): %s",
                        made.shadow.set_id,
                        self.host.name,
                        len(made.holders),
                        ", ".join(sorted(made.names.values())),
                    )
                    closed = self.closed
                self._cond.notify_all()
        if made is not None and closed:
            self._finish(made, client, force_failed=True)
            raise HypervisorError(f"VM {name}: the run ended while its shadow copy set was made")
        return Share(made.shadow, made.shadow.of(made.names[k]), made.made_unix)

    def release(self, name: str, client: HypervClient, *, succeeded: bool) -> BackupError | None:
        """VM ``name`` returns its share (``succeeded``: its point is committed).
        The last share completes the set through ``client``; returns that problem, if any."""
        k = _key(name)
        with self._cond:
            m = self.members.get(k)
            if m is None:
                return None
            m.done = True
            o = m.set
            if o is None or o.completed or k not in o.holders:
                return None
            o.holders.discard(k)
            o.committed += bool(succeeded)
            if o.holders:
                return None
            o.completed = True
            self.open.remove(o)
        return self._finish(o, client)

    def leave(self, name: str, client: HypervClient) -> BackupError | None:
        """VM ``name`` failed before its freeze: it returns the share it may have been given."""
        return self.release(name, client, succeeded=False)

    def _finish(self, o: _Open, client: HypervClient, *, force_failed: bool = False) -> BackupError | None:
        o.completed = True
        ok = o.committed > 0 and not force_failed
        problem = o.shadow.complete(succeeded=ok, client=client)
        with self._cond:
            self.stats.sets_completed += 1
            self.stats.backup_complete += ok
            if problem is not None:
                self.stats.problems.append(str(problem))
        return problem

    def close(self) -> list[BackupError]:
        """The end of the run: every set still open is ended as failed (no BackupComplete). Never raises."""
        with self._cond:
            self.closed = True
            left = list(self.open)
            self.open.clear()
            for o in left:
                o.completed = True
            self._cond.notify_all()
        if not left:
            return []
        problems: list[BackupError] = []
        try:
            client = self.connect()
        except BackupError as e:
            return [e]
        for o in left:
            log.warning(
                "shadow copy set %s on %s was still open at the end of the run (%s): ended as failed",
                o.shadow.set_id,
                self.host.name,
                ", ".join(sorted(o.names[h] for h in o.holders)),
            )
            self.stats.closed_open += 1
            if (p := self._finish(o, client, force_failed=True)) is not None:
                problems.append(p)
        return problems


__all__ = ["SetPool", "PoolStats", "Share"]
