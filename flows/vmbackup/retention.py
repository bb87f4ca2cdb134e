"""Retention: which backups a keep-policy keeps, per VM.

The rules are those backup users know from restic and Proxmox: ``last``
keeps the newest N backups; ``hourly``/``daily``/``weekly``/``monthly``/
``yearly`` keep the newest backup of each of the newest N hours, days, ISO
weeks, months or years that have a backup. A backup kept by any rule is
kept. Periods are in UTC, so every agent of a site agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from .errors import InvalidInputError


class Dated(Protocol):
    id: str
    vm: str
    created_unix: float
    # ``attributes`` (a JSON object) is read when the object has it: its
    # ``vm_id`` says which VM the point is of.


def vm_id_of(b: Dated) -> str | None:
    """The point's ``vm_id`` attribute, or None (no attributes, or no id in them)."""
    a = getattr(b, "attributes", None)
    v = a.get("vm_id") if isinstance(a, dict) else None
    return v if isinstance(v, str) and v else None


def series(b: Dated) -> str:
    """Which VM a point is of, for retention: ``vm_id <id>`` when the point
    carries the hypervisor's id, else ``vm <label>``."""
    v = vm_id_of(b)
    return f"vm_id {v}" if v else f"vm {b.vm}"


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for name, value in self.rules():
            if value < 0:
                raise InvalidInputError(f"--keep-{name} must not be negative")

    def rules(self) -> list[tuple[str, int]]:
        return [(n, getattr(self, n)) for n in ("last", "hourly", "daily", "weekly", "monthly", "yearly")]

    def empty(self) -> bool:
        return all(v == 0 for _, v in self.rules())


def _period(rule: str) -> Callable[[datetime], object]:
    return {
        "hourly": lambda t: (t.year, t.month, t.day, t.hour),
        "daily": lambda t: (t.year, t.month, t.day),
        "weekly": lambda t: t.isocalendar()[:2],
        "monthly": lambda t: (t.year, t.month),
        "yearly": lambda t: t.year,
    }[rule]


@dataclass
class Decision:
    backup: Dated
    reasons: list[str] = field(default_factory=list)
    series: str = ""  # the VM the backup is of (:func:`series`)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def apply(policy: Policy, backups: Iterable[Dated]) -> list[Decision]:
    """Decides, for every backup, whether the policy keeps it and why.

    A VM is a :func:`series` (its ``vm_id``, or the label of a point
    without one). Returns the decisions newest first within each VM, VMs in
    the order of their newest point's name (then their series).
    """
    if policy.empty():
        raise InvalidInputError("a retention policy needs at least one --keep-* rule")
    by_vm: dict[str, list[Dated]] = {}
    for b in backups:
        by_vm.setdefault(series(b), []).append(b)
    for items in by_vm.values():
        items.sort(key=lambda b: (b.created_unix, b.id), reverse=True)
    out: list[Decision] = []
    for key in sorted(by_vm, key=lambda k: (by_vm[k][0].vm, k)):
        decisions = [Decision(b, series=key) for b in by_vm[key]]
        for rule, count in policy.rules():
            if count == 0:
                continue
            if rule == "last":
                for d in decisions[:count]:
                    d.reasons.append("last")
                continue
            key = _period(rule)
            seen: set[object] = set()
            for d in decisions:
                k = key(datetime.fromtimestamp(d.backup.created_unix, tz=UTC))
                if k in seen:
                    continue
                if len(seen) >= count:
                    break
                seen.add(k)
                d.reasons.append(rule)
        out.extend(decisions)
    return out


NEWEST_GOOD = "newest good"


@dataclass
class GuardedDecision(Decision):
    """A decision that knows whether its backup is good (trusted and verified
    sound); ``damaged`` holds the verify problem when it is not."""

    good: bool = True
    damaged: str | None = None


def apply_guarded(policy: Policy, backups: Iterable[Dated], damaged: dict[str, str]) -> list[GuardedDecision]:
    """The policy's decisions, with one guarantee on top: the newest good
    backup of every VM that has one is kept.

    ``backups`` are the trusted backups (untrusted manifests are never
    passed in, so they never count as kept); ``damaged`` maps the id of a
    backup that failed verify to its problem. A policy with any rule keeps
    a VM's newest backup; when that one (and maybe more) is damaged, the
    newest backup that is not is kept too, with the reason ``newest good``,
    so a VM whose latest backups are broken still has the one it can be
    restored from. Damaged backups that a rule keeps stay kept (they may be
    partly restorable); those no rule keeps are removed like any other.
    """
    out: list[GuardedDecision] = []
    for d in apply(policy, backups):
        bad = damaged.get(d.backup.id)
        out.append(GuardedDecision(d.backup, list(d.reasons), d.series, good=bad is None, damaged=bad))
    by_vm: dict[str, list[GuardedDecision]] = {}
    for g in out:
        by_vm.setdefault(g.series, []).append(g)
    for decisions in by_vm.values():
        # Decisions come newest first within a VM.
        newest_good = next((g for g in decisions if g.good), None)
        if newest_good is not None and not newest_good.keep:
            newest_good.reasons.append(NEWEST_GOOD)
    return out
