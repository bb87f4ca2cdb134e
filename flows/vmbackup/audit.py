"""The CBT audit over a plan (plain Python, no Prefect): did CBT tell the truth?

An incremental backup reads only what changed block tracking says changed;
if CBT leaves a write out, the backup point silently keeps the old bytes and
nobody learns it before a restore. The audit checks it, per VM: a
short-lived snapshot of ours, CBT asked what changed since the VM's latest
point, and a sample of the areas CBT says did *not* change read from the
snapshot and from the point and compared. Any difference means the point or
CBT is wrong: the chain is marked broken (the next backup is a full, with the
reason: ``vsphere/broken_chains.py``) and the VM's row says ``mismatch`` with
the offsets. The per-VM work is ``vsphere/audit.py``; this module selects the
plan's VMs, lists those it cannot audit as ``skipped`` (Hyper-V: no CBT; no
point yet; CBT off), and gathers the rows. The flow ``audit_cbt`` and the
command ``vmbackup maintain audit`` call :func:`audit_plan`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError

DEFAULT_SAMPLE = 64  # blocks per disk
MAX_SAMPLE = 1_000_000


@dataclass(frozen=True)
class AuditSample:
    """How much of the unchanged areas to compare: ``blocks`` random blocks per disk, or all of them (None)."""

    blocks: int | None = DEFAULT_SAMPLE

    @property
    def everything(self) -> bool:
        return self.blocks is None

    def describe(self) -> str:
        return "all" if self.blocks is None else f"{self.blocks} block(s) per disk"


def parse_audit_sample(text: str | int | None) -> AuditSample:
    """``None``: the default (64 blocks per disk); ``all``; or a count of blocks per disk."""
    if text is None:
        return AuditSample()
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    elif isinstance(text, str) and text.strip().lower() == "all":
        return AuditSample(None)
    else:
        try:
            n = int(str(text).strip())
        except ValueError:
            raise InvalidInputError(f"--sample: {text!r} is not a number of blocks or 'all'") from None
    if not 1 <= n <= MAX_SAMPLE:
        raise InvalidInputError(f"--sample: the number of blocks must be from 1 to {MAX_SAMPLE}, not {n}")
    return AuditSample(n)


@dataclass
class Mismatch:
    """An area CBT says did not change whose bytes differ between the snapshot and the point."""

    disk: str
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "offset": self.offset, "length": self.length}


@dataclass
class DiskAudit:
    """One disk: what CBT said changed since the point, and what was compared."""

    name: str
    change_id: str | None = None  # the point's, which CBT was asked from
    changed_bytes: int | None = None  # CBT's answer since the point
    unchanged_bytes: int | None = None
    bytes_compared: int = 0
    blocks_compared: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: str | None = None  # why this disk was not compared

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["mismatches"] = [m.to_dict() for m in self.mismatches]
        return d


@dataclass
class AuditResult:
    """One VM's audit: ``ok`` (every compared area matches), ``mismatch``
    (some do not: the chain is marked broken), ``skipped`` (cannot be audited:
    ``reason``) or ``failed`` (the audit itself failed: ``error``)."""

    vm: str
    status: str
    hypervisor: str = "vsphere"
    vm_id: str | None = None
    host: str | None = None
    point: str | None = None  # the backup id compared against
    point_created: str | None = None
    sample: str | None = None
    transport: str | None = None
    disks: list[DiskAudit] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    chain_marked_broken: bool = False
    snapshot_seconds: float | None = None
    seconds: float = 0.0

    @property
    def bytes_compared(self) -> int:
        return sum(d.bytes_compared for d in self.disks)

    @property
    def mismatches(self) -> list[Mismatch]:
        return [m for d in self.disks for m in d.mismatches]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "disks"}
        d["disks_compared"] = [x.name for x in self.disks if x.skipped is None]
        d["bytes_compared"] = self.bytes_compared
        d["mismatches"] = [m.to_dict() for m in self.mismatches]
        d["disks"] = [x.to_dict() for x in self.disks]
        return d


def skipped(vm: str, reason: str, **kw: Any) -> AuditResult:
    return AuditResult(vm=vm, status="skipped", reason=reason, **kw)


HYPERV_REASON = "Hyper-V: no changed block tracking to audit (vmbackup backs Hyper-V VMs up in full)"


def audit_plan(
    plan: Any,
    vms: Sequence[str] | None = None,
    sample: AuditSample | None = None,
    *,
    seed: int | None = None,
    vsphere_password: Any = None,
    hyperv_passwords: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> list[AuditResult]:
    """Audits the plan's selected VMs (or exactly ``vms``), one at a time; a row per VM.

    Passwords default to the plan's (environment variable or Secret block).
    Raises ``VmNotFoundError`` for a plain name in ``vms`` that no hypervisor
    of the plan has, and the connection's error when vCenter cannot be reached.
    """
    from .errors import VmNotFoundError
    from .plan import resolve_password

    sample = sample or AuditSample()
    rng = random.Random(seed)
    run_id = run_id or f"audit-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    selection = plan.selection
    if vms:
        selection = selection.model_copy(
            update={"vms": list(vms), "folders": [], "clusters": [], "hosts": [], "tags": [], "exclude": []}
        )
    rows: list[AuditResult] = []
    found: set[str] = set()
    for host in plan.hyperv:
        from .hyperv import inventory

        password = (hyperv_passwords or {}).get(host.name) or resolve_password(host)
        try:
            client = inventory.connect(host, password)
            hv_vms = inventory.select_vms(client, host, selection, strict=False)
        except Exception as e:  # one host's trouble never hides the others' rows
            rows.append(skipped(f"{host.name}:*", f"Hyper-V host {host.name} not reached: {e}", hypervisor="hyperv"))
            continue
        for v in hv_vms:
            found.add(v.name.casefold())
            rows.append(skipped(v.name, HYPERV_REASON, hypervisor="hyperv", vm_id=v.id, host=v.host))
    if plan.connection is not None:
        from .vsphere.audit import audit_vms

        password = vsphere_password or resolve_password(plan.connection)
        vrows = audit_vms(plan, selection, password, sample=sample, rng=rng, run_id=run_id, strict=False)
        found |= {r.vm.casefold() for r in vrows}
        rows += vrows
    missing = [n for n in (vms or ()) if not set("*?[") & set(n) and n.casefold() not in found]
    if missing:
        raise VmNotFoundError(f"VM {', '.join(missing)} does not exist in the plan's hypervisors")
    return sorted(rows, key=lambda r: (r.vm.casefold(), r.hypervisor))


def failed_vms(rows: Sequence[AuditResult]) -> list[str]:
    """The VMs that fail the audit: a mismatch, or an audit that could not finish."""
    return [r.vm for r in rows if r.status in ("mismatch", "failed")]
