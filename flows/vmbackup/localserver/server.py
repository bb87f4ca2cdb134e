"""The embedded default: a local Prefect server that vmbackup starts and keeps.

With ``PREFECT_API_URL`` set, that server is used and nothing is started.
Without it, vmbackup runs ``prefect server start`` on 127.0.0.1, detached
(its own session, so neither Ctrl-C nor kill -9 of a backup takes it down and
it is never an orphan of a run: it belongs to no run), and reuses it for
later runs. Everything it keeps is under the state directory
(``$VMBACKUP_STATE_DIR``, else ``$XDG_STATE_HOME/vmbackup``, else
``~/.local/state/vmbackup``)::

    server.json      pid, process start time, port, URL of the running server
    server.lock      flock: one starter at a time across processes
    server.log       the server's output
    api-auth         the server's auth string (0600; the directory is 0700)
    prefect/         PREFECT_HOME: prefect.db (SQLite), concurrency_leases/

The server lets no one in without its auth string (Prefect's basic
authentication: ``PREFECT_SERVER_API_AUTH_STRING`` on the server,
``PREFECT_API_AUTH_STRING`` on its clients; only ``/api/health`` and
``/api/ready`` stay open): without it, any local user who reaches the port
reads every Secret block in plain text and can start any run. The string is
generated once (``secrets.token_urlsafe``) into ``api-auth``, reaches the
server through its environment (never its command line: ``ps`` shows every
user the command line) and vmbackup's own commands through
:func:`client_env`. A server of an earlier vmbackup found running without
it (or with another string) is restarted with it.

Why these settings: leases go to files (the in-memory store lost them on a
restart, and a crashed run's slot stayed held for good); analytics off (an
offline machine logs a telemetry error on every run); the UI is told its API
port (else it calls 4200); the start-up wait is generous because migrations
on a fresh database took ~19 s here. Flows always get ``PREFECT_API_URL``
pointing at this server, so Prefect never starts its per-process ephemeral
server (which outlives a killed run and never frees a crashed run's slots).

This module does not import Prefect: the health check is plain HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ServerError

DEFAULT_STARTUP_TIMEOUT = 180.0
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
AUTH_FILE = "api-auth"
AUTH_USER = "vmbackup"  # the UI's login form asks for `user:password`: the whole string


@dataclass
class ServerInfo:
    """A Prefect API to run flows against."""

    api_url: str
    ui_url: str
    managed: bool  # started and kept by vmbackup (False: $PREFECT_API_URL)
    pid: int | None = None
    port: int | None = None
    started: bool = False  # started by this call
    state_dir: str | None = None
    log: str | None = None
    auth: bool = False  # the server asks for credentials (the string itself is never here)

    def to_dict(self) -> dict:
        return asdict(self)


def state_dir() -> Path:
    env = os.environ.get("VMBACKUP_STATE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return (base / "vmbackup").absolute()


def _startup_timeout() -> float:
    text = os.environ.get("VMBACKUP_SERVER_STARTUP_TIMEOUT")
    try:
        return float(text) if text else DEFAULT_STARTUP_TIMEOUT
    except ValueError:
        return DEFAULT_STARTUP_TIMEOUT


# --- the auth string -----------------------------------------------------------


def _private_dir(state: Path) -> None:
    """The state directory, made (or narrowed to) 0700: it holds the auth
    string, and the database with the Secret blocks (and the key that
    decrypts them)."""
    state.mkdir(parents=True, exist_ok=True)
    st = state.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        state.chmod(0o700)


def auth_path(state: Path | None = None) -> Path:
    return (state or state_dir()) / AUTH_FILE


def read_auth(state: Path | None = None) -> str | None:
    """The managed server's auth string, or None when none was made yet."""
    path = auth_path(state)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ServerError(f"cannot read the Prefect server's auth string {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        if stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o077:
            os.fchmod(f.fileno(), 0o600)
        text = f.read().strip()
    return text or None


def ensure_auth(state: Path | None = None) -> str:
    """The managed server's auth string, generated once (0600, in a 0700
    state directory) when there is none."""
    state = state or state_dir()
    _private_dir(state)
    found = read_auth(state)
    if found:
        return found
    value = f"{AUTH_USER}:{secrets.token_urlsafe(32)}"
    tmp = state / f"{AUTH_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, auth_path(state))  # never replaces a string another starter wrote
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_auth(state) or value


def _auth_header(auth: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def _status_of(api_url: str, headers: dict[str, str], timeout: float) -> int | None:
    req = urllib.request.Request(api_url.rstrip("/") + "/admin/version", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def requires_auth(api_url: str, timeout: float = 10.0) -> bool | None:
    """Does the server refuse a request without credentials (401)? None
    when it does not answer."""
    code = _status_of(api_url, {}, timeout)
    return None if code is None else code == 401


def _why_replace(api_url: str, auth: str, timeout: float = 30.0) -> str | None:
    """Why a running server must be replaced by one that asks for ``auth``:
    it let a request without credentials in, or refused ``auth``. None when
    it did neither (a busy server that does not answer in time is kept, as
    a slow health check keeps it)."""
    anonymous = _status_of(api_url, {}, timeout)
    if anonymous is not None and anonymous != 401:
        return "it did not ask for credentials"
    if _status_of(api_url, _auth_header(auth), timeout) == 401:
        return "it does not take the auth string of this state directory"
    return None


def server_env(state: Path, port: int) -> dict[str, str]:
    """The environment of the managed server process (its auth string
    included: the environment is readable only by its user and root)."""
    home = state / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_SERVER_API_AUTH_STRING=ensure_auth(state),
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASE_STORAGE,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_UI_ENABLED="true",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


def client_env(info: ServerInfo) -> dict[str, str]:
    """Settings for a process that runs flows against ``info``; set them
    before Prefect is imported (its settings are read at import).

    For the managed server, its auth string (``PREFECT_API_AUTH_STRING``).
    For ``$PREFECT_API_URL`` the caller's own ``PREFECT_API_AUTH_STRING``
    is kept; when it has none and the URL is the managed server of this
    state directory, that server's string is given, so a command pointed
    at the local server by its URL gets in too."""
    env = {
        "PREFECT_API_URL": info.api_url,
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "DO_NOT_TRACK": "1",
    }
    auth = None
    if info.managed and info.state_dir:
        env["PREFECT_HOME"] = str(Path(info.state_dir) / "prefect")
        auth = read_auth(Path(info.state_dir))
    elif not os.environ.get("PREFECT_API_AUTH_STRING"):
        auth = _managed_auth_for(info.api_url)
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def _managed_auth_for(api_url: str) -> str | None:
    """The auth string of this state directory's running server if
    ``api_url`` is that server's."""
    state = state_dir()
    record = _read_record(state)
    if not _alive(record) or _info(state, record, started=False).api_url.rstrip("/") != api_url.rstrip("/"):
        return None
    return read_auth(state)


# --- processes --------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22),
    so a recycled pid is not mistaken for our server."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _alive(record: dict) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _start_time(pid) is not None and _start_time(pid) == record.get("start_time")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200 and json.load(r) is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_healthy(api_url: str, pid: int) -> bool:
    deadline = time.monotonic() + _startup_timeout()
    while not healthy(api_url, timeout=10.0):
        if time.monotonic() > deadline or _start_time(pid) is None:
            return False
        time.sleep(0.5)
    return True


def _free_port(preferred: int | None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ServerError("no free local port for the Prefect server")


def _read_record(state: Path) -> dict:
    try:
        data = json.loads((state / "server.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(state: Path, record: dict) -> None:
    tmp = state / "server.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, state / "server.json")


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    _private_dir(state)
    with open(state / "server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _info(state: Path, record: dict, started: bool) -> ServerInfo:
    port = record["port"]
    return ServerInfo(
        api_url=f"http://127.0.0.1:{port}/api",
        ui_url=f"http://127.0.0.1:{port}/",
        managed=True,
        pid=record["pid"],
        port=port,
        started=started,
        state_dir=str(state),
        log=str(state / "server.log"),
        auth=record.get("auth") is True,
    )


def _log_tail(state: Path, lines: int = 5) -> str:
    try:
        text = (state / "server.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _terminate(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    # Reap it if it is our child (a server started by this process).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie leader we have not reaped still counts for killpg; check /proc.
    return _start_time(pgid) is not None or any(
        _pgid_of(p) == pgid for p in Path("/proc").iterdir() if p.name.isdigit()
    )


def _pgid_of(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]) if fields[0] != "Z" else None


# --- the public operations ---------------------------------------------------


def ensure_server() -> ServerInfo:
    """The server to run flows against: ``$PREFECT_API_URL``, or the managed
    one, started (and waited for) when none of ours is running."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        ui = url[: -len("/api")] if url.rstrip("/").endswith("/api") else url
        return ServerInfo(api_url=url, ui_url=ui.rstrip("/") + "/", managed=False)
    state = state_dir()
    with _locked(state):
        record = _read_record(state)
        if _alive(record):
            info = _info(state, record, started=False)
            # A server busy with another run may answer slowly, and one whose
            # starter was killed may still be migrating: wait for it as for
            # a start. Only one that never answers is replaced.
            if _wait_healthy(info.api_url, record["pid"]):
                # A server an earlier vmbackup started lets anyone in (or
                # knows another string): replaced by one that asks for ours.
                why = _why_replace(info.api_url, ensure_auth(state))
                if why is None:
                    return info
                print(f"vmbackup: restarting the local Prefect server (pid {record['pid']}): {why}", file=sys.stderr)
            _terminate(record["pid"])
        return _start(state, record.get("port"))


def _start(state: Path, preferred_port: int | None) -> ServerInfo:
    port = _free_port(preferred_port)
    (state / "prefect").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(state / "server.log", "ab") as log:
        log.write(f"--- vmbackup starts the Prefect server on port {port}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=server_env(state, port),
            cwd=state,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: not killed with a run
        )
    record = {"pid": proc.pid, "start_time": _start_time(proc.pid), "port": port, "started": time.time(), "auth": True}
    _write_record(state, record)
    info = _info(state, record, started=True)
    deadline = time.monotonic() + _startup_timeout()
    while not healthy(info.api_url):
        if proc.poll() is not None:
            raise ServerError(
                f"the Prefect server exited with {proc.returncode} while starting; see {state / 'server.log'}: "
                f"{_log_tail(state, 2)}"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise ServerError(
                f"the Prefect server did not answer within {_startup_timeout():.0f} s "
                f"(VMBACKUP_SERVER_STARTUP_TIMEOUT); see {state / 'server.log'}"
            )
        time.sleep(0.25)
    return info


def server_status() -> dict:
    """What ``vmbackup server status`` reports."""
    url = os.environ.get("PREFECT_API_URL")
    state = state_dir()
    if url:
        running = healthy(url)
        out = {"managed": False, "running": running, "api_url": url, "state_dir": str(state)}
        if running:
            out["auth"] = requires_auth(url)
        return out
    record = _read_record(state)
    if not _alive(record):
        return {"managed": True, "running": False, "state_dir": str(state)}
    info = _info(state, record, started=False)
    up = healthy(info.api_url)
    return {
        "managed": True,
        "running": True,
        "healthy": up,
        "pid": info.pid,
        "port": info.port,
        "api_url": info.api_url,
        "ui_url": info.ui_url,
        # Asked of the server itself: a request without credentials is refused.
        "auth": requires_auth(info.api_url) is True if up else info.auth,
        "auth_file": str(auth_path(state)),
        "state_dir": str(state),
        "log": info.log,
    }


def stop_server() -> dict:
    """Stop the managed server (its whole process group); what it did."""
    state = state_dir()
    with _locked(state):
        record = _read_record(state)
        if not _alive(record):
            with contextlib.suppress(FileNotFoundError):
                (state / "server.json").unlink()
            return {"stopped": False, "state_dir": str(state)}
        _terminate(record["pid"])
        if _group_alive(record["pid"]):
            raise ServerError(f"the Prefect server (pid {record['pid']}) did not stop")
        (state / "server.json").unlink()
        return {"stopped": True, "pid": record["pid"], "state_dir": str(state)}
