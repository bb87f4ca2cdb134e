"""A backup plan for the running lab (docs/plan.md), written by ``vmbackup lab up``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vmbackup.plan import DEFAULT_NBD_COMMAND

PASSWORD_ENV = "VMBACKUP_VSPHERE_PASSWORD"
HYPERV_PASSWORD_ENV = "VMBACKUP_HYPERV_PASSWORD"
HYPERV_PASSWORD_FILE = "hyperv-password"
# The lab's S3 credentials come from the standard AWS variables, which the
# `--repo s3://` commands read too.
S3_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
# An encrypted lab repository's passphrase: STATE/passphrase, read through this variable.
PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"
PASSPHRASE_FILE = "passphrase"
# The account the Hyper-V hosts share a shadow copy to (New-VmbackupShadowCopy.ps1 -ShareTo).
SHARE_ACCOUNT = "vmbackup-agent"

# The product's default (nbdkit's curl plugin over the datastore's /folder
# URL), written out in the plan so a reader sees the transport's command.
NBD_COMMAND = list(DEFAULT_NBD_COMMAND)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_lab_plan(state_dir: str | os.PathLike, summary: dict[str, Any], encrypted: bool = False) -> Path:
    """Writes STATE/plan.yaml for the lab (and STATE/vsphere-password, 0600); returns the plan's path.

    With ``encrypted`` the repository (when this creates it) is encrypted:
    a random passphrase in STATE/passphrase (0600, kept across restarts of
    the lab), and the plan says ``passphrase_env: VMBACKUP_PASSPHRASE``;
    without, the plan says ``encryption: none``. An existing repository
    stays what it is, and the plan follows it.

    Every agent VM of the lab is an agent reaching its own host, with its
    hot-add devices in STATE/agents/<agent>/devices and every datastore
    directory as its direct mount. The password is not in the plan: it names
    the environment variable VMBACKUP_VSPHERE_PASSWORD, which
    ``export VMBACKUP_VSPHERE_PASSWORD="$(cat STATE/vsphere-password)"`` sets.
    The repository STATE/repository is created if missing.

    With Hyper-V hosts (``summary["hyperv_hosts"]``) the plan lists them under
    ``hyperv`` (HTTPS URL, NTLM, the host's CA, password from
    VMBACKUP_HYPERV_PASSWORD, file STATE/hyperv-password, 0600), and every
    agent reaches every one of them through its shares: ``windows_paths``
    maps ``\\\\HOST\\`` to the host's share directory, ``share_account`` is
    ``HOST\\vmbackup-agent`` (one host) or ``LAB\\vmbackup-agent`` (several).
    """
    import yaml

    state = Path(state_dir).resolve()
    try:
        hosts_of = {a["name"]: a.get("host") for a in json.loads((state / "lab.json").read_text())["agents"]}
    except (OSError, ValueError, KeyError, TypeError):
        hosts_of = {}
    hyperv = summary.get("hyperv_hosts") or []
    agents = []
    for name in summary["agents"]:
        host = hosts_of.get(name)
        agent = {
            "name": name,
            "vm": name,
            "transports": ["hotadd", "direct", "nbd"],
            "hosts": [host] if host else [],
            "device_dir": str(state / "agents" / name / "devices"),
            "datastores": dict(summary["datastores"]),
        }
        if hyperv:
            if agent["hosts"]:
                agent["hosts"] += [h["host"] for h in hyperv]
            agent["windows_paths"] = {f"\\\\{h['host'].upper()}\\": h["share_root"] for h in hyperv}
            domain = hyperv[0]["host"].upper() if len(hyperv) == 1 else "LAB"
            agent["share_account"] = f"{domain}\\{SHARE_ACCOUNT}"
        agents.append(agent)
    repository = state / "repository"
    plan: dict[str, Any] = {
        "connection": {
            "url": summary["vsphere"]["url"],
            "user": summary["vsphere"]["user"],
            "password_env": PASSWORD_ENV,
            "ca_file": summary["vsphere"]["ca_file"],
        },
    }
    if hyperv:
        plan["hyperv"] = [
            {
                "name": h["host"],
                "url": h["url"],
                "user": h["user"],
                "password_env": HYPERV_PASSWORD_ENV,
                "auth": h["transport"],
                "ca_file": h["ca_file"],
            }
            for h in hyperv
        ]
    if repository.exists():
        from vmbackup.keys import is_encrypted

        encrypted = is_encrypted(str(repository))
    plan["repository"] = str(repository)
    if encrypted:
        plan["passphrase_env"] = PASSPHRASE_ENV
    else:
        plan["encryption"] = "none"
    plan |= {
        "agents": agents,
        "selection": {"vms": ["*"]},
        "limits": {"per_agent": 5, "per_host": 4, "per_datastore": 4, "disks_per_vm": 2},
        "quiesce": "preferred",
        "transports": ["hotadd", "direct", "nbd"],
        "nbd_command": NBD_COMMAND,
    }
    s3 = summary.get("s3")
    if s3:
        # one day, extended at every copy (generation 0), so that the lab shows an extension
        plan["copy"] = {
            "endpoint": s3["endpoint"],
            "bucket": s3["bucket"],
            "prefix": s3["prefix"],
            "access_key_env": S3_ACCESS_KEY_ENV,
            "secret_key_env": S3_SECRET_KEY_ENV,
            "object_lock": {"mode": "compliance", "days": 1, "generation_days": 0},
        }
    _write_private(state / "vsphere-password", summary["vsphere"]["password"] + "\n")
    header = (
        "# The lab's backup plan, written by `vmbackup lab up` (docs/plan.md).\n"
        f'# export {PASSWORD_ENV}="$(cat {state / "vsphere-password"})"\n'
    )
    if hyperv:
        # all Hyper-V hosts of a lab share one password
        _write_private(state / HYPERV_PASSWORD_FILE, hyperv[0]["password"] + "\n")
        header += f'# export {HYPERV_PASSWORD_ENV}="$(cat {state / HYPERV_PASSWORD_FILE})"\n'
    else:
        (state / HYPERV_PASSWORD_FILE).unlink(missing_ok=True)
    if s3:
        header += (
            f"# export AWS_ENDPOINT_URL={s3['endpoint']} {S3_ACCESS_KEY_ENV}={s3['access_key']} "
            f'{S3_SECRET_KEY_ENV}="$(cat {state / "s3-secret-key"})"\n'
        )
    passphrase_file = state / PASSPHRASE_FILE
    if encrypted:
        if not passphrase_file.exists():
            import secrets

            _write_private(passphrase_file, secrets.token_urlsafe(24) + "\n")
        header += f'# export {PASSPHRASE_ENV}="$(cat {passphrase_file})"\n'
    path = state / "plan.yaml"
    tmp = path.with_name(".plan.yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(plan, sort_keys=False))
    os.replace(tmp, path)
    if not repository.exists():
        from vmbackup import _mover

        if encrypted:
            from vmbackup.keys import init_encrypted, read_secret_file

            init_encrypted(str(repository), read_secret_file(str(passphrase_file)), 1024 * 1024, "zstd:1")
        else:
            _mover.init_repository(str(repository))
    return path
