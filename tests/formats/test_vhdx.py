"""VHDX and VHD sources and the VHDX restore target, against the real tools.

Images come from `qemu-img create` and are filled by `qemu-io` at scattered,
partly unaligned offsets; what qemu can not make (differencing VHDX and VHD,
a VHDX with a non-empty log, 4096-byte logical sectors) the test builds with
the small writers below, written from the specifications. Every backup must
restore to exactly what `qemu-img convert -O raw` gives (or, for images
qemu can not read, to the bytes the test put there).
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import MiB, sha256

GiB = 1024 * MiB

# (pattern, offset, length): scattered, some unaligned, one touching the end.
WRITES = [
    (1, 0, 4096),
    (2, 5 * MiB + 123, 300_000),
    (3, 17 * MiB - 1000, 2000),
    (4, 40 * MiB + 511, 1),
    (5, 64 * MiB - 4096, 4096),
]


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def fill(path: Path, fmt: str, writes=WRITES) -> None:
    args = []
    for pat, off, n in writes:
        args += ["-c", f"write -P {pat} {off} {n}"]
    run("qemu-io", "-f", fmt, *args, str(path))


def apply(raw: bytearray, writes) -> bytearray:
    for pat, off, n in writes:
        raw[off : off + n] = bytes([pat]) * n if isinstance(pat, int) else pat
    return raw


def to_raw(path: Path, fmt: str, out: Path) -> Path:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out


def same(a: Path, b: Path) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)]).returncode == 0


# --- CRC-32C and small writers, from [MS-VHDX] and the VHD specification ----


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def with_crc(b: bytearray, at: int = 4) -> bytearray:
    b[at : at + 4] = b"\0\0\0\0"
    b[at : at + 4] = struct.pack("<I", crc32c(bytes(b)))
    return b


def guid_bytes(u: uuid.UUID) -> bytes:
    return u.bytes_le


def vhdx_headers(path: Path) -> tuple[int, dict]:
    """(offset, fields) of the current header."""
    data = path.read_bytes()[: 192 * 1024]
    best = None
    for off in (64 * 1024, 128 * 1024):
        h = bytearray(data[off : off + 4096])
        crc = struct.unpack_from("<I", h, 4)[0]
        if h[:4] != b"head" or with_crc(bytearray(h))[4:8] != struct.pack("<I", crc):
            continue
        seq = struct.unpack_from("<Q", h, 8)[0]
        f = {
            "seq": seq,
            "data_write": uuid.UUID(bytes_le=bytes(h[32:48])),
            "log_length": struct.unpack_from("<I", h, 68)[0],
            "log_offset": struct.unpack_from("<Q", h, 72)[0],
            "raw": h,
        }
        if best is None or seq > best[1]["seq"]:
            best = (off, f)
    assert best
    return best


def vhdx_regions(path: Path) -> dict:
    with open(path, "rb") as f:
        f.seek(192 * 1024)
        t = f.read(64 * 1024)
    n = struct.unpack_from("<I", t, 8)[0]
    out = {}
    for i in range(n):
        g = uuid.UUID(bytes_le=t[16 + 32 * i : 32 + 32 * i])
        off, length = struct.unpack_from("<QI", t, 32 + 32 * i)
        out[str(g).upper()] = (off, length)
    return out


BAT_GUID = "2DC27766-F623-4200-9D64-115E9BFD4A08"
META_GUID = "8B7CA206-4790-4B9A-B8FE-575F050F886E"


def metadata_item(path: Path, item: str) -> int:
    """File offset of a metadata item's data."""
    moff, _ = vhdx_regions(path)[META_GUID]
    with open(path, "rb") as f:
        f.seek(moff)
        t = f.read(64 * 1024)
    n = struct.unpack_from("<H", t, 10)[0]
    for i in range(n):
        e = t[32 + 32 * i : 64 + 32 * i]
        if str(uuid.UUID(bytes_le=e[:16])).upper() == item:
            return moff + struct.unpack_from("<I", e, 16)[0]
    raise KeyError(item)


def write_differencing_vhdx(
    path: Path, size: int, parent_linkage: uuid.UUID, locator: dict, sectors: dict[int, bytes], block: int = MiB
) -> None:
    """A differencing VHDX (512-byte sectors) whose `sectors` (sector number ->
    512 bytes) are present; all other sectors come from the parent."""
    ratio = (1 << 23) * 512 // block
    blocks = -(-size // block)
    chunks = -(-blocks // ratio)
    bat = [0] * (chunks * (ratio + 1))
    bat_len = max(1, -(-len(bat) * 8 // MiB)) * MiB
    nxt = 3 * MiB + bat_len
    body = {}
    bitmaps: dict[int, bytearray] = {}
    for s, data in sorted(sectors.items()):
        b = s * 512 // block
        i = b + b // ratio
        if not bat[i]:
            bat[i] = 7 | (nxt // MiB) << 20
            nxt += block
        body[(bat[i] >> 20) * MiB + s * 512 % block] = data
        bits = bitmaps.setdefault(b // ratio, bytearray(MiB))
        bit = s % (ratio * block // 512)
        bits[bit // 8] |= 1 << (bit % 8)
    for c, bits in bitmaps.items():
        bat[c * (ratio + 1) + ratio] = 6 | (nxt // MiB) << 20
        body[nxt] = bytes(bits)
        nxt += MiB
    kv = {"parent_linkage": f"{{{str(parent_linkage).upper()}}}", **locator}
    loc = bytearray(guid_bytes(uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913"))) + struct.pack("<HH", 0, len(kv))
    strings = bytearray()
    base = 20 + 12 * len(kv)
    for k, v in kv.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        loc += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(kb), len(kb), len(vb))
        strings += kb + vb
    loc += strings
    items = [
        ("CAA16737-FA36-4D43-B3B6-33F0AA44E76B", struct.pack("<II", block, 2), 4),
        ("2FA54224-CD1B-4876-B211-5DBED83BF4B8", struct.pack("<Q", size), 6),
        ("BECA12AB-B2E6-4523-93EF-C309E000C746", uuid.uuid4().bytes_le, 6),
        ("8141BF1D-A96F-4709-BA47-F233A8FAAB5F", struct.pack("<I", 512), 6),
        ("CDA348C7-445D-4471-9CC9-E9885251C556", struct.pack("<I", 4096), 6),
        ("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C", bytes(loc), 4),
    ]
    meta = bytearray(MiB)
    meta[:8] = b"metadata"
    struct.pack_into("<H", meta, 10, len(items))
    off = 64 * 1024
    for i, (g, data, flags) in enumerate(items):
        struct.pack_into("<16sIII", meta, 32 + 32 * i, uuid.UUID(g).bytes_le, off, len(data), flags)
        meta[off : off + len(data)] = data
        off += -(-len(data) // 8) * 8
    regions = bytearray(64 * 1024)
    regions[:4] = b"regi"
    struct.pack_into("<I", regions, 8, 2)
    struct.pack_into("<16sQII", regions, 16, uuid.UUID(BAT_GUID).bytes_le, 3 * MiB, bat_len, 1)
    struct.pack_into("<16sQII", regions, 48, uuid.UUID(META_GUID).bytes_le, 2 * MiB, MiB, 1)
    with_crc(regions)
    with open(path, "wb") as f:
        f.truncate(nxt)
        f.write(b"vhdxfile")
        for seq, at in ((1, 64 * 1024), (2, 128 * 1024)):
            h = bytearray(4096)
            h[:4] = b"head"
            struct.pack_into(
                "<Q16s16s16sHHIQ", h, 8, seq, uuid.uuid4().bytes_le, uuid.uuid4().bytes_le, bytes(16), 0, 1, MiB, MiB
            )
            f.seek(at)
            f.write(with_crc(h))
        for at in (192 * 1024, 256 * 1024):
            f.seek(at)
            f.write(regions)
        f.seek(2 * MiB)
        f.write(meta)
        f.seek(3 * MiB)
        f.write(b"".join(struct.pack("<Q", e) for e in bat))
        for at, data in body.items():
            f.seek(at)
            f.write(data)


def vhd_checksum(b: bytes, at: int) -> int:
    return ~(sum(b[:at]) + sum(b[at + 4 :])) & 0xFFFFFFFF


def vhd_footer(path: Path) -> bytearray:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return bytearray(f.read(512))


def write_differencing_vhd(
    path: Path,
    parent: Path,
    sectors: dict[int, bytes],
    relative: str | None,
    absolute: str | None,
    block: int = 2 * MiB,
) -> None:
    pf = vhd_footer(parent)
    size = struct.unpack_from(">Q", pf, 48)[0]
    footer = bytearray(pf)
    struct.pack_into(">Q", footer, 16, 512)  # dynamic header right after the footer copy
    struct.pack_into(">I", footer, 60, 4)
    footer[68:84] = uuid.uuid4().bytes
    struct.pack_into(">I", footer, 64, vhd_checksum(footer, 64))
    entries = -(-size // block)
    table = 1536
    loc_at = table + -(-entries * 4 // 512) * 512
    locs = []
    for code, text in ((b"W2ru", relative), (b"W2ku", absolute)):
        if text is not None:
            data = text.encode("utf-16-le")
            locs.append((code, loc_at, data))
            loc_at += -(-len(data) // 512) * 512 or 512
    nxt = loc_at
    bmp = -(-(block // 512 // 8) // 512) * 512
    bat = [0xFFFFFFFF] * entries
    blocks: dict[int, bytearray] = {}
    for s, data in sectors.items():
        b = s * 512 // block
        if bat[b] == 0xFFFFFFFF:
            bat[b] = nxt // 512
            nxt += bmp + block
            blocks[b] = bytearray(bmp + block)
        within = s * 512 % block
        blocks[b][within // 512 // 8] |= 0x80 >> (within // 512 % 8)
        blocks[b][bmp + within : bmp + within + 512] = data
    h = bytearray(1024)
    h[:8] = b"cxsparse"
    struct.pack_into(">QQIII", h, 8, 0xFFFFFFFFFFFFFFFF, table, 0x00010000, entries, block)
    h[40:56] = pf[68:84]
    h[64 : 64 + 2 * len(parent.name)] = parent.name.encode("utf-16-be")
    for i, (code, at, data) in enumerate(locs):
        struct.pack_into(">4sIII Q", h, 576 + 24 * i, code, -(-len(data) // 512), len(data), 0, at)
    struct.pack_into(">I", h, 36, vhd_checksum(h, 36))
    with open(path, "wb") as f:
        f.write(footer)
        f.write(h)
        f.seek(table)
        f.write(b"".join(struct.pack(">I", e) for e in bat))
        for _code, at, data in locs:
            f.seek(at)
            f.write(data)
        for b, data in blocks.items():
            f.seek(bat[b] * 512)
            f.write(data)
        f.seek(nxt)
        f.write(footer)


# --- the conformance suite ---------------------------------------------------

QEMU_IMAGES = {
    "vhdx-dynamic-1M": ("vhdx", "vhdx:dynamic", ["-o", "subformat=dynamic,block_size=1M"], 64 * MiB),
    "vhdx-dynamic-8M": ("vhdx", "vhdx:dynamic", ["-o", "subformat=dynamic,block_size=8M"], 64 * MiB),
    "vhdx-dynamic-32M": ("vhdx", "vhdx:dynamic", ["-o", "subformat=dynamic,block_size=32M"], 256 * MiB),
    "vhdx-dynamic-1M-5G": ("vhdx", "vhdx:dynamic", ["-o", "subformat=dynamic,block_size=1M"], 5 * GiB),
    "vhdx-fixed-8M": ("vhdx", "vhdx:fixed", ["-o", "subformat=fixed,block_size=8M"], 64 * MiB),
    "vhd-dynamic": ("vpc", "vhd:dynamic", ["-o", "subformat=dynamic"], 64 * MiB),
    "vhd-fixed": ("vpc", "vhd:fixed", ["-o", "subformat=fixed"], 64 * MiB),
}


@pytest.mark.parametrize("name", list(QEMU_IMAGES))
def test_backup_of_qemu_image_restores_to_qemus_raw(cli, tmp_path, name):
    fmt, kind, opts, size = QEMU_IMAGES[name]
    img = tmp_path / f"disk.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, *opts, str(img), str(size))
    writes = WRITES + ([(6, 4 * GiB + 3 * MiB + 7, 5000)] if size > 4 * GiB else [])
    fill(img, fmt, writes)
    want = to_raw(img, fmt, tmp_path / "want.raw")
    before = sha256(img)
    b = cli.json("backup-disk", "--vm", "v", "--disk", "d", str(img))
    assert b["disk_size"] == os.path.getsize(want)
    assert f'"source_format":"{kind}"'.encode() in (cli.repo / "backups" / f"{b['id']}.tib").read_bytes()
    if "dynamic" in kind:
        # Only the blocks the writes touched are read.
        block = (
            {"1M": MiB, "8M": 8 * MiB, "32M": 32 * MiB}.get(name.split("-")[2], 2 * MiB) if fmt == "vhdx" else 2 * MiB
        )
        touched = {o // block for _, off, n in writes for o in range(off, off + n, 4096)} | {
            (off + n - 1) // block for _, off, n in writes
        }
        assert b["bytes_read"] <= len(touched) * block < b["disk_size"]
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert same(out, want)
    assert sha256(img) == before  # the source is never written


def test_source_format_is_recorded(cli, tmp_path):
    img = tmp_path / "d.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(img), "8M")
    b = cli.json("backup-disk", "--vm", "v", str(img))
    manifest = (cli.repo / "backups" / f"{b['id']}.tib").read_bytes()
    assert b"vhdx:dynamic" in manifest


def test_vhdx_with_4096_byte_logical_sectors(cli, tmp_path):
    # qemu-img can neither choose nor read 4096-byte logical sectors; with
    # fewer blocks than a chunk the BAT layout does not depend on the sector
    # size, so patching the metadata item gives a valid 4096-byte-sector
    # VHDX holding the same bytes qemu read before the patch.
    img = tmp_path / "d4k.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), str(64 * MiB))
    fill(img, "vhdx", [(1, 0, 4096), (2, 9 * MiB + 4096, 8192), (3, 64 * MiB - 4096, 4096)])
    want = to_raw(img, "vhdx", tmp_path / "want.raw")
    at = metadata_item(img, "8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<I", 4096))
    b = cli.json("backup-disk", "--vm", "v", str(img))
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert same(out, want)


@pytest.mark.parametrize("src_fmt", ["vhdx", "vpc"])
def test_restore_as_vhdx_passes_qemu_check_and_compare(cli, tmp_path, src_fmt):
    img = tmp_path / f"d.{src_fmt}"
    run("qemu-img", "create", "-q", "-f", src_fmt, str(img), str(64 * MiB))
    fill(img, src_fmt)
    want = to_raw(img, src_fmt, tmp_path / "want.raw")
    b = cli.json("backup-disk", "--vm", "v", str(img))
    out = tmp_path / "out.vhdx"
    r = cli.json("restore-disk", "--format", "vhdx", b["id"], str(out))
    assert r["format"] == "vhdx"
    run("qemu-img", "check", "-q", "-f", "vhdx", str(out))
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(out), str(want)]).returncode == 0
    # Only blocks with data are stored: far smaller than the disk.
    assert os.stat(out).st_blocks * 512 < 64 * MiB
    # And our own reader reads it back.
    b2 = cli.json("backup-disk", "--vm", "v2", str(out))
    out2 = tmp_path / "again.raw"
    cli.json("restore-disk", b2["id"], str(out2))
    assert same(out2, want)


def test_differencing_vhdx_chain(cli, tmp_path):
    """base (qemu) <- child (relative locator) <- grandchild (only a Windows
    absolute path, found by its file name beside the child)."""
    base = tmp_path / "base.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(base), str(64 * MiB))
    fill(base, "vhdx")
    want = bytearray(to_raw(base, "vhdx", tmp_path / "base.raw").read_bytes())
    s1 = {10: b"\x11" * 512, 11: b"\x12" * 512, (5 * MiB + 512) // 512: b"\x13" * 512, (63 * MiB) // 512: b"\x14" * 512}
    s2 = {11: b"\x21" * 512, (30 * MiB) // 512: b"\x22" * 512}
    child, grandchild = tmp_path / "vm_1.avhdx", tmp_path / "vm_2.avhdx"
    write_differencing_vhdx(
        child,
        64 * MiB,
        vhdx_headers(base)[1]["data_write"],
        {"relative_path": ".\\base.vhdx", "absolute_win32_path": "D:\\gone\\base.vhdx"},
        s1,
    )
    write_differencing_vhdx(
        grandchild,
        64 * MiB,
        vhdx_headers(child)[1]["data_write"],
        {"absolute_win32_path": "C:\\ProgramData\\Hyper-V\\vm_1.avhdx"},
        s2,
    )
    for s in (s1, s2):
        for sec, data in s.items():
            want[sec * 512 : sec * 512 + 512] = data
    b = cli.json("backup-disk", "--vm", "v", str(grandchild))
    assert b["bytes_read"] < 64 * MiB // 2
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert out.read_bytes() == bytes(want)


def test_differencing_vhdx_with_wrong_parent_linkage_is_refused(cli, tmp_path):
    base = tmp_path / "base.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(base), str(8 * MiB))
    child = tmp_path / "c.avhdx"
    write_differencing_vhdx(child, 8 * MiB, uuid.uuid4(), {"relative_path": "base.vhdx"}, {0: b"x" * 512})
    p = cli.run("backup-disk", "--vm", "v", str(child), expect=2)
    assert "is not the parent" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_differencing_vhd_chain(cli, tmp_path):
    base = tmp_path / "base.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(base), str(64 * MiB))
    fill(base, "vpc", WRITES[:-1])
    want = bytearray(to_raw(base, "vpc", tmp_path / "base.raw").read_bytes())
    s1 = {3: b"\x31" * 512, 4096 + 5: b"\x32" * 512, (20 * MiB) // 512: b"\x33" * 512}
    s2 = {4: b"\x41" * 512, 3: b"\x42" * 512}
    c1, c2 = tmp_path / "c1.vhd", tmp_path / "c2.vhd"
    write_differencing_vhd(c1, base, s1, ".\\base.vhd", "C:\\VMs\\base.vhd")
    write_differencing_vhd(c2, c1, s2, None, "E:\\elsewhere\\c1.vhd")
    for s in (s1, s2):
        for sec, data in s.items():
            want[sec * 512 : sec * 512 + 512] = data
    b = cli.json("backup-disk", "--vm", "v", str(c2))
    assert b["disk_size"] == len(want)
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert out.read_bytes() == bytes(want)


def test_vhdx_log_is_replayed_in_memory_and_the_file_untouched(cli, tmp_path):
    img = tmp_path / "dirty.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), str(16 * MiB))
    fill(img, "vhdx", [(7, 0, 2 * MiB)])
    want = bytearray(to_raw(img, "vhdx", tmp_path / "want.raw").read_bytes())
    hoff, h = vhdx_headers(img)
    bat_off, _ = vhdx_regions(img)[BAT_GUID]
    with open(img, "rb") as f:
        f.seek(bat_off)
        e0 = struct.unpack("<Q", f.read(8))[0]
    assert e0 & 7 == 6
    block0 = (e0 >> 20) * MiB
    # One log entry: write 4 KiB at block 0 + 8 KiB, zero 8 KiB at block 0 + 64 KiB.
    log_guid, seq = uuid.uuid4(), 77
    sector = bytes((i * 5 + 1) & 0xFF for i in range(4096))
    entry = bytearray(8192)
    struct.pack_into(
        "<4sIIIQII16sQQ",
        entry,
        0,
        b"loge",
        0,
        8192,
        0,
        seq,
        2,
        0,
        log_guid.bytes_le,
        os.path.getsize(img),
        os.path.getsize(img),
    )
    struct.pack_into("<4sIQQQ", entry, 64, b"zero", 0, 8192, block0 + 65536, seq)
    struct.pack_into("<4s4s8sQQ", entry, 96, b"desc", sector[-4:], sector[:8], block0 + 8192, seq)
    entry[4096:8192] = b"data" + struct.pack("<I", seq >> 32) + sector[8:-4] + struct.pack("<I", seq & 0xFFFFFFFF)
    with_crc(entry)
    hdr = bytearray(h["raw"])
    struct.pack_into("<Q", hdr, 8, h["seq"] + 1)
    hdr[48:64] = log_guid.bytes_le
    with_crc(hdr)
    other = 128 * 1024 if hoff == 64 * 1024 else 64 * 1024
    with open(img, "r+b") as f:
        f.seek(h["log_offset"])
        f.write(entry)
        f.seek(other)
        f.write(hdr)
    want[8192:12288] = sector
    want[65536 : 65536 + 8192] = bytes(8192)
    before = sha256(img)
    b = cli.json("backup-disk", "--vm", "v", str(img))
    assert sha256(img) == before
    out = tmp_path / "out.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert out.read_bytes() == bytes(want)


# --- hostile and corrupt input -----------------------------------------------


def _corrupt_headers(img: Path) -> None:
    with open(img, "r+b") as f:
        for at in (64 * 1024 + 300, 128 * 1024 + 300):
            f.seek(at)
            f.write(b"\x01")


def _bat_past_eof(img: Path) -> None:
    bat_off, _ = vhdx_regions(img)[BAT_GUID]
    with open(img, "r+b") as f:
        f.seek(bat_off)
        f.write(struct.pack("<Q", 6 | (1 << 40) << 20))


def _absurd_size(img: Path) -> None:
    at = metadata_item(img, "2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<Q", 2**64 - 512))


def _vhd_bat_past_eof(img: Path) -> None:
    with open(img, "r+b") as f:
        f.seek(512 + 16)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        f.write(struct.pack(">I", 0x7FFFFFF0))


@pytest.mark.parametrize(
    "fmt,damage,expect",
    [
        ("vhdx", _corrupt_headers, "neither header is valid"),
        ("vhdx", _bat_past_eof, "past the end of the file"),
        ("vhdx", _absurd_size, "virtual disk size"),
        ("vpc", _vhd_bat_past_eof, "past the end of the file"),
    ],
)
def test_corrupt_images_fail_with_one_clear_line(cli, tmp_path, fmt, damage, expect):
    img = tmp_path / f"bad.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, str(img), str(16 * MiB))
    fill(img, fmt, [(1, 0, MiB)])
    damage(img)
    p = cli.run("backup-disk", "--vm", "v", str(img), expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], p.stderr


def test_missing_parent_fails_with_one_clear_line(cli, tmp_path):
    base = tmp_path / "base.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(base), str(8 * MiB))
    child = tmp_path / "c.avhdx"
    write_differencing_vhdx(
        child, 8 * MiB, vhdx_headers(base)[1]["data_write"], {"relative_path": "base.vhdx"}, {0: b"x" * 512}
    )
    base.unlink()
    p = cli.run("backup-disk", "--vm", "v", str(child), expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not found" in lines[0], p.stderr


def test_raw_disk_ending_in_a_broken_footer_stays_raw(cli, tmp_path):
    """A raw disk whose last sector merely starts with 'conectix' is raw."""
    disk = tmp_path / "raw.img"
    data = bytearray(os.urandom(MiB))
    data[-512:-504] = b"conectix"
    disk.write_bytes(bytes(data))
    b = cli.json("backup-disk", "--vm", "v", str(disk))
    out = tmp_path / "out"
    cli.json("restore-disk", b["id"], str(out))
    assert out.read_bytes() == bytes(data)


def test_a_fifo_in_place_of_a_parent_is_refused(cli, tmp_path):
    """No hang: a parent named inside a child must be a regular file."""
    base = tmp_path / "base.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(base), str(8 * MiB))
    child = tmp_path / "c.avhdx"
    write_differencing_vhdx(
        child, 8 * MiB, vhdx_headers(base)[1]["data_write"], {"relative_path": "base.vhdx"}, {0: b"x" * 512}
    )
    vbase = tmp_path / "base.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(vbase), str(8 * MiB))
    vchild = tmp_path / "c.vhd"
    write_differencing_vhd(vchild, vbase, {0: b"y" * 512}, ".\\base.vhd", None)
    for parent, disk in ((base, child), (vbase, vchild)):
        parent.unlink()
        os.mkfifo(parent)
        p = cli.run("backup-disk", "--vm", "v", str(disk), expect=2, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and ("not a regular file" in lines[0] or "not found" in lines[0]), p.stderr
