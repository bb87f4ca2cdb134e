"""`vmbackup serve`: a backup as an NBD export, read by qemu-img, nbdinfo,
nbdcopy and qemu-io (none written here); writable into a discarded overlay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import MiB, sha256


class Serving:
    def __init__(self, cli, backup_id: str, *extra: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "vmbackup", "serve", "--repo", str(cli.repo), "--json", backup_id, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line, f"serve exited: {self.proc.stderr.read()}"
        self.uri = json.loads(line)["uri"]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(15)
        err = self.proc.stderr.read()
        assert "Traceback" not in err, err
        return rc


@pytest.fixture
def backup(cli, image, tmp_path):
    disk = image(size=32 * MiB + 512, seed=7)
    b = cli.json("backup-disk", "--vm", "srv", str(disk))
    restored = tmp_path / "restored.raw"
    cli.json("restore-disk", b["id"], str(restored))
    assert sha256(restored) == sha256(disk)
    return b, restored


@pytest.fixture
def serving(cli):
    started = []

    def start(backup_id: str, *extra: str, **kw) -> Serving:
        s = Serving(cli, backup_id, *extra, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_read_only_export_for_qemu_img_nbdinfo_and_nbdcopy(backup, serving, tmp_path):
    b, restored = backup
    sock = tmp_path / "export.sock"
    srv = serving(b["id"], "--socket", str(sock))
    assert srv.uri == f"nbd+unix:///?socket={sock}"

    out = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", srv.uri, "-O", "raw", str(out)], check=True)
    assert sha256(out) == sha256(restored)

    info = json.loads(subprocess.run(["nbdinfo", "--json", srv.uri], check=True, capture_output=True, text=True).stdout)
    export = info["exports"][0]
    assert export["export-size"] == b["disk_size"]
    assert export["is_read_only"] is True and export["can_multi_conn"] is True

    # Block status: the backup's zero blocks are holes, its data is data.
    mapping = json.loads(
        subprocess.run(["nbdinfo", "--map", "--json", srv.uri], check=True, capture_output=True, text=True).stdout
    )
    holes = sum(e["length"] for e in mapping if e["type"] & 2)
    assert sum(e["length"] for e in mapping) == b["disk_size"]
    assert 0 < b["bytes_skipped"] <= holes <= b["zero_blocks"] * MiB < b["disk_size"]

    copy = tmp_path / "nbdcopy.raw"
    subprocess.run(["nbdcopy", srv.uri, str(copy)], check=True)
    assert sha256(copy) == sha256(restored)

    # A qemu-img write to a read-only export fails cleanly.
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri], capture_output=True, text=True)
    assert p.returncode != 0 or "failed" in (p.stdout + p.stderr).lower()

    assert srv.stop() == 0
    assert not sock.exists()


def test_several_clients_at_once_over_tcp(backup, serving, tmp_path):
    b, restored = backup
    srv = serving(b["id"], "--listen", "127.0.0.1:0")
    assert srv.uri.startswith("nbd://127.0.0.1:")
    results = {}

    def copy(i: int) -> None:
        out = tmp_path / f"c{i}.raw"
        p = subprocess.run(["nbdcopy", "--connections=4", srv.uri, str(out)], capture_output=True, text=True)
        results[i] = (p.returncode, p.stderr, out)

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = sha256(restored)
    for rc, err, out in results.values():
        assert rc == 0, err
        assert sha256(out) == want
    assert len(results) == 3
    assert srv.stop(signal.SIGINT) == 0


def test_writable_overlay_reads_back_and_is_discarded(cli, backup, serving, tmp_path):
    b, restored = backup
    overlay_dir = tmp_path / "tmp"
    overlay_dir.mkdir()
    sock = tmp_path / "rw.sock"
    srv = serving(b["id"], "--socket", str(sock), "--writable", env={**os.environ, "TMPDIR": str(overlay_dir)})
    info = json.loads(
        subprocess.run(["nbdinfo", "--json", srv.uri], check=True, capture_output=True, text=True).stdout
    )["exports"][0]
    assert info["is_read_only"] is False and info["can_zero"] is True and info["can_trim"] is True

    writes = [
        "write -P 0x61 1M 64k",
        "write -P 0x62 3000 5000",
        "write -z 8M 2M",
        "discard 12M 1M",
        f"write -P 0x63 {b['disk_size'] - 512} 512",
    ]
    reads = [
        "read -P 0x61 1M 64k",
        "read -P 0x62 3000 5000",
        "read -P 0 8M 2M",
        "read -P 0 12M 1M",
        f"read -P 0x63 {b['disk_size'] - 512} 512",
    ]
    args = [a for c in writes + reads for a in ("-c", c)]
    p = subprocess.run(["qemu-io", "-f", "raw", *args, srv.uri], capture_output=True, text=True)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr
    # Another connection sees the same writes (one overlay for all clients).
    args = [a for c in reads for a in ("-c", c)]
    p = subprocess.run(["qemu-io", "-f", "raw", "-r", *args, srv.uri], capture_output=True, text=True)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr

    # Bytes the writes did not touch are the backup's.
    view = tmp_path / "view.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", srv.uri, "-O", "raw", str(view)], check=True)
    got, want = view.read_bytes(), restored.read_bytes()
    assert got[:3000] == want[:3000] and got[16 * MiB : 20 * MiB] == want[16 * MiB : 20 * MiB]
    assert got[1 * MiB : 1 * MiB + 65536] == b"\x61" * 65536

    # The overlay was never visible in the temporary directory, and the
    # backup itself is unchanged after serving ends.
    assert list(overlay_dir.iterdir()) == []
    assert srv.stop() == 0 and not sock.exists()
    again = tmp_path / "again.raw"
    cli.json("restore-disk", b["id"], str(again))
    assert sha256(again) == sha256(restored)
    assert cli.json("verify", "--read-data")["ok"] is True


def test_bad_usage_exits_2(cli, backup, tmp_path):
    b, _ = backup
    assert cli.run("serve", b["id"], expect=2).stderr.startswith("vmbackup: error:")
    cli.run("serve", b["id"], "--socket", str(tmp_path / "s"), "--listen", "127.0.0.1:0", expect=2)
    cli.run("serve", b["id"], "--listen", "nonsense", expect=2)
    cli.run("serve", "20000101T000000Z-00000000", "--socket", str(tmp_path / "s"), expect=2)
    existing = tmp_path / "exists"
    existing.write_text("")
    cli.run("serve", b["id"], "--socket", str(existing), expect=2)


def test_a_flood_of_idle_connections_does_not_lock_clients_out(backup, serving, tmp_path):
    """More idle connections than the server takes at once (64), all held
    open without a handshake: real clients still get in (each takes the slot
    of the oldest unfinished handshake), and SIGTERM still stops the server
    at once, removing its socket."""
    import socket as socketlib

    b, restored = backup
    sock = tmp_path / "flood.sock"
    srv = serving(b["id"], "--socket", str(sock))
    flood = []
    for _ in range(80):
        c = socketlib.socket(socketlib.AF_UNIX)
        c.settimeout(60)
        c.connect(str(sock))
        flood.append(c)
    info = json.loads(subprocess.run(["nbdinfo", "--json", srv.uri], check=True, capture_output=True, text=True).stdout)
    assert info["exports"][0]["export-size"] == 32 * MiB + 512
    out = tmp_path / "during.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", srv.uri, "-O", "raw", str(out)], check=True, timeout=60)
    assert sha256(out) == sha256(restored)
    assert srv.stop() == 0 and not sock.exists()
    for c in flood:
        c.close()


def test_an_unfinished_handshake_is_disconnected_at_its_deadline(backup, cli, tmp_path):
    """A client that connects and never answers the greeting is cut off
    once the handshake deadline passes (its slot is freed)."""
    import socket as socketlib
    import threading

    from vmbackup import _mover

    b, _ = backup
    sock = tmp_path / "hs.sock"
    token = _mover.CancelToken()
    ready = threading.Event()
    t = threading.Thread(
        target=_mover.serve,
        args=(str(cli.repo), b["id"]),
        kwargs={"socket": str(sock), "ready": lambda uri: ready.set(), "cancel": token, "handshake_timeout": 0.2},
    )
    t.start()
    try:
        assert ready.wait(60)
        c = socketlib.socket(socketlib.AF_UNIX)
        c.settimeout(60)  # a guard against a hang, not a measurement
        c.connect(str(sock))
        greeting = b""
        while len(greeting) < 18:
            greeting += c.recv(18 - len(greeting))
        assert greeting[:8] == b"NBDMAGIC"
        assert c.recv(1) == b""  # closed by the server, not by the guard
        c.close()
    finally:
        token.cancel()
        t.join()
    assert not sock.exists()
    with pytest.raises(Exception, match="handshake timeout"):
        _mover.serve(str(cli.repo), b["id"], socket=str(sock), handshake_timeout=0)
