"""Changed block tracking: change ids, QueryChangedDiskAreas with paging, '*',
and change ids that are no longer valid."""

import pytest
from pyVmomi import vim

from .labkit import disk, disks, find, snapshot, wait

BLOCK = 64 << 10


def all_areas(vm, snap, key, change_id, capacity):
    """Page through QueryChangedDiskAreas as a backup must; return areas and page count."""
    areas, offset, pages = [], 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset and info.length > 0
        for a in info.changedArea:
            assert offset <= a.start and a.start + a.length <= offset + info.length
        areas += [(a.start, a.length) for a in info.changedArea]
        offset += info.length
        pages += 1
    return areas, pages


def merged(areas):
    out = []
    for s, n in sorted(areas):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], s + n) - out[-1][0])
        else:
            out.append((s, n))
    return out


def test_cbt_reports_exactly_the_blocks_written_across_pages(si, lab):
    vm = find(si, vim.VirtualMachine, "cbt02")
    assert not vm.config.changeTrackingEnabled
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled
    key, capacity = disks(vm)[0].key, disks(vm)[0].capacityInBytes
    first = snapshot(vm, "full")
    base_id = disk(first.config, key).backing.changeId
    assert base_id and "/" in base_id
    wait(first.RemoveSnapshot_Task(removeChildren=False))

    # Writes in blocks, spread over several 16 MiB pages, some adjacent, one unaligned.
    writes = [
        (0, BLOCK),
        (3 * BLOCK, 2 * BLOCK),
        (5 * BLOCK, BLOCK),
        (8 * BLOCK, 1),
        (12 * BLOCK, BLOCK),
        (17 << 20, BLOCK),
        (30 << 20, 3 * BLOCK),
        (40 << 20, BLOCK),
        ((50 << 20) + 100, 10),
        (63 << 20, BLOCK),
    ]
    for i, (off, n) in enumerate(writes):
        lab.write("cbt02", "scsi0:0", off, n, seed=100 + i)
    second = snapshot(vm, "incr")
    try:
        new_id = disk(second.config, key).backing.changeId
        assert new_id != base_id
        areas, pages = all_areas(vm, second, key, base_id, capacity)
        assert pages > capacity // (16 << 20)  # more than 4 pages: max 3 areas per answer cut some short
        blocks = merged((off - off % BLOCK, -(-(off + n) // BLOCK) * BLOCK - (off - off % BLOCK)) for off, n in writes)
        assert merged(areas) == blocks
        # Since the newest change id nothing changed.
        assert all_areas(vm, second, key, new_id, capacity)[0] == []
    finally:
        wait(second.RemoveSnapshot_Task(removeChildren=False))


def test_star_reports_all_allocated_areas(si, lab, tmp_path):
    vm = find(si, vim.VirtualMachine, "cbt01")
    assert vm.config.changeTrackingEnabled  # switched on by the topology
    key, capacity = disks(vm)[0].key, disks(vm)[0].capacityInBytes
    snap = snapshot(vm, "full")
    try:
        areas, _ = all_areas(vm, snap, key, "*", capacity)
        assert areas and all(s % BLOCK == 0 and n % BLOCK == 0 for s, n in areas)
        img = tmp_path / "d.img"
        lab.disk_image("cbt01", "scsi0:0", img, snapshot="full")
        data = img.read_bytes()
        covered = bytearray(len(data))
        for s, n in areas:
            covered[s : s + n] = b"\x01" * n
        # Everything outside the allocated areas reads as zeros; the areas hold data.
        for off in range(0, len(data), BLOCK):
            if not covered[off]:
                assert data[off : off + BLOCK].count(0) == BLOCK
        assert sum(n for _, n in areas) < capacity
        assert data[:512].count(0) < 512
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_change_ids_become_invalid_when_cbt_is_switched_off_and_on(si, lab):
    vm = find(si, vim.VirtualMachine, "cbt01")
    key, capacity = disks(vm)[0].key, disks(vm)[0].capacityInBytes
    snap = snapshot(vm, "a")
    old_id = disk(snap.config, key).backing.changeId
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert not vm.config.changeTrackingEnabled and not disks(vm)[0].backing.changeId
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    snap = snapshot(vm, "b")
    try:
        new_id = disk(snap.config, key).backing.changeId
        assert new_id.split("/")[0] != old_id.split("/")[0]
        # Another epoch's change id, or none at all: InvalidArgument (changeId).
        with pytest.raises(vmodl_invalid_argument()):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId=old_id)
        with pytest.raises(vmodl_invalid_argument()):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId="garbage")
        with pytest.raises(vmodl_invalid_argument()):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=99999, startOffset=0, changeId="*")
        assert all_areas(vm, snap, key, new_id, capacity)[0] == []
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def test_query_without_cbt_is_a_file_fault(si, lab):
    vm = find(si, vim.VirtualMachine, "db01")
    snap = snapshot(vm, "nocbt")
    try:
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disks(vm)[0].key, startOffset=0, changeId="*")
    finally:
        wait(snap.RemoveSnapshot_Task(removeChildren=False))


def vmodl_invalid_argument():
    from pyVmomi import vmodl

    return vmodl.fault.InvalidArgument
