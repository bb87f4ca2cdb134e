"""The plan: every mistake is one line naming the field's path (no lab needed,
except for the plan `vmbackup lab up` writes)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from vmbackup.errors import InvalidInputError
from vmbackup.plan import load_plan, parse_plan, resolve_password


@pytest.fixture
def base(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return {
        "connection": {"url": "vc.example.com", "user": "backup", "password_env": "VC_PW", "ca_file": str(ca)},
        "repository": str(tmp_path / "repo"),
        "agents": [
            {"name": "a1", "vm": "agent1", "device_dir": "/dev/disk/by-id", "transports": ["hotadd", "nbd"]},
            {"name": "a2", "transports": ["direct"], "datastores": {"ds1": "/mnt/ds1"}},
        ],
        "selection": {"vms": ["web*"]},
    }


def _set(path, value):
    def mutate(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return mutate


CASES = [
    (_set(["agents", 1, "transports", 0], "hotad"), "agents[1].transports[0]: 'hotad' is not one of hotadd, direct, nbd, vddk"),
    (_set(["connection"], KeyError), "give connection (vCenter or ESXi) or hyperv (Hyper-V hosts), or both"),
    (_set(["connection", "password_secret"], "vc"), "connection: give exactly one of password_env and password_secret"),
    (_set(["connection", "ca_file"], KeyError),
     "connection: give ca_file or thumbprint: the server's certificate is always verified"),
    (_set(["connection", "thumbprint"], "12:34"),
     "connection.thumbprint: must be a SHA-256 fingerprint: 64 hex digits, with or without colons"),
    (_set(["connection", "url"], "http://vc/sdk"),
     "connection.url: 'http://vc/sdk' must use https (the server's certificate is always verified)"),
    (_set(["connection", "ca_file"], "/nonexistent/ca.pem"), "connection.ca_file: /nonexistent/ca.pem does not exist"),
    (_set(["agents", 0, "colour"], "red"), "agents[0].colour: is not a known field"),
    (_set(["agents"], []), "agents: list should have at least 1 item after validation, not 0"),
    (_set(["agents", 0, "vm"], KeyError),
     "agents[0]: hotadd needs vm (the agent VM) and device_dir (where attached disks appear)"),
    (_set(["agents", 1, "datastores"], {}), "agents[1]: direct needs datastores (datastore name -> local path)"),
    (_set(["agents", 1, "name"], "a1"), "agents[1].name: 'a1' is used by agents[0] too"),
    (_set(["agents", 0, "transports"], ["hotadd", "hotadd"]), "agents[0].transports: lists a transport twice"),
    (_set(["agents", 0, "nbd_command"], ["nbdkit", "{sock}"]),
     "agents[0].nbd_command: unknown placeholder {sock} (known: socket, pidfile, url, cookie, cookie_file, cookie_script, cookie_renew, ca_file, "
     "path, vm, disk, snapshot)"),
    (_set(["nbd_command"], ["nbdkit", "file", "{path}"]),
     "nbd_command: must contain {socket}: the NBD server listens on that unix socket"),
    (_set(["limits"], {"per_agent": 0}), "limits.per_agent: input should be greater than or equal to 1"),
    (_set(["limits"], {"per_host": "four"}),
     "limits.per_host: input should be a valid integer, unable to parse string as an integer"),
    (_set(["quiesce"], "sometimes"), "quiesce: 'sometimes' is not one of required, preferred, off"),
    (_set(["transports"], ["nbd", "tape"]), "transports[1]: 'tape' is not one of hotadd, direct, nbd, vddk"),
    (_set(["selection"], {"exclude": ["x"]}),
     "selection: selects nothing: give vms, folders, clusters, hosts or tags (vms: ['*'] for all)"),
    (_set(["selection", "exclude_disks"], {"web01": ["disk0"]}),
     "selection.exclude_disks: web01: 'disk0' is not a disk name like scsi0:1"),
    (_set(["full_every_days"], 0), "full_every_days: input should be greater than or equal to 1"),
    (_set(["retention"], {"forever": 1}), "retention: 'forever' is not one of last, hourly, daily, weekly, monthly, yearly"),
    (_set(["repository"], KeyError), "repository: is required"),
    # Hyper-V hosts and the agents that read their shadow copies
    (_set(["hyperv"], [{"name": "hv1", "url": "hv1", "user": "u"}]),
     "hyperv[0]: give exactly one of password_env and password_secret"),
    (_set(["hyperv"], [{"name": "hv1", "url": "http://hv1:5985/wsman", "user": "u", "password_env": "P", "auth": "basic"}]),
     "hyperv[0]: basic over http would send the password in clear: use https"),
    (_set(["hyperv"], [{"name": "hv1", "url": "hv1", "user": "u", "password_env": "P", "auth": "digest"}]),
     "hyperv[0].auth: 'digest' is not one of ntlm, basic, kerberos, credssp"),
    (_set(["hyperv"], [{"name": "hv 1", "url": "hv1", "user": "u", "password_env": "P"}]),
     "hyperv[0].name: 'hv 1' is not a computer name (letters, digits, '-' and '.')"),
    (_set(["hyperv"], [{"name": "hv1", "url": "ftp://hv1", "user": "u", "password_env": "P"}]),
     "hyperv[0].url: 'ftp://hv1' must be https://host:5986/wsman (or http:// with a sealing auth)"),
    (_set(["hyperv"], [{"name": "hv1", "url": "hv1", "user": "u", "password_env": "P"},
                       {"name": "HV1", "url": "hv2", "user": "u", "password_env": "P"}]),
     "hyperv[1].name: 'HV1' is used by hyperv[0] too"),
    (_set(["hyperv"], [{"name": "hv1", "url": "hv1", "user": "u", "password_env": "P", "ca_file": "/nonexistent.pem"}]),
     "hyperv[0].ca_file: /nonexistent.pem does not exist"),
    (_set(["agents", 1, "windows_paths"], {"\\\\HV1\\": "/mnt/hv1"}),
     "agents[1]: windows_paths with a share (\\\\HOST\\) needs share_account (the account shares grant read to)"),
    (_set(["agents", 1, "windows_paths"], {"Hyper-V": "/mnt/hv1"}),
     "agents[1].windows_paths: 'Hyper-V' is neither a host's share prefix (\\\\HOST\\) nor a drive (D:\\)"),
    (_set(["agents", 1, "windows_paths"], {"D:\\": "/"}),
     "agents[1]: windows_paths with drives means the agent runs on a Hyper-V host: hosts must name that one host"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,message", CASES, ids=[m for _, m in CASES])
def test_each_mistake_is_one_line_with_the_field_path(base, mutate, message):
    data = copy.deepcopy(base)
    mutate(data)
    with pytest.raises(InvalidInputError) as e:
        parse_plan(data)
    assert str(e.value) == message
    assert e.value.exit_code == 2


def test_the_base_plan_is_valid_and_defaults_are_the_documented_ones(base):
    p = parse_plan(base)
    assert p.connection.url == "https://vc.example.com/sdk" and p.connection.port == 443
    assert (p.limits.per_agent, p.limits.per_host, p.limits.per_datastore, p.limits.disks_per_vm) == (5, 4, 4, 2)
    assert p.quiesce == "preferred" and p.transports == ["hotadd", "direct", "nbd"]
    assert "{socket}" in p.nbd_command and p.full_every_days is None
    thumb = ":".join(["AB"] * 32)
    p = parse_plan({**base, "connection": {**base["connection"], "thumbprint": thumb, "ca_file": None}})
    assert p.connection.thumbprint == "ab" * 32


def test_a_hyperv_only_plan_and_how_agents_reach_hosts(tmp_path):
    """No vCenter: Hyper-V hosts only. An agent without transports does what its fields allow."""
    ca = tmp_path / "hv-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "plan.yaml").write_text(
        yaml.safe_dump(
            {
                "repository": "repo",
                "hyperv": [
                    {
                        "name": "hv1",
                        "url": "hv1.corp",
                        "user": "CORP\\backup",
                        "password_env": "HV_PW",
                        "ca_file": "hv-ca.pem",
                    },
                    {"name": "hv2", "url": "http://hv2:5985/wsman", "user": "b", "password_secret": "hv2-pw"},
                ],
                "agents": [
                    {"name": "remote", "windows_paths": {"\\\\hv1": "shares/hv1"}, "share_account": "CORP\\vmbk"},
                    {"name": "onhost", "hosts": ["hv2"], "windows_paths": {"c:/": "/mnt/c", "D:": "/mnt/d"}},
                ],
                "selection": {"vms": ["*"], "exclude_disks": {"legacy01": ["ide0:1"]}},
            }
        )
    )
    p = load_plan(tmp_path / "plan.yaml")
    assert p.connection is None and [h.name for h in p.hyperv] == ["hv1", "hv2"]
    hv1 = p.hyperv_host("HV1")
    assert hv1.url == "https://hv1.corp:5986/wsman" and hv1.auth == "ntlm" and hv1.ca_file == ca
    assert p.hyperv_host("hv2").host == "hv2"
    with pytest.raises(InvalidInputError, match="Hyper-V host 'hv3' is not in the plan"):
        p.hyperv_host("hv3")
    remote, onhost = p.agents
    assert remote.transports == ["nbd"] and remote.windows_paths == {"\\\\HV1\\": tmp_path / "shares/hv1"}
    assert remote.reaches_hyperv("hv1") and not remote.reaches_hyperv("hv2")
    assert onhost.reaches_hyperv("hv2") and not onhost.reaches_hyperv("hv1")
    share = "\\\\HV1\\vmbk-r1-0$\\Hyper-V\\win01\\Virtual Hard Disks\\win01.vhdx"
    assert (
        remote.map_windows_path(share) == tmp_path / "shares/hv1/vmbk-r1-0$/Hyper-V/win01/Virtual Hard Disks/win01.vhdx"
    )
    assert remote.map_windows_path("\\\\hv2\\x$\\a.vhdx") is None and remote.map_windows_path("C:\\a") is None
    mount = "C:\\ProgramData\\vmbackup\\runs\\r1\\mnt\\0\\win01.vhdx"
    assert onhost.map_windows_path(mount) == Path("/mnt/c/ProgramData/vmbackup/runs/r1/mnt/0/win01.vhdx")
    assert onhost.map_windows_path("e:\\x") is None
    monkey = pytest.MonkeyPatch()
    monkey.setenv("HV_PW", "s3cret")
    try:
        assert resolve_password(hv1).get_secret_value() == "s3cret"
        monkey.delenv("HV_PW")
        with pytest.raises(InvalidInputError, match=r"^hyperv\[hv1\]\.password_env: the environment variable HV_PW"):
            resolve_password(hv1)
    finally:
        monkey.undo()


def test_several_mistakes_say_how_many_more(base):
    data = copy.deepcopy(base)
    data["quiesce"] = "no"
    data["limits"] = {"per_host": 0}
    with pytest.raises(InvalidInputError, match=r"\(and 1 more mistake\)$"):
        parse_plan(data)


def test_files(tmp_path, base):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_plan(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("connection:\n  url: [unclosed\n")
    with pytest.raises(InvalidInputError) as e:
        load_plan(bad)
    assert str(e.value).startswith(f"plan {bad}: line ") and "\n" not in str(e.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        load_plan(listy)
    # Relative paths are relative to the plan file.
    rel = tmp_path / "sub" / "plan.yaml"
    rel.parent.mkdir()
    data = copy.deepcopy(base)
    data["repository"] = "repo"
    data["connection"]["ca_file"] = "../ca.pem"
    rel.write_text(yaml.safe_dump(data))
    p = load_plan(rel)
    assert p.repository == rel.parent / "repo" and p.connection.ca_file.resolve() == (tmp_path / "ca.pem")


def test_password_from_the_environment(base, monkeypatch):
    p = parse_plan(base)
    monkeypatch.delenv("VC_PW", raising=False)
    with pytest.raises(InvalidInputError, match="connection.password_env: the environment variable VC_PW is not set"):
        resolve_password(p.connection)
    monkeypatch.setenv("VC_PW", "s3cret")
    secret = resolve_password(p.connection)
    assert secret.get_secret_value() == "s3cret" and "s3cret" not in repr(secret)


def test_importing_vmbackup_loads_neither_pydantic_nor_pyvmomi():
    code = "import sys, vmbackup, vmbackup.cli; print(sorted(m for m in ('pydantic', 'pyVmomi', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_lab_up_returns_the_lab_plan(vlab):
    out = subprocess.run(
        [sys.executable, "-m", "vmbackup", "lab", "up", "--state", str(vlab.state), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    plan = load_plan(json.loads(out)["plan"])
    assert plan.connection.password_env == "VMBACKUP_VSPHERE_PASSWORD"
    assert plan.connection.ca_file == vlab.state / "ca.pem"
    assert sorted(a.name for a in plan.agents) == sorted(vlab.agents)
    for a in plan.agents:
        assert a.vm == a.name and a.device_dir == vlab.state / "agents" / a.name / "devices" and len(a.hosts) == 1
        assert {k: str(v) for k, v in a.datastores.items()} == vlab.info["datastores"]
    assert (vlab.state / "vsphere-password").read_text().strip() == vlab.password
    assert (vlab.state / "vsphere-password").stat().st_mode & 0o077 == 0
    assert vlab.password not in (vlab.state / "plan.yaml").read_text()
