"""deployments/prefect.yaml's ``copy-nightly`` starts when a run of
``backup_site/nightly`` ends, on a real Prefect server: its trigger, loaded
and turned into an automation by Prefect's own deploy code (as `prefect
deploy` does), fires on that run's Completed, Failed and Crashed events, and not on
another deployment's run of the same flow."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import yaml

SHIPPED = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def _deployment(client, flow_name: str, name: str) -> UUID:
    flow_id = client.create_flow_from_name(flow_name)
    return client.create_deployment(flow_id=flow_id, name=name, entrypoint="x:y", paused=True)


def _end_run(client, deployment_id: UUID, state) -> None:
    from prefect.states import Running

    run = client.create_flow_run_from_deployment(deployment_id)
    client.set_flow_run_state(run.id, Running(), force=True)
    client.set_flow_run_state(run.id, state, force=True)


def _copy_runs(client, deployment_id: UUID, n: int, timeout: float = 90) -> list:
    """The runs the automation made of the copy deployment, once there are ``n``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        if len(runs) >= n or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_copy_nightly_runs_when_a_nightly_run_ends(prefect_server):
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Failed

    spec = {d["name"]: d for d in yaml.safe_load(SHIPPED.read_text())["deployments"]}
    copy = spec["copy-nightly"]
    assert "schedules" not in copy, "copy-nightly follows the nightly run, not the clock"
    assert spec["nightly"]["entrypoint"].endswith(":backup_site")
    (trigger,) = _initialize_deployment_triggers(copy["name"], copy["triggers"])

    with get_client(sync_client=True) as client:
        nightly = _deployment(client, "backup_site", "nightly")
        other = _deployment(client, "backup_site", "nightly-by-hand-test")  # same flow, another deployment
        target = _deployment(client, "copy_repository", "copy-nightly")
        trigger.set_deployment_id(target)
        automation = client.create_automation(trigger.as_automation())
        try:
            _end_run(client, other, Completed())
            _end_run(client, nightly, Completed())
            runs = _copy_runs(client, target, 1)
            assert len(runs) == 1, "a nightly run that completed started no copy"
            _end_run(client, nightly, Failed(message="1 of 7 VM(s) failed"))
            runs = _copy_runs(client, target, 2)
            assert len(runs) == 2, [r.name for r in runs]
            _end_run(client, nightly, Crashed(message="the control worker died"))
            runs = _copy_runs(client, target, 3)
            # one copy per nightly run that ended, none for the other deployment's
            assert len(runs) == 3, [r.name for r in runs]
            assert {str(r.deployment_id) for r in runs} == {str(target)}
            # with the deployment's own parameters (the plan's path), none from the trigger
            assert all(r.parameters == {} for r in runs), [r.parameters for r in runs]
        finally:
            client.delete_automation(automation)
