"""Fault injection and the peak counters."""

import pytest
from pyVmomi import vim

from .labkit import connect, disks, find, snapshot, wait


def test_snapshot_task_failure(si, lab):
    vm = find(si, vim.VirtualMachine, "off01")
    lab.set_faults(vm="off01", snapshot_fail=True)
    try:
        with pytest.raises(vim.fault.SnapshotFault):
            snapshot(vm, "x")
        assert vm.snapshot is None and disks(vm)[0].backing.parent is None
    finally:
        lab.set_faults(vm="off01")


def test_host_refusing_new_snapshots(si, lab):
    vm = find(si, vim.VirtualMachine, "web01")
    lab.set_faults(host="esx1", refuse_snapshots=True)
    try:
        with pytest.raises(vim.fault.SnapshotDisabled):
            snapshot(vm, "x")
    finally:
        lab.set_faults(host="esx1")
    wait(snapshot(vm, "ok").RemoveSnapshot_Task(removeChildren=False))


def test_slow_tasks_run_in_the_background(si, lab):
    vm = find(si, vim.VirtualMachine, "off01")
    lab.set_faults(vm="off01", slow_ms=400)
    try:
        task = vm.CreateSnapshot_Task(name="slow", description="", memory=False, quiesce=False)
        assert task.info.state in ("queued", "running")  # the call returned before the work was done
        snap = wait(task)
        # The delay shows in the task's own times (the simulator's clock, not a bound on ours).
        info = task.info
        assert (info.completeTime - info.queueTime).total_seconds() >= 0.4
        task = snap.RemoveSnapshot_Task(removeChildren=False)
        assert task.info.state in ("queued", "running")
        wait(task)
    finally:
        lab.set_faults(vm="off01")
    assert vm.snapshot is None


def test_dropped_session_must_log_in_again(lab):
    si = connect(lab)
    assert si.content.sessionManager.currentSession is not None
    assert lab.drop_sessions() >= 1
    with pytest.raises(vim.fault.NotAuthenticated):
        find_any_vm(si)
    si2 = connect(lab)
    assert find_any_vm(si2)


def find_any_vm(si):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    return view.view[0].name


def test_peak_snapshots_per_host_and_datastore(si, lab):
    lab.reset_counters()
    vms = [find(si, vim.VirtualMachine, n) for n in ("db01", "app01", "off01")]  # all on esx2
    snaps = [snapshot(vm, "peak") for vm in vms]
    for s in snaps:
        wait(s.RemoveSnapshot_Task(removeChildren=False))
    c = lab.counters()["snapshots"]
    assert c["host"]["esx2"] == {"now": 0, "peak": 3}
    assert c["datastore"]["shared1"]["peak"] == 1
    assert c["datastore"]["esx2-local"]["peak"] == 2
    assert c["host"].get("esx1", {"peak": 0})["peak"] == 0


def test_tools_stopping_makes_quiesce_unavailable(si, lab):
    vm = find(si, vim.VirtualMachine, "app01")
    lab.set_faults(vm="app01", tools_not_running=True)
    try:
        assert vm.guest.toolsRunningStatus == "guestToolsNotRunning"
        with pytest.raises(vim.fault.ToolsUnavailable):
            snapshot(vm, "q", quiesce=True)
        assert vm.snapshot is None
    finally:
        lab.set_faults(vm="app01")
    assert vm.guest.toolsRunningStatus == "guestToolsRunning"
