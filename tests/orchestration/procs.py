"""Helpers for the orchestration tests: child processes and their sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def child_env(state: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a child process using the managed server in ``state``
    (with ``api_url``: that server's address and its auth string, which a
    managed server asks for; the auth string of this session's server when
    ``state`` has none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(VMBACKUP_STATE_DIR=str(state), DO_NOT_TRACK="1", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false")
    if api_url:
        from prefect.settings import PREFECT_API_AUTH_STRING
        from vmbackup.localserver import server

        env["PREFECT_API_URL"] = api_url
        env["PREFECT_HOME"] = str(state / "prefect")
        auth = server.read_auth(state) or PREFECT_API_AUTH_STRING.value()
        if auth:
            env["PREFECT_API_AUTH_STRING"] = auth
    return env


def session_ids(sid: int) -> list[int]:
    """The live (non-zombie) processes of session ``sid``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(p.name))
    return out


def vmbackup(*args: str, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "vmbackup", *args], capture_output=True, text=True, env=env, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == expect, f"{args} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p
