"""The embedded default server with real processes: one server for two
concurrent starters, reuse, status and stop, and a crashed run's limit slot
coming back after the lease, across a server restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .procs import child_env, session_ids, vmbackup

ENSURE = "import json; from vmbackup.localserver import server; print(json.dumps(server.ensure_server().to_dict()))"

# A flow process whose per-VM task holds a limit slot (the task's work
# blocks until the process is killed).
HOLDER = """
import sys
from prefect import flow
from vmbackup.orchestration import limits, vmtask

def work(token):
    print("held", flush=True)
    sys.stdin.read()
    return {"status": "ok"}

@flow(validate_parameters=False)
def holder():
    limits.ensure_limits({"vmbackup-test-crash": 1})
    job = vmtask.VmJob("crash", ["vmbackup-test-crash"], work)
    return vmtask.run_vm_tasks([job], max_workers=1, lease_seconds=60, retries=0)

holder()
"""


def active_slots(env: dict, name: str) -> int:
    code = f"from vmbackup.orchestration import limits; print(limits.read_limits([{name!r}])[{name!r}][1])"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


def test_server_start_reuse_crashed_holder_restart_and_stop(tmp_path):
    state = tmp_path / "state"
    env = child_env(state)
    try:
        _start_reuse_crash_restart_stop(state, env)
    finally:
        subprocess.run([sys.executable, "-m", "vmbackup", "server", "stop"], env=env, capture_output=True)


def _start_reuse_crash_restart_stop(state, env):

    # Two backups starting at once on a fresh machine: one server.
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    infos = []
    for s in starters:
        out, err = s.communicate(timeout=600)
        assert s.returncode == 0, err
        infos.append(json.loads(out))
    assert infos[0]["pid"] == infos[1]["pid"]
    assert sorted(i["started"] for i in infos) == [False, True]
    pid, api = infos[0]["pid"], infos[0]["api_url"]
    assert os.getsid(pid) == pid, "the server is not in a session of its own"

    status = json.loads(vmbackup("server", "status", "--json", env=env).stdout)
    assert status["running"] and status["healthy"] and status["pid"] == pid and status["ui_url"].endswith("/")
    again = json.loads(subprocess.run([sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True).stdout)
    assert again["pid"] == pid and again["started"] is False

    # A flow run holding a limit slot is killed with -9, in its own session
    # so we can see that it left no process behind (no temporary server).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=child_env(state, api),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert active_slots(child_env(state, api), "vmbackup-test-crash") == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert session_ids(holder.pid) == [], "the killed run left processes behind"

    # The server restarts (vmbackup server stop, then the next backup starts
    # it); the lease is on disk, so the slot still comes back.
    stopped = json.loads(vmbackup("server", "stop", "--json", env=env).stdout)
    assert stopped == {"stopped": True, "pid": pid, "state_dir": str(state)}
    assert session_ids(pid) == []
    assert json.loads(vmbackup("server", "status", "--json", env=env).stdout)["running"] is False
    restarted = json.loads(
        subprocess.run([sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True).stdout
    )
    assert restarted["started"] is True and restarted["pid"] != pid
    renv = child_env(state, restarted["api_url"])

    # Lease 60 s + the server's 15 s sweep; polled, with a generous bound
    # for a loaded machine.
    deadline = time.monotonic() + 600
    while (slots := active_slots(renv, "vmbackup-test-crash")) != 0 and time.monotonic() < deadline:
        time.sleep(2)
    assert slots == 0, "the crashed run's slot never came back"

    assert json.loads(vmbackup("server", "stop", "--json", env=env).stdout)["stopped"] is True
    assert session_ids(restarted["pid"]) == []
    assert json.loads(vmbackup("server", "stop", "--json", env=env).stdout)["stopped"] is False


def test_prefect_api_url_is_used_and_nothing_is_started(tmp_path):
    state = tmp_path / "state"
    env = {**child_env(state), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    p = subprocess.run([sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True)
    info = json.loads(p.stdout)
    assert info["managed"] is False and info["api_url"] == "http://127.0.0.1:9/api" and info["pid"] is None
    assert not state.exists()
    status = json.loads(vmbackup("server", "status", "--json", env=env).stdout)
    assert status == {"managed": False, "running": False, "api_url": "http://127.0.0.1:9/api", "state_dir": str(state)}


def accept_backlog(port: int) -> int:
    """Connections waiting on the server's listening socket (/proc/net/tcp)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
            return int(f[4].split(":")[1], 16)
    return 0


def test_a_slow_server_is_waited_for_not_replaced(prefect_server):
    # A server busy with another run (here: stopped) answers late; a second
    # backup must wait for it, not kill it under the first run's feet.
    env = child_env(Path(prefect_server.state_dir))
    os.kill(prefect_server.pid, signal.SIGSTOP)
    try:
        starter = subprocess.Popen([sys.executable, "-c", ENSURE], env=env, stdout=subprocess.PIPE, text=True)
        # Two health probes queued: the first one went unanswered and the
        # starter asked again instead of replacing the server.
        deadline = time.monotonic() + 300
        while accept_backlog(prefect_server.port) < 2 and starter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert starter.poll() is None, "the starter gave up on a server that was only slow"
    finally:
        os.kill(prefect_server.pid, signal.SIGCONT)
    out, _ = starter.communicate(timeout=300)
    info = json.loads(out)
    assert info["pid"] == prefect_server.pid and info["started"] is False
