"""Faults: quiesce policies, Tools not running, snapshot refused, CBT reset, a
grown disk, and connection errors (wrong password, untrusted certificate,
unknown VM, dropped session), each one clear error of the right class."""

from __future__ import annotations

import hashlib
import ssl
import subprocess

import pytest
from pydantic import SecretStr
from pyVmomi import vim
from vmbackup import _mover
from vmbackup.errors import (
    AuthenticationError,
    CertificateError,
    QuiesceError,
    SnapshotError,
    VmNotFoundError,
)
from vmbackup.plan import Selection
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.inventory import select_vms
from vmbackup.vsphere.tasks import run_task

from .helpers import backup, restored_sha, vm_info


@pytest.fixture
def quiesce_fault(checks):
    checks.lab.set_faults(vm="quiesce01", quiesce_fail=True)
    yield
    checks.lab.set_faults(vm="quiesce01")


def test_quiesce_required_fails_the_vm_and_leaves_nothing(client, plan, checks, quiesce_fault):
    p = plan.model_copy(update={"quiesce": "required"})
    with pytest.raises(QuiesceError) as e:
        backup(client, p, "quiesce01")
    assert e.value.retryable is False and "quiesce01" in str(e.value)
    checks.assert_clean(p)


@pytest.mark.parametrize("policy", ["preferred", "off"])
def test_quiesce_preferred_and_off_give_a_crash_consistent_backup(client, plan, checks, quiesce_fault, policy):
    r = backup(client, plan.model_copy(update={"quiesce": policy}), "quiesce01")
    assert r.status == "ok" and r.consistency == "crash"
    checks.assert_clean(plan)


def test_tools_not_running(client, plan, checks):
    r = backup(client, plan, "notools03")
    assert r.consistency == "crash"
    with pytest.raises(QuiesceError, match="VMware Tools are not running"):
        backup(client, plan.model_copy(update={"quiesce": "required"}), "notools03")
    checks.assert_clean(plan)


def test_a_powered_off_vm_satisfies_quiesce_required(client, plan, checks):
    """Nothing runs in a powered-off VM that could be inconsistent (issue 16,
    2.9): its backup is ``powered-off`` under ``quiesce: required``, although
    its VMware Tools are not running (a running VM without them fails:
    ``test_tools_not_running``)."""
    info = vm_info(client, "off03")
    assert info.power_state == "poweredOff" and not info.tools_running
    p = plan.model_copy(update={"quiesce": "required"})
    r = backup(client, p, "off03")
    assert r.status == "ok" and r.consistency == "powered-off" and r.consistency_note is None
    meta = _mover.list_backups(str(p.repository))[0][-1]
    assert meta.attributes["consistency"] == "powered-off"
    checks.assert_clean(p)


def test_snapshot_refused_by_the_host(client, plan, checks):
    checks.lab.set_faults(host="esx3", refuse_snapshots=True)
    try:
        with pytest.raises(SnapshotError) as e:
            backup(client, plan, "refuse01")
        assert e.value.retryable is False and "refuse01" in str(e.value)
    finally:
        checks.lab.set_faults(host="esx3")
    checks.assert_clean(plan)
    assert backup(client, plan, "refuse01").status == "ok"


def _same_as_lab(plan, checks, result, vm, tmp_path, tag):
    for d in result.disks:
        name = d["name"]
        out = tmp_path / f"{tag}-{name.replace(':', '_')}"
        # the snapshot is gone: the disk as it is now is what it was then (no writes since)
        assert restored_sha(plan, result.backup_id, name, out.with_suffix(".raw")) == checks.image(
            vm, name, out.with_suffix(".img")
        )


def test_cbt_reset_gives_a_full_with_the_reason(client, plan, checks, tmp_path):
    first = backup(client, plan, "cbtreset01")
    assert first.mode == "full"
    vm = client.find_vm("cbtreset01")
    for on in (False, True):  # a new CBT epoch: the change id's UUID part differs
        run_task(lambda on=on: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)), "cbt")
    checks.lab.write("cbtreset01", "scsi0:0", 3 << 20, 100_000, seed=21)
    r = backup(client, plan, "cbtreset01")
    assert r.mode == "full" and "CBT was reset" in r.full_reason
    assert r.disks[0]["full_reason"].startswith("CBT was reset")
    _same_as_lab(plan, checks, r, "cbtreset01", tmp_path, "reset")
    checks.assert_clean(plan)


def test_grown_disk_is_read_whole_with_the_reason(client, plan, checks, tmp_path):
    backup(client, plan, "grow01")
    vm = client.find_vm("grow01")
    disk = vm_info(client, "grow01").disks[1]
    dev = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.key == disk.key)
    dev.capacityInBytes = disk.capacity + (8 << 20)
    dev.capacityInKB = dev.capacityInBytes // 1024
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev)
    run_task(lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])), "grow")
    checks.lab.write("grow01", disk.name, disk.capacity + 4096, 50_000, seed=5)  # into the new area
    r = backup(client, plan, "grow01")
    by_name = {d["name"]: d for d in r.disks}
    assert by_name[disk.name]["mode"] == "full" and "resized" in by_name[disk.name]["full_reason"]
    assert by_name[disk.name]["capacity"] == disk.capacity + (8 << 20)
    other = vm_info(client, "grow01").disks[0].name
    assert by_name[other]["mode"] == "incremental"
    assert r.mode == "incremental" and f"{disk.name}: disk resized" in r.full_reason
    _same_as_lab(plan, checks, r, "grow01", tmp_path, "grow")
    checks.assert_clean(plan)


def test_wrong_password(plan, vlab):
    with pytest.raises(AuthenticationError) as e:
        VSphereClient.connect(plan.connection, SecretStr("not-the-password"))
    assert "wrong user name or password" in str(e.value) and "not-the-password" not in str(e.value)
    assert e.value.retryable is False


def test_untrusted_ca(plan, tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=some other CA", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    conn = plan.connection.model_copy(update={"ca_file": cert})
    with pytest.raises(CertificateError, match="not trusted by"):
        VSphereClient.connect(conn, SecretStr("x"))


def _lab_fingerprint(plan) -> str:
    pem = ssl.get_server_certificate((plan.connection.host, plan.connection.port))
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def test_pinned_thumbprint(plan, vlab):
    good = _lab_fingerprint(plan)
    conn = plan.connection.model_copy(update={"ca_file": None, "thumbprint": good})
    with VSphereClient.connect(conn, SecretStr(vlab.password)) as c:
        assert c.find_vm("multi01").name == "multi01"
    bad = conn.model_copy(update={"thumbprint": "ab" * 32})
    with pytest.raises(CertificateError, match="not the pinned") as e:
        VSphereClient.connect(bad, SecretStr(vlab.password))
    assert good in str(e.value) and vlab.password not in str(e.value)
    # With both, both must hold.
    both = plan.connection.model_copy(update={"thumbprint": "ab" * 32})
    with pytest.raises(CertificateError):
        VSphereClient.connect(both, SecretStr(vlab.password))


def test_unknown_vm(client):
    with pytest.raises(VmNotFoundError, match="nope01") as e:
        select_vms(client, Selection(vms=["multi01", "nope01"]))
    assert e.value.exit_code == 2 and e.value.retryable is False
    # Globs that match nothing are not errors.
    assert select_vms(client, Selection(vms=["nothing-like-this-*"])) == []


def test_dropped_session_logs_in_again(client, plan, checks):
    before = client.logins
    assert checks.lab.drop_sessions() >= 1
    assert client.find_vm("sata01").name == "sata01"
    assert client.logins == before + 1
    checks.lab.drop_sessions()
    assert backup(client, plan, "sata01").status == "ok"
    checks.assert_clean(plan)


def test_selection_by_host_cluster_and_exclusions(client):
    names = [v.name for v in select_vms(client, Selection(hosts=["esx3"]))]
    assert names == ["refuse01"]
    names = [v.name for v in select_vms(client, Selection(clusters=["cluster1"], exclude=["*01"]))]
    assert names == ["notools03", "off03"]
    assert not any(n.startswith("vmbackup-agent") for n in [v.name for v in select_vms(client, Selection(vms=["*"]))])


@pytest.mark.parametrize("transport", ["hotadd", "nbd"])
def test_session_dropped_while_the_snapshot_exists(client, plan, checks, transport):
    from .helpers import with_transports

    before = client.logins
    r = backup(client, with_transports(plan, transport), "sata01", on_snapshot=lambda _n: checks.lab.drop_sessions())
    assert r.status == "ok" and r.transport == transport and client.logins == before + 1
    checks.assert_clean(plan)


def test_consolidation_left_by_a_snapshot_removal_is_done(client, plan, checks):
    checks.lab.set_faults(vm="quiesce01", leave_consolidation=True)
    vm = client.find_vm("quiesce01")
    try:
        # A crashed run's snapshot, removed without merging: reconcile consolidates first...
        snap = run_task(lambda: vm.CreateSnapshot_Task(name="x", memory=False, quiesce=False), "s")
        run_task(lambda: snap.RemoveSnapshot_Task(removeChildren=False), "r")
        assert vm.runtime.consolidationNeeded is True
        # ...and the backup's own snapshot removal leaves it again: consolidated at the end.
        r = backup(client, plan, "quiesce01")
        assert r.status == "ok"
    finally:
        checks.lab.set_faults(vm="quiesce01")
    assert client.find_vm("quiesce01").runtime.consolidationNeeded is False
    checks.assert_clean(plan)
