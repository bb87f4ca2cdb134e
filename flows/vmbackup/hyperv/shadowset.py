"""One shadow copy set for several VMs of a host, and each VM's files in it.

The Hyper-V writer freezes every running VM with files on a set's volumes,
whichever VMs the set is for: N VMs sharing a volume backed up in N sets are
N^2 guest quiesces (each guest runs N VSS backups of its own), in one set N.
So the VMs of one host whose files share volumes (`inventory.volume_groups`)
are frozen together: `open_shadow_set` makes one set for them
(`New-VmbackupShadowCopy.ps1` with several ``-VMName``), and each VM's disks
and configuration files are read from it (`ShadowSet.disk_sources`,
`ShadowSet.path_in_copy`), in parallel, until `ShadowSet.complete`.

A set in progress on the host (VSS creates one at a time) is waited for by
the client (`client.SET_IN_PROGRESS`), never a failed VM. Plain Python, no
Prefect; the run core calls it (docs/hyperv.md, "Volume groups").
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackupError, HypervisorError, HypervScriptError, InvalidInputError, WinRMError
from .client import HypervClient
from .inventory import HvVm, volume_of

log = logging.getLogger(__name__)

# The scripts' default working directory on the host (ledger, runs, mount points).
WORK_DIR = "C:\\ProgramData\\vmbackup"


@dataclass(frozen=True)
class VmConsistency:
    """What the set gives one of its VMs: ``application`` or ``crash``, and why not."""

    name: str
    consistency: str
    reasons: tuple[str, ...]


def set_run_id(run_id: str, vms: list[str]) -> str:
    """The host-side RunId of one set in run ``run_id``: unique per (run, VMs), ``[A-Za-z0-9-]{1,64}``,
    the same for a retried attempt (so reconciling removes the attempt before it)."""
    names = sorted(v.lower() for v in vms)
    digest = hashlib.sha256("\0".join([run_id, *names]).encode()).hexdigest()[:10]
    label = names[0][:16] + (f"-and-{len(names) - 1}" if len(names) > 1 else "")
    readable = re.sub(r"[^A-Za-z0-9-]+", "-", f"{run_id[:28]}-{label}").strip("-")
    return f"{readable}-{digest}"[-64:].lstrip("-")


def on_host(agent: Any) -> bool:
    """Whether the agent runs on the host: it maps the scripts' working directory (a drive key)."""
    return agent.map_windows_path(WORK_DIR + "\\runs\\") is not None


@dataclass
class ShadowSet:
    """An open shadow copy set on a Hyper-V host; `complete` ends it (a context manager ends it as failed)."""

    client: HypervClient
    agent: Any
    run_id: str  # the host-side RunId
    set_id: str
    consistency: dict[str, VmConsistency]  # by VM name as given
    copies: list[dict[str, Any]]  # ShadowId, Volume, ExposedPath, SharePath per volume
    transport: str  # 'local' (the agent on the host) or 'share'
    created: float = field(default_factory=time.monotonic)
    completed: bool = False

    @property
    def roots(self) -> dict[str, str]:
        """Each volume root (lower case) -> where the agent finds the copy of it (mount point or share)."""
        key = "ExposedPath" if self.transport == "local" else "SharePath"
        return {str(c["Volume"]).lower(): str(c[key]) for c in self.copies}

    def path_in_copy(self, winpath: str) -> Path:
        """The agent's local path of a host file as of the set (`HypervisorError` if the set does not hold it)."""
        root = volume_of(winpath)
        base = self.roots.get(root.lower())
        if not base:
            raise HypervisorError(f"{winpath} is on no volume of shadow copy set {self.set_id}")
        inside = base.rstrip("\\") + "\\" + winpath[len(root) :]
        mapped = self.agent.map_windows_path(inside)
        if mapped is None:
            raise HypervisorError(f"agent {self.agent.name} has no windows_paths entry for {inside}")
        return Path(mapped)

    def disk_sources(self, vm: HvVm) -> dict[str, Path]:
        """Each disk of ``vm`` (its chain top; the mover follows the chain inside the copy) as of the set.

        Skipped disks (`HvVm.skipped_disks`: pass-through, SMB) are not in it.
        """
        if vm.name.lower() not in {n.lower() for n in self.consistency}:
            raise InvalidInputError(f"VM {vm.name} is not in shadow copy set {self.set_id}")
        return {d.name: self.path_in_copy(d.path) for d in vm.disks}

    def of(self, vm: str) -> VmConsistency:
        """The consistency the set gives ``vm``."""
        for name, c in self.consistency.items():
            if name.lower() == vm.lower():
                return c
        raise InvalidInputError(f"VM {vm} is not in shadow copy set {self.set_id}")

    def lost(self, client: HypervClient | None = None) -> list[dict[str, Any]]:
        """The set's copies that no longer exist on the host (Windows deletes the oldest when shadow storage fills).

        ``client``: the caller's own WinRM client (a session is not shared between threads); else the set's.
        """
        runs = _list(((client or self.client).run_script("Get-VmbackupHost.ps1") or {}).get("Runs"))
        run = next((r for r in runs if r.get("RunId") == self.run_id), None)
        existing = set(_list(run.get("Existing"))) if run else set()
        return [c for c in self.copies if c.get("ShadowId") not in existing]

    def complete(self, *, succeeded: bool, client: HypervClient | None = None) -> BackupError | None:
        """End the set: BackupComplete to the host's writers only if ``succeeded`` (the points
        are committed), then delete shares, mount points, copies and the ledger entry. Returns the
        error if that failed (the ledger keeps the run for the sweeper). ``client``: the caller's
        own WinRM client, else the set's."""
        if self.completed:
            return None
        self.completed = True
        try:
            (client or self.client).run_script(
                "Complete-VmbackupShadowCopy.ps1", {"RunId": self.run_id, "Succeeded": succeeded}
            )
        except HypervScriptError as e:
            return None if e.code == "RunNotFound" else e
        except (WinRMError, BackupError) as e:
            return e
        return None

    def __enter__(self) -> ShadowSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        problem = self.complete(succeeded=False)
        if problem is not None:
            log.error("ending shadow copy run %s failed: %s", self.run_id, problem)


def open_shadow_set(
    client: HypervClient,
    host: Any,
    agent: Any,
    vms: list[HvVm],
    *,
    run_id: str,
    quiesce: str = "preferred",
    reconcile: bool = True,
) -> ShadowSet:
    """One shadow copy set of the volumes of ``vms`` (VMs of ``host``), with the Hyper-V writer
    when it can take part: each guest is frozen once for the whole set.

    Reconciles first: runs an earlier (crashed) backup left on the host naming
    any of the VMs are removed. ``quiesce`` is the plan's policy (required,
    preferred, off); under ``required`` a set the writer cannot take part in
    raises `HypervQuiesceError` and nothing is made. The agent reads the set's
    mount points if it runs on the host, else shares made for its
    ``share_account``. ``reconcile=False``: the caller reconciled
    (`setpool.SetPool`, which keeps its own open sets).
    """
    if not vms:
        raise InvalidInputError("a shadow copy set needs at least one VM")
    for vm in vms if reconcile else []:
        client.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0, "VMName": vm.name})
    volumes = sorted({v for vm in vms for v in vm.volumes}, key=str.lower)
    local = on_host(agent)
    rid = set_run_id(run_id, [vm.name for vm in vms])
    params: dict[str, Any] = {
        "RunId": rid,
        "VMName": [vm.name for vm in vms],
        "Volumes": volumes,
        "Quiesce": quiesce,
    }
    if not local:
        if not getattr(agent, "share_account", None):
            raise HypervisorError(
                f"agent {agent.name} maps no path for {WORK_DIR} (where host {host.name} mounts shadow copies) "
                "and has no share_account to share them to"
            )
        params["ShareTo"] = agent.share_account
    try:
        made = client.run_script("New-VmbackupShadowCopy.ps1", params)
    except BaseException:
        # a failed creation may have left a ledger entry (diskshadow failed): remove it now
        try:
            client.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": rid, "Succeeded": False})
        except (HypervScriptError, WinRMError, BackupError):
            pass
        raise
    per_vm = {}
    for v in _list(made.get("VMs")):
        per_vm[str(v["Name"])] = VmConsistency(
            str(v["Name"]), str(v["Consistency"]), tuple(str(r) for r in _list(v.get("Reasons")))
        )
    for vm in vms:  # a host whose script predates per-VM answers: the set's own
        per_vm.setdefault(
            vm.name,
            VmConsistency(vm.name, str(made["Consistency"]), tuple(str(r) for r in _list(made.get("Reasons")))),
        )
    return ShadowSet(
        client=client,
        agent=agent,
        run_id=rid,
        set_id=str(made.get("SetId")),
        consistency=per_vm,
        copies=_list(made.get("ShadowCopies")),
        transport="local" if local else "share",
    )


def _list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]
