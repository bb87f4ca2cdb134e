"""The plan: every mistake is one line naming the field's path (no lab needed,
except for the plan `vmbackup lab up` writes)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

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
    (_set(["agents", 1, "transports", 0], "hotad"), "agents[1].transports[0]: 'hotad' is not one of hotadd, direct, nbd"),
    (_set(["connection"], KeyError), "connection: is required"),
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
     "agents[0].nbd_command: unknown placeholder {sock} (known: socket, pidfile, url, cookie, cookie_file, ca_file, "
     "path, vm, disk, snapshot)"),
    (_set(["nbd_command"], ["nbdkit", "file", "{path}"]),
     "nbd_command: must contain {socket}: the NBD server listens on that unix socket"),
    (_set(["limits"], {"per_agent": 0}), "limits.per_agent: input should be greater than or equal to 1"),
    (_set(["limits"], {"per_host": "four"}),
     "limits.per_host: input should be a valid integer, unable to parse string as an integer"),
    (_set(["quiesce"], "sometimes"), "quiesce: 'sometimes' is not one of required, preferred, off"),
    (_set(["transports"], ["nbd", "tape"]), "transports[1]: 'tape' is not one of hotadd, direct, nbd"),
    (_set(["selection"], {"exclude": ["x"]}),
     "selection: selects nothing: give vms, folders, clusters, hosts or tags (vms: ['*'] for all)"),
    (_set(["selection", "exclude_disks"], {"web01": ["disk0"]}),
     "selection.exclude_disks: web01: 'disk0' is not a disk name like scsi0:1"),
    (_set(["full_every_days"], 0), "full_every_days: input should be greater than or equal to 1"),
    (_set(["retention"], {"forever": 1}), "retention: 'forever' is not one of last, hourly, daily, weekly, monthly, yearly"),
    (_set(["repository"], KeyError), "repository: is required"),
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
