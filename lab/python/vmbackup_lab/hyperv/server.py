"""The lab Hyper-V host's WinRM endpoint: WS-Management over HTTP and HTTPS.

Authentication as a Windows host configured for it: NTLM (Negotiate) on both
listeners, accepted by pyspnego against an NTLM user file; Basic on HTTPS
only. NTLM authenticates the TCP connection (HTTP/1.1 keep-alive), so the
handler keeps one security context per connection. Over HTTP every message
after authentication must be sealed (MS-WSMV 2.2.9.1.1: a
multipart/encrypted body of "application/HTTP-SPNEGO-session-encrypted"
parts) and every answer is sealed the same way; plain bodies are refused, as
Windows does with AllowUnencrypted=false.

The remote shell resource keeps shells and commands in memory; a command runs
to completion when it arrives (`powershell.run`) and Receive hands out its
output. `drop_sessions` forgets every shell and closes every connection, as a
WinRM service restart does.

`/lab/...` on the HTTPS listener is the lab's control endpoint (bearer token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import ssl
import struct
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import spnego
from spnego.channel_bindings import GssChannelBindings

from . import powershell, wsman
from .host import Host, HostError

log = logging.getLogger(__name__)

BOUNDARY = b"--Encrypted Boundary"
SPNEGO_ENCRYPTED = "application/HTTP-SPNEGO-session-encrypted"
CHUNK = 64 * 1024  # stdout bytes per Receive answer (well inside MaxEnvelopeSize)


@dataclass
class Command:
    stdout: bytes
    stderr: bytes
    status: int
    sent_out: int = 0
    sent_err: int = 0


@dataclass
class Shell:
    id: str
    commands: dict[str, Command] = field(default_factory=dict)


class LabWinRM:
    """Both listeners, the shells, and the control endpoint of one lab host."""

    def __init__(self, host: Host, user: str, password: str, token: str, ssl_context: ssl.SSLContext, cert_der: bytes):
        self.host = host
        self.user = user
        self.password = password
        self.token = token
        self.shells: dict[str, Shell] = {}
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.generation = 0  # bumped by drop_sessions: older NTLM contexts are void
        self.cbt = GssChannelBindings(application_data=b"tls-server-end-point:" + hashlib.sha256(cert_der).digest())
        self.counters = {"commands": 0, "scripts": {}, "dropped": 0}
        self.http = _Server(("127.0.0.1", 0), self, tls=None)
        self.https = _Server(("127.0.0.1", 0), self, tls=ssl_context)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for srv in (self.http, self.https):
            t = threading.Thread(target=srv.serve_forever, name=f"winrm-{srv.server_address[1]}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        for srv in (self.http, self.https):
            srv.shutdown()
            srv.server_close()
        self.drop_sessions()

    def drop_sessions(self, keep: socket.socket | None = None) -> int:
        """Forget every shell and close every connection (and its NTLM context)
        but `keep` (the control request asking for it); returns how many shells there were."""
        with self.lock:
            shells = len(self.shells)
            self.shells.clear()
            self.generation += 1
            self.counters["dropped"] += 1
            conns = [c for c in self.connections if c is not keep]
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return shells

    # --- the shell resource --------------------------------------------------------

    def handle_soap(self, data: bytes, address: str) -> tuple[int, bytes, bool]:
        """(HTTP status, answer, drop the connection after answering)."""
        try:
            req = wsman.parse(data)
        except wsman.BadRequest as e:
            return 400, str(e).encode(), False
        try:
            return 200, *self._dispatch(req, address)
        except wsman.Fault as f:
            return 500, wsman.fault_response(req.message_id, f, self.host.name.upper()), False

    def _dispatch(self, req: wsman.Request, address: str) -> tuple[bytes, bool]:
        if req.resource_uri != wsman.RESOURCE_CMD:
            raise wsman.Fault("w:DestinationUnreachable", 0x80338000, f"The lab host serves only {wsman.RESOURCE_CMD}.")
        if req.action == wsman.ACTION_CREATE:
            shell = Shell(str(uuid.uuid4()).upper())
            with self.lock:
                self.shells[shell.id] = shell
            return wsman.create_response(req, address, shell.id), False
        shell = self._shell(req)
        if req.action == wsman.ACTION_DELETE:
            with self.lock:
                self.shells.pop(shell.id, None)
            return wsman.delete_response(req), False
        if req.action == wsman.ACTION_COMMAND:
            cmd, args = wsman.command_line(req.body)
            with self.host.lock:  # one command at a time sees and changes the model
                out = powershell.run(self.host, cmd, args)
            cid = str(uuid.uuid4()).upper()
            with self.lock:
                self.counters["commands"] += 1
                if out.script:
                    self.counters["scripts"][out.script] = self.counters["scripts"].get(out.script, 0) + 1
                shell.commands[cid] = Command(out.stdout, out.stderr, out.status)
            drop = bool(out.script) and self.host.faults.get("drop_during") == out.script
            return wsman.command_response(req, cid), drop
        if req.action == wsman.ACTION_RECEIVE:
            c = self._command(shell, wsman.command_id_of(req.body, "Receive"))
            with self.lock:
                out = c.stdout[c.sent_out : c.sent_out + CHUNK]
                c.sent_out += len(out)
                err = c.stderr[c.sent_err : c.sent_err + CHUNK]
                c.sent_err += len(err)
                done = c.sent_out >= len(c.stdout) and c.sent_err >= len(c.stderr)
            cid = wsman.command_id_of(req.body, "Receive")
            return wsman.receive_response(req, cid, out, err, done, c.status), False
        if req.action == wsman.ACTION_SIGNAL:
            cid = wsman.command_id_of(req.body, "Signal")
            self._command(shell, cid)
            with self.lock:
                shell.commands.pop(cid, None)
            return wsman.signal_response(req), False
        raise wsman.Fault(
            "a:ActionNotSupported", wsman.ACTION_NOT_SUPPORTED, f"The action {req.action} is not supported."
        )

    def _shell(self, req: wsman.Request) -> Shell:
        sid = req.selectors.get("ShellId", "")
        with self.lock:
            shell = self.shells.get(sid)
        if shell is None:
            raise wsman.Fault(
                "w:InvalidSelectors",
                wsman.SHELL_NOT_FOUND,
                f"The request for the Windows Remote Shell with ShellId {sid} failed because the shell was not found on the server.",
            )
        return shell

    def _command(self, shell: Shell, cid: str) -> Command:
        with self.lock:
            c = shell.commands.get(cid)
        if c is None:
            raise wsman.Fault(
                "w:InvalidSelectors", wsman.SHELL_NOT_FOUND, f"The command {cid} was not found in shell {shell.id}."
            )
        return c

    # --- the lab's control endpoint ---------------------------------------------------

    def control(self, path: str, body: dict, conn: socket.socket | None = None) -> tuple[int, dict]:
        h = self.host
        try:
            if path == "/lab/status":
                st = h.status()
                st["winrm"] = dict(self.counters, shells=len(self.shells))
                return 200, st
            if path == "/lab/write":
                h.write(
                    str(body["vm"]),
                    str(body["disk"]),
                    int(body["offset"]),
                    int(body["length"]),
                    int(body.get("seed", 1)),
                )
                top = h.disk(str(body["vm"]), str(body["disk"])).top.winpath
                return 200, {"vm": body["vm"], "disk": body["disk"], "file": top, "host": h.name}
            if path == "/lab/disk-image":
                out = Path(body["output"])
                if not out.is_absolute():
                    raise HostError("output must be an absolute path")
                h.disk_image(str(body["vm"]), str(body["disk"]), out, body.get("shadow"))
                return 200, {"output": str(out), "size": out.stat().st_size, "host": h.name}
            if path == "/lab/fault":
                vm = body.get("vm")
                h.set_faults(vm, dict(body.get("faults") or {}))
                return 200, {"faults": h.vm(vm).faults if vm else h.faults, "host": h.name}
            if path == "/lab/drop-sessions":
                return 200, {"dropped": self.drop_sessions(keep=conn), "host": h.name}
            if path == "/lab/counters/reset":
                return 200, h.reset_counters()
        except (HostError, KeyError, ValueError, TypeError) as e:
            return 400, {"error": str(e) if not isinstance(e, KeyError) else f"missing field {e}"}
        return 404, {"error": f"no control path {path}"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, lab: LabWinRM, tls: ssl.SSLContext | None):
        self.lab = lab
        self.tls = tls
        super().__init__(addr, _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            # the handshake happens in the connection's thread (setup), not here
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self):
        if self.server.tls is not None:
            self.request.settimeout(30)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
        super().setup()
        self.ntlm = None
        self.ntlm_generation = -1
        self.authenticated = False
        with self.server.lab.lock:
            self.server.lab.connections.add(self.request)

    def finish(self):
        with self.server.lab.lock:
            self.server.lab.connections.discard(self.request)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args):  # the access log would carry no secrets, but is noise
        log.debug("%s " + fmt, self.client_address[0], *args)

    @property
    def tls(self) -> bool:
        return self.server.tls is not None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, close: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _challenge(self, token: bytes | None = None):
        headers = {"WWW-Authenticate": "Negotiate" + (" " + base64.b64encode(token).decode() if token else "")}
        if not token and self.tls:
            headers = {"WWW-Authenticate": 'Negotiate, Basic realm="WSMAN"'}
        self._send(401, b"", headers)

    def do_GET(self):
        self._body()
        if self.path.startswith("/lab/"):
            return self._control({})
        self._send(405)

    def do_POST(self):
        data = self._body()
        if self.path.startswith("/lab/"):
            try:
                body = json.loads(data or b"{}")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return self._send(400, b'{"error": "body is not a JSON object"}', {"Content-Type": "application/json"})
            return self._control(body)
        if self.path.rstrip("/").lower() != "/wsman":
            return self._send(404)
        lab = self.server.lab
        if self.authenticated and self.ntlm is not None and self.ntlm_generation != lab.generation:
            self.authenticated, self.ntlm = False, None
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        scheme = scheme.lower()
        if scheme in ("negotiate", "ntlm"):
            try:
                token = base64.b64decode(value)
            except ValueError:
                return self._challenge()
            if token[8:12] == struct.pack("<I", 1):  # NEGOTIATE_MESSAGE: a new context
                self.ntlm = spnego.server(protocol="ntlm", channel_bindings=lab.cbt if self.tls else None)
                self.authenticated = False
            if self.ntlm is None:
                return self._challenge()
            try:
                answer = self.ntlm.step(token)
            except Exception:  # wrong password, bad bindings: pyspnego raises its own errors
                self.ntlm = None
                return self._challenge()
            if not self.ntlm.complete:
                return self._challenge(answer)
            self.authenticated = True
            self.ntlm_generation = lab.generation
        elif scheme == "basic":
            if not self.tls:  # Windows refuses Basic over HTTP unless AllowUnencrypted
                return self._challenge()
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return self._challenge()
            if not (
                hmac.compare_digest(user.lower(), lab.user.lower()) and hmac.compare_digest(password, lab.password)
            ):
                return self._challenge()
        elif not self.authenticated:
            return self._challenge()
        ctype = self.headers.get("Content-Type", "")
        sealed = ctype.startswith("multipart/encrypted")
        if sealed:
            if self.ntlm is None or not self.authenticated:
                return self._send(400, close=True)
            try:
                data = _unseal(self.ntlm, data)
            except Exception:
                # sealed with keys this connection does not have (an old session)
                return self._send(400, close=True)
        elif data and self.ntlm is not None and not self.tls:
            return self._send(400, b"unencrypted messages are refused (AllowUnencrypted is false)", close=True)
        if not data:
            return self._send(200)
        scheme_host = f"{'https' if self.tls else 'http'}://{self.headers.get('Host', '127.0.0.1')}/wsman"
        status, answer, drop = lab.handle_soap(data, scheme_host)
        if drop:
            # the WinRM session dies while the command runs: no answer at all
            lab.drop_sessions()
            self.close_connection = True
            return
        if sealed:
            body = _seal(self.ntlm, answer)
            headers = {
                "Content-Type": f'multipart/encrypted;protocol="{SPNEGO_ENCRYPTED}";boundary="Encrypted Boundary"'
            }
            return self._send(status, body, headers)
        self._send(status, answer, {"Content-Type": "application/soap+xml;charset=UTF-8"})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _control(self, body: dict):
        lab = self.server.lab
        auth = self.headers.get("Authorization", "")
        if not self.tls or not hmac.compare_digest(auth, f"Bearer {lab.token}"):
            return self._send(403, b'{"error": "forbidden"}', {"Content-Type": "application/json"})
        status, answer = lab.control(self.path, body, self.request)
        self._send(status, json.dumps(answer).encode(), {"Content-Type": "application/json"})


def _unseal(ctx, data: bytes) -> bytes:
    parts = [p for p in data.split(BOUNDARY + b"\r\n") if p]
    out = b""
    for i in range(0, len(parts) - 1, 2):
        m = re.search(rb"Length=(\d+)", parts[i])
        if not m:
            raise ValueError("encrypted part without a length")
        payload = parts[i + 1]
        if payload.endswith(BOUNDARY + b"--\r\n"):
            payload = payload[: -len(BOUNDARY + b"--\r\n")]
        prefix = b"\tContent-Type: application/octet-stream\r\n"
        if not payload.startswith(prefix):
            raise ValueError("encrypted part without its content type")
        payload = payload[len(prefix) :]
        (siglen,) = struct.unpack("<I", payload[:4])
        msg = ctx.unwrap(payload[4 : 4 + siglen] + payload[4 + siglen :]).data
        if len(msg) != int(m.group(1)):
            raise ValueError("decrypted length does not match")
        out += msg
    return out


def _seal(ctx, message: bytes) -> bytes:
    wrapped = ctx.wrap(message, encrypt=True).data
    sig, sealed = wrapped[:16], wrapped[16:]
    return (
        BOUNDARY + b"\r\n"
        b"\tContent-Type: " + SPNEGO_ENCRYPTED.encode() + b"\r\n"
        b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
        + str(len(message)).encode()
        + b"\r\n"
        + BOUNDARY
        + b"\r\n"
        b"\tContent-Type: application/octet-stream\r\n"
        + struct.pack("<I", len(sig))
        + sig
        + sealed
        + BOUNDARY
        + b"--\r\n"
    )


def user_file(path: Path, user: str, password: str) -> None:
    """The NTLM user file pyspnego's acceptor reads (NTLM_USER_FILE): DOMAIN:USER:PASSWORD."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f":{user}:{password}\n")
