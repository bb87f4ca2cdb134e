"""vSphere as a ``hypervisors.base.Hypervisor``: a vCenter (or ESXi) of a plan.

Thin: each verb is the adapter's own module (``client``, ``inventory``,
``procedure.VSphereSteps``, ``sweep``); this class is what the orchestration
holds per hypervisor. No Prefect.
"""

from __future__ import annotations

from typing import Any

from ..hypervisors import base
from ..plan import Agent, Plan


def vm_datastores(vm: Any) -> list[str]:
    """Every datastore a vSphere VM has disks (or its configuration) on."""
    names = set(getattr(vm, "datastores", ()) or ())
    names |= {d.datastore for d in getattr(vm, "disks", ()) or () if getattr(d, "datastore", None)}
    return sorted(names)


#: the hypervisors whose points a vCenter restores (another's as a new VM: vsphere/crossrestore.py)
RESTORES_FROM = ("vsphere", "hyperv")


class VSphere:
    """The plan's vCenter (``plan.connection``)."""

    kind = "vsphere"
    restores_from = RESTORES_FROM

    def __init__(self, plan: Plan, password: Any) -> None:
        assert plan.connection is not None
        self.plan, self.password = plan, password
        self.label = f"vCenter {plan.connection.host}"
        self.client: Any = None

    def connect(self) -> None:
        from .client import VSphereClient

        self.client = VSphereClient.connect(self.plan.connection, self.password)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def select(self, selection: Any) -> list[Any]:
        from .inventory import select_vms

        return select_vms(self.client, selection)

    @staticmethod
    def limit_keys(vm: Any) -> list[tuple[str, str]]:
        return [("host", vm.host)] + [("datastore", d) for d in vm_datastores(vm)]

    def steps(self, vm: Any, plan: Plan, agent: Agent, *, run_id: str, **hooks: Any) -> base.VmSteps:
        from .procedure import VSphereSteps

        return VSphereSteps(self.client, vm, plan, agent, run_id=run_id)

    # -- restore (vsphere/restore.py) --

    @staticmethod
    def describe_point(config: Any, attributes: dict[str, Any]) -> base.VmDescription:
        from .restore import describe_point

        return describe_point(config, attributes)

    def restore_steps(self, request: base.RestoreRequest, plan: Plan, agent: Agent, *, run_id: str) -> Any:
        from .restore import VSphereRestoreSteps

        return VSphereRestoreSteps(self.client, request, plan, agent, run_id=run_id)

    def sweep(self, *, older_than_seconds: float) -> list[Any]:
        from .sweep import sweep

        return sweep(self.client, self.plan, older_than_seconds=older_than_seconds)
