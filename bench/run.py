#!/usr/bin/env python3
"""vmbackup's benchmark against the peer tools, measured in one run.

A deterministic 2 GiB image that looks like a VM disk (about 40% holes, 30%
compressible text, 20% random, 10% duplicated blocks) and a copy with 5% of
its 1 MiB blocks rewritten (plus the changed-extents file CBT would give).
For each tool: full backup, incremental backup of the changed copy, restore;
wall time (median of --runs), peak RSS of the process, stored size. Warm page
cache for every tool. Usage: `make bench` or `bench/run.py [--size 2GiB]
[--runs 3] [--dir DIR]` (default DIR: a tmpfs, see default_dir). Prints a table, the ratios against the
issue's targets, and writes DIR/results.json.

Beside vmbackup's full backup it measures, in the same run, the floor that
backup cannot beat on this machine and filesystem: the larger of (a) the
mover's own hashing and compression of the image's blocks on all cores with
no I/O (`mover/core/examples/compute_floor.rs`) and (b) `dd bs=1M
conv=fsync` of as many bytes as the backup stored into a new file in the
same directory. The ratio full backup / floor is taken per run, then the
median: the machine is shared, and a floor measured in another minute would
not be comparable.

Also in each run, three full backups of the same image by the mover alone
(one process each, the same driver, a fresh repository each): a version-1
repository (XXH3-128 chunk ids), a new unencrypted one (keyed BLAKE3 ids)
and a new encrypted one (keyed ids, AES-256-GCM). It prints the per-run
ratios' medians against the targets of encryption (at most 1.15x the
unencrypted time) and keyed ids (at most 1.10x the XXH3 time).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab" / "python"))
from vmbackup.cli.output import fmt_bytes  # noqa: E402
from vmbackup.cli.parsing import parse_size  # noqa: E402
from vmbackup_lab.diskimage import make_image, rewrite_blocks, write_extents  # noqa: E402

ENV = dict(
    os.environ,
    RESTIC_PASSWORD="bench",
    BORG_PASSPHRASE="",
    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
)


def run(cmd: list[str], cwd: str | None = None, stdout=subprocess.DEVNULL) -> tuple[float, int, str]:
    """Runs a command; returns (seconds, peak RSS in bytes, stdout)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"benchmark command failed ({p.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return dt, 0, out.decode()


LAST_CPU = [0.0]  # user + system seconds of the last run_rss child


def run_rss(cmd: list[str], cwd: str | None = None) -> tuple[float, int, str]:
    """Like run(), with the peak RSS of exactly this child (wait4); its CPU
    time (user + system) is left in LAST_CPU[0]."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    LAST_CPU[0] = usage.ru_utime + usage.ru_stime
    if p.returncode != 0:
        raise SystemExit(f"benchmark command failed ({p.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return dt, usage.ru_maxrss * 1024, out.decode()


# One full backup by the mover alone, in a fresh process: argv is the
# repository, the disk and the master key in hex (empty: unencrypted).
VARIANT_DRIVER = """
import sys
from vmbackup import _mover
repo, disk, key = sys.argv[1:4]
if key:
    _mover.unlock_repository(repo, bytes.fromhex(key))
s = _mover.BackupSession(repo, "bench")
s.add_disk(disk, "d0")
print(s.commit().id)
"""
# name, how the repository is made
VARIANTS = ("xxh3", "keyed", "encrypted")


def init_variant(name: str, repo: Path) -> str:
    """Creates the variant's repository; returns the master key in hex, or ''."""
    from vmbackup import _mover

    if name == "xxh3":
        _mover.init_legacy_repository(str(repo))
        return ""
    if name == "keyed":
        _mover.init_repository(str(repo))
        return ""
    key = os.urandom(32)
    _mover.init_repository(str(repo), key=key)
    return key.hex()


def settle() -> None:
    """Flushes what earlier steps left dirty, so that no step pays for another's writeback."""
    subprocess.run(["sync"], check=True)


def flush_time(path: Path) -> float:
    """Seconds to make the filesystem holding ``path`` durable (syncfs)."""
    t = time.perf_counter()
    subprocess.run(["sync", "-f", str(path)], check=True)
    return time.perf_counter() - t


ROOT = Path(__file__).resolve().parents[1]


def compute_floor_tool() -> str:
    """Builds (if needed) and returns the compute-floor helper."""
    subprocess.run(
        ["cargo", "build", "-q", "--release", "-p", "vmbackup-mover", "--example", "compute_floor"],
        cwd=ROOT,
        check=True,
    )
    return str(ROOT / "target" / "release" / "examples" / "compute_floor")


def write_floor(stored: Path, target: Path) -> float:
    """Seconds for `dd bs=1M conv=fsync` of ``stored`` into a new file ``target``."""
    settle()
    t = time.perf_counter()
    subprocess.run(
        ["dd", f"if={stored}", f"of={target}", "bs=1M", "conv=fsync"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dt = time.perf_counter() - t
    target.unlink()
    return dt


def concat_chunks(repo: Path, out: Path) -> int:
    """Writes every chunk file of ``repo`` into one file: the bytes a backup stored."""
    n = 0
    with open(out, "wb") as w:
        for f in sorted((repo / "chunks").rglob("*")):
            if f.is_file():
                n += w.write(f.read_bytes())
    return n


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def warm(*paths: Path) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def default_dir(size: int) -> str:
    """Memory, where it fits: this machine's virtual disk is slow to allocate
    new blocks (a restore into fresh space took 3 s where the same restore
    into just-freed space took 0.6 s, for zstd -d as for us), which would
    measure the host's storage, not the tools. `--dir` on a disk measures it
    anyway, and the durable columns then say what a sync costs."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 5 * size:
            return str(shm / "vmbackup-bench")
    except OSError:
        pass
    return "bench-output"


class CopyBench:
    """Copy throughput to a local S3 server: the lab's SeaweedFS (weed mini) in
    the work directory, one copy of the full backup's repository per run."""

    def __init__(self, work: Path):
        from vmbackup_lab import s3server

        self.state = work / "s3-bench"
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        proc, self.record = s3server.spawn(self.state)
        self.proc = proc
        atexit.register(self.close)  # whatever ends the benchmark, the server goes with it
        s3server.wait_ready(self.state, proc, self.record, 60)

    def copy(self, repo: Path, prefix: str) -> tuple[float, int]:
        """(seconds, bytes uploaded) of one copy of ``repo`` (all of it new)."""
        from vmbackup import copy as s3copy
        from vmbackup_lab import s3server

        t = s3copy.Target(s3server.client(self.record), self.record["bucket"], prefix)
        res = s3copy.copy_repository(repo, t, days=1)
        return res.seconds, res.bytes_uploaded

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--dir",
        default=None,
        help="work directory (default: /dev/shm/vmbackup-bench when /dev/shm is a large enough "
        "tmpfs, else bench-output)",
    )
    ap.add_argument("--tools", default="vmbackup,zstd,restic,borg")
    ap.add_argument("--no-copy", action="store_true", help="skip the copy to a local S3 server")
    args = ap.parse_args()
    size = parse_size(args.size)
    tools = args.tools.split(",")
    work = Path(args.dir or default_dir(size)).resolve()
    print(f"work directory: {work}", file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    # The peers' caches go under the work directory, not the user's home.
    ENV.update(RESTIC_CACHE_DIR=str(work / "cache"), BORG_BASE_DIR=str(work / "borg-base"))
    vmbackup = [sys.executable, "-m", "vmbackup"]
    floor_tool = compute_floor_tool() if "vmbackup" in tools else None
    # The stored bytes that dd writes are read from memory where possible, so
    # that (b) measures writing them, not reading them.
    shm = Path("/dev/shm")
    stored_copy = (shm if shm.is_dir() else work) / f"vmbackup-bench-stored-{os.getpid()}.bin"

    base, changed, ext = work / "base.img", work / "changed.img", work / "changed.json"
    if not (base.exists() and changed.exists() and ext.exists() and base.stat().st_size == size):
        print(f"generating {fmt_bytes(size)} images in {work} ...", file=sys.stderr)
        make_image(str(base), size, seed=2026)
        subprocess.run(["cp", "--sparse=always", str(base), str(changed)], check=True)
        write_extents(str(ext), rewrite_blocks(str(changed), 0.05, seed=2027))
    disk = work / "disk.img"  # the path every tool backs up; base or changed is renamed onto it

    def use(which: Path) -> None:
        if disk.exists():
            os.unlink(disk)
        os.link(which, disk)
        warm(disk)

    results: dict[str, dict[str, list[float]]] = {t: {} for t in tools}

    def record(tool: str, what: str, value: float) -> None:
        results[tool].setdefault(what, []).append(value)

    def timed(tool: str, what: str, cmd: list[str], durable: Path, cwd: str | None = None) -> str:
        """Runs one measured step: wall time and peak RSS as the tool runs, and the
        time until its output is on stable storage (the tool plus a syncfs)."""
        settle()
        dt, rss, out = run_rss(cmd, cwd=cwd)
        record(tool, f"{what}_s", dt)
        record(tool, f"{what}_rss", rss)
        record(tool, f"{what}_cpu_s", LAST_CPU[0])
        record(tool, f"{what}_durable_s", dt + flush_time(durable))
        return out

    copier = CopyBench(work) if "vmbackup" in tools and not args.no_copy else None
    for r in range(args.runs):
        print(f"run {r + 1}/{args.runs}", file=sys.stderr)
        for tool in tools:
            repo = work / f"repo-{tool}"
            out = work / f"out-{tool}"
            for p in (repo, out):
                if p.exists():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            use(base)
            if tool == "vmbackup":
                run(vmbackup + ["init", "--repo", str(repo)])
                o = timed(
                    tool,
                    "full",
                    vmbackup + ["backup-disk", "--repo", str(repo), "--vm", "bench", "--json", str(disk)],
                    repo,
                )
                full_id = json.loads(o)["id"]
                record(tool, "stored", du(repo))
                if copier is not None:
                    settle()
                    secs, sent = copier.copy(repo, f"bench-{os.getpid()}-{r}")
                    record(tool, "copy_s", secs)
                    record(tool, "copy_mib_s", sent / 2**20 / secs)
                # The floor of this very run: (a) compute with no I/O, (b) dd of the stored bytes.
                record(tool, "stored_bytes", concat_chunks(repo, stored_copy))
                _, _, fo = run([floor_tool, str(disk)])
                fl = json.loads(fo)
                record(tool, "floor_compute_s", fl["seconds"])
                record(tool, "floor_compute_cpu_s", fl["cpu_seconds"])
                record(tool, "floor_write_s", write_floor(stored_copy, work / "floor-dd.bin"))
                stored_copy.unlink()
                floor = max(results[tool]["floor_compute_s"][-1], results[tool]["floor_write_s"][-1])
                record(tool, "floor_s", floor)
                record(tool, "full_vs_floor", results[tool]["full_s"][-1] / floor)
                record(tool, "full_durable_vs_floor", results[tool]["full_durable_s"][-1] / floor)
                use(changed)
                o = timed(
                    tool,
                    "incr",
                    vmbackup
                    + [
                        "backup-disk",
                        "--repo",
                        str(repo),
                        "--vm",
                        "bench",
                        "--json",
                        "--parent",
                        full_id,
                        "--changed-extents",
                        str(ext),
                        str(disk),
                    ],
                    repo,
                )
                inc_id = json.loads(o)["id"]
                timed(tool, "restore", vmbackup + ["restore-disk", "--repo", str(repo), inc_id, str(out)], work)
                # Ids and encryption, same run, same image; the order turns each run.
                use(base)
                for k in range(len(VARIANTS)):
                    name = VARIANTS[(k + r) % len(VARIANTS)]
                    vrepo = work / f"repo-variant-{name}"
                    if vrepo.exists():
                        shutil.rmtree(vrepo)
                    key = init_variant(name, vrepo)
                    timed(
                        tool,
                        f"variant_{name}",
                        [sys.executable, "-c", VARIANT_DRIVER, str(vrepo), str(disk), key],
                        vrepo,
                    )
                    record(tool, f"variant_{name}_stored", du(vrepo))
                    shutil.rmtree(vrepo)
                v = results[tool]
                record(tool, "encrypted_vs_unencrypted", v["variant_encrypted_s"][-1] / v["variant_keyed_s"][-1])
                record(tool, "keyed_vs_xxh3", v["variant_keyed_s"][-1] / v["variant_xxh3_s"][-1])
                # CPU time (user + system) says the same with less of the machine's load in it.
                record(
                    tool,
                    "encrypted_vs_unencrypted_cpu",
                    v["variant_encrypted_cpu_s"][-1] / v["variant_keyed_cpu_s"][-1],
                )
                record(tool, "keyed_vs_xxh3_cpu", v["variant_keyed_cpu_s"][-1] / v["variant_xxh3_cpu_s"][-1])
            elif tool == "zstd":
                timed(tool, "full", ["zstd", "-1", "-T0", "-q", "-f", str(disk), "-o", str(repo)], work)
                record(tool, "stored", du(repo))
                timed(tool, "restore", ["zstd", "-d", "-T0", "-q", "-f", str(repo), "-o", str(out)], work)
                if r == 0:
                    z3 = work / "zstd3.zst"
                    run(["zstd", "-3", "-T0", "-q", "-f", str(disk), "-o", str(z3)])
                    record(tool, "zstd3_stored", du(z3))
                    z3.unlink()
            elif tool == "restic":
                run(["restic", "-r", str(repo), "init"])
                timed(tool, "full", ["restic", "-r", str(repo), "backup", "--quiet", "disk.img"], repo, cwd=str(work))
                record(tool, "stored", du(repo))
                use(changed)
                timed(tool, "incr", ["restic", "-r", str(repo), "backup", "--quiet", "disk.img"], repo, cwd=str(work))
                timed(tool, "restore", ["restic", "-r", str(repo), "restore", "latest", "--target", str(out)], work)
            elif tool == "borg":
                run(["borg", "init", "-e", "none", str(repo)])
                create = ["borg", "create", "--chunker-params", "fixed,4194304", "-C", "lz4"]
                timed(tool, "full", create + [f"{repo}::full", "disk.img"], repo, cwd=str(work))
                record(tool, "stored", du(repo))
                use(changed)
                timed(tool, "incr", create + [f"{repo}::incr", "disk.img"], repo, cwd=str(work))
                out.mkdir()
                timed(tool, "restore", ["borg", "extract", "--sparse", f"{repo}::incr"], work, cwd=str(out))
            for p in (out,):
                if p.exists():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    if copier is not None:
        copier.close()
    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in results.items()}
    if "copy_s" in med.get("vmbackup", {}):
        m = med["vmbackup"]
        print(
            f"\ncopy of the full backup's repository to a local S3 server (SeaweedFS, Object Lock): "
            f"{m['copy_s']:.2f} s, {m['copy_mib_s']:.0f} MiB/s"
        )
    print(f"\n{fmt_bytes(size)} VM-like image, {args.runs} run(s), medians\n")
    print(
        f"{'tool':<10} {'full':>8} {'incr':>8} {'restore':>8} {'stored':>11} {'peak RSS':>10}   "
        f"{'durable: full':>13} {'incr':>6} {'restore':>8}"
    )
    for t in tools:
        m = med[t]
        rss = max(v for k, v in m.items() if k.endswith("_rss"))

        def f(k, w=8, m=m):
            return f"{m[k]:{w - 1}.2f}s" if k in m else " " * (w - 1) + "-"

        print(
            f"{t:<10} {f('full_s'):>8} {f('incr_s'):>8} {f('restore_s'):>8} {fmt_bytes(m['stored']):>11} "
            f"{fmt_bytes(rss):>10}   {f('full_durable_s', 13):>13} {f('incr_durable_s', 6):>6} "
            f"{f('restore_durable_s'):>8}"
        )
    print(
        "(durable: the tool, then a syncfs of the filesystem it wrote: the time until its output would "
        "survive a power cut)"
    )
    fm = med.get("vmbackup", {})
    if "floor_s" in fm:
        print(
            f"\nfloor of the full backup in {work}: {fm['floor_s']:.2f}s = max(hash+compress on "
            f"{os.cpu_count()} cores {fm['floor_compute_s']:.2f}s [cpu {fm['floor_compute_cpu_s']:.2f}s], "
            f"dd conv=fsync of the {fmt_bytes(int(fm['stored_bytes']))} stored {fm['floor_write_s']:.2f}s)"
        )
        print(
            f"vmbackup full backup / floor: {fm['full_vs_floor']:.2f}x "
            f"(durable {fm['full_durable_vs_floor']:.2f}x; medians of the per-run ratios)"
        )
        print(
            f"CPU accounts: vmbackup full backup {fm['full_cpu_s']:.2f}s (user + system, the whole "
            f"command), hash+compress alone {fm['floor_compute_cpu_s']:.2f}s; on a busy machine wall "
            f"times follow CPU time, so compare these when the ratio looks noisy"
        )

    if "encrypted_vs_unencrypted" in fm:
        print(
            "\nthe mover alone, full backup: XXH3-128 ids (version 1) "
            f"{fm['variant_xxh3_s']:.2f}s, keyed BLAKE3 ids {fm['variant_keyed_s']:.2f}s, "
            f"encrypted (keyed ids, AES-256-GCM) {fm['variant_encrypted_s']:.2f}s; "
            f"encrypted / unencrypted {fm['encrypted_vs_unencrypted']:.3f}x, "
            f"keyed / XXH3 ids {fm['keyed_vs_xxh3']:.3f}x (medians of the per-run ratios); CPU seconds "
            f"{fm['variant_xxh3_cpu_s']:.2f} / {fm['variant_keyed_cpu_s']:.2f} / {fm['variant_encrypted_cpu_s']:.2f}, "
            f"encrypted / unencrypted {fm['encrypted_vs_unencrypted_cpu']:.3f}x, "
            f"keyed / XXH3 {fm['keyed_vs_xxh3_cpu']:.3f}x"
        )

    checks = []
    ours = med.get("vmbackup")
    if ours:

        def ratio(tool: str, key: str) -> float | None:
            return med[tool][key] / ours[key] if tool in med and key in med[tool] else None

        def check(label: str, value: float | None, target: float, higher_is_better: bool = True) -> None:
            if value is None:
                return
            ok = value >= target if higher_is_better else value <= target
            checks.append({"target": label, "value": round(value, 2), "goal": target, "met": ok})

        check("full backup vs restic (x faster)", ratio("restic", "full_s"), 5)
        check("full backup vs borg (x faster)", ratio("borg", "full_s"), 2)
        check("full backup vs zstd -1 -T0 (x faster)", ratio("zstd", "full_s"), 1.5)
        check("CBT incremental vs restic incremental (x faster)", ratio("restic", "incr_s"), 10)
        check("restore vs restic restore (x faster)", ratio("restic", "restore_s"), 2)
        check("durable full backup vs zstd -1 -T0 + sync (x faster)", ratio("zstd", "full_durable_s"), 1.5)
        check("durable restore vs restic restore + sync (x faster)", ratio("restic", "restore_durable_s"), 2)
        rss = max(v for k, v in ours.items() if k.endswith("_rss"))
        check("mover peak RSS (MiB)", rss / 2**20, 256, higher_is_better=False)
        check("full backup / its floor (x)", ours.get("full_vs_floor"), 1.3, higher_is_better=False)
        check(
            "encrypted full backup / unencrypted (x)",
            ours.get("encrypted_vs_unencrypted"),
            1.15,
            higher_is_better=False,
        )
        check("keyed BLAKE3 ids full backup / XXH3 ids (x)", ours.get("keyed_vs_xxh3"), 1.10, higher_is_better=False)
        if "zstd" in med:
            check(
                "stored size / zstd -3 size", ours["stored"] / med["zstd"]["zstd3_stored"], 1.0, higher_is_better=False
            )
        print()
        for c in checks:
            print(f"{'MET ' if c['met'] else 'MISS'} {c['target']}: {c['value']} (goal {c['goal']})")
    (work / "results.json").write_text(
        json.dumps({"size": size, "runs": args.runs, "medians": med, "samples": results, "targets": checks}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
