"""What a restore asks for, resolved and checked before anything starts.

``vmbackup restore`` and the ``restore_vm`` and ``drill`` flows turn a
request (VM names, a point or a time, a new name, a target host and
datastore or folder, a network map) into one :class:`RestoreJob` per VM:
the point (``hypervisors.restore.find_point``), its VM as every restore
understands it (the *source* adapter's ``describe_point``), the *target*
hypervisor (the point's, or the one ``--host`` names: a Hyper-V host of the
plan, else an ESXi host of the plan's vCenter), the agent that writes the
disks and the limits the restore holds. Every mistake here is a
``RestoreInputError`` (exit 2) naming it; nothing has been made.

No Prefect here (the command line checks its input with it before any
server starts).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import records
from ..errors import PointMetaError, RestoreInputError
from ..hypervisors.base import RestoreRequest, VmDescription

log = logging.getLogger(__name__)

VSPHERE = "vsphere"
HYPERV = "hyperv"
# Without --as, a restored VM is named <vm><DEFAULT_SUFFIX> (docs/restore.md).
DEFAULT_SUFFIX = "-restored"


@dataclass
class RestoreJob:
    """One VM's restore, resolved: what the flow's task for it needs."""

    request: RestoreRequest
    info: Any  # the point (``_mover.BackupInfo``)
    description: VmDescription
    source: str  # the point's hypervisor
    target: str  # the target's hypervisor
    host: str | None  # the target host as far as known before ``prepare`` (the point's, or --host)
    hv_host: Any = None  # the plan's HypervHost of a Hyper-V target
    storage: list[str] = field(default_factory=list)  # datastores (vSphere) or volume keys (Hyper-V) written
    capacity: int = 0  # the bytes of its disks
    agent: Any = None  # the plan's Agent that writes the disks

    @property
    def vm(self) -> str:
        return self.request.vm

    def limit_keys(self) -> list[tuple[str, str]]:
        """What this restore holds a slot of besides its agent (as a backup
        of a VM there would): its host, and its datastores or volumes."""
        keys = [("host", self.host)] if self.host else []
        kind = "datastore" if self.target == VSPHERE else "volume"
        return keys + [(kind, s) for s in self.storage]


@dataclass
class Source:
    """Where a restore reads its points: the plan's repository, or an offsite
    copy through a local mirror (``offsite.open_copy``) when ``--repo
    s3://...`` names it or the plan's repository is gone."""

    plan: Any  # the plan, its ``repository`` the directory the mover reads (the mirror for a copy)
    url: str | None = None  # the copy's s3:// URL
    copy: Any = None  # the opened ``offsite.Copy``
    warning: str | None = None  # said in every row: restored from the copy, and why

    @property
    def repository(self) -> str:
        """The repository as the rows name it: the copy's URL, or the plan's path."""
        return self.url or str(self.plan.repository)

    def fetch(self, jobs: Sequence[RestoreJob]) -> None:
        """The chunks of the jobs' points into the mirror (nothing for a local repository)."""
        if self.copy is not None:
            from .. import offsite

            offsite.fetch_backups(self.copy, self.url or "", sorted({j.request.point for j in jobs}))


def restore_source(plan: Any, repo: str | None = None, *, key: Any = None, unlock: bool = True) -> Source:
    """The plan reading from where the points are, unlocked when encrypted
    (the plan's passphrase source): ``repo`` (a directory, or ``s3://BUCKET/
    PREFIX``: the copy's manifests and key slots fetched into the mirror);
    else the plan's repository, or, when it is gone (no ``config.json``) and
    the plan has a ``copy:``, that copy. The copy's client is the plan's
    ``copy:`` (endpoint, credentials) when it names the same bucket, else the
    AWS environment's. The copy of an encrypted repository is opened with
    ``key`` (a ``keys.KeySource``; default: the plan's passphrase source):
    its newest index that key authenticates, the mirror unlocked with it.
    ``unlock`` False: the caller unlocks a local repository (``--passphrase-file``)."""
    from .. import copy as s3copy
    from ..keys import is_encrypted, plan_key_source, unlock_plan_repository

    url, warning = None, None
    if repo and s3copy.is_url(repo):
        url = repo
        warning = f"restored from the offsite copy {url}"
    elif repo:
        plan = plan.model_copy(update={"repository": os.path.abspath(repo)})
    elif not os.path.isfile(os.path.join(str(plan.repository), "config.json")) and plan.copy_ is not None:
        c = plan.copy_
        url = f"s3://{c.bucket}/{c.prefix}" if c.prefix else f"s3://{c.bucket}"
        warning = f"the plan's repository {plan.repository} is gone: restored from its offsite copy {url}"
    copy = None
    if url is not None:
        from .. import offsite

        bucket, prefix = s3copy.parse_url(url)
        target = None
        if plan.copy_ is not None and plan.copy_.bucket == bucket:
            target = s3copy.Target(s3copy.plan_target(plan).s3, bucket, prefix)
        copy = offsite.open_copy(url, target=target)
        if is_encrypted(copy.mirror):
            # again with the key: an index it authenticates, and the mirror unlocked
            key = key if key is not None else plan_key_source(plan)
            copy = offsite.open_copy(url, target=target, key=key)
        plan = plan.model_copy(update={"repository": copy.mirror})
    elif not os.path.isfile(os.path.join(str(plan.repository), "config.json")):
        why = "" if repo else " (and the plan has no copy: to restore from)"
        raise RestoreInputError(f"repository {plan.repository} does not exist{why}")
    if unlock:
        unlock_plan_repository(plan)
    return Source(plan, url, copy, warning)


# --- parsing what a person typed ----------------------------------------------


def parse_network_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["VM Network=isolated", ...]`` -> ``{"VM Network": "isolated"}``."""
    out: dict[str, str] = {}
    for item in items or ():
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise RestoreInputError(
                f"--network-map '{item}': give FROM=TO (a network of the backup = a target network)"
            )
        if source.strip() in out:
            raise RestoreInputError(f"--network-map: network '{source.strip()}' is mapped twice")
        out[source.strip()] = target.strip()
    return out


def parse_before(text: str | None) -> float | None:
    """``--before``: an ISO 8601 date or date and time (UTC unless it says
    otherwise: ``2026-12-01``, ``2026-12-01T18:00``, ``2026-12-01T18:00:00+01:00``)
    -> unix seconds."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise RestoreInputError(
            f"--before '{text}' is not a date or time (2026-12-01, 2026-12-01T18:00, 2026-12-01T18:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def default_name(vm: str) -> str:
    """The restored VM's name without ``--as``."""
    return f"{vm}{DEFAULT_SUFFIX}"


def drill_name(prefix: str, vm: str, run_id: str) -> str:
    """A drill VM's name: ``drill-<vm>-<first 8 characters of the run id>``."""
    return f"{prefix}{vm}-{run_id.replace('-', '')[:8]}"


# --- the point and its hypervisors -----------------------------------------------


def adapter_class(kind: str) -> Any:
    """The adapter class of ``kind`` (imports no pyVmomi or WinRM)."""
    if kind == VSPHERE:
        from ..vsphere.hypervisor import VSphere

        return VSphere
    from ..hyperv.hypervisor import HyperV

    return HyperV


def point_hypervisor(info: Any) -> str:
    """The hypervisor a point was taken on."""
    from ..pointmeta import PointMeta

    try:
        return PointMeta.from_attributes(info.attributes, vm=info.vm, created_unix=info.created_unix).hypervisor
    except PointMetaError:
        raise RestoreInputError(
            f"backup point {info.id} of VM {info.vm} was not taken from a hypervisor (no VM configuration to restore; "
            "`vmbackup restore-disk` restores its disks)"
        ) from None


def describe(info: Any, kind: str) -> VmDescription:
    """The point's VM, by its own hypervisor's adapter."""
    cls = adapter_class(kind)
    describe_point = getattr(cls, "describe_point", None)
    if describe_point is None:
        raise RestoreInputError(f"this vmbackup cannot restore a {kind} VM yet (backup point {info.id})")
    return describe_point(info.config, info.attributes if isinstance(info.attributes, dict) else {})


def point_attr(info: Any, key: str) -> Any:
    attrs = info.attributes
    return attrs.get(key) if isinstance(attrs, dict) else None


def target_kind(plan: Any, host: str | None, source: str, vm: str) -> tuple[str, Any]:
    """The target's hypervisor and, for Hyper-V, the plan's host: ``--host``'s
    when given (a Hyper-V host of the plan, else an ESXi host of the plan's
    vCenter, which ``prepare`` checks), else the point's."""
    if host is not None:
        for h in plan.hyperv:
            if h.name.upper() == host.upper():
                return HYPERV, h
        if plan.connection is None:
            raise RestoreInputError(
                f"--host {host} is not a Hyper-V host of the plan ({', '.join(h.name for h in plan.hyperv)}), "
                "and the plan has no vCenter"
            )
        return VSPHERE, None
    if source == VSPHERE:
        if plan.connection is None:
            raise RestoreInputError(
                f"VM {vm}'s point is a vSphere point and the plan has no vCenter: give --host with a Hyper-V host"
            )
        return VSPHERE, None
    return HYPERV, None  # the point's host: resolved by the caller


def _agent_for(agents: Sequence[Any], job: RestoreJob, load: dict[str, int]) -> Any:
    """The least loaded agent that reaches the target host."""
    if job.target == HYPERV:
        able = [a for a in agents if a.reaches_hyperv(job.host)]
    else:
        able = [a for a in agents if not a.hosts or job.host is None or job.host in a.hosts]
    if not able:
        raise RestoreInputError(f"VM {job.vm}: no agent of the plan reaches host {job.host}")
    chosen = min(able, key=lambda a: (load.get(a.name, 0), a.name))
    load[chosen.name] = load.get(chosen.name, 0) + 1
    return chosen


def resolve(
    plan: Any,
    vms: Sequence[str],
    *,
    point: str | None = None,
    before: float | None = None,
    restored_as: str | None = None,
    host: str | None = None,
    datastore: str | None = None,
    path: str | None = None,
    network_map: dict[str, str] | None = None,
    power_on: bool = False,
    in_place: bool = False,
    folder: str | None = None,
    resource_pool: str | None = None,
    assign: bool = True,
) -> list[RestoreJob]:
    """One job per VM of ``vms``, or ``RestoreInputError`` naming the first
    mistake. Only the repository is read (no hypervisor is asked: the
    target's own checks are ``RestoreSteps.prepare``'s)."""
    from ..hypervisors.restore import find_point

    names = [v.strip() for v in vms]
    if not names or any(not n for n in names):
        raise RestoreInputError("give the VM to restore (--vm NAME); a name must not be empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RestoreInputError(f"--vm {dup[0]} is given twice")
    if point is not None and before is not None:
        raise RestoreInputError("give --point or --before, not both")
    if point is not None and len(names) > 1:
        raise RestoreInputError("--point names one VM's backup point: give one --vm")
    if restored_as is not None and len(names) > 1:
        raise RestoreInputError("--as names one VM: give one --vm (without --as each VM is restored as <vm>-restored)")
    if restored_as is not None and not restored_as.strip():
        raise RestoreInputError("--as: the new name must not be empty")
    if in_place and restored_as is not None and restored_as != names[0]:
        raise RestoreInputError("--in-place rolls the VM itself back: it takes no --as")
    if datastore is not None and path is not None:
        raise RestoreInputError("give --datastore (vSphere) or --path (Hyper-V), not both")
    if host is not None:
        target_kind(plan, host, VSPHERE, names[0])  # a host neither hypervisor of the plan has: before any point
    repository = str(plan.repository)
    jobs: list[RestoreJob] = []
    for vm in names:
        info = find_point(repository, vm, point=point, before=before)
        source = point_hypervisor(info)
        target, hv_host = target_kind(plan, host, source, vm)
        if in_place and target != source:
            raise RestoreInputError(
                f"--in-place rolls VM {vm} back on its own hypervisor ({source}), not onto {target}"
            )
        if target != source and source not in getattr(adapter_class(target), "restores_from", (target,)):
            # An adapter says which points it restores (``restores_from``); by default its own hypervisor's.
            raise RestoreInputError(
                f"VM {vm}: restoring a {source} point onto a {target} host is not supported yet (docs/restore.md)"
            )
        if target == VSPHERE and path is not None:
            raise RestoreInputError("--path is a Hyper-V host's folder: a vSphere restore takes --datastore")
        if target == HYPERV and datastore is not None:
            raise RestoreInputError("--datastore is a vSphere datastore: a Hyper-V restore takes --path")
        if target == HYPERV and (folder is not None or resource_pool is not None):
            what = "--folder" if folder is not None else "--resource-pool"
            raise RestoreInputError(f"{what} is vSphere's: a Hyper-V restore takes --path")
        if in_place and (folder is not None or resource_pool is not None):
            raise RestoreInputError("--in-place rolls the VM back where it is: it takes no --folder or --resource-pool")
        target_host = host
        storage: list[str] = []
        if target == HYPERV:
            if hv_host is None:  # the point's own host
                name = point_attr(info, "host")
                hv_host = next((h for h in plan.hyperv if name and h.name.upper() == str(name).upper()), None)
                if hv_host is None:
                    raise RestoreInputError(
                        f"VM {vm}'s point was taken on Hyper-V host {name}, which is not in the plan: give --host"
                    )
            target_host = hv_host.name
            same_host = source == HYPERV and str(point_attr(info, "host") or "").upper() == hv_host.name.upper()
            storage = _volume_keys(hv_host, path, info if same_host else None)
        description = describe(info, source)
        if target == VSPHERE:
            if target_host is None and source == VSPHERE:
                target_host = description.host or point_attr(info, "host")
            if datastore is not None:
                storage = [datastore]
            elif source == VSPHERE:
                disks = point_attr(info, "disks") or ()
                storage = sorted({d["datastore"] for d in disks if isinstance(d, dict) and d.get("datastore")})
                if description.location and description.location not in storage:
                    storage.append(description.location)
        new_name = vm if in_place else (restored_as or default_name(vm))
        request = RestoreRequest(
            vm=vm,
            point=info.id,
            restored_as=new_name,
            host=target_host if host is not None or target == HYPERV else None,
            datastore=datastore,
            path=path,
            network_map=dict(network_map or {}),
            power_on=power_on,
            in_place=in_place,
            folder=folder.strip("/") if folder else None,
            resource_pool=resource_pool.strip("/") if resource_pool else None,
        )
        jobs.append(
            RestoreJob(
                request=request,
                info=info,
                description=description,
                source=source,
                target=target,
                host=target_host,
                hv_host=hv_host,
                storage=storage,
                capacity=sum(d.capacity for d in description.disks),
            )
        )
    taken = [j.request.restored_as for j in jobs]
    for j in jobs:
        if taken.count(j.request.restored_as) > 1:
            raise RestoreInputError(f"two VMs would be restored as {j.request.restored_as}")
    if assign:
        assign_agents(jobs, plan.agents)
    return jobs


def assign_agents(jobs: Sequence[RestoreJob], agents: Sequence[Any]) -> None:
    """An agent per job: the least loaded one that reaches its target host."""
    load: dict[str, int] = {}
    for j in jobs:
        j.agent = _agent_for(agents, j, load)


def passwords(plan: Any, jobs: Sequence[RestoreJob], *, env_only: bool = False) -> dict[str, Any]:
    """The passwords of the targets only (a missing one: one line, exit 2);
    ``env_only``: check only those read from environment variables (a
    Secret block is read once Prefect's server is known)."""
    from ..plan import resolve_password

    out: dict[str, Any] = {}
    for j in jobs:
        conn, key = (plan.connection, VSPHERE) if j.target == VSPHERE else (j.hv_host, f"{HYPERV}:{j.hv_host.name}")
        if key in out or (env_only and conn.password_env is None):
            continue
        out[key] = resolve_password(conn)
    return out


def _volume_keys(hv_host: Any, path: str | None, info: Any) -> list[str]:
    """The volumes a Hyper-V restore writes: --path's, else the point's."""
    from ..hyperv.inventory import volume_key, volume_of

    if path is not None:
        return [volume_key(hv_host, volume_of(path))]
    if info is None:
        return []
    return list(dict.fromkeys(volume_key(hv_host, v) for v in point_attr(info, "volumes") or ()))


# --- drills -------------------------------------------------------------------------


def drill_candidates(infos: Sequence[Any], patterns: Sequence[str], kinds: Sequence[str]) -> dict[str, Any]:
    """Each VM of the repository a drill may take (its label matches one of
    ``patterns``; its points are of a hypervisor in ``kinds``: those the
    plan's drill has a target for), with its newest point."""
    newest: dict[str, Any] = {}
    for info in infos:
        if not any(fnmatch.fnmatchcase(info.vm, p) for p in patterns):
            continue
        try:
            if point_hypervisor(info) not in kinds:
                continue
        except RestoreInputError:
            continue
        if info.vm not in newest or info.created_unix > newest[info.vm].created_unix:
            newest[info.vm] = info
    return newest


def drill_sample(candidates: Sequence[str], last_drilled: dict[str, float], sample: int) -> list[str]:
    """The ``sample`` VMs drilled least recently (never drilled first, then by
    name): over ``ceil(len / sample)`` runs every VM is drilled once."""
    order = sorted(candidates, key=lambda vm: (last_drilled.get(vm, float("-inf")), vm))
    return order[: max(1, sample)]


def drill_requests(plan: Any, jobs: list[RestoreJob], run_id: str) -> None:
    """Point each job at the plan's isolated drill target: the drill name,
    its host/datastore or folder, every network to the isolated one,
    powered on, ``drill`` set (the adapters put a vSphere drill VM into
    ``drill.vsphere.folder`` and ``resource_pool``: ``RestoreRequest.folder``
    and ``resource_pool``)."""
    d = plan.drill
    for j in jobs:
        r = j.request
        r.restored_as = drill_name(d.prefix, j.vm, run_id)
        r.drill = True
        r.power_on = True
        if j.target == VSPHERE:
            if d.vsphere is None:
                raise RestoreInputError(f"VM {j.vm} is a vSphere VM and the plan's drill has no vsphere: section")
            net = d.vsphere.network
            r.host = d.vsphere.host or r.host
            r.datastore = d.vsphere.datastore
            r.folder = d.vsphere.folder.strip("/") if d.vsphere.folder else None
            r.resource_pool = d.vsphere.resource_pool.strip("/") if d.vsphere.resource_pool else None
            if d.vsphere.host:
                j.host = d.vsphere.host
            if d.vsphere.datastore:
                j.storage = [d.vsphere.datastore]
        else:
            if d.hyperv is None:
                raise RestoreInputError(f"VM {j.vm} is a Hyper-V VM and the plan's drill has no hyperv: section")
            net = d.hyperv.switch
            if d.hyperv.host:
                j.hv_host = plan.hyperv_host(d.hyperv.host)
                j.host = r.host = j.hv_host.name
            r.path = d.hyperv.path
            if d.hyperv.path:
                j.storage = _volume_keys(j.hv_host, d.hyperv.path, None)
        r.network_map = {n.network: net for n in j.description.nics if n.network}


# The drills' record in the repository: which VM was drilled when (the
# rotation's memory). Readers of the repository ignore it (docs/format.md, 1);
# sealed in an encrypted repository (records.py), like the ledger.
DRILL_STATE = "drills.json"


def load_drill_state(repository: str) -> dict[str, dict[str, Any]]:
    """``vm -> {"unix", "point", "passed", "run"}`` of each VM's last drill.

    A record that cannot be read or authenticated (altered, or plain JSON in
    an encrypted repository) restarts the rotation, with a warning."""
    path = Path(repository) / DRILL_STATE
    try:
        data = records.read(repository, path)
    except FileNotFoundError:
        return {}
    except OSError as err:
        log.warning("the drills' record %s cannot be read (%s): the rotation starts again", path, err)
        return {}
    except records.UntrustedRecord as err:
        log.warning("the drills' record is not trusted, the rotation starts again: %s", err)
        return {}
    vms = data.get("vms") if isinstance(data, dict) else None
    if not isinstance(vms, dict):
        if vms is not None or not isinstance(data, dict):
            log.warning("the drills' record %s is not a drills' record: the rotation starts again", path)
        return {}
    return {k: v for k, v in vms.items() if isinstance(k, str) and isinstance(v, dict)}


def save_drill_state(repository: str, state: dict[str, dict[str, Any]]) -> None:
    """Writes the record atomically (a temporary file renamed over it), sealed when encrypted."""
    path = os.path.join(repository, DRILL_STATE)
    text = records.encode(repository, Path(path), {"version": 1, "vms": state}, indent=1)
    tmp = os.path.join(repository, f".{DRILL_STATE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
