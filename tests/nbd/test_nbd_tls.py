"""Backups over NBD with TLS from nbdkit (GnuTLS) with ``--tls=require``:
``nbds://`` on loopback TCP and ``nbds+unix://``, the upgrade of an
``nbd://`` URI that carries certificates, a server that verifies its
clients, and the refusals. Certificates are made with openssl per test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import MiB, sha256
from test_nbd_client import backup_and_restore, nbdkit, serve_nbd  # noqa: F401 (fixture)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path) -> None:
    """A throwaway CA in ``d``: ca-cert.pem and ca-key.pem."""
    d.mkdir(parents=True, exist_ok=True)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=vmbackup test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        str(d / "ca-key.pem"),
        "-out",
        str(d / "ca-cert.pem"),
    )


def issue(d: Path, who: str, usage: str) -> None:
    """``who``-cert.pem and ``who``-key.pem for localhost, signed by the CA in ``d``
    (the names nbdkit-tls(1) and libnbd expect)."""
    ext = d / f"{who}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
        f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
    )
    csr = d / f"{who}.csr"
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(d / f"{who}-key.pem"),
        "-out",
        str(csr),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(d / "ca-cert.pem"),
        "-CAkey",
        str(d / "ca-key.pem"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(d / f"{who}-cert.pem"),
    )


@pytest.fixture
def pki(tmp_path) -> Path:
    d = tmp_path / "pki"
    make_ca(d)
    issue(d, "server", "serverAuth")
    return d


def tls_nbdkit(pki: Path, *plugin: str, verify_peer: bool = False):
    inner = nbdkit(*plugin)

    def argv(where):
        a = inner(where)
        extra = ["--tls=require", f"--tls-certificates={pki}"] + (["--tls-verify-peer"] if verify_peer else [])
        return a[:3] + extra + a[3:]

    return argv


def check_round_trip(cli, uri: str, disk: Path, tmp_path: Path) -> None:
    b, out = backup_and_restore(cli, uri, tmp_path)
    assert sha256(out) == sha256(disk)
    # Block status works inside TLS: holes are not read.
    assert b["mode"] == "allocated" and 0 < b["bytes_read"] < b["disk_size"]
    assert b["bytes_read"] <= os.stat(disk).st_blocks * 512 + MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbds_round_trip_skips_holes(cli, image, serve_nbd, pki, tmp_path, tcp):
    disk = image(size=24 * MiB + 4096)
    srv = serve_nbd(tls_nbdkit(pki, "file", str(disk)), tcp=tcp)
    if tcp:
        uri = f"nbds://localhost:{srv.port}/?tls-certificates={pki}"
    else:
        uri = f"nbds+unix:///?socket={srv.sock}&tls-certificates={pki}&tls-hostname=localhost"
    check_round_trip(cli, uri, disk, tmp_path)


def test_nbd_uri_with_certificates_upgrades_when_the_server_requires_tls(cli, image, serve_nbd, pki, tmp_path):
    disk = image(size=16 * MiB, seed=3)
    srv = serve_nbd(tls_nbdkit(pki, "file", str(disk)))
    check_round_trip(cli, f"nbd+unix:///?socket={srv.sock}&tls-certificates={pki}", disk, tmp_path)


def test_client_certificate_for_a_server_that_verifies_peers(cli, image, serve_nbd, pki, tmp_path):
    disk = image(size=8 * MiB, seed=4)
    srv = serve_nbd(tls_nbdkit(pki, "file", str(disk), verify_peer=True), tcp=True)
    uri = f"nbds://localhost:{srv.port}/?tls-certificates={pki}"
    # Without a client certificate the server ends the handshake.
    p = cli.run("backup-disk", "--vm", "v", uri, expect=2)
    assert "TLS handshake failed" in p.stderr and p.stderr.count("\n") == 1
    issue(pki, "client", "clientAuth")
    check_round_trip(cli, uri, disk, tmp_path)


def test_refusals_are_one_clear_line(cli, serve_nbd, pki, tmp_path):
    srv = serve_nbd(tls_nbdkit(pki, "memory", "size=1M"), tcp=True)
    other = tmp_path / "other-ca"
    make_ca(other)
    cases = [
        # A CA that did not sign the server's certificate.
        (f"nbds://localhost:{srv.port}/?tls-certificates={other}", ["certificate verification", "not signed"]),
        # A name the certificate does not carry.
        (
            f"nbds://localhost:{srv.port}/?tls-certificates={pki}&tls-hostname=nbd.example.com",
            ["certificate verification", "nbd.example.com"],
        ),
        # Plaintext to a server that requires TLS: never a silent downgrade.
        (f"nbd://localhost:{srv.port}/", ["requires TLS", "nbds://", "tls-certificates"]),
        (f"nbds://localhost:{srv.port}/", ["tls-certificates=DIR"]),
        (f"nbds://localhost:{srv.port}/?tls-certificates={tmp_path}/missing", ["missing", "does not exist"]),
        (f"nbds://127.0.0.1:{srv.port}/?tls-certificates={pki}", ["tls-hostname"]),
        (f"nbds://localhost:{srv.port}/?tls-certificates={pki}&tls-verify-peer=false", ["tls-verify-peer"]),
    ]
    for uri, words in cases:
        p = cli.run("backup-disk", "--vm", "v", uri, expect=2)
        assert p.stderr.count("\n") == 1, (uri, p.stderr)
        for w in words:
            assert w in p.stderr, (uri, w, p.stderr)
        assert "PRIVATE KEY" not in p.stderr


def test_nbds_to_a_server_without_tls_is_refused(cli, serve_nbd, pki):
    srv = serve_nbd(nbdkit("memory", "size=1M"), tcp=True)  # --tls off: STARTTLS refused
    p = cli.run("backup-disk", "--vm", "v", f"nbds://localhost:{srv.port}/?tls-certificates={pki}", expect=2)
    assert "does not offer TLS" in p.stderr and p.stderr.count("\n") == 1


def test_a_fifo_in_the_certificates_directory_is_refused(cli, tmp_path):
    """No hang: certificates must be regular files (links to them are fine)."""
    d = tmp_path / "pki"
    d.mkdir()
    os.mkfifo(d / "ca-cert.pem")
    uri = f"nbds+unix:///?socket={tmp_path / 'none.sock'}&tls-certificates={d}&tls-hostname=localhost"
    p = cli.run("backup-disk", "--vm", "v", uri, expect=2, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "ca-cert.pem" in lines[0] and "not a regular file" in lines[0], p.stderr
