"""``backup_vsphere_vms``: the backup flow as it was before Hyper-V, for the
deployments made then (``sweep_vsphere`` is in ``maintenance``, and
importable from here).

It runs the body of ``backup_vms`` (``backup.py``) with the plan's vSphere
VMs only, and keeps its own report keys (``vmbackup-vsphere-report``...), so
a deployment of it, and whatever reads its artifacts, behaves as before.
New deployments use ``backup_vms``, which backs up Hyper-V VMs too.
"""

from __future__ import annotations

from prefect import flow

from . import limits, reports
from .backup import (
    AGENT_ENV,
    DEFAULT_VM_DEADLINE,
    AgentMismatchError,
    Keys,
    VmsFailedError,
    run_backup,
)
from .backup import only_agent as _only_agent
from .backup import selection_of as _selection
from .backup import vm_datastores as _vm_datastores
from .backup import with_secret as _with_secret

REPORT_KEY = "vmbackup-vsphere-report"
KEYS = Keys(REPORT_KEY, "vmbackup-vsphere-summary", "vmbackup-vsphere-progress", "vSphere backup")


@flow(name="backup_vsphere_vms", flow_run_name=reports.run_name("backup"), log_prints=False, validate_parameters=True)
def backup_vsphere_vms(
    plan_path: str,
    vms: list[str] | None = None,
    vm_deadline_seconds: float | None = DEFAULT_VM_DEADLINE,
    lease_seconds: float = limits.DEFAULT_LEASE_SECONDS,
    agent: str | None = None,
    password_secret: str | None = None,
    fail_on_error: bool = False,
    identities: dict[str, str] | None = None,
) -> list[dict]:
    """Back up the plan's vSphere VMs (or only ``vms``), one task per VM:
    ``backup_vms`` without Hyper-V (see it for the parameters and rows)."""
    return run_backup(
        plan_path,
        vms,
        vm_deadline_seconds,
        lease_seconds,
        agent,
        password_secret,
        fail_on_error,
        hypervisors=("vsphere",),
        keys=KEYS,
        identities=identities,
    )


# The sweep is a maintenance flow now (maintenance.py); it is still importable from here.
from .maintenance import sweep_vsphere  # noqa: E402

__all__ = [
    "AGENT_ENV",
    "AgentMismatchError",
    "DEFAULT_VM_DEADLINE",
    "REPORT_KEY",
    "VmsFailedError",
    "_only_agent",
    "_selection",
    "_vm_datastores",
    "_with_secret",
    "backup_vsphere_vms",
    "sweep_vsphere",
]
