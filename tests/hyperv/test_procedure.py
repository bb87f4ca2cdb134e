"""The Hyper-V per-VM procedure (`vmbackup.hyperv.procedure.backup_vm`) against
the lab host over real pywinrm: every disk restores bit-exact as of the shadow
copy, through a share and on the host itself; consistency under each quiesce
policy; cleanup on every path; reconcile and sweep remove only this system's
leftovers."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import pytest
from conftest import sha256
from pydantic import SecretStr
from vmbackup import _mover
from vmbackup.errors import (
    CancelledError,
    HypervisorError,
    HypervQuiesceError,
    HypervScriptError,
    HypervVmNotFoundError,
    WinRMAuthenticationError,
    WinRMCertificateError,
    WinRMSessionLostError,
)
from vmbackup.hyperv.inventory import connect, select_vms
from vmbackup.hyperv.procedure import backup_vm, shadow_run_id
from vmbackup.hyperv.sweep import sweep_host
from vmbackup.plan import parse_plan
from vmbackup_lab.hyperv.tlscert import make_server_context

MiB = 1024 * 1024
LEDGER = "C:\\ProgramData\\vmbackup\\ledger\\"

# every VM of the lab and what its disks are made of
LAB_DISKS = {
    ("win01", "scsi0:0"): 1,  # VHDX
    ("win01", "scsi0:1"): 2,  # AVHDX over its base VHDX
    ("legacy01", "ide0:0"): 1,  # VHD
    ("off01", "scsi0:0"): 3,  # AVHDX over AVHDX over VHDX
}


def make_plan(lab, repo: Path, *, mapping: str = "share", quiesce: str = "preferred", selection=None, agent=None):
    if agent is None and mapping == "share":
        agent = {
            "name": "agent1",
            "windows_paths": {"\\\\HV1\\": str(lab.share_root)},
            "share_account": "HV1\\vmbackup-agent",
        }
    elif agent is None:  # the agent runs on the host: its drives are the host's
        agent = {
            "name": "agent1",
            "hosts": ["hv1"],
            "windows_paths": {f"{v.name}:\\": str(v) for v in sorted((lab.root / "volumes").iterdir())},
        }
    return parse_plan(
        {
            "hyperv": [
                {
                    "name": "hv1",
                    "url": lab.url,
                    "user": lab.user,
                    "password_env": "VMBACKUP_HYPERV_PASSWORD",
                    "auth": "ntlm",
                    "ca_file": lab.ca_file,
                }
            ],
            "repository": str(repo),
            "agents": [agent],
            "selection": selection or {"vms": ["*"]},
            "quiesce": quiesce,
        }
    )


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    _mover.init_repository(str(r))
    return r


def _connect(lab, plan, password=None):
    host = plan.hyperv_host("hv1")
    return host, connect(host, SecretStr(password or lab.password))


def _completes(lab) -> dict[str, int]:
    return _counts(lab, "backup_complete")


def _counts(lab, what: str) -> dict[str, int]:
    """Per VM: `backup_complete` (the host's BackupComplete), `guest_backups`
    (the guest's own VSS backup, during create), `saved` (put into a saved state)."""
    return {v["name"]: v[what] for v in lab.status()["vms"]}


def _nothing_left(lab, client) -> None:
    st = lab.status()
    assert st["shadow_copies"] == [] and st["runs"] == []
    assert client.run_script("Get-VmbackupHost.ps1")["Runs"] == []
    assert not any(lab.share_root.iterdir())


def _vm(client, host, plan, name):
    return next(v for v in select_vms(client, host, plan.selection) if v.name == name)


@pytest.mark.parametrize("mapping", ["share", "local"])
def test_every_disk_restores_bit_exact_as_of_the_shadow_copy(lab, repo, tmp_path, mapping):
    """Every disk of every VM (VHDX, AVHDX chains of 1 and 2 levels, VHD) from
    the shadow copy, through a share or on the host; guest writes made while
    the backup runs stay out; the configuration files are in the point."""
    plan = make_plan(lab, repo, mapping=mapping)
    host, client = _connect(lab, plan)
    vms = select_vms(client, host, plan.selection)
    assert [v.name for v in vms] == ["legacy01", "off01", "win01"]
    assert {(v.name, d.name): len(d.chain) for v in vms for d in v.disks} == LAB_DISKS
    before = _completes(lab)
    config_local = {c["path"]: Path(c["local"]) for v in lab.status()["vms"] for c in v["config_files"]}
    want: dict[tuple[str, str], str] = {}
    for vm in vms:
        seen = []

        def at_shadow(shadow_id, vm=vm, seen=seen):
            seen.append(shadow_id)
            for d in vm.disks:
                img = lab.disk_image(vm.name, d.name, tmp_path / "as-of.raw", shadow=shadow_id)
                want[vm.name, d.name] = sha256(img)
                # the guest writes on while the backup reads (a pattern of its own per run:
                # the lab host lives for the session)
                lab.write(vm.name, d.name, 2 * MiB + 4096, 200_000, seed=91 + ["share", "local"].index(mapping))

        reported = []
        r = backup_vm(
            client,
            vm,
            plan,
            host,
            plan.agents[0],
            run_id="run-a",
            on_shadow=at_shadow,
            progress=lambda done, total, reported=reported: reported.append((done, total)),
        )
        assert len(seen) == 1
        assert reported and all(total == sum(d.size for d in vm.disks) for _, total in reported)
        assert (r.status, r.mode, r.transport, r.host, r.agent) == ("ok", "full", mapping, "hv1", "agent1")
        assert r.datastores == (["hv1:E"] if vm.name == "off01" else ["hv1:D"])
        assert "Resilient Change Tracking" in r.full_reason
        assert r.bytes_read > 0 and [d["name"] for d in r.disks] == [d.name for d in vm.disks]
        expected = {
            # legacy01 (Backup off) shares D: with win01: the writer would save it, so it is left out
            "win01": ("crash", OTHER_VM_SAVED),
            "legacy01": ("crash", "legacy01 has its Backup integration service off"),
            "off01": ("powered-off", None),
        }[vm.name]
        assert (r.consistency, r.consistency_note) == expected
        for d in vm.disks:
            out = tmp_path / f"{vm.name}-{d.name}.raw"
            _mover.restore_disk(str(repo), r.backup_id, str(out), disk=d.name)
            assert sha256(out) == want[vm.name, d.name], f"{vm.name} {d.name}"
            now = sha256(lab.disk_image(vm.name, d.name, tmp_path / "now.raw"))
            assert now != want[vm.name, d.name], f"{vm.name} {d.name}: the guest write did not land"
        point = next(b for b in _mover.list_backups(str(repo))[0] if b.id == r.backup_id)
        assert point.attributes["consistency"] == r.consistency and point.attributes["transport"] == mapping
        files = point.config["config_files"]
        assert [f["path"] for f in files] == list(vm.config_files) and files
        for f in files:
            assert base64.b64decode(f["data_base64"]) == config_local[f["path"]].read_bytes()
        _nothing_left(lab, client)
    # no VM was quiesced, none was put into a saved state, no BackupComplete
    assert _completes(lab) == before
    assert set(_counts(lab, "saved").values()) == {0}


OTHER_VM_SAVED = "legacy01 is also on D:\\ and would be put into a saved state: its Backup integration service is off"


def test_application_consistency_and_when_guest_logs_may_be_truncated(apart, repo, tmp_path):
    """win01 alone on its volume: application-consistent, bit-exact. The
    guest's own VSS backup (where its applications may truncate logs) runs
    during create, before the data is durable; the host's BackupComplete only
    after the commit (docs/hyperv.md)."""
    lab = apart
    plan = make_plan(lab, repo, quiesce="required")
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    guest, complete = _counts(lab, "guest_backups"), _completes(lab)
    seen = {}

    def on_shadow(shadow_id):
        seen["guest"], seen["complete"] = _counts(lab, "guest_backups"), _completes(lab)
        for d in vm.disks:
            seen[d.name] = sha256(lab.disk_image(vm.name, d.name, tmp_path / "as-of.raw", shadow=shadow_id))

    r = backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-app", on_shadow=on_shadow)
    assert (r.consistency, r.consistency_note) == ("application", None)
    # before any byte was read: the guest had its backup already, the host's BackupComplete not yet
    assert seen["guest"]["win01"] == guest["win01"] + 1 and seen["complete"] == complete
    # after the commit: one BackupComplete, and no second guest backup
    assert _completes(lab)["win01"] == complete["win01"] + 1
    assert _counts(lab, "guest_backups")["win01"] == guest["win01"] + 1
    assert set(_counts(lab, "saved").values()) == {0}
    for d in vm.disks:
        out = tmp_path / f"{d.name}.raw"
        _mover.restore_disk(str(repo), r.backup_id, str(out), disk=d.name)
        assert sha256(out) == seen[d.name]
    _nothing_left(lab, client)


@pytest.mark.parametrize("quiesce", ["required", "preferred"])
def test_no_other_vm_on_the_volume_is_ever_saved(lab, repo, quiesce):
    """win01's backup must not put legacy01 (Backup off, same volume D:) into a
    saved state: the writer is left out (preferred) or the backup refused
    (required), with legacy01 named."""
    plan = make_plan(lab, repo, quiesce=quiesce)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    saved, guest = _counts(lab, "saved"), _counts(lab, "guest_backups")
    if quiesce == "required":
        with pytest.raises(HypervQuiesceError) as e:
            backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-o")
        assert OTHER_VM_SAVED in str(e.value) and "\n" not in str(e.value)
    else:
        r = backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-o")
        assert (r.consistency, r.consistency_note) == ("crash", OTHER_VM_SAVED)
    assert _counts(lab, "saved") == saved and _counts(lab, "guest_backups") == guest
    _nothing_left(lab, client)


FAULTS = [
    pytest.param(
        None, {"writer_failed": True}, "the Hyper-V VSS writer failed: Non-retryable error", id="writer-failed"
    ),
    pytest.param("win01", {"backup_off": True}, "win01 has its Backup integration service off", id="backup-off"),
]


@pytest.mark.parametrize("quiesce", ["required", "preferred", "off"])
@pytest.mark.parametrize("where, fault, reason", FAULTS)
def test_no_quiesce_under_each_policy(lab, repo, quiesce, where, fault, reason):
    plan = make_plan(lab, repo, quiesce=quiesce)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    lab.set_faults(where, **fault)
    before = _completes(lab)
    if quiesce == "required":
        with pytest.raises(HypervQuiesceError) as e:
            backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-q")
        assert reason in str(e.value) and "\n" not in str(e.value) and e.value.retryable is False
        assert _mover.list_backups(str(repo))[0] == []
    else:
        r = backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-q")
        assert r.consistency == "crash" and r.backup_id
        if quiesce == "preferred":
            assert reason in r.consistency_note.split("; ")
        else:  # the writer is never asked
            assert r.consistency_note == "quiesce is off"
        point = _mover.list_backups(str(repo))[0][0]
        assert point.attributes["consistency_note"] == r.consistency_note
    assert _completes(lab) == before
    _nothing_left(lab, client)


@pytest.mark.parametrize("how", ["cancel", "no-mapping"])
def test_failure_mid_read_sends_no_backup_complete_and_leaves_nothing(lab, repo, how):
    agent = None
    if how == "no-mapping":  # shares of another host only: the copy's share path maps to nothing
        agent = {"name": "agent1", "windows_paths": {"\\\\HV2\\": str(lab.share_root)}, "share_account": "HV1\\x"}
    plan = make_plan(lab, repo, agent=agent)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    before = _completes(lab)
    token = _mover.CancelToken()
    made = []

    def on_shadow(shadow_id):
        made.append(shadow_id)
        assert len(lab.status()["shadow_copies"]) == 1
        if how == "cancel":
            token.cancel()

    expected = CancelledError if how == "cancel" else HypervisorError
    with pytest.raises(expected) as e:
        backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-f", cancel=token, on_shadow=on_shadow)
    assert made and "\n" not in str(e.value)
    if how == "no-mapping":
        assert "windows_paths" in str(e.value) and "\\\\HV1\\vmbk-" in str(e.value)
    assert _completes(lab) == before
    assert _mover.list_backups(str(repo))[0] == []
    _nothing_left(lab, client)


def test_next_backup_removes_this_vms_leftover_and_not_another_vms_live_run(lab, repo):
    plan = make_plan(lab, repo)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    # a backup of win01 that "crashed" (its process died) and one of legacy01 still running
    crashed = client.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "crashed-1", "VMName": ["win01"], "Volumes": ["D:\\"]}
    )
    live = client.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "live-1", "VMName": ["legacy01"], "Volumes": ["D:\\"]}
    )
    assert len(lab.status()["shadow_copies"]) == 2
    r = backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-r")
    assert r.status == "ok"
    st = lab.status()
    assert st["runs"] == ["live-1"]
    assert [s["id"] for s in st["shadow_copies"]] == [live["ShadowCopies"][0]["ShadowId"]]
    assert crashed["ShadowCopies"][0]["ShadowId"] not in [s["id"] for s in st["shadow_copies"]]
    client.run_script("Complete-VmbackupShadowCopy.ps1", {"RunId": "live-1", "Succeeded": False})
    _nothing_left(lab, client)


def _backdate(lab, run_id: str, seconds: float) -> None:
    """As if run `run_id` had started `seconds` ago (its ledger entry's Created)."""
    path = lab.local_path(LEDGER + run_id + ".json")
    entry = json.loads(path.read_text())
    created = datetime.datetime.fromisoformat(entry["Created"]) - datetime.timedelta(seconds=seconds)
    entry["Created"] = created.isoformat()
    path.write_text(json.dumps(entry))


def test_sweep_host_removes_old_runs_only(lab, repo):
    plan = make_plan(lab, repo)
    _host, client = _connect(lab, plan)
    old = client.run_script("New-VmbackupShadowCopy.ps1", {"RunId": "old-1", "VMName": ["win01"], "Volumes": ["D:\\"]})
    young = client.run_script(
        "New-VmbackupShadowCopy.ps1", {"RunId": "young-1", "VMName": ["off01"], "Volumes": ["E:\\"]}
    )
    _backdate(lab, "old-1", 7200)
    removed = sweep_host(client, older_than_seconds=3600)
    assert [(r["RunId"], r["Deleted"]) for r in removed] == [("old-1", [old["ShadowCopies"][0]["ShadowId"]])]
    st = lab.status()
    assert st["runs"] == ["young-1"] and [s["id"] for s in st["shadow_copies"]] == [
        young["ShadowCopies"][0]["ShadowId"]
    ]
    assert sweep_host(client, older_than_seconds=3600) == []
    assert [r["RunId"] for r in sweep_host(client, older_than_seconds=0)] == ["young-1"]
    _nothing_left(lab, client)


def test_session_dropped_during_complete_is_one_retryable_error_and_the_sweeper_cleans_up(lab, repo):
    plan = make_plan(lab, repo)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    lab.set_faults(drop_during="Complete-VmbackupShadowCopy.ps1")
    with pytest.raises(WinRMSessionLostError) as e:
        backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-d")
    msg = str(e.value)
    assert e.value.retryable is True and "\n" not in msg and "was backed up" in msg and lab.password not in msg
    lab.set_faults()
    rid = shadow_run_id("run-d", "win01")
    assert [r["RunId"] for r in client.run_script("Get-VmbackupHost.ps1")["Runs"]] == [rid]
    assert len(lab.status()["shadow_copies"]) == 1
    # the point was committed before the session dropped
    assert [b.vm for b in _mover.list_backups(str(repo))[0]] == ["win01"]
    assert sweep_host(client, older_than_seconds=3600) == []
    _backdate(lab, rid, 7200)
    assert [r["RunId"] for r in sweep_host(client, older_than_seconds=3600)] == [rid]
    _nothing_left(lab, client)


def test_wrong_password_is_one_line_without_the_password(lab, repo):
    plan = make_plan(lab, repo)
    host, client = _connect(lab, plan, password="not-the-password")
    with pytest.raises(WinRMAuthenticationError) as e:
        select_vms(client, host, plan.selection)
    msg = str(e.value)
    assert "\n" not in msg and "rejected" in msg and "not-the-password" not in msg and lab.password not in msg


def test_untrusted_certificate_is_one_line(lab, repo, tmp_path):
    other = tmp_path / "other-ca.pem"
    make_server_context(other, "elsewhere")
    plan = make_plan(lab, repo)
    host = plan.hyperv_host("hv1").model_copy(update={"ca_file": other})
    with pytest.raises(WinRMCertificateError) as e:
        select_vms(connect(host, SecretStr(lab.password)), host, plan.selection)
    assert "\n" not in str(e.value) and "not trusted" in str(e.value) and lab.password not in str(e.value)


@pytest.mark.parametrize(
    "selection, names",
    [
        ({"vms": ["WIN01"]}, ["win01"]),  # Hyper-V compares names without case
        ({"vms": ["*01"], "exclude": ["off*"]}, ["legacy01", "win01"]),
        ({"hosts": ["hv*"]}, ["legacy01", "off01", "win01"]),
        ({"hosts": ["esx*"]}, []),
        ({"vms": ["zz*"]}, []),
        ({"folders": ["/dc/vm"]}, []),  # folders, clusters and tags match no Hyper-V VM
    ],
)
def test_selection(lab, repo, selection, names):
    plan = make_plan(lab, repo, selection=selection)
    host, client = _connect(lab, plan)
    assert [v.name for v in select_vms(client, host, plan.selection)] == names


def test_unknown_literal_vm_name(lab, repo):
    plan = make_plan(lab, repo, selection={"vms": ["win01", "nope"]})
    host, client = _connect(lab, plan)
    with pytest.raises(HypervVmNotFoundError) as e:
        select_vms(client, host, plan.selection)
    assert e.value.exit_code == 2 and "nope" in str(e.value) and "\n" not in str(e.value)
    assert [v.name for v in select_vms(client, host, plan.selection, strict=False)] == ["win01"]


@pytest.mark.parametrize(
    "fault, error",
    [
        pytest.param({"shadow_fail": True}, HypervScriptError, id="shadow-copy-fails"),
        pytest.param({"drop_during": "New-VmbackupShadowCopy.ps1"}, WinRMSessionLostError, id="dropped-during-new"),
    ],
)
def test_shadow_copy_step_failing_leaves_nothing(lab, repo, fault, error):
    """The shadow copy step fails after the script wrote its ledger entry (or
    made the copy and lost the answer): Complete -Succeeded $false still runs
    and removes it; no point, no BackupComplete."""
    plan = make_plan(lab, repo)
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    before = _completes(lab)
    lab.set_faults(**fault)
    with pytest.raises(error) as e:
        backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-s", on_shadow=lambda _id: pytest.fail("no copy"))
    assert "\n" not in str(e.value) and e.value.retryable is (error is WinRMSessionLostError)
    lab.set_faults()
    assert _completes(lab) == before
    assert _mover.list_backups(str(repo))[0] == []
    _nothing_left(lab, client)


@pytest.mark.parametrize(
    "path, root, key",
    [
        ("D:\\Hyper-V\\win01\\x.vhdx", "D:\\", "hv1:D"),
        ("d:\\x.vhdx", "D:\\", "hv1:D"),
        ("C:\\ClusterStorage\\Volume1\\VMs\\a.vhdx", "C:\\ClusterStorage\\Volume1\\", "clu1:Volume1"),
    ],
)
def test_volume_roots_and_limit_keys(lab, repo, path, root, key):
    from vmbackup.hyperv.inventory import volume_key, volume_of

    host = make_plan(lab, repo).hyperv_host("hv1").model_copy(update={"cluster": "clu1"})
    assert volume_of(path) == root and volume_key(host, root) == key


def test_shadow_run_ids_are_valid_and_unique_per_run_and_vm():
    import re

    names = ["win01", "WIN01", "a" * 200, "vm with spaces/and\\slashes", "ünïcödé", "-"]
    runs = ["run-a", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0" * 3, ""]
    ids = {(r, n): shadow_run_id(r, n) for r in runs for n in names}
    assert all(re.fullmatch(r"[A-Za-z0-9-]{1,64}", i) for i in ids.values())
    assert len(set(ids.values())) == len(ids)
    assert shadow_run_id("run-a", "win01") == shadow_run_id("run-a", "win01")  # a retried attempt


def test_vm_on_a_refs_volume_fails_in_one_line_and_leaves_nothing(apart, repo):
    plan = make_plan(apart, repo)
    host, client = _connect(apart, plan)
    vm = _vm(client, host, plan, "refs01")
    assert list(vm.volumes) == ["F:\\"]
    with pytest.raises(HypervScriptError) as e:
        backup_vm(client, vm, plan, host, plan.agents[0], run_id="run-refs", on_shadow=lambda _id: pytest.fail("copy"))
    assert e.value.code == "ShadowCopyFailed" and "ReFS" in str(e.value) and "NTFS" in str(e.value)
    assert "\n" not in str(e.value) and e.value.retryable is False
    assert _mover.list_backups(str(repo))[0] == []
    _nothing_left(apart, client)


@pytest.mark.parametrize("when", ["before-the-read", "mid-read"])
def test_shadow_copy_vanishing_during_the_backup_is_one_clear_line(lab, repo, when):
    """The guests write so much that the shadow storage fills and Windows
    deletes the oldest shadow copy, ours, while the backup reads it: the backup
    fails in one line that says so, no point is committed, nothing is left."""
    plan = make_plan(lab, repo, quiesce="off")
    host, client = _connect(lab, plan)
    vm = _vm(client, host, plan, "win01")
    made = []

    def vanish():
        if len(made) == 1:
            lab.set_faults(shadow_vanish=True)
            lab.write("win01", "scsi0:0", 0, 4096, seed=17)
            assert lab.status()["shadow_copies"] == []
            made.append("gone")

    def on_shadow(shadow_id):
        made.append(shadow_id)
        if when == "before-the-read":
            vanish()

    with pytest.raises(HypervisorError) as e:
        backup_vm(
            client,
            vm,
            plan,
            host,
            plan.agents[0],
            run_id="run-v",
            on_shadow=on_shadow,
            progress=lambda _done, _total: vanish() if when == "mid-read" else None,
        )
    msg = str(e.value)
    assert made[1:] == ["gone"] and "\n" not in msg
    assert f"shadow copy {made[0]} of D:\\ vanished" in msg and "shadow storage" in msg
    assert _mover.list_backups(str(repo))[0] == []
    lab.set_faults()
    _nothing_left(lab, client)
