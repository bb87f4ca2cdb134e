"""The adapter's scripts through the client against the lab host: answers,
consistency under each fault and quiesce policy, cleanup on every path, and
shadow copies that hold their point in time while the guests keep writing."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import pytest
from conftest import sha256
from vmbackup.errors import (
    HypervQuiesceError,
    HypervScriptError,
    HypervVmNotFoundError,
    InvalidInputError,
    WinRMSessionLostError,
)
from vmbackup.hyperv import scripts

from .conftest import TRANSPORTS, client

MiB = 1024 * 1024


@pytest.fixture
def hv1(lab):
    """One transport, for what does not depend on it (the others run in test_winrm)."""
    return client(lab, "https-ntlm")


def test_every_script_is_readable_powershell_with_a_param_block():
    assert scripts.names() == [
        "Complete-VmbackupShadowCopy.ps1",
        "Get-VmbackupHost.ps1",
        "Get-VmbackupRestoreTarget.ps1",
        "Get-VmbackupRestores.ps1",
        "Get-VmbackupVm.ps1",
        "Get-VmbackupVmList.ps1",
        "Import-VmbackupRestore.ps1",
        "New-VmbackupRestore.ps1",
        "New-VmbackupShadowCopy.ps1",
        "Remove-VmbackupRestore.ps1",
        "Remove-VmbackupShadowCopies.ps1",
        "Start-VmbackupRestore.ps1",
    ]
    for name in scripts.names():
        text = scripts.text(name)
        assert text.startswith("<#") and ".SYNOPSIS" in text and "\nparam(" in text
        # what is sent is the file without its help block, the rest verbatim, and fits a command line
        sent = scripts.body(name)
        assert text.endswith(sent) and sent.startswith("param(") and ".SYNOPSIS" not in sent
        assert len(scripts.wrap(name, {}).encode("utf-16-le")) * 4 // 3 + 40 < 32767


def test_parameters_travel_as_data(hv):
    """A parameter that looks like code stays a string: the wrapper carries it base64-encoded."""
    hostile = "x'; Remove-VM * -Force; '"
    wrapped = scripts.wrap("Get-VmbackupVm.ps1", {"VMName": hostile})
    assert hostile not in wrapped
    with pytest.raises(HypervVmNotFoundError) as e:
        hv.run_script("Get-VmbackupVm.ps1", {"VMName": hostile})
    assert e.value.code == "VmNotFound" and hostile in str(e.value)


def test_unknown_script_is_refused_before_sending():
    with pytest.raises(InvalidInputError):
        scripts.wrap("Format-Disk.ps1", {})


def test_a_modified_script_is_not_run_by_the_lab(lab):
    hv = client(lab, "https-ntlm")
    text = scripts.wrap("Get-VmbackupHost.ps1", {}).replace("vssadmin list writers", "vssadmin delete shadows /all")
    r = hv.run_ps(text)
    assert r.status == 1 and "only the adapter's own scripts" in r.stderr


def test_get_host(hv):
    h = hv.run_script("Get-VmbackupHost.ps1")
    assert h["ComputerName"] == "HV1"
    assert h["Writer"] == {
        "Name": "Microsoft Hyper-V VSS Writer",
        "Id": "{66841cd4-6ded-4f4b-8f17-fd23f8ddc3de}",
        "State": 1,
        "StateText": "Stable",
        "LastError": "No error",
    }
    assert [v["DriveLetter"] for v in h["Volumes"]] == ["C:", "D:", "E:"]


def test_get_vm_lists_chains(hv):
    vm = hv.run_script("Get-VmbackupVm.ps1", {"VMName": "win01"})
    assert vm["State"] == 2 and vm["Backup"] == {
        "Name": "VSS",
        "Id": f"Microsoft:{vm['Id'].upper()}\\5CED1297-4598-4915-A5FC-AD21BB4D02A4",
        "Enabled": True,
        "PrimaryOperationalStatus": 2,
    }
    assert [d["Name"] for d in vm["Disks"]] == ["scsi0:0", "scsi0:1"]
    base, diff = vm["Disks"]
    assert [(f["VhdFormat"], f["VhdType"]) for f in base["Chain"]] == [(3, 3)]
    assert [(f["VhdFormat"], f["VhdType"]) for f in diff["Chain"]] == [(3, 4), (3, 3)]
    assert diff["Chain"][0]["ParentPath"] == diff["Chain"][1]["Path"]
    assert vm["Volumes"] == ["D:\\"] and all(p.startswith("D:\\Hyper-V\\win01\\") for p in vm["ConfigFiles"])
    legacy = hv.run_script("Get-VmbackupVm.ps1", {"VMName": "legacy01"})
    assert legacy["Disks"][0]["Name"] == "ide0:0" and legacy["Disks"][0]["Chain"][0]["VhdFormat"] == 2
    assert legacy["Backup"]["Enabled"] is False


def _new(hv, run_id, vms, quiesce="preferred", volumes=("D:\\",), **extra):
    return hv.run_script(
        "New-VmbackupShadowCopy.ps1",
        {"RunId": run_id, "VMName": list(vms), "Volumes": list(volumes), "Quiesce": quiesce, **extra},
    )


def _complete(hv, run_id, ok):
    return hv.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": run_id, "Succeeded": ok})


@pytest.mark.parametrize("transport", [t[0] for t in TRANSPORTS])
def test_application_consistent_backup_completes_and_cleans_up(apart, transport):
    """win01 alone on D: (legacy01 elsewhere): the writer quiesces it; the
    guest's own VSS backup runs during create, the host's BackupComplete at the end."""
    lab, hv = apart, client(apart, transport)
    before = {v["name"]: v["backup_complete"] for v in lab.status()["vms"]}
    guest = {v["name"]: v["guest_backups"] for v in lab.status()["vms"]}["win01"]
    made = _new(hv, "app1", ["win01"], quiesce="required")
    # the guest's writers froze, thawed and completed inside create: its logs may be truncated now
    assert {v["name"]: v["guest_backups"] for v in lab.status()["vms"]}["win01"] == guest + 1
    assert {v["name"]: v["backup_complete"] for v in lab.status()["vms"]}["win01"] == before["win01"]
    assert made["Consistency"] == "application" and made["Reasons"] == []
    assert len(lab.status()["shadow_copies"]) == 1
    assert hv.run_script("Get-VmbackupHost.ps1")["Runs"][0]["RunId"] == "app1"
    done = _complete(hv, "app1", True)
    assert done["BackupComplete"] is True and done["Deleted"] == [made["ShadowCopies"][0]["ShadowId"]]
    st = lab.status()
    assert st["shadow_copies"] == [] and st["runs"] == []
    assert {v["name"]: v["backup_complete"] for v in st["vms"]}["win01"] == before["win01"] + 1
    assert not lab.local_path(made["ShadowCopies"][0]["ExposedPath"]).exists()


def test_failed_backup_gets_no_backup_complete(lab, hv1):
    before = {v["name"]: v["backup_complete"] for v in lab.status()["vms"]}["win01"]
    _new(hv1, "fail1", ["win01"])
    assert _complete(hv1, "fail1", False)["BackupComplete"] is False
    st = lab.status()
    assert st["shadow_copies"] == [] and {v["name"]: v["backup_complete"] for v in st["vms"]}["win01"] == before


# (fault on host, fault on VM, VM) -> the reason the writer could not quiesce
CRASH_CASES = [
    pytest.param(
        {"writer_failed": True}, {}, "win01", "the Hyper-V VSS writer failed: Non-retryable error", id="writer-failed"
    ),
    pytest.param(
        {}, {"backup_off": True}, "win01", "win01 has its Backup integration service off", id="backup-service-off"
    ),
    pytest.param(
        {},
        {"backup_no_contact": True},
        "win01",
        "win01's Backup integration service does not answer",
        id="backup-no-contact",
    ),
    pytest.param({}, {}, "legacy01", "legacy01 has its Backup integration service off", id="topology-backup-off"),
    # every VM with files on the volume takes part in the writer's backup: legacy01 would be saved
    pytest.param(
        {},
        {},
        "win01",
        "legacy01 is also on D:\\ and would be put into a saved state: its Backup integration service is off",
        id="other-vm-on-the-volume",
    ),
    pytest.param({}, {}, "off01", "off01 is not running", id="vm-off"),
]


@pytest.mark.parametrize("host_faults, vm_faults, vm, reason", CRASH_CASES)
def test_no_quiesce_means_crash_under_preferred_and_an_error_under_required(
    lab, hv1, host_faults, vm_faults, vm, reason
):
    lab.set_faults(**host_faults)
    lab.set_faults(vm, **vm_faults)
    volume = "E:\\" if vm == "off01" else "D:\\"
    with pytest.raises(HypervQuiesceError) as e:
        _new(hv1, "req1", [vm], quiesce="required", volumes=[volume])
    assert e.value.code == "QuiesceUnavailable" and reason in str(e.value) and "\n" not in str(e.value)
    assert lab.status()["shadow_copies"] == [] and lab.status()["runs"] == []
    made = _new(hv1, "pref1", [vm], quiesce="preferred", volumes=[volume])
    assert made["Consistency"] == "crash" and reason in made["Reasons"]
    assert len(lab.status()["shadow_copies"]) == 1
    _complete(hv1, "pref1", True)
    assert lab.status()["shadow_copies"] == []
    # the writer never took part, so no VM was put into a saved state
    assert [v["saved"] for v in lab.status()["vms"]] == [0, 0, 0]


def test_quiesce_off_never_involves_the_writer(lab, hv1):
    lab.set_faults(writer_failed=True)
    made = _new(hv1, "off1", ["win01"], quiesce="off")
    assert (made["Consistency"], made["Reasons"]) == ("crash", ["quiesce is off"])
    assert _complete(hv1, "off1", True)["BackupComplete"] is True


def test_shadow_copy_creation_failing_leaves_a_ledger_entry_the_sweeper_removes(lab, hv1):
    lab.set_faults(shadow_fail=True)
    with pytest.raises(HypervScriptError) as e:
        _new(hv1, "sf1", ["win01"])
    assert e.value.code == "ShadowCopyFailed" and e.value.retryable is False
    assert lab.status()["shadow_copies"] == []
    assert [r["RunId"] for r in hv1.run_script("Get-VmbackupHost.ps1")["Runs"]] == ["sf1"]
    removed = hv1.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0})["Removed"]
    assert [(r["RunId"], r["Deleted"]) for r in removed] == [("sf1", [])]
    assert hv1.run_script("Get-VmbackupHost.ps1")["Runs"] == []


def test_session_dropped_during_shadow_copy_creation(lab):
    """The WinRM session dies while New-VmbackupShadowCopy.ps1 runs: the client
    gets one retryable error; the shadow copy it made is on the host, in the
    ledger; the sweeper removes it, and a younger run it leaves alone."""
    hv = client(lab, "https-ntlm")
    lab.set_faults(drop_during="New-VmbackupShadowCopy.ps1")
    with pytest.raises(WinRMSessionLostError) as e:
        _new(hv, "drop1", ["win01"])
    assert e.value.retryable is True and "\n" not in str(e.value)
    lab.set_faults()
    assert len(lab.status()["shadow_copies"]) == 1
    _new(hv, "young1", ["win01"])
    assert hv.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 3600})["Removed"] == []
    assert len(lab.status()["shadow_copies"]) == 2
    removed = hv.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0})["Removed"]
    assert sorted(r["RunId"] for r in removed) == ["drop1", "young1"]
    assert lab.status()["shadow_copies"] == []


def test_unknown_vm(hv1):
    with pytest.raises(HypervVmNotFoundError) as e:
        hv1.run_script("Get-VmbackupVm.ps1", {"VMName": "nope"})
    assert e.value.exit_code == 2 and "nope" in str(e.value)


def test_shadow_copy_holds_its_point_in_time_and_restores_bit_exact(lab, cli, tmp_path):
    """Guests keep writing after the shadow copy; the files in the shadow copy
    stay as they were, the mover reads them (VHDX, differencing AVHDX over its
    base, VHD) and every disk restores to the lab's own image of that moment."""
    hv = client(lab, "http-ntlm")
    disks = {("win01", "scsi0:0"), ("win01", "scsi0:1"), ("legacy01", "ide0:0")}
    at_shadow = {}
    for vm, disk in disks:
        at_shadow[vm, disk] = sha256(lab.disk_image(vm, disk, tmp_path / f"{vm}-{disk}.before.raw"))
    info = {vm: hv.run_script("Get-VmbackupVm.ps1", {"VMName": vm}) for vm in ("win01", "legacy01")}
    made = _new(hv, "pit1", ["win01", "legacy01"], ShareTo="HV1\\vmbackup-agent")
    copy = made["ShadowCopies"][0]
    mount = lab.local_path(copy["ExposedPath"])
    share = lab.local_path(copy["SharePath"])
    assert copy["SharePath"].startswith("\\\\HV1\\vmbk-pit1-0$")
    shadow_files = {p: sha256(p) for p in mount.rglob("*") if p.is_file()}
    assert any(p.suffix == ".avhdx" for p in shadow_files) and any(p.suffix == ".vhd" for p in shadow_files)

    # the guests write on: into the base VHDX, through the AVHDX top, into the VHD
    lab.write("win01", "scsi0:0", 5 * MiB + 123, 300_000, seed=71)
    lab.write("win01", "scsi0:1", 3 * MiB + 7, 70_000, seed=72)
    lab.write("legacy01", "ide0:0", 0, 4096, seed=73)
    for vm, disk in disks:
        now = sha256(lab.disk_image(vm, disk, tmp_path / f"{vm}-{disk}.now.raw"))
        assert now != at_shadow[vm, disk], f"{vm} {disk}: the guest write did not land"
        as_of = sha256(lab.disk_image(vm, disk, tmp_path / f"{vm}-{disk}.shadow.raw", shadow=copy["ShadowId"]))
        assert as_of == at_shadow[vm, disk], f"{vm} {disk}: the lab's image as of the shadow copy moved"
    assert {p: sha256(p) for p in mount.rglob("*") if p.is_file()} == shadow_files

    for vm, disk in sorted(disks):
        top = next(d for d in info[vm]["Disks"] if d["Name"] == disk)["Path"]
        rel = PureWindowsPath(top).relative_to("D:\\")
        for root in (mount, share):
            src = Path(root, *rel.parts)
            b = cli.json("backup-disk", "--vm", vm, "--disk", disk, str(src))
            out = tmp_path / f"{vm}-{disk}.restored.raw"
            out.unlink(missing_ok=True)
            cli.json("restore-disk", "--disk", disk, b["id"], str(out))
            assert sha256(out) == at_shadow[vm, disk], f"{vm} {disk} from {root}"
    assert _complete(hv, "pit1", True)["BackupComplete"] is True
    assert not mount.exists() and not share.exists()


def test_off_vm_two_level_chain_restores(lab, cli, tmp_path):
    hv = client(lab, "https-basic")
    info = hv.run_script("Get-VmbackupVm.ps1", {"VMName": "off01"})
    chain = info["Disks"][0]["Chain"]
    assert [f["VhdType"] for f in chain] == [4, 4, 3]
    want = sha256(lab.disk_image("off01", "scsi0:0", tmp_path / "want.raw"))
    made = _new(hv, "off1", ["off01"], volumes=["E:\\"])
    assert made["Consistency"] == "crash" and made["Reasons"] == ["off01 is not running"]
    mount = lab.local_path(made["ShadowCopies"][0]["ExposedPath"])
    src = Path(mount, *PureWindowsPath(chain[0]["Path"]).relative_to("E:\\").parts)
    b = cli.json("backup-disk", "--vm", "off01", str(src))
    cli.json("restore-disk", b["id"], str(tmp_path / "out.raw"))
    assert sha256(tmp_path / "out.raw") == want
    _complete(hv, "off1", True)


@pytest.mark.parametrize("quiesce", ["required", "preferred", "off"])
def test_non_ntfs_volume_is_refused_up_front(apart, quiesce):
    """Persistent shadow copies are NTFS only (VSS documentation): a ReFS volume
    is refused before diskshadow starts, in one line that says why and what the
    documented alternatives are; nothing is left on the host."""
    hv = client(apart, "https-ntlm")
    volumes = {v["DriveLetter"]: v["FileSystem"] for v in hv.run_script("Get-VmbackupHost.ps1")["Volumes"]}
    assert volumes == {"C:": "NTFS", "D:": "NTFS", "E:": "NTFS", "F:": "ReFS"}
    with pytest.raises(HypervScriptError) as e:
        _new(hv, "refs1", ["refs01"], quiesce=quiesce, volumes=["F:\\"])
    msg = str(e.value)
    assert e.value.code == "ShadowCopyFailed" and "\n" not in msg
    assert "F:\\ is ReFS" in msg and "only for NTFS" in msg and "Move-VMStorage" in msg and "RCT" in msg
    assert apart.status()["shadow_copies"] == [] and hv.run_script("Get-VmbackupHost.ps1")["Runs"] == []
    # the NTFS volumes of the same host still work
    assert _new(hv, "ntfs1", ["win01"], quiesce=quiesce)["Consistency"] in ("application", "crash")
    _complete(hv, "ntfs1", False)


def _processes(lab, run_id):
    return {p["name"]: p for p in lab.status()["processes"] if p["run"] == run_id}


@pytest.mark.parametrize("hangs", [False, True], ids=["diskshadow-quits-on-abort", "diskshadow-hangs"])
def test_crash_cleanup_ends_the_held_vss_backup_before_deleting(lab, hv1, hangs):
    """A run whose flow process died keeps diskshadow holding the VSS backup
    open (exec wait.cmd, up to HoldSeconds). The sweeper writes the run's abort
    file, so diskshadow quits without 'end backup' (no BackupComplete), or stops
    diskshadow itself (not only the powershell.exe that started it) if it does
    not quit; only then are the copies deleted."""
    lab.set_faults(diskshadow_hangs=hangs)
    before = {v["name"]: v["backup_complete"] for v in lab.status()["vms"]}
    made = _new(hv1, "crash1", ["win01"], quiesce="off")
    procs = _processes(lab, "crash1")
    runner, diskshadow = procs["powershell.exe"], procs["diskshadow.exe"]
    assert runner["alive"] and diskshadow["alive"] and diskshadow["parent"] == runner["pid"]
    # the ledger names diskshadow itself
    assert hv1.run_script("Get-VmbackupHost.ps1")["Runs"][0]["ProcessId"] == diskshadow["pid"]
    # ... the flow process is killed here; the sweeper runs
    removed = hv1.run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0})["Removed"]
    assert [r["RunId"] for r in removed] == ["crash1"]
    st = lab.status()
    procs = _processes(lab, "crash1")
    assert not any(p["alive"] for p in procs.values())
    ended = "stopped" if hangs else "exec failed"
    assert procs["diskshadow.exe"]["ended"] == ended
    events = st["events"]
    gone = events.index(f"diskshadow.exe {diskshadow['pid']} of run crash1: {ended}")
    assert gone < events.index(f"shadow copy {made['ShadowCopies'][0]['ShadowId']} deleted")
    assert {v["name"]: v["backup_complete"] for v in st["vms"]} == before
    assert st["shadow_copies"] == [] and st["runs"] == []


@pytest.mark.parametrize("succeeded", [True, False])
def test_complete_ends_diskshadow(lab, hv1, succeeded):
    """Complete lets diskshadow reach 'end backup' (durable) or quit before it
    (abort); a diskshadow that does not quit is stopped, not left holding the backup."""
    for hangs in (False, True):
        lab.set_faults(diskshadow_hangs=hangs)
        _new(hv1, "done1", ["win01"], quiesce="off")
        pid = _processes(lab, "done1")["diskshadow.exe"]["pid"]
        done = _complete(hv1, "done1", succeeded)
        ds = next(p for p in lab.status()["processes"] if p["pid"] == pid)
        want = "stopped" if hangs else ("end backup" if succeeded else "exec failed")
        assert (ds["alive"], ds["ended"]) == (False, want)
        assert done["BackupComplete"] is (succeeded and not hangs)
        assert lab.status()["shadow_copies"] == []


def test_another_vm_whose_backup_service_does_not_answer_is_named(lab, hv1):
    lab.set_faults("win01", backup_no_contact=True)
    made = _new(hv1, "other1", ["legacy01"])
    assert made["Consistency"] == "crash" and made["Reasons"] == [
        "legacy01 has its Backup integration service off",
        "win01 is also on D:\\ and would be put into a saved state: its Backup integration service does not answer",
    ]
    _complete(hv1, "other1", False)
    assert [v["saved"] for v in lab.status()["vms"]] == [0, 0, 0]


def test_a_set_of_two_volumes_keeps_each_copy_with_its_volume(apart):
    """One set over E: and D: (in that order): each answer's copy is of its
    own volume; the writer's BackupComplete covers the VMs of both volumes."""
    hv = client(apart, "https-ntlm")
    before = {v["name"]: v["backup_complete"] for v in apart.status()["vms"]}
    made = _new(hv, "two1", ["win01", "off01"], volumes=["E:\\", "D:\\"])
    assert made["Reasons"] == ["off01 is not running"] and made["Consistency"] == "crash"
    made = _new(hv, "two2", ["win01"], volumes=["E:\\", "D:\\"], quiesce="required")
    for copy, vm in zip(made["ShadowCopies"], ["off01", "win01"], strict=True):
        root = apart.local_path(copy["ExposedPath"])
        assert sorted(p.name for p in (root / "Hyper-V").iterdir()) == [vm], copy["Volume"]
    by_id = {s["id"]: s["volume"] for s in apart.status()["shadow_copies"]}
    assert [by_id[c["ShadowId"]] for c in made["ShadowCopies"]] == ["E:\\", "D:\\"]
    _complete(hv, "two1", True)
    _complete(hv, "two2", True)
    after = {v["name"]: v["backup_complete"] for v in apart.status()["vms"]}
    assert {n: after[n] - before[n] for n in after} == {"win01": 1, "legacy01": 0, "off01": 1, "refs01": 0}
