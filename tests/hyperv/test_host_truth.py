"""What a real Windows host does that a kind lab would not (issue 16, section 3),
against the lab host over real pywinrm:

1. VSS creates one shadow copy set at a time per host (a second creation is
   refused with VSS_E_SNAPSHOT_SET_IN_PROGRESS): the adapter waits and tries
   again; and one set for the VMs sharing a volume freezes each guest once.
2. Pass-through disks and disks on SMB shares are skipped with the reason; the
   VM and its host are still backed up.
3. The Backup integration service is found by its Id on a German host.
4. ReFS and Cluster Shared Volumes are refused in one line that says what to do.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import sha256
from vmbackup import _mover
from vmbackup.errors import HypervQuiesceError, HypervScriptError
from vmbackup.hyperv.client import SET_IN_PROGRESS
from vmbackup.hyperv.inventory import select_vms, volume_groups
from vmbackup.hyperv.procedure import backup_vm
from vmbackup.hyperv.scripts import text
from vmbackup.hyperv.shadowset import open_shadow_set

from .conftest import client
from .test_procedure import _connect, make_plan, repo  # noqa: F401  (repo is a fixture)

MiB = 1024 * 1024
BACKUP_GUID = "5CED1297-4598-4915-A5FC-AD21BB4D02A4"


def _until(what, check, bound: float = 60.0):
    """Poll the lab until ``check()`` holds (a bound, not a wait for time to pass)."""
    end = time.monotonic() + bound
    while not check():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.05)


def _counter(lab, name: str) -> int:
    return lab.status()["counters"][name]


def _quiesces(lab) -> dict[str, int]:
    return {v["name"]: v["quiesce_count"] for v in lab.status()["vms"]}


def _select(lab, repo, names, **kw):
    plan = make_plan(lab, repo, selection={"vms": names}, **kw)
    host, hv = _connect(lab, plan)
    return plan, host, hv, select_vms(hv, host, plan.selection)


# --- 1. one creation at a time per host; one set per volume group ----------------------


def test_a_set_being_created_makes_another_wait_and_never_fails_a_vm(mixed, repo):
    """Two backups on one host at once: the second one's creation arrives while the
    first set is being created. Without the retry it fails (ShadowSetInProgress,
    nothing left behind); with it, it waits and both VMs are backed up."""
    plan, host, hv, vms = _select(mixed, repo, ["g1", "pt01"])
    g1, pt01 = (next(v for v in vms if v.name == n) for n in ("g1", "pt01"))
    created, refused = _counter(mixed, "shadow_sets_created"), _counter(mixed, "shadow_sets_refused")
    # the first creation takes until the fault is cleared (the lab wakes it then)
    mixed.set_faults(create_seconds=300)
    results: dict[str, object] = {}

    def run(vm, c, key):
        try:
            results[key] = backup_vm(c, vm, plan, host, plan.agents[0], run_id=f"run-{key}")
        except Exception as e:  # noqa: BLE001  (the test reads it)
            results[key] = e

    first = threading.Thread(target=run, args=(g1, hv, "first"))
    first.start()
    _until("the first set is being created", lambda: mixed.status()["shadow_set_in_progress"] is not None)

    # without waiting: refused, one line, and the refused run left nothing on the host
    impatient = client(mixed, "https-ntlm")
    impatient.shadow_set_wait = 0
    with pytest.raises(HypervScriptError) as e:
        backup_vm(impatient, pt01, plan, host, plan.agents[0], run_id="run-impatient")
    assert e.value.code == SET_IN_PROGRESS and "\n" not in str(e.value)
    assert "VSS_E_SNAPSHOT_SET_IN_PROGRESS" in str(e.value) and "0x80042316" in str(e.value)
    assert [r["RunId"] for r in hv.run_script("Get-VmbackupHost.ps1")["Runs"]] != []  # only the first's
    assert all("impatient" not in r["RunId"] for r in hv.run_script("Get-VmbackupHost.ps1")["Runs"])

    # with the adapter's waiting: it is refused at least once more, then gets its set
    patient = client(mixed, "https-ntlm")
    second = threading.Thread(target=run, args=(pt01, patient, "second"))
    second.start()
    _until("the second backup was refused and waits", lambda: _counter(mixed, "shadow_sets_refused") >= refused + 2)
    mixed.set_faults()  # the first creation ends now
    first.join(120)
    second.join(120)
    assert not first.is_alive() and not second.is_alive()
    for key in ("first", "second"):
        r = results[key]
        assert not isinstance(r, Exception), f"{key}: {r}"
        assert r.status == "ok" and r.backup_id
    assert patient.shadow_set_waits >= 1
    assert _counter(mixed, "shadow_sets_created") == created + 2
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == [] and st["shadow_set_in_progress"] is None


def test_one_set_for_vms_sharing_a_volume_quiesces_each_guest_once(mixed, repo, tmp_path):
    """g1, g2 and g3 share D: one set per VM freezes every guest on D: each time
    (N sets: N quiesces of each guest, N^2 in all); one set for the group, N.
    Each VM's disks read from the group's set restore bit-exact as of it."""
    plan, host, hv, vms = _select(mixed, repo, ["g*", "pt01"])
    groups = volume_groups(vms)
    assert [[v.name for v in g] for g in groups] == [["g1", "g2", "g3"], ["pt01"]]
    group = groups[0]
    n = len(group)

    before = _quiesces(mixed)
    for vm in group:  # one set per VM, as the procedure does today
        with open_shadow_set(hv, host, plan.agents[0], [vm], run_id="per-vm"):
            pass
    per_vm = {k: v - before[k] for k, v in _quiesces(mixed).items()}
    assert sum(per_vm[v.name] for v in group) == n * n

    before, created = _quiesces(mixed), _counter(mixed, "shadow_sets_created")
    want: dict[tuple[str, str], str] = {}
    with open_shadow_set(hv, host, plan.agents[0], group, run_id="grouped") as shadow:
        assert _counter(mixed, "shadow_sets_created") == created + 1
        assert {v.name: shadow.of(v.name).consistency for v in group} == dict.fromkeys(
            ["g1", "g2", "g3"], "application"
        )
        shadow_id = shadow.copies[0]["ShadowId"]
        points = {}
        for vm in group:
            for d in vm.disks:
                img = mixed.disk_image(vm.name, d.name, tmp_path / "as-of.raw", shadow=shadow_id)
                want[vm.name, d.name] = sha256(img)
                mixed.write(vm.name, d.name, MiB + 4096, 100_000, seed=77)  # the guest writes on
            session = _mover.BackupSession(str(repo), vm.name, None)
            for name, source in shadow.disk_sources(vm).items():
                session.add_disk(str(source), name)
            points[vm.name] = session.commit(config="{}", attributes="{}").id
        assert shadow.lost() == []
        assert shadow.complete(succeeded=True) is None
    grouped = {k: v - before[k] for k, v in _quiesces(mixed).items()}
    assert {v.name: grouped[v.name] for v in group} == dict.fromkeys(["g1", "g2", "g3"], 1)
    assert grouped["pt01"] == 0  # on E:, not in the set
    for vm in group:
        for d in vm.disks:
            out = tmp_path / f"{vm.name}-{d.name}.raw"
            _mover.restore_disk(str(repo), points[vm.name], str(out), disk=d.name)
            assert sha256(out) == want[vm.name, d.name], f"{vm.name} {d.name}"
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []


def test_a_group_with_a_vm_that_is_off_keeps_the_writer_for_the_others(apart, repo):
    """win01 (running) and off01 (off) in one set: win01 is application-consistent,
    off01 says it is not running; under `required` that is no error."""
    plan, host, hv, vms = _select(apart, repo, ["win01", "off01"], quiesce="required")
    with open_shadow_set(hv, host, plan.agents[0], vms, run_id="mixed-state", quiesce="required") as shadow:
        assert shadow.of("win01").consistency == "application" and shadow.of("win01").reasons == ()
        assert (shadow.of("off01").consistency, shadow.of("off01").reasons) == ("crash", ("off01 is not running",))
    assert apart.status()["runs"] == []


# --- 2. pass-through and SMB disks -------------------------------------------------------


def test_passthrough_and_smb_disks_are_skipped_with_the_reason_and_the_vm_is_backed_up(mixed, repo, tmp_path):
    plan, host, hv, vms = _select(mixed, repo, ["*"])
    # the host is reached and every VM selected, whatever its disks
    assert sorted(v.name for v in vms) == ["csv01", "g1", "g2", "g3", "pt01", "refs01"]
    pt01 = next(v for v in vms if v.name == "pt01")
    assert [d.name for d in pt01.disks] == ["scsi0:0"] and pt01.volumes == ("E:\\",)
    skipped = pt01.skipped()
    assert [s["disk"] for s in skipped] == ["scsi0:1", "scsi0:2"] and all(set(s) == {"disk", "reason"} for s in skipped)
    assert "pass-through disk" in skipped[0]["reason"] and "back it up from inside the guest" in skipped[0]["reason"]
    assert "\\\\FS1\\vms\\pt01\\" in skipped[1]["reason"] and "SMB share" in skipped[1]["reason"]
    r = backup_vm(hv, pt01, plan, host, plan.agents[0], run_id="run-pt")
    assert r.status == "ok" and [d["name"] for d in r.disks] == ["scsi0:0"]
    # the row's field (`skipped_disks`) is the run core's; the point carries them meanwhile
    point = next(b for b in _mover.list_backups(str(repo))[0] if b.id == r.backup_id)
    assert point.attributes["skipped_disks"] == skipped
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []


# --- 3. integration services by Id --------------------------------------------------------


def test_a_german_host_names_the_backup_service_its_own_way_and_it_is_found_by_id(mixed, repo):
    hv = client(mixed, "https-ntlm")
    names = {s["Id"].rsplit("\\", 1)[1]: s["Name"] for s in _json(hv, "Get-VMIntegrationService -VMName g1")}
    assert names[BACKUP_GUID] == "Sicherung (Volumeschattenkopie)"
    vm = hv.run_script("Get-VmbackupVm.ps1", {"VMName": "g1"})
    assert vm["Backup"]["Name"] == "Sicherung (Volumeschattenkopie)" and vm["Backup"]["Enabled"] is True
    made = hv.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "de1", "VMName": ["g1"], "Volumes": ["D:\\"], "Quiesce": "required"}
    )
    assert made["Consistency"] == "application"
    hv.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": "de1", "Succeeded": False})
    # and the scripts look the service up by that Id, never by a name
    for name in ("Get-VmbackupVm.ps1", "New-VmbackupShadowCopy.ps1"):
        t = text(name)
        assert "5CED1297-4598-4915-A5FC-AD21BB4D02A4" in t and "$_.Name -eq 'VSS'" not in t and "Backup*" not in t


def _json(hv, command: str):
    import json

    out = hv.run_ps(command + " | ConvertTo-Json -Depth 3").stdout
    data = json.loads(out)
    return data if isinstance(data, list) else [data]


# --- 4. ReFS and Cluster Shared Volumes ------------------------------------------------------


@pytest.mark.parametrize(
    "vm, root, what",
    [("refs01", "F:\\", "ReFS"), ("csv01", "C:\\ClusterStorage\\Volume1\\", "a Cluster Shared Volume (CSVFS)")],
)
@pytest.mark.parametrize("quiesce", ["required", "preferred"])
def test_refs_and_csv_are_refused_in_one_line_that_says_what_to_do(mixed, repo, vm, root, what, quiesce):
    plan, host, hv, vms = _select(mixed, repo, [vm], quiesce=quiesce)
    (one,) = vms
    assert one.volumes == (root,)
    if vm == "csv01":
        assert one.volume_keys == ("hv1:Volume1",)  # one limit key per CSV for the cluster
    with pytest.raises(HypervScriptError) as e:
        backup_vm(hv, one, plan, host, plan.agents[0], run_id="run-fs")
    msg = str(e.value)
    assert e.value.code == "ShadowCopyFailed" and not isinstance(e.value, HypervQuiesceError) and "\n" not in msg
    assert f"volume {root} is {what}" in msg and "only for NTFS" in msg
    assert "Move-VMStorage" in msg and "recovery checkpoints with RCT" in msg
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []
    # the host's other VMs are still backed up
    other = next(v for v in select_vms(hv, host, make_plan(mixed, repo).selection) if v.name == "g2")
    assert backup_vm(hv, other, plan, host, plan.agents[0], run_id="run-fs").status == "ok"


def test_paths_of_the_mixed_host(mixed):
    """The CSV's files are under C:\\ClusterStorage\\Volume1\\ and not on C:."""
    st = mixed.status()
    csv01 = next(v for v in st["vms"] if v["name"] == "csv01")
    (chain,) = [d["chain"] for d in csv01["disks"]]
    assert chain[0]["path"].startswith("C:\\ClusterStorage\\Volume1\\Hyper-V\\csv01\\")
    assert Path(chain[0]["local"]).is_file() and "ClusterStorage-Volume1" in chain[0]["local"]
    assert st["file_systems"]["C:\\ClusterStorage\\Volume1\\"] == "CSVFS"
