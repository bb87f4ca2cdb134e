"""`counters.api_calls`: the vSphere API requests (SOAP, and HTTP to /folder) the lab served."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

from pyVmomi import vim

from .labkit import find

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def _status_json(lab) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(FLOWS) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "vmbackup_lab", "status", "--state", str(lab.state), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout)


def test_api_calls_grow_by_exactly_the_calls_made(si, lab):
    vm = find(si, vim.VirtualMachine, "web01")
    before = _status_json(lab)["counters"]["api_calls"]
    assert isinstance(before, int) and before > 0
    # Asking the control endpoint is not a vSphere call: the count stands still.
    assert lab.counters()["api_calls"] == before
    for _ in range(7):  # each property read is one SOAP request
        vm.name  # noqa: B018
    assert lab.counters()["api_calls"] == before + 7
    # One PropertyCollector call reads many properties of many VMs: one request.
    pc = si.content.propertyCollector
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    spec = vim.PropertyFilterSpec(
        objectSet=[
            vim.ObjectSpec(
                obj=view,
                skip=True,
                selectSet=[vim.TraversalSpec(name="v", path="view", skip=False, type=vim.view.ContainerView)],
            )
        ],
        propSet=[vim.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "runtime.powerState"])],
    )
    mark = lab.counters()["api_calls"]
    res = pc.RetrievePropertiesEx([spec], vim.PropertyCollector.RetrieveOptions())
    assert len(res.objects) >= 9
    assert lab.counters()["api_calls"] == mark + 1
    view.Destroy()
    # Datastore access over HTTP counts too, one per request.
    host, port = lab.host.rsplit(":", 1)
    mark = lab.counters()["api_calls"]
    for _ in range(3):
        conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=lab.ca_file))
        conn.request(
            "GET",
            "/folder/web01/web01.vmdk?dcPath=dc1&dsName=esx1-local",
            headers={"Cookie": si._stub.cookie},
        )
        assert conn.getresponse().status == 200
        conn.close()
    assert lab.counters()["api_calls"] == mark + 3
