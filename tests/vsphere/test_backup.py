"""Whole VMs through the adapter: every disk full then incremental, restored
bit-exact against what the lab says the guest saw at the snapshot; each
transport alone and the fallback between them."""

from __future__ import annotations

import pytest
from vmbackup import _mover

from .helpers import backup, restored_sha, vm_info, with_transports


def _backup_and_capture(client, plan, checks, vm, tmp_path, tag, write_during=None):
    """Backs up ``vm``; at the snapshot, images every disk as the lab sees it (and writes into the guest)."""
    expected = {}
    info_disks = []

    def at_snapshot(snapshot_name):
        for d in info_disks:
            expected[d] = checks.image(vm, d, tmp_path / f"{vm}-{tag}-{d.replace(':', '_')}.img", snapshot_name)
        if write_during:
            for disk, off, n, seed in write_during:
                checks.lab.write(vm, disk, off, n, seed=seed)

    info_disks[:] = [d.name for d in vm_info(client, vm).disks]
    result = backup(client, plan, vm, on_snapshot=at_snapshot)
    assert result.status == "ok" and result.backup_id
    assert sorted(d["name"] for d in result.disks) == sorted(info_disks)
    for d in info_disks:
        got = restored_sha(plan, result.backup_id, d, tmp_path / f"{vm}-{tag}-{d.replace(':', '_')}.raw")
        assert got == expected[d], f"{vm} {d} ({tag}) differs from the guest's view at the snapshot"
    return result


@pytest.mark.parametrize("vm", ["multi01", "sata01", "off03"])
def test_full_then_incremental_bit_exact_and_guest_writes_during_backup_do_not_leak(client, plan, checks, vm, tmp_path):
    full = _backup_and_capture(client, plan, checks, vm, tmp_path, "full")
    assert full.mode == "full" and full.full_reason in ("first backup", "CBT was off and has been enabled")
    # A powered-off VM's disks are at rest: "powered-off", not "application".
    consistency = "powered-off" if vm.startswith("off") else "application"
    assert full.consistency == consistency
    first_disk = full.disks[0]["name"]
    # Guest writes between the backups, then more writes while the second one runs.
    checks.lab.write(vm, first_disk, 2 << 20, 300_000, seed=7)
    checks.lab.write(vm, full.disks[-1]["name"], (5 << 20) + 123, 70_000, seed=8)
    inc = _backup_and_capture(
        client, plan, checks, vm, tmp_path, "inc", write_during=[(first_disk, 4 << 20, 1 << 20, 9)]
    )
    assert inc.mode == "incremental" and inc.full_reason is None
    assert inc.bytes_read < full.bytes_read
    meta = _mover.list_backups(str(plan.repository))[0][-1]
    assert meta.parent == full.backup_id
    assert meta.attributes["consistency"] == consistency and meta.config["name"] == vm
    assert {d["name"]: d["change_id"] for d in meta.attributes["disks"]} == {
        d["name"]: d["change_id"] for d in inc.disks
    }
    checks.assert_clean(plan)


@pytest.mark.parametrize("transport", ["hotadd", "direct", "nbd"])
def test_each_transport_alone(client, plan, checks, transport, tmp_path):
    p = with_transports(plan, transport)
    full = _backup_and_capture(client, p, checks, "xfer01", tmp_path, f"{transport}-1")
    assert full.transport == transport
    checks.lab.write("xfer01", "scsi0:0", 1 << 20, 200_000, seed=3)
    inc = _backup_and_capture(client, p, checks, "xfer01", tmp_path, f"{transport}-2")
    assert inc.transport == transport and inc.mode == "incremental"
    checks.assert_clean(p)


def test_fallback_hotadd_impossible_then_direct_then_nbd(client, plan, checks, tmp_path):
    # fall01 is on esx1-local; an agent on esx2 cannot see it (no hot-add), and
    # without the datastore mounted, direct is impossible too: NBD it is.
    esx2 = next(a for a in plan.agents if "esx2" in a.hosts)
    blind = esx2.model_copy(update={"hosts": ["esx1", "esx2"], "datastores": {"shared1": esx2.datastores["shared1"]}})
    p = plan.model_copy(update={"agents": [blind]})
    result = _backup_and_capture(client, p, checks, "fall01", tmp_path, "fb1")
    assert result.transport == "nbd"
    # With the datastore mounted, direct comes before NBD.
    p2 = plan.model_copy(update={"agents": [blind.model_copy(update={"datastores": esx2.datastores})]})
    result = _backup_and_capture(client, p2, checks, "fall01", tmp_path, "fb2")
    assert result.transport == "direct"
    checks.assert_clean(plan)


def test_cancelled_backup_cleans_up_and_commits_nothing(client, plan, checks):
    from vmbackup.errors import CancelledError

    token = _mover.CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        backup(client, plan, "multi01", cancel=token)
    assert _mover.list_backups(str(plan.repository))[0] == []
    checks.assert_clean(plan)


def test_a_failure_after_the_snapshot_cleans_up(client, plan, checks):
    def boom(_name):
        raise RuntimeError("post-snapshot script failed")

    with pytest.raises(RuntimeError, match="post-snapshot"):
        backup(client, plan, "multi01", on_snapshot=boom)
    checks.assert_clean(plan)


def test_progress_and_periodic_full(client, plan, checks):
    from vmbackup.vsphere.cbt import plan_disks
    from vmbackup.vsphere.procedure import latest_backup

    seen = []
    first = backup(client, plan, "sata01", progress=lambda done, total: seen.append((done, total)))
    assert seen and all(total == sum(d["capacity"] for d in first.disks) for _, total in seen)
    prev = latest_backup(str(plan.repository), "sata01")
    disks = vm_info(client, "sata01").disks
    _, reason = plan_disks(
        disks, prev, cbt_just_enabled=False, full_every_days=7, now=prev["attributes"]["last_full_unix"] + 6 * 86400
    )
    assert reason is None
    assert prev["attributes"]["last_full_unix"] == prev["attributes"]["snapshot_unix"]
    plans, reason = plan_disks(
        disks, prev, cbt_just_enabled=False, full_every_days=7, now=prev["attributes"]["last_full_unix"] + 7 * 86400
    )
    assert reason == "periodic full (every 7 days)" and all(p.full_reason == reason for p in plans)
    checks.assert_clean(plan)


def test_hotadd_through_a_linked_clone_when_the_frozen_disk_cannot_be_attached(client, plan, checks, tmp_path):
    from pyVmomi import vim
    from vmbackup.vsphere import snapshots
    from vmbackup.vsphere.inventory import disks_of
    from vmbackup.vsphere.tasks import run_task
    from vmbackup.vsphere.transport import detach_files, frozen_disks

    from .helpers import agent_for

    p = with_transports(plan, "hotadd")
    info = vm_info(client, "xfer01")
    agent = client.find_vm(agent_for(p, info).vm)
    held = {}
    expected = {}

    def at_snapshot(name):
        expected["d"] = checks.image("xfer01", "scsi0:0", tmp_path / "lc.img", name)
        node = next(n for n in snapshots.walk(client.find_vm("xfer01")) if n.name == name)
        (f,) = frozen_disks(node.snapshot, list(info.disks))
        # Someone else holds the frozen file on the agent: attaching it again is FileLocked.
        ctrl = next(d for d in agent.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController))
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=f.file, diskMode="independent_nonpersistent")
        dev = vim.vm.device.VirtualDisk(key=-1, controllerKey=ctrl.key, unitNumber=14, backing=backing)
        add = vim.vm.device.VirtualDeviceSpec(operation="add", device=dev)
        run_task(lambda: agent.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[add])), "hold")
        held["file"] = f.file

    def progress(done, total):
        if "file" in held:  # let go before the snapshot is removed, so it merges
            detach_files(agent, {held.pop("file")}, 60, "let go")

    r = backup(client, p, "xfer01", on_snapshot=at_snapshot, progress=progress)
    assert r.transport == "hotadd" and r.transport_detail.startswith("through linked clone vmbackup-clone-xfer01-")
    assert "FileLocked" in r.transport_detail
    assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "lc.raw") == expected["d"]
    assert len(disks_of(list(agent.config.hardware.device))) == 1
    checks.assert_clean(p)


def _cbt_switched_on_by_us(client, name):
    """CBT off, so that the next backup switches it on with no snapshot present:
    the one case where its `*` areas are documented valid (docs/vsphere.md)."""
    from pyVmomi import vim
    from vmbackup.vsphere.tasks import run_task

    vm = client.find_vm(name)
    run_task(lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)), "cbt off")


def test_a_full_records_what_cbt_says_is_allocated(client, plan, checks, tmp_path):
    seen = {}
    _cbt_switched_on_by_us(client, "off03")

    def at_snapshot(name):
        seen["img"] = tmp_path / "alloc.img"
        checks.image("off03", "scsi0:0", seen["img"], name)

    r = backup(client, plan, "off03", on_snapshot=at_snapshot)
    (d,) = r.disks
    assert d["mode"] == "full" and 0 < d["allocated_bytes"] < d["capacity"]
    data = seen["img"].read_bytes()
    nonzero = sum(1 for i in range(0, len(data), 65536) if data[i : i + 65536].count(0) != 65536)
    assert nonzero * 65536 <= d["allocated_bytes"]  # every block with data is in CBT's allocated areas
    checks.assert_clean(plan)


def test_vms_on_one_agent_at_once(client, plan, checks, tmp_path):
    """Several VMs hot-added to the same agent at the same time, as the flow runs them."""
    from concurrent.futures import ThreadPoolExecutor

    p = with_transports(plan, "hotadd")
    names = ["multi01", "xfer01", "fall01", "crash01"]  # all on esx1: one agent
    checks.lab.reset_counters()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: backup(client, p, n), names))
    assert [r.status for r in results] == ["ok"] * 4 and {r.agent for r in results} == {"vmbackup-agent-esx1"}
    assert all(r.transport_detail is None for r in results)  # attached directly, no clone needed
    checks.assert_clean(p)


def test_a_full_over_nbd_reads_only_what_cbt_says_is_allocated(client, plan, checks, tmp_path):
    """nbdkit's curl export reports no allocation, so without CBT's `*` areas a
    full over NBD reads every byte; with them, only the blocks that hold
    allocated areas (the VM's two disks read at once into one backup point).
    Chunks of 256 KiB (the smallest) follow the lab's scattered 64 KiB-grained
    file data more closely than the default 1 MiB."""
    repo = tmp_path / "repo256"
    chunk = _mover.init_repository(str(repo), chunk_size=256 * 1024).chunk_size
    p = with_transports(plan, "nbd").model_copy(update={"repository": repo})
    _cbt_switched_on_by_us(client, "multi01")
    full = _backup_and_capture(client, p, checks, "multi01", tmp_path, "nbd-alloc")
    assert full.transport == "nbd" and full.mode == "full"
    for d in full.disks:
        img = (tmp_path / f"multi01-nbd-alloc-{d['name'].replace(':', '_')}.img").read_bytes()
        blocks = [img[i : i + chunk] for i in range(0, len(img), chunk)]
        with_data = sum(chunk for b in blocks if b.count(0) != len(b))
        # Every block with data is read (the restore above is bit-exact), and
        # little more: the allocated blocks, far below the disk's size.
        assert with_data <= d["bytes_read"] < d["capacity"] // 2, d
        assert d["allocated_bytes"] <= d["bytes_read"] <= 2 * d["allocated_bytes"], d
    checks.assert_clean(p)


@pytest.mark.parametrize(("transport", "when"), [("direct", "at_snapshot"), ("nbd", "at_snapshot"), ("direct", "read")])
def test_our_snapshot_removed_by_someone_else_commits_nothing_and_says_so_in_one_line(
    client, plan, checks, transport, when
):
    """An administrator's "delete all" (or another site's sweeper) removes our
    snapshot after it was made: nothing is committed, one line says why."""
    from vmbackup.errors import SnapshotError, SnapshotVanishedError
    from vmbackup.vsphere import snapshots
    from vmbackup.vsphere.tasks import run_task

    p = with_transports(plan, transport)
    obj = client.find_vm("multi01")

    names = []

    def remove_ours(name):
        (node,) = [n for n in snapshots.walk(obj) if n.name == name]
        run_task(lambda: node.snapshot.RemoveSnapshot_Task(removeChildren=False), "someone else's removal", 60)

    def during_read(_done, _total):
        # The first progress report: the disks are being read from the snapshot.
        if names:
            remove_ours(names.pop())

    with pytest.raises(SnapshotError) as e:
        if when == "at_snapshot":
            backup(client, p, "multi01", on_snapshot=remove_ours)
        else:
            backup(client, p, "multi01", on_snapshot=names.append, progress=during_read)
    assert not names  # the snapshot was removed
    msg = str(e.value)
    assert isinstance(e.value, SnapshotVanishedError) and e.value.retryable
    assert "\n" not in msg and "multi01" in msg and "no backup point was committed" in msg, msg
    assert _mover.list_backups(str(plan.repository))[0] == []
    checks.assert_clean(plan)
    # The next backup of the VM works, a full from scratch.
    r = backup(client, p, "multi01")
    assert r.status == "ok" and r.mode == "full"
    checks.assert_clean(plan)
