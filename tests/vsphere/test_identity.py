"""A VM's chain through the typed point metadata (vmbackup.pointmeta) and its
identity (vSphere config.instanceUuid): points written before the contract
was versioned keep their chain, an unknown version or unreadable metadata
gives a full that says why, and a renamed VM stays incremental."""

from __future__ import annotations

import json

import pytest
from vmbackup import _mover

from .helpers import backup


def _replant(plan, backup_id, repo, attributes):
    """A copy of point ``backup_id`` (same disks and change ids) in ``repo``
    with other ``attributes``: a point as another version of vmbackup wrote it."""
    (b,) = [b for b in _mover.list_backups(str(plan.repository))[0] if b.id == backup_id]
    session = _mover.BackupSession(str(repo), b.vm, None)
    for d in b.disks:
        out = repo.parent / f"replant-{d.name.replace(':', '_')}.raw"
        _mover.restore_disk(str(plan.repository), backup_id, str(out), disk=d.name, overwrite=True)
        session.add_disk(str(out), d.name, None, d.change_id)
    return session.commit(config=json.dumps(b.config), attributes=json.dumps(attributes)).id


def _attributes(plan, backup_id):
    (b,) = [b for b in _mover.list_backups(str(plan.repository))[0] if b.id == backup_id]
    return dict(b.attributes)


def test_the_point_carries_the_versioned_contract_and_the_vm_id(client, plan, checks):
    r = backup(client, plan, "sata01")
    a = _attributes(plan, r.backup_id)
    uuid = client.find_vm("sata01").config.instanceUuid
    assert r.vm_id == uuid and r.hypervisor == "vsphere" and r.skipped_disks == []
    assert (a["meta_version"], a["hypervisor"], a["vm"], a["vm_id"], a["mode"]) == (
        1,
        "vsphere",
        "sata01",
        uuid,
        "full",
    )
    assert a["full_reason"] and a["last_full_unix"] == a["snapshot_unix"] and a["vm_moref"]
    checks.assert_clean(plan)


@pytest.mark.parametrize(
    ("change", "incremental", "words"),
    [
        # Version 0 (no meta_version, no vm_id, no hypervisor): read by its own parser.
        ({"meta_version": None, "vm_id": None, "hypervisor": None, "vm": None}, True, None),
        ({"meta_version": 7}, False, "metadata is version 7, newer than this vmbackup reads (1)"),
        ({"meta_version": 1, "disks": {"scsi0:0": "?"}}, False, "metadata cannot be read: disks is dict"),
    ],
)
def test_old_points_keep_their_chain_unknown_or_unreadable_ones_give_a_full_that_says_why(
    client, plan, checks, tmp_path, change, incremental, words
):
    first = backup(client, plan, "sata01")
    attrs = {k: v for k, v in {**_attributes(plan, first.backup_id), **change}.items() if v is not None}
    repo = tmp_path / "other"
    _mover.init_repository(str(repo))
    planted = _replant(plan, first.backup_id, repo, attrs)
    other = plan.model_copy(update={"repository": repo})
    checks.lab.write("sata01", first.disks[0]["name"], 1 << 20, 100_000, seed=11)
    r = backup(client, other, "sata01")
    if incremental:
        assert r.mode == "incremental" and r.full_reason is None
        assert _mover.list_backups(str(repo))[0][-1].parent == planted
    else:
        assert r.mode == "full" and words in r.full_reason and f"(point {planted})" in r.full_reason, r.full_reason
        assert r.full_reason.endswith(": full")
    checks.assert_clean(other)


def test_a_renamed_vm_keeps_its_chain(client, plan, checks):
    from vmbackup.vsphere.tasks import run_task

    first = backup(client, plan, "multi01")
    checks.lab.write("multi01", first.disks[0]["name"], 2 << 20, 50_000, seed=5)
    obj = client.find_vm("multi01")
    run_task(lambda: obj.Rename_Task(newName="multi01-renamed"), "renaming multi01", 60)
    try:
        second = backup(client, plan, "multi01-renamed")
    finally:
        run_task(lambda: obj.Rename_Task(newName="multi01"), "renaming multi01 back", 60)
    assert second.vm == "multi01-renamed" and second.vm_id == first.vm_id
    assert second.mode == "incremental", second.full_reason
    last = _mover.list_backups(str(plan.repository))[0][-1]
    assert last.parent == first.backup_id
    # The mover takes a parent of the same label only: the chain keeps its
    # label (the name it began with); the point says the VM's name now.
    assert last.vm == "multi01" and last.attributes["vm"] == "multi01-renamed"
    checks.assert_clean(plan)
