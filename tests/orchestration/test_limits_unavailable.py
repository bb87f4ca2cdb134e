"""A Prefect server that refuses a request for slots for a moment (a 503
under load, nothing listening) is asked again with back-off within the VM's
deadline: the VM still runs. Only a refusal that outlasts the deadline is
``LimitsUnavailableError`` (retryable), before any work starts.

The refusals come from a real HTTP proxy in front of the real server (the
session's managed one), which answers 503 to the first N slot requests and
passes everything else through, websockets included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

from .procs import child_env

PROBE = """
from vmbackup.errors import LimitsUnavailableError
from vmbackup.orchestration import limits
started = False
try:
    with limits.hold(["vmbackup-agent-a", "vmbackup-host-esx1"], patience=2.0):
        started = True
except LimitsUnavailableError as e:
    assert not started
    print("retryable" if e.retryable else "permanent", e)
"""


def test_no_answer_from_the_server_is_asked_again_then_a_retryable_error_before_any_work():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_CLIENT_MAX_RETRIES="0",
        DO_NOT_TRACK="1",
    )
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("retryable the Prefect server did not grant the limits vmbackup-agent-a"), p.stdout
    # Asked again (connection refused is transient) until the patience ran out.
    assert " requests): " in p.stdout and "asking again in" in p.stderr, (p.stdout, p.stderr)


ACQUIRE = b"/v2/concurrency_limits/increment-with-lease"


class RefusingProxy:
    """HTTP/1.1 in front of ``upstream``: answers ``503`` to the first
    ``refuse`` requests for slots (``POST .../increment-with-lease``) and
    forwards every other request, and its answer, byte for byte; a websocket
    upgrade becomes a plain two-way pipe."""

    def __init__(self, upstream: str, refuse: int):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.refuse, self.refused, self.acquires = refuse, 0, 0
        self.answers: list[int] = []  # the server's status for each request for slots it was given
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}{u.path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # One upstream connection per request: the proxy adds no failures of
        # its own (an upstream keep-alive closed while the client's is open).
        cin = conn.makefile("rb")
        try:
            while True:
                head = _head(cin)
                if head is None:
                    return
                body = _body(cin, head, request=True)
                line = head.split(b"\r\n", 1)[0]
                if ACQUIRE in line:
                    with self._lock:
                        self.acquires += 1
                        refuse = self.refused < self.refuse
                        self.refused += refuse
                    if refuse:
                        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        continue
                with socket.create_connection(self.upstream) as up:
                    up.sendall(head + body)
                    uin = up.makefile("rb")
                    if b"\r\nupgrade: websocket" in head.lower():
                        threading.Thread(target=_pipe, args=(cin, up), daemon=True).start()
                        _pipe(uin, conn)
                        return
                    answer = _head(uin)
                    if answer is None:
                        return
                    if ACQUIRE in line:
                        self.answers.append(int(answer.split(b" ", 2)[1]))
                    conn.sendall(answer + _body(uin, answer, request=False, method=line.split(b" ", 1)[0]))
                if b"\r\nconnection: close" in answer.lower():
                    return
        except OSError:
            return
        finally:
            conn.close()


def _head(f) -> bytes | None:
    lines = []
    while True:
        line = f.readline()
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _body(f, head: bytes, *, request: bool, method: bytes = b"") -> bytes:
    if not request:
        status = int(head.split(b" ", 2)[1])
        if method == b"HEAD" or status in (101, 204, 304) or 100 <= status < 200:
            return b""
    n = _header(head, b"content-length")
    if n is not None:
        return f.read(int(n))
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        out = []
        while True:
            size_line = f.readline()
            out.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := f.readline()) not in (b"\r\n", b"\n", b""):
                    out.append(trailer)
                out.append(b"\r\n")
                return b"".join(out)
            out.append(f.read(size + 2))
    return b"" if request else f.read()


def _pipe(src, dst: socket.socket) -> None:
    try:
        while data := src.read1(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


CHILD = """
import json, sys
from prefect import flow
from vmbackup.orchestration import vmtask

ran = []

def work(token):
    ran.append(1)
    return {"status": "ok", "backup_id": "b1"}

@flow(name="limits-refused", validate_parameters=False)
def run():
    job = vmtask.VmJob("vm1", [sys.argv[1]], work, {"repository": "/r"})
    return vmtask.run_vm_tasks([job], max_workers=1, retries=0, deadline_seconds=float(sys.argv[2]))

rows = run()
print(json.dumps({"rows": rows, "ran": len(ran)}, default=str))
"""


@pytest.mark.parametrize(
    ("refuse", "deadline", "ok"),
    [(3, 120.0, True), (10**6, 5.0, False)],
    ids=["refused-for-a-moment", "refused-past-the-deadline"],
)
def test_a_server_refusing_slot_requests_is_asked_again_within_the_vm_deadline(prefect_server, refuse, deadline, ok):
    from vmbackup.orchestration import limits

    name = f"vmbackup-test-refused-{refuse}"
    limits.ensure_limits({name: 1})
    proxy = RefusingProxy(prefect_server.api_url, refuse)
    try:
        # The client's own retries off: every 503 reaches vmbackup's code (a
        # loaded server outlasts them: docs/flows.md, "Scale").
        env = dict(child_env(Path(prefect_server.state_dir), proxy.url), PREFECT_CLIENT_MAX_RETRIES="0")
        p = subprocess.run(
            [sys.executable, "-c", CHILD, name, str(deadline)], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        proxy.close()
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[-1])
    (row,) = out["rows"]
    if ok:
        assert row["status"] == "ok" and row["backup_id"] == "b1" and out["ran"] == 1, row
        assert proxy.refused == refuse and proxy.acquires == refuse + 1, proxy.answers
    else:
        assert row["status"] == "failed" and out["ran"] == 0, row
        assert row["error"].startswith(f"the Prefect server did not grant the limits {name} ("), row["error"]
        assert "503 Service Unavailable" in row["error"] and proxy.acquires >= 2
    assert limits.read_limits([name])[name][1] == 0  # no slot left held
