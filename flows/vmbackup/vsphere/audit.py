"""The CBT audit of one vSphere VM (docs/vsphere.md, "CBT audit").

1. The VM's latest backup point and, per disk, the change id it recorded.
2. Reconcile, then a snapshot of ours (``vmbackup-<run id>``, memory off, not
   quiesced: the audit compares bytes, it needs no application consistency),
   written in the ledger before it is taken, like a backup's.
3. ``QueryChangedDiskAreas(snapshot, disk, change id of the point)``: what
   changed since the point. Everything else CBT vouches for: those bytes must
   be the point's.
4. The snapshot's disks exposed by the plan's transports, in the agent's
   order, as a backup would (hot-add, direct, NBD), and read through the
   mover's ``DiskReader``; the point's disks read through the mover's
   ``DiskReader.backup`` (every chunk checked against its id). A sample of the
   unchanged areas (``N`` blocks of 64 KiB per disk drawn at random from the
   unchanged areas that hold data, or all of them) is compared.
5. Cleanup in ``finally``, as after a backup: transport closed, snapshot
   removed, consolidation checked, ledger entry removed.

A difference marks the chain broken (``broken_chains.mark``): the next backup
of the VM is a full with the reason. Plain Python: no Prefect.
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from pyVmomi import vmodl

from .. import planning
from ..audit import AuditResult, AuditSample, DiskAudit, Mismatch, skipped
from ..errors import BackupError, HypervisorBusyError, HypervisorError
from ..plan import Agent, Plan
from . import broken_chains, cbt, snapshots
from .faults import hypervisor_error
from .inventory import DiskInfo, VmInfo, vm_info
from .ledger import Entry, Ledger
from .reconcile import reconcile_vm
from .transport import Context, Transport, expose, frozen_disks

log = logging.getLogger(__name__)

TASK_TIMEOUT = 600.0
BLOCK = 64 << 10  # vSphere's CBT granularity on small disks; a sampled block
PIECE = 4 << 20  # reads of "all" go by this much, then by BLOCK where they differ

Extent = tuple[int, int]  # (start, length)


# --- extent arithmetic (pure) -------------------------------------------------


def _merge(areas: Sequence[Extent], capacity: int) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) spans clipped to the disk."""
    spans = sorted((max(0, s), min(capacity, s + n)) for s, n in areas if n > 0)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def unchanged(changed: Sequence[Extent], capacity: int) -> list[Extent]:
    """The complement of CBT's changed areas within the disk."""
    out, pos = [], 0
    for s, e in _merge(changed, capacity):
        if s > pos:
            out.append((pos, s - pos))
        pos = e
    if pos < capacity:
        out.append((pos, capacity - pos))
    return out


def intersect(a: Sequence[Extent], b: Sequence[Extent], capacity: int) -> list[Extent]:
    """The areas in both ``a`` and ``b``."""
    x, y = _merge(a, capacity), _merge(b, capacity)
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        s, e = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if s < e:
            out.append((s, e - s))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def sample_blocks(areas: Sequence[Extent], count: int | None, rng: random.Random) -> list[Extent]:
    """``count`` distinct BLOCK-aligned blocks (clipped to ``areas``) drawn at
    random, in disk order; every block when ``count`` is None or not smaller."""
    firsts, counts = [], []
    for s, n in areas:
        first, last = s // BLOCK, (s + n - 1) // BLOCK
        firsts.append(first)
        counts.append(last - first + 1)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    total = cum[-1]
    picks = range(total) if count is None or count >= total else sorted(rng.sample(range(total), count))
    out = []
    for k in picks:
        i = bisect.bisect_right(cum, k) - 1
        s, n = areas[i]
        a = (firsts[i] + k - cum[i]) * BLOCK
        start, end = max(a, s), min(a + BLOCK, s + n)
        out.append((start, end - start))
    return out


def _pieces(areas: Sequence[Extent], size: int) -> list[Extent]:
    return [(s + o, min(size, n - o)) for s, n in areas for o in range(0, n, size)]


# --- comparing ----------------------------------------------------------------


def compare(disk: str, snap: Any, point: Any, areas: Sequence[Extent], audit: DiskAudit) -> None:
    """Reads ``areas`` from both readers; a differing area is located to BLOCK."""
    for off, n in areas:
        a, b = snap.read(off, n), point.read(off, n)
        audit.bytes_compared += n
        audit.blocks_compared += 1
        if a == b:
            continue
        for o in range(0, n, BLOCK):
            if a[o : o + BLOCK] != b[o : o + BLOCK]:
                m = audit.mismatches
                ln = min(BLOCK, n - o)
                if m and m[-1].offset + m[-1].length == off + o:
                    m[-1].length += ln
                else:
                    m.append(Mismatch(disk, off + o, ln))


# --- the VM ---------------------------------------------------------------------


def latest_point(repository: str, vm: str, vm_id: str | None = None) -> Any:
    """The VM's newest trusted backup point (``_mover.BackupInfo``), or None:
    the one its next backup would build on (``pointmeta.latest``: by ``vm_id``,
    so of two VMs with one name each is compared with its own point)."""
    from .. import _mover
    from ..pointmeta import latest

    previous = latest(repository, vm, vm_id)
    if previous is None:
        return None
    infos, _untrusted = _mover.list_backups(repository)
    return next((b for b in infos if b.id == previous.backup_id), None)


def _comparable(disks: Sequence[DiskInfo], point: Any) -> tuple[list[DiskInfo], list[DiskAudit]]:
    """The disks that can be compared with the point, and a skipped row for the others."""
    in_point = {d.name: d for d in point.disks}
    uuids = {d.get("name"): d.get("uuid") for d in (point.attributes or {}).get("disks", []) if isinstance(d, dict)}
    ok, other = [], []
    for d in disks:
        p = in_point.get(d.name)
        why = None
        if p is None:
            why = "not in the point (a new disk)"
        elif p.disk_size != d.capacity:
            why = f"resized since the point ({p.disk_size} -> {d.capacity} bytes)"
        elif uuids.get(d.name) and d.uuid and uuids[d.name] != d.uuid:
            why = "replaced since the point (another virtual disk uuid)"
        elif not p.change_id:
            why = "the point recorded no change id"
        if why is None:
            ok.append(d)
        else:
            other.append(DiskAudit(d.name, change_id=p.change_id if p else None, skipped=why))
    return ok, other


def audit_vm(
    client: Any,
    vm: VmInfo,
    plan: Plan,
    agent: Agent,
    *,
    run_id: str,
    sample: AuditSample,
    rng: random.Random | None = None,
    timeout: float = TASK_TIMEOUT,
) -> AuditResult:
    """Audits one VM's latest point against CBT; see the module's docstring.

    Returns ``ok``, ``mismatch`` (the chain is then marked broken) or
    ``skipped`` (with the reason). Raises ``vmbackup.errors`` classes when the
    audit itself fails; the snapshot is removed on every path.
    """
    from .. import _mover

    rng = rng or random.Random()
    t0 = time.monotonic()
    repo = str(plan.repository)
    obj = client.vm_by_moref(vm.moref)
    res = AuditResult(vm=vm.name, status="ok", host=vm.host, sample=sample.describe())
    try:
        res.vm_id = obj.config.instanceUuid
        cbt_on = bool(obj.config.changeTrackingEnabled)
    except vmodl.fault.ManagedObjectNotFound:
        return skipped(vm.name, "the VM does not exist any more", host=vm.host)
    point = latest_point(repo, vm.name, res.vm_id)
    if point is None:
        res.status, res.reason = "skipped", "no backup point yet"
        return res
    if not cbt_on:
        res.status, res.reason = "skipped", "CBT is off (the next backup switches it on and is a full)"
        return res
    res.point, res.point_created = point.id, point.created
    excluded = set(plan.selection.exclude_disks.get(vm.name, []))
    info = vm_info(obj)
    disks, res.disks = _comparable([d for d in info.readable_disks if d.name not in excluded], point)
    # Independent disks and physical RDMs: no snapshot covers them, no backup reads them.
    res.disks += [DiskAudit(d.name, skipped=d.skip_reason) for d in info.disks if d.skip_reason]
    if not disks:
        res.status, res.reason = (
            "skipped",
            "no disk of the point can be compared: " + "; ".join(f"{d.name}: {d.skipped}" for d in res.disks),
        )
        return res
    change_ids = {d.name: d.change_id for d in point.disks}

    ledger = Ledger(repo)
    try:
        reconcile_vm(client, obj, vm.name, plan, ledger, current_run=run_id, timeout=timeout)
    except HypervisorBusyError as e:
        res.status, res.reason = "skipped", f"busy: {e}"
        return res
    entry = Entry(run_id=run_id, vm=vm.name, vm_moref=vm.moref)
    entry.snapshot = {"name": snapshots.snapshot_name(run_id)}
    ledger.hold(entry)  # [heartbeat wiring] written, then kept alive by a thread
    taken = None
    snap_t0 = 0.0
    transport: Transport | None = None
    body_error: BaseException | None = None
    audits: list[DiskAudit] = []
    try:
        taken = snapshots.create(
            obj, vm.name, run_id, quiesce_policy="off", tools_running=info.tools_running, timeout=timeout
        )
        snap_t0 = time.monotonic()
        entry.snapshot["moref"] = taken.snapshot._moId
        ledger.write(entry)
        plans: list[tuple[DiskInfo, DiskAudit, list[Extent]]] = []
        for d in disks:
            a = DiskAudit(d.name, change_id=change_ids[d.name])
            audits.append(a)
            try:
                changed = cbt.changed_areas(obj, taken.snapshot, d, a.change_id or "")
            except cbt.ChangeIdRejected as e:
                a.skipped = f"CBT was reset since the point ({e}): the next backup is a full"
                continue
            a.changed_bytes = sum(n for _, n in _merge_extents(changed, d.capacity))
            rest = unchanged(changed, d.capacity)
            a.unchanged_bytes = sum(n for _, n in rest)
            if not sample.everything:
                # Where a lie matters: areas that hold data now. An omitted
                # write allocates what it wrote, so it is in here.
                try:
                    rest = intersect(rest, cbt.changed_areas(obj, taken.snapshot, d, "*"), d.capacity)
                except (cbt.ChangeIdRejected, BackupError) as e:
                    log.info("VM %s disk %s: no allocated areas from CBT, sampling all: %s", vm.name, d.name, e)
            plans.append((d, a, rest))
        if plans:
            frozen = frozen_disks(taken.snapshot, [d for d, _, _ in plans])
            ctx = Context(client, obj, vm.name, taken.snapshot, plan, agent, run_id, ledger, entry, timeout)
            transport, sources = expose(ctx, frozen)
            res.transport = transport.name
            for d, a, rest in plans:
                snap = _mover.DiskReader.source(sources[d.name])
                pt = _mover.DiskReader.backup(repo, point.id, d.name)
                areas = _pieces(rest, PIECE) if sample.everything else sample_blocks(rest, sample.blocks, rng)
                compare(d.name, snap, pt, areas, a)
    except BaseException as e:
        body_error = e
        raise
    finally:
        problems = transport.close() if transport is not None else []
        if taken is not None:
            try:
                snapshots.remove(taken.snapshot, f"removing snapshot {taken.snapshot._moId} of VM {vm.name}", timeout)
            except BackupError as e:
                problems.append(str(e))
            res.snapshot_seconds = time.monotonic() - snap_t0
        try:
            snapshots.consolidate_if_needed(obj, vm.name, timeout)
        except BackupError as e:
            problems.append(str(e))
        except vmodl.MethodFault as e:
            problems.append(str(hypervisor_error(f"consolidating VM {vm.name}", e)))
        ledger.release(entry)  # [heartbeat wiring] the run lets go (a kept entry is a dead run's)
        if not problems:
            ledger.remove(entry)
        elif body_error is None:
            raise HypervisorError(f"the CBT audit of VM {vm.name} was done but cleanup failed: {'; '.join(problems)}")
        else:
            log.error("VM %s: cleanup after a failed audit failed too: %s", vm.name, "; ".join(problems))
    res.disks = audits + res.disks
    if res.mismatches:
        res.status = "mismatch"
        found = [m.to_dict() for m in res.mismatches]
        reason = broken_chains.reason_of(point.id, found)
        broken_chains.mark(
            repo,
            broken_chains.BrokenChain(
                vm=vm.name, point=point.id, reason=reason, vm_id=res.vm_id, run_id=run_id, mismatches=found
            ),
        )
        res.chain_marked_broken = True
        res.reason = reason
    elif not any(a.skipped is None for a in res.disks):
        res.status = "skipped"
        res.reason = "; ".join(f"{a.name}: {a.skipped}" for a in res.disks)
    res.seconds = time.monotonic() - t0
    return res


def _merge_extents(areas: Sequence[Extent], capacity: int) -> list[Extent]:
    return [(s, e - s) for s, e in _merge(areas, capacity)]


def _exact_pattern(name: str) -> str:
    """A pattern matching exactly ``name`` (so the vSphere selection does not
    refuse a name that is a Hyper-V VM's; the caller checks plain names)."""
    for i, ch in enumerate(name):
        if ch.isalnum():
            return f"{name[:i]}[{ch}]{name[i + 1 :]}"
    return name


def audit_vms(
    plan: Plan,
    selection: Any,
    password: Any,
    *,
    sample: AuditSample,
    rng: random.Random,
    run_id: str,
    strict: bool = True,
) -> list[AuditResult]:
    """Audits the selected vSphere VMs one after the other; one row each.

    An error auditing one VM is its ``failed`` row; the others go on.
    """
    from .client import VSphereClient
    from .inventory import select_vms

    if not strict:
        selection = selection.model_copy(
            update={"vms": [v if set("*?[") & set(v) else _exact_pattern(v) for v in selection.vms]}
        )
    rows: list[AuditResult] = []
    with VSphereClient.connect(plan.connection, password) as client:
        vms = select_vms(client, selection)
        assigned = planning.assign_agents(vms, plan.agents)
        agents = {a.name: a for a in plan.agents}
        for vm in vms:
            agent = assigned.assigned.get(vm.name)
            if agent is None:
                rows.append(skipped(vm.name, assigned.unassignable.get(vm.name, "no agent"), host=vm.host))
                continue
            try:
                rows.append(audit_vm(client, vm, plan, agents[agent], run_id=run_id, sample=sample, rng=rng))
            except Exception as e:  # the VM's row says why; the others are still audited
                log.error("VM %s: the CBT audit failed: %s", vm.name, e)
                rows.append(AuditResult(vm=vm.name, status="failed", host=vm.host, error=_one_line(e)))
    return rows


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, BackupError) else f"{type(e).__name__}: {text}"
