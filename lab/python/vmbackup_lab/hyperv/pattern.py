"""The guest-write pattern shared with the vSphere lab (docs/lab.md).

A write with seed S puts at disk offset o the byte o - w of the little-endian
64-bit word splitmix64(S * 0x9E3779B97F4A7C15 ^ (w / 8)), w = o & ~7, all
arithmetic modulo 2^64.
"""

from __future__ import annotations

import struct

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    x = (x + GOLDEN) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes a guest write with `seed` puts at [offset, offset+length)."""
    start = offset & ~7
    key = (seed * GOLDEN) & MASK
    words = [splitmix64(key ^ w) for w in range(start // 8, (offset + length + 7) // 8)]
    data = struct.pack(f"<{len(words)}Q", *words)
    return data[offset - start : offset - start + length]
