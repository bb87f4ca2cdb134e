"""The whole backup of one Hyper-V VM, with cleanup on every path (docs/hyperv.md).

1. reconcile: remove the runs an earlier (crashed) backup of this VM left on
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

from ..errors import BackupError, HypervisorError, HypervScriptError, SnapshotError, WinRMError
from ..results import DiskProgress, VmResult, read_disks
from .client import HypervClient
from .inventory import HvVm, describe_vm, volume_of

log = logging.getLogger(__name__)

# The scripts' default working directory on the host (ledger, runs, mount points).
WORK_DIR = "C:\\ProgramData\\vmbackup"
FULL_REASON = "Resilient Change Tracking is not used yet: every backup reads the allocated content"
# Configuration files larger than this (a .vmrs holding a saved VM's memory)
# are listed in the point's config but not stored in it.
CONFIG_FILE_LIMIT = 16 << 20


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


def _rewrap(e: BackupError, message: str) -> BackupError:
    """The same error class (and so the same ``retryable``) with a message that says more."""
    if isinstance(e, HypervScriptError):
        return type(e)(message, e.code)
    try:
        return type(e)(message)
    except TypeError:
        return HypervisorError(message)


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

    Raises:
        ``vmbackup.errors`` classes (``retryable`` set): `HypervQuiesceError`
        when the plan requires application consistency and it cannot be had,
        `HypervVmNotFoundError`, `SnapshotError` when a shadow copy of the
        set vanished before the commit, WinRM errors, mover errors. The shadow copy is
        ended and deleted on every path; when that fails after the backup point
        was committed, the error says so and keeps its class (a dropped
        session is retryable; the host's ledger keeps the run for the sweeper).
    """
    from .. import _mover

    t0 = time.monotonic()
    repo = str(plan.repository)
    rid = shadow_run_id(run_id, vm.name)
    reconcile_vm(client, vm.name)
    now = describe_vm(client, host, vm.name)
    excluded = set(plan.selection.exclude_disks.get(vm.name, []))
    disks = [d for d in now.disks if d.name not in excluded]
    local = _on_host(agent)
    result = VmResult(
        vm=now.name,
        status="ok",
        repository=repo,
        host=host.name,
        agent=agent.name,
        datastores=list(now.volume_keys),
        transport="local" if local else "share",
    )
    params: dict[str, Any] = {
        "RunId": rid,
        "VMName": [now.name],
        "Volumes": list(now.volumes),
        "Quiesce": plan.quiesce,
    }
    if not local:
        if not getattr(agent, "share_account", None):
            raise HypervisorError(
                f"agent {agent.name} maps no path for {WORK_DIR} (where host {host.name} mounts shadow copies) "
                "and has no share_account to share them to"
            )
        params["ShareTo"] = agent.share_account
    started = False
    snap_t0 = time.monotonic()
    session = None
    body_error: BaseException | None = None
    try:
        started = True
        made = client.run_script("New-VmbackupShadowCopy.ps1", params)
        snap_t0 = time.monotonic()
        shadow_unix = time.time()  # the backup's point in time
        copies = _list(made.get("ShadowCopies"))
        reasons = [str(r) for r in _list(made.get("Reasons"))]
        result.consistency = made["Consistency"]
        result.consistency_note = "; ".join(reasons) or None
        roots = {}
        for c in copies:
            roots[str(c["Volume"]).lower()] = c["ExposedPath"] if local else c["SharePath"]
        result.transport_detail = ("shadow copy mounted at " if local else "shadow copy shared as ") + ", ".join(
            str(r) for r in roots.values()
        )
        if on_shadow is not None:
            on_shadow(copies[0]["ShadowId"] if copies else None)

        def in_copy(winpath: str) -> Path:
            root = volume_of(winpath)
            base = roots.get(root.lower())
            if not base:
                raise HypervisorError(
                    f"VM {now.name}: {winpath} is on no volume of shadow copy set {made.get('SetId')}"
                )
            inside = base.rstrip("\\") + "\\" + winpath[len(root) :]
            mapped = agent.map_windows_path(inside)
            if mapped is None:
                raise HypervisorError(f"VM {now.name}: agent {agent.name} has no windows_paths entry for {inside}")
            return Path(mapped)

        def vanished(error: BaseException | None) -> BaseException | None:
            """A clear error if a copy of the set is gone (else None): a read
            from a deleted shadow copy fails, or on the lab reads on."""
            try:
                lost = _lost_copies(client, rid, copies)
            except BackupError:
                if error is None:
                    raise
                return None  # the check failed too: the original error says more
            if not lost:
                return None
            return SnapshotError(
                f"VM {now.name}: shadow copy {lost[0]['ShadowId']} of {lost[0]['Volume']} vanished during the backup "
                "(Windows deletes a volume's oldest shadow copies when its shadow storage is full; "
                "see vssadmin resize shadowstorage): no backup point was committed"
            )

        try:
            sources = {d.name: str(in_copy(d.path)) for d in disks}
            config = _config(now, host, in_copy)
        except OSError as e:
            raise vanished(e) or HypervisorError(f"VM {now.name}: reading the shadow copy failed: {e}") from None
        session = _mover.BackupSession(repo, now.name, None)
        agg = DiskProgress(progress, sum(d.size for d in disks))

        def read(d: Any) -> dict[str, Any]:
            r = session.add_disk(sources[d.name], d.name, progress=agg.for_disk(d.name), cancel=cancel)
            return {
                "name": d.name,
                "file": d.path,
                "chain": list(d.chain),
                "volume": d.volume,
                "capacity": d.size,
                "change_id": None,
                "mode": "full",
                "full_reason": FULL_REASON,
                "bytes_read": r.bytes_read,
                "bytes_stored": r.bytes_stored,
                "seconds": r.seconds,
                "source_format": r.source_format,
            }

        try:
            disk_results = read_disks(read, disks, max_workers=plan.limits.disks_per_vm, session=session)
        except (BackupError, OSError) as e:
            # A disk failed: was it because the shadow copy went away?
            if (clear := vanished(e)) is not None:
                raise clear from None
            raise
        # The data is read; a copy deleted meanwhile means it may not be what the copy held.
        if (clear := vanished(None)) is not None:
            raise clear
        attributes = {
            "tool": "vmbackup hyperv",
            "hypervisor": "hyperv",
            "run_id": run_id,
            "shadow_run_id": rid,
            "vm_id": now.id,
            "host": host.name,
            "agent": agent.name,
            "mode": "full",
            "full_reason": FULL_REASON,
            "transport": result.transport,
            "consistency": result.consistency,
            "consistency_note": result.consistency_note,
            "shadow_set_id": made.get("SetId"),
            "shadow_ids": [c["ShadowId"] for c in copies],
            "snapshot_unix": shadow_unix,
            "last_full_unix": shadow_unix,
            "volumes": list(now.volumes),
            "excluded_disks": sorted(excluded),
            # WIRING (hvtruth, for the integrator): pass-through and SMB disks the
            # host's shadow copy cannot hold (`HvVm.skipped_disks`); the row's
            # `skipped_disks` field takes `now.skipped()` the same way.
            "skipped_disks": now.skipped(),
            "disks": [
                {k: d[k] for k in ("name", "file", "chain", "volume", "capacity", "change_id")} for d in disk_results
            ],
        }
        info = session.commit(config=json.dumps(config), attributes=json.dumps(attributes))
        session = None
        result.backup_id = info.id
        result.mode = "full"
        result.full_reason = FULL_REASON
        result.set_disks(disk_results)
    except BaseException as e:
        body_error = e
        raise
    finally:
        if session is not None:
            session.abort()
        if started:
            problem = _complete(client, rid, succeeded=body_error is None)
            result.snapshot_seconds = time.monotonic() - snap_t0
            if problem is not None:
                if body_error is None:
                    raise _rewrap(
                        problem,
                        f"VM {now.name} was backed up ({result.backup_id}) but ending shadow copy run {rid} "
                        f"on {host.name} failed: {problem}",
                    ) from None
                log.error("VM %s: ending shadow copy run %s after a failure failed too: %s", now.name, rid, problem)
    result.seconds = time.monotonic() - t0
    return result


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
    }


def _list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]
