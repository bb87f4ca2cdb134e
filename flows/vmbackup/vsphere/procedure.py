"""The vSphere steps of the one per-VM procedure (``hypervisors/procedure.py``).

``VSphereSteps`` implements ``hypervisors.base.VmSteps``: reconcile what
earlier runs left (``reconcile.py``); describe the VM (and switch CBT on if
it is off); freeze = a snapshot (memory off, quiesce per policy; a
powered-off VM's is ``powered-off``); read the ``.vmx`` and the ``.nvram``
(``vmfiles.py``), then expose the frozen disks by the first transport of
the plan's order that can; plan the reads (CBT: incremental
per disk, or a full with its reason); check that our snapshot still exists
(by moref, in the VM's snapshot tree) before the commit; the point's config
is the snapshot's ``config`` (the VM's as of the snapshot); release =
detach, remove the snapshot, consolidate. The ledger holds what a killed
process could not undo.

``backup_vm(...)`` is the thin wrapper the orchestration and the tests call.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pyVmomi import vmodl

from ..errors import BackupError, HypervisorError, SnapshotVanishedError, TaskTimeoutError, VmNotFoundError
from ..hypervisors import base as hv
from ..hypervisors.procedure import backup_one
from ..plan import Agent, Plan
from ..pointmeta import Previous, latest
from ..results import VmResult
from . import broken_chains, cbt, snapshots
from .faults import hypervisor_error
from .inventory import VmInfo, check_skipped, vm_info
from .ledger import Entry, Ledger
from .reconcile import reconcile_vm
from .transport import Context, Frozen, Transport, expose, frozen_disks
from .vmfiles import nvram_entry, vmx_text

log = logging.getLogger(__name__)

TASK_TIMEOUT = 600.0


def latest_backup(repository: str, vm: str, vm_id: str | None = None) -> dict[str, Any] | None:
    """The newest backup of ``vm`` (by ``vm_id`` when given, see
    ``pointmeta.latest``) as the dict ``cbt.plan_disks`` reads, or None."""
    prev = latest(repository, vm, vm_id)
    return prev.as_dict() if prev is not None else None


def _snapshot_config_json(snapshot: Any, vm_name: str) -> str:
    """The VM's configuration as of the snapshot (``VirtualMachineSnapshot.config``:
    "the configuration of the virtual machine when this snapshot was taken"), as
    pyVmomi's JSON: a reconfiguration during the backup does not leak into the point."""
    from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder

    try:
        config = snapshot.config
    except vmodl.MethodFault as e:
        raise hypervisor_error(f"reading the configuration of snapshot {snapshot._moId} of VM {vm_name}", e) from e
    return json.dumps(config, cls=VmomiJSONEncoder, sort_keys=True)


class VSphereSteps:
    """``hypervisors.base.VmSteps`` for one vSphere VM."""

    cleanup_keeps_class = False

    def __init__(
        self,
        client: Any,
        vm: VmInfo,
        plan: Plan,
        agent: Agent,
        *,
        run_id: str,
        timeout: float = TASK_TIMEOUT,
    ) -> None:
        self.client, self.vm, self.plan, self.agent, self.run_id = client, vm, plan, agent, run_id
        self.name = vm.name
        self.timeout = timeout
        self.ledger = Ledger(str(plan.repository))
        self.obj: Any = None
        self.info: VmInfo | None = None
        self.cbt_enabled = False
        self.entry: Entry | None = None
        self.transport: Transport | None = None
        self.frozen_disks: list[Frozen] = []
        self.vanished = False
        self.attempt = snapshots.new_attempt()  # one per try: reconcile cleans the run's earlier attempts
        self.cbt_start: Any = None
        self.skipped: list[dict[str, str]] = []
        self.broken: Any = None
        self.star: Any = None
        self.taken_error: BaseException | None = None
        self.vmx: str | None = None
        self.nvram: dict[str, Any] = {}

    def reconcile(self) -> None:
        self.obj = self.client.vm_by_moref(self.vm.moref)
        try:
            self.obj.name  # noqa: B018 (is it still there?)
        except vmodl.fault.ManagedObjectNotFound:
            raise VmNotFoundError(f"VM {self.name} does not exist any more") from None
        reconcile_vm(
            self.client,
            self.obj,
            self.name,
            self.plan,
            self.ledger,
            current_run=self.run_id,
            current_attempt=self.attempt,
            timeout=self.plan.timeouts.task,
            remove_timeout=self.plan.timeouts.snapshot_remove,
        )

    def describe(self, result: VmResult) -> None:
        # CBT is not switched on while the VM has snapshots (cbt.prepare).
        self.cbt_start = cbt.prepare(self.obj, self.name, self.timeout)
        self.cbt_enabled = self.cbt_start.just_enabled
        self.info = info = vm_info(self.obj)
        result.host = info.host
        result.datastores = list(info.datastores)
        result.vm_id = _instance_uuid(self.obj)
        # Independent disks and physical RDMs: never read; skipped (or the VM fails).
        self.skipped = check_skipped(info, self.plan.independent_disks)
        if self.skipped:
            log.warning("VM %s: disks not backed up: %s", self.name, self.skipped)
        result.skipped_disks = list(self.skipped)
        # A chain the CBT audit found broken makes this backup a full.
        self.broken = broken_chains.read(str(self.plan.repository), self.name, result.vm_id)

    def freeze(self) -> hv.Frozen:
        info = self.info
        assert info is not None
        self.entry = Entry(run_id=self.run_id, vm=self.name, vm_moref=self.vm.moref, attempt=self.attempt)
        self.entry.snapshot = {"name": snapshots.snapshot_name(self.run_id), "attempt": self.attempt}
        self.ledger.hold(self.entry)  # written, then kept alive by a heartbeat thread
        try:
            taken = snapshots.create(
                self.obj,
                self.name,
                self.run_id,
                quiesce_policy=self.plan.quiesce,
                tools_running=info.tools_running,
                timeout=self.plan.timeouts.task,
                attempt=self.attempt,
                on_task=self._note_task("create_task"),
            )
        except BaseException as e:
            self.taken_error = e
            raise
        point_unix = time.time()  # the backup's point in time
        self.entry.snapshot["moref"] = taken.snapshot._moId
        self.ledger.write(self.entry)
        return hv.Frozen(
            point_unix, taken.consistency, taken.note or None, taken.snapshot, snapshots.snapshot_name(self.run_id)
        )

    def _note_task(self, key: str) -> Any:
        """A snapshot task is in the ledger before it is waited for (a timed-out one goes on)."""

        def note(moref: str) -> None:
            assert self.entry is not None and self.entry.snapshot is not None
            self.entry.snapshot[key] = moref
            self.ledger.write(self.entry)

        return note

    def _read_vm_files(self) -> None:
        """The .vmx and the .nvram (firmware variables), as soon after the
        snapshot as the procedure lets: once frozen, so that release undoes
        the snapshot whatever happens here. A file that cannot be read is a
        warning, not a failure; the API failing is (as in any step)."""
        try:
            dc = _dc_name(self.client, self.obj)
            self.vmx = vmx_text(self.client, self.obj, self.name, dc)
            self.nvram = nvram_entry(self.client, self.obj, self.name, dc)
        except vmodl.MethodFault as e:
            raise hypervisor_error(f"reading the file layout of VM {self.name}", e) from e

    def _disks(self) -> list[Any]:
        assert self.info is not None
        excluded = set(self.plan.selection.exclude_disks.get(self.name, []))
        return [d for d in self.info.readable_disks if d.name not in excluded]

    def expose(self, frozen: hv.Frozen) -> hv.Exposed:
        assert self.entry is not None
        self._read_vm_files()
        self.frozen_disks = frozen_disks(frozen.handle, self._disks())
        ctx = Context(
            self.client,
            self.obj,
            self.name,
            frozen.handle,
            self.plan,
            self.agent,
            self.run_id,
            self.ledger,
            self.entry,
            self.timeout,
            encryption=self.info.encryption if self.info is not None else None,  # hot-add to an encrypted agent only
        )
        self.transport, sources = expose(ctx, self.frozen_disks)
        return hv.Exposed(sources, self.transport.name, self.transport.detail)

    def plan_reads(self, frozen: hv.Frozen, exposed: hv.Exposed, previous: Previous | None) -> hv.ReadPlan:
        snap = frozen.handle
        unusable = previous.full_reason() if previous is not None else None
        base = previous.as_dict() if previous is not None and unusable is None else None
        disks = self._disks()
        self.star = cbt.star_epochs(disks, base, self.cbt_start)  # where CBT's "*" is valid
        plans, vm_reason = cbt.plan_disks(
            tuple(disks),
            base,
            cbt_just_enabled=self.cbt_enabled,
            full_every_days=self.plan.full_every_days,
            cbt_off_reason=self.cbt_start.off_reason,
            chain_broken=self.broken.reason if self.broken is not None else None,
        )
        if unusable is not None:
            vm_reason = unusable
            plans = [cbt.DiskPlan(p.disk, unusable) for p in plans]
        by_name = {f.disk.name: f for f in self.frozen_disks}
        reads: list[hv.DiskRead] = []
        for p in plans:
            f = by_name[p.disk.name]
            changed, reason = None, p.full_reason
            # Incrementals ask CBT; a rejected change id makes it a full.
            if p.full_reason is None:
                try:
                    changed = cbt.changed_areas(self.obj, snap, p.disk, p.base_change_id or "*")
                except cbt.ChangeIdRejected as e:
                    reason = f"change id rejected, CBT was reset ({e})"
            # For a full, CBT's "*" gives the allocated areas as of the
            # snapshot: the mover reads only those (within its source's own
            # allocation map), the rest is recorded as zeros. Without them
            # (the query failed), the source's map alone decides (an NBD
            # export without block status is then read whole).
            allocated = None
            # "*" filters a full only where it is documented valid.
            why_not = cbt.star_filter_reason(p.disk, self.star) if changed is None else None
            if why_not is not None:
                log.info("VM %s disk %s: read whole, not by CBT's areas: %s", self.name, p.disk.name, why_not)
            elif changed is None:
                try:
                    allocated = cbt.changed_areas(self.obj, snap, p.disk, "*")
                except (cbt.ChangeIdRejected, BackupError) as e:
                    why_not = f"CBT's allocated areas could not be read ({e})"
                    log.warning(
                        "VM %s disk %s: no allocated areas from CBT, reading by the source's map: %s",
                        self.name,
                        p.disk.name,
                        e,
                    )
            reads.append(
                hv.DiskRead(
                    name=p.disk.name,
                    source=exposed.sources[p.disk.name],
                    capacity=p.disk.capacity,
                    change_id=f.change_id,
                    changed=changed,
                    allocated=allocated,
                    full_reason=reason,
                    row={
                        "key": p.disk.key,
                        "uuid": p.disk.uuid,
                        "file": f.file,
                        "datastore": f.datastore,
                        # A full read whole rather than by CBT's "*" areas says why.
                        "read_whole_reason": why_not,
                    },
                )
            )
        incremental = any(r.changed is not None for r in reads)
        parent = previous.backup_id if incremental and previous is not None else None
        return hv.ReadPlan(parent, reads, vm_reason, list(self.skipped))

    def still_frozen(self, frozen: hv.Frozen, error: BaseException | None) -> BaseException | None:
        moref = frozen.handle._moId
        try:
            there = any(n.snapshot._moId == moref for n in snapshots.walk(self.obj))
        except vmodl.MethodFault as e:
            if error is not None:
                return None  # the check failed too: the read's error says more
            raise hypervisor_error(f"checking snapshot {moref} of VM {self.name}", e) from e
        if there:
            return None
        self.vanished = True
        return SnapshotVanishedError(
            f"VM {self.name}: snapshot {moref} ({frozen.label}) was removed by someone else during the backup: "
            "no backup point was committed"
        )

    def point(
        self, frozen: hv.Frozen, exposed: hv.Exposed, reads: hv.ReadPlan, disks: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any]]:
        assert self.info is not None
        return _snapshot_config_json(frozen.handle, self.name), {
            "tool": "vmbackup vsphere",
            "run_id": self.run_id,
            "vm_moref": self.vm.moref,
            "host": self.info.host,
            "folder": self.info.folder,  # "vm/prod/web": says which of two VMs of one name it is
            "agent": self.agent.name,
            "transport": exposed.transport,
            "consistency": frozen.consistency,
            "consistency_note": frozen.note,
            "excluded_disks": sorted(set(self.plan.selection.exclude_disks.get(self.name, []))),
            "cbt_star_epochs": self.star,  # read back by cbt.star_epochs
            "vmx": self.vmx,
            "nvram": self.nvram,  # docs/format.md, "What a vSphere point holds"
        }

    def release(self, frozen: hv.Frozen | None, *, succeeded: bool) -> list[BaseException]:
        problems: list[BaseException] = []
        if self.transport is not None:
            problems += [HypervisorError(p) for p in self.transport.close()]
        # A snapshot task still running in vSphere (a timed-out create or
        # remove) keeps the ledger entry, which names the task, and defers
        # consolidation until it finished (the next attempt waits for it).
        entry = self.entry
        pending = (
            frozen is None
            and isinstance(self.taken_error, TaskTimeoutError)
            and entry is not None
            and "create_task" in (entry.snapshot or {})
        )
        if pending:
            assert entry is not None and entry.snapshot is not None
            problems.append(
                TaskTimeoutError(f"creating the snapshot goes on in vSphere (task {entry.snapshot['create_task']})")
            )
        if frozen is not None and not self.vanished:
            snap = frozen.handle
            try:
                snapshots.remove(
                    snap,
                    f"removing snapshot {snap._moId} of VM {self.name}",
                    self.plan.timeouts.snapshot_remove,
                    on_task=self._note_task("remove_task"),
                )
            except TaskTimeoutError as e:
                pending = True
                problems.append(TaskTimeoutError(f"{e}; consolidation waits for it"))
            except BackupError as e:
                problems.append(e)
        if self.obj is not None and not pending:
            try:
                snapshots.consolidate_if_needed(self.obj, self.name, self.plan.timeouts.task)
            except BackupError as e:
                problems.append(e)
            except vmodl.MethodFault as e:
                problems.append(hypervisor_error(f"consolidating VM {self.name}", e))
        if entry is not None:
            self.ledger.release(entry)  # the run lets go (a kept entry is a dead run's)
            if not problems:
                self.ledger.remove(entry)
        return problems

    def committed(self, backup_id: str, mode: str) -> None:
        """After the commit: a full ends a chain the CBT audit marked broken."""
        if self.broken is not None and mode == "full":
            broken_chains.clear(str(self.plan.repository), self.broken)


def _dc_name(client: Any, obj: Any) -> str:
    dc = client.datacenter_of(obj)
    return dc.name if dc is not None else ""


def _instance_uuid(obj: Any) -> str | None:
    """vSphere's id of the VM (``config.instanceUuid``): kept across renames and moves."""
    try:
        return str(obj.config.instanceUuid) or None
    except AttributeError:
        return None


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
    return backup_one(
        VSphereSteps(client, vm, plan, agent, run_id=run_id),
        hypervisor="vsphere",
        repository=str(plan.repository),
        agent=agent.name,
        disks_per_vm=plan.limits.disks_per_vm,
        cancel=cancel,
        progress=progress,
        on_frozen=on_snapshot,
    )
