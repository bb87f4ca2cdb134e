"""pywinrm, unchanged, against the lab host: the shell, each admin query, and
the transports' guarantees (sealed over HTTP, verified over HTTPS)."""

from __future__ import annotations

import json
import socket

import pytest
import winrm
from vmbackup.errors import (
    InvalidInputError,
    WinRMAuthenticationError,
    WinRMCertificateError,
    WinRMUnreachableError,
)
from vmbackup.hyperv.client import HypervClient
from vmbackup_lab.hyperv.tlscert import make_server_context

from .conftest import TRANSPORTS, client


def test_run_cmd(hv):
    r = hv.run_cmd("hostname")
    assert (r.status, r.stdout.strip()) == (0, "hv1")
    r = hv.run_cmd("nosuchtool", ["/x"])
    assert r.status == 1 and "is not recognized" in r.stderr


def _ps(hv, text):
    r = hv.run_ps(text)
    assert r.status == 0, r.stderr
    return json.loads(r.stdout)


def test_get_vm_enums_are_numbers(hv):
    vms = _ps(hv, "Get-VM | Select-Object Name, State, Generation | ConvertTo-Json")
    assert {v["Name"]: v["State"] for v in vms} == {"win01": 2, "legacy01": 2, "off01": 3}
    one = _ps(hv, "Get-VM -Name legacy01 | ConvertTo-Json -Compress")
    assert isinstance(one, dict) and one["Generation"] == 1
    # default depth 2: the VM's drives are objects, their own fields are not expanded further
    assert one["HardDrives"][0]["ControllerType"] == 0


def test_get_vm_text_shows_enum_names(hv):
    r = hv.run_ps("Get-VM off01 | Select-Object Name, State")
    assert r.status == 0 and "State : Off" in r.stdout


def test_get_vmharddiskdrive(hv):
    disks = _ps(
        hv,
        "Get-VMHardDiskDrive -VMName win01 | Select-Object ControllerType, ControllerNumber, ControllerLocation, Path | ConvertTo-Json",
    )
    assert [(d["ControllerType"], d["ControllerLocation"]) for d in disks] == [(1, 0), (1, 1)]
    assert disks[0]["Path"] == "D:\\Hyper-V\\win01\\Virtual Hard Disks\\win01.vhdx"
    assert disks[1]["Path"].endswith(".avhdx")


def test_get_vmintegrationservice(hv):
    svc = _ps(hv, "Get-VMIntegrationService -VMName legacy01 -Name VSS | ConvertTo-Json")
    assert svc["Enabled"] is False and svc["PrimaryOperationalStatus"] is None
    svc = _ps(
        hv,
        "Get-VMIntegrationService -VMName win01 | Select-Object Name, Enabled, PrimaryOperationalStatus | ConvertTo-Json",
    )
    assert {"Name": "VSS", "Enabled": True, "PrimaryOperationalStatus": 2} in svc


def test_get_ciminstance_win32_shadowcopy(lab, hv):
    assert hv.run_ps("Get-CimInstance Win32_ShadowCopy | ConvertTo-Json").stdout.strip() == ""
    made = hv.run_script("New-VmbackupShadowCopy.ps1", {"RunId": "cim", "VMName": ["win01"], "Volumes": ["D:\\"]})
    copies = _ps(
        hv,
        "Get-CimInstance -ClassName Win32_ShadowCopy | Select-Object ID, SetID, DeviceObject, InstallDate, Persistent | ConvertTo-Json",
    )
    assert copies["ID"] == made["ShadowCopies"][0]["ShadowId"] and copies["SetID"] == made["SetId"]
    assert copies["DeviceObject"].startswith("\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy")
    assert copies["Persistent"] is True and copies["InstallDate"].startswith("/Date(")
    r = hv.run_ps("Get-CimInstance Win32_ShadowCopy | ConvertTo-Json -Compress")
    assert '"InstallDate":"\\/Date(' in r.stdout  # Windows PowerShell 5.1's DateTime


def test_unknown_cmdlet_is_a_powershell_error(hv):
    r = hv.run_ps("Remove-VM win01 -Force")
    assert r.status == 1 and "is not recognized as the name of a cmdlet" in r.stderr


def test_plain_pywinrm_sessions(lab):
    """pywinrm's own Session, as a user would write it, for each transport."""
    for _, attr, auth in TRANSPORTS:
        s = winrm.Session(getattr(lab, attr), auth=(lab.user, lab.password), transport=auth, ca_trust_path=lab.ca_file)
        r = s.run_ps("Get-VM win01 | Select-Object Name | ConvertTo-Json -Compress")
        assert (r.status_code, json.loads(r.std_out)) == (0, {"Name": "win01"})


def test_http_refuses_unsealed_messages(lab):
    s = winrm.Session(
        lab.http_url,
        auth=(lab.user, lab.password),
        transport="ntlm",
        message_encryption="never",
        ca_trust_path=lab.ca_file,
    )
    with pytest.raises(winrm.exceptions.WinRMTransportError) as e:
        s.run_cmd("hostname")
    assert e.value.code == 400


def test_basic_over_http_is_refused_by_client_and_server(lab):
    with pytest.raises(InvalidInputError):
        HypervClient(lab.http_url, lab.user, lab.password, auth="basic")
    s = winrm.Session(lab.http_url, auth=(lab.user, lab.password), transport="basic", ca_trust_path=lab.ca_file)
    with pytest.raises(winrm.exceptions.InvalidCredentialsError):
        s.run_cmd("hostname")


@pytest.mark.parametrize("transport", [t[0] for t in TRANSPORTS])
def test_wrong_password_is_one_clear_line(lab, transport):
    hv = client(lab, transport, password="not-the-password")
    with pytest.raises(WinRMAuthenticationError) as e:
        hv.run_cmd("hostname")
    msg = str(e.value)
    assert "\n" not in msg and "rejected" in msg and lab.password not in msg and "not-the-password" not in msg
    assert e.value.retryable is False


@pytest.mark.parametrize("transport", ["https-basic", "https-ntlm"])
def test_untrusted_certificate(lab, transport, tmp_path):
    other = tmp_path / "other-ca.pem"
    make_server_context(other, "elsewhere")
    with pytest.raises(WinRMCertificateError) as e:
        client(lab, transport, ca_file=str(other)).run_cmd("hostname")
    assert "\n" not in str(e.value) and "not trusted" in str(e.value) and e.value.retryable is False


def test_unreachable_port(lab):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and no one else gets the port
        port = s.getsockname()[1]
        hv = HypervClient(f"https://127.0.0.1:{port}/wsman", lab.user, lab.password, ca_file=lab.ca_file)
        with pytest.raises(WinRMUnreachableError) as e:
            hv.run_cmd("hostname")
    assert e.value.retryable is True and "\n" not in str(e.value)


@pytest.mark.parametrize("transport", [t[0] for t in TRANSPORTS])
def test_sessions_dropped_between_commands_are_rebuilt(lab, transport):
    """pywinrm closes its HTTP session after each command, so a drop between
    commands costs a new authentication, not an error (a drop in the middle
    of a command is tested with the adapter's scripts)."""
    hv = client(lab, transport)
    assert hv.run_cmd("hostname").status == 0
    dropped = lab.status()["winrm"]["dropped"]
    lab.drop_sessions()
    assert lab.status()["winrm"]["dropped"] == dropped + 1
    assert hv.run_cmd("hostname").status == 0


def test_a_shell_lost_mid_command_is_retryable(lab):
    """Receive on a shell the host no longer has: WSManFault 2150858843."""
    s = winrm.Session(lab.url, auth=(lab.user, lab.password), transport="ntlm", ca_trust_path=lab.ca_file)
    shell = s.protocol.open_shell()
    cid = s.protocol.run_command(shell, "hostname")
    lab.drop_sessions()
    with pytest.raises(winrm.exceptions.WSManFaultError) as e:
        s.protocol.get_command_output(shell, cid)
    assert e.value.wsman_fault_code == 2150858843


@pytest.mark.parametrize("auth, needs", [("kerberos", "pykerberos"), ("credssp", "requests-credssp")])
def test_kerberos_and_credssp_are_selectable_and_say_what_they_need(lab, auth, needs):
    """Neither extra is installed here: the choice reaches pywinrm and comes
    back as one line naming what is missing (with it, pywinrm authenticates)."""
    from vmbackup.errors import WinRMError

    hv = HypervClient(lab.url, lab.user, lab.password, auth=auth, ca_file=lab.ca_file)
    with pytest.raises(WinRMError) as e:
        hv.run_cmd("hostname")
    assert needs in str(e.value) and "\n" not in str(e.value) and lab.password not in str(e.value)
