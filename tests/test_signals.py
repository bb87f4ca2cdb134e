"""Ctrl-C and SIGTERM during a backup or a restore, on real processes: the
command finishes what it reports or reports what it did, never says
"interrupted" about a committed backup, never leaves a finished restore
after saying it failed, and leaves no temporary file. The signal is sent when
the command's own progress line shows work done, not after some time."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, sha256


def _files(repo: Path, sub: str) -> list[str]:
    return sorted(n for _, _, names in os.walk(repo / sub) for n in names)


def _hidden(directory: Path) -> list[str]:
    """Temporary files: the mover's start with a dot."""
    return sorted(n for _, _, names in os.walk(directory) for n in names if n.startswith("."))


class Running:
    """`vmbackup ARGS` with stderr on a terminal, so it shows its progress line."""

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmbackup", *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL
        )
        os.close(slave)
        self.err = b""

    def _read(self) -> bool:
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the command has exited and closed the terminal
            data = b""
        self.err += data
        return bool(data)

    def wait_for_progress(self) -> float:
        """Blocks until the progress line shows some work done; returns the percentage."""
        while self._read():
            done = [float(x) for x in re.findall(rb"(\d+\.\d)%", self.err)]
            if done and done[-1] > 0:
                return done[-1]
        raise AssertionError(f"no progress shown: {self.err!r}")

    def finish(self) -> tuple[int, str, str]:
        out, _ = self.proc.communicate(timeout=120)
        while self._read():
            pass
        os.close(self.master)
        # The terminal turns "\n" into "\r\n"; the progress line ends in "\r".
        last = self.err.decode(errors="replace").replace("\r\n", "\n").split("\r")[-1].strip()
        return self.proc.returncode, out.decode(), last


@pytest.fixture
def slow_nbd(tmp_path):
    """A 128 MiB NBD export that serves one 64 KiB piece at a time, each 5 ms
    late (nbdkit's noparallel, blocksize and delay filters): a backup of it
    takes about ten seconds, whatever the machine."""
    sock, pidfile = tmp_path / "slow.sock", tmp_path / "slow.pid"
    # Without -f nbdkit returns once it listens: the socket is ready when run() returns.
    subprocess.run(
        ["nbdkit", "-U", str(sock), "-P", str(pidfile), "--filter=noparallel", "--filter=blocksize", "--filter=delay"]
        + ["pattern", "size=128M", "serialize=all-requests", "maxdata=65536", "rdelay=5ms"],
        check=True,
        timeout=60,
    )
    yield f"nbd+unix:///?socket={sock}"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_backup_commits_nothing_and_says_so(cli, slow_nbd, signum):
    run = Running("backup-disk", "--repo", str(cli.repo), "--vm", "v", slow_nbd)
    pct = run.wait_for_progress()
    assert pct < 50, pct
    run.proc.send_signal(signum)
    rc, out, last = run.finish()
    name = signal.Signals(signum).name
    assert rc == 128 + signum, (rc, last)
    assert last == f"vmbackup: error: interrupted by {name}: the backup was not committed; nothing was recorded"
    assert out == ""
    assert cli.json("snapshots") == []
    assert _files(cli.repo, "locks") == [], "the backup's lease was left behind"
    assert _hidden(cli.repo) == []
    assert len(_files(cli.repo, "chunks")) > 0  # what was stored stays for reuse (and gc)
    assert cli.json("verify")["ok"]


def test_a_signal_during_a_restore_leaves_no_file_or_reports_it_whole(cli, tmp_path):
    """The signal comes when the restore's temporary file holds 8 MiB. Either
    outcome is consistent: interrupted with no output and no temporary file,
    or done and whole (if the restore finished first)."""
    disk = tmp_path / "random.img"
    with open(disk, "wb") as f:
        for _ in range(160):
            f.write(os.urandom(MiB))
    b = cli.json("backup-disk", "--vm", "v", str(disk))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "restored.vmdk"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmbackup", "restore-disk", "--repo", str(cli.repo), "--format", "vmdk", b["id"]]
        + [str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while proc.poll() is None:  # watch the bytes written, not the clock
        written = [e.stat().st_size for e in os.scandir(out_dir) if e.name.startswith(".")]
        if written and written[0] >= 8 * MiB:
            proc.send_signal(signal.SIGTERM)
            break
        os.sched_yield()
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    assert _hidden(out_dir) == [], "a temporary file was left behind"
    if proc.returncode == 128 + signal.SIGTERM:
        assert err.splitlines() == [f"vmbackup: error: interrupted by SIGTERM: {output} was not written"]
        assert not output.exists() and out == ""
    else:
        assert proc.returncode == 0 and out.startswith(f"restored disk disk0 of {b['id']} to {output}"), (out, err)
        plain = tmp_path / "plain.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(output), str(plain)], check=True)
        assert sha256(plain) == sha256(disk)


# The signal arrives as the mover's commit returns, the worst moment: the
# backup is committed, the command has not yet said so. The session is the
# real one; only its commit is followed by a real SIGTERM to this process.
SIGNAL_AFTER_COMMIT = """
import os, signal, sys
from vmbackup import _mover
from vmbackup.cli import main

Real = _mover.BackupSession

class Session:
    def __init__(self, *args):
        self.real = Real(*args)
    def add_disk(self, *args, **kwargs):
        return self.real.add_disk(*args, **kwargs)
    def commit(self, *args, **kwargs):
        meta = self.real.commit(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return meta
    def abort(self):
        self.real.abort()

_mover.BackupSession = Session
sys.exit(main())
"""


def test_a_signal_as_the_commit_returns_reports_the_committed_backup(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    p = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_COMMIT, "backup-disk", "--repo", str(cli.repo), "--vm", "v", "--json"]
        + [str(disk)],
        capture_output=True,
        text=True,
    )
    snaps = cli.json("snapshots")
    assert len(snaps) == 1
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["id"] == snaps[0]["id"]
    assert p.stderr.splitlines() == [
        "vmbackup: warning: the signal came while the backup was being committed; the backup is complete"
    ]
