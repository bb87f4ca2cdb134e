#!/usr/bin/env python3
"""Restore benchmark: each way the mover writes a disk back, against the
durable write floor of the same bytes, measured in the same run.

A deterministic VM-like image (bench/run.py's: about 40% holes, 30%
compressible text, 20% random, 10% duplicated 1 MiB blocks) is backed up
once, then restored (each a median of --runs):

  (a) blank     into an existing file that reads as zeros (a new thin disk,
                what hot-add gives): ``existing=True, blank=True``;
  (b) raw       ``restore-disk`` to a new raw file (sparse, renamed at the end);
  (c) vhdx      to a new dynamic VHDX;
  (d) compare   in place, into a copy of the disk with a few MiB changed:
                ``existing=True, compare=True`` (reads the whole target);
  (e) extents   the same, told the changed areas (what CBT gives):
                ``existing=True, extents=[...]``.

The floor of each is ``dd bs=1M conv=fsync`` of as many bytes as that
restore wrote (counted from its result; for (b) and (c) the file's
allocated bytes), from memory into a new file in the same directory, timed
right after it: the machine is shared and its virtual disk is slower to
allocate new blocks than to overwrite, so only a floor of the same minute is
comparable. Every restore ends with an fsync, as dd does. The ratio is taken
per run, then the median. The issue's target: (a) within 1.2x of its floor.

Usage: ``make bench-restore`` or ``bench/restore.py [--size 2GiB] [--runs 3]
[--dir DIR] [--modes a,b,c,d,e]``. Writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab" / "python"))
from vmbackup import _mover  # noqa: E402
from vmbackup.cli.output import fmt_bytes  # noqa: E402
from vmbackup.cli.parsing import parse_size  # noqa: E402
from vmbackup_lab.diskimage import make_image  # noqa: E402

MiB = 1 << 20
CHANGED_BLOCKS = 8  # 1 MiB blocks rewritten before the in-place restores ("a few MiB")


def settle() -> None:
    """Flushes what earlier steps left dirty, so no step pays for another's writeback."""
    subprocess.run(["sync"], check=True)


def write_floor(payload: Path, nbytes: int, target: Path) -> float:
    """Seconds for `dd bs=1M conv=fsync` of ``nbytes`` of ``payload`` into a new file ``target``."""
    settle()
    t = time.perf_counter()
    subprocess.run(
        ["dd", f"if={payload}", f"of={target}", "bs=1M", f"count={nbytes}", "iflag=count_bytes", "conv=fsync"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dt = time.perf_counter() - t
    target.unlink()
    return dt


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def change_blocks(path: Path, seed: int) -> list[tuple[int, int]]:
    """Rewrites CHANGED_BLOCKS 1 MiB blocks of ``path`` (as a guest would after the point)."""
    size = path.stat().st_size
    rnd = __import__("random").Random(seed)
    blocks = sorted(rnd.sample(range(size // MiB), CHANGED_BLOCKS))
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * MiB)
            f.write(rnd.randbytes(MiB))
        os.fsync(f.fileno())
    return [(b * MiB, MiB) for b in blocks]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="bench-output/restore", help="work directory (default: %(default)s)")
    ap.add_argument("--modes", default="a,b,c,d,e", help="which restores (default: %(default)s)")
    args = ap.parse_args()
    size = parse_size(args.size)
    modes = args.modes.split(",")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", file=sys.stderr)

    image = work / "disk.img"
    if not (image.exists() and image.stat().st_size == size):
        print(f"generating a {fmt_bytes(size)} image ...", file=sys.stderr)
        make_image(str(image), size, seed=2026)
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    _mover.init_repository(str(repo))
    session = _mover.BackupSession(str(repo), "bench")
    session.add_disk(str(image), "scsi0:0")
    point = session.commit().id

    # dd's input: as many bytes as any restore writes, from memory when /dev/shm exists.
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    payload = Path(tempfile.mkstemp(dir=shm, prefix="vmbackup-bench-restore-")[1])
    with open(image, "rb") as src, open(payload, "wb") as out:
        shutil.copyfileobj(src, out, 16 * MiB)

    rows: dict[str, list[tuple[float, int, float]]] = {m: [] for m in modes}
    out = work / "out"
    floor_file = work / "floor.bin"
    try:
        for run in range(args.runs):
            for mode in modes:
                for p in (out, out.with_suffix(".vhdx")):
                    p.unlink(missing_ok=True)
                kw: dict = {}
                target = out
                if mode == "a":
                    with open(out, "wb") as f:
                        f.truncate(size)  # a new thin disk: reads as zeros
                    kw = dict(existing=True, blank=True)
                elif mode == "c":
                    target = out.with_suffix(".vhdx")
                    kw = dict(format="vhdx")
                elif mode in ("d", "e"):
                    subprocess.run(["cp", "--sparse=always", str(image), str(out)], check=True)
                    changed = change_blocks(out, seed=run)
                    kw = dict(existing=True, compare=True) if mode == "d" else dict(existing=True, extents=changed)
                settle()
                t = time.perf_counter()
                r = _mover.restore_disk(str(repo), point, str(target), **kw)
                dt = time.perf_counter() - t
                nbytes = allocated(target) if mode in ("b", "c") else r.bytes_written
                floor = write_floor(payload, nbytes, floor_file)
                rows[mode].append((dt, nbytes, floor))
                if mode in ("d", "e"):
                    with open(out, "rb") as a, open(image, "rb") as b:
                        if a.read() != b.read():
                            raise SystemExit(f"restore {mode} did not give back the point")
    finally:
        payload.unlink(missing_ok=True)
        for p in (out, out.with_suffix(".vhdx"), floor_file):
            p.unlink(missing_ok=True)

    names = {
        "a": "(a) existing+blank",
        "b": "(b) new raw file",
        "c": "(c) vhdx",
        "d": "(d) in place, compare",
        "e": "(e) in place, extents",
    }
    print(f"restore of a {fmt_bytes(size)} VM-like disk in {work} (median of {args.runs})")
    print(f"{'':26} {'seconds':>8} {'written':>10} {'MB/s':>8} {'floor s':>8} {'ratio':>6}")
    results = {}
    for mode, rs in rows.items():
        dt = statistics.median(r[0] for r in rs)
        nbytes = int(statistics.median(r[1] for r in rs))
        floor = statistics.median(r[2] for r in rs)
        ratio = statistics.median(r[0] / r[2] for r in rs)
        mbs = nbytes / dt / 1e6
        results[mode] = dict(seconds=dt, bytes_written=nbytes, floor_seconds=floor, ratio=ratio, runs=rs)
        print(f"{names[mode]:26} {dt:8.2f} {fmt_bytes(nbytes):>10} {mbs:8.0f} {floor:8.2f} {ratio:6.2f}")
    if "a" in results:
        verdict = "met" if results["a"]["ratio"] <= 1.2 else "NOT met"
        print(f"target (a) within 1.2x of the floor: {verdict} ({results['a']['ratio']:.2f}x)")
    (work / "results.json").write_text(json.dumps(dict(size=size, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
