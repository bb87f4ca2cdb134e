"""The lab's vSphere and Hyper-V VMs through `vmbackup backup` (the backup_vms
flow) as a user runs it: real pywinrm against the lab's Hyper-V host, real
Prefect, real mover.

- the lab's default plan in ONE run: one row per VM, all ok, one report,
  every disk restored bit-exact;
- kill -9 while a Hyper-V VM holds its shadow copy: the next run's
  reconcile, or the sweep_hyperv flow (`vmbackup maintain sweep`), leaves no
  shadow copy and no ledger run;
- 20 VMs on 2 Hyper-V hosts never exceed the per-host and per-volume limits;
- a wrong Hyper-V password or an untrusted CA: one line, no password.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from vmbackup import _mover

from .conftest import api_headers, backup, hyperv_leftovers, leftovers, run, sha
from .test_errors import _other_ca

CLEAN = {"counters": {}, "snapshots": {}, "clones": []}


def _api(env: dict[str, str]) -> str:
    return json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]


def _post(url: str, body: dict, env: dict[str, str]) -> list[dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=api_headers(env))
    return json.load(urllib.request.urlopen(req, timeout=60))


def _runs_of(env: dict[str, str], flow_name: str, plan) -> list[dict]:
    """The flow runs of ``flow_name`` for the plan file ``plan`` (each test has its own)."""
    api = _api(env)
    flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {"limit": 200}, env)}
    runs = _post(f"{api}/flow_runs/filter", {"limit": 200, "sort": "START_TIME_DESC"}, env)
    return [r for r in runs if flows.get(r["flow_id"]) == flow_name and r["parameters"].get("plan_path") == str(plan)]


def _artifacts(env: dict[str, str], flow_run_id: str) -> dict[str, dict]:
    arts = _post(f"{_api(env)}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}, env)
    return {a["key"]: a for a in arts}


def _expected(e2e) -> dict[str, str]:
    """Every VM of the lab (agents aside) -> its hypervisor."""
    lab = e2e.lab
    out = {v["name"]: "vsphere" for v in lab.status()["vms"] if v["name"] not in lab.agents}
    for hv in lab.hyperv_hosts():
        out.update({v["name"]: "hyperv" for v in hv.status()["vms"]})
    return out


def test_default_plan_vsphere_and_hyperv_in_one_run_restore_bit_exact(default_lab, state_dir, tmp_path):
    e2e, lab = default_lab, default_lab.lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)
    expected = _expected(e2e)
    assert {"vsphere", "hyperv"} == set(expected.values()), expected
    hv = lab.hyperv_hosts()[0]

    t0 = time.monotonic()
    rows = backup("--plan", str(plan), env=env)
    elapsed = time.monotonic() - t0
    print(f"{len(rows)} VMs ({sum(v == 'hyperv' for v in expected.values())} Hyper-V) in one run: {elapsed:.1f} s")

    assert sorted(r["vm"] for r in rows) == sorted(expected)
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None and r["backup_id"], r
        assert r["hypervisor"] == expected[r["vm"]], r
        assert r["bytes_read"] > 0 and r["disks"], r
    by_vm = {r["vm"]: r for r in rows}
    for name, kind in expected.items():
        if kind != "hyperv":
            continue
        r = by_vm[name]
        assert r["host"] == hv.host and r["transport"] in ("share", "local") and r["mode"] == "full", r
        assert r["datastores"] and all(k.startswith(f"{hv.host}:") for k in r["datastores"]), r
    # The lab's host: win01 runs with its Backup service on (application),
    # legacy01 has it off (crash, as the plan's policy allows); off01 is off (powered-off).
    assert by_vm["win01"]["consistency"] == "application", by_vm["win01"]
    assert by_vm["legacy01"]["consistency"] == "crash" and by_vm["off01"]["consistency"] == "powered-off"

    # One run, one report: its table has every VM with its hypervisor.
    new = _runs_of(env, "backup_vms", plan)
    assert len(new) == 1, [r["name"] for r in new]
    arts = _artifacts(env, new[0]["id"])
    table = json.loads(arts["vmbackup-backup-report"]["data"])
    assert {r["vm"]: r["hypervisor"] for r in table} == expected
    assert f"**{len(expected)} of {len(expected)} VM(s) backed up**" in arts["vmbackup-backup-summary"]["data"]

    # No guest wrote since the run: the lab's image now is the image as of
    # the shadow copy (or the snapshot); every disk restores bit-exact.
    for r in rows:
        for d in r["disks"]:
            image, restored = tmp_path / "lab.img", tmp_path / "restored.img"
            if r["hypervisor"] == "hyperv":
                lab.hyperv_for_vm(r["vm"]).disk_image(r["vm"], d["name"], image)
            else:
                lab.disk_image(r["vm"], d["name"], image)
            _mover.restore_disk(str(repo), r["backup_id"], str(restored), disk=d["name"])
            assert sha(restored) == sha(image), (r["vm"], d["name"])
            image.unlink()
            restored.unlink()
    assert hyperv_leftovers(e2e) == {}
    assert leftovers(lab) == CLEAN


@pytest.mark.parametrize("shared", ["0", "1"])
def test_twenty_vms_on_two_hyperv_hosts_never_exceed_the_limits(hyperv20_lab, state_dir, tmp_path, shared):
    """With a set per VM (``VMBACKUP_HYPERV_SHARED_SETS=0``) the lab's open sets
    count the VMs reading at once: never above the limits, and at the limit.
    With one set per volume group (the default) each host makes one set per
    group and each guest is quiesced once, whatever the limits."""
    e2e, lab = hyperv20_lab, hyperv20_lab.lab
    hosts = lab.hyperv_hosts()
    assert len(hosts) == 2
    limits = {"per_agent": 6, "per_host": 3, "per_datastore": 2, "disks_per_vm": 1}
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    data = e2e.plan_data()
    hv_vms = {v["name"] for hv in hosts for v in hv.status()["vms"]}
    assert len(hv_vms) == 20
    plan = e2e.write_plan(
        tmp_path / "plan.yaml", repository=repo, limits=limits, selection=dict(data["selection"], vms=sorted(hv_vms))
    )
    env = dict(e2e.env(state_dir), VMBACKUP_HYPERV_SHARED_SETS=shared)
    # With a set per VM the bounds prove something only if VMs did run at
    # once on a volume; on a loaded machine one run may happen to go one VM
    # at a time, so it is run again (at most three times) until they did,
    # the bounds checked on every run.
    peaks_volume: dict[str, int] = {}
    for _ in range(3):
        for hv in hosts:
            hv.reset_counters()
        before = {hv.host: hv.status() for hv in hosts}

        t0 = time.monotonic()
        rows = backup("--plan", str(plan), env=env)
        elapsed = time.monotonic() - t0
        print(f"20 Hyper-V VMs on 2 hosts in {elapsed:.1f} s: {20 * 60 / elapsed:.1f} VMs/min")

        assert sorted(r["vm"] for r in rows) == sorted(hv_vms)
        assert all(r["status"] == "ok" and r["hypervisor"] == "hyperv" for r in rows), [
            (r["vm"], r["error"]) for r in rows if r["status"] != "ok"
        ]
        peaks_host, peaks_volume = {}, {}
        for hv in hosts:
            st = hv.status()
            assert st["shadow_copies"] == [] and st["runs"] == [], st["shadow_copies"]
            peaks_host[hv.host] = st["peak_shadow_copies"]
            peaks_volume.update({f"{hv.host}:{v}": n for v, n in st["peak_shadow_copies_per_volume"].items()})
        assert all(n <= limits["per_host"] for n in peaks_host.values()), peaks_host
        assert all(n <= limits["per_datastore"] for n in peaks_volume.values()), peaks_volume
        if shared == "1":  # D: and E: on each host: 2 sets per host, one quiesce per guest
            for hv in hosts:
                st, b = hv.status(), before[hv.host]
                assert st["counters"]["shadow_sets_created"] - b["counters"]["shadow_sets_created"] == 2
                q0 = {v["name"]: v["quiesce_count"] for v in b["vms"]}
                assert all(v["quiesce_count"] - q0[v["name"]] == 1 for v in st["vms"]), st["vms"]
            return
        if max(peaks_volume.values()) == limits["per_datastore"]:
            return
    # VMs did run at once (else the bounds above prove nothing).
    assert max(peaks_volume.values()) == limits["per_datastore"], peaks_volume
    assert min(peaks_host.values()) >= 2, peaks_host


def _kill_while_shadow_open(e2e, plan, env, vm: str) -> None:
    hv = e2e.lab.hyperv_for_vm(vm)
    p = subprocess.Popen(
        [sys.executable, "-m", "vmbackup", "backup", "--plan", str(plan), "--vm", vm, "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Watch the host (no sleeps) until the VM's shadow copy exists, then kill at once.
        while p.poll() is None and not hv.status()["shadow_copies"]:
            pass
        assert p.poll() is None, "the run ended before the VM held a shadow copy"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    left = hyperv_leftovers(e2e)
    assert left and left[hv.host]["shadow_copies"] and left[hv.host]["runs"], left


@pytest.mark.parametrize("cleanup", ["next_run", "sweep"])
def test_killed_run_leaves_no_shadow_copy_after_reconcile_or_sweep(default_lab, state_dir, tmp_path, cleanup):
    e2e = default_lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    limits = {"per_agent": 5, "per_host": 4, "per_datastore": 4, "disks_per_vm": 1}
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo, limits=limits)
    hv = e2e.lab.hyperv_for_vm("win01")
    # Guest data on both disks, read one after the other, so the copy stays open a moment.
    hv.write("win01", "scsi0:0", 0, 64 << 20, seed=41)
    hv.write("win01", "scsi0:1", 0, 32 << 20, seed=42)
    _kill_while_shadow_open(e2e, plan, env, "win01")

    if cleanup == "sweep":
        p = run(
            "maintain", "sweep", "--plan", str(plan), "--hypervisor", "hyperv", "--older-than", "0", "--json", env=env
        )
        swept = json.loads(p.stdout)["leftovers"]
        assert swept and all(i["removed"] and i["hypervisor"] == "hyperv" for i in swept), swept
        assert {i["host"] for i in swept} == {hv.host}
        assert sum(len(i["shadow_copies"]) for i in swept) >= 1, swept
        assert hyperv_leftovers(e2e) == {}

    rows = backup("--plan", str(plan), "--vm", "win01", env=env)
    assert [(r["vm"], r["status"], r["hypervisor"]) for r in rows] == [("win01", "ok", "hyperv")], rows
    assert hyperv_leftovers(e2e) == {}
    st = hv.status()
    assert st["shadow_copies"] == [] and st["runs"] == []


def _hyperv_only(e2e, path):
    """The plan without vCenter: its agents keep only what names a Hyper-V
    host of the plan (an ESXi host or a datastore would be a mistake now)."""
    data = e2e.plan_data()
    data.pop("connection", None)
    data["selection"] = dict(data["selection"], vms=["*"])
    hv = {h["name"] for h in data["hyperv"]}
    for a in data["agents"]:
        a["hosts"] = [h for h in a.get("hosts", []) if h in hv]
        a.pop("datastores", None)
        a["transports"] = [t for t in a.get("transports", ["nbd"]) if t != "direct"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("scope", ["mixed", "hyperv_only"])
@pytest.mark.parametrize(
    "case, message",
    [
        ("password", "the user name or password was rejected"),
        ("certificate", "the server certificate is not trusted"),
        ("unreachable", ": unreachable: "),
    ],
)
def test_wrong_hyperv_password_or_ca_one_line(default_lab, state_dir, tmp_path, case, message, scope):
    e2e = default_lab
    env = e2e.env(state_dir)
    wrong = "not-the-hyperv-password-4711"
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)
    if scope == "hyperv_only":
        plan = _hyperv_only(e2e, plan)
    if case == "password":
        env[e2e.hyperv_password_env] = wrong
    elif case == "certificate":
        data = yaml.safe_load(plan.read_text())
        data["hyperv"] = [dict(h, ca_file=_other_ca(tmp_path)) for h in data["hyperv"]]
        plan.write_text(yaml.safe_dump(data, sort_keys=False))
    else:  # a port nothing listens on (bound here, never listening)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        data = yaml.safe_load(plan.read_text())
        data["hyperv"] = [dict(h, url=f"https://127.0.0.1:{closed.getsockname()[1]}/wsman") for h in data["hyperv"]]
        plan.write_text(yaml.safe_dump(data, sort_keys=False))
    hv = e2e.lab.hyperv_hosts()[0]
    before = hv.status()["counters"]

    p = run("backup", "--plan", str(plan), "--json", env=env, expect=1)
    errors = [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI:")]
    if scope == "mixed":
        # The vSphere VMs are backed up; the host that was not reached is one row, one line.
        rows = json.loads(p.stdout)["vms"]
        failed = [r for r in rows if r["status"] != "ok"]
        assert [(r["vm"], r["hypervisor"], r["host"]) for r in failed] == [(f"{hv.host}:*", "hyperv", hv.host)], rows
        assert message in failed[0]["error"] and "\n" not in failed[0]["error"], failed
        assert {r["hypervisor"] for r in rows if r["status"] == "ok"} == {"vsphere"} and len(rows) > 1, rows
        assert errors == [], p.stderr
        human = run("backup", "--plan", str(plan), env=env, expect=1).stdout
        assert [line for line in human.splitlines() if line.startswith("FAILED")] == [
            f"FAILED {hv.host}:*: {failed[0]['error']}"
        ], human
    else:
        # The plan's only hypervisor: the run's one line says which host, then why.
        assert p.stdout == ""
        assert len(errors) == 1 and errors[0].startswith(f"vmbackup: error: Hyper-V host {hv.host}: WinRM at "), (
            p.stderr
        )
        assert message in errors[0], p.stderr
    for secret in (e2e.password, e2e.hyperv_password, wrong):
        assert secret not in p.stdout + p.stderr
    assert hv.status()["counters"] == before  # no shadow copy was made


def test_backup_vsphere_vms_still_backs_up_the_vsphere_vms_only(default_lab, state_dir, tmp_path):
    """The flow of the deployments made before Hyper-V: same behaviour, same report keys."""
    e2e = default_lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)
    expected = {vm for vm, kind in _expected(e2e).items() if kind == "vsphere"}
    for hv in e2e.lab.hyperv_hosts():
        hv.reset_counters()
    code = (
        "import json, sys; from vmbackup.orchestration.backup_vsphere import backup_vsphere_vms; "
        "print(json.dumps(backup_vsphere_vms(plan_path=sys.argv[1]), default=str))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(plan)],
        env=dict(env, PREFECT_API_URL=_api(env), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout.splitlines()[-1])
    assert {r["vm"] for r in rows} == expected
    assert all(r["status"] == "ok" and r["hypervisor"] == "vsphere" for r in rows), rows
    new = _runs_of(env, "backup_vsphere_vms", plan)
    assert len(new) == 1
    table = json.loads(_artifacts(env, new[0]["id"])["vmbackup-vsphere-report"]["data"])
    assert {r["vm"] for r in table} == expected
    # No shadow copy was made on the Hyper-V host.
    assert [hv.status()["peak_shadow_copies"] for hv in e2e.lab.hyperv_hosts()] == [0]


def test_two_selected_vms_with_one_name_are_both_backed_up_and_their_rows_say_which(dup_lab, state_dir, tmp_path):
    e2e = dup_lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)

    p = run("backup", "--plan", str(plan), "--json", env=env, expect=0)
    rows = json.loads(p.stdout)["vms"]
    assert sorted((r["vm"], r["hypervisor"], r["status"]) for r in rows) == [
        ("solo01", "vsphere", "ok"),
        ("web01", "hyperv", "ok"),
        ("web01", "vsphere", "ok"),
        ("win02", "hyperv", "ok"),
    ], rows
    web = {r["hypervisor"]: r for r in rows if r["vm"] == "web01"}
    assert web["vsphere"]["host"] == "esxd1" and web["hyperv"]["host"] == "hvd1", web
    assert web["vsphere"]["vm_id"] and web["hyperv"]["vm_id"] and web["vsphere"]["vm_id"] != web["hyperv"]["vm_id"]
    assert all(r["skipped_disks"] == [] for r in rows)
    # Both are in the repository under the name, told apart by their vm_id.
    points = [b for b in _mover.list_backups(str(repo))[0] if b.vm == "web01"]
    assert sorted(b.attributes["vm_id"] for b in points) == sorted(r["vm_id"] for r in web.values())
    assert {b.attributes["hypervisor"] for b in points} == {"vsphere", "hyperv"}
    assert hyperv_leftovers(e2e) == {}
    # The next run: each is incremental to its own chain (Hyper-V: a full, RCT is not used yet).
    p = run("backup", "--plan", str(plan), "--vm", "web01", "--json", env=env, expect=0)
    again = {r["hypervisor"]: r for r in json.loads(p.stdout)["vms"]}
    assert again["vsphere"]["mode"] == "incremental" and again["vsphere"]["vm_id"] == web["vsphere"]["vm_id"]
    parents = {b.attributes["vm_id"]: b.parent for b in _mover.list_backups(str(repo))[0] if b.vm == "web01"}
    assert parents[web["vsphere"]["vm_id"]] in {b.id for b in points}


def test_an_agents_run_given_vms_by_identity_backs_up_only_those_of_a_shared_name(dup_lab, state_dir, tmp_path):
    """What a site's planning run hands an agent's run (``identities``): of
    the two VMs named web01 (vSphere and Hyper-V) the run backs up the one
    it was given, although it selects by the name; one that is gone is a
    failed row that says which."""
    e2e = dup_lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)
    run("backup", "--plan", str(plan), "--vm", "web01", "--json", env=env, expect=0)
    points = {b.attributes["hypervisor"]: b for b in _mover.list_backups(str(repo))[0]}
    ident = {
        "vsphere": f"vsphere:{points['vsphere'].attributes['vm_moref']}",
        "hyperv": f"hyperv:hvd1:{points['hyperv'].attributes['vm_id']}",
    }
    code = (
        "import json, sys; from vmbackup.orchestration.backup import backup_vms; "
        "print(json.dumps(backup_vms(plan_path=sys.argv[1], vms=['web01'], "
        "identities=json.loads(sys.argv[2])), default=str))"
    )
    for kind, given in (("hyperv", {ident["hyperv"]: "web01"}), ("vsphere", {ident["vsphere"]: "web01"})):
        given = given | {"vsphere:vm-gone": "web01"}
        p = subprocess.run(
            [sys.executable, "-c", code, str(plan), json.dumps(given)],
            env=dict(env, PREFECT_API_URL=_api(env), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout.splitlines()[-1])
        ok = [r for r in rows if r["status"] == "ok"]
        assert [(r["vm"], r["hypervisor"], r["vm_id"]) for r in ok] == [
            ("web01", kind, points[kind].attributes["vm_id"])
        ], rows
        [gone] = [r for r in rows if r["status"] != "ok"]
        assert gone["vm"] == "web01" and "vsphere:vm-gone" in gone["error"], gone
    assert hyperv_leftovers(e2e) == {}


def test_hyperv_password_from_a_secret_block_and_a_missing_block_is_one_line(default_lab, state_dir, tmp_path):
    """``hyperv[hv1].password_secret`` names a Prefect Secret block on the
    server `vmbackup backup` runs its flows on: the host's VMs are backed up
    with it; a block that does not exist is one line naming the plan's entry
    (exit 2); the password shows nowhere."""
    from .test_no_secret import _server_holdings

    e2e = default_lab
    hv = e2e.lab.hyperv_hosts()[0]
    env = e2e.env(state_dir)
    env.pop(e2e.hyperv_password_env)  # only the block holds it
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = _hyperv_only(e2e, e2e.write_plan(tmp_path / "plan.yaml", repository=repo))
    block = "hv1-password-e2e"

    def name_block(name: str) -> None:
        data = yaml.safe_load(plan.read_text())
        data["hyperv"] = [
            {**{k: v for k, v in h.items() if k != "password_env"}, "password_secret": name} for h in data["hyperv"]
        ]
        plan.write_text(yaml.safe_dump(data, sort_keys=False))

    hv.reset_counters()
    name_block("no-such-block-e2e")
    p = run("backup", "--plan", str(plan), "--json", env=env, expect=2)
    errors = [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI:")]
    assert p.stdout == "" and errors == [
        f"vmbackup: error: hyperv[{hv.host}].password_secret: there is no Secret block named 'no-such-block-e2e'"
    ], p.stderr
    assert hv.status()["peak_shadow_copies"] == 0  # nothing was started on the host

    api = _api(env)
    code = "import os,sys; from prefect.blocks.system import Secret; Secret(value=os.environ['PW']).save(sys.argv[1])"
    s = subprocess.run(
        [sys.executable, "-c", code, block],
        env=dict(env, PREFECT_API_URL=api, PW=e2e.hyperv_password),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert s.returncode == 0, s.stderr
    name_block(block)
    p = run("backup", "--plan", str(plan), "--json", env=env)
    rows = json.loads(p.stdout)["vms"]
    expected = sorted(vm for vm, kind in _expected(e2e).items() if kind == "hyperv")
    assert sorted(r["vm"] for r in rows) == expected and all(r["status"] == "ok" for r in rows), rows
    assert hyperv_leftovers(e2e) == {}
    held = json.dumps(_server_holdings(api)) + p.stdout + p.stderr
    assert e2e.hyperv_password not in held
