"""Backups from NBD exports served by implementations no one here wrote:
qemu-nbd (raw and qcow2) and nbdkit (file and memory plugins, with and
without multi-conn), over unix sockets and loopback TCP."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MiB, sha256, socket_activated, tcp_listener


def wait_ready(proc: subprocess.Popen, sock: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''}"
        if sock.exists():
            return
        time.sleep(0.05)
    raise AssertionError("NBD server did not come up")


class Server:
    """An NBD server process on a unix socket or a loopback port."""

    def __init__(self, argv_for, tmp: Path, tcp: bool = False):
        self.tmp = tmp
        self.listener = None
        if tcp:
            # The socket listens before the server starts: clients queue until it accepts.
            self.listener = tcp_listener()
            self.port = self.listener.getsockname()[1]
            argv, self.uri = argv_for(("tcp", self.port)), f"nbd://127.0.0.1:{self.port}/"
            self.proc = subprocess.Popen(
                socket_activated(argv, self.listener),
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(self.listener.fileno(),),
            )
        else:
            self.sock = tmp / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
            argv, self.uri = argv_for(("unix", self.sock)), f"nbd+unix:///?socket={self.sock}"
            self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
            wait_ready(self.proc, sock=self.sock)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.listener is not None:
            self.listener.close()


def qemu_nbd(image: Path, fmt: str = "raw", shared: int = 4):
    def argv(where):
        base = ["qemu-nbd", "-f", fmt, "-r", "-t", "-e", str(shared)]
        if where[0] == "tcp":
            return base + [str(image)]  # the listening socket is handed over (socket activation)
        return base + ["-k", str(where[1]), str(image)]

    return argv


def nbdkit(*plugin: str, multi_conn: bool | None = None, log: Path | None = None):
    """nbdkit with a plugin; ``multi_conn`` forces NBD_FLAG_CAN_MULTI_CONN on
    or off (multi-conn filter), ``log`` records every connection (log filter)."""

    def argv(where):
        base = ["nbdkit", "-f", "-r"]
        if where[0] != "tcp":  # tcp: the listening socket is handed over (socket activation)
            base += ["-U", str(where[1])]
        params = []
        if multi_conn is not None:
            base += ["--filter=multi-conn"]
            params += [f"multi-conn-mode={'unsafe' if multi_conn else 'disable'}"]
        if log is not None:
            base += ["--filter=log"]
            params += [f"logfile={log}"]
        return base + list(plugin) + params

    return argv


@pytest.fixture
def serve_nbd(tmp_path):
    servers = []

    def start(argv_for, tcp: bool = False) -> Server:
        s = Server(argv_for, tmp_path, tcp)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def backup_and_restore(cli, uri: str, tmp_path: Path, name: str = "r.raw") -> tuple[dict, Path]:
    b = cli.json("backup-disk", "--vm", "nbdvm", uri)
    out = tmp_path / name
    cli.json("restore-disk", b["id"], str(out))
    return b, out


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_nbd_raw_round_trip_skips_holes(cli, image, serve_nbd, tmp_path, tcp):
    disk = image(size=24 * MiB + 4096)  # a last block shorter than a chunk
    srv = serve_nbd(qemu_nbd(disk), tcp=tcp)
    b, out = backup_and_restore(cli, srv.uri, tmp_path)
    assert b["disk_size"] == os.path.getsize(disk)
    assert sha256(out) == sha256(disk)
    # Block status: holes are not read.
    assert b["mode"] == "allocated" and 0 < b["bytes_read"] < b["disk_size"]
    assert b["bytes_read"] <= os.stat(disk).st_blocks * 512 + MiB


def test_qemu_nbd_qcow2_reads_only_allocated_clusters(cli, serve_nbd, tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    for cmd in ("write -P 0x5a 1M 2M", "write -P 0x33 40M 1M", "write -z 50M 4M"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(img)], check=True, capture_output=True)
    want = tmp_path / "want.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(want)], check=True)
    srv = serve_nbd(qemu_nbd(img, fmt="qcow2"))
    b, out = backup_and_restore(cli, srv.uri, tmp_path)
    assert b["disk_size"] == 64 * MiB
    assert b["bytes_read"] == 3 * MiB  # only the written clusters, not the zeroed ones
    assert out.read_bytes() == want.read_bytes()


@pytest.mark.parametrize("multi_conn", [None, True, False], ids=["default", "multi-conn", "single-conn"])
def test_nbdkit_file_plugin(cli, image, serve_nbd, tmp_path, multi_conn):
    disk = image(size=40 * MiB, seed=5)
    log = tmp_path / "nbdkit.log"
    srv = serve_nbd(nbdkit("file", str(disk), multi_conn=multi_conn, log=log))
    b, out = backup_and_restore(cli, srv.uri, tmp_path)
    assert sha256(out) == sha256(disk)
    assert b["bytes_read"] < b["disk_size"]
    connections = log.read_text().count("Connect ")
    if multi_conn is False:
        assert connections == 1
    else:  # the file plugin allows several by default
        assert connections > 1


def test_nbdkit_memory_plugin_over_tcp(cli, serve_nbd, tmp_path):
    # A sparse RAM disk with a little data written by nbdkit's data plugin
    # syntax is not needed: the memory plugin starts all zeros.
    srv = serve_nbd(nbdkit("memory", "size=16M"), tcp=True)
    b, out = backup_and_restore(cli, srv.uri, tmp_path)
    assert b["disk_size"] == 16 * MiB and b["bytes_read"] == 0
    assert out.read_bytes() == bytes(16 * MiB)


def test_nbdkit_data_plugin_with_odd_size(cli, serve_nbd, tmp_path):
    # The data plugin: a disk described inline, with data far apart.
    srv = serve_nbd(nbdkit("data", "data=@4096 1 2 3 4 @10485760 0xff * 4096", "size=12345678"))
    b, out = backup_and_restore(cli, srv.uri, tmp_path)
    want = bytearray(12345678)
    want[4096:4100] = b"\x01\x02\x03\x04"
    want[10485760 : 10485760 + 4096] = b"\xff" * 4096
    assert out.read_bytes() == bytes(want)
    assert b["bytes_read"] <= 2 * MiB


def test_errors_are_one_clear_line(cli, serve_nbd, tmp_path):
    p = cli.run("backup-disk", "--vm", "v", f"nbd+unix:///?socket={tmp_path}/nope.sock", expect=2)
    assert "nope.sock" in p.stderr and p.stderr.count("\n") == 1
    p = cli.run("backup-disk", "--vm", "v", "nbds://127.0.0.1/", expect=None)
    assert p.returncode != 0 and "TLS" in p.stderr
    disk = tmp_path / "one.raw"
    disk.write_bytes(b"x" * MiB)
    srv = serve_nbd(qemu_nbd(disk))  # its only export is ""
    p = cli.run("backup-disk", "--vm", "v", srv.uri.replace(":///", ":///missing-export"), expect=2)
    assert "no export" in p.stderr and "missing-export" in p.stderr
