"""Hot-add (issue 16, 2.8): backup disks go on a SCSI controller of their own,
never the agent's boot controller; one added for them is removed after, and
one a killed process left is removed by the next reconcile or the sweeper."""

from __future__ import annotations

import os
import subprocess
import sys

from pyVmomi import vim
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.inventory import disks_of
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.sweep import sweep
from vmbackup.vsphere.transport import Context, HotAdd, agent_vm, frozen_disks

from .helpers import agent_for, backup, vm_info, with_transports


def _scsi(agent_vm):
    return sorted(d.key for d in agent_vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))


def test_backup_disks_get_their_own_controller_which_is_removed_after(client, plan, checks):
    info = vm_info(client, "fall01")
    vm = client.find_vm("fall01")
    ledger = Ledger(plan.repository)
    entry = Entry(run_id="ctrl1", vm="fall01", vm_moref=info.moref)
    ledger.write(entry)
    taken = snapshots.create(vm, "fall01", "ctrl1", quiesce_policy="off", tools_running=True, timeout=60)
    t = HotAdd(Context(client, vm, "fall01", taken.snapshot, plan, agent_for(plan, info), "ctrl1", ledger, entry, 60))
    try:
        t.open(frozen_disks(taken.snapshot, list(info.disks)))
        agent = t.agent_obj
        disks = disks_of(list(agent.config.hardware.device))
        boot = {dev.controllerKey for _, dev in disks if dev.backing.fileName not in t.files}
        ours = {dev.controllerKey for _, dev in disks if dev.backing.fileName in t.files}
        assert len(boot) == 1 and ours and not (ours & boot), (boot, ours)
        assert len(_scsi(agent)) == 2  # the boot controller, and one added for the backup disks
    finally:
        assert t.close() == []
        snapshots.remove(taken.snapshot, "remove", 60)
        ledger.remove(entry)
    assert _scsi(t.agent_obj) == sorted(boot)  # the added controller is gone
    checks.assert_clean(plan)
    # A whole backup through hot-add leaves the agent as it was.
    before = _scsi(t.agent_obj)
    assert backup(client, with_transports(plan, "hotadd"), "fall01").transport == "hotadd"
    assert _scsi(t.agent_obj) == before
    checks.assert_clean(plan)


# A process that hot-added the frozen disks of a VM (the agent had no free
# controller, so one was added) and was then killed: nothing undone.
_CRASH = """
import os, sys
from pathlib import Path
from vmbackup.plan import Selection, load_plan, resolve_password
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.inventory import select_vms
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.sweep import sweep
from vmbackup.vsphere.transport import Context, HotAdd, agent_vm, frozen_disks

plan_path, repo, name, run_id = sys.argv[1:]
plan = load_plan(plan_path).model_copy(update={"repository": Path(repo)})
client = VSphereClient.connect(plan.connection, resolve_password(plan.connection))
(info,) = select_vms(client, Selection(vms=[name]))
agent = next(a for a in plan.agents if info.host in a.hosts)
vm = client.find_vm(name)
ledger = Ledger(plan.repository)
entry = Entry(run_id=run_id, vm=name, vm_moref=info.moref)
entry.snapshot = {"name": snapshots.snapshot_name(run_id)}
ledger.write(entry)
taken = snapshots.create(vm, name, run_id, quiesce_policy="off", tools_running=True, timeout=60)
HotAdd(Context(client, vm, name, taken.snapshot, plan, agent, run_id, ledger, entry, 60)).open(
    frozen_disks(taken.snapshot, list(info.disks))
)
os._exit(9)
"""


def _crash(lab_plan_path, plan, name, run_id):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", _CRASH, str(lab_plan_path), str(plan.repository), name, run_id], env=env)
    assert p.returncode == 9


def _agent(client, plan, name):
    return agent_vm(client, agent_for(plan, vm_info(client, name)))


def test_a_controller_left_by_a_killed_process_is_removed_by_the_next_backups_reconcile(
    client, plan, checks, lab_plan_path
):
    agent = _agent(client, plan, "fall01")
    before = _scsi(agent)
    _crash(lab_plan_path, plan, "fall01", "ctrlcrash1")
    after = _scsi(agent)
    (added,) = set(after) - set(before)
    (entry,) = Ledger(plan.repository).entries("fall01")
    (rec,) = entry.controllers  # written before it was added, its key after
    assert rec["agent_vm"] == agent.name and rec["key"] == added, rec
    # The next backup (hot-add again) removes it, then adds and removes its own.
    r = backup(client, with_transports(plan, "hotadd"), "fall01")
    assert r.status == "ok" and r.transport == "hotadd", (r.status, r.error)
    assert _scsi(agent) == before
    checks.assert_clean(plan)


def test_the_sweeper_removes_a_controller_left_by_a_killed_process(client, plan, checks, lab_plan_path):
    agent = _agent(client, plan, "fall01")
    before = _scsi(agent)
    _crash(lab_plan_path, plan, "fall01", "ctrlcrash2")
    assert len(_scsi(agent)) == len(before) + 1
    found = sweep(client, plan, older_than_seconds=0)
    assert sorted(x.kind for x in found) == ["attachment", "controller", "snapshot"], found
    assert all(x.removed and x.error is None for x in found), found
    assert _scsi(agent) == before
    checks.assert_clean(plan)
