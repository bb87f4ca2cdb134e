"""What a real vCenter does that a kind lab would hide (issue 16, part 2, items
1-3): independent disks and physical-mode RDMs that no snapshot covers,
encrypted VMs whose flat files hold ciphertext, and CBT that can lie."""

from __future__ import annotations

import pytest
from pyVmomi import vim
from vmbackup import _mover
from vmbackup.errors import HypervisorError
from vmbackup.vsphere import cbt
from vmbackup.vsphere.tasks import run_task

from .helpers import backup, restored_sha, vm_info, with_transports


def _images_at_snapshot(checks, vm, names, tmp_path, tag, writes=()):
    expected = {}

    def at_snapshot(snapshot_name):
        for d in names:
            expected[d] = checks.image(vm, d, tmp_path / f"{tag}-{d.replace(':', '_')}.img", snapshot_name)
        for disk, off, n, seed in writes:
            checks.lab.write(vm, disk, off, n, seed=seed)

    return expected, at_snapshot


def _bit_exact(plan, result, expected, tmp_path, tag):
    for d, want in expected.items():
        got = restored_sha(plan, result.backup_id, d, tmp_path / f"{tag}-{d.replace(':', '_')}.raw")
        assert got == want, f"{result.vm} {d} differs from the guest's view at the snapshot"


@pytest.mark.parametrize("transport", ["direct", "hotadd"])
def test_independent_disk_and_physical_rdm_are_skipped_with_the_reason(client, plan, checks, tmp_path, transport):
    p = with_transports(plan, transport)
    expected, hook = _images_at_snapshot(
        checks, "indep01", ["scsi0:0"], tmp_path, transport, writes=[("scsi0:1", 1 << 20, 65536, 9)]
    )
    r = backup(client, p, "indep01", on_snapshot=hook)
    assert r.status == "ok" and r.transport == transport
    assert [d["name"] for d in r.disks] == ["scsi0:0"]
    assert [s["disk"] for s in r.skipped_disks] == ["scsi0:1", "scsi0:2"]
    assert "independent" in r.skipped_disks[0]["reason"] and "RDM" in r.skipped_disks[1]["reason"]
    meta = _mover.list_backups(str(p.repository))[0][-1]
    assert meta.attributes["skipped_disks"] == r.skipped_disks
    _bit_exact(p, r, expected, tmp_path, transport)
    checks.assert_clean(p)


def test_independent_disks_fail_fails_the_vm_in_one_line(client, plan, checks):
    p = plan.model_copy(update={"independent_disks": "fail"})
    with pytest.raises(HypervisorError) as e:
        backup(client, p, "indep01")
    msg = str(e.value)
    assert "\n" not in msg and "scsi0:1" in msg and "scsi0:2" in msg and "independent_disks: fail" in msg
    assert _mover.list_backups(str(p.repository))[0] == []
    checks.assert_clean(p)


def test_encrypted_vm_is_hot_added_to_an_encrypted_agent_and_restores_plaintext(client, plan, checks, tmp_path):
    info = vm_info(client, "enc01")
    assert info.encryption and "provider" in info.encryption
    # direct first in the order: it must be refused (ciphertext), hot-add used.
    p = with_transports(plan, "direct", "nbd", "hotadd")
    expected, hook = _images_at_snapshot(checks, "enc01", ["scsi0:0"], tmp_path, "enc")
    r = backup(client, p, "enc01", on_snapshot=hook)
    assert r.status == "ok" and r.transport == "hotadd"
    _bit_exact(p, r, expected, tmp_path, "enc")
    checks.assert_clean(p)


@pytest.mark.parametrize("transports", [("direct", "nbd"), ("hotadd", "direct", "nbd")])
def test_encrypted_vm_without_a_decrypting_agent_fails_in_one_line(client, plan, checks, transports):
    # encx01 is on esx1, whose agent VM is not encrypted; enc01's on esx2 is, but not with hot-add.
    vm = "encx01" if "hotadd" in transports else "enc01"
    p = with_transports(plan, *transports)
    with pytest.raises(HypervisorError) as e:
        backup(client, p, vm)
    msg = str(e.value)
    assert "\n" not in msg and "encrypted" in msg and "ciphertext" in msg
    assert _mover.list_backups(str(p.repository))[0] == []
    checks.assert_clean(p)


def test_cbt_is_not_switched_on_while_the_vm_has_snapshots(client, plan, checks, tmp_path):
    vm = client.find_vm("snapcbt01")
    user = run_task(lambda: vm.CreateSnapshot_Task(name="user", description="", memory=False, quiesce=False), "s")
    try:
        expected, hook = _images_at_snapshot(checks, "snapcbt01", ["scsi0:0"], tmp_path, "snapcbt")
        p = with_transports(plan, "hotadd")
        r = backup(client, p, "snapcbt01", on_snapshot=hook)
        assert r.mode == "full" and "has snapshots" in r.full_reason
        assert not vm.config.changeTrackingEnabled
        _bit_exact(p, r, expected, tmp_path, "snapcbt")
        checks.assert_clean(p, user_snapshots={"snapcbt01": ["user"]})
    finally:
        run_task(lambda: user.RemoveSnapshot_Task(removeChildren=False), "rm")


def test_a_full_reads_whole_disks_when_cbt_was_switched_on_by_someone_else_under_a_snapshot(
    client, plan, checks, tmp_path
):
    vm = client.find_vm("blind01")
    user = run_task(lambda: vm.CreateSnapshot_Task(name="user", description="", memory=False, quiesce=False), "s")
    run_task(lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)), "cbt on")
    run_task(lambda: user.RemoveSnapshot_Task(removeChildren=False), "rm")
    checks.lab.write("blind01", "scsi0:0", 4 << 20, 65536, seed=11)
    expected, hook = _images_at_snapshot(checks, "blind01", ["scsi0:0"], tmp_path, "blind")
    r = backup(client, plan, "blind01", on_snapshot=hook)
    assert r.mode == "full" and r.disks[0]["allocated_bytes"] is None
    assert r.disks[0]["read_whole_reason"] == "CBT was not switched on by vmbackup with no snapshot present"
    _bit_exact(plan, r, expected, tmp_path, "blind")  # CBT's "*" knows only the one write
    checks.assert_clean(plan)


def test_a_full_on_an_nfs_datastore_reads_whole_disks_and_says_why(client, plan, checks, tmp_path):
    # CBT's "*" is documented valid only on VMFS (KB 320557; VDDK Programming
    # Guide, "About Changed Block Tracking"). amp01's datastore is NFS
    # (tests/vsphere/topology.json); CBT off, so that this backup switches it
    # on with no snapshot present: only the datastore's type stops the filter
    # (on VMFS the same full is filtered: test_backup.py's
    # test_a_full_records_what_cbt_says_is_allocated).
    vm = client.find_vm("amp01")
    run_task(lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)), "cbt off")
    (disk,) = vm_info(client, "amp01").disks
    assert disk.datastore == "nas & co" and disk.datastore_type == "NFS"
    checks.lab.write("amp01", "scsi0:0", 6 << 20, 65536, seed=13)
    expected, hook = _images_at_snapshot(checks, "amp01", ["scsi0:0"], tmp_path, "nfs")
    r = backup(client, plan, "amp01", on_snapshot=hook)
    (d,) = r.disks
    assert r.mode == "full" and d["mode"] == "full" and d["allocated_bytes"] is None
    assert d["read_whole_reason"] == "datastore nas & co is NFS, not VMFS"
    meta = _mover.list_backups(str(plan.repository))[0][-1]
    assert meta.attributes["disks"][0]["read_whole_reason"] == d["read_whole_reason"]
    _bit_exact(plan, r, expected, tmp_path, "nfs")
    checks.assert_clean(plan)


def test_cbt_reset_is_seen_by_the_epoch_and_an_old_change_id_is_rejected(client, plan, checks, tmp_path):
    first = backup(client, plan, "epoch01")
    vm = client.find_vm("epoch01")
    old = first.disks[0]["change_id"]
    for on in (False, True):
        run_task(lambda on=on: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)), "cbt")
    info = vm_info(client, "epoch01")
    assert cbt.epoch(info.disks[0].change_id) != cbt.epoch(old)
    # The change id's UUID part tells the reset before any query...
    prev = {"attributes": {}, "disks": [{"name": "scsi0:0", "size": info.disks[0].capacity, "change_id": old}]}
    (dp,), _ = cbt.plan_disks(info.disks, prev, cbt_just_enabled=False, full_every_days=None)
    assert dp.full_reason.startswith("CBT was reset")
    # ...and a query with it is refused (InvalidArgument), which means the same.
    snap = run_task(lambda: vm.CreateSnapshot_Task(name="q", description="", memory=False, quiesce=False), "s")
    try:
        with pytest.raises(cbt.ChangeIdRejected):
            cbt.changed_areas(vm, snap, info.disks[0], old)
    finally:
        run_task(lambda: snap.RemoveSnapshot_Task(removeChildren=False), "rm")
    r = backup(client, plan, "epoch01")
    assert r.mode == "full" and "CBT was reset" in r.full_reason
    checks.assert_clean(plan)
