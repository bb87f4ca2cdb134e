"""VMDK conformance: images made by qemu-img in every subformat we read,
filled by qemu-io at scattered offsets, back up and restore to exactly what
``qemu-img convert -O raw`` gives; restores as VMDK pass ``qemu-img check``
and compare equal; corrupt images fail with one clear line."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import MiB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmbackup import _mover

GiB = 1024 * MiB

# (pattern, offset, length): aligned, unaligned, across grains (64 KiB) and
# chunks (1 MiB), at the start and near the end.
WRITES = [
    (0x11, 0, 4096),
    (0x22, 5 * MiB + 123, 70_000),
    (0x33, 17 * MiB - 1000, 3000),
    (0x44, 40 * MiB, MiB),
    (0x55, 63 * MiB + 512, 100_000),
]
# For twoGbMaxExtent*: qemu-img cuts extents at 2 GiB; these cross the cut.
WRITES_2G = WRITES + [
    (0x66, 2 * GiB - 1000, 5000),
    (0x77, 2 * GiB + 3 * MiB + 7, 200_000),
]
SMALL = 64 * MiB + 4 * MiB
LARGE = 2 * GiB + 8 * MiB


def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


def qemu_write(path: Path, writes, fmt: str = "vmdk") -> None:
    cmds = []
    for pattern, off, length in writes:
        cmds += ["-c", f"write -P {pattern} {off} {length}"]
    run("qemu-io", "-f", fmt, *cmds, str(path))


def make_vmdk(d: Path, subformat: str, size: int, writes) -> Path:
    if subformat == "streamOptimized":
        # qemu-img makes streamOptimized only by conversion.
        src = d / "src.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", str(src), str(size))
        qemu_write(src, writes)
        out = d / "disk.vmdk"
        run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src), str(out))
        src.unlink()
        return out
    out = d / "disk.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(out), str(size))
    qemu_write(out, writes)
    return out


def reference_raw(img: Path, out: Path, fmt: str = "vmdk") -> Path:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(out))
    return out


def same_raw(a: Path, b: Path) -> None:
    """Byte for byte: equal sizes, and qemu-img compare (hole-aware, fast)."""
    assert os.path.getsize(a) == os.path.getsize(b)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b))


def check_round_trip(cli, tmp_path: Path, img: Path, ref: Path, fmt_name: str) -> dict:
    b = cli.json("backup-disk", "--vm", "vm", str(img))
    assert b["disk_size"] == os.path.getsize(ref)
    # Only the allocated areas are read: a few MiB of a much larger disk.
    assert 0 < b["bytes_read"] < b["disk_size"] // 4, b
    out = tmp_path / "restored.raw"
    cli.json("restore-disk", b["id"], str(out))
    same_raw(out, ref)
    # The manifest records the subformat (the Python API shows it).
    session = _mover.BackupSession(str(cli.repo), "format-check")
    try:
        assert session.add_disk(str(img), "d").source_format == fmt_name
    finally:
        session.abort()
    return b


SUBFORMATS = [
    ("monolithicSparse", SMALL, WRITES),
    ("monolithicFlat", SMALL, WRITES),
    ("streamOptimized", SMALL, WRITES),
    ("twoGbMaxExtentSparse", LARGE, WRITES_2G),
    ("twoGbMaxExtentFlat", LARGE, WRITES_2G),
]


@pytest.mark.parametrize("subformat,size,writes", SUBFORMATS, ids=[s[0] for s in SUBFORMATS])
def test_backup_restores_what_qemu_reads(cli, tmp_path, subformat, size, writes):
    img = make_vmdk(tmp_path, subformat, size, writes)
    ref = reference_raw(img, tmp_path / "ref.raw")
    b = check_round_trip(cli, tmp_path, img, ref, f"vmdk:{subformat}")

    for fmt in ("vmdk", "vmdk-sparse"):
        out = tmp_path / f"restored-{fmt}.vmdk"
        cli.json("restore-disk", "--format", fmt, b["id"], str(out))
        run("qemu-img", "check", "-f", "vmdk", str(out))
        run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(out), str(ref))
        info = run("qemu-img", "info", "-f", "vmdk", str(out))
        assert ("streamOptimized" if fmt == "vmdk" else "monolithicSparse") in info
        # Our own images read back through our own reader, too.
        again = cli.json("backup-disk", "--vm", "again", str(out))
        assert again["bytes_stored"] == 0  # every chunk already in the repository
        back = tmp_path / f"again-{fmt}.raw"
        cli.json("restore-disk", again["id"], str(back))
        same_raw(back, ref)


def test_vmfs_descriptor_with_flat_and_zero_extents(cli, tmp_path):
    """A hand-written vSphere-style descriptor: a VMFS extent, a FLAT extent
    at a sector offset into a shared file, and a ZERO extent."""
    flat = tmp_path / "vm-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(32 * MiB)
    qemu_write(flat, [(0x21, 100, 5000), (0x22, 20 * MiB, 3 * MiB)], fmt="raw")
    other = tmp_path / "other.bin"
    with open(other, "wb") as f:
        f.truncate(16 * MiB)
    qemu_write(other, [(0x31, 0, 4 * MiB), (0x32, 8 * MiB, 64 * 1024)], fmt="raw")
    desc = tmp_path / "vm.vmdk"
    desc.write_text(
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\nparentCID=ffffffff\n'
        'createType="vmfs"\n\n# Extent description\n'
        f'RW {32 * MiB // 512} VMFS "vm-flat.vmdk"\n'
        f"RW {8 * MiB // 512} ZERO\n"
        f'RW {12 * MiB // 512} FLAT "other.bin" {4 * MiB // 512}\n\n'
        '# The Disk Data Base\n#DDB\nddb.adapterType = "lsilogic"\n'
    )
    want = bytearray(flat.read_bytes()) + bytes(8 * MiB) + other.read_bytes()[4 * MiB :]
    b = cli.json("backup-disk", "--vm", "vm", str(desc))
    assert b["disk_size"] == len(want)
    assert b["bytes_read"] < len(want) // 2
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert out.read_bytes() == want
    # qemu reads the pure VMFS descriptor the same way.
    only_vmfs = tmp_path / "vmfs-only.vmdk"
    only_vmfs.write_text(
        desc.read_text()
        .replace(f"RW {8 * MiB // 512} ZERO\n", "")
        .replace(f'RW {12 * MiB // 512} FLAT "other.bin" {4 * MiB // 512}\n', "")
    )
    ref = reference_raw(only_vmfs, tmp_path / "ref.raw")
    b2 = cli.json("backup-disk", "--vm", "vm2", str(only_vmfs))
    out2 = tmp_path / "out2.raw"
    cli.json("restore-disk", b2["id"], str(out2))
    same_raw(out2, ref)


def make_chain(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(base), str(SMALL))
    qemu_write(base, [(0x41, 0, 3 * MiB), (0x42, 30 * MiB + 5, 100_000), (0x43, 50 * MiB, 2 * MiB)])
    child = tmp_path / "child.vmdk"
    # zeroed_grain: qemu marks grains written with zeros as zero grains
    # (table entry 1), which hide the parent's data.
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", str(child))
    qemu_write(child, [(0x51, MiB + 77, 10_000), (0x52, 50 * MiB + MiB // 2, MiB), (0x53, 60 * MiB, 4096)])
    run("qemu-io", "-f", "vmdk", "-c", f"write -z {2 * MiB} {MiB}", str(child))
    return base, child


def test_delta_disk_reads_through_its_parent(cli, tmp_path):
    base, child = make_chain(tmp_path)
    ref = reference_raw(child, tmp_path / "ref.raw")
    b = check_round_trip(cli, tmp_path, child, ref, "vmdk:monolithicSparse")
    # The parent's areas are read too: the backup is of the whole disk.
    assert b["bytes_read"] >= 5 * MiB
    with open(ref, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == bytes(MiB)  # the zero grains hid the parent's data


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    subformat=st.sampled_from(["monolithicSparse", "streamOptimized", "monolithicFlat"]),
    writes=st.lists(
        st.tuples(st.integers(1, 255), st.integers(0, 16 * MiB - 1), st.integers(1, 300_000)), min_size=1, max_size=6
    ),
)
def test_random_guest_writes_round_trip(tmp_path_factory, subformat, writes):
    d = tmp_path_factory.mktemp("vmdk")
    size = 16 * MiB
    writes = [(p, off, min(n, size - off)) for p, off, n in writes]
    img = make_vmdk(d, subformat, size, writes)
    ref = reference_raw(img, d / "ref.raw")
    repo = str(d / "repo")
    _mover.init_repository(repo, chunk_size=256 * 1024)
    s = _mover.BackupSession(repo, "vm")
    s.add_disk(str(img), "scsi0:0")
    bid = s.commit().id
    out = d / "out.raw"
    _mover.restore_disk(repo, bid, str(out))
    assert out.read_bytes() == ref.read_bytes()
    vmdk = d / "out.vmdk"
    _mover.restore_disk(repo, bid, str(vmdk), format="vmdk")
    run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(vmdk), str(ref))


def test_delta_disk_without_its_parent_names_the_transport(cli, tmp_path):
    base, child = make_chain(tmp_path)
    base.rename(tmp_path / "elsewhere.vmdk")
    p = cli.run("backup-disk", "--vm", "vm", str(child), expect=2)
    line = one_line(p.stderr)
    assert "base.vmdk" in line and "hot-add or NBD" in line


def test_delta_disk_whose_parent_changed_is_refused(cli, tmp_path):
    base, child = make_chain(tmp_path)
    qemu_write(base, [(0x99, 0, 512)])  # qemu gives the parent a new CID
    p = cli.run("backup-disk", "--vm", "vm", str(child), expect=2)
    assert "changed" in one_line(p.stderr)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def sparse_image(tmp_path: Path) -> Path:
    img = make_vmdk(tmp_path, "monolithicSparse", SMALL, WRITES)
    return img


def header_field(img: Path, offset: int, fmt: str):
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def first_gt_offset(img: Path) -> int:
    gd = header_field(img, 56, "<Q")
    return header_field(img, gd * 512, "<I") * 512


def corrupt_truncated(img: Path) -> None:
    os.truncate(img, os.path.getsize(img) // 3)


def corrupt_grain_past_eof(img: Path) -> None:
    poke(img, first_gt_offset(img), struct.pack("<I", 0x7FFFFFF0))


def corrupt_capacity(img: Path) -> None:
    poke(img, 12, struct.pack("<Q", (1 << 64) - 2))


def corrupt_capacity_huge_but_valid(img: Path) -> None:
    poke(img, 12, struct.pack("<Q", 1 << 50))  # the directory would not fit the file


def corrupt_grain_size(img: Path) -> None:
    poke(img, 20, struct.pack("<Q", 3))


def corrupt_gd_offset(img: Path) -> None:
    poke(img, 56, struct.pack("<Q", (1 << 64) - 1))  # GD_AT_END without a footer


def corrupt_descriptor_extent(img: Path) -> None:
    text = img.read_text().replace('SPARSE "', 'SPARSE "missing-')
    img.write_text(text)


def corrupt_descriptor_escape(img: Path) -> None:
    img.write_text(img.read_text().replace('SPARSE "', 'SPARSE "../'))


def corrupt_descriptor_line(img: Path) -> None:
    img.write_text(re.sub(r"RW (\d+)", r"RW \1x", img.read_text(), count=1))


CORRUPTIONS = [
    ("truncated", corrupt_truncated, "monolithicSparse"),
    ("grain-past-eof", corrupt_grain_past_eof, "monolithicSparse"),
    ("capacity-2^64", corrupt_capacity, "monolithicSparse"),
    ("capacity-huge", corrupt_capacity_huge_but_valid, "monolithicSparse"),
    ("grain-size", corrupt_grain_size, "monolithicSparse"),
    ("gd-at-end-no-footer", corrupt_gd_offset, "monolithicSparse"),
    ("missing-extent-file", corrupt_descriptor_extent, "twoGbMaxExtentSparse"),
    ("extent-outside-directory", corrupt_descriptor_escape, "twoGbMaxExtentSparse"),
    ("malformed-extent-line", corrupt_descriptor_line, "twoGbMaxExtentSparse"),
]


@pytest.mark.parametrize("name,corrupt,subformat", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_image_fails_with_one_clear_line(cli, tmp_path, name, corrupt, subformat):
    img = make_vmdk(tmp_path, subformat, SMALL, WRITES)
    corrupt(img)
    p = cli.run("backup-disk", "--vm", "vm", str(img), expect=None, timeout=60)
    assert p.returncode in (1, 2), p.stderr
    line = one_line(p.stderr)
    assert "disk" in line, line  # names the file


def test_corrupt_compressed_grain_fails_with_one_clear_line(cli, tmp_path):
    img = make_vmdk(tmp_path, "streamOptimized", SMALL, WRITES)
    # Every grain's marker is lba (8 bytes) + size (4); garble the first
    # grain's deflate stream, keeping the marker.
    gd = header_field(img, 56, "<Q")
    gt = header_field(img, gd * 512, "<I") * 512
    grain = header_field(img, gt, "<I") * 512
    poke(img, grain + 12, b"\xff" * 64)
    p = cli.run("backup-disk", "--vm", "vm", str(img), expect=None)
    assert p.returncode in (1, 2)
    assert "grain" in one_line(p.stderr)
