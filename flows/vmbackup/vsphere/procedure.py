"""The whole backup of one VM, with cleanup on every path (docs/vsphere.md).

1. reconcile what earlier runs left; 2. enable CBT if off; 3. snapshot
(memory off, quiesce per policy); 4. expose the frozen disks by the first
transport of the plan's order that can; 5. read every disk into one backup
point with the VM's configuration; 6. detach, remove the snapshot,
consolidate. Steps 4-6 undo themselves in ``finally``; the ledger holds what
a killed process could not undo.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any
from urllib.parse import quote

from pyVmomi import vmodl

from ..errors import BackupError, HypervisorError, TaskTimeoutError, VmNotFoundError
from ..plan import Agent, Plan
from ..results import DiskProgress as _Progress
from ..results import VmResult, read_disks
from . import broken_chains, cbt, snapshots
from .faults import hypervisor_error
from .inventory import VmInfo, check_skipped, vm_info
from .ledger import Entry, Ledger
from .reconcile import reconcile_vm
from .transport import TRANSPORT_CLASSES, Context, Frozen, Transport, TransportImpossible, frozen_disks

log = logging.getLogger(__name__)

TASK_TIMEOUT = 600.0


def latest_backup(repository: str, vm: str) -> dict[str, Any] | None:
    """The newest backup of ``vm`` in the repository (manifest metadata), or None."""
    from .. import _mover

    infos, _untrusted = _mover.list_backups(repository)
    mine = [b for b in infos if b.vm == vm]
    if not mine:
        return None
    b = max(mine, key=lambda b: b.created_unix)
    return {
        "id": b.id,
        "created_unix": b.created_unix,
        "attributes": b.attributes,
        "disks": [{"name": d.name, "size": d.disk_size, "change_id": d.change_id} for d in b.disks],
    }


def _vm_config_json(vm: Any) -> str:
    from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder

    return json.dumps(vm.config, cls=VmomiJSONEncoder, sort_keys=True)


def _vmx_text(client: Any, vm: Any) -> str | None:
    """The .vmx file, from the datastore's HTTPS /folder access (None if it cannot be read)."""
    path = vm.config.files.vmPathName  # "[ds] vm/vm.vmx"
    if "] " not in path:
        return None
    ds, rel = path[1:].split("] ", 1)
    dc = client.datacenter_of(vm)
    url = f"{client.base_url}/folder/{quote(rel)}?dcPath={quote(dc.name if dc else '', safe='')}&dsName={quote(ds, safe='')}"
    req = urllib.request.Request(url, headers={"Cookie": client.cookie})
    try:
        with urllib.request.urlopen(req, context=client.ssl_context, timeout=60) as res:
            return res.read(4 << 20).decode("utf-8", errors="replace")
    except OSError as e:
        log.warning("reading %s failed: %s", path, e)
        return None


def _expose(ctx: Context, disks: list[Frozen]) -> tuple[Transport, dict[str, str]]:
    reasons = []
    order = [t for t in ctx.plan.transports if t in ctx.agent.transports]
    for name in order:
        t = TRANSPORT_CLASSES[name](ctx)
        try:
            return t, t.open(disks)
        except TransportImpossible as e:
            reasons.append(f"{name}: {e}")
            log.info("VM %s: transport %s impossible: %s", ctx.vm_name, name, e)
            problems = t.close()
            if problems:
                raise HypervisorError(f"undoing {name} for VM {ctx.vm_name} failed: {'; '.join(problems)}") from e
        except BaseException:
            t.close()
            raise
    raise HypervisorError(f"no transport reaches the disks of VM {ctx.vm_name}: " + "; ".join(reasons))


def backup_vm(
    client: Any,
    vm: VmInfo,
    plan: Plan,
    agent: Agent,
    *,
    run_id: str,
    cancel: Any = None,
    progress: Any = None,
    on_snapshot: Any = None,
) -> VmResult:
    """Backs up one VM into one backup point in ``plan.repository``.

    Raises ``vmbackup.errors`` classes (``retryable`` set) on failure; cleanup
    (detach, remove the snapshot, consolidate) runs on every path.
    ``on_snapshot(name)``, if given, is called once the snapshot exists and
    before any disk is read (a hook for post-snapshot scripts, and for tests).
    """
    from .. import _mover

    t0 = time.monotonic()
    repo = str(plan.repository)
    ledger = Ledger(repo)
    obj = client.vm_by_moref(vm.moref)
    try:
        obj.name  # noqa: B018 (is it still there?)
    except vmodl.fault.ManagedObjectNotFound:
        raise VmNotFoundError(f"VM {vm.name} does not exist any more") from None
    # vslife (item 6): one attempt id per try; reconcile cleans the run's earlier attempts.
    attempt = snapshots.new_attempt()
    reconcile_vm(
        client,
        obj,
        vm.name,
        plan,
        ledger,
        current_run=run_id,
        current_attempt=attempt,
        timeout=plan.timeouts.task,
        remove_timeout=plan.timeouts.snapshot_remove,
    )
    # [vstruth wiring] CBT is not switched on while the VM has snapshots (cbt.prepare).
    cbt_start = cbt.prepare(obj, vm.name, TASK_TIMEOUT)
    cbt_enabled = cbt_start.just_enabled
    info = vm_info(obj)
    excluded = set(plan.selection.exclude_disks.get(vm.name, []))
    # [vstruth wiring] independent disks / physical RDMs: never read; skipped or the VM fails.
    skipped = check_skipped(info, plan.independent_disks)
    if skipped:
        log.warning("VM %s: disks not backed up: %s", vm.name, skipped)
    disks = [d for d in info.readable_disks if d.name not in excluded]
    previous = latest_backup(repo, vm.name)
    # [audit wiring] a chain the CBT audit found broken makes this backup a full.
    broken = broken_chains.read(repo, vm.name, getattr(obj.config, "instanceUuid", None))
    star = cbt.star_epochs(disks, previous, cbt_start)  # [vstruth wiring] where CBT's "*" is valid

    entry = Entry(run_id=run_id, vm=vm.name, vm_moref=vm.moref, attempt=attempt)
    entry.snapshot = {"name": snapshots.snapshot_name(run_id), "attempt": attempt}
    ledger.hold(entry)  # [heartbeat wiring] written, then kept alive by a thread

    def note_task(key: str) -> Any:  # vslife: a snapshot task is in the ledger before it is waited for
        def note(moref: str) -> None:
            entry.snapshot[key] = moref
            ledger.write(entry)

        return note

    result = VmResult(
        vm=vm.name, status="ok", repository=repo, host=info.host, agent=agent.name, datastores=list(info.datastores)
    )
    result.skipped_disks = skipped  # [vstruth wiring]
    taken = None
    snap_t0 = 0.0
    transport: Transport | None = None
    session = None
    body_error: BaseException | None = None
    try:
        taken = snapshots.create(
            obj,
            vm.name,
            run_id,
            quiesce_policy=plan.quiesce,
            tools_running=info.tools_running,
            timeout=plan.timeouts.task,
            attempt=attempt,
            on_task=note_task("create_task"),
        )
        snap_t0 = time.monotonic()
        snap_unix = time.time()  # the backup's point in time
        entry.snapshot["moref"] = taken.snapshot._moId
        ledger.write(entry)
        result.consistency = taken.consistency
        result.consistency_note = taken.note or None
        if on_snapshot is not None:
            on_snapshot(snapshots.snapshot_name(run_id))
        frozen = frozen_disks(taken.snapshot, disks)
        plans, vm_reason = cbt.plan_disks(
            tuple(disks),
            previous,
            cbt_just_enabled=cbt_enabled,
            full_every_days=plan.full_every_days,
            cbt_off_reason=cbt_start.off_reason,  # [vstruth wiring]
            chain_broken=broken.reason if broken is not None else None,  # [audit wiring]
        )
        ctx = Context(
            client,
            obj,
            vm.name,
            taken.snapshot,
            plan,
            agent,
            run_id,
            ledger,
            entry,
            TASK_TIMEOUT,
            encryption=info.encryption,  # [vstruth wiring] encrypted VM: hot-add to an encrypted agent only
        )
        transport, sources = _expose(ctx, frozen)
        result.transport = transport.name
        result.transport_detail = transport.detail

        # What to read per disk: incrementals ask CBT; a rejected change id makes it a full.
        reads: dict[str, tuple[list[tuple[int, int]] | None, str | None]] = {}

        def areas(p: cbt.DiskPlan) -> tuple[list[tuple[int, int]] | None, str | None]:
            if p.full_reason is None:
                try:
                    return cbt.changed_areas(obj, taken.snapshot, p.disk, p.base_change_id or "*"), None
                except cbt.ChangeIdRejected as e:
                    return None, f"change id rejected, CBT was reset ({e})"
            return None, p.full_reason

        for p in plans:
            reads[p.disk.name] = areas(p)
        # For a full, CBT's "*" gives the allocated areas as of the snapshot:
        # the mover reads only those (within its source's own allocation map),
        # the rest is recorded as zeros. Without them (the query failed), the
        # source's map alone decides (an NBD export without block status is
        # then read whole).
        allocated: dict[str, list[tuple[int, int]] | None] = {}
        for p in plans:
            if reads[p.disk.name][0] is None:
                # [vstruth wiring] "*" filters a full only where it is documented valid.
                why_not = cbt.star_filter_reason(p.disk, star)
                if why_not is not None:
                    log.info("VM %s disk %s: read whole, not by CBT's areas: %s", vm.name, p.disk.name, why_not)
                    allocated[p.disk.name] = None
                    continue
                try:
                    allocated[p.disk.name] = cbt.changed_areas(obj, taken.snapshot, p.disk, "*")
                except (cbt.ChangeIdRejected, BackupError) as e:
                    log.warning(
                        "VM %s disk %s: no allocated areas from CBT, reading by the source's map: %s",
                        vm.name,
                        p.disk.name,
                        e,
                    )
                    allocated[p.disk.name] = None
        incremental = any(extents is not None for extents, _ in reads.values())
        parent = previous["id"] if incremental and previous else None
        session = _mover.BackupSession(repo, vm.name, parent)
        total = sum(d.capacity for d in disks)
        agg = _Progress(progress, total)
        by_name = {f.disk.name: f for f in frozen}

        def read(p: cbt.DiskPlan) -> dict[str, Any]:
            extents, reason = reads[p.disk.name]
            areas = allocated.get(p.disk.name)
            f = by_name[p.disk.name]
            # The disks of one session are read at once (the binding's add_disk
            # runs without the GIL and without holding the session).
            r = session.add_disk(
                sources[p.disk.name],
                p.disk.name,
                extents,
                f.change_id,
                progress=agg.for_disk(p.disk.name),
                cancel=cancel,
                allocated_extents=areas,
            )
            return {
                "name": p.disk.name,
                "key": p.disk.key,
                "uuid": p.disk.uuid,
                "file": f.file,
                "datastore": f.datastore,
                "capacity": p.disk.capacity,
                "change_id": f.change_id,
                "mode": "incremental" if extents is not None else "full",
                "full_reason": reason,
                "changed_bytes": sum(n for _, n in extents) if extents is not None else None,
                "allocated_bytes": sum(n for _, n in areas) if areas is not None else None,
                "bytes_read": r.bytes_read,
                "bytes_stored": r.bytes_stored,
                "seconds": r.seconds,
                "source_format": r.source_format,
            }

        disk_results = read_disks(read, plans, max_workers=plan.limits.disks_per_vm, session=session)
        mode = "incremental" if parent else "full"
        reasons = vm_reason or "; ".join(f"{d['name']}: {d['full_reason']}" for d in disk_results if d["full_reason"])
        last_full = (
            snap_unix if mode == "full" else (previous or {}).get("attributes", {}).get("last_full_unix", snap_unix)
        )
        attributes = {
            "tool": "vmbackup vsphere",
            "run_id": run_id,
            "vm_moref": vm.moref,
            "host": info.host,
            "agent": agent.name,
            "mode": mode,
            "full_reason": reasons or None,
            "transport": transport.name,
            "consistency": taken.consistency,
            "consistency_note": taken.note or None,
            "snapshot_unix": snap_unix,
            "last_full_unix": last_full,
            "excluded_disks": sorted(excluded),
            "skipped_disks": skipped,  # [vstruth wiring]
            "cbt_star_epochs": star,  # [vstruth wiring] read back by cbt.star_epochs
            "disks": [
                {k: d[k] for k in ("name", "key", "uuid", "file", "capacity", "change_id")} for d in disk_results
            ],
            "vmx": _vmx_text(client, obj),
        }
        info = session.commit(config=_vm_config_json(obj), attributes=json.dumps(attributes))
        session = None
        result.backup_id = info.id
        if broken is not None and mode == "full":
            broken_chains.clear(repo, broken)  # [audit wiring]
        result.mode = mode
        result.full_reason = reasons or None
        result.set_disks(disk_results)
    except BaseException as e:
        body_error = e
        raise
    finally:
        if session is not None:
            session.abort()
        problems = transport.close() if transport is not None else []
        # vslife (item 6): a snapshot task still running in vSphere (a timed-out
        # create or remove) keeps the ledger entry, which names the task, and
        # defers consolidation until it finished (the next attempt waits for it).
        pending = taken is None and isinstance(body_error, TaskTimeoutError) and "create_task" in entry.snapshot
        if pending:
            problems.append(f"creating the snapshot goes on in vSphere (task {entry.snapshot['create_task']})")
        if taken is not None:
            try:
                snapshots.remove(
                    taken.snapshot,
                    f"removing snapshot {taken.snapshot._moId} of VM {vm.name}",
                    plan.timeouts.snapshot_remove,
                    on_task=note_task("remove_task"),
                )
            except TaskTimeoutError as e:
                pending = True
                problems.append(f"{e}; consolidation waits for it")
            except BackupError as e:
                problems.append(str(e))
            result.snapshot_seconds = time.monotonic() - snap_t0
        try:
            if not pending:
                snapshots.consolidate_if_needed(obj, vm.name, plan.timeouts.task)
        except BackupError as e:
            problems.append(str(e))
        except vmodl.MethodFault as e:
            problems.append(str(hypervisor_error(f"consolidating VM {vm.name}", e)))
        ledger.release(entry)  # [heartbeat wiring] the run lets go (a kept entry is a dead run's)
        if not problems:
            ledger.remove(entry)
        elif body_error is None:
            raise HypervisorError(
                f"VM {vm.name} was backed up ({result.backup_id}) but cleanup failed: {'; '.join(problems)}"
            )
        else:
            log.error("VM %s: cleanup after a failure failed too: %s", vm.name, "; ".join(problems))
    result.seconds = time.monotonic() - t0
    return result
