"""The restore flows: ``restore_vm`` brings VMs back from their points (one
run, one task per VM under the backups' limits, one report), and ``drill``
restores the newest point of a sample of VMs into the plan's isolated
target, compares their disks with the backup, times them and removes them.

Orchestration only: what a request means is ``restore_input`` (no Prefect),
the per-VM work is ``hypervisors.restore.restore_one`` over the target
adapter's ``RestoreSteps``; here is what runs where, under which limits,
the checks before anything is made, and the report (docs/restore.md).

Before any VM is touched, every VM's restore is checked on its target
(``reconcile`` removes what a killed restore to that name left, then
``prepare``: the name is free, the host, datastore or folder and the mapped
networks exist): one mistake ends the run with that line
(``RestoreInputError``, exit 2) and nothing is made. A drill instead fails
only that VM's drill (an alert), and drills the others.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from .. import results
from ..errors import (
    DrillFailedError,
    InvalidInputError,
    NothingSelectedError,
    RestoreInputError,
    VmsFailedError,
)
from . import limits, reports, restore_input, vmtask
from .backup import Keys, only_agent, with_secret
from .restore_input import HYPERV, VSPHERE, RestoreJob

KEYS = Keys("vmbackup-restore-report", "vmbackup-restore-summary", "vmbackup-restore-progress", "Restore")
DRILL_KEYS = Keys("vmbackup-drill-report", "vmbackup-drill-summary", "vmbackup-drill-progress", "Restore drill")
DEFAULT_VM_DEADLINE = 6 * 3600.0
DEFAULT_DRILL_DEADLINE = 3600.0
ROW_FIELDS = results.row_fields(results.RestoreResult)


class _Recording:
    """The adapter's steps, remembering what ``create`` made (a drill removes
    it once compared; ``restore_one`` keeps it to itself)."""

    def __init__(self, steps: Any) -> None:
        self._steps = steps
        self.made: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._steps, name)

    def create(self, target: Any) -> Any:
        self.made = self._steps.create(target)
        return self.made


# --- the targets --------------------------------------------------------------


def _key(j: RestoreJob) -> str:
    return VSPHERE if j.target == VSPHERE else f"{HYPERV}:{j.hv_host.name}"


def _connect(plan: Any, jobs: Sequence[RestoreJob], passwords: dict[str, Any], stack: contextlib.ExitStack) -> dict:
    """The target hypervisors, connected (closed by ``stack``)."""
    from ..hyperv.hypervisor import HyperV
    from ..vsphere.hypervisor import VSphere

    out: dict[str, Any] = {}
    for j in jobs:
        key = _key(j)
        if key in out:
            continue
        hv = VSphere(plan, passwords[key]) if j.target == VSPHERE else HyperV(plan, j.hv_host, passwords[key])
        if not hasattr(hv, "restore_steps"):
            raise RestoreInputError(f"this vmbackup cannot restore onto {hv.label} yet")
        hv.connect()
        stack.callback(hv.close)
        out[key] = hv
    return out


def _check(jobs: Sequence[RestoreJob], targets: dict, plan: Any, run_id: str, secrets: Sequence[str]) -> dict[str, str]:
    """Each VM's restore checked on its target before anything is made
    (reconcile, then prepare); the VMs that cannot be restored, with why."""
    problems: dict[str, str] = {}
    for j in jobs:
        try:
            steps = targets[_key(j)].restore_steps(j.request, plan, j.agent, run_id=run_id)
            steps.reconcile()
            steps.prepare(j.description)
        except RestoreInputError as e:
            problems[j.vm] = vmtask.one_line(e, secrets)
    return problems


# --- the work of one VM -----------------------------------------------------------


def _work(
    j: RestoreJob,
    hv: Any,
    plan: Any,
    run_id: str,
    progress: reports.Progress,
    drill: bool,
    secrets: Sequence[str],
    token: Any,
) -> dict:
    """The task body: ``restore_one`` with the target's steps; a drill then removes the VM."""
    from ..hypervisors.restore import restore_one

    ctx = {"vm": j.vm, "host": j.host, "agent": j.agent.name}
    log = reports.vm_logger(get_run_logger(), ctx)
    steps = _Recording(hv.restore_steps(j.request, plan, j.agent, run_id=run_id))
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        progress.update(j.vm, done, total)
        pct = 100.0 * done / total if total else 100.0
        if pct >= last[0] + 10 or done == total:
            last[0] = pct
            log.info("%.0f%% of %d bytes written", pct, total)

    try:
        with reports.vm_context(ctx):
            log.info("restoring point %s as %s", j.request.point, j.request.restored_as)
            result = restore_one(
                steps,
                j.request,
                j.description,
                hypervisor=j.target,
                repository=str(plan.repository),
                agent=j.agent.name,
                disks_per_vm=plan.limits.disks_per_vm,
                verify=drill,
                cancel=token,
                progress=on_progress,
            )
            if drill:
                # The drill VM is gone whatever the comparison said: a failed
                # comparison raised, and release removed it.
                try:
                    steps.remove(steps.made)
                    result.changes.append(f"drill VM {result.restored_as} removed after the comparison")
                except Exception as e:
                    result.status = "failed"
                    result.error = (
                        f"drill VM {result.restored_as} was verified but could not be removed: "
                        f"{vmtask.one_line(e, secrets)}"
                    )
    finally:
        progress.finish(j.vm)
    log.info("%s as %s in %.1f s", result.status, result.restored_as, result.seconds)
    return result.to_dict()


def _job_row(plan: Any, j: RestoreJob) -> dict:
    """The row's fields known before the work (a failed row's too)."""
    return {
        "vm": j.vm,
        "hypervisor": j.target,
        "source_hypervisor": j.source,
        "point": j.request.point,
        "restored_as": j.request.restored_as,
        "host": j.host,
        "agent": j.agent.name if j.agent else None,
        "in_place": j.request.in_place,
        "repository": str(plan.repository),
    }


def run_restores(
    plan: Any,
    jobs: list[RestoreJob],
    *,
    keys: Keys,
    drill: bool,
    vm_deadline_seconds: float | None,
    lease_seconds: float,
    early: Sequence[dict] = (),
    source: restore_input.Source | None = None,
) -> list[dict]:
    """Check every job on its target, then restore them, one task each under
    the limits; a row per job (inside a flow run), after ``early``'s (the
    failed rows of VMs that never became a job), all in one report."""
    log = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    reports.install_context_filter()
    passwords = restore_input.passwords(plan, jobs)
    secrets = [p.get_secret_value() for p in passwords.values()]
    rows: list[dict] = list(early)
    if not jobs:
        _report(keys, _with_source(rows, source), drill=drill)
        return rows
    with contextlib.ExitStack() as stack:
        targets = _connect(plan, jobs, passwords, stack)
        problems = _check(jobs, targets, plan, run_id, secrets)
        if problems and not drill:
            raise RestoreInputError("; ".join(problems.values()))
        for j in jobs:
            if j.vm in problems:
                rows.append(
                    results.empty_row(results.RestoreResult, **_job_row(plan, j), status="failed", error=problems[j.vm])
                )
        runnable = [j for j in jobs if j.vm not in problems]
        log.info(
            "%d VM(s) to %s: %s",
            len(runnable),
            "drill" if drill else "restore",
            ", ".join(j.vm for j in runnable) or "-",
        )
        agents = sorted({j.agent.name for j in runnable})
        limits.ensure_limits(
            limits.limit_values(
                agents,
                sorted({j.host for j in runnable if j.host}),
                sorted({s for j in runnable if j.target == VSPHERE for s in j.storage}),
                per_agent=plan.limits.per_agent,
                per_host=plan.limits.per_host,
                per_datastore=plan.limits.per_datastore,
                volumes=sorted({s for j in runnable if j.target == HYPERV for s in j.storage}),
            )
        )
        progress_id = reports.create_progress(keys.progress, f"writing the disks of {len(runnable)} VM(s)")
        progress = reports.Progress(lambda pct: reports.update_progress(progress_id, pct))
        for j in runnable:
            progress.expect(j.vm, j.capacity)
        jobs_ = []
        for j in runnable:
            names = sorted(
                {limits.limit_name("agent", j.agent.name)} | {limits.limit_name(k, n) for k, n in j.limit_keys()}
            )
            work = functools.partial(_work, j, targets[_key(j)], plan, run_id, progress, drill, secrets)
            jobs_.append(vmtask.VmJob(vm=j.vm, limits=names, work=work, row=_job_row(plan, j)))
        capacity = max(1, len(agents) * plan.limits.per_agent)
        if jobs_:
            rows += vmtask.run_vm_tasks(
                jobs_,
                max_workers=min(len(jobs_), 2 * capacity),
                deadline_seconds=vm_deadline_seconds,
                lease_seconds=lease_seconds,
                secrets=secrets,
                verb="drill" if drill else "restore",
                row_class=results.RestoreResult,
            )
        done = sum(r["status"] == "ok" for r in rows)
        verb = "drilled" if drill else "restored"
        reports.update_progress(progress_id, 100.0, f"done: {done} of {len(rows)} VM(s) {verb}")
    order = {j.vm: i for i, j in enumerate(jobs)}
    rows = sorted(({k: r.get(k) for k in ROW_FIELDS} for r in rows), key=lambda r: order.get(r["vm"], 0))
    rows = _with_source(rows, source)
    _report(keys, rows, drill=drill)
    return rows


def _with_source(rows: list[dict], source: restore_input.Source | None) -> list[dict]:
    """Rows read from an offsite copy name it (``repository``) and say why (a warning)."""
    if source is None or source.url is None:
        return rows
    for r in rows:
        r["repository"] = source.repository
        if source.warning:
            r["warnings"] = [source.warning, *(r.get("warnings") or [])]
    return rows


def _report(keys: Keys, rows: list[dict], *, drill: bool) -> None:
    """The run's table and markdown artifacts and one event per VM."""
    if drill:
        ok = sum(reports.drill_passed(r) for r in rows)
        what = f"{ok} of {len(rows)} drill(s) passed"
    else:
        ok = sum(r["status"] == "ok" for r in rows)
        what = f"{ok} of {len(rows)} VM(s) restored"
    reports.publish_table(keys.report, reports.restore_table_rows(rows), description=what)
    reports.publish_markdown(
        keys.summary, f"{keys.title}: {what}", reports.restore_markdown(rows, title=keys.title, drill=drill)
    )
    reports.emit_restore_events(rows, drill=drill)


# --- the flows -----------------------------------------------------------------------


@flow(name="restore_vm", flow_run_name=reports.run_name("restore"), log_prints=False, validate_parameters=True)
def restore_vm(
    plan_path: str,
    vms: list[str],
    point: str | None = None,
    before: str | None = None,
    restored_as: str | None = None,
    host: str | None = None,
    datastore: str | None = None,
    path: str | None = None,
    network_map: dict[str, str] | None = None,
    power_on: bool = False,
    in_place: bool = False,
    folder: str | None = None,
    resource_pool: str | None = None,
    repo: str | None = None,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    password_secret: str | None = None,
    hyperv_password_secret: str | None = None,
    fail_on_error: bool = False,
    agent: str | None = None,
    agent_deployment: str | None = None,
) -> list[dict]:
    """Restore VMs from their backup points, one task per VM, one report.

    Args:
        plan_path: the plan (YAML) on the worker: its repository, hypervisors and agents.
        vms: the VMs to restore, by the name they were backed up under.
        point: the backup id to restore (one VM); default: its newest trusted point.
        before: the newest point taken before this time (2026-12-01T18:00, UTC unless it says).
        restored_as: the new VM's name (one VM); default: <vm>-restored.
        host: the target host: an ESXi host, or a Hyper-V host of the plan (across hypervisors when
            it is the other kind); default: the point's host.
        datastore: vSphere: the datastore of the new VM; default: the point's datastores.
        path: Hyper-V: the folder the new VM goes under; default: the original folder's parent.
        network_map: a network (port group or switch) of the backup -> the target's network.
        power_on: power the VM on once restored.
        in_place: roll the existing, powered-off VM back to the point (only what differs is written).
        folder: vSphere: the VM folder of the new VM (a path such as drills or lab/drills); default: the
            datacenter's VM folder.
        resource_pool: vSphere: the resource pool of the new VM (a path under the host's root pool).
        repo: read the points from here instead of the plan's repository: a directory, or the offsite
            copy s3://BUCKET/PREFIX (also read, from the plan's copy:, when the plan's repository is gone).
        vm_deadline_seconds: cancel a VM's restore after this long.
        lease_seconds: how long a dead run keeps a limit's slot.
        password_secret: the name of the Secret block with the vSphere password (not a password).
        hyperv_password_secret: the same for every Hyper-V host.
        fail_on_error: end the run Failed when a VM failed (after the report).
        agent: only this agent of the plan writes the disks (a deployment run on that agent's worker).
        agent_deployment: a site's restore (the ``restore`` deployment, on the control pool): each VM is
            restored by an agent that reaches its target host, each agent's VMs in a flow run of this
            deployment (``{agent}``: the agent's name; ``restore_vm/{agent}``, in that agent's work
            pool), their rows in one report (``site.restore_over_agents``); fails when any VM failed.

    Returns a row per VM (``results.RestoreResult``: ``vmbackup restore
    --json`` prints them). Raises ``RestoreInputError`` (exit 2) when a VM's
    restore cannot start (a name in use, an unknown point, host, datastore,
    path or network): nothing is made then.
    """
    arguments = dict(locals())  # the run's parameters, as a site's run forwards them to its agents' runs
    from ..plan import load_plan

    # The points' repository (or its offsite copy's mirror), unlocked once per
    # run when encrypted: a missing or wrong passphrase fails the run here (exit 2).
    source = restore_input.restore_source(
        with_secret(load_plan(plan_path), password_secret, hyperv_password_secret), repo
    )
    plan = source.plan
    if source.warning:
        get_run_logger().warning("%s", source.warning)
    jobs = restore_input.resolve(
        plan,
        vms,
        point=point,
        before=restore_input.parse_before(before),
        restored_as=restored_as,
        host=host,
        datastore=datastore,
        path=path,
        network_map=network_map,
        power_on=power_on,
        in_place=in_place,
        folder=folder,
        resource_pool=resource_pool,
        assign=False,
    )
    if agent_deployment and agent is None:  # the site's restore: each agent restores its VMs
        from .site import restore_over_agents

        return restore_over_agents(plan, jobs, arguments)
    restore_input.assign_agents(jobs, only_agent(plan, agent))
    source.fetch(jobs)  # from a copy: the points' chunks into its mirror
    rows = run_restores(
        plan,
        jobs,
        keys=KEYS,
        drill=False,
        vm_deadline_seconds=vm_deadline_seconds,
        lease_seconds=lease_seconds,
        source=source,
    )
    failed = [r["vm"] for r in rows if r["status"] != "ok"]
    if failed:
        get_run_logger().warning("%d VM(s) failed: %s", len(failed), ", ".join(failed))
        if fail_on_error:
            raise VmsFailedError(f"{len(failed)} of {len(rows)} restore(s) failed: {', '.join(failed)}")
    return rows


def drill_choice(plan: Any, vms: Sequence[str] | None, sample: int | None) -> list[str]:
    """The VMs this drill takes: ``vms``, or the plan's drill sample, the
    least recently drilled first (the repository's drill record)."""
    from .. import _mover

    infos, _ = _mover.list_backups(str(plan.repository))
    if vms:
        return list(vms)
    kinds = [k for k, there in ((VSPHERE, plan.drill.vsphere), (HYPERV, plan.drill.hyperv)) if there is not None]
    candidates = restore_input.drill_candidates(infos, plan.drill.vms, kinds)
    state = restore_input.load_drill_state(str(plan.repository))
    last = {vm: float(s.get("unix") or 0.0) for vm, s in state.items()}
    return restore_input.drill_sample(sorted(candidates), last, sample or plan.drill.sample)


def drill_jobs(
    plan: Any, vms: Sequence[str] | None, sample: int | None, agents: Sequence[Any], run_id: str
) -> tuple[list[str], list[RestoreJob], list[dict]]:
    """What a drill takes: the VMs chosen, their jobs (under drill names, each
    given an agent of ``agents`` that reaches its target host, the least
    loaded) and the failed rows of those that cannot be drilled (a VM the
    user named that cannot: ``RestoreInputError``)."""
    if plan.drill is None:
        raise InvalidInputError("the plan has no drill: section (where drill VMs go: docs/plan.md)")
    if sample is not None and sample < 1:
        raise InvalidInputError("sample must be at least 1")
    chosen = drill_choice(plan, vms, sample)
    if not chosen:
        raise NothingSelectedError(
            f"the repository has no backup point of a VM the drill takes ({', '.join(plan.drill.vms)})"
        )
    jobs: list[RestoreJob] = []
    early: list[dict] = []
    for vm in chosen:
        try:
            job = restore_input.resolve(plan, [vm], assign=False)[0]
            restore_input.drill_requests(plan, [job], run_id)
            restore_input.assign_agents([job], agents)  # one no agent reaches fails here
            jobs.append(job)
        except RestoreInputError as e:
            if vms:  # the user named it: bad input
                raise
            early.append(results.empty_row(results.RestoreResult, vm=vm, status="failed", error=str(e)))
    restore_input.assign_agents(jobs, agents)  # spread over the agents that reach them
    return chosen, jobs, early


def finish_drill(plan: Any, rows: list[dict], run_id: str, *, record: bool = True) -> dict:
    """The drill record updated (``record``), then the report; raises
    ``DrillFailedError`` with it when a drill failed."""
    if record:
        state = restore_input.load_drill_state(str(plan.repository))
        now = time.time()
        for r in rows:
            state[r["vm"]] = {"unix": now, "point": r.get("point"), "passed": reports.drill_passed(r), "run": run_id}
        try:
            restore_input.save_drill_state(str(plan.repository), state)
        except OSError as e:
            get_run_logger().warning("could not record the drill in the repository: %s", e)
    passed = [r["vm"] for r in rows if reports.drill_passed(r)]
    failed = [r["vm"] for r in rows if not reports.drill_passed(r)]
    report = {"vms": rows, "passed": passed, "failed": failed, "repository": str(plan.repository)}
    if failed:
        raise DrillFailedError(f"{len(failed)} of {len(rows)} drill(s) failed: {', '.join(failed)}", report)
    return report


def run_drill(
    plan: Any,
    vms: Sequence[str] | None,
    sample: int | None,
    vm_deadline_seconds: float | None,
    lease_seconds: float,
    agent: str | None = None,
    record: bool = True,
    agent_deployment: str | None = None,
) -> dict:
    """The body of ``drill``: choose, restore into the isolated target,
    compare, remove, record, report."""
    log = get_run_logger()
    usable = only_agent(plan, agent)
    run_id = str(flow_run.get_id() or f"local{int(time.time())}")
    chosen, jobs, early = drill_jobs(plan, vms, sample, usable, run_id)
    log.info("drilling %s", ", ".join(chosen))
    rows = run_restores(
        plan,
        jobs,
        keys=DRILL_KEYS,
        drill=True,
        vm_deadline_seconds=vm_deadline_seconds,
        lease_seconds=lease_seconds,
        early=early,
    )
    return finish_drill(plan, rows, run_id, record=record)


@flow(name="drill", flow_run_name=reports.run_name("drill"), log_prints=False, validate_parameters=True)
def drill(
    plan_path: str,
    vms: list[str] | None = None,
    sample: int | None = None,
    vm_deadline_seconds: float | None = DEFAULT_DRILL_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    password_secret: str | None = None,
    hyperv_password_secret: str | None = None,
    agent: str | None = None,
    record: bool = True,
    agent_deployment: str | None = None,
) -> dict:
    """A restore drill: the newest point of a sample of VMs restored under a
    drill name into the plan's isolated target (``drill:``), its disks
    compared with the backup, powered on, its RTO recorded, then removed.

    Args:
        plan_path: the plan (YAML) on the worker, with its drill: section.
        vms: drill these VMs; default: the plan's sample, the least recently drilled first.
        sample: how many VMs; default: the plan's drill.sample.
        vm_deadline_seconds: cancel a VM's drill after this long.
        lease_seconds: how long a dead run keeps a limit's slot.
        password_secret: the name of the Secret block with the vSphere password (not a password).
        hyperv_password_secret: the same for every Hyper-V host.
        agent: only this agent of the plan writes and reads the disks (a deployment run on its worker).
        record: update the repository's drill record (a site's drill records its agents' runs
            once itself).
        agent_deployment: a site's drill (the ``drill`` deployment, on the control pool): the VMs
            chosen here, each drilled by an agent that reaches its drill target, each agent's VMs in
            a flow run of this deployment (``drill/{agent}``, in that agent's work pool), with
            ``record`` off; one report, the drill record written once (``site.drill_over_agents``).

    Returns ``{"vms": [rows], "passed": [...], "failed": [...]}``; raises
    ``DrillFailedError`` (with that report) when a drill failed, after the
    report and the ``vmbackup.drill.failed`` events.
    """
    arguments = dict(locals())  # the run's parameters, as a site's run forwards them to its agents' runs
    from ..keys import unlock_plan_repository
    from ..plan import load_plan

    plan = with_secret(load_plan(plan_path), password_secret, hyperv_password_secret)
    unlock_plan_repository(plan)  # once per run, as restore_vm
    if agent_deployment and agent is None:  # the site's drill: each agent drills its VMs
        from .site import drill_over_agents

        return drill_over_agents(plan, arguments)
    return run_drill(plan, vms, sample, vm_deadline_seconds, lease_seconds, agent, record)


__all__ = ["restore_vm", "drill", "run_restores", "run_drill", "drill_jobs", "finish_drill", "DrillFailedError"]
