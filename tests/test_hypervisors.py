"""Both adapters implement the one protocol (hypervisors/base.py): every
verb of ``Hypervisor`` and every step of ``VmSteps``, with the protocol's
parameter names (the procedure calls them by keyword where it matters)."""

from __future__ import annotations

import inspect

import pytest
from vmbackup.hyperv.hypervisor import HyperV
from vmbackup.hyperv.procedure import HypervSteps
from vmbackup.hypervisors import base
from vmbackup.vsphere.hypervisor import VSphere
from vmbackup.vsphere.procedure import VSphereSteps


def _verbs(proto):
    return {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}


@pytest.mark.parametrize(("impl", "proto"), [(VSphereSteps, base.VmSteps), (HypervSteps, base.VmSteps),
                                             (VSphere, base.Hypervisor), (HyperV, base.Hypervisor)])  # fmt: skip
def test_each_adapter_implements_every_verb_with_the_protocols_parameters(impl, proto):
    verbs = _verbs(proto)
    assert verbs, proto
    for name in verbs:
        mine, theirs = inspect.signature(getattr(impl, name)), inspect.signature(getattr(proto, name))
        assert list(mine.parameters)[: len(theirs.parameters)] == list(theirs.parameters), (impl, name)


def test_the_verbs_are_the_issues():
    assert _verbs(base.Hypervisor) == {"connect", "close", "select", "limit_keys", "steps", "sweep"}
    assert _verbs(base.VmSteps) == {
        "reconcile", "describe", "freeze", "expose", "plan_reads", "still_frozen", "point", "committed", "release"
    }  # fmt: skip
    assert base.POWERED_OFF == "powered-off" and base.POWERED_OFF in base.CONSISTENCIES
