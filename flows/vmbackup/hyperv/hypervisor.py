"""Hyper-V as a ``hypervisors.base.Hypervisor``: one Hyper-V host of a plan.

Thin: each verb is the adapter's own module (``inventory``,
``procedure.HypervSteps``, ``sweep``). Each VM's steps get a WinRM session of
their own: sealed NTLM messages carry sequence numbers, so one session is
not shared between threads. No Prefect.
"""

from __future__ import annotations

from typing import Any

from ..hypervisors import base
from .restore import HypervRestorer


class HyperV(HypervRestorer):
    """One of the plan's Hyper-V hosts (``plan.hyperv[i]``); its restore verbs
    (``describe_point``, ``restore_steps``) are `restore.HypervRestorer`'s."""

    kind = "hyperv"

    def __init__(self, plan: Any, host: Any, password: Any) -> None:
        self.plan, self.host, self.password = plan, host, password
        self.label = f"Hyper-V host {host.name}"
        self.client: Any = None

    def connect(self) -> None:
        from .inventory import connect

        self.client = connect(self.host, self.password)

    def close(self) -> None:
        self.client = None  # pywinrm keeps no session open between calls

    def select(self, selection: Any) -> list[Any]:
        from .inventory import select_vms

        # strict=False: a plain name of the shared selection may be another hypervisor's.
        return select_vms(self.client, self.host, selection, strict=False)

    @staticmethod
    def limit_keys(vm: Any) -> list[tuple[str, str]]:
        return [("host", vm.host)] + [("volume", v) for v in vm.volume_keys]

    def steps(self, vm: Any, plan: Any, agent: Any, *, run_id: str, **hooks: Any) -> base.VmSteps:
        from .inventory import connect
        from .procedure import HypervSteps

        # hooks: ``pool``, the run's `setpool.SetPool` of this host (one set per volume group)
        return HypervSteps(
            connect(self.host, self.password), vm, plan, self.host, agent, run_id=run_id, pool=hooks.get("pool")
        )

    def sweep(self, *, older_than_seconds: float) -> list[Any]:
        from .sweep import sweep_host

        # restores that are no longer running too, judged by the repository's restore ledger
        return sweep_host(
            self.client,
            older_than_seconds=older_than_seconds,
            repository=str(self.plan.repository),
            host=self.host.name,
        )
