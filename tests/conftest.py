"""Shared fixtures: the real `vmbackup` command, real sparse images, real repositories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vmbackup_lab.diskimage import make_image

MiB = 1024 * 1024

# The real peers the tests run against. Missing ones are an installation
# error (make dev installs them), never a reason to skip a test.
REQUIRED_TOOLS = [
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "nbdkit",
    "nbdinfo",
    "nbdcopy",
    "xxh128sum",
    "unshare",
    "losetup",
    "openssl",
]


def pytest_sessionstart(session):
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"missing test tools: {', '.join(missing)}; run `make dev`")


def backdate(tree: os.PathLike | str, seconds: float = 3600) -> int:
    """Sets every file under ``tree`` back ``seconds`` in time (atime and
    mtime), as if it had been written that long ago: gc's cutoff and its
    slack for coarse timestamps then apply without waiting on the clock.
    Returns how many files were changed."""
    n = 0
    for dirpath, _, files in os.walk(tree):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p, follow_symlinks=False)
            os.utime(p, ns=(st.st_atime_ns - int(seconds * 1e9), st.st_mtime_ns - int(seconds * 1e9)))
            n += 1
    return n


def tcp_listener() -> socket.socket:
    """A socket listening on a free loopback port. The test binds it and
    hands it to the server (``socket_activated``), so no other process can
    take the port between choosing it and the server listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def socket_activated(argv: list[str], listener: socket.socket) -> list[str]:
    """``argv`` run with ``listener`` as its listening socket by systemd's
    socket activation protocol (fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID`` its
    own pid), which nbdkit and qemu-nbd both follow when given no address.
    Start it with ``pass_fds=(listener.fileno(),)``. (A Python trampoline,
    since a shell's redirections take only one-digit descriptors.)"""
    trampoline = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); os.execvp(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", trampoline, str(listener.fileno()), *argv]


def sha256(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


class Cli:
    """Runs `python -m vmbackup ...` as a user would, and checks the contract:
    stdout is exactly one JSON document with --json, no traceback ever."""

    def __init__(self, repo: Path):
        self.repo = repo

    def run(
        self, *args: str, expect: int | None = 0, repo: bool = True, timeout: float = 120, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "vmbackup", *args]
        if repo and "--repo" not in args:
            cmd[4:4] = ["--repo", str(self.repo)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        assert "Traceback" not in p.stderr, p.stderr
        if expect is not None:
            assert p.returncode == expect, f"{cmd} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        return p

    def json(self, *args: str, **kw) -> object:
        p = self.run(*args, "--json", **kw)
        return json.loads(p.stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path / "repo")
    subprocess.run([sys.executable, "-m", "vmbackup", "init", "--repo", str(c.repo)], check=True, capture_output=True)
    return c


@pytest.fixture
def image(tmp_path: Path):
    """A factory of deterministic sparse VM-like images."""

    def make(name: str = "disk.img", size: int = 48 * MiB, seed: int = 1) -> Path:
        p = tmp_path / name
        make_image(str(p), size, seed=seed)
        return p

    return make
