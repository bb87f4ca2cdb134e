"""The `vmbackup lab` command line, on an ESXi-only lab of its own."""

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect

from .labkit import pattern

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def run(*args, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(FLOWS) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "vmbackup_lab", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def esxi_lab(tmp_path_factory):
    state = tmp_path_factory.mktemp("esxi")
    proc = run("up", "--state", str(state), "--topology", str(Path(__file__).with_name("esxi.json")), "--json")
    yield state, json.loads(proc.stdout)
    run("down", "--state", str(state))


def test_up_prints_connection_json_and_is_idempotent(esxi_lab):
    state, info = esxi_lab
    assert set(info["vsphere"]) >= {"url", "user", "password", "ca_file"}
    assert info["agents"] == ["vmbackup-agent-esx9"] and info["mode"] == "esxi"
    again = json.loads(run("up", "--state", str(state), "--json").stdout)
    assert again["pid"] == info["pid"]
    host, port = info["vsphere"]["url"].split("/")[2].rsplit(":", 1)
    si = SmartConnect(
        host=host,
        port=int(port),
        user=info["vsphere"]["user"],
        pwd=info["vsphere"]["password"],
        sslContext=ssl.create_default_context(cafile=info["vsphere"]["ca_file"]),
    )
    try:
        assert si.content.about.apiType == "HostAgent"
    finally:
        Disconnect(si)


def test_status_write_and_disk_image(esxi_lab, tmp_path):
    state, _ = esxi_lab
    status = json.loads(run("status", "--state", str(state), "--json").stdout)
    solo = next(vm for vm in status["vms"] if vm["name"] == "solo01")
    assert [d["name"] for d in solo["disks"]] == ["scsi0:0", "nvme0:0"] and solo["host"] == "esx9"
    key = str(solo["disks"][1]["key"])
    res = json.loads(
        run(
            "write",
            "--state",
            str(state),
            "--vm",
            "solo01",
            "--disk",
            key,
            "--offset",
            "12345",
            "--length",
            "1000",
            "--seed",
            "9",
            "--json",
        ).stdout
    )
    assert res["disk"] == "nvme0:0"
    out = tmp_path / "nvme.img"
    run("disk-image", "--state", str(state), "--vm", "solo01", "--disk", "nvme0:0", str(out))
    data = out.read_bytes()
    assert len(data) == 16 << 20 and data[12345:13345] == pattern(9, 12345, 1000)


@pytest.mark.parametrize(
    "args",
    [
        ["write", "--vm", "nosuchvm", "--disk", "scsi0:0", "--offset", "0", "--length", "1"],
        ["write", "--vm", "solo01", "--disk", "sata3:3", "--offset", "0", "--length", "1"],
        ["write", "--vm", "solo01", "--disk", "scsi0:0", "--offset", str(16 << 20), "--length", "1"],
        ["disk-image", "--vm", "solo01", "--disk", "scsi0:0", "--snapshot", "nosuch", "/tmp/never.img"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(esxi_lab, args):
    state, info = esxi_lab
    proc = run(*args[:1], "--state", str(state), *args[1:], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert info["vsphere"]["password"] not in proc.stderr


def test_state_dir_without_a_lab_is_exit_2(tmp_path):
    proc = run("status", "--state", str(tmp_path), "--json", check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "no lab is running" in proc.stderr


def test_down_stops_the_lab(tmp_path):
    topo = Path(__file__).with_name("esxi.json")
    info = json.loads(run("up", "--state", str(tmp_path), "--topology", str(topo), "--json").stdout)
    assert Path(f"/proc/{info['pid']}").exists()
    assert json.loads(run("down", "--state", str(tmp_path), "--json").stdout) == {"stopped": True}
    assert run("status", "--state", str(tmp_path), check=False).returncode == 2
    assert json.loads(run("down", "--state", str(tmp_path), "--json").stdout) == {"stopped": False}
