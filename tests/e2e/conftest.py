"""End to end: `vmbackup lab up` and `vmbackup backup` as a user runs them.

Real pyVmomi, the real lab, real nbdkit, and the real Prefect server that
`vmbackup backup` starts itself (the embedded default) in a state directory
of this test session, stopped at the end. One small lab (tests/e2e/
topology.json) and one 30-VM lab (topology-30.json, other host and datastore
names, so the two never share a Prefect limit) serve the whole session.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:
    import vmbackup_lab  # noqa: F401
except ImportError:  # not installed (make dev installs it): use the work tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab" / "python"))

from vmbackup_lab import Lab, lab_down, load_lab  # noqa: E402
from vmbackup_lab.plan import PASSWORD_ENV  # noqa: E402

HERE = Path(__file__).parent


def run(*args: str, env: dict[str, str], expect: int | None = 0, timeout: float = 900) -> subprocess.CompletedProcess:
    """``vmbackup ARGS`` in a child process; never a traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "vmbackup", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    if expect is not None:
        assert p.returncode == expect, f"{args} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@dataclass
class E2ELab:
    lab: Lab
    plan: Path  # the plan `vmbackup lab up --json` wrote
    password: str
    summary: dict | None = None  # what `vmbackup lab up --json` printed

    @property
    def hyperv_password(self) -> str:
        return self.summary["hyperv"]["password"]

    @property
    def hyperv_password_env(self) -> str:
        return self.plan_data()["hyperv"][0]["password_env"]

    def env(self, state: Path) -> dict[str, str]:
        """A user's environment for this lab's plan: every password in the variable the plan names."""
        e = base_env(state)
        e[PASSWORD_ENV] = self.password
        for h in self.plan_data().get("hyperv") or ():
            e.pop(h["password_env"], None)
            e[h["password_env"]] = self.hyperv_password
        return e

    def write_plan(self, path: Path, **changes) -> Path:
        """A copy of the lab's plan with top-level ``changes`` (repository, limits, agents...)."""
        data = yaml.safe_load(self.plan.read_text())
        data.update({k: (str(v) if isinstance(v, Path) else v) for k, v in changes.items()})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def plan_data(self) -> dict:
        return yaml.safe_load(self.plan.read_text())


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory):
    """VMBACKUP_STATE_DIR of this session: its own Prefect server, stopped at the end.

    That server asks for its auth string: made here (as vmbackup makes it
    on its first start), it reaches every client of the tests, the
    commands' through their environment (:func:`base_env`) and this
    process's Prefect clients through its settings."""
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
    from vmbackup.localserver import server

    state = tmp_path_factory.mktemp("e2e-state")
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: server.ensure_auth(state)}):
        yield state
    env = base_env(state)
    run("server", "stop", env=env)
    assert not (state / "server.json").exists() or not run("server", "status", "--json", env=env).stdout.count(
        '"running": true'
    )


@pytest.fixture(autouse=True)
def _this_sessions_server(state_dir, monkeypatch):
    """Each test here sees this directory's Prefect settings, whatever another
    directory's session fixtures set in this process: `make test` runs the
    files on two pytest-xdist workers, so a worker may run a file of
    tests/orchestration (whose server's address, auth string and state
    directory it sets for its session) between two files of this one."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from vmbackup.localserver import server

    monkeypatch.delenv("VMBACKUP_STATE_DIR", raising=False)
    with temporary_settings(
        updates={PREFECT_API_AUTH_STRING: server.ensure_auth(state_dir)}, restore_defaults={PREFECT_API_URL}
    ):
        yield


def base_env(state: Path) -> dict[str, str]:
    """A user's environment for vmbackup's state directory ``state``; with
    the auth string of its server once there is one, for the Prefect
    clients a test starts itself (vmbackup's commands find it alone)."""
    from vmbackup.localserver import server

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != PASSWORD_ENV}
    env.update(VMBACKUP_STATE_DIR=str(state), DO_NOT_TRACK="1")
    auth = server.read_auth(state)
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def api_headers(env: dict[str, str]) -> dict[str, str]:
    """Headers of a plain HTTP request to the server of ``env`` (see
    :func:`base_env`): JSON, and its auth string as basic authentication."""
    import base64

    auth = env.get("PREFECT_API_AUTH_STRING") or read_auth(Path(env["VMBACKUP_STATE_DIR"]))
    headers = {"content-type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return headers


def read_auth(state: Path) -> str | None:
    from vmbackup.localserver import server

    return server.read_auth(state)


def _lab(tmp_path_factory, topology: str | Path | None):
    """A lab of ``topology`` (a file here, a path, or None: the lab's built-in default)."""
    state = tmp_path_factory.mktemp(Path(topology).stem if topology else "default-lab")
    env = base_env(state / "unused")
    args = ["--topology", str(HERE / topology)] if topology else []
    p = run("lab", "up", "--state", str(state), *args, "--json", env=env)
    summary = json.loads(p.stdout)
    try:
        yield E2ELab(load_lab(state), Path(summary["plan"]), summary["vsphere"]["password"], summary)
    finally:
        lab_down(state)


@pytest.fixture(scope="session")
def small_lab(tmp_path_factory):
    yield from _lab(tmp_path_factory, "topology.json")


@pytest.fixture(scope="session")
def lab30(tmp_path_factory):
    yield from _lab(tmp_path_factory, "topology-30.json")


@pytest.fixture(scope="session")
def default_lab(tmp_path_factory):
    """The lab as `vmbackup lab up` starts it: vSphere VMs and the Hyper-V host hv1."""
    yield from _lab(tmp_path_factory, None)


@pytest.fixture(scope="session")
def hyperv20_lab(tmp_path_factory):
    """Two Hyper-V hosts of ten VMs each (lab/topologies/hyperv-20.json)."""
    yield from _lab(tmp_path_factory, HERE.parents[1] / "lab" / "topologies" / "hyperv-20.json")


def hyperv_leftovers(e2e: E2ELab) -> dict:
    """What this system has on the lab's Hyper-V hosts: shadow copies and ledger runs, by host."""
    out = {}
    for hv in e2e.lab.hyperv_hosts():
        st = hv.status()
        if st["shadow_copies"] or st["runs"]:
            out[hv.host] = {"shadow_copies": [s["id"] for s in st["shadow_copies"]], "runs": st["runs"]}
    return out


@pytest.fixture
def env(state_dir, small_lab):
    """A user's environment: the password in the variable the lab's plan names."""
    e = base_env(state_dir)
    e[PASSWORD_ENV] = small_lab.password
    return e


def backup(*args: str, env: dict[str, str], expect: int = 0) -> list[dict]:
    p = run("backup", *args, "--json", env=env, expect=expect)
    return json.loads(p.stdout)["vms"]


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def leftovers(lab: Lab) -> dict:
    """What this system has now in the lab: snapshot and attached-disk counters
    (``now``), our snapshots and linked clones by VM."""
    st = lab.status()
    now = {
        f"{kind}.{scope}.{name}": c["now"]
        for kind in ("snapshots", "attached_disks")
        for scope, names in st["counters"][kind].items()
        for name, c in names.items()
        if c["now"]
    }
    snaps = {
        vm["name"]: [s["name"] if isinstance(s, dict) else s for s in vm["snapshots"]]
        for vm in st["vms"]
        if vm["snapshots"]
    }
    clones = [vm["name"] for vm in st["vms"] if vm["name"].startswith("vmbackup-clone")]
    return {"counters": now, "snapshots": snaps, "clones": clones}


def pyvmomi_leftovers(e2e: E2ELab) -> list[str]:
    """Our snapshots and linked clones as vSphere's API shows them."""
    from pydantic import SecretStr
    from pyVmomi import vim
    from vmbackup.plan import load_plan
    from vmbackup.vsphere.client import VSphereClient
    from vmbackup.vsphere.inventory import CLONE_PREFIX
    from vmbackup.vsphere.snapshots import PREFIX

    found = []
    plan = load_plan(e2e.plan)
    with VSphereClient.connect(plan.connection, SecretStr(e2e.password)) as client:
        for vm in client.objects(vim.VirtualMachine):
            if vm.name.startswith(CLONE_PREFIX):
                found.append(f"clone {vm.name}")
            stack = list(vm.snapshot.rootSnapshotList) if vm.snapshot is not None else []
            while stack:
                node = stack.pop()
                if node.name.startswith(PREFIX):
                    found.append(f"snapshot {node.name} of {vm.name}")
                stack += node.childSnapshotList or []
            if vm.name in e2e.lab.agents and len(vm.config.hardware.device) and vm.runtime is not None:
                disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
                if len(disks) != 1:
                    found.append(f"{len(disks) - 1} disk(s) attached to agent {vm.name}")
    return found


@pytest.fixture(scope="session")
def dup_lab(tmp_path_factory):
    """A vSphere VM and a Hyper-V VM both named web01 (tests/e2e/topology-hyperv-dup.json)."""
    yield from _lab(tmp_path_factory, "topology-hyperv-dup.json")
