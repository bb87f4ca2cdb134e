"""kill -9 at many points of a backup: every earlier backup stays
restorable, the repository verifies, and the next backup works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import Cli, MiB, sha256


def test_kill_dash_nine_anywhere_loses_nothing(image, tmp_path):
    # A slow compression level stretches each backup so kills land inside it.
    cli = Cli(tmp_path / "repo")
    cli.run("init", "--compression", "zstd:15")
    small = image("small.img", 8 * MiB)
    before = cli.json("backup-disk", "--vm", "keep", str(small))
    small_hash = sha256(small)
    t = time.monotonic()
    cli.json("backup-disk", "--vm", "timing", str(image("timing.img", 64 * MiB, seed=100)))
    duration = time.monotonic() - t

    killed = 0
    for n, frac in enumerate((0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97)):
        # Fresh content each time, so no run is merely deduplicating the last one's chunks.
        disk = image(f"crash{n}.img", 64 * MiB, seed=200 + n)
        p = subprocess.Popen([sys.executable, "-m", "vmbackup", "backup-disk", "--repo", str(cli.repo),
                              "--vm", "crashy", "--json", str(disk)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(duration * frac)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed += p.returncode == -signal.SIGKILL
        # After every crash: the repository is sound and the old backup restores.
        assert cli.json("verify")["ok"]
        out = tmp_path / "restored"
        cli.json("restore-disk", "--force", before["id"], str(out))
        assert sha256(out) == small_hash
        os.unlink(out)
    assert killed >= 7, "the backups finished before they could be killed"

    # Leftovers are temporary files and stale leases, which gc clears.
    time.sleep(2.1)
    g = cli.json("gc", "--grace", "0")
    assert g["active_backups"] == 0
    leftovers = [n for d in (cli.repo / "chunks").iterdir() for n in os.listdir(d) if n.startswith(".")]
    assert leftovers == []
    assert list((cli.repo / "locks").iterdir()) == []

    # And the next backup works and is complete.
    after = cli.json("backup-disk", "--vm", "crashy", str(disk))
    cli.json("restore-disk", after["id"], str(tmp_path / "last.out"))
    assert sha256(tmp_path / "last.out") == sha256(disk)
    assert cli.json("verify", "--read-data")["ok"]
