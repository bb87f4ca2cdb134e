"""`vmbackup restore` and `vmbackup maintain drill` as a user runs them, on
the shared small lab and the session's Prefect server: the rows' contract,
restored disks equal to the backup byte for byte (`vmbackup lab disk-image`
of the new VM), a name in use refused, the run's table and summary read back
from the server, the limits held by restores as by backups, a drill that
passes on the plan's drill network (its events on the server), one that fails
when the lab corrupts what was restored, and Ctrl-C or SIGTERM mid-way.

Each test backs up into a repository of its own (the lab's plan with another
`repository`) and removes the VMs it restored, so the shared lab's VMs stay
what the other tests expect.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
from vmbackup import _mover, results

from .conftest import backup, run, sha

VSPHERE_VMS = ["web01", "db01"]  # three buses between them: scsi, nvme, sata
# web01 on esx1; db01 and app01 (one disk each) on esx2: two restores onto one host at once
RESTORED_VMS = ["web01", "db01", "app01"]
AGENT2 = "vmbackup-agent-esx2"
# A port group of the datacenter that no ESXi host lists among its networks:
# the network a VM was backed up on and the target host lacks (a restore to
# another site); "VM Network" and "Isolated" (the lab's port groups, docs/lab.md)
# are on every host, "Isolated" is the drills' network.
LAN, VM_NETWORK, ISOLATED = "LAN", "VM Network", "Isolated"
CONTRACT = {"vm", "hypervisor", "status", "point", "restored_as", "host", "disks", "seconds", "error"}


def _plan(e2e, tmp_path, **changes):
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    return e2e.write_plan(tmp_path / "plan.yaml", repository=repo, **changes), str(repo)


def restore(*args: str, env: dict, expect: int = 0) -> list[dict]:
    p = run("restore", *args, "--json", env=env, expect=expect)
    return json.loads(p.stdout)["vms"]


def _vsphere_vm_names(e2e) -> set[str]:
    return {v["name"] for v in e2e.lab.status()["vms"]}


@contextlib.contextmanager
def removed_afterwards(e2e):
    """Destroys the VMs that appeared in the lab's vCenter meanwhile (the
    shared lab's VM list stays what the other tests expect)."""
    before = _vsphere_vm_names(e2e)
    try:
        yield
    finally:
        extra = _vsphere_vm_names(e2e) - before
        if extra:
            from pydantic import SecretStr
            from pyVmomi import vim, vmodl
            from vmbackup.plan import load_plan
            from vmbackup.vsphere.client import VSphereClient
            from vmbackup.vsphere.tasks import wait_task

            with VSphereClient.connect(load_plan(e2e.plan).connection, SecretStr(e2e.password)) as client:
                for vm in client.objects(vim.VirtualMachine):
                    with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):  # gone meanwhile
                        if vm.name in extra:
                            if str(vm.runtime.powerState) == "poweredOn":
                                wait_task(vm.PowerOffVM_Task(), f"powering off {vm.name}")
                            wait_task(vm.Destroy_Task(), f"destroying {vm.name}")


@contextlib.contextmanager
def _client(e2e):
    from pydantic import SecretStr
    from vmbackup.plan import load_plan
    from vmbackup.vsphere.client import VSphereClient

    with VSphereClient.connect(load_plan(e2e.plan).connection, SecretStr(e2e.password)) as client:
        yield client


def _nics(vm) -> list:
    from pyVmomi import vim

    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]


@contextlib.contextmanager
def nics_on_lan(e2e, vms):
    """Gives each VM a network adapter on LAN (removed afterwards, so the
    shared lab's VMs stay as the other tests expect); yields VM -> its MAC."""
    from pyVmomi import vim
    from vmbackup.vsphere.tasks import wait_task

    with _client(e2e) as client:
        ns = next(iter(client.objects(vim.HostSystem))).configManager.networkSystem
        with contextlib.suppress(vim.fault.DuplicateName, vim.fault.AlreadyExists):  # an earlier test's
            spec = vim.host.PortGroup.Specification(
                name=LAN, vswitchName=ns.networkInfo.vswitch[0].name, vlanId=0, policy=vim.host.NetworkPolicy()
            )
            ns.AddPortGroup(portgrp=spec)
        macs = {}
        for i, name in enumerate(vms):
            vm = client.find_vm(name)
            nic = vim.vm.device.VirtualVmxnet3(
                key=-1,
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=LAN),
                addressType="manual",
                macAddress=f"00:50:56:0a:0b:{i:02x}",
            )
            change = vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)
            wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])), f"a NIC for {name}")
            [card] = _nics(vm)
            assert card.backing.deviceName == LAN, card
            macs[name] = card.macAddress
        try:
            yield macs
        finally:
            for name in vms:
                vm = client.find_vm(name)
                gone = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in _nics(vm)]
                wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=gone)), f"{name}'s NIC removed")


def _on_network(card, network: str) -> bool:
    """The adapter is on ``network`` and connects when the VM starts."""
    return card.backing.deviceName == network and bool(card.connectable.startConnected)


def _disk_equal(e2e, env, repo, point, vm, disk, tmp_path) -> bool:
    image, saved = tmp_path / f"{vm}-{disk}.img", tmp_path / f"{vm}-{disk}.saved"
    run("lab", "disk-image", "--state", str(e2e.lab.state), "--vm", vm, "--disk", disk, str(image), env=env)
    _mover.restore_disk(repo, point, str(saved), disk=disk)
    return sha(image) == sha(saved)


def test_vsphere_vms_restored_as_new_vms_equal_to_the_backup(small_lab, env, tmp_path):
    """Three VMs in one run (two onto esx2 at once, under a limit of one per
    host), web01 and app01 with an adapter on LAN mapped to VM Network: the
    rows, the disks, the new identity and MACs on the new VMs, the run's table
    and summary as the server holds them, and a name in use refused."""
    lab = small_lab.lab
    plan, repo = _plan(small_lab, tmp_path)
    # The restores' own plan: a limit of one per host that only the restore
    # sets on the server (the backup's plan has the default, 4).
    one_per_host = small_lab.write_plan(tmp_path / "restore-plan.yaml", repository=repo, limits={"per_host": 1})
    lab.write("web01", "scsi0:0", 5 << 20, 1 << 20, seed=31)
    lab.write("db01", "sata0:0", 0, 2 << 20, seed=32)
    with nics_on_lan(small_lab, ["web01", "app01"]) as macs:
        points = backup("--plan", str(plan), *[a for v in RESTORED_VMS for a in ("--vm", v)], env=env)
    points = {r["vm"]: r for r in points}
    assert all(r["status"] == "ok" for r in points.values()), points

    with removed_afterwards(small_lab):
        lab.reset_counters()
        # esx2's agent attaches and detaches slowly (one at a time, as
        # transport.py's lock has it): db01's and app01's restores, started
        # within the Prefect server's ~2 s of each other, would then have a
        # disk attached at once but for the host's limit.
        lab.set_faults(vm=AGENT2, slow_ms=3000)
        try:
            args = [a for v in RESTORED_VMS for a in ("--vm", v)]
            rows = restore("--plan", str(one_per_host), *args, "--network-map", f"{LAN}={VM_NETWORK}", env=env)
        finally:
            lab.set_faults(vm=AGENT2)
        # Restores hold the backups' limits: one VM at a time per host. db01
        # and app01 have a disk each, so esx2's attached disks (on its agent)
        # are its restores at once; web01 alone on esx1 attaches its two.
        attached = lab.status()["counters"]["attached_disks"]
        assert attached["host"]["esx2"]["peak"] == 1, attached
        assert attached["agent"][AGENT2]["peak"] == 1, attached

        assert [r["vm"] for r in rows] == RESTORED_VMS
        for r in rows:
            assert set(results.row_fields(results.RestoreResult)) == set(r) and CONTRACT <= set(r), r
            assert r["status"] == "ok" and r["error"] is None, r
            assert r["hypervisor"] == "vsphere" and r["restored_as"] == f"{r['vm']}-restored", r
            assert r["point"] == points[r["vm"]]["backup_id"] and r["host"] == points[r["vm"]]["host"], r
            assert r["seconds"] > 0 and r["bytes_written"] > 0, r
            assert r["location"] in points[r["vm"]]["datastores"], r  # the point's (first disk's) datastore
            backed_up = {d["name"] for d in points[r["vm"]]["disks"]}
            assert {d["disk"] for d in r["disks"]} == backed_up, r
            for d in r["disks"]:
                assert set(d) >= {"disk", "bytes_written", "seconds"}, d
                assert _disk_equal(small_lab, env, repo, r["point"], r["restored_as"], d["disk"], tmp_path), d
            # A new identity, said in the row.
            assert r["changes"] and r["vm_id"] and r["vm_id"] != points[r["vm"]]["vm_id"], r
        # The new VMs: their adapters on the mapped network with new MACs.
        with _client(small_lab) as client:
            for vm, mac in macs.items():
                [card] = _nics(client.find_vm(f"{vm}-restored"))
                assert _on_network(card, VM_NETWORK) and card.macAddress != mac, (vm, card)
            assert not _nics(client.find_vm("db01-restored"))

        _check_restore_artifacts(env, one_per_host, rows, macs)

        # The same restore again: the name is in use. One line, exit 2, nothing new.
        before = _vsphere_vm_names(small_lab)
        p = run("restore", "--plan", str(plan), "--vm", "web01", "--json", env=env, expect=2)
        lines = p.stderr.strip().splitlines()
        assert p.stdout == "" and "web01-restored exists already" in lines[-1], p.stderr
        assert len([x for x in lines if x.startswith("vmbackup:")]) == 1, p.stderr
        assert _vsphere_vm_names(small_lab) == before


def _check_restore_artifacts(env, plan, rows, macs) -> None:
    """The run's table has a row per VM; its summary says, per VM, what was
    restored, where, how long, the new id and MACs, and the networks mapped."""
    from .test_hyperv import _artifacts, _runs_of

    [flow_run] = _runs_of(env, "restore_vm", plan)
    arts = _artifacts(env, flow_run["id"])
    table = json.loads(arts["vmbackup-restore-report"]["data"])
    assert [(t["vm"], t["restored_as"], t["vm_id"]) for t in table] == [
        (r["vm"], r["restored_as"], r["vm_id"]) for r in rows
    ], table
    md = arts["vmbackup-restore-summary"]["data"]
    assert f"**{len(rows)} of {len(rows)} VM(s) restored**" in md, md
    sections = {part.split("\n", 1)[0]: part for part in md.split("\n## ")[1:]}
    for r in rows:
        line = [r["vm"], r["restored_as"], r["point"], r["host"], r["location"], f"{r['seconds']:.1f} s", "ok"]
        assert "| " + " | ".join(line) + " |" in md, (line, md)
        section = sections[f"{r['vm']} -> {r['restored_as']}"]
        assert f"host {r['host']}, {r['location']}" in section and f"new VM id {r['vm_id']}" in section, section
        assert f"RTO {r['seconds']:.1f} s" in section, section
        if r["vm"] in macs:
            assert f"network {LAN} mapped to {VM_NETWORK}" in section, section
            assert f"new MAC address (the source's was {macs[r['vm']]})" in section, section
        else:
            assert "MAC" not in section and "mapped" not in section, section


def _drill_plan(e2e, tmp_path):
    # The drill's isolated network: the second of the two the lab's hosts have
    # (not the first, where an adapter whose network is missing sits
    # disconnected); the VMs' own (LAN) is on none, so a drill VM is on
    # Isolated, connected, only if the drill mapped its network there.
    return _plan(e2e, tmp_path, drill={"vsphere": {"network": ISOLATED}, "sample": 2, "vms": VSPHERE_VMS})


def _drill_events(env: dict, wanted: dict[str, list[str]]) -> dict[tuple[str, str], object]:
    """(event name, drill VM) -> its event, for each name's drill VMs in
    ``wanted``, from the server's events API."""
    import asyncio
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]
    want = {(name, vm) for name, vms in wanted.items() for vm in vms}

    async def read():
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter

        async with get_client() as c:
            page = await c.read_events(filter=EventFilter(event=EventNameFilter(name=list(wanted))), limit=50)
            found = {(e.event, e.payload.get("restored_as")): e for e in page.events}
            return {k: e for k, e in found.items() if k in want}

    deadline = time.monotonic() + 60  # a bound on a broken server, not a wait
    with temporary_settings(updates={PREFECT_API_URL: api}):
        found = asyncio.run(read())
        while found.keys() != want and time.monotonic() < deadline:
            time.sleep(0.2)
            found = asyncio.run(read())
    return found


def _drill_watching_its_vm(e2e, plan, env) -> tuple[subprocess.CompletedProcess, list]:
    """`vmbackup maintain drill --sample 1` while the host's slow tasks hold
    it mid-way: the drill VM's network adapters, read while it exists."""
    from pyVmomi import vmodl

    p = subprocess.Popen(
        [sys.executable, "-m", "vmbackup", "maintain", "drill", "--plan", str(plan), "--sample", "1", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cards = None
    try:
        with _client(e2e) as client:
            while cards is None and p.poll() is None:  # watch vCenter (no sleeps) until the drill VM is made
                index = client.vm_index(refresh=True)
                for vm in (vm for name, vms in index.items() if name.startswith("drill-") for vm in vms):
                    with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):  # removed meanwhile
                        cards = [(c.backing.deviceName, c.connectable.startConnected) for c in _nics(vm)]
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
        p.wait()
    assert cards is not None, "the drill ended before its VM was seen"
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), cards


def test_drill_passes_then_fails_when_the_lab_corrupts_a_restored_disk(small_lab, env, tmp_path):
    lab = small_lab.lab
    plan, repo = _drill_plan(small_lab, tmp_path)
    with nics_on_lan(small_lab, VSPHERE_VMS):
        backup("--plan", str(plan), *[a for v in VSPHERE_VMS for a in ("--vm", v)], env=env)

    with removed_afterwards(small_lab):
        before = _vsphere_vm_names(small_lab)
        # One VM per run, the least recently drilled first: db01 (never, and first by name), then web01.
        drilled, passed = [], []
        for i, _ in enumerate(VSPHERE_VMS):
            if i == 0:
                # db01's host's slow tasks hold the drill while its VM is read: on the plan's drill network
                # (Isolated, not the host's first network, VM Network), connected.
                lab.set_faults(host="esx2", slow_ms=300)
                try:
                    p, cards = _drill_watching_its_vm(small_lab, plan, env)
                finally:
                    lab.set_faults(host="esx2")
                assert p.returncode == 0, p.stderr
                assert cards == [(ISOLATED, True)], cards
            else:
                p = run("maintain", "drill", "--plan", str(plan), "--sample", "1", "--json", env=env)
            report = json.loads(p.stdout)
            assert len(report["passed"]) == 1 and report["failed"] == [], report
            [r] = report["vms"]
            assert r["status"] == "ok" and r["verified"] is True and r["powered_on"] is True, r
            assert r["restored_as"].startswith(f"drill-{r['vm']}-") and r["seconds"] > 0, r
            assert f"network adapter 1: network {LAN} mapped to {ISOLATED}" in r["changes"], r
            drilled.append(r["vm"])
            passed.append(r)
        assert drilled == sorted(VSPHERE_VMS), drilled
        # Removed: the lab has the VMs it had.
        assert _vsphere_vm_names(small_lab) == before
        record = json.loads((tmp_path / "repo" / "drills.json").read_text())["vms"]
        assert sorted(record) == sorted(VSPHERE_VMS) and all(v["passed"] for v in record.values())

        # The lab flips bytes of what a restore writes into a new disk of web01's host.
        host = r["host"]  # web01's, drilled last
        run("lab", "fault", "--state", str(lab.state), "--host", host, "--set", "corrupt_restore", env=env)
        try:
            p = run("maintain", "drill", "--plan", str(plan), "--vm", "web01", "--json", env=env, expect=1)
        finally:
            run("lab", "fault", "--state", str(lab.state), "--host", host, env=env)
        report = json.loads(p.stdout)
        assert report["failed"] == ["web01"] and report["passed"] == [], report
        [r] = report["vms"]
        assert r["status"] == "failed" and "differs from backup point" in r["error"], r
        assert "drill" in p.stderr and "web01" in p.stderr
        # Each drill's event, from the server.
        events = _drill_events(
            env,
            {"vmbackup.drill.passed": [x["restored_as"] for x in passed], "vmbackup.drill.failed": [r["restored_as"]]},
        )
        for x in passed:
            event = events[("vmbackup.drill.passed", x["restored_as"])]
            assert event.resource.id == f"vmbackup.vm.{x['vm']}" and event.payload["verified"] is True, event
        event = events[("vmbackup.drill.failed", r["restored_as"])]
        assert event.resource.id == "vmbackup.vm.web01" and event.payload["error"] == r["error"], event
        assert event.payload["verified"] is not True, event
        assert _vsphere_vm_names(small_lab) == before  # the failed drill's VM is removed too


def test_hyperv_vm_and_a_vsphere_vm_restored_onto_a_hyperv_host(default_lab, state_dir, tmp_path):
    """One run, two VMs onto hv1: Hyper-V's win01 as a new VM, and vSphere's
    web01 across hypervisors; every disk keeps its name (SCSI on both) and
    equals the backup; restored Hyper-V VMs are in `lab status`."""
    e2e = default_lab
    env = e2e.env(state_dir)
    plan, repo = _plan(e2e, tmp_path)
    points = {r["vm"]: r for r in backup("--plan", str(plan), "--vm", "win01", "--vm", "web01", env=env)}
    assert all(p["status"] == "ok" for p in points.values()), points
    rows = restore("--plan", str(plan), "--vm", "win01", "--vm", "web01", "--host", "hv1", env=env)
    try:
        status = json.loads(run("lab", "status", "--state", str(e2e.lab.state), "--json", env=env).stdout)
        listed = {v["name"]: v for h in status["hyperv_hosts"] for v in h["vms"]}
        for r in rows:
            point = points[r["vm"]]
            assert CONTRACT <= set(r) and r["status"] == "ok", r
            assert (r["hypervisor"], r["host"], r["source_hypervisor"]) == ("hyperv", "hv1", point["hypervisor"]), r
            assert r["restored_as"] == f"{r['vm']}-restored" and r["point"] == point["backup_id"], r
            assert sorted(d["disk"] for d in r["disks"]) == sorted(d["name"] for d in point["disks"]), r
            assert sorted(d["name"] for d in listed[r["restored_as"]]["disks"]) == sorted(d["disk"] for d in r["disks"])
            for d in r["disks"]:
                assert _disk_equal(e2e, env, repo, r["point"], r["restored_as"], d["disk"], tmp_path), d
    finally:
        for r in rows:
            _remove_hyperv_vm(e2e, r)


def _remove_hyperv_vm(e2e, r: dict) -> None:
    """Removes a restored Hyper-V VM and its folder with the adapter's own
    script (the shared lab keeps the VMs the other tests expect)."""
    if r.get("status") != "ok":
        return
    from pydantic import SecretStr
    from vmbackup.hyperv.inventory import connect
    from vmbackup.plan import load_plan

    host = load_plan(e2e.plan).hyperv_host(r["host"])
    client = connect(host, SecretStr(e2e.hyperv_password))
    client.run_script(
        "Remove-VmbackupRestore.ps1", {"RestoreId": "e2e-cleanup", "VMId": r["vm_id"], "Path": r["location"]}
    )
    assert r["restored_as"] not in e2e.lab.hyperv_host(r["host"]).vm_names()


def _attached(lab) -> int:
    return sum(c["now"] for c in lab.status()["counters"]["attached_disks"]["agent"].values())


@pytest.fixture(scope="module")
def app01_point(small_lab, state_dir, tmp_path_factory):
    """app01 backed up once, into a repository of its own, for the restores
    caught mid-way: (plan, its point's row)."""
    plan, _ = _plan(small_lab, tmp_path_factory.mktemp("app01-point"))
    [point] = backup("--plan", str(plan), "--vm", "app01", env=small_lab.env(state_dir))
    assert point["status"] == "ok", point
    return plan, point


def _restore_caught_mid_way(e2e, plan, host: str, env: dict, stop) -> subprocess.CompletedProcess:
    """`vmbackup restore --vm app01` while its host's tasks are slow (CreateVM,
    the hot-add's ReconfigVM); ``stop(p)`` once the new VM exists with a disk
    on the agent (watched in the lab, no sleeps); what the command did."""
    e2e.lab.set_faults(host=host, slow_ms=1500)
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "vmbackup", "restore", "--plan", str(plan), "--vm", "app01", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while p.poll() is None and not ("app01-restored" in _vsphere_vm_names(e2e) and _attached(e2e.lab)):
                pass
            assert p.poll() is None, "the restore ended before it was caught mid-way"
            stop(p)
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
            p.wait()
    finally:
        e2e.lab.set_faults(host=host)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_restore_killed_mid_way_is_reconciled_by_the_next_one(small_lab, env, app01_point):
    """kill -9 of `vmbackup restore` while the new VM's disk is attached to the
    agent; the same restore again removes the half-made VM first and succeeds:
    exactly one VM whose name starts with the requested one, nothing attached."""
    lab = small_lab.lab
    plan, point = app01_point
    with removed_afterwards(small_lab):
        _restore_caught_mid_way(small_lab, plan, point["host"], env, lambda p: p.kill())
        assert "app01-restored" in _vsphere_vm_names(small_lab)  # half-made, left by the kill

        [r] = restore("--plan", str(plan), "--vm", "app01", env=env)
        assert r["status"] == "ok" and r["restored_as"] == "app01-restored", r
        assert sorted(n for n in _vsphere_vm_names(small_lab) if n.startswith("app01-restored")) == ["app01-restored"]
        assert _attached(lab) == 0 and r["disks"] and all(d["bytes_written"] > 0 for d in r["disks"]), r


def test_restore_interrupted_mid_way_removes_the_half_made_vm(small_lab, env, app01_point):
    """Ctrl-C, then SIGTERM, to `vmbackup restore` while the new VM's disk is
    attached to the agent: each VM's restore is cancelled and its half-made VM
    removed before the command exits 130 with `vmbackup: error: interrupted`
    (docs/flows.md); nothing stays attached to the agent."""
    import signal

    plan, point = app01_point
    with removed_afterwards(small_lab):
        for signum in (signal.SIGINT, signal.SIGTERM):
            name = signal.Signals(signum).name
            p = _restore_caught_mid_way(small_lab, plan, point["host"], env, lambda p, s=signum: p.send_signal(s))
            assert p.returncode == 130, (name, p.returncode, p.stderr)
            assert "Traceback" not in p.stderr and p.stdout == "", (name, p.stdout, p.stderr)
            assert p.stderr.strip().splitlines()[-1] == "vmbackup: error: interrupted", (name, p.stderr)
            assert "app01-restored" not in _vsphere_vm_names(small_lab), name
            assert _attached(small_lab.lab) == 0, name


def test_a_vm_restored_from_the_offsite_copy_once_the_repository_is_gone(small_lab, env, tmp_path):
    """An encrypted repository backed up, copied to the lab's SeaweedFS and
    deleted: `vmbackup restore --repo s3://...` and then the plan alone (its
    copy:, since its repository is gone) bring the VM back from the copy,
    disks equal to the point, the rows saying where they came from."""
    import shutil
    import uuid

    from .test_copy import _s3_env

    s3 = small_lab.summary["s3"]
    repo = tmp_path / "repo"
    e = _s3_env(env, s3, tmp_path / "cache") | {"VMBACKUP_PASSPHRASE": "correct horse battery staple"}
    run("init", "--repo", str(repo), "--encryption", env=e)
    prefix = f"restore-{uuid.uuid4().hex[:8]}"
    copy = dict(small_lab.plan_data()["copy"], prefix=prefix)
    plan = small_lab.write_plan(
        tmp_path / "plan.yaml", repository=repo, copy=copy, passphrase_env="VMBACKUP_PASSPHRASE"
    )
    small_lab.lab.write("app01", "scsi0:0", 3 << 20, 1 << 20, seed=41)
    [point] = backup("--plan", str(plan), "--vm", "app01", env=e)
    assert point["status"] == "ok", point
    from pydantic import SecretStr
    from vmbackup import copy as s3copy
    from vmbackup import keys
    from vmbackup.orchestration.restore_input import DRILL_STATE, load_drill_state, save_drill_state

    # The drills' record is sealed in an encrypted repository: this process unlocks it as the drill flow does.
    keys.unlock(repo, keys.KeySource(passphrase=SecretStr(e["VMBACKUP_PASSPHRASE"])))
    drilled = {"app01": {"unix": 1.0, "point": point["backup_id"], "passed": True, "run": "r"}}
    save_drill_state(str(repo), drilled)
    assert "app01" not in (repo / DRILL_STATE).read_text() and load_drill_state(str(repo)) == drilled
    out = json.loads(run("copy", "--plan", str(plan), "--json", env=e).stdout)
    t = s3copy.Target(
        s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"), s3["bucket"], prefix
    )
    assert DRILL_STATE in s3copy.read_index(t, out["index"])["objects"]  # the drill record is kept in the copy
    want = {}
    for d in point["disks"]:
        f = tmp_path / f"want-{d['name']}.img"
        run("restore-disk", "--repo", str(repo), "--disk", d["name"], point["backup_id"], str(f), env=e)
        want[d["name"]] = sha(f)
    shutil.rmtree(repo)

    url = f"s3://{s3['bucket']}/{prefix}"
    with removed_afterwards(small_lab):
        for args, name, said in (
            (("--repo", url), "app01-fromcopy", f"restored from the offsite copy {url}"),
            ((), "app01-fromplan", f"the plan's repository {repo} is gone: restored from its offsite copy {url}"),
        ):
            [r] = restore("--plan", str(plan), "--vm", "app01", "--as", name, *args, env=e)
            assert r["status"] == "ok" and r["point"] == point["backup_id"], r
            assert r["repository"] == url and said in r["warnings"], r
            assert sorted(d["disk"] for d in r["disks"]) == sorted(want), r
            for disk, digest in want.items():
                image = tmp_path / f"{name}-{disk}.img"
                run(
                    "lab",
                    "disk-image",
                    "--state",
                    str(small_lab.lab.state),
                    "--vm",
                    name,
                    "--disk",
                    disk,
                    str(image),
                    env=e,
                )
                assert sha(image) == digest, (name, disk)
        assert not repo.exists()


def test_in_place_rollback_through_the_command_writes_only_what_differs(small_lab, env, tmp_path):
    """`vmbackup restore --in-place --json` on a VM of this test's own (app01
    restored as inplace01, removed at the end): after guest writes of 3 MiB
    into its 16 MiB disk, each disk's bytes_written counts only what differs,
    and the disks then equal the point."""
    plan, repo = _plan(small_lab, tmp_path)
    backup("--plan", str(plan), "--vm", "app01", env=env)
    state = str(small_lab.lab.state)
    with removed_afterwards(small_lab):
        [made] = restore("--plan", str(plan), "--vm", "app01", "--as", "inplace01", env=env)
        assert made["status"] == "ok", made
        [point] = backup("--plan", str(plan), "--vm", "inplace01", env=env)
        assert point["status"] == "ok", point
        for offset, length, seed in ((3 << 20, 2 << 20, 51), ((9 << 20) + 4096, 1 << 20, 52)):
            args = ("--vm", "inplace01", "--disk", "scsi0:0", "--offset", str(offset), "--length", str(length))
            run("lab", "write", "--state", state, *args, "--seed", str(seed), env=env)
        (tmp_path / "written").mkdir()
        assert not _disk_equal(small_lab, env, repo, point["backup_id"], "inplace01", "scsi0:0", tmp_path / "written")

        [r] = restore("--plan", str(plan), "--vm", "inplace01", "--in-place", env=env)
        assert r["status"] == "ok" and r["in_place"] is True and r["restored_as"] == "inplace01", r
        assert r["point"] == point["backup_id"], r
        [d] = r["disks"]
        # the 3 MiB written (in whole blocks around them), never the 16 MiB disk
        assert 3 << 20 <= d["bytes_written"] <= 5 << 20 and r["bytes_written"] == d["bytes_written"], r
        (tmp_path / "rolled-back").mkdir()
        assert _disk_equal(small_lab, env, repo, point["backup_id"], "inplace01", "scsi0:0", tmp_path / "rolled-back")


def test_an_older_point_before_a_time_onto_another_datastore_and_a_point_without_configuration(
    small_lab, env, tmp_path
):
    """One `vmbackup restore --before TIME --datastore DS` run: app01 (on
    esx2-local) backed up twice, brought back from the older point onto
    shared1, its disk equal to that point. Then a point `backup-disk` made
    (no VM configuration) is refused: one line, exit 2, no VM made."""
    import datetime as dt

    lab = small_lab.lab
    plan, repo = _plan(small_lab, tmp_path)
    lab.write("app01", "scsi0:0", 2 << 20, 1 << 20, seed=61)
    [older] = backup("--plan", str(plan), "--vm", "app01", env=env)
    lab.write("app01", "scsi0:0", 2 << 20, 1 << 20, seed=62)
    [newer] = backup("--plan", str(plan), "--vm", "app01", env=env)
    created = {i.id: i.created_unix for i in _mover.list_backups(repo)[0]}
    a, b = created[older["backup_id"]], created[newer["backup_id"]]
    assert a < b, (a, b)
    before = dt.datetime.fromtimestamp((a + b) / 2, dt.UTC).isoformat()
    assert older["datastores"] == ["esx2-local"], older

    with removed_afterwards(small_lab):
        args = ("--vm", "app01", "--before", before, "--datastore", "shared1", "--as", "app01-older")
        [r] = restore("--plan", str(plan), *args, env=env)
        assert r["status"] == "ok" and r["point"] == older["backup_id"] and r["location"] == "shared1", r
        [vm] = [v for v in lab.status()["vms"] if v["name"] == "app01-older"]
        assert [d["file"].split("]")[0] for d in vm["disks"]] == ["[shared1"], vm["disks"]
        for point, equal in ((older, True), (newer, False)):
            (tmp_path / point["backup_id"]).mkdir()
            got = _disk_equal(
                small_lab, env, repo, point["backup_id"], "app01-older", "scsi0:0", tmp_path / point["backup_id"]
            )
            assert got is equal, point["backup_id"]

        # A point of disks only (`vmbackup backup-disk`): nothing to make a VM of.
        image = tmp_path / "disk.img"
        image.write_bytes(b"\x07" * (1 << 20))
        run("backup-disk", "--repo", repo, "--vm", "diskonly01", str(image), "--json", env=env)
        before_names = _vsphere_vm_names(small_lab)
        p = run("restore", "--plan", str(plan), "--vm", "diskonly01", "--json", env=env, expect=2)
        lines = p.stderr.strip().splitlines()
        assert p.stdout == "" and len(lines) == 1 and "no VM configuration to restore" in lines[0], p.stderr
        assert _vsphere_vm_names(small_lab) == before_names
