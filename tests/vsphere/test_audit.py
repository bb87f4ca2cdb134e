"""The CBT audit of one VM through the adapter (no Prefect): each transport
reads the audit's snapshot; truthful CBT passes, a write CBT left out
(`cbt_omit`) is found at its offset and marks the chain broken; nothing is
left behind; a VM with two disks over CBT's paging is compared whole."""

from __future__ import annotations

import random

import pytest
from vmbackup.audit import AuditSample, Mismatch
from vmbackup.vsphere import broken_chains
from vmbackup.vsphere.audit import audit_vm

from .helpers import agent_for, backup, run_id, vm_info, with_transports


def _audit(client, plan, vm, sample):
    info = vm_info(client, vm)
    return audit_vm(client, info, plan, agent_for(plan, info), run_id=run_id(), sample=sample, rng=random.Random(1))


@pytest.mark.parametrize("transport", ["hotadd", "direct", "nbd"])
def test_each_transport_reads_the_audit_snapshot_and_a_lost_write_is_found(client, plan, checks, transport):
    p, vm, lab = with_transports(plan, transport), "xfer01", checks.lab
    first = _audit(client, p, vm, AuditSample(8))
    assert first.status == "skipped" and first.reason == "no backup point yet", first
    backup(client, p, vm)
    lab.write(vm, "scsi0:0", 1 << 20, 200_000, seed=4)
    incr = backup(client, p, vm)
    assert incr.mode == "incremental"

    ok = _audit(client, p, vm, AuditSample(8))
    assert ok.status == "ok" and ok.transport == transport and ok.point == incr.backup_id, ok
    (disk,) = ok.disks
    assert disk.blocks_compared == 8 and 0 < disk.bytes_compared <= 8 * 65536 and disk.changed_bytes == 0, disk
    checks.assert_clean(p)

    lab.set_faults(vm=vm, cbt_omit=True)
    # (a seed of its own: the VM is shared by the transports' runs)
    lab.write(vm, "scsi0:0", 9 << 20, 64 << 10, seed=50 + ["hotadd", "direct", "nbd"].index(transport))
    lab.set_faults(vm=vm)
    missed = backup(client, p, vm)
    assert missed.mode == "incremental" and missed.disks[0]["changed_bytes"] == 0

    bad = _audit(client, p, vm, AuditSample(None))
    assert bad.status == "mismatch" and bad.point == missed.backup_id, bad
    assert bad.mismatches == [Mismatch("scsi0:0", 9 << 20, 64 << 10)], bad.mismatches
    assert bad.bytes_compared == bad.disks[0].unchanged_bytes == 32 << 20
    mark = broken_chains.read(p.repository, vm)
    assert mark is not None and mark.point == missed.backup_id and mark.reason == bad.reason, mark
    checks.assert_clean(p)


def test_two_disks_over_cbt_paging_are_compared_whole(client, plan, checks):
    vm, lab = "multi01", checks.lab
    backup(client, plan, vm)
    lab.write(vm, "scsi0:0", 20 << 20, 3 << 20, seed=6)  # past the lab's 16 MiB page of CBT
    lab.write(vm, "nvme0:0", 0, 64 << 10, seed=7)
    backup(client, plan, vm)
    lab.write(vm, "nvme0:0", 5 << 20, 64 << 10, seed=8)  # after the point: CBT reports it, not compared
    r = _audit(client, plan, vm, AuditSample(None))
    assert r.status == "ok", r
    by = {d.name: d for d in r.disks}
    assert sorted(by) == ["nvme0:0", "scsi0:0"]
    assert by["scsi0:0"].changed_bytes == 0 and by["scsi0:0"].bytes_compared == 48 << 20
    assert by["nvme0:0"].changed_bytes == 64 << 10 and by["nvme0:0"].bytes_compared == (32 << 20) - (64 << 10)
    assert broken_chains.read(plan.repository, vm) is None
    checks.assert_clean(plan)
