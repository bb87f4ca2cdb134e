"""The Hyper-V steps (`HypervSteps`) of the one per-VM procedure (`hypervisors/procedure.py`); docs/hyperv.md.

What the steps do: 1. reconcile: remove the runs an earlier (crashed) backup of this VM left on
   the host (`Remove-VmbackupShadowCopies.ps1 -VMName`); 2. describe the VM
   now (`Get-VmbackupVm.ps1`); 3. one shadow copy set of its volumes with the
   Hyper-V writer (`New-VmbackupShadowCopy.ps1`), shared to the agent or read
   on the host itself; 4. read every disk's chain top from the copy through
   the agent's `windows_paths` into ONE backup point (the mover follows the
   differencing chain inside the copy), with the configuration files in the
   point's config; 5. check that the copies still exist (Windows deletes the
   oldest when the shadow storage fills), commit, then `Complete-VmbackupShadowCopy.ps1
   -Succeeded $true` (the host's BackupComplete only after the data is
   durable; the guest's own VSS backup ran inside step 3); on every
   other path `-Succeeded $false`. The host's ledger holds what a killed
   process could not undo; the next backup of the VM or the sweeper removes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from ..errors import BackupError, HypervisorError, HypervQuiesceError, HypervScriptError, SnapshotError, WinRMError
from ..hypervisors import base as hv
from ..hypervisors.procedure import backup_one, rewrap
from ..pointmeta import Previous
from ..results import VmResult
from .client import HypervClient
from .inventory import HvVm, describe_vm, volume_of

log = logging.getLogger(__name__)

# The scripts' default working directory on the host (ledger, runs, mount points).
WORK_DIR = "C:\\ProgramData\\vmbackup"
FULL_REASON = "Resilient Change Tracking is not used yet: every backup reads the allocated content"
# Configuration files larger than this (a .vmrs holding a saved VM's memory)
# are listed in the point's config but not stored in it.
CONFIG_FILE_LIMIT = 16 << 20
STATE_OFF = 3  # Msvm_ComputerSystem EnabledState: 3 is Off


def shadow_run_id(run_id: str, vm: str) -> str:
    """The host-side RunId of one VM's backup in run ``run_id``: unique per (run, VM), ``[A-Za-z0-9-]{1,64}``."""
    digest = hashlib.sha256(f"{run_id}\0{vm}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9-]+", "-", f"{run_id[:32]}-{vm[:16]}").strip("-")
    return f"{readable}-{digest}"[-64:].lstrip("-")


def reconcile_vm(client: HypervClient, vm: str) -> list[dict[str, Any]]:
    """Remove every run on the host whose ledger entry names ``vm`` (whatever its age); return them."""
    answer = client.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0, "VMName": vm})
    removed = _list((answer or {}).get("Removed"))
    for r in removed:
        log.warning("VM %s: removed run %s left on the host since %s", vm, r.get("RunId"), r.get("Created"))
    return removed


def _on_host(agent: Any) -> bool:
    """Whether the agent runs on the host: it maps the scripts' working directory (a drive key)."""
    return agent.map_windows_path(WORK_DIR + "\\runs\\") is not None


class HypervSteps:
    """``hypervisors.base.VmSteps`` for one Hyper-V VM."""

    cleanup_keeps_class = True

    def __init__(
        self, client: HypervClient, vm: HvVm, plan: Any, host: Any, agent: Any, *, run_id: str, pool: Any = None
    ) -> None:
        self.client, self.vm, self.plan, self.host, self.agent, self.run_id = client, vm, plan, host, agent, run_id
        # A `setpool.SetPool` of the run: the VM shares its group's shadow copy
        # set (docs/hyperv.md, "Volume groups"); None: a set of its own.
        self.pool = pool
        self.name = vm.name
        self.rid = shadow_run_id(run_id, vm.name)
        self.now: HvVm | None = None
        self.disks: list[Any] = []
        self.local = _on_host(agent)
        self.started = False
        self.copies: list[dict[str, Any]] = []
        self.made: dict[str, Any] = {}
        self.roots: dict[str, str] = {}

    def reconcile(self) -> None:
        # With a pool, the pool reconciles once per set it makes: a per-VM
        # reconcile would remove the open set this VM shares with others.
        if self.pool is None:
            reconcile_vm(self.client, self.vm.name)

    def describe(self, result: VmResult) -> None:
        try:
            self._describe(result)
        except BaseException:
            if self.pool is not None:  # a set made for it meanwhile must not wait for it
                self.pool.leave(self.vm.name, self.client)
            raise

    def _describe(self, result: VmResult) -> None:
        self.now = now = describe_vm(self.client, self.host, self.vm.name)
        self.name = result.vm = now.name
        excluded = set(self.plan.selection.exclude_disks.get(self.vm.name, []))
        self.disks = [d for d in now.disks if d.name not in excluded]
        result.host = self.host.name
        result.vm_id = now.id
        result.datastores = list(now.volume_keys)
        if not self.local and not getattr(self.agent, "share_account", None):
            raise HypervisorError(
                f"agent {self.agent.name} maps no path for {WORK_DIR} (where host {self.host.name} mounts shadow "
                "copies) and has no share_account to share them to"
            )

    def freeze(self) -> hv.Frozen:
        now = self.now
        assert now is not None
        if self.pool is not None:
            return self._freeze_shared(now)
        # A VM that is off needs no quiescing: ``required`` is satisfied by
        # its disks at rest, so the script is asked for what it can give.
        off = now.state == STATE_OFF
        quiesce = "preferred" if off and self.plan.quiesce == "required" else self.plan.quiesce
        params: dict[str, Any] = {
            "RunId": self.rid,
            "VMName": [now.name],
            "Volumes": list(now.volumes),
            "Quiesce": quiesce,
        }
        if not self.local:
            params["ShareTo"] = self.agent.share_account
        self.started = True
        self.made = made = self.client.run_script("New-VmbackupShadowCopy.ps1", params)
        point_unix = time.time()  # the backup's point in time
        self.copies = _list(made.get("ShadowCopies"))
        reasons = [str(r) for r in _list(made.get("Reasons"))]
        consistency = made["Consistency"]
        if f"{now.name} is not running" in reasons:
            # Off when the set was made (the script's own view): nothing ran,
            # the disks are at rest, which satisfies quiesce: required.
            consistency, reasons = hv.POWERED_OFF, []
        elif quiesce != self.plan.quiesce and consistency != hv.APPLICATION:
            # It was started after describe: ``required`` holds again.
            raise HypervQuiesceError(f"cannot quiesce VM {now.name}: {'; '.join(reasons)}", "QuiesceUnavailable")
        for c in self.copies:
            self.roots[str(c["Volume"]).lower()] = c["ExposedPath"] if self.local else c["SharePath"]
        label = self.copies[0]["ShadowId"] if self.copies else None
        return hv.Frozen(point_unix, consistency, "; ".join(reasons) or None, made, label)

    def _freeze_shared(self, now: HvVm) -> hv.Frozen:
        """The VM's share of its group's set (made now, or by another VM of the group)."""
        self.started = True
        share = self.pool.acquire(self.vm.name, now, self.client)
        shadow, c = share.shadow, share.consistency
        self.rid, self.copies, self.made = shadow.run_id, list(shadow.copies), {"SetId": shadow.set_id}
        self.roots = shadow.roots
        consistency, reasons = c.consistency, list(c.reasons)
        if f"{c.name} is not running" in reasons:
            consistency, reasons = hv.POWERED_OFF, []  # off when the set was made: nothing ran
        elif self.plan.quiesce == "required" and consistency != hv.APPLICATION:
            raise HypervQuiesceError(f"cannot quiesce VM {now.name}: {'; '.join(reasons)}", "QuiesceUnavailable")
        label = self.copies[0]["ShadowId"] if self.copies else None
        return hv.Frozen(share.point_unix, consistency, "; ".join(reasons) or None, self.made, label)

    def _in_copy(self, winpath: str) -> Path:
        root = volume_of(winpath)
        base = self.roots.get(root.lower())
        if not base:
            raise HypervisorError(
                f"VM {self.name}: {winpath} is on no volume of shadow copy set {self.made.get('SetId')}"
            )
        inside = base.rstrip("\\") + "\\" + winpath[len(root) :]
        mapped = self.agent.map_windows_path(inside)
        if mapped is None:
            raise HypervisorError(f"VM {self.name}: agent {self.agent.name} has no windows_paths entry for {inside}")
        return Path(mapped)

    def expose(self, frozen: hv.Frozen) -> hv.Exposed:
        detail = ("shadow copy mounted at " if self.local else "shadow copy shared as ") + ", ".join(
            str(r) for r in self.roots.values()
        )
        try:
            sources = {d.name: str(self._in_copy(d.path)) for d in self.disks}
        except OSError as e:
            raise self.still_frozen(frozen, e) or HypervisorError(
                f"VM {self.name}: reading the shadow copy failed: {e}"
            ) from None
        return hv.Exposed(sources, "local" if self.local else "share", detail)

    def plan_reads(self, frozen: hv.Frozen, exposed: hv.Exposed, previous: Previous | None) -> hv.ReadPlan:
        # Every backup is a full (no Resilient Change Tracking yet): ``previous`` is not a base.
        reads = [
            hv.DiskRead(
                name=d.name,
                source=exposed.sources[d.name],
                capacity=d.size,
                full_reason=FULL_REASON,
                row={"file": d.path, "chain": list(d.chain), "volume": d.volume},
            )
            for d in self.disks
        ]
        # Pass-through and SMB disks the host's shadow copy cannot hold (inventory).
        skipped = self.now.skipped() if self.now is not None else []
        return hv.ReadPlan(None, reads, FULL_REASON, skipped)

    def still_frozen(self, frozen: hv.Frozen, error: BaseException | None) -> BaseException | None:
        """A clear error if a copy of the set is gone (else None): a read
        from a deleted shadow copy fails, or on the lab reads on."""
        try:
            lost = _lost_copies(self.client, self.rid, self.copies)
        except BackupError:
            if error is None:
                raise
            return None  # the check failed too: the original error says more
        if not lost:
            return None
        return SnapshotError(
            f"VM {self.name}: shadow copy {lost[0]['ShadowId']} of {lost[0]['Volume']} vanished during the backup "
            "(Windows deletes a volume's oldest shadow copies when its shadow storage is full; "
            "see vssadmin resize shadowstorage): no backup point was committed"
        )

    def point(
        self, frozen: hv.Frozen, exposed: hv.Exposed, reads: hv.ReadPlan, disks: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any]]:
        now = self.now
        assert now is not None
        try:
            config = _config(now, self.host, self._in_copy)
        except OSError as e:
            raise self.still_frozen(frozen, e) or HypervisorError(
                f"VM {self.name}: reading the shadow copy failed: {e}"
            ) from None
        return json.dumps(config), {
            "tool": "vmbackup hyperv",
            "run_id": self.run_id,
            "shadow_run_id": self.rid,
            "host": self.host.name,
            "agent": self.agent.name,
            "transport": exposed.transport,
            "consistency": frozen.consistency,
            "consistency_note": frozen.note,
            "shadow_set_id": self.made.get("SetId"),
            "shadow_ids": [c["ShadowId"] for c in self.copies],
            "volumes": list(now.volumes),
            "excluded_disks": sorted(set(self.plan.selection.exclude_disks.get(self.vm.name, []))),
        }

    def committed(self, backup_id: str, mode: str) -> None:
        pass  # BackupComplete is part of release (Complete-VmbackupShadowCopy.ps1 -Succeeded)

    def release(self, frozen: hv.Frozen | None, *, succeeded: bool) -> list[BaseException]:
        if not self.started:
            return []
        if self.pool is not None:  # the last member's release completes the set
            problem = self.pool.release(self.vm.name, self.client, succeeded=succeeded)
        else:
            problem = _complete(self.client, self.rid, succeeded=succeeded)
        if problem is None:
            return []
        return [rewrap(problem, f"ending shadow copy run {self.rid} on {self.host.name} failed: {problem}")]


def backup_vm(
    client: HypervClient,
    vm: HvVm,
    plan: Any,
    host: Any,
    agent: Any,
    *,
    run_id: str,
    cancel: Any = None,
    progress: Any = None,
    on_shadow: Any = None,
    pool: Any = None,
) -> VmResult:
    """Backs up one Hyper-V VM into one backup point in ``plan.repository``.

    Args:
        client: WinRM to ``host`` (`inventory.connect`).
        vm: the VM as `inventory.select_vms` found it (re-read from the host here).
        plan: the plan (repository, quiesce policy, limits.disks_per_vm,
            selection.exclude_disks).
        host: the plan's `HypervHost` the VM is on.
        agent: the plan's `Agent` that reads the disks: through its
            ``windows_paths`` a drive key means it runs on the host (reads the
            shadow copy's mount point, transport ``local``), else the copy is
            shared to ``agent.share_account`` (transport ``share``).
        run_id: the flow run; the host-side RunId is `shadow_run_id(run_id, vm.name)`.
        cancel: a mover ``CancelToken``; cancelling stops the disk reads.
        progress: ``progress(done_bytes, total_bytes)`` about once a second.
        on_shadow: ``on_shadow(shadow_id)`` once the shadow copy exists and
            before any disk is read (the copy of the VM's first volume; all ids
            are in the point's attributes).
        pool: the run's `setpool.SetPool` of ``host`` (the VM was added to it):
            the VM reads from its volume group's shared set; None: a set of its own.

    Raises:
        ``vmbackup.errors`` classes (``retryable`` set): `HypervQuiesceError`
        when the plan requires application consistency and it cannot be had,
        `HypervVmNotFoundError`, `SnapshotError` when a shadow copy of the
        set vanished before the commit, WinRM errors, mover errors. The shadow copy is
        ended and deleted on every path; when that fails after the backup point
        was committed, the error says so and keeps its class (a dropped
        session is retryable; the host's ledger keeps the run for the sweeper).
    """
    try:
        return backup_one(
            HypervSteps(client, vm, plan, host, agent, run_id=run_id, pool=pool),
            hypervisor="hyperv",
            repository=str(plan.repository),
            agent=agent.name,
            disks_per_vm=plan.limits.disks_per_vm,
            cancel=cancel,
            progress=progress,
            on_frozen=on_shadow,
        )
    finally:
        if pool is not None:
            # Whatever failed before the freeze (or after it, without a
            # release): the VM's share, if it was given one, goes back
            # (a no-op after its release).
            if (problem := pool.leave(vm.name, client)) is not None:
                log.error("VM %s: ending its shadow copy set failed: %s", vm.name, problem)


def _complete(client: HypervClient, rid: str, *, succeeded: bool) -> BackupError | None:
    """End run ``rid`` on the host (BackupComplete only if ``succeeded``) and delete its copies.

    Returns the error if that failed; a run that never reached the ledger
    (the script refused before creating anything) is not an error.
    """
    try:
        client.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": rid, "Succeeded": succeeded})
    except HypervScriptError as e:
        if e.code == "RunNotFound":
            return None
        return e
    except (WinRMError, BackupError) as e:
        return e
    return None


def _lost_copies(client: HypervClient, rid: str, copies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's shadow copies that no longer exist on the host (`Get-VmbackupHost.ps1`'s ``Existing``)."""
    runs = _list((client.run_script("Get-VmbackupHost.ps1") or {}).get("Runs"))
    run = next((r for r in runs if r.get("RunId") == rid), None)
    existing = set(_list(run.get("Existing"))) if run else set()
    return [c for c in copies if c.get("ShadowId") not in existing]


def _config(vm: HvVm, host: Any, in_copy: Any) -> dict[str, Any]:
    """The point's config: the VM's identity and its configuration files from the copy (base64)."""
    files = []
    for path in vm.config_files:
        entry: dict[str, Any] = {"path": path}
        src = in_copy(path)
        size = src.stat().st_size
        entry["size"] = size
        if size <= CONFIG_FILE_LIMIT:
            entry["data_base64"] = base64.b64encode(src.read_bytes()).decode("ascii")
        else:
            entry["skipped"] = f"larger than {CONFIG_FILE_LIMIT} bytes"
        files.append(entry)
    return {
        "hypervisor": "hyperv",
        "host": host.name,
        "name": vm.name,
        "id": vm.id,
        "state": vm.state,
        "backup_enabled": vm.backup_enabled,
        "volumes": list(vm.volumes),
        "disks": [{"name": d.name, "file": d.path, "chain": list(d.chain), "size": d.size} for d in vm.disks],
        "config_files": files,
        # the description a restore rebuilds the VM from when the .vmcx cannot be imported (hyperv/restore.py)
        "configuration_location": vm.configuration_location,
        "generation": vm.generation,
        "version": vm.version,
        "cpus": vm.cpus,
        "memory_mb": vm.memory_mb,
        "nics": [{"switch": s, "mac": m} for s, m in vm.nics],
    }


def _list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]
