"""A pinned thumbprint works with a certificate that does not name the server
(issue 16, 2.7): an ESXi host's self-signed certificate reached by its IP
address. The lab's certificate here names only esx.lab.invalid; the plan
connects to 127.0.0.1. The SOAP session compares the fingerprint; the `nbd`
transport (nbdkit curl, which always checks the name) reads through the
agent's pinned TLS relay (vsphere/tlsrelay.py), and a wrong pin is refused
there in one line."""

from __future__ import annotations

import hashlib
import ssl

import pytest
from pydantic import SecretStr
from vmbackup import _mover
from vmbackup.errors import CertificateError
from vmbackup.hypervisors.base import RestoreRequest
from vmbackup.hypervisors.restore import restore_one
from vmbackup.plan import load_plan
from vmbackup.vsphere.client import VSphereClient
from vmbackup.vsphere.restore import VSphereRestoreSteps, describe_point, destroy_vm

from .conftest import Checks, sha
from .helpers import backup, restored_sha, run_id, with_transports


@pytest.fixture
def pinned(misnamed_lab, misnamed_plan_path, tmp_path):
    """The misnamed lab's plan with the server's SHA-256 thumbprint pinned instead of a CA file, and a client."""
    p = load_plan(misnamed_plan_path)
    host, port = p.connection.host, p.connection.port
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port)))
    conn = p.connection.model_copy(update={"ca_file": None, "thumbprint": hashlib.sha256(der).hexdigest()})
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    p = with_transports(p.model_copy(update={"connection": conn, "repository": repo}), "nbd")
    with VSphereClient.connect(conn, SecretStr(misnamed_lab.password)) as client:
        yield p, client


def test_the_certificate_does_not_name_the_address(misnamed_lab, misnamed_plan_path):
    p = load_plan(misnamed_plan_path)
    with pytest.raises(CertificateError, match="Hostname mismatch|IP address mismatch"):
        VSphereClient.connect(p.connection, SecretStr(misnamed_lab.password))


def test_a_pinned_thumbprint_reads_over_nbd_with_a_certificate_naming_another_host(misnamed_lab, pinned, tmp_path):
    plan, client = pinned
    misnamed_lab.write("pin01", "scsi0:0", 4096, 8 << 20, seed=33)
    expected = {}

    def at_snapshot(name):
        expected["sha"] = Checks(misnamed_lab, client).image("pin01", "scsi0:0", tmp_path / "pin01.img", name)

    r = backup(client, plan, "pin01", on_snapshot=at_snapshot)
    assert r.status == "ok" and r.transport == "nbd", r
    assert restored_sha(plan, r.backup_id, "scsi0:0", tmp_path / "r.raw") == expected["sha"]
    Checks(misnamed_lab, client).assert_clean(plan)


def test_a_restore_uploads_and_reads_back_through_folder_with_the_pin(misnamed_lab, pinned, tmp_path):
    """The restore's own HTTPS client (the IDE disk's upload and the .nvram's, by
    PUT to /folder) holds to the pin with the session's context; its read-back
    of the IDE disk goes through the nbd transport's relay."""
    plan, client = pinned
    misnamed_lab.write("pinide01", "ide0:0", 0, 4 << 20, seed=34)
    b = backup(client, plan, "pinide01")
    assert b.status == "ok" and b.transport == "nbd", b
    (info,) = [i for i in _mover.list_backups(str(plan.repository))[0] if i.id == b.backup_id]
    req = RestoreRequest(vm="pinide01", point=b.backup_id, restored_as="pinide01-restored")
    steps = VSphereRestoreSteps(client, req, plan, plan.agents[0], run_id=run_id())
    desc = describe_point(info.config, info.attributes)
    try:
        res = restore_one(
            steps, req, desc, hypervisor="vsphere", repository=str(plan.repository), agent=plan.agents[0].name,
            disks_per_vm=2, verify=True,
        )  # fmt: skip
        assert res.status == "ok" and res.verified is True and "folder" in res.transport, res
        for d in info.disks:
            want, got = tmp_path / f"want-{d.name}.raw", tmp_path / f"got-{d.name}.raw"
            _mover.restore_disk(str(plan.repository), b.backup_id, str(want), disk=d.name)
            misnamed_lab.disk_image("pinide01-restored", d.name, got)
            assert sha(got) == sha(want), d.name
    finally:
        for vm in client.vm_index(refresh=True).get("pinide01-restored", []):
            destroy_vm(vm, 60)
    Checks(misnamed_lab, client).assert_clean(plan)


def test_a_wrong_pin_is_refused_on_the_nbd_path_in_one_line(misnamed_lab, pinned):
    plan, client = pinned
    good = client.conn.thumbprint
    # The certificate the nbd path meets is not the pinned one (a man in the
    # middle on the agent's path, or the server's certificate replaced after login).
    client.conn = client.conn.model_copy(update={"thumbprint": "ab" * 32})
    with pytest.raises(CertificateError) as e:
        backup(client, plan, "pin01")
    msg = str(e.value)
    assert "\n" not in msg and f"has SHA-256 fingerprint {good}, not the pinned {'ab' * 32}" in msg, msg
    assert misnamed_lab.password not in msg and "vmware_soap_session" not in msg
    Checks(misnamed_lab, client).assert_clean(plan)
