"""Retries and slow snapshot tasks (issue 16, 2.6): an attempt whose
CreateSnapshot_Task timed out leaves a snapshot that vSphere makes later; the
next attempt of the same run removes it. Snapshot removal has its own time
limit, and consolidation never starts while a removal still runs (the lab
refuses it with TaskInProgress, as a VM runs one task at a time)."""

from __future__ import annotations

import pytest
from vmbackup.errors import HypervisorError, TaskTimeoutError
from vmbackup.plan import Timeouts
from vmbackup.vsphere import snapshots
from vmbackup.vsphere.ledger import Ledger
from vmbackup.vsphere.tasks import run_task

from .helpers import backup


def test_a_snapshot_made_after_its_attempt_timed_out_is_removed_by_the_next_attempt(client, plan, checks):
    vm = client.find_vm("crash01")
    checks.lab.set_faults(vm="crash01", slow_ms=1500)
    try:
        impatient = plan.model_copy(update={"timeouts": Timeouts(task=0.2)})
        with pytest.raises(TaskTimeoutError) as e:
            backup(client, impatient, "crash01", run_id="retryrun")
        assert e.value.retryable is True
        # The attempt wrote the task down: its entry stays for the next attempt.
        (entry,) = Ledger(plan.repository).entries("crash01")
        assert entry.run_id == "retryrun" and entry.attempt and entry.snapshot["create_task"]
    finally:
        checks.lab.set_faults(vm="crash01")
    # The retry (same run id, another attempt) waits for the task, then removes its snapshot.
    r = backup(client, plan, "crash01", run_id="retryrun")
    assert r.status == "ok"
    assert [n.name for n in snapshots.walk(vm)] == []
    checks.assert_clean(plan)


def test_snapshot_removal_has_its_own_time_limit_and_consolidation_waits_for_it(client, plan, checks):
    vm = client.find_vm("crash01")
    checks.lab.set_faults(vm="crash01", leave_consolidation=True)
    try:
        snap = run_task(lambda: vm.CreateSnapshot_Task(name="x", memory=False, quiesce=False), "s")
        run_task(lambda: snap.RemoveSnapshot_Task(removeChildren=False), "r")
        assert vm.runtime.consolidationNeeded is True
        # The removal takes 3 s; a wait through WaitForUpdatesEx lasts at least 1 s
        # (maxWaitSeconds is whole seconds), so a 0.2 s limit has passed before it ends.
        checks.lab.set_faults(vm="crash01", leave_consolidation=True, slow_ms=3000)
        # Other tasks may take 30 s; the removal only 0.2 s here: it times out and goes on.
        p = plan.model_copy(update={"timeouts": Timeouts(task=30, snapshot_remove=0.2)})
        with pytest.raises(HypervisorError) as e:
            backup(client, p, "crash01", run_id="slowremove")
        msg = str(e.value)
        assert "was backed up" in msg and "did not finish within" in msg and "consolidation waits" in msg
        assert "TaskInProgress" not in msg and "consolidating" not in msg, msg
        (entry,) = Ledger(plan.repository).entries("crash01")
        assert entry.snapshot["remove_task"]
        checks.lab.set_faults(vm="crash01", leave_consolidation=True)
        # The next run waits for the removal, then consolidates.
        assert backup(client, plan, "crash01").status == "ok"
    finally:
        checks.lab.set_faults(vm="crash01")
    checks.assert_clean(plan)


def test_the_removal_timeout_defaults_to_a_day_and_the_others_to_ten_minutes(plan):
    assert plan.timeouts.snapshot_remove == snapshots.REMOVE_TIMEOUT == 86400
    assert plan.timeouts.task == 600
