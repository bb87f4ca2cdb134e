"""Small helpers shared by the vSphere adapter tests (no lab imports here)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from vmbackup import _mover
from vmbackup.plan import Selection
from vmbackup.vsphere.inventory import select_vms
from vmbackup.vsphere.procedure import backup_vm

from .conftest import sha

_runs = itertools.count(1)


def run_id() -> str:
    return f"t{os.getpid()}-{next(_runs)}"


def vm_info(client, name):
    (info,) = select_vms(client, Selection(vms=[name]))
    return info


def agent_for(plan, info):
    return next(a for a in plan.agents if info.host in a.hosts)


def backup(client, plan, name, **kw):
    info = vm_info(client, name)
    return backup_vm(client, info, plan, agent_for(plan, info), run_id=kw.pop("run_id", None) or run_id(), **kw)


def restored_sha(plan, backup_id: str, disk: str, out: Path) -> str:
    _mover.restore_disk(str(plan.repository), backup_id, str(out), disk=disk)
    return sha(out)


def with_transports(plan, *names):
    agents = [a.model_copy(update={"transports": list(names)}) for a in plan.agents]
    return plan.model_copy(update={"transports": list(names), "agents": agents})


def lab_file(state, ds_path: str) -> Path:
    """The lab's own copy of a datastore file ``[ds] dir/name`` (docs/lab.md: DIR/datastores/<ds>/...)."""
    import re

    ds, rel = ds_path[1:].split("] ", 1)
    return Path(state) / "datastores" / re.sub(r"[^A-Za-z0-9._-]", "_", ds) / rel
