"""The lab's Hyper-V hosts as part of `vmbackup lab`: started by `lab up`
(detached), described by `up --json`, in the lab's plan, driven by `lab
write|disk-image|fault|status|drop-sessions`, stopped by `lab down`. Through
the real command line and real pywinrm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import winrm
from vmbackup.errors import WinRMSessionLostError
from vmbackup.hyperv.client import HypervClient
from vmbackup.plan import load_plan, resolve_password
from vmbackup_lab import lab_down, load_lab
from vmbackup_lab.hyperv import HypervLab

from .labkit import pattern

TOPOLOGIES = Path(__file__).resolve().parents[2] / "lab" / "topologies"
HV_FIELDS = {"url", "user", "password", "ca_file", "transport", "host", "share_root"}


def vmbackup(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """`vmbackup ARGS` in a child process (never a traceback)."""
    p = subprocess.run([sys.executable, "-m", "vmbackup", *args], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    if expect is not None:
        assert p.returncode == expect, f"{args} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def up(state: Path, topology: Path | None = None) -> dict:
    args = ["lab", "up", "--state", str(state), "--json"]
    if topology is not None:
        args += ["--topology", str(topology)]
    return json.loads(vmbackup(*args).stdout)


def client(hv: dict, password: str | None = None) -> HypervClient:
    """pywinrm to a host as `up --json` describes it: HTTPS, its CA, its transport."""
    return HypervClient(hv["url"], hv["user"], password or hv["password"], auth=hv["transport"], ca_file=hv["ca_file"])


def processes_of(state: Path) -> list[int]:
    """Every live process whose command line names this state directory (zombies are gone)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # a path in the state directory, alone or in an option (weed's -dir=STATE/s3/data)
        if str(state).encode() in argv or any(str(state).encode() + b"/" in a for a in argv):
            out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    """A lab of the built-in topology (no --topology), started by the command line."""
    state = tmp_path_factory.mktemp("hvlab").resolve()
    summary = up(state)
    yield state, summary
    lab_down(state)


def test_up_json_describes_the_hyperv_host_and_pywinrm_runs_a_script_with_it(built_in):
    state, s = built_in
    hv = s["hyperv"]
    assert HV_FIELDS <= hv.keys() and s["hyperv_hosts"] == [hv]
    assert hv["host"] == "hv1" and hv["transport"] == "ntlm" and hv["url"].startswith("https://")
    assert Path(hv["ca_file"]).is_file() and Path(hv["share_root"]).is_dir()
    h = client(hv).run_script("Get-VmbackupHost.ps1")
    assert h["ComputerName"] == "HV1" and h["Writer"]["StateText"] == "Stable"
    # the VMs of today's default host
    assert [v["name"] for v in load_lab(state).hyperv_for_vm("win01").status()["vms"]] == [
        "win01",
        "legacy01",
        "off01",
    ]
    # the host runs detached: the `lab up` process is gone, the host serves
    assert [x.host for x in load_lab(state).hyperv_hosts()] == ["hv1"]


def test_the_text_of_up_says_the_hyperv_host_and_its_export_line(built_in):
    state, s = built_in
    out = vmbackup("lab", "up", "--state", str(state)).stdout
    assert f"Hyper-V host hv1: {s['hyperv']['url']}" in out
    assert f'export VMBACKUP_HYPERV_PASSWORD="$(cat {state / "hyperv-password"})"' in out
    assert s["hyperv"]["password"] not in out


def test_the_lab_plan_has_the_hyperv_host_and_the_agents_reach_it(built_in, monkeypatch):
    state, s = built_in
    hv = s["hyperv"]
    plan = load_plan(state / "plan.yaml")
    (h,) = plan.hyperv
    assert (h.name, h.url, h.user, h.auth, h.password_env) == (
        "hv1",
        hv["url"],
        hv["user"],
        "ntlm",
        "VMBACKUP_HYPERV_PASSWORD",
    )
    assert h.ca_file == Path(hv["ca_file"])
    pw = state / "hyperv-password"
    assert pw.read_text().strip() == hv["password"] and pw.stat().st_mode & 0o077 == 0
    assert hv["password"] not in (state / "plan.yaml").read_text()
    monkeypatch.setenv("VMBACKUP_HYPERV_PASSWORD", pw.read_text().strip())
    c = HypervClient(h.url, h.user, resolve_password(h), auth=h.auth, ca_file=h.ca_file)
    assert c.run_script("Get-VmbackupHost.ps1")["ComputerName"] == "HV1"
    for a in plan.agents:
        assert a.reaches_hyperv("hv1") and a.share_account == "HV1\\vmbackup-agent"
        assert a.map_windows_path("\\\\hv1\\vmbk-r-0$\\x.vhdx") == Path(hv["share_root"]) / "vmbk-r-0$" / "x.vhdx"
    # no password in the host's logs
    for log in (state / "hyperv" / "hv1").glob("*.log"):
        assert hv["password"] not in log.read_text(errors="replace")


def test_write_changes_the_disk_image_by_exactly_the_written_range(built_in, tmp_path):
    state, _ = built_in
    before, after = tmp_path / "before.raw", tmp_path / "after.raw"
    for vm, disk, volume in (("win01", "scsi0:1", "D"), ("legacy01", "ide0:0", "E")):  # through an .avhdx; a VHD
        img = ["lab", "disk-image", "--state", str(state), "--vm", vm, "--disk", disk]
        vmbackup(*img, str(before))
        offset, length = 3 * 1024 * 1024 + 5, 70_000
        w = json.loads(
            vmbackup(
                "lab", "write", "--state", str(state), "--vm", vm, "--disk", disk,
                "--offset", str(offset), "--length", str(length), "--seed", "9", "--json",
            ).stdout
        )  # fmt: skip
        assert w["host"] == "hv1" and w["file"].startswith(f"{volume}:\\Hyper-V\\{vm}\\")
        res = json.loads(vmbackup(*img, str(after), "--json").stdout)
        assert res["size"] == after.stat().st_size == before.stat().st_size
        a, b = after.read_bytes(), before.read_bytes()
        assert a[offset : offset + length] == pattern(9, offset, length) != b[offset : offset + length]
        assert a[:offset] == b[:offset] and a[offset + length :] == b[offset + length :]


def test_disk_image_as_of_a_shadow_copy_keeps_what_was_there_before_a_write(built_in, tmp_path):
    state, s = built_in
    c = client(s["hyperv"])
    img = ["lab", "disk-image", "--state", str(state), "--vm", "win01", "--disk", "scsi0:0"]
    vmbackup(*img, str(tmp_path / "before.raw"))
    made = c.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "shadow1", "VMName": ["win01"], "Volumes": ["D:\\"], "Quiesce": "off"}
    )
    try:
        sid = made["ShadowCopies"][0]["ShadowId"]
        vmbackup("lab", "write", "--state", str(state), "--vm", "win01", "--disk", "scsi0:0",
                 "--offset", "0", "--length", "65536", "--seed", "77")  # fmt: skip
        vmbackup(*img, "--shadow", sid, str(tmp_path / "shadow.raw"))
        vmbackup(*img, str(tmp_path / "now.raw"))
        before = (tmp_path / "before.raw").read_bytes()
        assert (tmp_path / "shadow.raw").read_bytes() == before
        assert (tmp_path / "now.raw").read_bytes()[:65536] == pattern(77, 0, 65536) != before[:65536]
        p = vmbackup(*img, "--snapshot", "x", str(tmp_path / "no.raw"), expect=2)
        assert "win01 is a Hyper-V VM" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    finally:
        c.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": "shadow1", "Succeeded": False})


def test_faults_set_by_the_command_line_take_effect_on_the_host(built_in):
    state, s = built_in
    c = client(s["hyperv"])

    def fault(*args: str) -> dict:
        return json.loads(vmbackup("lab", "fault", "--state", str(state), *args, "--json").stdout)

    assert fault("--host", "hv1", "--set", "writer_failed")["faults"] == {"writer_failed": True}
    assert c.run_script("Get-VmbackupHost.ps1")["Writer"]["State"] == 8
    assert fault("--host", "hv1", "--set", "none")["faults"] == {}
    assert c.run_script("Get-VmbackupHost.ps1")["Writer"]["State"] == 1

    fault("--vm", "win01", "--set", "backup_off")
    assert c.run_script("Get-VmbackupVm.ps1", {"VMName": "win01"})["Backup"]["Enabled"] is False
    fault("--vm", "win01", "--set", "backup_no_contact")
    backup = c.run_script("Get-VmbackupVm.ps1", {"VMName": "win01"})["Backup"]
    assert backup.pop("Id").endswith("\\5CED1297-4598-4915-A5FC-AD21BB4D02A4")
    assert backup == {"Name": "VSS", "Enabled": True, "PrimaryOperationalStatus": 12}
    fault("--vm", "win01")
    assert c.run_script("Get-VmbackupVm.ps1", {"VMName": "win01"})["Backup"]["PrimaryOperationalStatus"] == 2

    # a script name as the value: the session dies while that script runs
    assert fault("--host", "hv1", "--set", "drop_during=Get-VmbackupHost.ps1")["faults"] == {
        "drop_during": "Get-VmbackupHost.ps1"
    }
    with pytest.raises(WinRMSessionLostError):
        c.run_script("Get-VmbackupHost.ps1")
    fault("--host", "hv1")
    assert c.run_script("Get-VmbackupHost.ps1")["ComputerName"] == "HV1"

    p = vmbackup("lab", "fault", "--state", str(state), "--host", "hv1", "--set", "quiesce_fail", expect=2)
    assert "unknown fault 'quiesce_fail'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "target, value, message",
    [
        (["--host", "hv1"], "no_such_fault", "unknown fault 'no_such_fault'"),
        (["--vm", "win01"], "no_such_fault", "unknown fault 'no_such_fault'"),
        (["--vm", "win01"], "writer_failed", "unknown fault 'writer_failed'"),  # a host's, not a VM's
        (["--host", "hv1"], "create_seconds=-1", "fault create_seconds: -1 is not a number of seconds"),
    ],
)
def test_an_unknown_or_bad_hyperv_fault_is_refused_in_one_line(built_in, target, value, message):
    state, _ = built_in
    before = json.loads(vmbackup("lab", "status", "--state", str(state), "--json").stdout)["hyperv_hosts"][0]
    p = vmbackup("lab", "fault", "--state", str(state), *target, "--set", value, expect=2)
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""
    after = json.loads(vmbackup("lab", "status", "--state", str(state), "--json").stdout)["hyperv_hosts"][0]
    assert after["faults"] == before["faults"] and [v["faults"] for v in after["vms"]] == [
        v["faults"] for v in before["vms"]
    ]


def test_status_counts_shadow_copy_sets_and_guest_quiesces(built_in):
    """`counters.shadow_sets_created` (since the lab started) and each VM's `quiesce_count`."""
    state, s = built_in
    c = client(s["hyperv"])

    def hv() -> dict:
        return json.loads(vmbackup("lab", "status", "--state", str(state), "--json").stdout)["hyperv_hosts"][0]

    st = hv()
    created, quiesces = st["counters"]["shadow_sets_created"], {v["name"]: v["quiesce_count"] for v in st["vms"]}
    # quiesce off: a set without the Hyper-V writer
    c.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "count1", "VMName": ["win01"], "Volumes": ["D:\\"], "Quiesce": "off"}
    )
    c.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": "count1", "Succeeded": True})
    st = hv()
    assert st["counters"]["shadow_sets_created"] == created + 1
    assert {v["name"]: v["quiesce_count"] for v in st["vms"]} == quiesces  # no writer: nobody frozen
    assert st["shadow_set_in_progress"] is None
    # quiesce_count moves when the writer takes part: tests/hyperv/test_host_truth.py


def test_status_lists_the_hyperv_vms_shadow_copies_and_runs(built_in):
    state, s = built_in
    c = client(s["hyperv"])
    made = c.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "status1", "VMName": ["win01"], "Volumes": ["D:\\"], "Quiesce": "off"}
    )
    try:
        st = json.loads(vmbackup("lab", "status", "--state", str(state), "--json").stdout)
        (hv,) = st["hyperv_hosts"]
        assert [v["name"] for v in hv["vms"]] == ["win01", "legacy01", "off01"]
        assert [x["id"] for x in hv["shadow_copies"]] == [made["ShadowCopies"][0]["ShadowId"]]
        assert hv["runs"] == ["status1"]
        text = vmbackup("lab", "status", "--state", str(state)).stdout
        assert "win01 on hv1: running, Backup on" in text and "open run status1" in text
        assert f"shadow copy {made['ShadowCopies'][0]['ShadowId']} of D:\\" in text
    finally:
        c.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": "status1", "Succeeded": False})


def test_drop_sessions_drops_the_winrm_shells_too(built_in):
    state, s = built_in
    hv = s["hyperv"]
    session = winrm.Session(hv["url"], auth=(hv["user"], hv["password"]), transport="ntlm", ca_trust_path=hv["ca_file"])
    shell = session.protocol.open_shell()
    cid = session.protocol.run_command(shell, "hostname")
    out = json.loads(vmbackup("lab", "drop-sessions", "--state", str(state), "--json").stdout)
    assert out["hyperv"]["hv1"] >= 1 and out["dropped"] >= out["hyperv"]["hv1"]
    with pytest.raises(winrm.exceptions.WSManFaultError) as e:
        session.protocol.get_command_output(shell, cid)
    assert e.value.wsman_fault_code == 2150858843


def test_peak_shadow_copy_counters_and_their_reset(built_in):
    state, s = built_in
    c = client(s["hyperv"])
    lab = load_lab(state)
    lab.reset_counters()
    hv = lab.hyperv_for_vm("win01")
    assert hv.process is None
    assert (hv.status()["peak_shadow_copies"], hv.status()["peak_shadow_copies_per_volume"]) == (
        0,
        {"C": 0, "D": 0, "E": 0},
    )
    runs = [("peak1", ["win01"], ["D:\\"]), ("peak2", ["legacy01"], ["D:\\"]), ("peak3", ["off01"], ["E:\\"])]
    for run_id, vms, volumes in runs:
        c.run_script(
            "New-VmbackupShadowCopy.ps1", {"RunId": run_id, "VMName": vms, "Volumes": volumes, "Quiesce": "off"}
        )
    for run_id, _, _ in runs:
        c.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": run_id, "Succeeded": False})
    st = hv.status()
    assert st["shadow_copies"] == []
    assert st["peak_shadow_copies"] == 3 and st["peak_shadow_copies_per_volume"] == {"C": 0, "D": 2, "E": 1}
    res = lab.reset_counters()
    assert res["hyperv"]["hv1"]["peak_shadow_copies"] == 0
    assert hv.status()["peak_shadow_copies_per_volume"] == {"C": 0, "D": 0, "E": 0}


def test_two_hosts_from_a_topology_share_user_and_password_and_route_by_vm(tmp_path):
    topo = tmp_path / "two.json"
    disk = {"controller": "scsi", "size_mib": 2}
    topo.write_text(
        json.dumps(
            {
                "mode": "esxi",
                "standalone_hosts": ["esx9"],
                "vms": [{"name": "solo01", "disks": [{"bus": "scsi", "size_mib": 4}]}],
                "hyperv": [
                    {"host": "hva", "user": "backup", "vms": [{"name": "a1", "disks": [disk]}, {"name": "dup"}]},
                    {"host": "hvb", "vms": [{"name": "b1", "disks": [disk]}, {"name": "dup", "disks": [disk]}]},
                ],
            }
        )
    )
    state = (tmp_path / "state").resolve()
    try:
        s = up(state, topo)
        a, b = s["hyperv_hosts"]
        assert (a["host"], b["host"]) == ("hva", "hvb") and s["hyperv"] == a
        assert a["user"] == b["user"] == "backup" and a["password"] == b["password"]
        assert a["url"] != b["url"]
        for hv in (a, b):
            assert client(hv).run_script("Get-VmbackupHost.ps1")["ComputerName"] == hv["host"].upper()
        w = ["lab", "write", "--state", str(state), "--disk", "scsi0:0", "--offset", "0", "--length", "512", "--json"]
        assert json.loads(vmbackup(*w, "--vm", "b1").stdout)["host"] == "hvb"
        assert json.loads(vmbackup(*w, "--vm", "a1").stdout)["host"] == "hva"
        # one name on two hosts: say which
        p = vmbackup(*w, "--vm", "dup", expect=2)
        assert "'dup' is on Hyper-V hosts hva and hvb" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert json.loads(vmbackup(*w, "--vm", "dup", "--host", "hvb").stdout)["host"] == "hvb"
        p = vmbackup(*w, "--vm", "dup", "--host", "hva", expect=2)  # hva's dup has no disks
        assert "VM dup has no disk 'scsi0:0'" in p.stderr
        lab = load_lab(state)
        assert lab.hyperv_for_vm("dup", host="hva").host == "hva"
        assert [h.host for h in lab.hyperv_hosts()] == ["hva", "hvb"]
        plan = load_plan(state / "plan.yaml")
        assert [h.name for h in plan.hyperv] == ["hva", "hvb"]
        (agent,) = plan.agents
        assert agent.reaches_hyperv("hva") and agent.reaches_hyperv("hvb")
        assert agent.share_account == "LAB\\vmbackup-agent"
        # faults go to the host named
        vmbackup("lab", "fault", "--state", str(state), "--host", "hvb", "--set", "shadow_fail")
        assert lab.hyperv_host("hvb").status()["faults"] == {"shadow_fail": True}
        assert lab.hyperv_host("hva").status()["faults"] == {}
    finally:
        lab_down(state)
    assert processes_of(state) == []


def test_down_leaves_no_process_and_up_starts_again_on_the_same_state(tmp_path):
    state = (tmp_path / "s").resolve()
    s = up(state)
    lab = load_lab(state)
    pids = [lab.info["pid"]] + [h["pid"] for h in lab.hyperv] + [json.loads((state / "s3.json").read_text())["pid"]]
    assert sorted(processes_of(state)) == sorted(pids)  # the simulator, the Hyper-V host, SeaweedFS
    assert json.loads(vmbackup("lab", "down", "--state", str(state), "--json").stdout) == {"stopped": True}
    assert processes_of(state) == []
    assert not (state / "hyperv" / "hv1" / "hyperv.json").exists()
    s2 = up(state)
    try:
        assert s2["hyperv"]["url"] != s["hyperv"]["url"] or s2["hyperv"]["password"] != s["hyperv"]["password"]
        assert client(s2["hyperv"]).run_script("Get-VmbackupHost.ps1")["ComputerName"] == "HV1"
    finally:
        lab_down(state)
    assert processes_of(state) == []


def test_a_host_that_died_is_one_line_and_up_starts_the_whole_lab_again(tmp_path):
    state = (tmp_path / "s").resolve()
    up(state)
    try:
        lab = load_lab(state)
        (h,) = lab.hyperv
        os.kill(h["pid"], signal.SIGKILL)
        while h["pid"] in processes_of(state):  # until the kernel has it gone (init reaps it)
            pass
        p = vmbackup("lab", "status", "--state", str(state), expect=2)
        assert "Hyper-V host hv1" in p.stderr and "not running any more" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        s = up(state)
        assert client(s["hyperv"]).run_script("Get-VmbackupHost.ps1")["ComputerName"] == "HV1"
        assert lab.info["pid"] not in processes_of(state)  # the old simulator was stopped, a new one runs
    finally:
        lab_down(state)
    assert processes_of(state) == []


@pytest.mark.parametrize(
    "hyperv, message",
    [
        ({"host": "hv1"}, "hyperv: a list of Hyper-V host topologies"),
        ([{"vms": []}], "hyperv[0]: an object with at least the host's name"),
        ([{"host": "hv1"}, {"host": "HV1", "vms": []}], "hyperv[1].host: 'HV1' is repeated"),
        ([{"host": "esx1"}], "hyperv[0].host: 'esx1' is the name of a vSphere host too"),
        ([{"host": "bad name"}], "hyperv[0].host: 'bad name' is not a computer name"),
        ([{"host": "hv1"}, {"host": "hv2", "user": "other", "vms": []}], "hyperv[1].user: all Hyper-V hosts"),
        ([{"host": "hv1", "vms": [{"name": "a", "state": "paused"}]}], "hyperv[0].vms[0].state: 'paused'"),
        ([{"host": "hv1", "vms": [{"name": "a", "disks": [{"controller": "scsi", "size_mib": 1}]}]}], "size_mib"),
    ],
)
def test_a_bad_hyperv_topology_is_one_line_exit_2_and_nothing_runs(tmp_path, hyperv, message):
    topo = json.loads((TOPOLOGIES / "default.json").read_text())
    topo["hyperv"] = hyperv
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(topo))
    state = (tmp_path / "s").resolve()
    p = vmbackup("lab", "up", "--state", str(state), "--topology", str(f), expect=2)
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert processes_of(state) == [] and not (state / "lab.json").exists()


def test_a_host_failing_to_start_is_one_line_exit_1_and_nothing_stays_running(tmp_path):
    topo = tmp_path / "t.json"
    hyperv = [{"host": "hv1"}, {"host": "hv2", "vms": [{"name": "x"}]}]
    topo.write_text(json.dumps({"mode": "esxi", "standalone_hosts": ["esx9"], "vms": [], "hyperv": hyperv}))
    state = (tmp_path / "s").resolve()
    # hv2's volumes directory cannot be made: its host fails while starting
    (state / "hyperv" / "hv2").mkdir(parents=True)
    (state / "hyperv" / "hv2" / "volumes").write_text("in the way")
    p = vmbackup("lab", "up", "--state", str(state), "--topology", str(topo), expect=1)
    assert p.stderr.startswith("vmbackup lab: the lab Hyper-V host hv2 did not start: ")
    assert len(p.stderr.strip().splitlines()) == 1
    assert processes_of(state) == []
    assert not (state / "lab.json").exists() and not (state / "hyperv-hosts.json").exists()


def test_a_topology_without_hyperv_starts_no_host(lab):
    """tests/lab's own topology (no "hyperv" key): the vSphere lab alone, as before."""
    assert lab.summary()["hyperv_hosts"] == [] and lab.summary()["hyperv"] is None
    assert lab.hyperv == [] and not (lab.state / "hyperv").exists()


def test_the_hyperv_20_topology_starts_two_hosts_of_ten_vms(tmp_path):
    state = (tmp_path / "s").resolve()
    try:
        s = up(state, TOPOLOGIES / "hyperv-20.json")
        assert [h["host"] for h in s["hyperv_hosts"]] == ["hv1", "hv2"]
        st = load_lab(state).status()
        vms = [v for h in st["hyperv_hosts"] for v in h["vms"]]
        assert len(vms) == 20 and len({v["name"] for v in vms}) == 20
        volumes = {c["path"][0] for v in vms for d in v["disks"] for c in d["chain"]}
        assert volumes == {"D", "E"}
        assert all(d["size"] <= 4 * 1024 * 1024 for v in vms for d in v["disks"])
        plan = load_plan(state / "plan.yaml")
        assert [h.name for h in plan.hyperv] == ["hv1", "hv2"] and len(plan.agents) == 2
    finally:
        lab_down(state)
    assert processes_of(state) == []


def test_hypervlab_attach_is_the_running_host(built_in):
    state, s = built_in
    (h,) = load_lab(state).hyperv
    hv = HypervLab.attach(Path(h["root"]))
    assert hv.describe() == {**s["hyperv"], "http_url": hv.http_url} and hv.pid == h["pid"]


def test_the_lab_plan_backs_up_a_hyperv_vm_of_each_host_through_their_shares(tmp_path, monkeypatch):
    """The plan `lab up` writes, as written, with the adapter's procedure: each
    agent reads each host's shadow copy through `windows_paths`, and every disk
    restores equal to `lab disk-image --shadow` of that copy."""
    from vmbackup import _mover
    from vmbackup.hyperv.inventory import connect, select_vms
    from vmbackup.hyperv.procedure import backup_vm

    topo = tmp_path / "two.json"
    disks = [
        {"controller": "scsi", "size_mib": 4},
        {"controller": "scsi", "location": 1, "size_mib": 3, "differencing": 1},
    ]
    topo.write_text(
        json.dumps(
            {
                "mode": "esxi",
                "standalone_hosts": ["esx9"],
                "vms": [],
                "agents_per_host": 2,
                "hyperv": [
                    {"host": "hva", "vms": [{"name": "a1", "disks": disks}]},
                    {"host": "hvb", "vms": [{"name": "b1", "disks": disks}]},
                ],
            }
        )
    )
    state = (tmp_path / "state").resolve()
    try:
        up(state, topo)
        lab = load_lab(state)
        monkeypatch.setenv("VMBACKUP_HYPERV_PASSWORD", (state / "hyperv-password").read_text().strip())
        plan = load_plan(state / "plan.yaml")
        repo = tmp_path / "repo"
        _mover.init_repository(str(repo))
        plan = plan.model_copy(update={"repository": repo})
        for (host, vm_name), agent in zip([("hva", "a1"), ("hvb", "b1")], plan.agents, strict=True):
            h = plan.hyperv_host(host)
            client = connect(h, resolve_password(h))
            (vm,) = select_vms(client, h, plan.selection)
            assert vm.name == vm_name and vm.host == host
            want = {}

            def at_shadow(sid, vm=vm, want=want):
                for d in vm.disks:
                    out = tmp_path / f"{vm.name}-{d.name.replace(':', '_')}.shadow"
                    lab.disk_image(vm.name, d.name, out, shadow=sid)
                    want[d.name] = out.read_bytes()

            r = backup_vm(client, vm, plan, h, agent, run_id="lab-plan", on_shadow=at_shadow)
            assert (r.status, r.transport, r.host, r.agent) == ("ok", "share", host, agent.name), r.error
            for d in vm.disks:
                out = tmp_path / f"restored-{vm.name}-{d.name.replace(':', '_')}.raw"
                _mover.restore_disk(str(repo), r.backup_id, str(out), disk=d.name)
                assert out.read_bytes() == want[d.name]
            st = lab.hyperv_host(host).status()
            assert st["shadow_copies"] == [] and st["peak_shadow_copies"] == 1
    finally:
        lab_down(state)
