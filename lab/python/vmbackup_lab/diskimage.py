"""Deterministic disk images that look like a VM's disk, for the demo, the
tests and the benchmark.

Per 1 MiB block, chosen by a seeded generator: about 40% holes (never
written: the file is sparse), 30% compressible text, 20% random data and 10%
copies of an earlier data block (what deduplication should find). The same
seed and size always give the same bytes.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

MiB = 1024 * 1024

# Text: random bytes mapped onto a skewed alphabet (letters, spaces, newlines)
# mixed with phrases that recur, so zstd finds both entropy and matches.
_ALPHABET = b"eeeeeeettttaaaooiinnsshhrrdlcumwfgypbvk    \n\n.,ETAOINSHR0123456789"
_TABLE = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range(256))
_PHRASES = [
    b"Nov 24 21:12:10 host kernel: [ 123.456789] EXT4-fs (sda1): mounted filesystem with ordered data mode\n",
    b'<property name="service.port" value="8443"/>\n',
    b"INFO  [main] org.example.Application - Started Application in 4.2 seconds\n",
    b"/usr/lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/libm.so.6\n",
    b'GET /api/v1/items?page=2 HTTP/1.1" 200 5120 "-" "curl/7.88.1"\n',
]


@dataclass(frozen=True)
class ImageLayout:
    """How many blocks of each kind an image got."""

    blocks: int
    holes: int
    text: int
    random: int
    duplicates: int


def _text_block(rng: random.Random, size: int) -> bytes:
    half = rng.randbytes(size // 2).translate(_TABLE)
    parts = []
    n = 0
    while n < size - len(half):
        p = _PHRASES[rng.randrange(len(_PHRASES))]
        parts.append(p)
        n += len(p)
    body = bytearray(half + b"".join(parts))
    # Interleave in 4 KiB pieces, as files on a filesystem would be.
    out = bytearray()
    for off in range(0, size, 8192):
        out += body[off // 2 : off // 2 + 4096]
        out += body[size // 2 + off // 2 : size // 2 + off // 2 + 4096]
    return bytes(out[:size]).ljust(size, b"\n")


def make_image(path: str, size: int, seed: int = 1, block: int = MiB) -> ImageLayout:
    """Writes a sparse VM-like image of ``size`` bytes to ``path``."""
    rng = random.Random(seed)
    blocks = (size + block - 1) // block
    written: list[int] = []
    counts = {"holes": 0, "text": 0, "random": 0, "duplicates": 0}
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(blocks):
            length = min(block, size - i * block)
            r = rng.random()
            if r < 0.40:
                counts["holes"] += 1
                continue
            if r < 0.70:
                data = _text_block(rng, length)
                counts["text"] += 1
            elif r < 0.90:
                data = rng.randbytes(length)
                counts["random"] += 1
            elif written:
                src = written[rng.randrange(len(written))]
                data = _read_block(path, f, src, block, length)
                counts["duplicates"] += 1
            else:
                data = rng.randbytes(length)
                counts["random"] += 1
            f.seek(i * block)
            f.write(data)
            written.append(i)
    return ImageLayout(blocks=blocks, **counts)


def _read_block(path: str, f, index: int, block: int, length: int) -> bytes:
    f.flush()
    with open(path, "rb") as r:
        r.seek(index * block)
        data = r.read(length)
    return data.ljust(length, b"\0")


def rewrite_blocks(path: str, fraction: float, seed: int = 2, block: int = MiB) -> list[dict]:
    """Overwrites ``fraction`` of the image's blocks with new random data, as
    guest writes would; returns the changed areas in QueryChangedDiskAreas
    form (``[{"start": N, "length": N}, ...]``, sorted)."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    blocks = (size + block - 1) // block
    chosen = sorted(rng.sample(range(blocks), max(1, int(blocks * fraction))))
    with open(path, "r+b") as f:
        for i in chosen:
            length = min(block, size - i * block)
            f.seek(i * block)
            f.write(rng.randbytes(length))
    return [{"start": i * block, "length": min(block, size - i * block)} for i in chosen]


def write_extents(path: str, extents: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(extents, f)
