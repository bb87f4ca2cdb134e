"""The vSphere backup flow: ``backup_vsphere_vms`` (``sweep_vsphere`` is in
``maintenance``, and importable from here).

Orchestration only: the plan, the selection, the per-VM procedure and the
sweep are the vSphere adapter's (``vmbackup.plan``, ``vmbackup.vsphere``);
here is what runs where, under which limits, with which retries, and the
report.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from .. import planning
from . import limits, reports, vmtask

DEFAULT_VM_DEADLINE = 6 * 3600.0
# Set on a worker that serves one agent's work pool (the systemd unit in
# deployments/ does): a run for another agent is refused there, since the
# hot-added disks would appear on the other agent's machine.
AGENT_ENV = "VMBACKUP_AGENT"
REPORT_KEY = "vmbackup-vsphere-report"


class AgentMismatchError(Exception):
    """A per-agent run landed on a worker of another agent."""


def _with_secret(plan: Any, password_secret: str | None) -> Any:
    """The plan, reading its password from the Secret block ``password_secret``
    when one is named (a deployment's parameters hold block names, never secrets)."""
    if not password_secret:
        return plan
    conn = plan.connection.model_copy(update={"password_secret": password_secret, "password_env": None})
    return plan.model_copy(update={"connection": conn})


def _only_agent(plan: Any, agent: str | None) -> list[Any]:
    """The agents this run may use: all of the plan's, or only ``agent``
    (a per-agent deployment run on that agent's worker)."""
    if agent is None:
        return list(plan.agents)
    found = [a for a in plan.agents if a.name == agent]
    if not found:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"the plan has no agent named '{agent}'")
    here = os.environ.get(AGENT_ENV)
    if here and here != agent:
        raise AgentMismatchError(f"this worker serves agent '{here}', not '{agent}': check the deployment's work pool")
    return found


def _vm_datastores(vm: Any) -> list[str]:
    """Every datastore the VM has disks (or its configuration) on."""
    names = set(getattr(vm, "datastores", ()) or ())
    names |= {d.datastore for d in getattr(vm, "disks", ()) or () if getattr(d, "datastore", None)}
    return sorted(names)


def _selection(plan: Any, vms: Sequence[str] | None) -> Any:
    """The plan's selection, or exactly the named VMs (the plan's
    exclusions of disks still apply)."""
    if not vms:
        return plan.selection
    return plan.selection.model_copy(
        update={"vms": list(vms), "folders": [], "clusters": [], "hosts": [], "tags": [], "exclude": []}
    )


def _work(
    client: Any, vm: Any, plan: Any, agent: Any, run_id: str, progress: reports.Progress | None, token: Any
) -> dict:
    """The task body's only call: the adapter's per-VM procedure, its
    log lines carrying the VM's context, its progress summed into the run's."""
    from ..vsphere import procedure

    ctx = {"vm": vm.name, "host": vm.host, "agent": agent.name}
    log = reports.vm_logger(get_run_logger(), ctx)
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress.update(vm.name, done, total)
        # One line per 10% at most: the UI keeps every log line.
        pct = 100.0 * done / total if total else 100.0
        if pct >= last[0] + 10 or done == total:
            last[0] = pct
            log.info("%.0f%% of %d bytes", pct, total)

    try:
        with reports.vm_context(ctx):
            result = procedure.backup_vm(client, vm, plan, agent, run_id=run_id, cancel=token, progress=on_progress)
    finally:
        if progress is not None:
            progress.finish(vm.name)
    log.info("%s: %s", result.status, result.mode or result.error)
    return result.to_dict()


def _report(rows: list[dict], repository: str, size_before: int | None) -> None:
    """The run's table and summary artifacts and one event per VM."""
    ok = sum(r["status"] == "ok" for r in rows)
    reports.publish_table(REPORT_KEY, reports.table_rows(rows), description=f"{ok} of {len(rows)} VM(s) backed up")
    reports.publish_markdown(
        "vmbackup-vsphere-summary",
        f"vSphere backup: {ok} of {len(rows)} VM(s) backed up",
        reports.summary_markdown(
            rows,
            repository_before=size_before,
            repository_after=reports.directory_size(repository),
        ),
    )
    reports.emit_vm_events(rows)


@flow(name="backup_vsphere_vms", flow_run_name=reports.run_name("backup"), log_prints=False, validate_parameters=True)
def backup_vsphere_vms(
    plan_path: str,
    vms: list[str] | None = None,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    agent: str | None = None,
    password_secret: str | None = None,
    fail_on_error: bool = False,
) -> list[dict]:
    """Back up the plan's VMs (or only ``vms``), one task per VM.

    Returns a row per VM (``vmbackup backup`` prints them): failures are
    rows with ``status: failed`` and a one-line ``error``, not exceptions
    (with ``fail_on_error``, the run then ends Failed after its report, for
    deployments whose state people and CI watch). Raises when nothing can
    start: a bad plan, a refused connection, an unknown VM name.

    ``agent``: only this agent of the plan backs up (a per-agent deployment
    run, on the worker of that agent's pool). ``password_secret``: the name of
    a Prefect Secret block holding the vSphere password, instead of the plan's.
    """
    from ..plan import load_plan, resolve_password
    from ..vsphere.client import VSphereClient
    from ..vsphere.inventory import select_vms

    log = get_run_logger()
    plan = _with_secret(load_plan(plan_path), password_secret)
    usable = _only_agent(plan, agent)
    password = resolve_password(plan.connection)
    run_id = str(flow_run.get_id() or "local")
    reports.install_context_filter()
    size_before = reports.directory_size(str(plan.repository))
    with VSphereClient.connect(plan.connection, password) as client:
        selected = select_vms(client, _selection(plan, vms))
        agent_plan = planning.assign_agents(selected, usable)
        by_vm = {v.name: v for v in selected}
        agents = {a.name: a for a in usable}
        order = planning.submission_order(selected, agent_plan)
        log.info(
            "%d VM(s) selected, %d assigned over %d agent(s), %d unassignable",
            len(selected),
            len(order),
            len(agents),
            len(agent_plan.unassignable),
        )

        used_agents = sorted(set(agent_plan.assigned.values()))
        limits.ensure_limits(
            limits.limit_values(
                used_agents,
                sorted({by_vm[v].host for v in order}),
                sorted({d for v in order for d in _vm_datastores(by_vm[v])}),
                per_agent=plan.limits.per_agent,
                per_host=plan.limits.per_host,
                per_datastore=plan.limits.per_datastore,
            )
        )

        progress_id = reports.create_progress("vmbackup-vsphere-progress", f"reading the disks of {len(order)} VM(s)")
        progress = reports.Progress(lambda pct: reports.update_progress(progress_id, pct))
        for name in order:
            progress.expect(name, sum(d.capacity for d in by_vm[name].disks))

        jobs = []
        for name in order:
            vm, agent = by_vm[name], agents[agent_plan.assigned[name]]
            jobs.append(
                vmtask.VmJob(
                    vm=name,
                    limits=limits.vm_limit_names(agent.name, vm.host, _vm_datastores(vm)),
                    work=functools.partial(_work, client, vm, plan, agent, run_id, progress),
                    row={
                        "repository": str(plan.repository),
                        "host": vm.host,
                        "agent": agent.name,
                        "datastores": _vm_datastores(vm),
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
            secrets=[password.get_secret_value()],
        )

    for name, why in sorted(agent_plan.unassignable.items()):
        row = dict.fromkeys(vmtask.ROW_FIELDS)
        row.update(
            vm=name,
            status="failed",
            repository=str(plan.repository),
            host=by_vm[name].host,
            bytes_read=0,
            bytes_stored=0,
            seconds=0.0,
            error=why,
        )
        rows.append(row)
    reports.update_progress(progress_id, 100.0)
    _report(rows, str(plan.repository), size_before)
    failed = [r["vm"] for r in rows if r["status"] != "ok"]
    if failed:
        log.warning("%d VM(s) failed: %s", len(failed), ", ".join(failed))
        if fail_on_error:
            raise VmsFailedError(f"{len(failed)} of {len(rows)} VM(s) failed: {', '.join(failed)}")
    return rows


class VmsFailedError(Exception):
    """Some VMs of a deployment run failed (their rows are in the report)."""


# The sweep is a maintenance flow now (maintenance.py); it is still importable from here.
from .maintenance import sweep_vsphere  # noqa: E402

__all__ = ["backup_vsphere_vms", "sweep_vsphere"]
