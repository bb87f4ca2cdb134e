"""The local server lets no one in without its auth string: a server an
earlier vmbackup left running without one is replaced, a request without
credentials gets 401, vmbackup's own commands get in, and the string is in
no command line, no log and no output."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .procs import child_env, session_ids, vmbackup

ENSURE = "import json; from vmbackup.localserver import server; print(json.dumps(server.ensure_server().to_dict()))"

# What `vmbackup backup` does before its flow: the server, its settings, a
# Prefect client (here: the limits it creates and reads).
COMMAND = """
import json, os
from vmbackup.localserver import server
os.environ.update(server.client_env(server.ensure_server()))
from vmbackup.orchestration import limits
limits.ensure_limits({"vmbackup-test-auth": 3})
print(json.dumps(limits.read_limits(["vmbackup-test-auth"])["vmbackup-test-auth"]))
"""


def status_of(url: str, auth: str | None = None, method: str = "GET", body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _cmdlines(pid: int) -> str:
    """The command lines of the server's whole session, as `ps` shows them."""
    out = []
    for p in session_ids(pid):
        try:
            out.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return "\n".join(out)


def _start_unprotected(state: Path, port: int) -> subprocess.Popen:
    """A server as vmbackup 0.x started it: no auth string, its record without ``auth``."""
    from vmbackup.localserver import server

    env = {k: v for k, v in server.server_env(state, port).items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
    (state / "api-auth").unlink()  # that version made none
    (state / "prefect").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=state,
        stdin=subprocess.DEVNULL,
        stdout=open(state / "server.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    record = {"pid": proc.pid, "start_time": server._start_time(proc.pid), "port": port, "started": 0}
    (state / "server.json").write_text(json.dumps(record))
    while not server.healthy(f"http://127.0.0.1:{port}/api", timeout=10):
        assert proc.poll() is None, (state / "server.log").read_text()[-2000:]
        time.sleep(0.2)  # a pause between polls of the condition, not a wait for it
    return proc


def test_local_server_asks_for_its_auth_string(tmp_path):
    from vmbackup.localserver import server

    state = tmp_path / "state"
    env = child_env(state)
    old = None
    try:
        old = _start_unprotected(state, server._free_port(None))
        api_old = f"http://127.0.0.1:{json.loads((state / 'server.json').read_text())['port']}/api"
        # The hole the old server had: anyone reads its API.
        assert status_of(api_old + "/admin/version") == 200
        assert json.loads(vmbackup("server", "status", "--json", env=env).stdout)["auth"] is False

        # The next command replaces it with a server that asks for the string.
        p = subprocess.run([sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        assert info["started"] is True and info["pid"] != old.pid and info["auth"] is True, info
        assert old.wait(timeout=60) is not None and session_ids(old.pid) == []
        assert "restarting the local Prefect server" in p.stderr and "did not ask for credentials" in p.stderr

        auth = (state / "api-auth").read_text().strip()
        assert len(auth) > 40 and auth.startswith("vmbackup:")
        assert stat.S_IMODE((state / "api-auth").stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700

        st = json.loads(vmbackup("server", "status", "--json", env=env).stdout)
        api = st["api_url"]
        assert st["auth"] is True and st["auth_file"] == str(state / "api-auth") and st["pid"] == info["pid"]
        assert status_of(api + "/admin/version") == 401
        assert status_of(api + "/admin/version", "vmbackup:wrong") == 401
        assert status_of(api + "/flow_runs/filter", method="POST", body=b"{}") == 401
        assert status_of(api + "/block_documents/filter", method="POST", body=b"{}") == 401
        assert status_of(api + "/admin/version", auth) == 200
        assert status_of(api + "/health") == 200  # probes stay open; they tell nothing

        # vmbackup's own commands get in; a Prefect client without the string does not.
        p = subprocess.run([sys.executable, "-c", COMMAND], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.strip().splitlines()[-1]) == [3, 0]
        outsider = {k: v for k, v in child_env(tmp_path / "other", api).items() if k != "PREFECT_API_AUTH_STRING"}
        code = "from vmbackup.orchestration import limits; limits.read_limits(['vmbackup-test-auth'])"
        p = subprocess.run([sys.executable, "-c", code], env=outsider, capture_output=True, text=True, timeout=600)
        assert p.returncode != 0 and "401" in p.stderr, p.stderr[-2000:]

        # A second command reuses the server (no restart: it asks for the string).
        again = json.loads(
            subprocess.run([sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True).stdout
        )
        assert again["pid"] == info["pid"] and again["started"] is False

        # The string is in no command line of the server's processes, no log, no output.
        assert f"server start --host 127.0.0.1 --port {st['port']}" in _cmdlines(info["pid"])  # they were read
        assert auth not in _cmdlines(info["pid"])
        assert auth not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert auth not in (state / "server.log").read_text(errors="replace")
        human = vmbackup("server", "status", env=env).stdout
        assert "login: the auth string in " + str(state / "api-auth") in human
        assert auth not in human + json.dumps(st) + json.dumps(info) + p.stdout + p.stderr
    finally:
        subprocess.run([sys.executable, "-m", "vmbackup", "server", "stop"], env=env, capture_output=True)
        if old is not None and old.poll() is None:
            os.killpg(old.pid, 9)
            old.wait()
