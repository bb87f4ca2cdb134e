"""Topology, TLS with the lab's CA, disk files with real contents, datastore access."""

import http.client
import os
import ssl

import pytest
from pyVim.connect import SmartConnect
from pyVmomi import vim

from .labkit import datastore_file, disks, find, flat_file, wait


def test_topology_has_cluster_hosts_datastores_vms_and_agents(si, lab):
    cluster = find(si, vim.ClusterComputeResource, "cluster1")
    assert sorted(h.name for h in cluster.host) == ["esx1", "esx2"]
    shared = find(si, vim.Datastore, "shared1")
    assert sorted(m.key.name for m in shared.host) == ["esx1", "esx2"]
    for h in ("esx1", "esx2"):
        local = find(si, vim.Datastore, f"{h}-local")
        assert [m.key.name for m in local.host] == [h]
        agent = find(si, vim.VirtualMachine, f"vmbackup-agent-{h}")
        assert agent.runtime.host.name == h
        assert agent.runtime.powerState == "poweredOn"
        # Two standard port groups on vSwitch0 (the topology's default port_groups):
        # one network each in vCenter, on every host.
        host = find(si, vim.HostSystem, h)
        assert [n.name for n in host.network] == ["VM Network", "Isolated"]
        [switch] = host.configManager.networkSystem.networkInfo.vswitch
        assert (switch.name, list(switch.portgroup)) == ("vSwitch0", ["VM Network", "Isolated"])
        pgs = host.configManager.networkSystem.networkInfo.portgroup
        assert [(p.spec.name, p.spec.vswitchName) for p in pgs][-1] == ("Isolated", "vSwitch0")
    isolated = find(si, vim.Network, "Isolated")
    assert sorted(h.name for h in isolated.host) == ["esx1", "esx2"]
    assert sorted(n.name for n in cluster.network) == ["Isolated", "VM Network"]
    assert sorted(n.name for n in cluster.parent.parent.network) == ["Isolated", "VM Network"]  # the datacenter's
    assert lab.agents == ["vmbackup-agent-esx1", "vmbackup-agent-esx2"]
    buses = {}
    for name in ("web01", "db01", "app01"):
        vm = find(si, vim.VirtualMachine, name)
        for d in disks(vm):
            ctrl = next(c for c in vm.config.hardware.device if c.key == d.controllerKey)
            buses[type(ctrl).__name__] = name
    assert set(buses) == {
        "vim.vm.device.ParaVirtualSCSIController",
        "vim.vm.device.VirtualAHCIController",
        "vim.vm.device.VirtualNVMEController",
    }


def test_tls_is_verified_with_the_lab_ca(lab):
    host, port = lab.host.rsplit(":", 1)
    with pytest.raises(ssl.SSLError):
        SmartConnect(
            host=host, port=int(port), user=lab.user, pwd=lab.password, sslContext=ssl.create_default_context()
        )
    si = SmartConnect(
        host=host,
        port=int(port),
        user=lab.user,
        pwd=lab.password,
        sslContext=ssl.create_default_context(cafile=lab.ca_file),
    )
    assert si.content.about.apiType == "VirtualCenter"


def test_wrong_password_is_refused_without_echoing_it(lab):
    host, port = lab.host.rsplit(":", 1)
    with pytest.raises(vim.fault.InvalidLogin) as err:
        SmartConnect(
            host=host,
            port=int(port),
            user=lab.user,
            pwd="not-the-password",
            sslContext=ssl.create_default_context(cafile=lab.ca_file),
        )
    assert "not-the-password" not in str(err.value)


def test_disks_are_descriptor_plus_sparse_flat_with_os_like_content(si, lab):
    vm = find(si, vim.VirtualMachine, "web01")
    d = disks(vm)[0]
    desc = datastore_file(lab, d.backing.fileName).read_text()
    assert 'createType="vmfs"' in desc and d.backing.uuid.replace("-", "")[:2] in desc.replace(" ", "")
    flat = flat_file(lab, d.backing.fileName)
    st = os.stat(flat)
    assert st.st_size == d.capacityInBytes == 64 << 20
    assert 0 < st.st_blocks * 512 < st.st_size  # sparse, but with data
    data = flat.read_bytes()
    assert data[510:512] == b"\x55\xaa" and data[446 + 4] == 0x83  # MBR, one Linux partition
    assert data[1 << 20 : (1 << 20) + 6] == b"LABFS1"
    other = flat_file(lab, disks(find(si, vim.VirtualMachine, "db01"))[0].backing.fileName).read_bytes()
    assert other[:512] != data[:512]  # every disk has its own content


def test_datastore_browser_and_folder_range(si, lab):
    ds = find(si, vim.Datastore, "esx1-local")
    spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*.vmdk"])
    result = wait(ds.browser.SearchDatastoreSubFolders_Task(datastorePath="[esx1-local] web01", searchSpec=spec))
    names = {f.path for r in result for f in r.file}
    assert {"web01.vmdk", "web01-flat.vmdk"} <= names
    host, port = lab.host.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=lab.ca_file))
    conn.request(
        "GET",
        "/folder/web01/web01-flat.vmdk?dcPath=dc1&dsName=esx1-local",
        headers={"Range": "bytes=446-511", "Cookie": si._stub.cookie},
    )
    res = conn.getresponse()
    body = res.read()
    assert res.status == 206 and len(body) == 66 and body[-2:] == b"\x55\xaa"
