"""The site: a Prefect server, one worker per agent, deployments/prefect.yaml,
and a deployment run started from the command line the way CI does.

Real processes only: `prefect server start` as the shipped unit
(deployments/prefect-server.service) runs it, on loopback with its auth
string from an environment file (SQLite, a temporary PREFECT_HOME); the
shipped nginx configuration (deployments/nginx/vmbackup-prefect.conf, a
certificate made here) in front of it, through which every client and
worker reaches it over TLS with the auth string; `prefect work-pool create`,
`prefect deploy` of the shipped deployments/prefect.yaml, three `prefect
worker start` (the control pool and one per lab agent, each with
VMBACKUP_AGENT set as the systemd unit sets it), the lab (`vmbackup lab
up`: two ESXi hosts and the Hyper-V host hvs1, reached over WinRM by
pywinrm), and `prefect deployment run ... --watch`. The passwords reach the
runs only through Secret blocks: vSphere's as the deployments'
`password_secret`, the Hyper-V host's named by the plan itself
(`hyperv[hvs1].password_secret`). A client without the auth string gets
401: no Secret block, no run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
SECRET = "vsphere-password-site"
HV_SECRET = "hyperv-password-site"  # named by the plan's hyperv[hvs1].password_secret
S3_SECRET = "s3-credentials-site"  # named by the plan's copy.credentials_secret
HV_HOST = "hvs1"
LIMITS = {"per_agent": 2, "per_host": 1, "per_datastore": 2, "disks_per_vm": 2}
AGENTS = ["vmbackup-agent-esx1", "vmbackup-agent-esx2"]  # the lab's, and deployments/prefect.yaml's
DRILL_VMS = ["s-web01", "s-web03", "s-win02"]  # on esx1 (agent esx1's) and hvs1 (both agents reach it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VMBACKUP_"))}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _unit(name: str) -> tuple[dict[str, str], list[str], list[str]]:
    """A shipped systemd unit's ``Environment=`` settings, ``EnvironmentFile=``
    paths and ``ExecStart=`` command."""
    env, files, cmd = {}, [], []
    for line in (ROOT / "deployments" / name).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            k, _, v = value.partition("=")
            env[k] = v
        elif key == "EnvironmentFile":
            files.append(value)
        elif key == "ExecStart":
            cmd = shlex.split(value)
    return env, files, cmd


def _write_env_file(path: Path, values: dict[str, str]) -> Path:
    """An EnvironmentFile as the docs tell to write it: KEY=VALUE lines, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# written by the site test\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def _read_env_file(path: Path) -> dict[str, str]:
    """What systemd reads from an EnvironmentFile (KEY=VALUE lines, # comments)."""
    assert oct(path.stat().st_mode & 0o777) == oct(0o600), path
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA for the clients)."""
    crt, key = tmp / "prefect.crt", tmp / "prefect.key"
    p = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return crt, key


def _start_nginx(tmp: Path, listen: int, upstream: int, crt: Path, key: Path) -> subprocess.Popen:
    """nginx with the shipped site configuration, its addresses and
    certificate paths replaced by this test's (each must be found)."""
    conf = (ROOT / "deployments" / "nginx" / "vmbackup-prefect.conf").read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("/etc/vmbackup/tls/prefect.crt", str(crt)),
        ("/etc/vmbackup/tls/prefect.key", str(key)),
        ("proxy_pass http://127.0.0.1:4200;", f"proxy_pass http://127.0.0.1:{upstream};"),
    ]:
        assert conf.count(old) == 1, f"the shipped nginx configuration has no {old!r}"
        conf = conf.replace(old, new)
    d = tmp / "nginx"
    d.mkdir()
    (d / "vmbackup-prefect.conf").write_text(conf)
    temp = "".join(f"{k}_temp_path {d / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # its workers read this test's 0700 directories
        + f"daemon off;\nworker_processes 1;\npid {d / 'nginx.pid'};\nerror_log {d / 'error.log'} info;\n"
        + f"events {{}}\nhttp {{\naccess_log {d / 'access.log'};\n{temp}include {d / 'vmbackup-prefect.conf'};\n}}\n"
    )
    p = subprocess.run(["nginx", "-t", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return subprocess.Popen(
        ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
        stdout=open(d / "stdout.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
    )


def _request(
    url: str, auth: str | None = None, method: str = "GET", body: dict | None = None, cafile: str | None = None
) -> tuple[int, bytes]:
    """One HTTP(S) request, with ``auth`` as basic authentication; (status, body)."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


def _stop(p: subprocess.Popen) -> None:
    """Ends a process this test started, and its process group."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def _start_worker(env: dict[str, str], pool: str, agent: str | None, log: Path) -> tuple[subprocess.Popen, Path]:
    """``prefect worker start`` for one pool, as the systemd unit runs it."""
    wenv = dict(env, VMBACKUP_AGENT=agent) if agent else dict(env)
    w = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", pool, "--name", f"worker-{pool}", "--type", "process"],
        env=wenv,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
    )
    return w, log


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The lab, a Prefect server with the Secret block, the work pools and the deployments."""
    from vmbackup_lab import lab_down, load_lab

    tmp = tmp_path_factory.mktemp("site")
    procs: list[subprocess.Popen] = []
    lab_state = tmp / "lab"
    env0 = _base_env(tmp / "unused")
    p = _run(
        [
            sys.executable,
            "-m",
            "vmbackup",
            "lab",
            "up",
            "--state",
            str(lab_state),
            "--topology",
            str(HERE / "topology.json"),
            "--json",
        ],
        env0,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    try:
        plan = yaml.safe_load(Path(summary["plan"]).read_text())
        plan["limits"] = LIMITS
        assert sorted(a["name"] for a in plan["agents"]) == AGENTS
        # The Hyper-V host's password from a Secret block the plan names
        # (the workers' environment has no VMBACKUP_HYPERV_PASSWORD).
        assert [h["name"] for h in plan["hyperv"]] == [HV_HOST]
        plan["hyperv"] = [
            {**{k: v for k, v in h.items() if k != "password_env"}, "password_secret": HV_SECRET}
            for h in plan["hyperv"]
        ]
        # Restore drills (the site's drill gives each VM an agent that reaches its host).
        plan["drill"] = {
            "vsphere": {"network": "VM Network"},
            "hyperv": {"switch": "Isolated"},
            "vms": DRILL_VMS,
            "sample": len(DRILL_VMS),
        }
        # The offsite copy (copy-nightly, after every nightly run) to the lab's
        # S3, its keys from a Secret block the plan names (the workers'
        # environment has no AWS_* variables).
        plan["copy"] = {k: v for k, v in plan["copy"].items() if not k.endswith("_key_env")}
        plan["copy"].update(credentials_secret=S3_SECRET, region="us-east-1")
        plan_path = tmp / "plan.yaml"
        plan_path.write_text(yaml.safe_dump(plan))

        # The server as its shipped unit runs it: loopback only, its auth
        # string from an EnvironmentFile (0600), never on its command line.
        port, tls_port = _free_port(), _free_port()
        api_url = f"https://127.0.0.1:{tls_port}/api"  # nginx's: the way in
        unit_env, unit_files, cmd = _unit("prefect-server.service")
        assert unit_files == ["/etc/vmbackup/prefect-server.env"], unit_files
        assert cmd[1:] == ["server", "start", "--host", "127.0.0.1", "--port", "4200"], cmd
        auth = f"vmbackup:{secrets.token_urlsafe(32)}"
        server_env_file = _write_env_file(
            tmp / "prefect-server.env", {"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_UI_API_URL": api_url}
        )
        senv = _base_env(tmp / "prefect") | unit_env | _read_env_file(server_env_file)
        senv.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_API_PORT=str(port))
        t0 = time.monotonic()
        server = subprocess.Popen(
            [PREFECT, *cmd[1:-1], str(port)],
            env=senv,
            stdout=open(tmp / "server.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
        procs.append(server)
        while True:  # until it answers (or exits: then the test fails with its log)
            assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        print(f"server healthy after {time.monotonic() - t0:.1f} s")
        crt, key = _certificate(tmp)
        nginx = _start_nginx(tmp, tls_port, port, crt, key)
        procs.append(nginx)
        while True:
            assert nginx.poll() is None, (tmp / "nginx" / "error.log").read_text()[-3000:]
            try:
                if _request(api_url + "/health", cafile=str(crt))[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)

        # Every client and worker: nginx's address, the auth string and the
        # certificate from its EnvironmentFile, as the worker's unit reads it.
        worker_env_file = _write_env_file(
            tmp / "worker.env",
            {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": auth, "PREFECT_API_SSL_CERT_FILE": str(crt)},
        )
        env = _base_env(tmp / "prefect") | _read_env_file(worker_env_file)
        env.update(
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            PREFECT_LOGGING_EXTRA_LOGGERS="vmbackup",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30",  # as the worker's systemd unit sets it
        )

        # The passwords go into Secret blocks, and only there.
        code = (
            "import os,sys; from prefect.blocks.system import Secret; Secret(value=os.environ['PW']).save(sys.argv[1])"
        )
        s3 = json.dumps({"access_key": summary["s3"]["access_key"], "secret_key": summary["s3"]["secret_key"]})
        for block, pw in [
            (SECRET, summary["vsphere"]["password"]),
            (HV_SECRET, summary["hyperv"]["password"]),
            (S3_SECRET, s3),
        ]:
            p = _run([sys.executable, "-c", code, block], dict(env, PW=pw))
            assert p.returncode == 0, p.stderr
        p = _run([PREFECT, "automation", "create", "--from-file", str(ROOT / "deployments" / "crashed-runs.yaml")], env)
        assert p.returncode == 0 and "Failed" not in p.stdout, p.stdout + p.stderr
        for pool in ["vmbackup-control", *AGENTS]:
            p = _run([PREFECT, "work-pool", "create", pool, "--type", "process"], env)
            assert p.returncode == 0, p.stdout + p.stderr

        # Every deployment of the shipped file, non-interactively (`--all`).
        spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
        names = [d["name"] for d in spec["deployments"]]
        shipped = {"nightly", "vsphere-sweep", "hyperv-sweep", "verify-weekly", "retention", "cbt-audit"}
        shipped |= {"restore", "drill"}
        assert {*shipped, *AGENTS} <= set(names)
        denv = dict(env, VMBACKUP_PLAN=str(plan_path), VMBACKUP_PASSWORD_SECRET=SECRET)
        t0 = time.monotonic()
        args = [PREFECT, "--no-prompt", "deploy", "--prefect-file", str(ROOT / "deployments" / "prefect.yaml")]
        args += ["--all"]
        p = _run(args, denv)
        assert p.returncode == 0, p.stdout + p.stderr
        print(f"prefect deploy of {len(names)} deployments: {time.monotonic() - t0:.1f} s")

        topology = json.loads((HERE / "topology.json").read_text())
        workers = {}
        for pool, agent in [("vmbackup-control", None), *((a, a) for a in AGENTS)]:
            w, log = _start_worker(env, pool, agent, tmp / f"worker-{pool}.log")
            procs.append(w)
            workers[pool] = (w, log)
        yield {
            "env": env,
            "auth": auth,
            "cafile": str(crt),
            "server_port": port,
            "server_log": tmp / "server.log",
            "database": tmp / "prefect",
            "plan": plan_path,
            "lab": load_lab(lab_state),
            "workers": workers,
            "repository": plan["repository"],
            "password": summary["vsphere"]["password"],
            "hyperv_password": summary["hyperv"]["password"],
            "s3": summary["s3"],
            "procs": procs,
            "vms": sorted(v["name"] for v in topology["vms"]),
            "hyperv_vms": sorted(v["name"] for h in topology["hyperv"] for v in h["vms"]),
        }
    finally:
        for p in reversed(procs):
            _stop(p)
        lab_down(lab_state)


def _settings(env: dict[str, str]) -> dict:
    """This process's Prefect settings for the site: its address, auth string and certificate."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL

    return {
        PREFECT_API_URL: env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
        PREFECT_API_SSL_CERT_FILE: env["PREFECT_API_SSL_CERT_FILE"],
    }


def _flow_runs(env: dict[str, str], deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import temporary_settings

    with temporary_settings(updates=_settings(env)):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )


def _final_runs(env: dict[str, str], deployment: str, n: int, timeout: float = 300) -> list:
    """The runs of ``deployment`` once ``n`` of them have ended (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _flow_runs(env, deployment)
        if sum(r.state is not None and r.state.is_final() for r in runs) >= n or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def _flow_run(env: dict[str, str], flow_run_id: str):
    stack, client = _client(env)
    with stack:
        return client.read_flow_run(uuid.UUID(flow_run_id))


def _hyperv_host(lab):
    (hv,) = lab.hyperv_hosts()
    assert hv.host == HV_HOST
    return hv


def test_nightly_deployment_splits_vms_over_agent_workers(site):
    from vmbackup import _mover

    lab, env = site["lab"], site["env"]
    hv = _hyperv_host(lab)
    lab.reset_counters()
    hv.reset_counters()
    everything = sorted(site["vms"] + site["hyperv_vms"])
    t0 = time.monotonic()
    p = _run([PREFECT, "deployment", "run", "backup_site/nightly", "--watch"], env)
    elapsed = time.monotonic() - t0
    print(
        f"prefect deployment run --watch: {elapsed:.1f} s for {len(site['vms'])} vSphere "
        f"and {len(site['hyperv_vms'])} Hyper-V VMs"
    )
    assert p.returncode == 0, p.stdout + p.stderr
    watched = p.stdout + p.stderr

    # One flow run per agent, in that agent's pool, run by that agent's worker.
    backed_up, agent_runs = {}, {}
    for agent in AGENTS:
        runs = _flow_runs(env, agent)
        assert len(runs) == 1, runs
        run = runs[0]
        assert run.state.is_completed(), run.state
        assert run.work_pool_name == agent
        assert run.parameters["agent"] == agent and run.parameters["password_secret"] == SECRET
        backed_up[agent], agent_runs[agent] = run.parameters["vms"], run
        mine = site["workers"][agent][1].read_text()
        assert str(run.id) in mine, mine[-2000:]
        for other in AGENTS:
            if other != agent:
                assert str(run.id) not in site["workers"][other][1].read_text()
    assert all(backed_up.values()), backed_up
    assert sorted(v for vms in backed_up.values() for v in vms) == everything
    # A flow run's parameters hold the Secret block's name, never the password.
    # (the deployment's schedule has added future runs: not those)
    # The runs the test started (a deployment's own schedule may fire meanwhile:
    # hyperv-sweep's runs at minute 40 of every hour).
    planner = [r for r in _flow_runs(env, "nightly") if not r.auto_scheduled]
    assert len(planner) == 1 and planner[0].state.is_completed(), planner
    assert site["password"] not in json.dumps([r.parameters for r in planner + _flow_runs(env, AGENTS[0])])

    # The nightly run's end started copy-nightly (its deployment trigger) on
    # the control worker: the copy holds every VM's new backup, under Object Lock.
    copies = _final_runs(env, "copy-nightly", 1)
    assert len(copies) == 1 and copies[0].state.is_completed(), [(r.name, r.state) for r in copies]
    assert copies[0].work_pool_name == "vmbackup-control" and copies[0].parameters == {"plan_path": str(site["plan"])}
    from vmbackup import copy as s3copy

    s3 = site["s3"]
    index = s3copy.read_index(
        s3copy.Target(
            s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"), s3["bucket"], s3["prefix"]
        )
    )
    copied = [k for k in index["objects"] if k.startswith("backups/")]
    nightly_rows = _site_rows(env, planner[0].id)
    assert all(any(r["backup_id"] in k for k in copied) for r in nightly_rows), (copied, nightly_rows)

    # Each Hyper-V VM was backed up by the run of the agent the planner gave
    # it to (so on that agent's worker, checked above): that run's own report
    # has its row, and that run logged its shadow copy with that agent's context.
    assigned = {vm: agent for agent, vms in backed_up.items() for vm in vms}
    for agent, run in agent_runs.items():
        own = {r["vm"]: r for r in _report(env, run.id, "vmbackup-backup-report")}
        assert sorted(own) == sorted(backed_up[agent]), (agent, own)
        logs = _logs(env, run.id)
        for vm in backed_up[agent]:
            if vm in site["hyperv_vms"]:
                assert own[vm]["hypervisor"] == "hyperv" and own[vm]["status"] == "ok", own[vm]
                assert own[vm]["consistency"] == "application", own[vm]
                assert any(f"[vm={vm} host={HV_HOST} agent={agent}] shadow copy " in m for m in logs), (
                    f"{vm}: no shadow copy line in {agent}'s run"
                )
        for other, orun in agent_runs.items():
            if other != agent:
                assert not any(f"[vm={vm} " in m for m in _logs(env, orun.id) for vm in backed_up[agent])
    print("Hyper-V VMs by agent:", {vm: assigned[vm] for vm in site["hyperv_vms"]})

    # The limits held over both workers (the lab's peak counters), and each
    # agent hot-added the disks of its VMs.
    counters = lab.status()["counters"]
    snaps, attached = counters["snapshots"], counters["attached_disks"]
    assert all(c["peak"] <= LIMITS["per_host"] for c in snaps["host"].values()), snaps["host"]
    assert all(c["peak"] <= LIMITS["per_datastore"] for c in snaps["datastore"].values()), snaps["datastore"]
    assert sorted(a for a, c in attached["agent"].items() if c["peak"] >= 1) == AGENTS, attached["agent"]
    assert all(c["peak"] <= LIMITS["per_agent"] for c in attached["agent"].values()), attached["agent"]
    assert all(c["now"] == 0 for kind in (snaps, attached) for scope in kind.values() for c in scope.values())
    # On the Hyper-V host: no more shadow copy sets at once than its host
    # limit allows, and nothing left (no shadow copy, no run in its ledger).
    st = hv.status()
    assert 1 <= st["peak_shadow_copies"] <= LIMITS["per_host"], st["peak_shadow_copies"]
    assert st["shadow_copies"] == [] and st["runs"] == [], (st["shadow_copies"], st["runs"])

    # Every VM, vSphere and Hyper-V, has its row ok in the site report, and
    # its backup restores bit-exact (no guest writes since).
    rows = _site_rows(env, planner[0].id)
    assert sorted(r["vm"] for r in rows) == everything and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert r["agent"] == assigned[r["vm"]], r
        assert r["hypervisor"] == ("hyperv" if r["vm"] in site["hyperv_vms"] else "vsphere"), r
    tmp = Path(site["plan"]).parent
    for r in rows:
        for i, d in enumerate(_disks(r["vm"])):
            image, restored = tmp / f"lab-{r['vm']}-{i}.img", tmp / f"restored-{r['vm']}-{i}.img"
            lab.disk_image(r["vm"], d, image)
            _mover.restore_disk(site["repository"], r["backup_id"], str(restored), disk=d)
            assert _sha(restored) == _sha(image), (r["vm"], d)

    # The Hyper-V sweeper's deployment runs on the control worker (with the
    # plan's Secret block) and finds nothing: the backups left nothing.
    p = _run([PREFECT, "deployment", "run", "sweep_hyperv/hyperv-sweep", "--watch"], env)
    assert p.returncode == 0, p.stdout + p.stderr
    (sweep,) = [r for r in _flow_runs(env, "hyperv-sweep") if not r.auto_scheduled]
    assert sweep.state.is_completed() and sweep.work_pool_name == "vmbackup-control", sweep.state
    assert hv.status()["shadow_copies"] == []

    # No password, nor the auth string, in what the server holds of the runs,
    # the workers' logs, the server's log or its database (as bytes).
    held = _server_text(env) + watched + "".join(w[1].read_text() for w in site["workers"].values())
    held += site["server_log"].read_text(errors="replace")
    for secret in (site["password"], site["hyperv_password"], site["auth"], site["s3"]["secret_key"]):
        assert secret not in held
        for db in sorted(site["database"].glob("prefect.db*")):
            assert secret.encode() not in db.read_bytes(), db.name


def test_no_entry_without_the_credentials(site):
    """A client without the auth string gets 401 (through nginx and on the
    server's own loopback port): it reads no Secret block and starts no run;
    the string is on no command line; TLS is nginx's, with the certificate."""
    env, auth, ca = site["env"], site["auth"], site["cafile"]
    api = env["PREFECT_API_URL"]
    direct = f"http://127.0.0.1:{site['server_port']}/api"
    code, body = _request(f"{api}/block_types/slug/secret/block_documents/name/{SECRET}", auth, cafile=ca)
    assert code == 200, body
    block_id = json.loads(body)["id"]
    code, body = _request(f"{api}/deployments/name/backup_site/nightly", auth, cafile=ca)
    assert code == 200, body
    deployment_id = json.loads(body)["id"]
    runs_before = len(_flow_runs(env, "nightly"))

    secret_url = f"/block_documents/{block_id}?include_secrets=true"
    run_url = f"/deployments/{deployment_id}/create_flow_run"
    for base in (api, direct):
        for who in (None, "vmbackup:wrong", auth + "x", ""):
            code, body = _request(base + secret_url, who, cafile=ca)
            assert code == 401 and site["password"].encode() not in body, (base, code, body[:200])
            code, body = _request(base + run_url, who, "POST", {}, cafile=ca)
            assert code == 401, (base, code, body[:200])
        assert _request(base + "/flow_runs/filter", None, "POST", {}, cafile=ca)[0] == 401
        assert _request(base + "/health", cafile=ca)[0] == 200  # probes stay open
    assert len(_flow_runs(env, "nightly")) == runs_before, "a run was started without credentials"
    # With the credentials the same request reads the block (so the 401s above were the door, not a typo).
    code, body = _request(api + secret_url, auth, cafile=ca)
    assert code == 200 and site["password"] in json.loads(body)["data"]["value"]

    # Prefect's own client and command line without the auth string: refused.
    outsider = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    read = "import sys; from prefect.blocks.system import Secret; print(Secret.load(sys.argv[1]).get())"
    p = _run([sys.executable, "-c", read, SECRET], outsider)
    assert p.returncode != 0 and "401" in p.stderr and site["password"] not in p.stdout + p.stderr, p.stderr[-2000:]
    p = _run([PREFECT, "deployment", "run", "backup_site/nightly"], outsider)
    assert p.returncode != 0 and "401" in p.stdout + p.stderr, p.stdout + p.stderr
    assert len(_flow_runs(env, "nightly")) == runs_before

    # TLS: a client that does not trust the certificate does not get in;
    # plain HTTP on the TLS port is refused by nginx.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _request(api + "/health")
    plain = api.replace("https://", "http://")
    assert _request(plain + "/health")[0] == 400

    # The auth string is on no command line: the server, nginx, the workers
    # and everything they started.
    pids = [pid for p in site["procs"] if p.poll() is None for pid in (p.pid, *_descendants(p.pid))]
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    assert any(" server start --host 127.0.0.1 " in line for line in lines), lines
    assert any(" worker start " in line for line in lines), lines
    assert not any(auth in line for line in lines)
    assert auth not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_drill_deployment_passes_then_fails_on_a_corrupted_restore(site):
    """`prefect deployment run drill/drill --watch` as CI runs it: the drill VMs
    restored on the isolated network and switch, each by an agent that reaches
    its host, equal to their backups, removed; then, with the lab corrupting what a restore writes on esx1, the
    run fails and names the VM."""
    from vmbackup import _mover

    lab, env = site["lab"], site["env"]
    infos, _ = _mover.list_backups(site["repository"])
    if not {i.vm for i in infos} >= set(DRILL_VMS):  # run alone: back up first
        p = _run([PREFECT, "deployment", "run", "backup_site/nightly", "--watch"], env)
        assert p.returncode == 0, p.stdout + p.stderr
    before = sorted(v["name"] for v in lab.status()["vms"]), sorted(_hyperv_host(lab).vm_names())
    p = _run([PREFECT, "deployment", "run", "drill/drill", "--watch"], env)
    assert p.returncode == 0, p.stdout + p.stderr
    record = json.loads((Path(site["repository"]) / "drills.json").read_text())["vms"]
    assert sorted(record) == sorted(DRILL_VMS) and all(r["passed"] for r in record.values()), record
    assert (sorted(v["name"] for v in lab.status()["vms"]), sorted(_hyperv_host(lab).vm_names())) == before
    [run] = [r for r in _flow_runs(env, "drill") if r.state.is_completed()]
    rows = {r["vm"]: r for r in _report(env, run.id, "vmbackup-drill-report")}
    assert sorted(rows) == sorted(DRILL_VMS) and all(r["status"] == "ok" and r["seconds"] > 0 for r in rows.values())
    # esx1's VMs by its agent; the Hyper-V VM by the less loaded one, esx2's.
    agents = {vm: AGENTS[vm == "s-win02"] for vm in DRILL_VMS}
    assert {vm: r["agent"] for vm, r in rows.items()} == agents, rows
    assert all(_flow_run(env, r["flow_run"]).work_pool_name == r["agent"] for r in rows.values()), rows

    lab.set_faults(host="esx1", corrupt_restore=True)
    try:
        p = _run([PREFECT, "deployment", "run", "drill/drill", "--param", 'vms=["s-web01"]', "--watch"], env)
    finally:
        lab.set_faults(host="esx1")
    assert p.returncode == 1, p.stdout + p.stderr
    record = json.loads((Path(site["repository"]) / "drills.json").read_text())["vms"]
    assert record["s-web01"]["passed"] is False, record
    [failed] = [r for r in _flow_runs(env, "drill") if r.state.is_failed()]
    assert "s-web01" in (failed.state.message or ""), failed.state.message


def _disks(vm: str) -> list[str]:
    """The lab's disk names of a VM: ``scsi0:0`` (vSphere: bus and unit;
    Hyper-V: controller type, number and location)."""
    topo = json.loads((HERE / "topology.json").read_text())
    spec = next((v for v in topo["vms"] if v["name"] == vm), None)
    if spec is not None:
        return [f"{d['bus']}0:0" for d in spec["disks"]]
    spec = next(v for h in topo["hyperv"] for v in h["vms"] if v["name"] == vm)
    return [f"{d['controller']}{d['number']}:{d['location']}" for d in spec["disks"]]


def _client(env: dict[str, str]):
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    stack = contextlib.ExitStack()
    stack.enter_context(temporary_settings(updates=_settings(env)))
    client = stack.enter_context(get_client(sync_client=True))
    return stack, client


def _logs(env: dict[str, str], flow_run_id) -> list[str]:
    """Every log message of a flow run (its tasks' included)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    stack, client = _client(env)
    with stack:
        out, offset = [], 0
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset
            )
            out += [x.message for x in page]
            if len(page) < 200:
                return out
            offset += 200


def _server_text(env: dict[str, str]) -> str:
    """What the server holds about runs (flow and task runs, logs, artifacts, events) as JSON text."""
    from prefect.events.filters import EventFilter

    stack, client = _client(env)
    with stack:
        held = [client.read_flow_runs(), client.read_task_runs(), client.read_artifacts()]
        offset = 0
        while True:
            page = client.read_logs(limit=200, offset=offset)
            held.append(page)
            if len(page) < 200:
                break
            offset += 200
        page = client.read_events(filter=EventFilter(), limit=50)
        held.append(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            held.append(page.events)
    return json.dumps([[x.model_dump(mode="json") for x in xs] for xs in held])


def _report(env: dict[str, str], flow_run_id, key: str) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    stack, client = _client(env)
    with stack:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    art = next(a for a in arts if a.key == key)
    return json.loads(art.data) if isinstance(art.data, str) else art.data


def _markdown(env: dict[str, str], flow_run_id, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    stack, client = _client(env)
    with stack:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next(a.data for a in arts if a.key == key)


def _site_rows(env: dict[str, str], flow_run_id) -> list[dict]:
    return _report(env, flow_run_id, "vmbackup-site-report")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _holding(lab, agent: str) -> bool:
    counters = lab.status()["counters"]
    return counters["attached_disks"]["agent"].get(agent, {}).get("now", 0) > 0


def _read_limits(env: dict[str, str], names: list[str]) -> dict[str, tuple[int, int]]:
    from prefect.settings import temporary_settings
    from vmbackup.orchestration import limits

    with temporary_settings(updates=_settings(env)):
        return limits.read_limits(names)


def test_worker_killed_mid_run_slots_return_sweeper_cleans_next_run_backs_up(site):
    from vmbackup.orchestration import limits

    lab, env = site["lab"], site["env"]
    killed = AGENTS[0]  # esx1's agent: it has s-big01, whose read takes a while
    lab.write("s-big01", "scsi0:0", 0, 320 << 20, seed=7)
    seen = {str(r.id) for a in AGENTS for r in _flow_runs(env, a)}
    out = Path(site["plan"]).parent / "watch-killed.log"
    watch = subprocess.Popen(
        [PREFECT, "deployment", "run", "backup_site/nightly", "--param", "lease_seconds=60", "--watch"],
        env=env,
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # _stop ends its process group
        cwd="/",
    )
    site["procs"].append(watch)
    worker, log = site["workers"][killed]
    # Watch the lab's counters until the agent holds a hot-added disk, then
    # kill its worker and the run it started, as if the machine died.
    while watch.poll() is None and not _holding(lab, killed):
        pass
    assert watch.poll() is None, out.read_text()
    victims = [worker.pid, *_descendants(worker.pid)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    assert lab.status()["counters"]["attached_disks"]["agent"][killed]["now"] > 0
    t_kill = time.monotonic()
    # systemd restarts the worker (Restart=on-failure, RestartSec=10): it is
    # back while the dead run's slots and heartbeat run out (it never takes
    # up a Running run), ready for the next nightly run below.
    w, log = _start_worker(env, killed, killed, log)
    site["procs"].append(w)
    site["workers"][killed] = (w, log)

    # The other agent's run ends on its own; then what is left in the lab is
    # the dead run's alone, and the sweepers run (both at once, on the
    # control worker) while its slots and its heartbeat run out.
    while True:
        (other,) = [r for r in _flow_runs(env, AGENTS[1]) if str(r.id) not in seen]
        if other.state.is_final():
            break
        time.sleep(1)  # a pause between polls of the condition, not a wait for it
    assert other.state.is_completed(), other.state
    print(f"{AGENTS[1]}'s run ended {time.monotonic() - t_kill:.1f} s after the kill")
    assert any(c["now"] for c in lab.status()["counters"]["snapshots"]["host"].values())
    sweeps = {}
    for deployment in ("sweep_vsphere/vsphere-sweep", "sweep_hyperv/hyperv-sweep"):
        sweep_out = Path(site["plan"]).parent / f"watch-{deployment.split('/')[1]}.log"
        sweeps[deployment] = (
            subprocess.Popen(
                [PREFECT, "deployment", "run", deployment, "--param", "older_than_seconds=0", "--watch"],
                env=env,
                stdout=open(sweep_out, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,  # _stop ends its process group
                cwd="/",
            ),
            sweep_out,
        )
        site["procs"].append(sweeps[deployment][0])

    # Its limit slots come back when the lease (60 s) expires.
    names = [limits.limit_name("agent", killed), limits.limit_name("host", "esx1")]
    while any(active for _, active in _read_limits(env, names).values()):
        time.sleep(1)  # a pause between polls of the condition, not a wait for it
    print(f"slots back {time.monotonic() - t_kill:.1f} s after the kill")

    # Its run stops sending heartbeats: the automation of
    # deployments/crashed-runs.yaml marks it Crashed, and the planner ends, failing.
    dead = [r for r in _flow_runs(env, killed) if str(r.id) not in seen]
    assert len(dead) == 1, dead
    assert watch.wait(timeout=900) == 1, out.read_text()
    print(f"planner ended {time.monotonic() - t_kill:.1f} s after the kill")
    dead = [r for r in _flow_runs(env, killed) if r.id == dead[0].id]
    assert dead[0].state.is_crashed(), dead[0].state
    planner = [r for r in _flow_runs(env, "nightly") if r.state.is_failed()]
    rows = _site_rows(env, planner[-1].id)
    lost = sorted(r["vm"] for r in rows if r["status"] != "ok")
    assert lost and set(lost) <= set(dead[0].parameters["vms"]), rows
    assert all(r["status"] == "ok" for r in rows if r["agent"] == AGENTS[1]), rows

    # The vSphere sweeper removed the snapshot and the attachment the dead run left.
    p, sweep_out = sweeps["sweep_vsphere/vsphere-sweep"]
    assert p.wait(timeout=600) == 0, sweep_out.read_text()
    p, sweep_out = sweeps["sweep_hyperv/hyperv-sweep"]
    assert p.wait(timeout=600) == 0, sweep_out.read_text()
    print(f"sweepers ended {time.monotonic() - t_kill:.1f} s after the kill")
    counters = lab.status()["counters"]
    assert all(
        c["now"] == 0
        for kind in ("snapshots", "attached_disks")
        for scope in counters[kind].values()
        for c in scope.values()
    ), counters
    # And the Hyper-V sweeper any shadow copy the dead run left (it had
    # Hyper-V VMs too): nothing of this system stays on the host.
    st = _hyperv_host(lab).status()
    assert st["shadow_copies"] == [] and st["runs"] == [], (st["shadow_copies"], st["runs"])

    # The next run backs those VMs up.
    p = _run([PREFECT, "deployment", "run", "backup_site/nightly", "--watch"], env)
    assert p.returncode == 0, p.stdout + p.stderr
    planner = [r for r in _flow_runs(env, "nightly") if r.state.is_completed()]
    rows = {r["vm"]: r for r in _site_rows(env, max(planner, key=lambda r: r.start_time).id)}
    assert all(rows[vm]["status"] == "ok" for vm in lost), rows


def test_missing_hyperv_secret_block_is_one_line_naming_it(site):
    """A plan whose Hyper-V host names a Secret block the server does not
    have: the nightly run fails before any agent's run starts, with one line
    naming the plan's entry."""
    env = site["env"]
    plan = yaml.safe_load(Path(site["plan"]).read_text())
    plan["hyperv"][0]["password_secret"] = "no-such-block"
    bad = Path(site["plan"]).with_name("plan-missing-block.yaml")
    bad.write_text(yaml.safe_dump(plan))
    before = {str(r.id) for a in AGENTS for r in _flow_runs(env, a)}
    hv = _hyperv_host(site["lab"])
    sets_before = hv.status()["peak_shadow_copies"]
    hv.reset_counters()

    p = _run([PREFECT, "deployment", "run", "backup_site/nightly", "--param", f"plan_path={bad}", "--watch"], env)
    assert p.returncode == 1, p.stdout + p.stderr
    (run,) = [r for r in _flow_runs(env, "nightly") if r.parameters.get("plan_path") == str(bad)]
    assert run.state.is_failed(), run.state
    line = f"hyperv[{HV_HOST}].password_secret: there is no Secret block named 'no-such-block'"
    assert line in run.state.message and "\n" not in run.state.message.strip(), run.state.message
    assert any(line in m for m in _logs(env, run.id))
    assert {str(r.id) for a in AGENTS for r in _flow_runs(env, a)} == before  # no agent's run started
    assert hv.status()["peak_shadow_copies"] == 0, sets_before
    held = _server_text(env) + p.stdout + p.stderr
    for secret in (site["password"], site["hyperv_password"]):
        assert secret not in held


def test_restore_deployment_restores_on_the_worker_of_the_agent_that_reaches_the_host(site):
    """`prefect deployment run restore_vm/restore --watch`, the form a person
    fills in the UI, on the control worker: a VM on esx2, which only agent
    esx2 reaches (not esx1, the first agent), restored by a flow run of
    restore_vm/<that agent> in that agent's pool on its worker, equal to its
    point; the run's report has its row, naming the agent and its run."""
    from vmbackup import _mover

    lab, env = site["lab"], site["env"]
    vm, agent, new = "s-db01", AGENTS[1], "s-db01-site"
    if not any(i.vm == vm for i in _mover.list_backups(site["repository"])[0]):  # run alone: back up first
        p = _run([PREFECT, "deployment", "run", "backup_site/nightly", "--watch"], env)
        assert p.returncode == 0, p.stdout + p.stderr
    seen = {str(r.id) for a in AGENTS for r in _flow_runs(env, a)}
    args = [PREFECT, "deployment", "run", "restore_vm/restore", "--param", f'vms=["{vm}"]']
    p = _run([*args, "--param", f"restored_as={new}", "--watch"], env)
    assert p.returncode == 0, p.stdout + p.stderr

    (planner,) = _flow_runs(env, "restore")
    assert planner.state.is_completed() and planner.work_pool_name == "vmbackup-control", planner.state
    started = {a: [r for r in _flow_runs(env, a) if str(r.id) not in seen] for a in AGENTS}
    assert started[AGENTS[0]] == [], started
    (run,) = started[agent]
    assert run.state.is_completed() and run.work_pool_name == agent, (run.work_pool_name, run.state)
    assert run.parameters["agent"] == agent and run.parameters["vms"] == [vm], run.parameters
    assert str(run.id) in site["workers"][agent][1].read_text()
    assert str(run.id) not in site["workers"][AGENTS[0]][1].read_text()

    (row,) = _report(env, planner.id, "vmbackup-restore-report")
    assert row["status"] == "ok" and row["restored_as"] == new and row["host"] == "esx2", row
    assert row["agent"] == agent and row["flow_run"] == str(run.id), row
    summary = _markdown(env, planner.id, "vmbackup-restore-summary")
    assert f"| {vm} | {new} | {row['point']} | esx2 |" in summary, summary
    tmp = Path(site["plan"]).parent
    image, point = tmp / f"site-restore-{new}.img", tmp / f"site-restore-{vm}-point.img"
    lab.disk_image(new, "scsi0:0", image)
    _mover.restore_disk(site["repository"], row["point"], str(point), disk="scsi0:0")
    assert _sha(image) == _sha(point)
