"""The HTTP transport (nbdkit curl over the datastore's /folder) as a real
vCenter serves it (issue 16, 2.7): /folder wants a live session, and the lab
drops sessions mid-read; vSAN/vVols keep no flat file; names with a space and
`&` are quoted right. And the `vddk` transport's command line (VDDK itself is
not redistributable, so it is not run here)."""

from __future__ import annotations

import pytest
from vmbackup.errors import HypervisorError
from vmbackup.plan import Agent, Vddk
from vmbackup.vsphere.ledger import Entry, Ledger
from vmbackup.vsphere.transport import Context, TransportImpossible, vddk_command
from vmbackup.vsphere.transport import Vddk as VddkTransport

from .helpers import agent_for, backup, restored_sha, vm_info, with_transports


def _frozen_image(checks, vm, tmp_path):
    expected = {}

    def at_snapshot(name):
        expected["sha"] = checks.image(vm, "scsi0:0", tmp_path / f"{vm}.img", name)

    return expected, at_snapshot


def test_sessions_dropped_mid_read_the_cookie_is_renewed_and_the_backup_is_bit_exact(client, plan, checks, tmp_path):
    p = with_transports(plan, "nbd").model_copy(update={"cookie_renew_seconds": 1})
    checks.lab.write("xfer01", "scsi0:0", 0, 8 << 20, seed=21)
    expected, at_snapshot = _frozen_image(checks, "xfer01", tmp_path)
    before = client.logins

    def hook(name):
        at_snapshot(name)
        # nbdkit's first requests pass; then every session is dropped, in the middle of the read.
        checks.lab.drop_sessions_after(3)

    r = backup(client, p, "xfer01", on_snapshot=hook)
    assert r.status == "ok" and r.transport == "nbd"
    assert client.logins > before  # the keeper logged in again, nbdkit's cookie script read the new cookie
    assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "x.raw") == expected["sha"]
    checks.assert_clean(p)


def test_folder_refuses_a_dropped_session(client, checks):
    import urllib.error
    import urllib.request

    from vmbackup.vsphere.transport import folder_url

    vm = client.find_vm("xfer01")
    path = vm.config.files.vmPathName
    ds, rel = path[1:].split("] ", 1)
    url = folder_url(client.base_url, rel, client.datacenter_of(vm).name, ds)

    def get(cookie):
        req = urllib.request.Request(url, headers={"Cookie": cookie})
        with urllib.request.urlopen(req, context=client.ssl_context, timeout=30) as res:
            return res.status

    cookie = client.cookie
    assert get(cookie) == 200
    checks.lab.drop_sessions()
    with pytest.raises(urllib.error.HTTPError) as e:
        get(cookie)
    assert e.value.code == 401
    assert get(client.cookie) == 200  # a new session (logged in again) is served


def test_a_datastore_without_flat_files_passes_to_the_next_transport(client, plan, checks, tmp_path):
    expected, at_snapshot = _frozen_image(checks, "vsan01", tmp_path)
    with pytest.raises(HypervisorError) as e:
        backup(client, with_transports(plan, "nbd", "direct"), "vsan01")
    msg = str(e.value)
    assert "nbd: disk scsi0:0 is on vsan datastore vsan1, which has no flat file" in msg, msg
    assert "direct: disk scsi0:0 is on vsan datastore vsan1" in msg, msg
    checks.assert_clean(plan)
    p = with_transports(plan, "nbd", "direct", "hotadd")
    r = backup(client, p, "vsan01", on_snapshot=at_snapshot)
    assert r.status == "ok" and r.transport == "hotadd"
    assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "v.raw") == expected["sha"]
    checks.assert_clean(p)


@pytest.mark.parametrize("transport", ["nbd", "direct"])
def test_a_datastore_named_with_a_space_and_an_ampersand(client, plan, checks, tmp_path, transport):
    checks.lab.write("amp01", "scsi0:0", 4096, 1 << 20, seed=5)
    expected, at_snapshot = _frozen_image(checks, "amp01", tmp_path)
    p = with_transports(plan, transport)
    r = backup(client, p, "amp01", on_snapshot=at_snapshot)
    assert r.status == "ok" and r.transport == transport and r.datastores == ["nas & co"]
    assert restored_sha(p, r.backup_id, "scsi0:0", tmp_path / "a.raw") == expected["sha"]
    checks.assert_clean(p)


def test_the_vddk_command_line(plan):
    cfg = Vddk(libdir="/opt/vmware-vix-disklib-distrib", thumbprint="ab" * 20, transports="hotadd:nbdssl")
    conn = plan.connection.model_copy(update={"url": "https://vc.example.com:8443/sdk"})
    argv = vddk_command(
        cfg, conn=conn, thumbprint=cfg.thumbprint, vm_moref="vm-42", snapshot_moref="snapshot-7",
        file="[nas & co] db01/db01.vmdk", socket="/run/x/disk0.sock", pidfile="/run/x/disk0.pid",
        password_file="/run/x/password",
    )  # fmt: skip
    assert argv == [
        "nbdkit", "--exit-with-parent", "-r", "-U", "/run/x/disk0.sock", "-P", "/run/x/disk0.pid", "vddk",
        "libdir=/opt/vmware-vix-disklib-distrib", "server=vc.example.com", "port=8443",
        f"user={conn.user}", "password=+/run/x/password", "thumbprint=" + ":".join(["AB"] * 20),
        "vm=moref=vm-42", "snapshot=snapshot-7", "transports=hotadd:nbdssl", "file=[nas & co] db01/db01.vmdk",
    ]  # fmt: skip
    assert not any("secret" in a.lower() for a in argv)


def test_vddk_without_the_plugin_is_impossible_with_the_reason(client, plan, checks, tmp_path):
    info = vm_info(client, "sata01")
    agent = agent_for(plan, info).model_copy(update={"vddk": Vddk(libdir=tmp_path), "transports": ["vddk", "nbd"]})
    assert isinstance(agent, Agent)
    vm = client.find_vm("sata01")
    ledger = Ledger(plan.repository)
    entry = Entry(run_id="vddk1", vm="sata01", vm_moref=info.moref)
    snap = vm.snapshot  # no snapshot needed: the plugin check comes first
    ctx = Context(client, vm, "sata01", snap, plan, agent, "vddk1", ledger, entry, 60)
    t = VddkTransport(ctx)
    with pytest.raises(TransportImpossible, match="nbdkit's vddk plugin is not installed"):
        t.open([])
    assert t.close() == []
    # Through the procedure: vddk impossible, nbd next.
    p = plan.model_copy(update={"transports": ["vddk", "nbd"], "agents": [agent]})
    r = backup(client, p, "sata01")
    assert r.status == "ok" and r.transport == "nbd"
    checks.assert_clean(p)
