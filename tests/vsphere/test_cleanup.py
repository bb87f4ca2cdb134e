"""What a killed run leaves (a snapshot, attached disks, a linked clone, a
ledger entry), made with the adapter's own functions and then abandoned as a
dead process would: the next run's reconcile, or the sweeper, removes all of
it and never touches a user's snapshot."""

from __future__ import annotations

import subprocess
import time

import pytest
from pyVmomi import vim
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.inventory import CLONE_PREFIX, disks_of
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.sweep import sweep
from vmbackup.vsphere.tasks import run_task
from vmbackup.vsphere.transport import Context, HotAdd, frozen_disks

from .helpers import agent_for, backup, restored_sha, vm_info, with_transports


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _user_snapshot(vm, name):
    return run_task(
        lambda: vm.CreateSnapshot_Task(name=name, description="the user's", memory=False, quiesce=False), "s"
    )


def _crash(client, plan, name, run_id):
    """A run of ``name`` that got as far as a snapshot, its disks hot-added, a
    linked clone with its disks hot-added too, and then died."""
    info = vm_info(client, name)
    vm = client.find_vm(name)
    ledger = Ledger(plan.repository)
    entry = Entry(run_id=run_id, vm=name, vm_moref=info.moref, pid=_dead_pid())
    entry.snapshot = {"name": snapshots.snapshot_name(run_id)}
    ledger.write(entry)
    taken = snapshots.create(vm, name, run_id, quiesce_policy="off", tools_running=True, timeout=60)
    ctx = Context(client, vm, name, taken.snapshot, plan, agent_for(plan, info), run_id, ledger, entry, 60)
    frozen = frozen_disks(taken.snapshot, list(info.disks))
    HotAdd(ctx).open(frozen)  # the frozen disks on the agent
    second = HotAdd(ctx)
    second.open(frozen)  # locked now, so through a linked clone
    assert second.clone is not None
    return ledger


def _leftovers(client, name):
    vm = client.find_vm(name)
    ours = [n.name for _, n in snapshots.ours(vm)]
    clones = [v.name for v in client.objects(vim.VirtualMachine) if v.name.startswith(CLONE_PREFIX + name)]
    attached = sum(
        len(disks_of(list(a.config.hardware.device))) - 1
        for a in client.objects(vim.VirtualMachine)
        if a.name.startswith("vmbackup-agent-")
    )
    return ours, clones, attached


def test_next_run_reconciles_a_crashed_run_and_keeps_the_users_snapshot(client, plan, checks, tmp_path):
    vm = client.find_vm("crash01")
    user = _user_snapshot(vm, "before-upgrade")
    try:
        ledger = _crash(client, plan, "crash01", "deadrun1")
        ours, clones, attached = _leftovers(client, "crash01")
        assert ours == ["vmbackup-deadrun1"] and len(clones) == 1 and attached == 2
        assert len(ledger.entries("crash01")) == 1
        st = checks.lab.counters()
        assert sum(c["now"] for c in st["attached_disks"]["agent"].values()) == 2

        r = backup(client, plan, "crash01")
        assert r.status == "ok"
        assert _leftovers(client, "crash01") == ([], [], 0)
        checks.assert_clean(plan, user_snapshots={"crash01": ["before-upgrade"]})
        assert [n.name for n in snapshots.walk(vm)] == ["before-upgrade"]
    finally:
        run_task(lambda: user.RemoveSnapshot_Task(removeChildren=False), "remove user snapshot")
    checks.assert_clean(plan)


def test_sweeper_removes_old_leftovers_only(client, plan, checks):
    vm = client.find_vm("crash01")
    user = _user_snapshot(vm, "keep-me")
    try:
        ledger = _crash(client, plan, "crash01", "deadrun2")
        # Young leftovers may belong to a run at work: left alone.
        assert sweep(client, plan, older_than_seconds=3600) == []
        assert _leftovers(client, "crash01")[0] == ["vmbackup-deadrun2"]
        # Back-date the ledger entry; the snapshot and clone are as old as the threshold 0 allows.
        (entry,) = ledger.entries("crash01")
        entry.created_unix = time.time() - 7200
        ledger.write(entry)
        found = sweep(client, plan, older_than_seconds=0)
        kinds = sorted(x.kind for x in found)
        assert kinds == ["attachment", "attachment", "clone", "snapshot"], found
        assert all(x.removed and x.error is None for x in found)
        assert _leftovers(client, "crash01") == ([], [], 0)
        checks.assert_clean(plan, user_snapshots={"crash01": ["keep-me"]})
        assert sweep(client, plan, older_than_seconds=0) == []
    finally:
        run_task(lambda: user.RemoveSnapshot_Task(removeChildren=False), "remove user snapshot")
    checks.assert_clean(plan)


def test_user_snapshot_present_direct_and_nbd_impossible_hotadd_reads_the_chain(client, plan, checks, tmp_path):
    vm = client.find_vm("user01")
    user = _user_snapshot(vm, "users-own")
    try:
        p = with_transports(plan, "direct", "nbd", "hotadd")
        checks.lab.write("user01", "scsi0:0", 1 << 20, 64_000, seed=4)  # lands in the user snapshot's delta
        expected = {}

        def at_snapshot(name):
            expected["d"] = checks.image("user01", "scsi0:0", tmp_path / "u.img", name)

        r = backup(client, p, "user01", on_snapshot=at_snapshot)
        assert r.transport == "hotadd"
        assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "u.raw") == expected["d"]
        checks.assert_clean(p, user_snapshots={"user01": ["users-own"]})
    finally:
        run_task(lambda: user.RemoveSnapshot_Task(removeChildren=False), "remove user snapshot")
    checks.assert_clean(plan)


def test_a_live_run_holds_its_vm(client, plan, checks):
    """A ledger entry of a process that is alive (here: this test's child) makes the VM busy, not cleaned."""
    from vmbackup.errors import HypervisorBusyError

    info = vm_info(client, "crash01")
    child = subprocess.Popen(["sleep", "60"])
    try:
        ledger = Ledger(plan.repository)
        ledger.write(Entry(run_id="liverun", vm="crash01", vm_moref=info.moref, pid=child.pid))
        with pytest.raises(HypervisorBusyError) as e:
            backup(client, plan, "crash01")
        assert e.value.retryable is True
        assert sweep(client, plan, older_than_seconds=0) == []
        assert len(ledger.entries("crash01")) == 1
    finally:
        child.kill()
        child.wait()
    assert backup(client, plan, "crash01").status == "ok"
    checks.assert_clean(plan)


def test_sweeper_removes_a_clone_whose_vm_is_gone(client, plan, checks):
    vm = client.find_vm("crash01")
    base = _user_snapshot(vm, "clone-base")
    try:
        spec = vim.vm.CloneSpec(
            snapshot=base, powerOn=False, template=False,
            location=vim.vm.RelocateSpec(diskMoveType="createNewChildDiskBacking"),
        )  # fmt: skip
        name = CLONE_PREFIX + "ghost01-deadrun3"  # made for a VM that no longer exists
        run_task(lambda: vm.CloneVM_Task(folder=vm.parent, name=name, spec=spec), "clone")
        found = sweep(client, plan, older_than_seconds=0)
        assert [(x.kind, x.name, x.removed) for x in found] == [("clone", name, True)]
        assert [n.name for n in snapshots.walk(vm)] == ["clone-base"]
    finally:
        run_task(lambda: base.RemoveSnapshot_Task(removeChildren=False), "remove user snapshot")
    checks.assert_clean(plan)
