"""`vmbackup maintain sweep` on the lab: a snapshot a crashed run left is
removed, a user's own snapshot is not, and the report (stdout, the
markdown artifact, the `vmbackup.sweep.done` event) lists what it removed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import SecretStr

from .conftest import leftovers, run

VM = "app01"


def _snapshot(e2e, name: str, description: str) -> None:
    from vmbackup.plan import load_plan
    from vmbackup.vsphere.client import VSphereClient
    from vmbackup.vsphere.tasks import run_task

    plan = load_plan(e2e.plan)
    with VSphereClient.connect(plan.connection, SecretStr(e2e.password)) as client:
        vm = client.find_vm(VM)
        run_task(
            lambda: vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False),
            f"snapshot of {VM}",
            60,
        )


def _remove_snapshot(e2e, name: str) -> None:
    from vmbackup.plan import load_plan
    from vmbackup.vsphere.client import VSphereClient
    from vmbackup.vsphere.snapshots import walk
    from vmbackup.vsphere.tasks import run_task

    plan = load_plan(e2e.plan)
    with VSphereClient.connect(plan.connection, SecretStr(e2e.password)) as client:
        for node in walk(client.find_vm(VM)):
            if node.name == name:
                run_task(lambda n=node: n.snapshot.RemoveSnapshot_Task(removeChildren=False), f"removing {name}", 60)


@pytest.fixture
def user_snapshot(small_lab):
    """A user's own snapshot on the shared lab's VM, removed afterwards so
    that the tests after this one (which expect a clean lab) see none."""
    _snapshot(small_lab, "before-upgrade", "a user's own snapshot")
    yield "before-upgrade"
    _remove_snapshot(small_lab, "before-upgrade")


def _read(api_url: str, coro_fn):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(coro_fn())


def test_sweep_removes_a_crashed_runs_snapshot_and_reports_it(small_lab, env, tmp_path, user_snapshot):
    from vmbackup import _mover
    from vmbackup.vsphere.snapshots import description, snapshot_name

    plan = small_lab.write_plan(tmp_path / "plan.yaml", repository=tmp_path / "repo")
    _mover.init_repository(str(tmp_path / "repo"))
    _snapshot(small_lab, snapshot_name("crashed-run-1"), description("crashed-run-1"))
    assert sorted(leftovers(small_lab.lab)["snapshots"][VM]) == ["before-upgrade", "vmbackup-crashed-run-1"]

    p = run("maintain", "sweep", "--plan", str(plan), "--older-than", "0", "--json", env=env)
    items = json.loads(p.stdout)["leftovers"]
    assert [(i["kind"], i["vm"], i["removed"]) for i in items] == [("snapshot", VM, True)], items
    assert "crashed-run-1" in items[0]["name"]
    assert leftovers(small_lab.lab)["snapshots"][VM] == ["before-upgrade"]
    human = run("maintain", "sweep", "--plan", str(plan), "--older-than", "0", env=env).stdout
    assert human.strip().splitlines()[-1] == "0 of 0 leftover(s) removed"

    api = json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]

    async def events():
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter

        async with get_client() as c:
            page = await c.read_events(
                filter=EventFilter(event=EventNameFilter(name=["vmbackup.sweep.done"])), limit=50
            )
            return list(page.events)

    async def artifacts():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["vmbackup-sweep-vsphere"]))
            )

    def ours(found):
        return [e for e in found if any("crashed-run-1" in str(i["name"]) for i in e.payload["items"])]

    deadline = time.monotonic() + 120  # a bound on a broken server, not a wait
    removed = ours(_read(api, events))
    while not removed and time.monotonic() < deadline:
        time.sleep(0.5)
        removed = ours(_read(api, events))
    assert len(removed) == 1 and removed[0].payload["removed"] == 1 and removed[0].payload["items"][0]["vm"] == VM
    assert [r.id for r in removed[0].related if r.role == "vm"] == [f"vmbackup.vm.{VM}"]
    mds = [str(a.data) for a in _read(api, artifacts)]
    assert any("vmbackup-crashed-run-1" in md and "| removed |" in md for md in mds), mds
