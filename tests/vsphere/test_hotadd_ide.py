"""Hot-add and IDE disks (issue 16, 2.8): hot-add attaches SCSI disks only, so
a VM with an IDE disk goes to the next transport with the reason, and its
disks are still restored bit-exact."""

from __future__ import annotations

import logging

import pytest
from vmbackup.errors import BackupError
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.transport import Context, HotAdd, agent_vm, frozen_disks

from .helpers import agent_for, backup, restored_sha, vm_info, with_transports


def test_a_vm_with_an_ide_disk_passes_from_hotadd_to_the_next_transport(client, plan, checks, tmp_path, caplog):
    info = vm_info(client, "ide01")
    names = sorted(d.name for d in info.disks)
    assert names == ["ide0:0", "scsi0:0"], names
    checks.lab.write("ide01", "ide0:0", 3 << 20, 200_000, seed=16)
    expected = {}

    def at_snapshot(snapshot_name):
        for d in names:
            expected[d] = checks.image("ide01", d, tmp_path / f"{d.replace(':', '_')}.img", snapshot_name)

    with caplog.at_level(logging.INFO, logger="vmbackup.vsphere"):
        r = backup(client, with_transports(plan, "hotadd", "nbd"), "ide01", on_snapshot=at_snapshot)
    assert r.status == "ok" and r.transport == "nbd", (r.status, r.transport, r.error)
    reasons = [m.getMessage() for m in caplog.records if "transport hotadd impossible" in m.getMessage()]
    assert len(reasons) == 1 and "disk ide0:0 is on an IDE controller" in reasons[0], reasons
    for d in names:
        got = restored_sha(plan, r.backup_id, d, tmp_path / f"{d.replace(':', '_')}.raw")
        assert got == expected[d], f"ide01 {d} differs from the guest's view at the snapshot"
    checks.assert_clean(plan)


def test_the_lab_refuses_to_hot_add_an_ide_disk(client, plan, checks):
    """Without the adapter's rule the lab would not read the disk: it refuses the
    attach as VDDK refuses HotAdd of an IDE disk (so does the linked clone's)."""
    info = vm_info(client, "ide01")
    vm = client.find_vm("ide01")
    ledger = Ledger(plan.repository)
    entry = Entry(run_id="ide1", vm="ide01", vm_moref=info.moref)
    ledger.write(entry)
    taken = snapshots.create(vm, "ide01", "ide1", quiesce_policy="off", tools_running=True, timeout=60)
    t = HotAdd(Context(client, vm, "ide01", taken.snapshot, plan, agent_for(plan, info), "ide1", ledger, entry, 60))
    try:
        (ide,) = [f for f in frozen_disks(taken.snapshot, list(info.disks)) if f.disk.name.startswith("ide")]
        t.agent_obj = agent_vm(client, t.ctx.agent)
        with pytest.raises(BackupError, match="InvalidDeviceSpec"):
            t._attach([ide.file])  # past _check, as if the IDE rule were gone
    finally:
        assert t.close() == []
        snapshots.remove(taken.snapshot, "remove", 60)
        ledger.remove(entry)
    checks.assert_clean(plan)
