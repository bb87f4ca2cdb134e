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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmbackup import _mover
from vmbackup.cli.parsing import parse_size
from vmbackup_lab.diskimage import make_image


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
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmbackup",
                "serve",
                "--repo",
                str(repo),
                "--json",
                backup_id,
                "--socket",
                str(sock),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.uri = json.loads(self.proc.stdout.readline())["uri"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _backup(work: Path, source: str, tag: str, server_pid: int | None = None) -> tuple[float, str, Path, float, float]:
    """Returns (seconds, backup id, repo, our CPU seconds, the server's CPU seconds)."""
    repo = work / f"repo-{tag}"
    shutil.rmtree(repo, ignore_errors=True)
    _mover.init_repository(str(repo))
    s = _mover.BackupSession(str(repo), "bench")
    c0, k0 = _self_cpu(), (_cpu(server_pid) if server_pid else 0.0)
    t = time.perf_counter()
    s.add_disk(source, "disk0")
    elapsed = time.perf_counter() - t
    c1, k1 = _self_cpu(), (_cpu(server_pid) if server_pid else 0.0)
    meta = s.commit()
    return elapsed, meta.id, repo, c1 - c0, k1 - k0


def _nbdcopy(uri: str, server_pid: int) -> tuple[float, float]:
    """Returns (seconds, the server's CPU seconds) for nbdcopy reading the whole export."""
    k0 = _cpu(server_pid)
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - t, _cpu(server_pid) - k0


def run_nbd_benchmark(work: Path, size: int = 2 << 30, repeat: int = 3) -> dict:
    """Runs the NBD benchmark in ``work``; returns medians (seconds) and ratios."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / "bench.img"
    if not image.exists() or image.stat().st_size != size:
        make_image(str(image), size, seed=1)
    sockdir = Path(tempfile.mkdtemp(prefix="vmb-nbd-"))
    times: dict[str, list[float]] = {
        k: [] for k in ("backup_file", "backup_nbd", "nbdcopy_nbdkit_image", "nbdcopy_ours", "nbdcopy_nbdkit_restored")
    }
    cpu: dict[str, list[float]] = {
        k: [] for k in ("backup_file", "backup_nbd_client", "backup_nbd_nbdkit", "serve_ours", "serve_nbdkit_restored")
    }
    kit = _Nbdkit(image, sockdir / "kit.sock")
    try:
        for _i in range(repeat):
            t, _, _, c, _ = _backup(work, str(image), "file")
            times["backup_file"].append(t)
            cpu["backup_file"].append(c)
            t, backup_id, repo, c, k = _backup(work, kit.uri, "nbd", kit.proc.pid)
            times["backup_nbd"].append(t)
            cpu["backup_nbd_client"].append(c)
            cpu["backup_nbd_nbdkit"].append(k)
            times["nbdcopy_nbdkit_image"].append(_nbdcopy(kit.uri, kit.proc.pid)[0])
    finally:
        kit.close()
    restored = work / "restored.raw"
    restored.unlink(missing_ok=True)
    _mover.restore_disk(str(repo), backup_id, str(restored))
    ours = _Serve(repo, backup_id, sockdir / "ours.sock")
    kit2 = _Nbdkit(restored, sockdir / "kit2.sock")
    try:
        for _i in range(repeat):
            t, k = _nbdcopy(ours.uri, ours.proc.pid)
            times["nbdcopy_ours"].append(t)
            cpu["serve_ours"].append(k)
            t, k = _nbdcopy(kit2.uri, kit2.proc.pid)
            times["nbdcopy_nbdkit_restored"].append(t)
            cpu["serve_nbdkit_restored"].append(k)
    finally:
        ours.close()
        kit2.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "repeat": repeat,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        # Where the time goes on a machine whose cores the server shares.
        "median_cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
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
    c = r["median_cpu_seconds"]
    print(
        f"CPU seconds: backup from the file {c['backup_file']:.2f}; through NBD {c['backup_nbd_client']:.2f} "
        f"in the backup + {c['backup_nbd_nbdkit']:.2f} in nbdkit; serving the export: ours "
        f"{c['serve_ours']:.2f}, nbdkit on the restored raw file {c['serve_nbdkit_restored']:.2f}"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
