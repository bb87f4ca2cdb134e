"""What backup_vms decides before any task runs (plain Python, no Prefect
server): plain VM names shared by two hypervisors' selections, two selected
VMs with one name, which agent reaches a Hyper-V VM, the limits a Hyper-V VM
holds."""

from __future__ import annotations

import dataclasses
import fnmatch
from types import SimpleNamespace

import pytest
import yaml
from vmbackup import planning
from vmbackup.orchestration import backup, limits
from vmbackup.plan import Selection, load_plan


def test_plain_names_become_exact_patterns():
    per_adapter, plain = backup._per_adapter(Selection(vms=["web01", "db*", "x.y-1", "-"]))
    assert plain == ["web01", "x.y-1", "-"]
    assert per_adapter.vms[1] == "db*"
    names = ["web01", "web011", "wEb01", "xweb01", "x.y-1", "xxy-1", "db7", "-"]
    for name, pattern in zip(["web01", "x.y-1"], [per_adapter.vms[0], per_adapter.vms[2]], strict=True):
        assert set(pattern) & set("*?[")  # the adapter does not raise "does not exist" for it
        assert [n for n in names if fnmatch.fnmatchcase(n, pattern)] == [name]


def _target(name, hypervisor, host, storage=("d1",)):
    return backup.Target(name, hypervisor, host, list(storage), 1 << 20, None)


def test_two_vms_with_one_name_are_both_kept_each_with_a_key_that_says_where():
    found = backup.Selected(
        targets=[
            _target("web01", "vsphere", "esx1"),
            _target("web01", "hyperv", "hv1", ("hv1:D",)),
            _target("db01", "vsphere", "esx2"),
            _target("app", "hyperv", "hv1", ("hv1:D",)),
            _target("app", "hyperv", "hv2", ("hv2:E",)),
        ]
    )
    found.targets[3].vm = SimpleNamespace(id="GUID-A")
    backup._key_duplicates(found)
    assert found.failed == []
    assert [t.key for t in found.targets] == [
        "web01 (esx1, vsphere)",
        "web01 (hv1, hyperv)",
        "db01",
        "app (hv1, GUID-A)",
        "app (hv2, hyperv)",
    ]
    assert [t.name for t in found.targets] == ["web01", "web01", "db01", "app", "app"]
    # Agents are planned by key: both VMs named app get an agent of their own host.
    agents = [SimpleNamespace(name=n, hosts=[h], reaches_hyperv=lambda h2, h=h: h2 == h) for n, h in
              [("a1", "esx1"), ("a2", "esx2"), ("h1", "hv1"), ("h2", "hv2")]]  # fmt: skip
    agent_plan, chosen = backup.plan_agents(found.targets, agents)
    assert agent_plan.assigned["app (hv1, GUID-A)"] == "h1" and agent_plan.assigned["app (hv2, hyperv)"] == "h2"
    assert sorted(t.key for t in chosen) == sorted(t.key for t in found.targets)


@pytest.fixture
def plan(tmp_path):
    data = {
        "connection": {"url": "vc.example.org", "user": "u", "password_env": "PW", "thumbprint": "ab" * 32},
        "hyperv": [
            {"name": "hv1", "url": "https://hv1:5986/wsman", "user": "u", "password_env": "HVPW"},
            {"name": "hv2", "url": "https://hv2:5986/wsman", "user": "u", "password_env": "HVPW"},
        ],
        "repository": str(tmp_path / "repo"),
        "agents": [
            {"name": "esx-agent", "transports": ["nbd"], "hosts": ["esx1"]},
            {
                "name": "hv-agent",
                "transports": ["nbd"],
                "hosts": ["hv1"],
                "windows_paths": {"\\\\HV1\\": str(tmp_path / "hv1")},
                "share_account": "HV1\\vmbackup-agent",
            },
        ],
        "selection": {"vms": ["*"]},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_plan(path)


def test_a_hyperv_vm_goes_to_an_agent_that_reaches_its_host(plan):
    vms = [
        _target("web01", "vsphere", "esx1"),
        _target("win01", "hyperv", "hv1", ("hv1:D",)),
        _target("win02", "hyperv", "hv2", ("hv2:D",)),
    ]
    got = planning.assign_agents(vms, plan.agents, reach=backup.agent_reaches, unreachable=backup.unreachable_reason)
    assert got.assigned == {"web01": "esx-agent", "win01": "hv-agent"}
    assert list(got.unassignable) == ["win02"]
    assert got.unassignable["win02"].startswith("no agent reaches Hyper-V host hv2")


def test_with_secret_names_the_blocks_of_every_host(plan):
    p = backup.with_secret(plan, "vs-secret", "hv-secret")
    assert p.connection.password_secret == "vs-secret" and p.connection.password_env is None
    assert [(h.password_secret, h.password_env) for h in p.hyperv] == [("hv-secret", None)] * 2
    assert backup.with_secret(plan, None, None) is plan


def test_a_hyperv_vm_holds_its_agent_host_and_volume_limits():
    names = limits.vm_limit_names("hv-agent", "hv1", (), volumes=["hv1:D", "cluster1:Volume1"])
    assert names == [
        "vmbackup-agent-hv-agent",
        "vmbackup-host-hv1",
        "vmbackup-volume-cluster1:Volume1",
        "vmbackup-volume-hv1:D",
    ]
    values = limits.limit_values(
        ["a"], ["esx1", "hv1"], ["ds1"], per_agent=5, per_host=4, per_datastore=2, volumes=["hv1:D"]
    )
    assert values == {
        "vmbackup-agent-a": 5,
        "vmbackup-host-esx1": 4,
        "vmbackup-host-hv1": 4,
        "vmbackup-datastore-ds1": 2,
        "vmbackup-volume-hv1:D": 2,
    }


def test_a_site_hands_each_agent_its_vms_by_identity_and_each_backs_up_only_its_own(plan):
    """Two VMs named web01 on esx1 and esx2, both hosts reached by both
    agents: the planning run gives one to each agent; each agent's run
    selects by name (finds both) and keeps only the one it was given."""
    esx = [_target("web01", "vsphere", h) for h in ("esx1", "esx2")]
    for t, moref in zip(esx, ("vm-41", "vm-42"), strict=True):
        t.vm = SimpleNamespace(moref=moref)
    hv = _target("web01", "hyperv", "hv1", ("hv1:D",))
    hv.vm = SimpleNamespace(id="GUID-W")
    db = _target("db01", "vsphere", "esx1")
    db.vm = SimpleNamespace(moref="vm-7")

    def selected():  # what select() finds by name in every run: every VM of the name
        found = backup.Selected(targets=[dataclasses.replace(t) for t in (*esx, hv, db)])
        backup._key_duplicates(found)
        return found

    agents = [
        SimpleNamespace(name=n, hosts=["esx1", "esx2"], reaches_hyperv=lambda h: h == "hv1") for n in ("a1", "a2")
    ]
    agent_plan, chosen = backup.plan_agents(selected().targets, agents)
    given = backup.split_by_agent(agent_plan, chosen)
    assert sorted(i for ids in given.values() for i in ids) == sorted(
        ["vsphere:vm-41", "vsphere:vm-42", "hyperv:hv1:GUID-W", "vsphere:vm-7"]
    )
    # Both agents got VMs, and the two vSphere web01s went to different agents.
    assert set(given) == {"a1", "a2"}
    owner = {i: a for a, ids in given.items() for i in ids}
    assert owner["vsphere:vm-41"] != owner["vsphere:vm-42"]
    assert all(n == ("db01" if i == "vsphere:vm-7" else "web01") for ids in given.values() for i, n in ids.items())

    backed_up = []
    for agent, ids in given.items():
        mine = backup.only_identities(plan, selected(), ids)
        assert mine.failed == []
        agent_plan, run = backup.plan_agents(mine.targets, [a for a in agents if a.name == agent])
        assert agent_plan.unassignable == {}
        assert sorted(t.identity for t in run) == sorted(ids)
        backed_up += [t.identity for t in run]
    # Every VM exactly once over the site.
    assert sorted(backed_up) == sorted(owner)

    # Without identities (a run of its own) nothing is filtered.
    assert len(backup.only_identities(plan, selected(), None).targets) == 4
    # A VM planned for the agent that is gone by the time its run selects: a failed row says so.
    gone = backup.only_identities(plan, selected(), {"vsphere:vm-99": "web01", "hyperv:hv1:GUID-W": "web01"})
    assert [t.identity for t in gone.targets] == ["hyperv:hv1:GUID-W"]
    [row] = gone.failed
    assert row["vm"] == "web01" and row["status"] == "failed" and "vsphere:vm-99" in row["error"]
    assert row["hypervisor"] == "vsphere"
