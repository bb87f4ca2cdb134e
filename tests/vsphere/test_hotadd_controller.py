"""Hot-add (issue 16, 2.8): backup disks go on a SCSI controller of their own,
never the agent's boot controller; one added for them is removed after."""

from __future__ import annotations

from pyVmomi import vim
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.inventory import disks_of
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.transport import Context, HotAdd, frozen_disks

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
