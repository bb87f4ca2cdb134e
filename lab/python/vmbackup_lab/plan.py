"""A backup plan for the running lab (docs/plan.md), written by ``vmbackup lab up``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vmbackup.plan import DEFAULT_NBD_COMMAND

PASSWORD_ENV = "VMBACKUP_VSPHERE_PASSWORD"

# The product's default (nbdkit's curl plugin over the datastore's /folder
# URL), written out in the plan so a reader sees the transport's command.
NBD_COMMAND = list(DEFAULT_NBD_COMMAND)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_lab_plan(state_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Writes STATE/plan.yaml for the lab (and STATE/vsphere-password, 0600); returns the plan's path.

    Every agent VM of the lab is an agent reaching its own host, with its
    hot-add devices in STATE/agents/<agent>/devices and every datastore
    directory as its direct mount. The password is not in the plan: it names
    the environment variable VMBACKUP_VSPHERE_PASSWORD, which
    ``export VMBACKUP_VSPHERE_PASSWORD="$(cat STATE/vsphere-password)"`` sets.
    The repository STATE/repository is created if missing.
    """
    import yaml

    state = Path(state_dir).resolve()
    try:
        hosts_of = {a["name"]: a.get("host") for a in json.loads((state / "lab.json").read_text())["agents"]}
    except (OSError, ValueError, KeyError, TypeError):
        hosts_of = {}
    agents = []
    for name in summary["agents"]:
        host = hosts_of.get(name)
        agents.append(
            {
                "name": name,
                "vm": name,
                "transports": ["hotadd", "direct", "nbd"],
                "hosts": [host] if host else [],
                "device_dir": str(state / "agents" / name / "devices"),
                "datastores": dict(summary["datastores"]),
            }
        )
    repository = state / "repository"
    plan = {
        "connection": {
            "url": summary["vsphere"]["url"],
            "user": summary["vsphere"]["user"],
            "password_env": PASSWORD_ENV,
            "ca_file": summary["vsphere"]["ca_file"],
        },
        "repository": str(repository),
        "agents": agents,
        "selection": {"vms": ["*"]},
        "limits": {"per_agent": 5, "per_host": 4, "per_datastore": 4, "disks_per_vm": 2},
        "quiesce": "preferred",
        "transports": ["hotadd", "direct", "nbd"],
        "nbd_command": NBD_COMMAND,
    }
    _write_private(state / "vsphere-password", summary["vsphere"]["password"] + "\n")
    path = state / "plan.yaml"
    header = (
        "# The lab's backup plan, written by `vmbackup lab up` (docs/plan.md).\n"
        f'# export {PASSWORD_ENV}="$(cat {state / "vsphere-password"})"\n'
    )
    tmp = path.with_name(".plan.yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(plan, sort_keys=False))
    os.replace(tmp, path)
    if not repository.exists():
        from vmbackup import _mover

        _mover.init_repository(str(repository))
    return path
