"""What a restore needs besides the disks (issue 16, part 2, item 9): the
VM's configuration as of the snapshot (not as it is when the reads end), in
the point."""

from __future__ import annotations

from pyVmomi import vim
from vmbackup import _mover
from vmbackup.vsphere.tasks import run_task

from .helpers import backup


def _meta(plan, backup_id):
    return next(b for b in _mover.list_backups(str(plan.repository))[0] if b.id == backup_id)


def _reconfigure(vm, **spec):
    run_task(lambda: vm.ReconfigVM_Task(vim.vm.ConfigSpec(**spec)), f"reconfiguring {vm.name}", 60)


def test_the_point_config_is_the_vm_as_of_the_snapshot_not_a_reconfigure_during_the_backup(client, plan, checks):
    vm = client.find_vm("sata01")
    cpus, note = vm.config.hardware.numCPU, vm.config.annotation or ""

    def reconfigure_during_backup(_snapshot_name):
        _reconfigure(vm, numCPUs=cpus + 2, annotation="reconfigured during the backup")

    try:
        r = backup(client, plan, "sata01", on_snapshot=reconfigure_during_backup)
        # The reconfiguration took effect on the VM while it was backed up...
        assert vm.config.hardware.numCPU == cpus + 2 and vm.config.annotation == "reconfigured during the backup"
    finally:
        _reconfigure(vm, numCPUs=cpus, annotation=note)
    assert r.status == "ok"
    config = _meta(plan, r.backup_id).config
    # ...and not in the point: its config is the snapshot's.
    assert config["name"] == "sata01"
    assert config["hardware"]["numCPU"] == cpus
    assert (config.get("annotation") or "") == note
    checks.assert_clean(plan)
