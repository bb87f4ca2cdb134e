"""The plan's names against what its hypervisors have (plan_names), as a
table: which names pass, and the one line for each that does not. The same
check on the lab, through `vmbackup backup`: tests/e2e/test_plan_names.py."""

from __future__ import annotations

import pytest
from vmbackup.errors import InvalidInputError
from vmbackup.plan import parse_plan
from vmbackup.plan_names import VsphereNames, check_names, unknown_names

VC = "https://vc.example.org/sdk"
NAMES = VsphereNames(
    hosts=frozenset({"esx1", "esx2"}),
    clusters=frozenset({"cluster1"}),
    datastores=frozenset({"ds1", "shared1"}),
    folders=frozenset({"vm", "prod", "vm/prod"}),
    attributes=frozenset({"backup"}),
)


def _plan(selection=None, agent=None, vcenter=True):
    data = {
        "hyperv": [
            {"name": "hv1", "url": "hv1", "user": "u", "password_env": "PW", "cluster": "hvc"},
        ],
        "repository": "/repo",
        "agents": [{"name": "a1", "transports": ["nbd"], **(agent or {})}],
        "selection": selection or {"vms": ["*"]},
    }
    if vcenter:
        data["connection"] = {"url": "vc.example.org", "user": "u", "password_env": "PW", "thumbprint": "ab" * 32}
    return parse_plan(data)


OK = [
    ({"hosts": ["esx1", "hv1", "HV1"]}, None, True),  # Hyper-V names ignore case in the selection
    ({"hosts": ["esx*", "nothing?"], "clusters": ["c*"], "folders": ["vm/*"]}, None, True),  # globs: not checked
    ({"clusters": ["cluster1"], "folders": ["prod", "vm/prod", "vm"]}, None, True),
    ({"tags": ["backup", "backup=gold"]}, None, True),  # a value no VM has yet is no mistake
    ({"vms": ["*"]}, {"hosts": ["esx1", "hv1"], "datastores": {"ds1": "/mnt/ds1"}}, True),
    ({"hosts": ["hv1"]}, {"hosts": ["hv1"]}, False),
]


@pytest.mark.parametrize("selection, agent, vcenter", OK)
def test_names_the_hypervisors_have_pass(selection, agent, vcenter):
    plan = _plan(selection, agent, vcenter)
    assert unknown_names(plan, NAMES if vcenter else None) == []
    check_names(plan, NAMES if vcenter else None)


BAD = [
    ({"hosts": ["ESX1"]}, None, True,
     f"selection.hosts: ESX1 is not a host of vCenter {VC} nor a Hyper-V host of the plan"),
    ({"hosts": ["hv2"]}, None, False, "selection.hosts: hv2 is not a Hyper-V host of the plan (the plan has no vCenter)"),
    ({"clusters": ["hvc"]}, None, True,
     f"selection.clusters: hvc is not a cluster of vCenter {VC} "
     "(a Hyper-V cluster selects no VM: name its hosts in selection.hosts)"),
    ({"folders": ["web"]}, None, True, f"selection.folders: web is not a VM folder of vCenter {VC}"),
    ({"folders": ["prod/web"]}, None, True, f"selection.folders: prod/web is not a VM folder of vCenter {VC}"),
    ({"tags": ["owner=me"]}, None, True, f"selection.tags: owner=me is not a custom attribute of vCenter {VC}"),
    ({"tags": ["backup"]}, None, False,
     "selection.tags: backup is not a custom attribute of any hypervisor of the plan "
     "(the plan has no vCenter; Hyper-V VMs are selected by vms and hosts)"),
    (None, {"hosts": ["esx1", "hv2"]}, True,
     f"agents[0].hosts: hv2 is not a host of vCenter {VC} nor a Hyper-V host of the plan"),
    (None, {"hosts": ["HV1"]}, True,
     f"agents[0].hosts: HV1 is not a host of vCenter {VC} nor a Hyper-V host of the plan "
     "(the plan's Hyper-V host is hv1: agents' hosts are compared exactly)"),
    (None, {"hosts": ["esx1"]}, False, "agents[0].hosts: esx1 is not a Hyper-V host of the plan (the plan has no vCenter)"),
    (None, {"datastores": {"ds9": "/mnt/ds9"}, "transports": ["direct"]}, True,
     f"agents[0].datastores: ds9 is not a datastore of vCenter {VC}"),
    ({"hosts": ["hv2"], "folders": ["web"]}, {"hosts": ["hv3"]}, True,
     f"selection.hosts: hv2 is not a host of vCenter {VC} nor a Hyper-V host of the plan (and 2 more mistakes)"),
]  # fmt: skip


@pytest.mark.parametrize("selection, agent, vcenter, message", BAD, ids=[m[:60] for *_, m in BAD])
def test_a_name_no_hypervisor_has_is_one_line(selection, agent, vcenter, message):
    plan = _plan(selection, agent, vcenter)
    with pytest.raises(InvalidInputError) as e:
        check_names(plan, NAMES if vcenter else None)
    assert str(e.value) == message
    assert "\n" not in message
