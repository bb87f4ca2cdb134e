"""The vSphere API calls of one VM's backup do not grow with the inventory.

Two labs of the same shape (3 hosts, an agent each, the VM under test and its
neighbours on one host), one with 4 other VMs and one with 160 tiny ones: the
same VM's full and then incremental backup, counted by the lab
(`counters.api_calls`), differ by at most a small constant. Listing the
inventory and reading each VM's name (one SOAP round trip per VM) would make
the large lab's count hundreds of calls higher.
"""

from __future__ import annotations

import json
import os

from vmbackup import _mover
from vmbackup.plan import Selection, load_plan, resolve_password
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.inventory import select_vms
from vmbackup.vsphere.procedure import backup_vm
from vmbackup.vsphere.tasks import run_task
from vmbackup_lab import lab_down, lab_up
from vmbackup_lab.plan import PASSWORD_ENV, write_lab_plan

SLACK = 3  # calls: the same backup in both labs, whatever the inventory


def topology(fillers: int) -> dict:
    hosts = ["esx1", "esx2", "esx3"]
    vms = [{"name": "target01", "host": "esx1", "disks": [{"bus": "scsi", "size_mib": 4}]}]
    vms += [
        {"name": f"fill{i:04d}", "host": hosts[i % 3], "power": "off", "disks": [{"bus": "scsi", "size_mib": 1}]}
        for i in range(fillers)
    ]
    return {
        "mode": "vcenter",
        "datacenter": "dc1",
        "clusters": [{"name": "cluster1", "hosts": hosts}],
        "shared_datastores": ["shared1"],
        "agents_per_host": 1,
        "vms": vms,
    }


def measure(tmp_path, fillers: int) -> list[int]:
    """The API calls of target01's full, then incremental, backup (after the selection)."""
    state = tmp_path / f"lab{fillers}"
    topo = tmp_path / f"topology{fillers}.json"
    topo.write_text(json.dumps(topology(fillers)))
    lab = lab_up(state, topo)
    try:
        path = write_lab_plan(lab.state, lab.summary())
        os.environ[PASSWORD_ENV] = lab.password
        repo = tmp_path / f"repo{fillers}"
        _mover.init_repository(str(repo))
        plan = load_plan(path).model_copy(update={"repository": repo})
        calls = []
        with VSphereClient.connect(plan.connection, resolve_password(plan.connection)) as client:
            for i in range(2):
                (info,) = select_vms(client, Selection(vms=["target01"]))
                agent = next(a for a in plan.agents if info.host in a.hosts)
                before = lab.counters()["api_calls"]
                r = backup_vm(client, info, plan, agent, run_id=f"scale{fillers}-{i}")
                calls.append(lab.counters()["api_calls"] - before)
                assert r.status == "ok" and r.mode == ("full", "incremental")[i], r
        return calls
    finally:
        lab_down(state)


def test_backup_calls_do_not_grow_with_the_inventory(tmp_path):
    large = 160
    small = measure(tmp_path, 4)
    big = measure(tmp_path, large)
    for mode, s, b in zip(("full", "incremental"), small, big, strict=True):
        assert abs(b - s) <= SLACK, f"{mode}: {s} API calls with 5 VMs, {b} with {large + 1}"


def test_a_slow_task_is_awaited_by_its_updates_not_by_polls(vlab, client):
    """A task that takes 0.6 s or 4 s costs the same calls: its state changes, not its duration.

    (Polling with back-off from 20 ms would read a 4 s task a dozen times.)
    """
    vm = client.find_vm("fall01")
    counts = {}
    try:
        for ms in (300, 600, 4000):  # the first makes this thread's PropertyCollector
            vlab.set_faults(vm="fall01", slow_ms=ms)
            before = vlab.counters()["api_calls"]
            run_task(
                lambda ms=ms: vm.CreateSnapshot_Task(name=f"slow{ms}", description="", memory=False, quiesce=False),
                "a slow snapshot",
                60,
            )
            counts[ms] = vlab.counters()["api_calls"] - before
    finally:
        vlab.set_faults(vm="fall01")
        run_task(lambda: vm.RemoveAllSnapshots_Task(), "removing the slow snapshots", 60)
    # The start, one read, a filter, two waits (maybe three, if the lab's two
    # state changes straddle its 250 ms update tick), the filter's removal.
    assert counts[4000] <= 7 and abs(counts[4000] - counts[600]) <= 1, counts
