"""NBD benchmark: the transport's overhead and our export's speed.

1. backup of an image through nbdkit (file plugin, unix socket) against
   backup of the file itself (target: at most 25% slower), with nbdcopy
   from the same export to null: as the reference reader;
2. nbdcopy reading our export (`vmbackup serve` of that backup) against
   nbdcopy reading nbdkit serving the restored raw file (target: at least
   0.8x as fast).

Each backup goes into a fresh repository, so every run stores everything.
Run alone: ``python bench/nbd.py [--size 2GiB] [--repeat 3] [--dir bench-output/nbd]``.
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

from vmbackup import _mover
from vmbackup.cli import parse_size
from vmbackup.diskimage import make_image


def _wait_socket(proc: subprocess.Popen, sock: Path) -> None:
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.args}")
        time.sleep(0.05)


class _Nbdkit:
    def __init__(self, image: Path, sock: Path):
        self.sock = sock
        self.proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "file", str(image)])
        _wait_socket(self.proc, sock)
        self.uri = f"nbd+unix:///?socket={sock}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class _Serve:
    def __init__(self, repo: Path, backup_id: str, sock: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "vmbackup", "serve", "--repo", str(repo), "--json",
                                      backup_id, "--socket", str(sock)], stdout=subprocess.PIPE, text=True)
        self.uri = json.loads(self.proc.stdout.readline())["uri"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _backup(work: Path, source: str, tag: str) -> tuple[float, str, Path]:
    repo = work / f"repo-{tag}"
    shutil.rmtree(repo, ignore_errors=True)
    _mover.init_repository(str(repo))
    s = _mover.BackupSession(str(repo), "bench")
    t = time.perf_counter()
    s.add_disk(source, "disk0")
    elapsed = time.perf_counter() - t
    meta = json.loads(s.commit())
    return elapsed, meta["id"], repo


def _nbdcopy(uri: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - t


def run_nbd_benchmark(work: Path, size: int = 2 << 30, repeat: int = 3) -> dict:
    """Runs the NBD benchmark in ``work``; returns medians (seconds) and ratios."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / "bench.img"
    if not image.exists() or image.stat().st_size != size:
        make_image(str(image), size, seed=1)
    sockdir = Path(tempfile.mkdtemp(prefix="vmb-nbd-"))
    times: dict[str, list[float]] = {k: [] for k in ("backup_file", "backup_nbd", "nbdcopy_nbdkit_image",
                                                     "nbdcopy_ours", "nbdcopy_nbdkit_restored")}
    kit = _Nbdkit(image, sockdir / "kit.sock")
    try:
        for i in range(repeat):
            times["backup_file"].append(_backup(work, str(image), "file")[0])
            t, backup_id, repo = _backup(work, kit.uri, "nbd")
            times["backup_nbd"].append(t)
            times["nbdcopy_nbdkit_image"].append(_nbdcopy(kit.uri))
    finally:
        kit.close()
    restored = work / "restored.raw"
    restored.unlink(missing_ok=True)
    _mover.restore_disk(str(repo), backup_id, str(restored))
    ours = _Serve(repo, backup_id, sockdir / "ours.sock")
    kit2 = _Nbdkit(restored, sockdir / "kit2.sock")
    try:
        for i in range(repeat):
            times["nbdcopy_ours"].append(_nbdcopy(ours.uri))
            times["nbdcopy_nbdkit_restored"].append(_nbdcopy(kit2.uri))
    finally:
        ours.close()
        kit2.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "repeat": repeat,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "nbd_overhead_vs_file": round(med["backup_nbd"] / med["backup_file"] - 1, 3),
        "ours_speed_vs_nbdkit": round(med["nbdcopy_nbdkit_restored"] / med["nbdcopy_ours"], 3),
        "targets": {"nbd_overhead_vs_file": "<= 0.25", "ours_speed_vs_nbdkit": ">= 0.8"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="bench-output/nbd")
    args = ap.parse_args()
    r = run_nbd_benchmark(Path(args.dir), parse_size(args.size), args.repeat)
    for k, v in r["median_seconds"].items():
        print(f"{k:<26} {v:8.3f} s  ({r['size'] / v / 2**20:8.0f} MiB/s of disk)")
    print(f"NBD transport overhead over the file: {100 * r['nbd_overhead_vs_file']:+.1f}% (target <= +25%)")
    print(f"our export read by nbdcopy: {r['ours_speed_vs_nbdkit']:.2f}x nbdkit's speed (target >= 0.8x)")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
