"""The site's nightly backup: plan here, back up on each agent's worker.

``backup_site`` loads the plan, selects the VMs (vSphere and Hyper-V, as
``backup_vms`` does) and assigns them to agents (``vmbackup.planning``, the
same assignment ``vmbackup backup`` makes), then starts one flow run per
agent of the per-agent deployment ``backup_vms/<agent>``
(``agent_deployment``), which lives in that agent's work pool: the worker
on that agent picks it up, so the per-VM work runs where the hot-added
disks appear (or where the Hyper-V shadow copies' shares are mounted). The
limits are Prefect's global concurrency limits on the server, shared by
every worker. ``backup_vsphere_site`` is the same for vSphere only, for the
deployments made before Hyper-V (its agents' deployments are
``backup_vsphere_vms/<agent>``).

The per-agent runs are subflows of this run (the UI shows them under it);
their reports (table artifacts) are read back into one report here, and this
run fails when any VM failed or any agent's run did not complete, so
``prefect deployment run backup_site/nightly --watch`` exits 1 then. A plan
that protects nothing fails it before any agent's run starts (``select``
raises: a name no hypervisor has, or a selection matching no VM), so the
``vmbackup-nightly-failed`` automation (deployments/automations.yaml)
alerts on it.

``restore_over_agents`` is the same for a person's restore: the site's
``restore`` deployment (run from the UI's form) runs ``restore_vm`` on the
control pool with an ``agent_deployment``, and ``restore_vm`` hands over to
it: the points are read and every VM given the agent that reaches its
target host (``restore_input.assign_agents``, as ``restore_vm`` gives them),
then each agent's VMs are restored in a flow run of ``restore_vm/<agent>``
on that agent's worker, and their rows collected into one report (table and
markdown, as ``restore_vm``'s). ``drill_over_agents`` does the same for the
``drill`` deployment (``drill/<agent>``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from . import limits, reports, restore_input
from .backup import (
    DEFAULT_VM_DEADLINE,
    HYPERV,
    HYPERVISORS,
    KEYS,
    VSPHERE,
    VmsFailedError,
    passwords_of,
    plan_agents,
    select,
    split_by_agent,
    with_secret,
)
from .backup_vsphere import REPORT_KEY
from .restore import DRILL_KEYS
from .restore import KEYS as RESTORE_KEYS

DEFAULT_AGENT_DEPLOYMENT = "backup_vms/{agent}"
VSPHERE_AGENT_DEPLOYMENT = "backup_vsphere_vms/{agent}"
POLL_SECONDS = 2.0
# An agent's run that no worker has started this long after the site's run
# started it is cancelled (the worker is down); its VMs' rows say so.
AGENT_START_SECONDS = 3600.0


def _agent_rows(client: Any, run: Any, vms: dict[str, str]) -> list[dict]:
    """The rows of one agent's run, from its report artifact; a VM the
    report does not have failed with the run's state as its reason.

    ``vms``: the VMs handed to the run (identity -> name). The report's rows
    are matched by name, a row per VM: two VMs of one name given to this
    agent are two rows (their host and vm_id say which); one it lacks is a
    failed row."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=[KEYS.report, REPORT_KEY])
        )
    )
    # Two VMs of one name are two rows (their host and vm_id say which).
    rows: dict[str, list[dict]] = {}
    for art in arts:
        data = json.loads(art.data) if isinstance(art.data, str) else art.data
        for r in data or []:
            rows.setdefault(r["vm"], []).append(r)
    state = run.state.name if run.state else "unknown"
    out: list[dict] = []
    for name in dict.fromkeys(vms.values()):
        got = rows.get(name, [])
        out += got
        for ident in [i for i, n in vms.items() if n == name][len(got) :]:
            out.append(
                {
                    "vm": name,
                    "status": "failed",
                    "error": f"the agent's flow run {run.name} ended {state} without a report of {name} ({ident})",
                }
            )
    return out


def _site(
    plan_path: str,
    password_secret: str | None,
    agent_deployment: str,
    vm_deadline_seconds: float | None,
    lease_seconds: float,
    hypervisors: Sequence[str],
    hyperv_password_secret: str | None = None,
    report_key: str = "vmbackup-site-report",
) -> list[dict]:
    """The body of both site flows."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from ..plan import load_plan

    log = get_run_logger()
    plan = with_secret(load_plan(plan_path), password_secret, hyperv_password_secret)
    passwords = passwords_of(plan, hypervisors)
    secrets = [p.get_secret_value() for p in passwords.values()]
    with contextlib.ExitStack() as stack:
        found, _ = select(plan, None, hypervisors, passwords, stack, secrets)
    selected = found.targets
    agent_plan, chosen = plan_agents(selected, plan.agents)
    by_key = {t.key: t for t in selected}
    # Each agent's run gets its VMs by identity (moref, or Hyper-V host and
    # VM Id), with their names to select by: of two VMs of one name given
    # to two agents, each agent backs up its own only.
    per_agent = split_by_agent(agent_plan, chosen)
    # The limits exist before any agent's run asks for them.
    limits.ensure_limits(
        limits.limit_values(
            sorted(per_agent),
            sorted({t.host for t in chosen}),
            sorted({d for t in chosen if t.hypervisor == VSPHERE for d in t.storage}),
            per_agent=plan.limits.per_agent,
            per_host=plan.limits.per_host,
            per_datastore=plan.limits.per_datastore,
            volumes=sorted({v for t in chosen if t.hypervisor == HYPERV for v in t.storage}),
        )
    )

    runs = {}
    for agent, vms in sorted(per_agent.items()):
        name = agent_deployment.format(agent=agent)
        parameters = {
            "plan_path": plan_path,
            "vms": list(dict.fromkeys(vms.values())),
            "identities": vms,
            "agent": agent,
            "password_secret": password_secret,
            "vm_deadline_seconds": vm_deadline_seconds,
            "lease_seconds": lease_seconds,
            "fail_on_error": True,
        }
        if HYPERV in hypervisors:
            parameters["hyperv_password_secret"] = hyperv_password_secret
        # timeout=0: start it and go on; every agent's run goes at once.
        runs[agent] = run_deployment(
            name=name, parameters=parameters, timeout=0, flow_run_name=f"{agent}: {len(vms)} VM(s)"
        )
        log.info("%s: %d VM(s) in flow run %s of %s", agent, len(vms), runs[agent].name, name)

    rows: list[dict] = []
    with get_client(sync_client=True) as client:
        runs = _wait(client, runs, log)
        for agent, run in sorted(runs.items()):
            for r in _agent_rows(client, run, per_agent[agent]):
                rows.append({**r, "agent": agent, "flow_run": str(run.id)})
    for key, why in sorted(agent_plan.unassignable.items()):
        t = by_key[key]
        rows.append(
            {
                "vm": t.name,
                "hypervisor": t.hypervisor,
                "status": "failed",
                "agent": None,
                "flow_run": None,
                "error": why,
            }
        )
    rows += [{**r, "agent": None, "flow_run": None} for r in found.failed]

    # The rows' columns are VmResult's (results.py), plus the agent's flow run.
    create_table_artifact(
        key=report_key,
        table=[{**t, "flow_run": r.get("flow_run")} for t, r in zip(reports.table_rows(rows), rows, strict=True)],
        description=f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} VM(s) backed up over {len(runs)} agent(s)",
    )
    failed = [r["vm"] for r in rows if r.get("status") != "ok"]
    if failed:
        raise VmsFailedError(f"{len(failed)} of {len(rows)} VM(s) failed: {', '.join(failed)}")
    return rows


@flow(name="backup_site", log_prints=False, validate_parameters=True)
def backup_site(
    plan_path: str,
    password_secret: str | None = None,
    agent_deployment: str = DEFAULT_AGENT_DEPLOYMENT,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    hyperv_password_secret: str | None = None,
) -> list[dict]:
    """Assign the plan's VMs (vSphere and Hyper-V) to agents and back them
    up, each agent's VMs in a flow run of ``agent_deployment`` (``{agent}``
    is the agent's name; a ``backup_vms`` deployment) on that agent's
    worker. Returns every VM's row (with ``agent`` and ``flow_run``); fails
    when any VM failed."""
    return _site(
        plan_path,
        password_secret,
        agent_deployment,
        vm_deadline_seconds,
        lease_seconds,
        HYPERVISORS,
        hyperv_password_secret,
    )


@flow(name="backup_vsphere_site", log_prints=False, validate_parameters=True)
def backup_vsphere_site(
    plan_path: str,
    password_secret: str | None = None,
    agent_deployment: str = VSPHERE_AGENT_DEPLOYMENT,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
) -> list[dict]:
    """``backup_site`` for the plan's vSphere VMs only (the deployments made
    before Hyper-V; ``agent_deployment`` defaults to ``backup_vsphere_vms/{agent}``)."""
    return _site(
        plan_path,
        password_secret,
        agent_deployment,
        vm_deadline_seconds,
        lease_seconds,
        (VSPHERE,),
        report_key="vmbackup-vsphere-site-report",
    )


# --- a person's restore, each VM on the worker of an agent that reaches its target ---


def _restore_rows(client: Any, run: Any, vms: list[str], key: str = RESTORE_KEYS.report) -> list[dict]:
    """The rows of one agent's restore run, from its table artifact (the
    ``restore_vm`` report); a VM it lacks failed, with the run's state and
    message as its reason (a restore that could not start: a name in use...)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from .. import results

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=[key])
        )
    )
    got: dict[str, dict] = {}
    for art in arts:
        data = json.loads(art.data) if isinstance(art.data, str) else art.data
        for r in data or []:
            got[r["vm"]] = r
    state = run.state.name if run.state else "unknown"
    why = " ".join(((run.state.message if run.state else None) or "").split())
    out = []
    for vm in vms:
        if vm in got:
            out.append(got[vm])
        else:
            error = f"the agent's flow run {run.name} ended {state} without restoring {vm}" + (
                f": {why}" if why else ""
            )
            out.append(results.empty_row(results.RestoreResult, vm=vm, status="failed", error=error))
    return out


def _wait(client: Any, runs: dict[str, Any], log: Any, start_seconds: float | None = None) -> dict[str, Any]:
    """The agents' runs, once each has ended. A run that no worker has
    started ``start_seconds`` (:data:`AGENT_START_SECONDS`) after this wait
    began (its agent's worker is down: the run stays Scheduled or Late) is
    cancelled, so the site's run ends and says which VMs were not done;
    once started, the agent's run is bounded by its VMs' deadlines."""
    from prefect.states import Cancelled

    limit = AGENT_START_SECONDS if start_seconds is None else start_seconds
    began = time.monotonic()
    runs = dict(runs)
    pending = dict(runs)
    while pending:
        late = time.monotonic() - began > limit
        for agent, run in list(pending.items()):
            run = client.read_flow_run(run.id)
            if late and run.state is not None and (run.state.is_scheduled() or run.state.is_pending()):
                why = f"no worker of {agent} started it within {limit:g} s (is the agent's worker running?)"
                log.error("%s: flow run %s cancelled: %s", agent, run.name, why)
                client.set_flow_run_state(run.id, Cancelled(message=why), force=True)
                run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                runs[agent] = run
                del pending[agent]
                log.info("%s: flow run %s ended %s", agent, run.name, run.state.name)
        if pending:
            time.sleep(POLL_SECONDS)
    return runs


def _publish(keys: Any, rows: list[dict], agents: int, *, drill: bool) -> None:
    """The site's restore (or drill) report: the agents' rows in one table
    and one markdown, as ``restore_vm`` (or ``drill``) publishes them."""
    if drill:
        what = f"{sum(reports.drill_passed(r) for r in rows)} of {len(rows)} drill(s) passed over {agents} agent(s)"
    else:
        what = f"{sum(r.get('status') == 'ok' for r in rows)} of {len(rows)} VM(s) restored over {agents} agent(s)"
    table = [
        {**t, "agent": r.get("agent"), "flow_run": r.get("flow_run")}
        for t, r in zip(reports.restore_table_rows(rows), rows, strict=True)
    ]
    reports.publish_table(keys.report, table, description=what)
    reports.publish_markdown(
        keys.summary,
        f"{keys.title}: {what}",
        reports.restore_markdown(rows, title=keys.title, drill=drill)
        + "\n\nEach agent's flow run (under this one) has its VMs' full report: the disks, what was changed and why.\n",
    )


def _start_per_agent(
    per_agent: dict[str, list[str]], agent_deployment: str, arguments: dict, what: str, log: Any
) -> dict[str, Any]:
    """One flow run of ``agent_deployment`` (``{agent}``: the agent's name) per
    agent, with the site run's own ``arguments`` for that agent's VMs; started,
    not waited for."""
    from prefect.deployments import run_deployment

    runs = {}
    for agent, names in sorted(per_agent.items()):
        name = agent_deployment.format(agent=agent)
        parameters = {**arguments, "vms": names, "agent": agent, "agent_deployment": None}
        runs[agent] = run_deployment(
            name=name, parameters=parameters, timeout=0, flow_run_name=f"{agent}: {what} {', '.join(names)}"
        )
        log.info("%s: %s %s in flow run %s of %s", agent, what, ", ".join(names), runs[agent].name, name)
    return runs


def restore_over_agents(plan: Any, jobs: Sequence[Any], arguments: dict[str, Any]) -> list[dict]:
    """``restore_vm`` with an ``agent_deployment`` (the site's ``restore``
    deployment, on the control pool): ``jobs`` (resolved by ``restore_vm``
    from its ``arguments``), each on the worker of an agent that reaches its
    target host, each agent's VMs in a flow run of ``agent_deployment``
    (``{agent}`` is the agent's name; a ``restore_vm`` deployment in that
    agent's work pool) with the same arguments.

    The request was checked against the repository (an unknown VM or point,
    --point or --as with several VMs: one line, nothing started); a host no
    agent reaches is one line here; each agent's run then checks its VMs on
    their targets before it makes anything (a name in use fails that agent's
    run). Returns every VM's row (``results.RestoreResult`` plus ``flow_run``,
    the agent's run), in one table and one markdown report; fails when any
    VM failed or an agent's run did not complete."""
    from prefect.client.orchestration import get_client

    log = get_run_logger()
    restore_input.assign_agents(jobs, list(plan.agents))
    per_agent: dict[str, list[str]] = {}
    for j in jobs:
        per_agent.setdefault(j.agent.name, []).append(j.vm)
    runs = _start_per_agent(
        per_agent, arguments["agent_deployment"], {**arguments, "fail_on_error": True}, "restore", log
    )

    rows: list[dict] = []
    with get_client(sync_client=True) as client:
        runs = _wait(client, runs, log)
        for agent, run in sorted(runs.items()):
            for r in _restore_rows(client, run, per_agent[agent]):
                rows.append({**r, "agent": agent, "flow_run": str(run.id)})
    order = {j.vm: i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order.get(r["vm"], 0))
    _publish(RESTORE_KEYS, rows, len(runs), drill=False)
    failed = [r["vm"] for r in rows if r.get("status") != "ok"]
    if failed:
        raise VmsFailedError(f"{len(failed)} of {len(rows)} restore(s) failed: {', '.join(failed)}")
    return rows


def drill_over_agents(plan: Any, arguments: dict[str, Any]) -> dict:
    """``drill`` with an ``agent_deployment`` (the site's ``drill``
    deployment, on the control pool; ``plan`` loaded and unlocked by
    ``drill`` from its ``arguments``): a restore drill over the site, the
    VMs chosen here (``drill``'s sample, the least recently drilled first),
    each given an agent that reaches its drill target's host, each agent's
    VMs drilled in a flow run of ``agent_deployment`` (a ``drill``
    deployment in that agent's pool) with ``record`` off; their rows
    collected into one report, the drill record written once here. Returns
    ``drill``'s report; raises ``DrillFailedError`` when a drill failed or
    an agent's run did not complete."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from .restore import drill_jobs, finish_drill

    log = get_run_logger()
    run_id = str(flow_run.get_id() or f"local{int(time.time())}")
    chosen, jobs, early = drill_jobs(plan, arguments["vms"], arguments["sample"], list(plan.agents), run_id)
    per_agent: dict[str, list[str]] = {}
    for j in jobs:
        per_agent.setdefault(j.agent.name, []).append(j.vm)
    log.info("drilling %s", ", ".join(chosen))
    runs = _start_per_agent(
        per_agent, arguments["agent_deployment"], {**arguments, "sample": None, "record": False}, "drill", log
    )

    rows: list[dict] = list(early)
    with get_client(sync_client=True) as client:
        runs = _wait(client, runs, log)
        for agent, run in sorted(runs.items()):
            for r in _restore_rows(client, run, per_agent[agent], DRILL_KEYS.report):
                # A drill's row is ok only when its disks compared equal (restore_one verify=True).
                verified = True if r.get("status") == "ok" else r.get("verified")
                rows.append({**r, "verified": verified, "agent": agent, "flow_run": str(run.id)})
    order = {vm: i for i, vm in enumerate(chosen)}
    rows.sort(key=lambda r: order.get(r["vm"], 0))
    _publish(DRILL_KEYS, rows, len(runs), drill=True)
    return finish_drill(plan, rows, run_id)
