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
from vmbackup.vsphere.tasks import run_task

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


def test_another_runs_backup_of_the_other_vm_of_the_name_leaves_this_ones_linked_clone_alone(
    client, plan, checks, tmp_path
):
    """twin01 in dupA is read through a linked clone (its frozen file is held
    on the agent, as in test_backup.py), named after the VM's name; meanwhile
    another run (a fresh selection, as another agent's run makes) backs up
    twin01 in dupB/inner. Its reconcile finds clones by that name, but one a
    live run of the other VM holds is not its own to detach or destroy."""
    import threading

    from pyVmomi import vim
    from vmbackup.vsphere import snapshots
    from vmbackup.vsphere.transport import detach_files, frozen_disks

    from .helpers import with_transports

    p = with_transports(plan, "hotadd")
    a, b = _twins(client)
    agent = client.find_vm(agent_for(p, a).vm)
    held, expected, other = {}, {}, {}

    def at_snapshot(name):
        expected["a"] = checks.image(LAB[a.folder], "scsi0:0", tmp_path / "a.img", name)
        node = next(n for n in snapshots.walk(client.vm_by_moref(a.moref)) if n.name == name)
        (f,) = frozen_disks(node.snapshot, list(a.disks))
        ctrl = next(d for d in agent.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=f.file, diskMode="independent_nonpersistent")
        dev = vim.vm.device.VirtualDisk(key=-1, controllerKey=ctrl.key, unitNumber=14, backing=backing)
        add = vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)
        run_task(lambda: agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[add])), "hold")
        held["file"] = f.file

    def other_run():
        (b_now,) = [i for i in select_vms(client, Selection(vms=["twin01"])) if i.moref == b.moref]
        other["row"] = backup_vm(client, b_now, p, agent_for(p, b_now), run_id=run_id())

    def progress(done, total):
        if "file" in held:  # a's clone is attached and being read: the other run goes now
            detach_files(agent, {held.pop("file")}, 60, "let go")
            t = threading.Thread(target=other_run)
            t.start()
            t.join()

    r = backup_vm(client, a, p, agent_for(p, a), run_id=run_id(), on_snapshot=at_snapshot, progress=progress)
    assert other["row"].status == "ok" and other["row"].vm_id != r.vm_id, other["row"]
    assert r.status == "ok" and r.transport_detail.startswith("through linked clone vmbackup-clone-twin01-"), r
    assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "a.raw") == expected["a"]
    checks.assert_clean(p)
