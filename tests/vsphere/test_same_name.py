"""Two VMs of one name in two folders (tests/vsphere/topology.json: twin01
in dupA and in dupB/inner, both on esx1): selection finds both, both are
backed up in one run, one while the other holds its snapshot (as the flow
runs them), each point says which VM it is (vm_id, moref, folder) and holds
that VM's data, and each next backup is incremental to its own chain."""

from __future__ import annotations

from vmbackup import _mover
from vmbackup.plan import Selection
from vmbackup.vsphere.inventory import select_vms
from vmbackup.vsphere.procedure import backup_vm

from .helpers import agent_for, restored_sha, run_id

# The lab names a VM of a topology folder "<folder>/<name>".
LAB = {"vm/dupA": "dupA/twin01", "vm/dupB/inner": "dupB/inner/twin01"}


def _twins(client):
    infos = sorted(select_vms(client, Selection(vms=["twin01"])), key=lambda i: i.folder)
    assert [i.folder for i in infos] == list(LAB), [i.folder for i in infos]
    return infos


def test_two_vms_of_one_name_in_two_folders_are_both_backed_up_each_to_its_own_chain(client, plan, checks, tmp_path):
    twins = _twins(client)
    assert twins[0].name == twins[1].name == "twin01" and twins[0].host == twins[1].host == "esx1"
    assert twins[0].moref != twins[1].moref
    for seed, info in enumerate(twins, 21):  # different data in each
        checks.lab.write(LAB[info.folder], "scsi0:0", 1 << 20, 300_000, seed=seed)

    def round_(tag):
        run, rows, expected = run_id(), {}, {}

        def frozen(info, inner=None):
            def hook(snapshot_name):
                img = tmp_path / f"{tag}-{info.moref}.img"
                expected[info.moref] = checks.image(LAB[info.folder], "scsi0:0", img, snapshot_name)
                if inner is not None:  # the other twin, in the same run, while this one's snapshot is open
                    rows[inner.moref] = backup_vm(
                        client, inner, plan, agent_for(plan, inner), run_id=run, on_snapshot=frozen(inner)
                    )

            return hook

        first, second = twins
        rows[first.moref] = backup_vm(
            client, first, plan, agent_for(plan, first), run_id=run, on_snapshot=frozen(first, second)
        )
        for info in twins:
            r = rows[info.moref]
            assert r.status == "ok" and r.vm == "twin01" and r.host == "esx1", r
            got = restored_sha(plan, r.backup_id, "scsi0:0", tmp_path / f"{tag}-{info.moref}.raw")
            assert got == expected[info.moref], f"the point of {info.folder}/twin01 does not hold its data"
        return rows

    full = round_("full")
    uuids = {i.moref: client.vm_by_moref(i.moref).config.instanceUuid for i in twins}
    assert {m: r.vm_id for m, r in full.items()} == uuids and len(set(uuids.values())) == 2
    assert all(r.mode == "full" for r in full.values())
    points = {b.id: b for b in _mover.list_backups(str(plan.repository))[0]}
    for info in twins:
        a = points[full[info.moref].backup_id].attributes
        assert (a["vm"], a["vm_id"], a["vm_moref"], a["folder"]) == (
            "twin01",
            uuids[info.moref],
            info.moref,
            info.folder,
        )
    # The next run: each is incremental to its own point, not to its twin's.
    checks.lab.write(LAB[twins[1].folder], "scsi0:0", 5 << 20, 70_000, seed=23)
    inc = round_("inc")
    points = {b.id: b for b in _mover.list_backups(str(plan.repository))[0]}
    for info in twins:
        r = inc[info.moref]
        assert r.mode == "incremental" and r.vm_id == uuids[info.moref], r
        assert points[r.backup_id].parent == full[info.moref].backup_id
    checks.assert_clean(plan)
