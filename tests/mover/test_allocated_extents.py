"""A full backup from given allocated areas (QueryChangedDiskAreas with
change id ``*``): only blocks touching them are read, the rest is recorded as
zeros. The source is a fully preallocated raw image (no holes, so its own
allocation map says "read everything") written with qemu-io."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import MiB, sha256
from vmbackup import _mover
from vmbackup.errors import InvalidInputError

WRITES = [(1 * MiB, 3 * MiB, 7), (20 * MiB, 512 * 1024, 9)]  # (offset, length, pattern)


@pytest.fixture
def written(tmp_path):
    p = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", str(p), "32M"], check=True)
    io = [a for off, n, pat in WRITES for a in ("-c", f"write -P {pat} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "raw", *io, str(p)], check=True, capture_output=True)
    return p


def test_a_preallocated_image_is_read_whole_without_allocated_extents(cli, written):
    """The baseline: the image has no holes, so the source's map covers it all."""
    s = _mover.BackupSession(str(cli.repo), "vm")
    d = s.add_disk(str(written), "d")
    s.abort()
    assert d.bytes_read == 32 * MiB


@pytest.mark.parametrize(
    "extents",
    [
        [(off, n) for off, n, _ in WRITES],
        # Unsorted, overlapping, touching and empty: normalized first.
        [(20 * MiB, 512 * 1024), (2 * MiB, 2 * MiB), (1 * MiB, 1 * MiB + 1), (5 * MiB, 0)],
    ],
    ids=["exact", "unsorted-overlapping"],
)
def test_allocated_extents_read_only_those_blocks(cli, written, tmp_path, extents):
    s = _mover.BackupSession(str(cli.repo), "vm")
    d = s.add_disk(str(written), "d", allocated_extents=extents)
    info = s.commit()
    # Blocks 1-3 and 20 of 1 MiB: four blocks read of 32.
    assert d.bytes_read == 4 * MiB
    assert info.disks[0].mode == "allocated"
    cli.json("restore-disk", info.id, str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(written)


def test_areas_outside_the_given_extents_restore_as_zeros(cli, written, tmp_path):
    s = _mover.BackupSession(str(cli.repo), "vm")
    d = s.add_disk(str(written), "d", allocated_extents=[(1 * MiB, 3 * MiB)])
    info = s.commit()
    assert d.bytes_read == 3 * MiB
    out = tmp_path / "o"
    cli.json("restore-disk", info.id, str(out))
    data = out.read_bytes()
    assert data[1 * MiB : 4 * MiB] == bytes([7]) * (3 * MiB)
    assert data[20 * MiB : 21 * MiB] == bytes(MiB)  # written, but not given: zeros
    assert data.count(0) == 29 * MiB


def test_bad_allocated_extents_are_refused(cli, written):
    s = _mover.BackupSession(str(cli.repo), "vm")
    with pytest.raises(InvalidInputError, match="past the end"):
        s.add_disk(str(written), "d", allocated_extents=[(31 * MiB, 2 * MiB)])
    with pytest.raises(InvalidInputError, match="overflows"):
        s.add_disk(str(written), "d", allocated_extents=[(2**64 - 1, 2)])
    with pytest.raises(InvalidInputError, match="not both"):
        s.add_disk(str(written), "d", changed_extents=[], allocated_extents=[])
    # A refused disk leaves nothing behind: the name is still free.
    assert s.add_disk(str(written), "d", allocated_extents=[]).bytes_read == 0
    s.abort()


def test_backup_disk_with_an_allocated_extents_file(cli, written, tmp_path):
    f = tmp_path / "areas.json"
    f.write_text(json.dumps([{"start": off, "length": n} for off, n, _ in WRITES]))
    r = cli.json("backup-disk", "--vm", "v", "--allocated-extents", str(f), str(written))
    assert r["bytes_read"] == 4 * MiB and r["disk_size"] == 32 * MiB
    cli.json("restore-disk", r["id"], str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(written)
