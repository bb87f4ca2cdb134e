"""kill -9 at many points of a backup: every earlier backup stays
restorable, the repository verifies, and the next backup works.

The kill points are set by progress, not by the clock, so that a loaded
machine moves them in time but not in the backup: before anything is
written, after 1, 5, 20, 40, 60, 80 and 95% of the chunks, and between the
last chunk and the manifest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import Cli, MiB, backdate, sha256
from vmbackup_lab.diskimage import make_image


def _chunks(repo) -> int:
    return sum(1 for d in (repo / "chunks").iterdir() for n in os.listdir(d) if not n.startswith("."))


def test_kill_dash_nine_anywhere_loses_nothing(image, tmp_path):
    cli = Cli(tmp_path / "repo")
    cli.run("init")
    small = image("small.img", 8 * MiB)
    before = cli.json("backup-disk", "--vm", "keep", str(small))
    small_hash = sha256(small)

    points = (0.0, 0.01, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)
    killed = 0
    for n, frac in enumerate(points):
        # Fresh content each time, so no run merely deduplicates the last one's chunks.
        disk = tmp_path / f"crash{n}.img"
        layout = make_image(str(disk), 128 * MiB, seed=200 + n)
        expected = layout.text + layout.random  # the distinct chunks this backup writes
        start = _chunks(cli.repo)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmbackup",
                "backup-disk",
                "--repo",
                str(cli.repo),
                "--vm",
                "crashy",
                "--json",
                str(disk),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        manifests = len(list((cli.repo / "backups").glob("*.tib")))
        while p.poll() is None and time.monotonic() < deadline:
            written = _chunks(cli.repo) - start
            if frac < 1.0 and written >= frac * expected:
                break
            if frac == 1.0 and any((cli.repo / "locks").glob("*.lease")) and written >= expected:
                break  # every chunk written, the manifest not yet
            time.sleep(0.0005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if p.returncode == -signal.SIGKILL and len(list((cli.repo / "backups").glob("*.tib"))) == manifests:
            killed += 1
        # After every crash: the repository is sound and the old backup restores.
        assert cli.json("verify")["ok"]
        out = tmp_path / "restored"
        cli.json("restore-disk", "--force", before["id"], str(out))
        assert sha256(out) == small_hash
        os.unlink(out)
    assert killed >= len(points) - 1, f"only {killed} of {len(points)} backups were killed before their manifest"

    # Leftovers are temporary files and stale leases, which gc clears.
    backdate(cli.repo)  # the crashed writers' files, an hour old
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
