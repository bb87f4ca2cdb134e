"""The names a plan gives (hosts, clusters, folders, datastores, tags),
checked against what its hypervisors have (docs/plan.md, "Names the
hypervisors must have").

A name that none of the plan's hypervisors has selects nothing, silently:
``selection: {hosts: [hv2]}`` would back up nothing and report success, an
agent's ``hosts: [esx1, hv2]`` would never take hv2's VMs. So such a name is
a mistake in the plan: one ``InvalidInputError`` line naming the field and
the name (exit 2), found when the run has connected to vCenter and before
any VM is touched. Hyper-V hosts' names are in the plan itself.

Patterns (``*``, ``?``, ``[``) in ``selection.hosts``, ``clusters`` and
``folders`` are not checked: a glob that matches nothing is no mistake, as
in ``selection.vms``. Plain Python: no Prefect, no pyVmomi (the vSphere
adapter reads the names: ``vsphere.inventory.inventory_names``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError

_GLOB = set("*?[")


@dataclass(frozen=True)
class VsphereNames:
    """What one vCenter (or ESXi host) has, by name."""

    hosts: frozenset[str] = field(default_factory=frozenset)  # ESXi hosts
    clusters: frozenset[str] = field(default_factory=frozenset)
    datastores: frozenset[str] = field(default_factory=frozenset)
    folders: frozenset[str] = field(default_factory=frozenset)  # VM folders: names and paths ("prod", "vm/prod")
    attributes: frozenset[str] = field(default_factory=frozenset)  # custom attributes that VMs can carry


def _plain(names: Iterable[str]) -> list[str]:
    return [n for n in names if not _GLOB & set(n)]


def unknown_names(plan: Any, vsphere: VsphereNames | None) -> list[str]:
    """Every name of ``plan`` that none of its hypervisors has, one line each,
    in the plan's order (selection first, then the agents).

    Args:
        plan: the plan (``vmbackup.plan.Plan``).
        vsphere: what the plan's vCenter has, or None when the plan has no
            ``connection``. (A vCenter that could not be reached is not
            checked at all: the caller does not call this.)
    """
    vc = f"vCenter {plan.connection.url}" if plan.connection is not None and vsphere is not None else None
    hv_names = {h.name for h in plan.hyperv}
    hv_folded = {h.name.casefold(): h.name for h in plan.hyperv}
    hv_clusters = {h.cluster.casefold() for h in plan.hyperv if h.cluster}
    vs = vsphere or VsphereNames()
    out: list[str] = []

    def not_a_host(where: str, name: str, hint: str = "") -> None:
        if vc is None:
            what = "a Hyper-V host of the plan (the plan has no vCenter)" if hv_names else "a host of the plan"
        else:
            what = f"a host of {vc} nor a Hyper-V host of the plan" if hv_names else f"a host of {vc}"
        out.append(f"{where}: {name} is not {what}{hint}")

    def vsphere_only(where: str, name: str, kind: str, hint: str = "") -> None:
        if vc is None:
            out.append(
                f"{where}: {name} is not {kind} of any hypervisor of the plan "
                f"(the plan has no vCenter; Hyper-V VMs are selected by vms and hosts){hint}"
            )
        else:
            out.append(f"{where}: {name} is not {kind} of {vc}{hint}")

    sel = plan.selection
    # selection.hosts: ESXi names as vSphere compares them (exactly), Hyper-V
    # hosts' names as Windows does (ignoring case).
    for name in _plain(sel.hosts):
        if name not in vs.hosts and name.casefold() not in hv_folded:
            not_a_host("selection.hosts", name)
    for name in _plain(sel.clusters):
        if name not in vs.clusters:
            hint = (
                " (a Hyper-V cluster selects no VM: name its hosts in selection.hosts)"
                if name.casefold() in hv_clusters
                else ""
            )
            vsphere_only("selection.clusters", name, "a cluster", hint)
    for name in _plain(sel.folders):
        if name not in vs.folders:
            vsphere_only("selection.folders", name, "a VM folder")
    for tag in sel.tags:
        if tag.split("=", 1)[0] not in vs.attributes:
            vsphere_only("selection.tags", tag, "a custom attribute")

    for i, agent in enumerate(plan.agents):
        # An agent's hosts are compared exactly (planning.reaches, Agent.reaches_hyperv).
        for name in agent.hosts:
            if name in vs.hosts or name in hv_names:
                continue
            same = hv_folded.get(name.casefold())
            hint = f" (the plan's Hyper-V host is {same}: agents' hosts are compared exactly)" if same else ""
            not_a_host(f"agents[{i}].hosts", name, hint)
        for ds in agent.datastores:
            if ds not in vs.datastores:
                vsphere_only(f"agents[{i}].datastores", ds, "a datastore")
    return out


def check_names(plan: Any, vsphere: VsphereNames | None) -> None:
    """Raises ``InvalidInputError`` (exit 2) with the first unknown name, one
    line (``(and N more mistakes)`` when there are more)."""
    bad = unknown_names(plan, vsphere)
    if bad:
        more = len(bad) - 1
        suffix = f" (and {more} more mistake{'s' if more > 1 else ''})" if more else ""
        raise InvalidInputError(bad[0] + suffix)
