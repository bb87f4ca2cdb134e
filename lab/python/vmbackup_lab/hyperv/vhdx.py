"""A minimal writer of differencing VHDX files (what Hyper-V calls .avhdx).

qemu-img cannot create differencing VHDX, so the lab writes them itself, from
Microsoft's "VHDX Format Specification" v1.0: file identifier, two headers
(64 KiB, 128 KiB), two region tables (192 KiB, 256 KiB), an empty log
(1 MiB at 1 MiB; LogGuid zero, so nothing to replay), the metadata region
(2 MiB) with a parent locator, the BAT (3 MiB), then 1 MiB-aligned payload
blocks and sector bitmap blocks. Present sectors come from an overlay file
(a sparse raw image of the whole disk); every other sector reads through to
the parent. 512-byte logical sectors only.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

KiB, MiB = 1024, 1024 * 1024
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
PAYLOAD_PARTIALLY_PRESENT = 7
SB_BLOCK_PRESENT = 6
SECTOR = 512


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_T = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _checksummed(buf: bytearray) -> bytes:
    buf[4:8] = b"\0\0\0\0"
    buf[4:8] = struct.pack("<I", crc32c(bytes(buf)))
    return bytes(buf)


def data_write_guid(path: Path) -> uuid.UUID:
    """The DataWriteGuid of a VHDX's current header (what a child's parent_linkage names)."""
    with open(path, "rb") as f:
        best = None
        for off in (64 * KiB, 128 * KiB):
            f.seek(off)
            h = bytearray(f.read(4 * KiB))
            if h[:4] != b"head" or struct.unpack_from("<I", h, 4)[0] != crc32c(
                bytes(h[:4]) + b"\0\0\0\0" + bytes(h[8:])
            ):
                continue
            seq = struct.unpack_from("<Q", h, 8)[0]
            if best is None or seq > best[0]:
                best = (seq, uuid.UUID(bytes_le=bytes(h[32:48])))
    if best is None:
        raise ValueError(f"{path} has no valid VHDX header")
    return best[1]


def _parent_locator(entries: dict[str, str]) -> bytes:
    head = bytearray(VHDX_PARENT_LOCATOR_TYPE.bytes_le + struct.pack("<HH", 0, len(entries)))
    strings = bytearray()
    base = 20 + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        head += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v))
        strings += k + v
    return bytes(head + strings)


def write_differencing(
    path: Path,
    size: int,
    overlay: Path,
    present: list[tuple[int, int]],
    parent_linkage: uuid.UUID,
    locator: dict[str, str],
    block_size: int = MiB,
) -> None:
    """Write `path` as a differencing VHDX of `size` bytes whose sectors in
    `present` ((offset, length) pairs, 512-aligned) hold `overlay`'s bytes.

    The file is written beside `path` and renamed over it, so a reader sees
    the old or the new file, never half of one."""
    ratio = (1 << 23) * SECTOR // block_size  # payload blocks per sector bitmap block
    blocks = -(-size // block_size)
    chunks = -(-blocks // ratio)
    bat = [0] * (chunks * (ratio + 1))
    bat_bytes = max(1, -(-len(bat) * 8 // MiB)) * MiB
    nxt = 3 * MiB + bat_bytes
    writes: list[tuple[int, int, int]] = []  # (file offset, overlay offset, length)
    bitmaps: dict[int, bytearray] = {}
    for off, length in present:
        if off % SECTOR or length % SECTOR or off + length > size:
            raise ValueError(f"present range {off}+{length} is not sector-aligned inside the disk")
        pos, end = off, off + length
        while pos < end:
            b = pos // block_size
            i = b + b // ratio
            if not bat[i]:
                bat[i] = PAYLOAD_PARTIALLY_PRESENT | (nxt // MiB) << 20
                nxt += block_size
            n = min(end, (b + 1) * block_size) - pos
            writes.append(((bat[i] >> 20) * MiB + pos % block_size, pos, n))
            bits = bitmaps.setdefault(b // ratio, bytearray(MiB))
            first = (pos // SECTOR) % (ratio * block_size // SECTOR)
            for s in range(first, first + n // SECTOR):
                bits[s // 8] |= 1 << (s % 8)
            pos += n
    bitmap_at = {}
    for chunk in sorted(bitmaps):
        bat[chunk * (ratio + 1) + ratio] = SB_BLOCK_PRESENT | (nxt // MiB) << 20
        bitmap_at[chunk] = nxt
        nxt += MiB

    locator_bytes = _parent_locator({"parent_linkage": "{" + str(parent_linkage).upper() + "}", **locator})
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 2), 4),  # flags: HasParent
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
        (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR, struct.pack("<I", SECTOR), 6),
        (PHYSICAL_SECTOR, struct.pack("<I", 4096), 6),
        (PARENT_LOCATOR, locator_bytes, 4),
    ]
    meta = bytearray(64 * KiB)
    meta[:8] = b"metadata"
    struct.pack_into("<H", meta, 10, len(items))
    data = bytearray()
    for i, (guid, payload, flags) in enumerate(items):
        struct.pack_into("<16sIII", meta, 32 + 32 * i, guid.bytes_le, 64 * KiB + len(data), len(payload), flags)
        data += payload + b"\0" * (-len(payload) % 8)
    meta += data
    regions = bytearray(64 * KiB)
    regions[:4] = b"regi"
    struct.pack_into("<I", regions, 8, 2)
    struct.pack_into("<16sQII", regions, 16, BAT_REGION.bytes_le, 3 * MiB, bat_bytes, 1)
    struct.pack_into("<16sQII", regions, 48, METADATA_REGION.bytes_le, 2 * MiB, MiB, 1)
    regions_bytes = _checksummed(regions)

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, open(overlay, "rb") as src:
        f.truncate(nxt)
        f.write(b"vhdxfile" + "vmbackup lab".encode("utf-16-le"))
        data_write = uuid.uuid4().bytes_le
        for seq, at in ((1, 64 * KiB), (2, 128 * KiB)):
            h = bytearray(4 * KiB)
            h[:4] = b"head"
            struct.pack_into("<Q16s16s16sHHIQ", h, 8, seq, uuid.uuid4().bytes_le, data_write, bytes(16), 0, 1, MiB, MiB)
            f.seek(at)
            f.write(_checksummed(h))
        for at in (192 * KiB, 256 * KiB):
            f.seek(at)
            f.write(regions_bytes)
        f.seek(2 * MiB)
        f.write(meta)
        f.seek(3 * MiB)
        f.write(struct.pack(f"<{len(bat)}Q", *bat))
        for at, from_, n in writes:
            src.seek(from_)
            f.seek(at)
            f.write(src.read(n))
        for chunk, at in bitmap_at.items():
            f.seek(at)
            f.write(bitmaps[chunk])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
