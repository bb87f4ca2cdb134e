"""The CBT audit's plain parts: extent arithmetic, sampling, the broken-chain
mark in the repository and the hook the backup's CBT planning reads."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmbackup import _mover
from vmbackup.audit import AuditSample, parse_audit_sample
from vmbackup.errors import InvalidInputError, NotFoundError
from vmbackup.vsphere import broken_chains
from vmbackup.vsphere.audit import BLOCK, intersect, sample_blocks, unchanged
from vmbackup.vsphere.cbt import plan_disks
from vmbackup.vsphere.inventory import DiskInfo

CAP = 64 * BLOCK

# CBT's areas are whole sectors (vSphere's: whole CBT blocks).
sectors = st.integers(0, CAP // 512 - 1).map(lambda n: n * 512)
areas = st.lists(st.tuples(sectors, st.integers(1, 8 * BLOCK // 512).map(lambda n: n * 512)), max_size=12)


def _bytes(extents, cap=CAP):
    out = set()
    for s, n in extents:
        out |= set(range(max(0, s) // 512, min(cap, s + n) // 512))
    return out


@given(areas)
def test_unchanged_is_the_complement_of_changed(changed):
    rest = unchanged(changed, CAP)
    assert _bytes(rest) == set(range(CAP // 512)) - _bytes(changed)
    assert all(n > 0 for _, n in rest)


@given(areas, areas)
def test_intersect(a, b):
    assert _bytes(intersect(a, b, CAP)) == _bytes(a) & _bytes(b)


@given(areas, st.one_of(st.none(), st.integers(1, 100)), st.integers(0, 10))
def test_sampled_blocks_lie_in_the_areas_do_not_overlap_and_stay_in_one_block(changed, count, seed):
    rest = unchanged(changed, CAP)
    got = sample_blocks(rest, count, random.Random(seed))
    inside = _bytes(rest)
    assert all(_bytes([b]) <= inside for b in got)
    assert sum(len(_bytes([b])) for b in got) == len(_bytes(got))
    if count is not None:
        assert len(got) == min(count, len(sample_blocks(rest, None, random.Random(0))))
    assert all(0 < n <= BLOCK and s // BLOCK == (s + n - 1) // BLOCK for s, n in got)
    if count is None:
        assert _bytes(got) == inside


def test_sample_parsing():
    assert parse_audit_sample(None).blocks == 64
    assert parse_audit_sample("all") == AuditSample(None)
    assert parse_audit_sample("12").blocks == 12
    for bad in ("0", "-3", "ten", "1.5", "10%"):
        with pytest.raises(InvalidInputError):
            parse_audit_sample(bad)


def test_a_broken_chain_makes_the_next_backup_full_with_the_reason(tmp_path):
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    disk = DiskInfo(2000, "scsi0:0", "[ds] vm/vm.vmdk", "ds", 1 << 20, "u1")
    previous = {
        "id": "b1",
        "created_unix": 1.0,
        "attributes": {"disks": [{"name": "scsi0:0", "uuid": "u1"}]},
        "disks": [{"name": "scsi0:0", "size": 1 << 20, "change_id": "52 aa/3"}],
    }
    assert broken_chains.read(repo, "vm1") is None
    plans, reason = plan_disks((disk,), previous, cbt_just_enabled=False, full_every_days=None, chain_broken=None)
    assert reason is None and plans[0].base_change_id == "52 aa/3"

    found = [{"disk": "scsi0:0", "offset": 5 << 20, "length": 128 << 10}]
    why = broken_chains.reason_of("b1", found)
    broken_chains.mark(repo, broken_chains.BrokenChain(vm="vm1", point="b1", reason=why, run_id="a1", mismatches=found))
    mark = broken_chains.read(repo, "vm1")
    assert mark is not None and mark.reason == why and "scsi0:0 at 5242880" in why
    assert broken_chains.read(repo, "vm2") is None
    plans, reason = plan_disks(
        (disk,), previous, cbt_just_enabled=False, full_every_days=None, chain_broken=mark.reason
    )
    assert reason == why and plans[0].full_reason == why and plans[0].base_change_id is None

    # A newer audit's mark is not cleared by a backup that read the older one.
    broken_chains.mark(repo, broken_chains.BrokenChain(vm="vm1", point="b2", reason="newer", run_id="a2"))
    assert not broken_chains.clear(repo, mark)
    newer = broken_chains.read(repo, "vm1")
    assert newer is not None and newer.point == "b2"
    assert broken_chains.clear(repo, newer)
    assert broken_chains.read(repo, "vm1") is None


def test_a_torn_mark_still_breaks_the_chain(tmp_path):
    d = broken_chains.marks_dir(tmp_path)
    d.mkdir()
    (d / "vm1.json").write_text("{not json")
    mark = broken_chains.read(tmp_path, "vm1")
    assert mark is not None and "cannot be read" in mark.reason


def test_disk_reader_reads_a_point_and_a_source_at_any_offset(tmp_path):
    data = random.Random(3).randbytes(3 << 20)
    img = tmp_path / "d.raw"
    img.write_bytes(data)
    repo = str(tmp_path / "repo")
    _mover.init_repository(repo)
    s = _mover.BackupSession(repo, "vm1")
    s.add_disk(str(img), "scsi0:0")
    point = s.commit()
    got = _mover.DiskReader.backup(repo, point.id, "scsi0:0")
    src = _mover.DiskReader.source(str(img))
    assert got.size == src.size == len(data)
    for off, n in [(0, 10), ((1 << 20) - 5, 100), ((3 << 20) - 7, 7), (12345, 2 << 20)]:
        assert got.read(off, n) == data[off : off + n] == src.read(off, n)
    with pytest.raises(InvalidInputError):
        got.read((3 << 20) - 1, 2)
    with pytest.raises(InvalidInputError):
        got.read(0, (64 << 20) + 1)
    with pytest.raises(NotFoundError):
        _mover.DiskReader.backup(repo, point.id, "scsi0:9")


def test_a_mark_follows_the_vm_id_and_never_another_vm_of_the_same_name(tmp_path):
    why = "CBT audit: backup b1 differs"
    broken_chains.mark(tmp_path, broken_chains.BrokenChain(vm="web", point="b1", reason=why, vm_id="uuid-1"))
    assert broken_chains.read(tmp_path, "web").reason == why  # by name, as today's backups look
    assert broken_chains.read(tmp_path, "web-renamed", "uuid-1").reason == why  # renamed: the id decides
    assert broken_chains.read(tmp_path, "web", "uuid-2") is None  # another VM named web
    mark = broken_chains.read(tmp_path, "web-renamed", "uuid-1")
    assert broken_chains.clear(tmp_path, mark)
    assert broken_chains.read(tmp_path, "web") is None
