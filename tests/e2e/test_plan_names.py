"""A plan that selects nothing is not a success (issue 16, part 4), on the
lab of vSphere and the Hyper-V host hv1 (the default lab), through
`vmbackup backup` as a user runs it:

- a name in the selection or an agent that no hypervisor of the plan has
  (an ESXi or Hyper-V host, a cluster, a VM folder, a custom attribute, a
  datastore) is one line naming the field and the name, exit 2, before any
  snapshot or shadow copy;
- the names the lab has pass (the inventory read is right, not just strict);
- a selection that matches no VM is one line, exit 1, and its flow run
  ends Failed;
- the site's planning flow (backup_site) ends Failed for either, and the
  shipped alert (deployments/automations.yaml, vmbackup-nightly-failed)
  sends its notification, to a webhook of the test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from vmbackup import _mover

from .conftest import run
from .test_hyperv import _api, _hyperv_only, _runs_of

ROOT = Path(__file__).resolve().parents[2]


def _plan(e2e, tmp_path, selection=None, agents=None, hyperv_only=False):
    """The lab's plan with a fresh repository, and its selection or agents changed."""
    path = tmp_path / "plan.yaml"
    data = yaml.safe_load(_hyperv_only(e2e, path).read_text()) if hyperv_only else e2e.plan_data()
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    data["repository"] = str(repo)
    if selection is not None:
        data["selection"] = selection
    if agents is not None:
        agents(data["agents"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _counters(e2e) -> tuple:
    """What a backup changes in the lab: vSphere's counters (but its API calls:
    checking the plan's names reads the inventory), each Hyper-V host's."""
    vsphere = {k: v for k, v in e2e.lab.status()["counters"].items() if k != "api_calls"}
    return vsphere, [hv.status()["counters"] for hv in e2e.lab.hyperv_hosts()]


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI:")]


def _hosts(*names):
    def change(agents):
        agents[0]["hosts"] = list(names)

    return change


def _datastore(name):
    def change(agents):
        agents[0]["datastores"] = {**agents[0]["datastores"], name: "/nonexistent"}

    return change


VC = "vCenter {url}"
# (selection, agents' change, Hyper-V only, the one line after "vmbackup: error: ")
CASES = {
    "esxi host in selection": (
        {"hosts": ["esx9"]}, None, False,
        "selection.hosts: esx9 is not a host of {vc} nor a Hyper-V host of the plan",
    ),
    "hyperv host in selection": (
        {"hosts": ["hv2"]}, None, False,
        "selection.hosts: hv2 is not a host of {vc} nor a Hyper-V host of the plan",
    ),
    "hyperv host in selection, Hyper-V only": (
        {"hosts": ["hv2"]}, None, True,
        "selection.hosts: hv2 is not a Hyper-V host of the plan (the plan has no vCenter)",
    ),
    "host in an agent": (
        {"vms": ["app01"]}, _hosts("esx1", "hv2"), False,
        "agents[0].hosts: hv2 is not a host of {vc} nor a Hyper-V host of the plan",
    ),
    "hyperv host spelt otherwise in an agent": (
        {"vms": ["app01"]}, _hosts("esx1", "HV1"), False,
        "agents[0].hosts: HV1 is not a host of {vc} nor a Hyper-V host of the plan "
        "(the plan's Hyper-V host is hv1: agents' hosts are compared exactly)",
    ),
    "datastore of an agent": (
        {"vms": ["app01"]}, _datastore("san-ds9"), False,
        "agents[0].datastores: san-ds9 is not a datastore of {vc}",
    ),
    "cluster": ({"clusters": ["cluster9"]}, None, False, "selection.clusters: cluster9 is not a cluster of {vc}"),
    "folder": ({"folders": ["prod"]}, None, False, "selection.folders: prod is not a VM folder of {vc}"),
    "tag": (
        {"tags": ["backup=gold"]}, None, False,
        "selection.tags: backup=gold is not a custom attribute of {vc}",
    ),
    "folder, Hyper-V only": (
        {"vms": ["*"], "folders": ["prod"]}, None, True,
        "selection.folders: prod is not a VM folder of any hypervisor of the plan "
        "(the plan has no vCenter; Hyper-V VMs are selected by vms and hosts)",
    ),
    "several": (
        {"hosts": ["hv2"], "clusters": ["cluster9"]}, _hosts("esx1", "hv3"), False,
        "selection.hosts: hv2 is not a host of {vc} nor a Hyper-V host of the plan (and 2 more mistakes)",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def name_runs(default_lab, state_dir, tmp_path_factory):
    """Every case of CASES through `vmbackup backup`, a few at once (each
    its own plan and repository; none may touch the lab, so they cannot
    disturb each other): the lab's counters before them all and after them
    all, and each case's finished command. A run takes seconds, mostly
    Python and Prefect starting: side by side they use both cores."""
    e2e = default_lab
    env = e2e.env(state_dir)
    plans = {}
    for i, case in enumerate(CASES):
        selection, agents, hyperv_only, _ = CASES[case]
        plans[case] = _plan(e2e, tmp_path_factory.mktemp(f"names{i}"), selection, agents, hyperv_only)
    before = _counters(e2e)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        done = {
            case: pool.submit(
                subprocess.run,
                [sys.executable, "-m", "vmbackup", "backup", "--plan", str(plan), "--json"],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            for case, plan in plans.items()
        }
        runs = {case: f.result() for case, f in done.items()}
    return before, _counters(e2e), runs


@pytest.mark.parametrize("case", list(CASES))
def test_a_name_no_hypervisor_has_is_one_line_exit_2_before_any_snapshot(default_lab, name_runs, case):
    e2e = default_lab
    message = CASES[case][3]
    before, after, runs = name_runs
    p = runs[case]

    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.returncode == 2, f"{case} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    line = message.format(vc=VC.format(url=e2e.plan_data()["connection"]["url"]))
    assert _errors(p) == [f"vmbackup: error: {line}"], p.stderr
    assert p.stdout == ""
    assert after == before  # no snapshot, no shadow copy, nothing attached (by this case nor any other)
    for secret in (e2e.password, e2e.hyperv_password):
        assert secret not in p.stdout + p.stderr


def test_the_names_the_lab_has_pass(default_lab):
    """Every kind of name the lab has is found (a folder and a custom
    attribute made here through vSphere's API), whatever their number of
    objects: one property retrieval, not a round trip per object."""
    from pyVmomi import vim
    from vmbackup.plan import load_plan
    from vmbackup.plan_names import unknown_names
    from vmbackup.vsphere.client import VSphereClient
    from vmbackup.vsphere.inventory import inventory_names

    e2e = default_lab
    plan = load_plan(e2e.plan)
    with VSphereClient.connect(plan.connection, SecretStr(e2e.password)) as client:
        cfm = client.content.customFieldsManager
        if "names-test" not in {f.name for f in cfm.field or []}:
            cfm.AddCustomFieldDef(name="names-test", moType=vim.VirtualMachine)
            (dc,) = client.objects(vim.Datacenter)
            dc.vmFolder.CreateFolder("names-prod").CreateFolder("names-web")
        names = inventory_names(client)
    assert {"esx1", "esx2"} <= names.hosts and names.clusters == {"cluster1"}
    assert {"esx1-local", "esx2-local", "shared1"} <= names.datastores
    assert {"vm", "names-prod", "names-web", "vm/names-prod", "vm/names-prod/names-web"} <= names.folders
    assert "host" not in names.folders and "datastore" not in names.folders  # not VM folders
    assert "names-test" in names.attributes
    good = plan.model_copy(
        update={
            "selection": plan.selection.model_copy(
                update={
                    "hosts": ["esx1", "HV1", "esx*"],  # Hyper-V names ignore case in the selection
                    "clusters": ["cluster1", "nothing-like-it*"],
                    "folders": ["vm/names-prod/names-web", "names-prod", "vm"],
                    "tags": ["names-test", "names-test=gold"],
                }
            )
        }
    )
    assert unknown_names(good, names) == []


def test_a_selection_matching_no_vm_fails_in_one_line_exit_1(default_lab, state_dir, tmp_path):
    """Today's `vms: [web9*]` backed up nothing and exited 0; the run is Failed."""
    e2e = default_lab
    plan = _plan(e2e, tmp_path, {"vms": ["web9*"], "exclude": ["*-test"]})
    env = e2e.env(state_dir)
    before = _counters(e2e)

    p = run("backup", "--plan", str(plan), "--json", env=env, expect=1)
    host = yaml.safe_load(plan.read_text())["connection"]["url"].split("//")[1].split(":")[0]
    assert _errors(p) == [
        f"vmbackup: error: the selection (vms: web9*; exclude: *-test) matches no VM in vCenter {host} "
        "or on Hyper-V host hv1: nothing was backed up"
    ], p.stderr
    assert p.stdout == ""
    assert _counters(e2e) == before
    (flow_run,) = _runs_of(env, "backup_vms", plan)
    assert flow_run["state_type"] == "FAILED", flow_run["state"]
    assert "matches no VM" in flow_run["state"]["message"], flow_run["state"]

    # `--vm` patterns that match nothing: the same.
    p = run("backup", "--plan", str(plan), "--vm", "zz*", env=env, expect=1)
    assert _errors(p) == [
        f"vmbackup: error: the selection (vms: zz*) matches no VM in vCenter {host} "
        "or on Hyper-V host hv1: nothing was backed up"
    ], p.stderr


def _site_run(env: dict[str, str], plan) -> tuple[subprocess.CompletedProcess, dict]:
    """``backup_site`` (the nightly planner) called on the session's server; its flow run."""
    code = (
        "import sys; from vmbackup.orchestration.site import backup_site; "
        "backup_site(plan_path=sys.argv[1], agent_deployment='no-such-flow/{agent}')"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(plan)],
        env=dict(env, PREFECT_API_URL=_api(env), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    (flow_run,) = _runs_of(env, "backup_site", plan)
    return p, flow_run


@contextlib.contextmanager
def _alerts(env: dict[str, str], tmp_path):
    """The ``vmbackup-nightly-failed`` automation of deployments/automations.yaml
    on the session's server, its notification block a webhook to a server
    of this test: yields the notifications received (``subject``, ``body``)."""
    got: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            got.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    env = dict(env, PREFECT_API_URL=_api(env), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false")
    code = (
        "import sys; from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
        "print(B(name='vmbackup-e2e', url=sys.argv[1], json_data={'subject': '{{subject}}', 'body': '{{body}}'})"
        ".save('vmbackup-e2e-alerts', overwrite=True))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, f"http://127.0.0.1:{hook.server_address[1]}/"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    block_id = p.stdout.strip().splitlines()[-1]
    shipped = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())["automations"]
    (alert,) = [a for a in shipped if a["name"] == "vmbackup-nightly-failed"]
    for action in alert["actions"]:
        action["block_document_id"] = block_id
    path = tmp_path / "automations.yaml"
    path.write_text(yaml.safe_dump({"automations": [alert]}))
    p = run_prefect("automation", "create", "--from-file", str(path), env=env)
    assert p.returncode == 0 and "Failed" not in p.stdout, p.stdout + p.stderr
    try:
        yield got
    finally:
        run_prefect("automation", "delete", "vmbackup-nightly-failed", env=env)
        hook.shutdown()


def run_prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    prefect = str(Path(sys.executable).with_name("prefect"))
    return subprocess.run([prefect, *args], env=env, capture_output=True, text=True, timeout=120, cwd="/")


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"vms": ["web9*"]}, "the selection (vms: web9*) matches no VM in vCenter "),
        ({"hosts": ["hv2"]}, "selection.hosts: hv2 is not a host of vCenter https://"),
    ],
    ids=["no VM", "unknown host"],
)
def test_the_nightly_planner_run_fails_when_nothing_is_selected(default_lab, state_dir, tmp_path, selection, message):
    """The site's planning flow ends Failed with the one line as its state's
    message (what `prefect deployment run backup_site/nightly --watch` exits
    1 on, and what the vmbackup-nightly-failed automation reports), and no
    agent's run is started (the agent deployment named here does not exist:
    asking for it would fail otherwise)."""
    e2e = default_lab
    env = e2e.env(state_dir)
    plan = _plan(e2e, tmp_path, selection)
    before = _counters(e2e)

    with _alerts(env, tmp_path) as got:
        p, flow_run = _site_run(env, plan)
        assert p.returncode == 1, p.stderr
        assert flow_run["state_type"] == "FAILED", flow_run["state"]
        text = flow_run["state"]["message"]
        assert message in text and "no-such-flow" not in text, text
        assert _counters(e2e) == before
        assert json.dumps(flow_run).count(e2e.password) == 0
        # The alert: the server's automation sends its notification (bounded: it normally takes a second or two).
        deadline = time.monotonic() + 120
        while not got and time.monotonic() < deadline:
            time.sleep(0.2)
    assert len(got) == 1, got
    assert got[0]["subject"] == f"vmbackup: the nightly run {flow_run['name']} failed", got
    assert message in got[0]["body"] and "ended Failed" in got[0]["body"], got
