"""No secret anywhere: the whole `vmbackup backup` (and `vmbackup restore`) at debug level, on a lab
whose password is a canary, leaves the canary in no log, artifact,
parameter, event, exception text, process list or file of its own; nor
the local Prefect server's auth string, which that server asks for (a
request without it: 401).

One VM backs up, one fails (quiesce required, and the lab makes quiescing
fail), then a second run with a wrong password that contains the canary
(an error that echoed the password would show it); then a restore of the
VM backed up as a new VM, and one with the wrong password. Looked at: the
commands' stdout and stderr; every log line, artifact, flow and task run
(parameters, state messages) and event the server holds, through its API;
the server's whole SQLite database and the state directory as bytes;
`ps -eo args`, sampled while the commands run; the temporary directory the
commands used (TMPDIR). Every line the runs logged carries its VM's context.
The server's database (with its write-ahead log) and its log are searched
for the lab's passwords and for the auth string, byte for byte.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from vmbackup_lab import lab_down, load_lab

from .conftest import PASSWORD_ENV, base_env, run

TOPOLOGY = {
    "mode": "vcenter",
    "datacenter": "dc1",
    "clusters": [{"name": "cluster1", "hosts": ["esxc1", "esxc2"]}],
    "shared_datastores": ["sharedc"],
    "agents_per_host": 1,
    "vms": [
        {"name": "canary-web", "host": "esxc1", "datastore": "esxc1-local", "disks": [{"bus": "scsi", "size_mib": 8}]},
        {"name": "canary-db", "host": "esxc2", "datastore": "sharedc", "disks": [{"bus": "sata", "size_mib": 8}]},
    ],
}


class PsSampler:
    """`ps -eo args` over and over while a command runs (until stopped)."""

    def __init__(self) -> None:
        self.samples: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # At the lowest priority (this thread, and the `ps` it starts, which
        # inherit it): it samples without end, but on the CPU time the
        # commands under test leave, instead of taking a core from them.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self.stop.is_set():
            self.samples.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)

    def __enter__(self) -> PsSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _files_with(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                if needle in p.read_bytes():
                    found.append(str(p))
            except OSError:
                pass
    return found


def _server_holdings(api_url: str, auth: str | None = None) -> dict:
    """Everything the server holds about runs, through its API, as JSON text
    (with ``auth`` as the auth string, else this process's setting: the
    session's server's, see conftest.state_dir)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: api_url} | ({PREFECT_API_AUTH_STRING: auth} if auth else {})
    with temporary_settings(updates=settings), get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
        logs = client.read_logs(limit=200)
        offset = 200
        while True:
            page = client.read_logs(limit=200, offset=offset)
            if not page:
                break
            logs += page
            offset += 200
        artifacts = client.read_artifacts()
        page = client.read_events(filter=EventFilter(), limit=50)
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events += page.events
    dump = lambda xs: [x.model_dump(mode="json") for x in xs]  # noqa: E731
    return {
        "flow_runs": dump(flow_runs),
        "task_runs": dump(task_runs),
        "logs": dump(logs),
        "artifacts": dump(artifacts),
        "events": dump(events),
    }


def _status(url: str, auth: str | None = None) -> int:
    """The HTTP status of a POST of ``{}`` to ``url`` (with ``auth`` as basic authentication)."""
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, b"{}", headers), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _backup(plan: Path, env: dict, json_out: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "vmbackup", "backup", "--plan", str(plan)] + (["--json"] if json_out else [])
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    return p


def _restore(plan: Path, env: dict, expect: int) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "vmbackup", "restore", "--plan", str(plan), "--vm", "canary-web", "--power-on"]
    p = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == expect, p.stdout + p.stderr[-3000:]
    return p


def test_a_canary_password_appears_nowhere(tmp_path):
    canary = "canary" + secrets.token_hex(10)
    lab_state, state, tmp = tmp_path / "lab", tmp_path / "state", tmp_path / "tmp"
    tmp.mkdir()
    topology = tmp_path / "topology.json"
    topology.write_text(json.dumps(TOPOLOGY))
    lab_env = base_env(tmp_path / "unused") | {"VMBACKUP_LAB_PASSWORD": canary}
    summary = json.loads(
        run("lab", "up", "--state", str(lab_state), "--topology", str(topology), "--json", env=lab_env).stdout
    )
    try:
        lab = load_lab(lab_state)
        assert summary["vsphere"]["password"] == canary  # the lab took it
        passwords = [canary] + ([summary["hyperv"]["password"]] if summary.get("hyperv") else [])
        lab.set_faults(vm="canary-db", quiesce_fail=True)
        plan = tmp_path / "plan.yaml"
        data = yaml.safe_load(Path(summary["plan"]).read_text())
        data.update(quiesce="required")
        plan.write_text(yaml.safe_dump(data, sort_keys=False))
        assert canary not in plan.read_text()

        env = base_env(state) | {
            PASSWORD_ENV: canary,
            "TMPDIR": str(tmp),
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "PREFECT_LOGGING_ROOT_LEVEL": "DEBUG",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "DEBUG",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "vmbackup,pyVmomi,urllib3",
        }
        outputs = []
        with PsSampler() as ps:
            # Prefect's console log is on (at debug), so its tracebacks of
            # the failed VM and of the refused run are in stderr too: checked.
            p = _backup(plan, env)
            wrong = _backup(plan, env | {PASSWORD_ENV: canary + "-wrong"}, json_out=False)
            # A restore of the VM backed up, and one refused for its password.
            restored = _restore(plan, env, 0)
            wrong_restore = _restore(plan, env | {PASSWORD_ENV: canary + "-wrong"}, 1)
            outputs += [p.stdout, p.stderr, wrong.stdout, wrong.stderr]
            outputs += [restored.stdout, restored.stderr, wrong_restore.stdout, wrong_restore.stderr]
        assert ps.samples, "ps never ran"

        # The run did what the test needs: one VM ok, one failed with its reason, debug lines logged.
        rows = {r["vm"]: r for r in json.loads(p.stdout.splitlines()[-1] if p.stdout.strip() else "{}")["vms"]}
        assert rows["canary-web"]["status"] == "ok", {k: r["error"] for k, r in rows.items()}
        assert rows["canary-db"]["status"] == "failed" and "quiesc" in rows["canary-db"]["error"].lower(), rows
        assert "wrong user name or password" in wrong.stderr
        assert " | DEBUG " in p.stderr, "the run did not log at debug level"

        [restored_row] = json.loads(restored.stdout.splitlines()[-1])["vms"]
        assert restored_row["status"] == "ok" and restored_row["restored_as"] == "canary-web-restored", restored_row
        assert "wrong user name or password" in wrong_restore.stderr

        status = json.loads(run("server", "status", "--json", env=base_env(state)).stdout)
        api_url, auth = status["api_url"], (state / "api-auth").read_text().strip()
        # The server lets no one in without its auth string.
        assert status["auth"] is True and auth not in json.dumps(status)
        assert _status(api_url + "/flow_runs/filter") == 401
        assert _status(api_url + "/flow_runs/filter", auth) == 200
        held = _server_holdings(api_url, auth)
        # The restore's task, table, summary and event are among what is looked at.
        assert "restore-canary-web" in {r["name"] for r in held["task_runs"]}
        keys = {a["key"] for a in held["artifacts"]}
        assert {"vmbackup-restore-report", "vmbackup-restore-summary"} <= keys, keys
        assert any(e["event"] == "vmbackup.restore.succeeded" for e in held["events"])
        assert {r["name"] for r in held["task_runs"]} >= {"backup-canary-web", "backup-canary-db"}
        # What people see of the first run: its table, summary, progress and events.
        by_key = {a["key"]: a for a in held["artifacts"]}
        table = {r["vm"]: r for r in json.loads(by_key["vmbackup-backup-report"]["data"])}
        assert table["canary-web"]["mb_per_s"] > 0 and table["canary-web"]["full_reason"] == "first backup"
        assert table["canary-web"]["dedup_ratio"] >= 1 and table["canary-db"]["error"] == rows["canary-db"]["error"]
        summary = by_key["vmbackup-backup-summary"]["data"]
        assert "**1 of 2 VM(s) backed up**" in summary and "| repository growth |" in summary
        assert f"| canary-db | esxc2 | vmbackup-agent-esxc2 | {rows['canary-db']['error']} |" in summary
        assert float(by_key["vmbackup-backup-progress"]["data"]) == 100.0
        # At the end it says what happened, not what was under way.
        assert by_key["vmbackup-backup-progress"]["description"] == "done: 1 of 2 VM(s) backed up"
        events = {e["event"]: e for e in held["events"] if e["event"].startswith("vmbackup.vm.")}
        assert events["vmbackup.vm.backed-up"]["resource"]["prefect.resource.id"] == "vmbackup.vm.canary-web"
        assert events["vmbackup.vm.failed"]["payload"]["error"] == rows["canary-db"]["error"]
        related = {
            (r["prefect.resource.role"], r["prefect.resource.id"]) for r in events["vmbackup.vm.failed"]["related"]
        }
        assert {("host", "vmbackup.host.esxc2"), ("datastore", "vmbackup.datastore.sharedc"),
                ("agent", "vmbackup.agent.vmbackup-agent-esxc2")} <= related, related  # fmt: skip
        assert any(fr["parameters"].get("plan_path") == str(plan) for fr in held["flow_runs"])
        failed_states = [t["state"]["message"] or "" for t in held["task_runs"] if t["name"] == "backup-canary-db"]
        assert any("quiesc" in m.lower() for m in failed_states), failed_states

        # Every line a VM's task run logged carries its VM's context: ours,
        # the adapter's (vmbackup.*) and Prefect's, except Prefect's last
        # state line, which it logs after the task run's context has ended.
        task_names = {t["id"]: t["name"] for t in held["task_runs"]}
        lines = [
            (task_names[x["task_run_id"]], x["name"], x["message"])
            for x in held["logs"]
            if task_names.get(x["task_run_id"], "").startswith("backup-")
            and not x["message"].startswith("Finished in state ")
        ]
        assert any(logger.startswith("vmbackup.") for _, logger, _ in lines), "no line of the adapter"
        for task_name, logger, message in lines:
            assert message.startswith(f"[vm={task_name.removeprefix('backup-')} host=esxc"), (logger, message)

        assert any("prefect server start" in sample for sample in ps.samples), "ps never saw the server"
        for what, text in [("output", "\n".join(outputs)), ("ps", "\n".join(ps.samples))] + [
            (k, json.dumps(v)) for k, v in held.items()
        ]:
            assert canary not in text, f"the canary is in the {what}"
            assert auth not in text, f"the auth string is in the {what}"
        # The server's database (every file of it: the WAL too) and its log, as bytes.
        db = sorted((state / "prefect").glob("prefect.db*"))
        assert db and (state / "server.log").is_file(), sorted(os.listdir(state))
        for path in [*db, state / "server.log"]:
            stored = path.read_bytes()
            for secret in [*passwords, auth]:
                assert secret.encode() not in stored, f"a secret is in {path.name}"
        others = [f for f in _files_with(state, auth.encode()) if Path(f) != state / "api-auth"]
        assert others == [], "the auth string is in the state directory outside api-auth"
        assert _files_with(tmp, auth.encode()) == [], "the auth string is in a temporary file"
        assert _files_with(state, canary.encode()) == [], "the canary is in the state directory (server database)"
        assert _files_with(tmp, canary.encode()) == [], "the canary is in a temporary file"
        assert _files_with(Path(data["repository"]), canary.encode()) == [], "the canary is in the repository"
    finally:
        subprocess.run([sys.executable, "-m", "vmbackup", "server", "stop"], env=base_env(state), capture_output=True)
        lab_down(lab_state)
