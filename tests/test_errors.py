"""The one error map: every class says whether it is retryable and what the
command line exits with; docs/operations.md says the same; the mover raises
the transient classes for failures a retry may cure."""

from __future__ import annotations

import re
import selectors
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import MiB
from vmbackup import _mover, errors
from vmbackup.errors import InvalidInputError, SourceUnavailableError, exit_code_of, is_retryable

ROOT = Path(__file__).resolve().parents[1]

# class -> (retryable, exit code)
EXPECTED = {
    "BackupError": (False, 1),
    "TransientError": (True, 1),
    "InvalidInputError": (False, 2),
    "OutputError": (False, 1),
    "HypervisorError": (False, 1),
    "MoverError": (False, 1),
    "InternalError": (False, 1),
    "SourceError": (False, 2),
    "SourceUnavailableError": (True, 1),
    "RepositoryError": (False, 1),
    "RepositoryUnavailableError": (True, 1),
    "NotFoundError": (False, 2),
    "CorruptChunkError": (False, 1),
    "WrongKeyError": (False, 2),
    "KeyRequiredError": (False, 2),
    "TargetError": (False, 1),
    "AddressInUseError": (True, 1),
    "CancelledError": (False, 1),
    "NothingSelectedError": (False, 1),
    "VmNotFoundError": (False, 2),
    "RestoreInputError": (False, 2),
    "RestoreCleanupError": (False, 1),
    "RestoreVerifyError": (False, 1),
    "AuthenticationError": (False, 1),
    "CertificateError": (False, 1),
    "QuiesceError": (False, 1),
    "SnapshotError": (False, 1),
    "SessionLostError": (True, 1),
    "HypervisorBusyError": (True, 1),
    "TaskTimeoutError": (True, 1),
    "WinRMError": (False, 1),
    "WinRMAuthenticationError": (False, 1),
    "WinRMCertificateError": (False, 1),
    "WinRMUnreachableError": (True, 1),
    "WinRMSessionLostError": (True, 1),
    "HypervScriptError": (False, 1),
    "HypervVmNotFoundError": (False, 2),
    "HypervQuiesceError": (False, 1),
    "SnapshotVanishedError": (True, 1),
    "VmTimeoutError": (False, 1),
    "LimitsUnavailableError": (True, 1),
    "RunInterruptedError": (False, 1),
    "AgentMismatchError": (False, 1),
    "VmsFailedError": (False, 1),
    "ServerError": (False, 1),
    "MaintenanceError": (False, 1),
    "RepositoryDamagedError": (False, 1),
    "GcRefusedError": (False, 1),
    "CbtMismatchError": (False, 1),
    "DrillFailedError": (False, 1),
    "TamperedRepositoryError": (False, 2),
    "UntrustedRecord": (False, 1),
    "CopyError": (False, 1),
    "CopyUnavailableError": (True, 1),
}
# Classes whose constructor takes more than a message.
ARGS = {
    "MaintenanceError": ("x", {}),
    "RepositoryDamagedError": ("x", {}),
    "GcRefusedError": ("x", {}),
    "CbtMismatchError": ("x", {}),
    "DrillFailedError": ("x", {}),
}


def test_every_class_has_its_retryable_flag_and_exit_code():
    found = {n: c for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.BackupError)}
    # Interrupted's exit code is 128 + its signal's number (docs/operations.md).
    assert errors.Interrupted(2, "x").exit_code == 130 and not errors.Interrupted(15, "x").retryable
    assert set(found) - {"Interrupted"} == set(EXPECTED)
    for name, (retryable, code) in EXPECTED.items():
        exc = found[name](*ARGS.get(name, ("x",)))
        assert (exc.retryable, exc.exit_code, is_retryable(exc), exit_code_of(exc)) == (
            retryable,
            code,
            retryable,
            code,
        )
        # Retryable means "the operation failed", never "bad input".
        assert not (retryable and code == 2)
    assert issubclass(SourceUnavailableError, errors.SourceError)
    assert exit_code_of(KeyboardInterrupt()) == 130 and not is_retryable(ValueError())


def test_no_exception_class_is_defined_outside_errors_py():
    """One hierarchy: every exception class of the product is in errors.py
    (modules that used to define one import it, so old imports still work)."""
    import ast

    import vmbackup

    offences = []
    for path in sorted(Path(vmbackup.__file__).parent.rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "vmbackup":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(
                    ("Error", "Exception", "Impossible", "Rejected", "Signal")
                )
                for b in node.bases
            ):
                offences.append(f"{path.name}:{node.lineno} {node.name}")
    assert offences == []
    from vmbackup.cli.interrupt import Interrupted
    from vmbackup.orchestration.maintenance import GcRefusedError
    from vmbackup.orchestration.vmtask import RunInterruptedError, VmTimeoutError
    from vmbackup.vsphere.cbt import ChangeIdRejected
    from vmbackup.vsphere.transport import TransportImpossible

    assert {Interrupted, GcRefusedError, RunInterruptedError, VmTimeoutError, ChangeIdRejected, TransportImpossible}


def test_every_class_the_mover_raises_exists():
    rust = (ROOT / "mover/py/src/errors.rs").read_text()
    for name in set(re.findall(r'=> "(\w+)"', rust)):
        assert name in EXPECTED, name


def test_the_docs_table_says_the_same():
    text = (ROOT / "docs/operations.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\| (yes|no) \| ([12]) \|", text, re.M)
    assert {n: (r == "yes", int(c)) for n, r, c in rows} == EXPECTED


def test_invalid_nbd_options_are_refused_in_one_line(cli, tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\1" * MiB)
    for args, env, words in [
        (["--nbd-connections", "0"], {}, "1 to 16, not 0"),
        (["--nbd-connections", "17"], {}, "1 to 16, not 17"),
        (["--nbd-timeout", "-1"], {}, "above 0"),
        (["--nbd-timeout", "nan"], {}, "above 0"),
        ([], {"VMBACKUP_NBD_CONNECTIONS": "many"}, "VMBACKUP_NBD_CONNECTIONS='many' is not a whole number"),
        ([], {"VMBACKUP_NBD_TIMEOUT": "soon"}, "VMBACKUP_NBD_TIMEOUT='soon' is not a number"),
        ([], {"VMBACKUP_NBD_CONNECTIONS": "99"}, "1 to 16, not 99"),
    ]:
        import os

        p = cli.run("backup-disk", "--vm", "v", *args, str(disk), expect=2, env={**os.environ, **env})
        assert words in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert cli.json("snapshots") == []
    with pytest.raises(InvalidInputError):
        _mover.BackupSession(str(cli.repo), "v").add_disk(str(disk), "d", nbd_connections=0)


def test_a_failed_write_to_stdout_is_one_line_and_exit_1(cli):
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [*cli_cmd(), "snapshots", "--repo", str(cli.repo), "--json"], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "could not write to stdout" in p.stderr and "work itself is done" not in p.stderr, p.stderr


def test_verify_json_to_a_stdout_that_cannot_be_written_fails(cli):
    """verify's output is its verdict: unwritten, the command fails (as snapshots does)."""
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [*cli_cmd(), "verify", "--repo", str(cli.repo), "--json"], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "could not write to stdout" in p.stderr, p.stderr


def cli_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "vmbackup"]


class ResettingProxy:
    """A TCP proxy in front of an NBD server on a unix socket that, once
    `after` bytes of replies have passed on a connection, resets it (RST,
    SO_LINGER 0): what a server crash or a network failure looks like
    mid-read.

    One thread serves every socket. With a thread per direction, the reset
    was a `close()` from one thread while the other sat in `recv()` on the
    same socket, and Linux releases (and resets) a socket only when its last
    user lets go: the client saw nothing until it sent another request, and
    when its last requests had already passed, it waited out its 60 s
    reply timeout."""

    def __init__(self, upstream: Path, after: int):
        self.upstream, self.after = upstream, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resets = 0
        self._wake, self._waker = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake, selectors.EVENT_READ)
        # socket -> [its peer, whether it carries replies, reply bytes passed]
        pipes: dict[socket.socket, list] = {}

        def drop(*socks: socket.socket, reset: bool = False) -> None:
            for s in socks:
                if s in pipes:
                    sel.unregister(s)
                    del pipes[s]
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

        try:
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._wake:
                        drop(*list(pipes))
                        return
                    if sock is self.listener:
                        client, _ = self.listener.accept()
                        server = socket.socket(socket.AF_UNIX)
                        try:
                            server.connect(str(self.upstream))
                        except OSError:
                            # The server is gone: the client hears so at
                            # once instead of waiting for a handshake.
                            server.close()
                            drop(client, reset=True)
                            continue
                        pipes[client] = [server, False, 0]
                        pipes[server] = [client, True, 0]
                        sel.register(client, selectors.EVENT_READ)
                        sel.register(server, selectors.EVENT_READ)
                        continue
                    if sock not in pipes:
                        continue  # closed earlier in this round
                    peer, replies, passed = pipes[sock]
                    try:
                        data = sock.recv(65536)
                        if data:
                            peer.sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        drop(sock, peer)
                    elif replies and passed + len(data) >= self.after:
                        # Counted first: the client may look as soon as it
                        # sees the RST. Nothing else holds the client's
                        # socket, so closing it sends the RST now.
                        self.resets += 1
                        drop(sock)
                        drop(peer, reset=True)
                    else:
                        pipes[sock][2] = passed + len(data)
        finally:
            sel.close()

    def close(self) -> None:
        self._waker.send(b"x")
        self._thread.join()
        for s in (self.listener, self._wake, self._waker):
            s.close()


@pytest.fixture
def nbdkit_pattern(tmp_path):
    """nbdkit's pattern plugin on a unix socket: no port to pick, so no race
    with other processes for one. Without -f nbdkit returns once it listens
    (and has written its pid file)."""
    sock, pidfile = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.pid"
    subprocess.run(
        [shutil.which("nbdkit"), "-r", "-U", str(sock), "-P", str(pidfile), "pattern", "size=64M"],
        check=True,
    )
    yield sock
    subprocess.run(["kill", pidfile.read_text().strip()], check=False)


def test_an_nbd_reset_mid_read_is_retryable_and_exits_1(cli, nbdkit_pattern):
    proxy = ResettingProxy(nbdkit_pattern, after=4 * MiB)
    uri = f"nbd://127.0.0.1:{proxy.port}/"
    try:
        p = cli.run("backup-disk", "--vm", "v", "--nbd-connections", "1", uri, expect=1)
        assert "reading extent" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        # The reset itself failed the read, not the reply timeout (60 s) that
        # a connection which merely went quiet would run into.
        assert "no reply from the server" not in p.stderr, p.stderr
        s = _mover.BackupSession(str(cli.repo), "v")
        with pytest.raises(SourceUnavailableError) as e:
            s.add_disk(uri, "d", nbd_connections=1)
        s.abort()
        assert e.value.retryable and proxy.resets >= 2
        assert "no reply from the server" not in str(e.value), e.value
    finally:
        proxy.close()
    assert cli.json("snapshots") == []
    # The same export without the failure backs up: retrying was right.
    b = cli.json("backup-disk", "--vm", "v", f"nbd+unix:///?socket={nbdkit_pattern}")
    assert b["disk_size"] == 64 * MiB
