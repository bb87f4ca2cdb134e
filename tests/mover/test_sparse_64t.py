"""A 64 TiB disk with little data: a small manifest and a small process.

The work directory's ext4 cannot hold a 64 TiB file (its limit is 16 TiB),
so the disk is a 64 TiB dynamic VHDX made by qemu-img, with data written by
qemu-io at scattered offsets: an allocated-area source (its BAT)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import MiB

TiB = 1 << 40
WRITES = [(0, 3), (17 * TiB, 2), (40 * TiB + 5 * MiB, 1), (64 * TiB - 4 * MiB, 4)]

# Runs the command as a child and reports the child's peak RSS.
MEASURE = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measured(*args):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "vmbackup", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    r = json.loads(out.stdout)
    assert r["rc"] == 0, r["stderr"]
    return json.loads(r["stdout"]), r["maxrss_kib"] * 1024


def test_sparse_64_tib_disk(cli, tmp_path):
    disk = tmp_path / "big.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(disk), "64T"], check=True)
    io = [c for off, n in WRITES for c in ("-c", f"write -P {n} {off} {n * MiB}")]
    subprocess.run(["qemu-io", "-f", "vhdx", *io, str(disk)], check=True, capture_output=True)

    b, rss = measured("backup-disk", "--repo", str(cli.repo), "--vm", "big", "--json", str(disk))
    assert b["disk_size"] == 64 * TiB
    manifest = cli.repo / "backups" / f"{b['id']}.tib"
    # Version 1 would hold 16 bytes for each of the 64 Mi blocks: 1 GiB.
    assert manifest.stat().st_size < 64 * 1024, manifest.stat().st_size
    assert rss < 256 * MiB, f"backup peaked at {rss / MiB:.0f} MiB"
    print(f"backup: manifest {manifest.stat().st_size} bytes, peak RSS {rss / MiB:.0f} MiB")

    v, rss = measured("verify", "--repo", str(cli.repo), "--read-data", "--json")
    assert v["ok"] and rss < 256 * MiB, rss
    print(f"verify --read-data: peak RSS {rss / MiB:.0f} MiB")

    # An incremental from changed extents: one more MiB near the end.
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([{"start": 50 * TiB, "length": MiB}]))
    subprocess.run(
        ["qemu-io", "-f", "vhdx", "-c", f"write -P 9 {50 * TiB} {MiB}", str(disk)], check=True, capture_output=True
    )
    i, rss = measured(
        "backup-disk",
        "--repo",
        str(cli.repo),
        "--vm",
        "big",
        "--parent",
        b["id"],
        "--changed-extents",
        str(changed),
        "--json",
        str(disk),
    )
    assert i["bytes_read"] == MiB and rss < 256 * MiB, (i, rss)
    assert (cli.repo / "backups" / f"{i['id']}.tib").stat().st_size < 64 * 1024
    print(f"incremental: peak RSS {rss / MiB:.0f} MiB")

    # Restored (as a VHDX: a 64 TiB raw file does not fit ext4): the scattered
    # data is where it was, the rest reads as zeros.
    out = tmp_path / "out.vhdx"
    r, rss = measured("restore-disk", "--repo", str(cli.repo), "--format", "vhdx", "--json", i["id"], str(out))
    assert rss < 256 * MiB, rss
    checks = [*WRITES, (50 * TiB, 9), (30 * TiB, 0)]
    reads = [c for off, n in checks for c in ("-c", f"read -P {n} {off} {MiB}")]
    p = subprocess.run(["qemu-io", "-f", "vhdx", "-r", *reads, str(out)], capture_output=True, text=True, check=True)
    assert p.stdout.count("read ") == len(checks) and "fail" not in p.stdout.lower(), p.stdout
