"""The backup flow: ``backup_vms`` backs up the vSphere and Hyper-V VMs of a
plan in one run, one task per VM under the shared limits, one report.
(``backup_vsphere_vms``, in ``backup_vsphere``, is the same body limited to
vSphere, for deployments made before Hyper-V.)

Orchestration only: the plan, the selection and the per-VM procedures are
the adapters' (``vmbackup.vsphere``, ``vmbackup.hyperv``); here is what runs
where, under which limits, with which retries, and the report.

What a run does with a hypervisor it cannot reach (wrong password, untrusted
certificate, nothing answering): when the plan has another hypervisor that
answers, the run goes on with it, and the one it could not reach gives ONE
failed row, ``vm: "<host>:*"`` ("the VMs of this host"), whose ``error`` is
the one-line reason; the run then exits 1 like any run with a failed row.
When no hypervisor of the plan can be reached, nothing can run: the run
fails with that one line (several: joined), as a vSphere-only run always did.

Two selected VMs with the same name (in two folders or on two hosts of a
vCenter, on two Hyper-V hosts, or one of each) are both backed up: a VM's
chain is found by its hypervisor id (``vm_id``: vSphere ``instanceUuid``,
Hyper-V VM Id, see ``pointmeta.latest``), the name is a label. Within the
run each has a unique key (``name (host, id)``: task names, limits'
bookkeeping, agent planning); their rows say which is which (``host``,
``vm_id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from .. import planning, results
from ..errors import AgentMismatchError, BackupError, InvalidInputError, NothingSelectedError, VmsFailedError
from ..hyperv.hypervisor import HyperV
from ..vsphere.hypervisor import VSphere, vm_datastores
from . import limits, reports, vmtask

DEFAULT_VM_DEADLINE = 6 * 3600.0
# Set on a worker that serves one agent's work pool (the systemd unit in
# deployments/ does): a run for another agent is refused there, since the
# hot-added disks would appear on the other agent's machine.
AGENT_ENV = "VMBACKUP_AGENT"
HYPERVISORS = ("vsphere", "hyperv")
VSPHERE = "vsphere"
HYPERV = "hyperv"
# A diagnostic (docs/flows.md): "0" gives each Hyper-V VM a shadow copy set
# of its own, as before the pool (N VMs on one volume: N sets, N^2 quiesces).
SHARED_SETS_ENV = "VMBACKUP_HYPERV_SHARED_SETS"


@dataclass(frozen=True)
class Keys:
    """The artifact keys and title of one flow's report."""

    report: str
    summary: str
    progress: str
    title: str


KEYS = Keys("vmbackup-backup-report", "vmbackup-backup-summary", "vmbackup-backup-progress", "Backup")


@dataclass
class Target:
    """One selected VM, whichever its hypervisor: what planning, the limits
    and the report need, and the adapter's own object (``vm``)."""

    name: str
    hypervisor: str
    host: str
    storage: list[str]  # vSphere datastores, or Hyper-V volume keys
    capacity: int
    vm: Any
    hv_host: Any = None  # the plan's HypervHost of a Hyper-V VM
    key: str = ""  # unique in the run: the name, or "name (host, id)" when another VM has the name

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def ident(self) -> str | None:
        """The hypervisor's id of the VM as selection knows it (Hyper-V VM Id; vSphere moref)."""
        return getattr(self.vm, "id", None) or getattr(self.vm, "moref", None)

    @property
    def identity(self) -> str:
        """Which VM this is, across runs of one plan: ``vsphere:<moref>``
        (unique in the vCenter, kept across a rename or a vMotion) or
        ``hyperv:<plan's host>:<VM Id>`` (a VM Id is taken as unique on its
        host only: a copy of the VM on another host may carry it). A site's planning
        run hands each agent's run its VMs by this, never by name."""
        if self.hypervisor == HYPERV:
            host = self.hv_host.name if self.hv_host is not None else self.host
            return f"{HYPERV}:{host}:{self.ident or self.name}"
        return f"{VSPHERE}:{self.ident or self.name}"


@dataclass
class Selected:
    """What the run found: the VMs to back up, and the rows of what cannot
    be backed up (an unreachable host, a duplicate name)."""

    targets: list[Target] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)  # "vcenter x", "Hyper-V host hv1"
    errors: list[tuple[str, BaseException]] = field(default_factory=list)


# --- the plan -------------------------------------------------------------------


def with_secret(plan: Any, password_secret: str | None, hyperv_password_secret: str | None = None) -> Any:
    """The plan, reading its passwords from the Secret blocks named (a
    deployment's parameters hold block names, never secrets):
    ``password_secret`` for vSphere, ``hyperv_password_secret`` for every
    Hyper-V host."""
    update: dict[str, Any] = {}
    if password_secret and plan.connection is not None:
        update["connection"] = plan.connection.model_copy(
            update={"password_secret": password_secret, "password_env": None}
        )
    if hyperv_password_secret and plan.hyperv:
        update["hyperv"] = [
            h.model_copy(update={"password_secret": hyperv_password_secret, "password_env": None}) for h in plan.hyperv
        ]
    return plan.model_copy(update=update) if update else plan


def only_agent(plan: Any, agent: str | None) -> list[Any]:
    """The agents this run may use: all of the plan's, or only ``agent``
    (a per-agent deployment run on that agent's worker)."""
    if agent is None:
        return list(plan.agents)
    found = [a for a in plan.agents if a.name == agent]
    if not found:
        raise InvalidInputError(f"the plan has no agent named '{agent}'")
    here = os.environ.get(AGENT_ENV)
    if here and here != agent:
        raise AgentMismatchError(f"this worker serves agent '{here}', not '{agent}': check the deployment's work pool")
    return found


def selection_of(plan: Any, vms: Sequence[str] | None) -> Any:
    """The plan's selection, or exactly the named VMs (the plan's
    exclusions of disks still apply)."""
    if not vms:
        return plan.selection
    return plan.selection.model_copy(
        update={"vms": list(vms), "folders": [], "clusters": [], "hosts": [], "tags": [], "exclude": []}
    )


_GLOB = set("*?[")


def _exact_pattern(name: str) -> str:
    """A pattern that matches exactly ``name`` but is not a plain name: the
    vSphere adapter raises "does not exist" for a plain name it does not
    have, and a name of the shared selection may well be on a Hyper-V host
    (whose adapter takes ``strict=False`` instead). The run checks the plain
    names against every hypervisor's VMs itself."""
    for i, ch in enumerate(name):
        if ch.isalnum():
            return f"{name[:i]}[{ch}]{name[i + 1 :]}"
    return name


def _per_adapter(selection: Any) -> tuple[Any, list[str]]:
    """The selection each adapter gets (plain names turned into exact
    patterns) and the plain names the run must find somewhere."""
    plain = [n for n in selection.vms if not _GLOB & set(n)]
    if not plain:
        return selection, []
    vms = [n if _GLOB & set(n) else _exact_pattern(n) for n in selection.vms]
    return selection.model_copy(update={"vms": vms}), plain


def hypervisor_names(plan: Any, hypervisors: Sequence[str]) -> list[str]:
    """The plan's hypervisors this run backs up, by label."""
    out = []
    if VSPHERE in hypervisors and plan.connection is not None:
        out.append(f"vCenter {plan.connection.host}")
    if HYPERV in hypervisors:
        out += [f"Hyper-V host {h.name}" for h in plan.hyperv]
    return out


def limit_names(agent: str, t: Target) -> list[str]:
    """The limits one VM's backup holds: its agent's and its hypervisor's
    ``limit_keys`` (host, datastores or volumes)."""
    cls = HyperV if t.hypervisor == HYPERV else VSphere
    keys = cls.limit_keys(t.vm)
    return sorted({limits.limit_name("agent", agent)} | {limits.limit_name(kind, name) for kind, name in keys})


def agent_reaches(agent: Any, t: Target) -> bool:
    if t.hypervisor == HYPERV:
        return bool(agent.reaches_hyperv(t.host))
    return planning.reaches(agent, t.host)


def unreachable_reason(t: Target) -> str:
    if t.hypervisor == HYPERV:
        return (
            f"no agent reaches Hyper-V host {t.host} (an agent needs a windows_paths key for it, "
            f"'\\\\{t.host.upper()}\\' or a drive with hosts: [{t.host}])"
        )
    return f"no agent reaches host {t.host}"


def _not_run_row(plan: Any, vm: str, hypervisor: str, host: str, error: str, storage: Sequence[str] = ()) -> dict:
    """The failed row of a VM (or ``<host>:*``, a whole host) that was never started."""
    return results.empty_row(
        vm=vm,
        hypervisor=hypervisor,
        status="failed",
        repository=str(plan.repository),
        host=host,
        datastores=list(storage),
        error=error,
    )


def _host_row(plan: Any, hypervisor: str, host: str, error: str) -> dict:
    return _not_run_row(plan, f"{host}:*", hypervisor, host, error)


def select(
    plan: Any,
    vms: Sequence[str] | None,
    hypervisors: Sequence[str],
    passwords: dict[str, Any],
    stack: contextlib.ExitStack,
    secrets: Sequence[str],
) -> tuple[Selected, Any]:
    """Connect to the plan's hypervisors and select their VMs.

    Returns what was found and the vSphere client (kept open by ``stack``
    for the tasks), or None. Raises when nothing can run: every hypervisor
    failed (its own error when there is one), a plain VM name exists on
    none of them (``VmNotFoundError``, exit 2), or the plan names a host,
    cluster, folder, tag or datastore none of them has (``plan_names``:
    ``InvalidInputError``, exit 2, checked before any VM is selected), or
    the selection matches no VM at all on the hypervisors reached
    (``NothingSelectedError``, exit 1: a run that protects nothing fails).
    """
    from ..plan_names import check_names

    log = get_run_logger()
    wanted = selection_of(plan, vms)
    selection, plain = _per_adapter(wanted)
    found = Selected()
    vclient = None
    labels = hypervisor_names(plan, hypervisors)
    if plan.connection is None:
        check_names(plan, None)  # every name must be a Hyper-V host of the plan
    if VSPHERE in hypervisors and plan.connection is not None:
        from ..vsphere.inventory import inventory_names

        vsphere = VSphere(plan, passwords[VSPHERE])
        label = vsphere.label
        try:
            vsphere.connect()
            stack.callback(vsphere.close)
            vclient = vsphere.client
            # The plan's names against the inventory, before any VM is touched
            # (an InvalidInputError: exit 2 whatever else the plan has).
            check_names(plan, inventory_names(vclient))
            for vm in vsphere.select(selection):
                found.targets.append(
                    Target(
                        vm.name,
                        VSPHERE,
                        vm.host,
                        vm_datastores(vm),
                        sum(d.capacity for d in vm.disks),
                        vm,
                    )
                )
            found.reached.append(label)
        except Exception as e:
            if isinstance(e, InvalidInputError) or len(labels) == 1:
                raise
            log.error("%s: %s", label, vmtask.one_line(e, secrets))
            found.errors.append((label, e))
            found.failed.append(
                _host_row(
                    plan,
                    VSPHERE,
                    plan.connection.host,
                    f"{label} was not reached, none of its VMs were backed up: {vmtask.one_line(e, secrets)}",
                )
            )
    if HYPERV in hypervisors:
        for host in plan.hyperv:
            hyperv = HyperV(plan, host, passwords[f"{HYPERV}:{host.name}"])
            label = hyperv.label
            try:
                hyperv.connect()
                for vm in hyperv.select(wanted):
                    found.targets.append(
                        Target(
                            vm.name,
                            HYPERV,
                            vm.host,
                            list(vm.volume_keys),
                            sum(d.size for d in vm.disks),
                            vm,
                            host,
                        )
                    )
                found.reached.append(label)
            except Exception as e:
                if isinstance(e, InvalidInputError):
                    raise
                if len(labels) == 1:  # the plan's only hypervisor: the run's one line says which host
                    _name_host(e, label)
                    raise
                log.error("%s: %s", label, vmtask.one_line(e, secrets))
                found.errors.append((label, e))
                found.failed.append(
                    _host_row(
                        plan,
                        HYPERV,
                        host.name,
                        f"{label} was not reached, none of its VMs were backed up: {vmtask.one_line(e, secrets)}",
                    )
                )
    if labels and not found.reached:
        if len(found.errors) == 1:
            raise found.errors[0][1]
        raise BackupError(
            "no hypervisor of the plan could be reached: "
            + "; ".join(f"{label}: {vmtask.one_line(e, secrets)}" for label, e in found.errors)
        )
    names = {t.name for t in found.targets if t.hypervisor == VSPHERE}
    # Hyper-V VM names are case-insensitive, as on Windows.
    names_ci = {t.name.casefold() for t in found.targets if t.hypervisor == HYPERV}
    # A plain name none of the reached hypervisors has: bad input (exit 2),
    # unless a hypervisor that was not reached may have it (its row says so).
    missing = [
        n
        for n in plain
        if n not in names
        and n.casefold() not in names_ci
        and not any(fnmatch.fnmatchcase(n, x) for x in (selection.exclude or ()))
    ]
    if missing and not found.errors:
        from ..errors import VmNotFoundError

        where = [("on " if label.startswith("Hyper-V") else "in ") + label for label in found.reached]
        raise VmNotFoundError(f"VM {', '.join(missing)} does not exist {' or '.join(where)}")
    _key_duplicates(found)
    if not found.targets and not found.failed:
        raise NothingSelectedError(
            f"the selection ({_criteria(wanted)}) matches no VM "
            + " or ".join(("on " if label.startswith("Hyper-V") else "in ") + label for label in found.reached)
            + ": nothing was backed up"
        )
    return found, vclient


def _criteria(selection: Any) -> str:
    """The selection's criteria for a one-line message: ``vms: web*; exclude: *-test``."""
    parts = []
    for key in ("vms", "folders", "clusters", "hosts", "tags", "exclude"):
        values = getattr(selection, key, None) or []
        if values:
            parts.append(f"{key}: {', '.join(values)}")
    return "; ".join(parts)


def _name_host(e: BaseException, label: str) -> None:
    """Puts ``label`` ("Hyper-V host hv1") in front of one of our errors'
    message, keeping its class (and so its exit code and retry rule):
    WinRM's messages name the URL, which does not say which host of the
    plan it is."""
    if isinstance(e, BackupError) and len(e.args) == 1 and isinstance(e.args[0], str):
        if not e.args[0].startswith(f"{label}: "):
            e.args = (f"{label}: {e.args[0]}",)


def _key_duplicates(found: Selected) -> None:
    """Two selected VMs with one name are both backed up: each gets a key
    that says where it is (``web01 (esx1, vm-42)``)."""
    by_name: dict[str, list[Target]] = {}
    for t in found.targets:
        by_name.setdefault(t.name, []).append(t)
    for same in by_name.values():
        if len(same) > 1:
            for t in same:
                t.key = f"{t.name} ({t.host}, {t.ident or t.hypervisor})"


def only_identities(plan: Any, found: Selected, identities: Mapping[str, str] | None) -> Selected:
    """The selection limited to the VMs the site's planning run gave this
    agent's run (``identities``: :attr:`Target.identity` -> name), or
    unchanged when there is no such list (a run of its own). The run selects
    by name first, which finds every VM of a name; two VMs of one name
    assigned to two agents are each backed up by its own agent only. A VM
    of the list that is no longer selected (removed, or renamed, since the
    planning run) is a failed row that says so."""
    if identities is None:
        return found
    targets = [t for t in found.targets if t.identity in identities]
    here = {t.identity for t in targets}
    missing = []
    for ident, name in sorted(identities.items()):
        if ident in here:
            continue
        hypervisor, _, rest = ident.partition(":")
        host = rest.partition(":")[0] if hypervisor == HYPERV else ""
        why = f"VM {name} ({ident}) was planned for this agent but is not selected now (removed or renamed since?)"
        missing.append(_not_run_row(plan, name, hypervisor, host, why))
    return dataclasses.replace(found, targets=targets, failed=found.failed + missing)


def split_by_agent(agent_plan: Any, chosen: Sequence[Target]) -> dict[str, dict[str, str]]:
    """What a site's planning run hands each agent's run: its VMs by
    :attr:`Target.identity` (-> name), in submission order."""
    out: dict[str, dict[str, str]] = {}
    for t in chosen:
        out.setdefault(agent_plan.assigned[t.key], {})[t.identity] = t.name
    return out


def plan_agents(targets: Sequence[Target], agents: Sequence[Any]) -> tuple[Any, list[Target]]:
    """Agents for the targets (``planning.assign_agents`` by key): the plan
    (its ``assigned`` and ``unassignable`` keyed by ``Target.key``) and the
    targets in submission order."""
    views = [dataclasses.replace(t, name=t.key) for t in targets]
    by_key = {t.key: t for t in targets}
    agent_plan = planning.assign_agents(
        views,
        agents,
        reach=lambda a, v: agent_reaches(a, by_key[v.name]),
        unreachable=lambda v: unreachable_reason(by_key[v.name]),
    )
    return agent_plan, [by_key[k] for k in planning.submission_order(views, agent_plan)]


def passwords_of(plan: Any, hypervisors: Sequence[str]) -> dict[str, Any]:
    """Every password the run needs, read before anything starts (a
    missing environment variable or Secret block: one line, exit 2)."""
    from ..plan import resolve_password

    out: dict[str, Any] = {}
    if VSPHERE in hypervisors and plan.connection is not None:
        out[VSPHERE] = resolve_password(plan.connection)
    if HYPERV in hypervisors:
        for host in plan.hyperv:
            out[f"{HYPERV}:{host.name}"] = resolve_password(host)
    return out


# --- the work of one VM ---------------------------------------------------------------


def _run_procedure(
    t: Target, agent: Any, progress: reports.Progress | None, call: Callable[[Callable, Any], Any]
) -> dict:
    """The task body's only call: an adapter's per-VM procedure (``call``
    with the progress callback and a logger), its log lines carrying the
    VM's context, its progress summed into the run's."""
    ctx = {"vm": t.name, "host": t.host, "agent": agent.name}
    log = reports.vm_logger(get_run_logger(), ctx)
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress.update(t.key, done, total)
        # One line per 10% at most: the UI keeps every log line.
        pct = 100.0 * done / total if total else 100.0
        if pct >= last[0] + 10 or done == total:
            last[0] = pct
            log.info("%.0f%% of %d bytes", pct, total)

    try:
        with reports.vm_context(ctx):
            result = call(on_progress, log)
    finally:
        if progress is not None:
            progress.finish(t.key)
    log.info("%s: %s", result.status, result.mode or result.error)
    row = result.to_dict()
    row["hypervisor"] = t.hypervisor
    return row


def _work_vsphere(
    client: Any, t: Target, plan: Any, agent: Any, run_id: str, progress: reports.Progress | None, token: Any
) -> dict:
    from ..vsphere import procedure

    def call(on_progress: Callable, log: Any) -> Any:
        return procedure.backup_vm(client, t.vm, plan, agent, run_id=run_id, cancel=token, progress=on_progress)

    return _run_procedure(t, agent, progress, call)


def _work_hyperv(
    password: Any,
    t: Target,
    plan: Any,
    agent: Any,
    run_id: str,
    progress: reports.Progress | None,
    token: Any,
    pool: Any = None,
) -> dict:
    from ..hyperv import inventory, procedure

    def call(on_progress: Callable, log: Any) -> Any:
        # A WinRM session of its own per VM: sealed NTLM messages carry
        # sequence numbers, so one session is not shared between threads.
        client = inventory.connect(t.hv_host, password)
        return procedure.backup_vm(
            client,
            t.vm,
            plan,
            t.hv_host,
            agent,
            run_id=run_id,
            cancel=token,
            progress=on_progress,
            on_shadow=lambda shadow: log.info("shadow copy %s made; reading the disks from it", shadow),
            pool=pool,
        )

    return _run_procedure(t, agent, progress, call)


def hyperv_pools(
    plan: Any,
    chosen: Sequence[Target],
    assigned: dict[str, Any],
    passwords: dict[str, Any],
    run_id: str,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    """One shadow copy set pool per Hyper-V host of the run (``hyperv.setpool``),
    holding the host's VMs and their agents; ``stack`` closes each at the end
    of the run, whatever happened (sets still open are ended as failed).
    None with ``VMBACKUP_HYPERV_SHARED_SETS=0`` (a diagnostic: a set per VM)."""
    if os.environ.get(SHARED_SETS_ENV, "1").strip() == "0":
        return {}
    from ..hyperv import inventory
    from ..hyperv.setpool import SetPool

    log = get_run_logger()
    pools: dict[str, Any] = {}
    for t in chosen:
        if t.hypervisor != HYPERV:
            continue
        pool = pools.get(t.hv_host.name)
        if pool is None:
            pool = pools[t.hv_host.name] = SetPool(
                t.hv_host,
                run_id=run_id,
                quiesce=plan.quiesce,
                connect=functools.partial(inventory.connect, t.hv_host, passwords[f"{HYPERV}:{t.hv_host.name}"]),
            )
            stack.callback(_close_pool, pool, log)
        pool.add(t.vm, assigned[t.key])
    return pools


def _close_pool(pool: Any, log: Any) -> None:
    for problem in pool.close():
        log.error("Hyper-V host %s: ending a shadow copy set failed: %s", pool.host.name, problem)
    s = pool.stats
    log.info(
        "Hyper-V host %s: %d shadow copy set(s) made, %d completed with BackupComplete, %d ended by the run's end",
        pool.host.name,
        s.sets_made,
        s.backup_complete,
        s.closed_open,
    )


# --- the report ---------------------------------------------------------------------


def _report(
    keys: Keys, rows: list[dict], repository: str, size_before: int | None, warnings: Sequence[str] = ()
) -> None:
    """The run's table and summary artifacts (``warnings`` at its top) and one event per VM."""
    ok = sum(r["status"] == "ok" for r in rows)
    reports.publish_table(keys.report, reports.table_rows(rows), description=f"{ok} of {len(rows)} VM(s) backed up")
    reports.publish_markdown(
        keys.summary,
        f"{keys.title}: {ok} of {len(rows)} VM(s) backed up",
        reports.summary_markdown(
            rows,
            title=keys.title,
            repository_before=size_before,
            repository_after=reports.directory_size(repository),
            warnings=warnings,
        ),
    )
    reports.emit_vm_events(rows)


# --- the body both flows run ------------------------------------------------------------


def run_backup(
    plan_path: str,
    vms: list[str] | None,
    vm_deadline_seconds: float | None,
    lease_seconds: float,
    agent: str | None,
    password_secret: str | None,
    fail_on_error: bool,
    *,
    hypervisors: Sequence[str] = HYPERVISORS,
    hyperv_password_secret: str | None = None,
    keys: Keys = KEYS,
    identities: Mapping[str, str] | None = None,
) -> list[dict]:
    """The body of ``backup_vms`` and ``backup_vsphere_vms`` (inside a flow
    run). ``identities``: only these VMs of the ``vms`` selected
    (:func:`only_identities`; a site's per-agent run)."""
    from ..keys import encryption_warning, unlock_plan_repository
    from ..plan import load_plan

    log = get_run_logger()
    plan = with_secret(load_plan(plan_path), password_secret, hyperv_password_secret)
    usable = only_agent(plan, agent)
    passwords = passwords_of(plan, hypervisors)
    # An encrypted repository is unlocked once per run, before anything
    # starts: a missing or wrong passphrase fails the run here (exit 2).
    unlock_plan_repository(plan)
    # An unencrypted repository the plan wants encrypted is backed up all the
    # same (it is what it was made), but the run says so, log and summary.
    warnings = [w for w in [encryption_warning(plan)] if w]
    for w in warnings:
        log.warning(w)
    secrets = [p.get_secret_value() for p in passwords.values()]
    run_id = str(flow_run.get_id() or "local")
    reports.install_context_filter()
    size_before = reports.directory_size(str(plan.repository))
    with contextlib.ExitStack() as stack:
        found, vclient = select(plan, vms, hypervisors, passwords, stack, secrets)
        found = only_identities(plan, found, identities)
        targets = found.targets
        agent_plan, chosen = plan_agents(targets, usable)
        by_key = {t.key: t for t in targets}
        agents = {a.name: a for a in usable}
        log.info(
            "%d VM(s) selected (%s), %d assigned over %d agent(s), %d unassignable, %d failed before the start",
            len(targets),
            ", ".join(found.reached) or "-",
            len(chosen),
            len(agents),
            len(agent_plan.unassignable),
            len(found.failed),
        )

        used_agents = sorted(set(agent_plan.assigned.values()))
        limits.ensure_limits(
            limits.limit_values(
                used_agents,
                sorted({t.host for t in chosen}),
                sorted({d for t in chosen if t.hypervisor == VSPHERE for d in t.storage}),
                per_agent=plan.limits.per_agent,
                per_host=plan.limits.per_host,
                per_datastore=plan.limits.per_datastore,
                volumes=sorted({v for t in chosen if t.hypervisor == HYPERV for v in t.storage}),
            )
        )

        progress_id = reports.create_progress(keys.progress, f"reading the disks of {len(chosen)} VM(s)")
        progress = reports.Progress(lambda pct: reports.update_progress(progress_id, pct))
        for t in chosen:
            progress.expect(t.key, t.capacity)

        pools = hyperv_pools(
            plan, chosen, {t.key: agents[agent_plan.assigned[t.key]] for t in chosen}, passwords, run_id, stack
        )
        jobs = []
        for t in chosen:
            a = agents[agent_plan.assigned[t.key]]
            names = limit_names(a.name, t)
            if t.hypervisor == HYPERV:
                work = functools.partial(
                    _work_hyperv,
                    passwords[f"{HYPERV}:{t.hv_host.name}"],
                    t,
                    plan,
                    a,
                    run_id,
                    progress,
                    pool=pools.get(t.hv_host.name),
                )
            else:
                work = functools.partial(_work_vsphere, vclient, t, plan, a, run_id, progress)
            jobs.append(
                vmtask.VmJob(
                    vm=t.key,
                    limits=names,
                    work=work,
                    row={
                        "vm": t.name,
                        "hypervisor": t.hypervisor,
                        "repository": str(plan.repository),
                        "host": t.host,
                        "agent": a.name,
                        "datastores": list(t.storage),
                    },
                )
            )
        # Enough threads for every slot the agents' limits allow, and some
        # more for VMs that wait on a host or datastore limit meanwhile.
        capacity = max(1, len(used_agents) * plan.limits.per_agent)
        rows = vmtask.run_vm_tasks(
            jobs,
            max_workers=min(len(jobs), 2 * capacity) or 1,
            deadline_seconds=vm_deadline_seconds,
            lease_seconds=lease_seconds,
            secrets=secrets,
        )

    for key, why in sorted(agent_plan.unassignable.items()):
        t = by_key[key]
        rows.append(_not_run_row(plan, t.name, t.hypervisor, t.host, why, t.storage))
    rows += found.failed
    done = sum(r["status"] == "ok" for r in rows)
    reports.update_progress(progress_id, 100.0, f"done: {done} of {len(rows)} VM(s) backed up")
    _report(keys, rows, str(plan.repository), size_before, warnings)
    failed = [r["vm"] for r in rows if r["status"] != "ok"]
    if failed:
        log.warning("%d VM(s) failed: %s", len(failed), ", ".join(failed))
        if fail_on_error:
            raise VmsFailedError(f"{len(failed)} of {len(rows)} VM(s) failed: {', '.join(failed)}")
    return rows


@flow(name="backup_vms", flow_run_name=reports.run_name("backup"), log_prints=False, validate_parameters=True)
def backup_vms(
    plan_path: str,
    vms: list[str] | None = None,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    agent: str | None = None,
    password_secret: str | None = None,
    fail_on_error: bool = False,
    hyperv_password_secret: str | None = None,
    identities: dict[str, str] | None = None,
) -> list[dict]:
    """Back up the plan's VMs, vSphere and Hyper-V (or only ``vms``), one
    task per VM, in one run with one report.

    Returns a row per VM (``vmbackup backup`` prints them), with
    ``hypervisor`` (``vsphere`` or ``hyperv``): failures are rows with
    ``status: failed`` and a one-line ``error``, not exceptions (with
    ``fail_on_error``, the run then ends Failed after its report, for
    deployments whose state people and CI watch). A hypervisor that cannot
    be reached is one failed row ``<host>:*`` while another one works.
    Raises when nothing can start: a bad plan, no hypervisor reached, an
    unknown VM name, a name no hypervisor has (exit 2), a selection that
    matches no VM (``NothingSelectedError``: the run ends Failed).

    ``agent``: only this agent of the plan backs up (a per-agent deployment
    run, on the worker of that agent's pool). ``password_secret``: the name
    of a Prefect Secret block holding the vSphere password, instead of the
    plan's; ``hyperv_password_secret``: the same for every Hyper-V host.
    ``identities``: only these of the VMs ``vms`` selects, by identity
    (``vsphere:<moref>``, ``hyperv:<host>:<VM Id>`` -> name): what a site's
    planning run (``backup_site``) gives each agent's run, so that of two
    VMs of one name each agent backs up only its own.
    """
    return run_backup(
        plan_path,
        vms,
        vm_deadline_seconds,
        lease_seconds,
        agent,
        password_secret,
        fail_on_error,
        hyperv_password_secret=hyperv_password_secret,
        identities=identities,
    )


__all__ = ["backup_vms", "run_backup", "VmsFailedError", "AgentMismatchError"]
