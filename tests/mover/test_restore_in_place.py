"""Restore into an existing target in place (``existing=True``): a new thin
disk (``blank``), the areas CBT says changed (``extents``), the blocks that
differ (``compare``), or every block. Each mode must leave the target equal
to the point, write only what it says (``bytes_written``), keep the target
where it is (same inode, same size), and refuse a target too small in one
line without touching it. Also: restore to a dynamic VHDX through the API,
and two disks restored at once from two Python threads."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from conftest import MiB, sha256
from test_cancel import CancelFromAnotherThread, files
from vmbackup import _mover
from vmbackup.errors import CancelledError, InvalidInputError

SIZE = 40 * MiB + 4096  # a short last block


@pytest.fixture
def point(tmp_path, image):
    """(repository, backup id, the disk's image) with 1 MiB chunks."""
    repo = str(tmp_path / "repo")
    _mover.init_repository(repo, chunk_size=MiB)
    disk = image("disk.img", SIZE, seed=7)
    s = _mover.BackupSession(repo, "vm")
    s.add_disk(str(disk), "scsi0:0")
    return repo, s.commit().id, disk


def blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + MiB] for i in range(0, len(data), MiB)]


def data_bytes(path: Path) -> int:
    return sum(len(b) for b in blocks(path) if b.count(0) != len(b))


def head_equals(target: Path, disk: Path) -> bool:
    with open(target, "rb") as t:
        return t.read(disk.stat().st_size) == disk.read_bytes()


def copy_of(disk: Path, to: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(disk), str(to)], check=True)
    return to


def scribble(path: Path, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)


def flip(path: Path, offsets: list[int]) -> None:
    """Inverts one byte at each offset: each block it falls in then differs."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)[0]
            f.seek(off)
            f.write(bytes([b ^ 0xFF]))


def test_blank_target_gets_only_the_data_blocks_and_stays_thin(point, tmp_path):
    repo, bid, disk = point
    target = tmp_path / "thin.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)  # a new thin disk: reads as zeros, nothing allocated
    ino = target.stat().st_ino
    r = _mover.restore_disk(repo, bid, str(target), existing=True, blank=True)
    assert sha256(target) == sha256(disk)
    assert target.stat().st_ino == ino and target.stat().st_size == SIZE
    assert r.bytes_written == data_bytes(disk) < SIZE
    assert r.bytes_punched == 0 and r.blocks_compared == 0
    assert r.blocks_written + r.blocks_skipped == len(blocks(disk))
    assert r.blocks_skipped == r.zero_blocks > 0
    assert target.stat().st_blocks * 512 <= r.bytes_written + 64 * 1024  # the holes stayed holes (+ metadata)


def test_every_block_is_written_over_garbage_without_truncation(point, tmp_path):
    repo, bid, disk = point
    target = tmp_path / "old.raw"
    target.write_bytes(os.urandom(SIZE + MiB))  # larger than the disk: the tail is not the disk's
    tail = target.read_bytes()[SIZE:]
    ino = target.stat().st_ino
    r = _mover.restore_disk(repo, bid, str(target), existing=True)
    assert head_equals(target, disk)
    assert target.read_bytes()[SIZE:] == tail
    assert target.stat().st_ino == ino
    # Data written, zero blocks punched out of the file (they read as zeros).
    assert r.bytes_written == data_bytes(disk)
    assert r.bytes_written + r.bytes_punched == SIZE
    assert r.blocks_written == len(blocks(disk)) and r.blocks_skipped == 0


def test_extents_write_only_the_blocks_they_touch_zeros_included(point, tmp_path):
    repo, bid, disk = point
    zero_block = next(i for i, b in enumerate(blocks(disk)) if b.count(0) == len(b))
    data_block = next(i for i, b in enumerate(blocks(disk)) if b.count(0) != len(b))
    changes = [
        (zero_block * MiB + 10, b"guest wrote into a hole"),
        (data_block * MiB + 4000, b"\xff" * 5000),
        (20 * MiB - 3, b"across a block boundary"),
        (SIZE - 100, b"at the very end"),
    ]
    target = copy_of(disk, tmp_path / "live.raw")
    scribble(target, changes)
    ino = target.stat().st_ino
    r = _mover.restore_disk(repo, bid, str(target), existing=True, extents=[(o, len(d)) for o, d in changes])
    assert sha256(target) == sha256(disk)
    assert target.stat().st_ino == ino
    touched = {o // MiB for o, d in changes} | {(o + len(d) - 1) // MiB for o, d in changes}
    assert r.blocks_written == len(touched) and r.blocks_compared == 0
    assert r.blocks_skipped == len(blocks(disk)) - len(touched)
    want = sum(min(MiB, SIZE - b * MiB) for b in touched)
    assert r.bytes_written + r.bytes_punched == want
    assert r.bytes_punched >= MiB  # the zero block went back to a hole


def test_compare_writes_only_the_blocks_that_differ(point, tmp_path):
    repo, bid, disk = point
    target = copy_of(disk, tmp_path / "live.raw")
    scribble(target, [(17 * MiB, os.urandom(2 * MiB))])
    flip(target, [3 * MiB + 1, SIZE - 1])
    changed = {3, 17, 18, SIZE // MiB}
    before = {i for i, (a, b) in enumerate(zip(blocks(target), blocks(disk), strict=True)) if a != b}
    assert before == changed
    r = _mover.restore_disk(repo, bid, str(target), existing=True, compare=True)
    assert sha256(target) == sha256(disk)
    assert r.blocks_compared == len(blocks(disk))
    assert r.blocks_written == len(changed)
    assert r.blocks_skipped == len(blocks(disk)) - len(changed)
    assert r.bytes_written + r.bytes_punched == 3 * MiB + 4096
    # Nothing differs any more: nothing is written.
    again = _mover.restore_disk(repo, bid, str(target), existing=True, compare=True)
    assert (again.bytes_written, again.bytes_punched, again.blocks_written) == (0, 0, 0)
    # Compare within extents: only the blocks they touch are even read.
    flip(target, [5 * MiB, 30 * MiB])
    r = _mover.restore_disk(repo, bid, str(target), existing=True, compare=True, extents=[(5 * MiB, 1), (6 * MiB, 1)])
    assert (r.blocks_compared, r.blocks_written) == (2, 1)
    assert sha256(target) != sha256(disk)  # block 30 was outside the extents
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(target), str(disk)]).returncode


def test_a_block_device_gets_zeros_written(point, tmp_path):
    repo, bid, disk = point
    backing = tmp_path / "lun.img"
    backing.write_bytes(os.urandom(SIZE + 4 * MiB))
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        r = _mover.restore_disk(repo, bid, dev, existing=True, compare=True)
        assert r.bytes_punched == 0 and r.bytes_written == r.blocks_written * MiB - (MiB - 4096)
        again = _mover.restore_disk(repo, bid, dev, existing=True, compare=True)
        assert again.bytes_written == 0
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
    assert head_equals(backing, disk)


def test_a_vhdx_rolled_back_in_place_gets_only_the_blocks_that_differ(point, tmp_path):
    """The disk of a Hyper-V VM as a VHDX file (qemu-img makes it): after a
    small write the rollback writes that write's block and the file then
    reads as the point for qemu too."""
    repo, bid, disk = point
    vhdx = tmp_path / "live.vhdx"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", str(disk), str(vhdx)], check=True
    )
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 9 17M 4k", str(vhdx)], check=True, capture_output=True)
    inode = vhdx.stat().st_ino
    r = _mover.restore_disk(repo, bid, str(vhdx), existing=True, compare=True, format="vhdx")
    assert (r.bytes_written, r.blocks_written, r.blocks_compared) == (MiB, 1, 41)
    assert vhdx.stat().st_ino == inode
    subprocess.run(["qemu-img", "check", "-f", "vhdx", str(vhdx)], check=True, capture_output=True)
    same = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(vhdx), str(disk)], capture_output=True)
    assert same.returncode == 0, same.stdout


BAD = [
    ("missing", dict(existing=True), "cannot be written in place"),
    ("small", dict(existing=True), "the disk needs"),
    ("small", dict(existing=True, blank=True), "the disk needs"),
    ("dir", dict(existing=True), "neither a regular file nor a block device"),
    ("new", dict(blank=True), "existing"),
    ("new", dict(compare=True), "existing"),
    ("new", dict(extents=[(0, 1)]), "existing"),
    ("small", dict(existing=True, blank=True, compare=True), "blank"),
    ("small", dict(existing=True, blank=True, extents=[(0, 1)]), "blank"),
    ("small", dict(existing=True, format="vhdx"), "not a valid VHDX"),
    ("small", dict(existing=True, format="vmdk"), "raw disk or a VHDX"),
]


@pytest.mark.parametrize("what,kw,says", BAD)
def test_bad_targets_and_options_are_refused_in_one_line(point, tmp_path, what, kw, says):
    repo, bid, _ = point
    (tmp_path / "dir").mkdir()
    (tmp_path / "small").write_bytes(b"\x07" * (SIZE - 512))
    before = files(tmp_path)
    with pytest.raises(InvalidInputError) as e:
        _mover.restore_disk(repo, bid, str(tmp_path / what), **kw)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert files(tmp_path) == before
    assert (tmp_path / "small").read_bytes() == b"\x07" * (SIZE - 512)


def test_extents_past_the_end_are_refused(point, tmp_path):
    repo, bid, disk = point
    target = copy_of(disk, tmp_path / "t.raw")
    with pytest.raises(InvalidInputError, match="past the end"):
        _mover.restore_disk(repo, bid, str(target), existing=True, extents=[(SIZE - 1, 2)])


def test_a_cancelled_in_place_restore_stops_and_leaves_the_target(point, tmp_path):
    repo, bid, _ = point
    target = tmp_path / "thin.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    c = CancelFromAnotherThread()
    with pytest.raises(CancelledError):
        _mover.restore_disk(repo, bid, str(target), existing=True, blank=True, progress=c, cancel=c.token)
    c.join()
    assert sorted(os.listdir(tmp_path)) == ["disk.img", "repo", "thin.raw"]  # no temporary file
    assert target.stat().st_size == SIZE


def test_two_threads_restore_two_disks_at_once(tmp_path, image):
    """The GIL is released: both restores are in their data path together
    (each one's first progress report waits at a barrier for the other's)."""
    repo = str(tmp_path / "repo")
    _mover.init_repository(repo, chunk_size=256 * 1024)
    disks = {"scsi0:0": image("a.img", 24 * MiB, seed=3), "scsi0:1": image("b.img", 16 * MiB, seed=4)}
    s = _mover.BackupSession(repo, "vm")
    for name, path in disks.items():
        s.add_disk(str(path), name)
    bid = s.commit().id
    meet = threading.Barrier(len(disks))
    errors: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if done < total:
            meet.wait()

    def restore(name: str) -> None:
        out = tmp_path / f"{name}.raw"
        try:
            with open(out, "wb") as f:
                f.truncate(disks[name].stat().st_size)
            _mover.restore_disk(repo, bid, str(out), disk=name, existing=True, blank=True, progress=progress)
        except BaseException as e:
            errors.append(e)
            meet.abort()

    threads = [threading.Thread(target=restore, args=(n,)) for n in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not meet.broken
    for name, path in disks.items():
        assert sha256(tmp_path / f"{name}.raw") == sha256(path)


BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le  # [MS-VHDX] 2.2.3.2


def payload_states(path: Path, blocks: int) -> list[tuple[int, int]]:
    """(state, FileOffsetMB) of the first ``blocks`` payload BAT entries
    (fewer than a chunk ratio: no sector bitmap entry among them)."""
    with open(path, "rb") as f:
        f.seek(192 * 1024)  # the first region table
        table = f.read(64 * 1024)
        count = struct.unpack_from("<I", table, 8)[0]
        for i in range(count):
            guid, offset, _length, _required = struct.unpack_from("<16sQII", table, 16 + 32 * i)
            if guid == BAT_GUID:
                f.seek(offset)
                entries = struct.unpack(f"<{blocks}Q", f.read(8 * blocks))
                return [(e & 7, e >> 20) for e in entries]
    raise AssertionError("no BAT region")


def test_vhdx_has_payload_blocks_only_where_data_is(tmp_path):
    """A 160 MiB disk (five 32 MiB VHDX blocks) with data in blocks 0 and 3
    only: the VHDX holds two payload blocks, qemu-img checks it and finds it
    equal to the raw restore, and the mover's own reader backs it up to the
    same chunks."""
    repo = str(tmp_path / "repo")
    _mover.init_repository(repo)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(160 * MiB)
        f.seek(5 * MiB + 17)
        f.write(os.urandom(3 * MiB))
        f.seek(3 * 32 * MiB + 31 * MiB)
        f.write(b"the last MiB of block 3")
        f.seek(2 * 32 * MiB)
        f.write(bytes(MiB))  # written zeros: allocated in the file, no payload block
    s = _mover.BackupSession(repo, "vm")
    s.add_disk(str(disk), "disk0")
    bid = s.commit().id
    out = tmp_path / "out.vhdx"
    r = _mover.restore_disk(repo, bid, str(out), format="vhdx")
    subprocess.run(["qemu-img", "check", "-q", "-f", "vhdx", str(out)], check=True)
    raw = tmp_path / "out.raw"
    _mover.restore_disk(repo, bid, str(raw))
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(out), str(raw)]).returncode == 0
    # Headers, log, metadata and BAT in the first 4 MiB, then two payload
    # blocks (FULLY_PRESENT); the others are ZERO (defined to read as zeros,
    # where NOT_PRESENT leaves them undefined), FileOffsetMB 0.
    assert out.stat().st_size == 4 * MiB + 2 * 32 * MiB
    assert payload_states(out, 5) == [(6, 4), (2, 0), (2, 0), (6, 36), (2, 0)]
    assert r.bytes_written < 4 * MiB + 5 * MiB  # holes inside the payload blocks are not written
    s = _mover.BackupSession(repo, "vm")
    d = s.add_disk(str(out), "disk0")
    again = s.commit()
    assert d.source_format == "vhdx:dynamic"
    back = tmp_path / "back.raw"
    _mover.restore_disk(repo, again.id, str(back))
    assert sha256(back) == sha256(disk)
