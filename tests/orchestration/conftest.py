"""A real Prefect server for the orchestration tests: the one vmbackup
manages (the embedded default), in a state directory of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FLOWS = str(Path(__file__).resolve().parents[2] / "flows")


def child_env(state: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a child process using the managed server in ``state``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(VMBACKUP_STATE_DIR=str(state), DO_NOT_TRACK="1", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
        env["PREFECT_HOME"] = str(state / "prefect")
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The managed server, started once for the session; this process's
    Prefect settings point at it. Stopped at the end, leaving no process."""
    from vmbackup.orchestration import server

    state = tmp_path_factory.mktemp("vmbackup-state")
    old = os.environ.get("VMBACKUP_STATE_DIR")
    os.environ["VMBACKUP_STATE_DIR"] = str(state)
    try:
        info = server.ensure_server()
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: info.api_url, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}):
            yield info
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # the runs' last log lines, before the server goes
        server.stop_server()
        assert session_ids(info.pid) == [], "the server left processes behind"
    finally:
        if old is None:
            os.environ.pop("VMBACKUP_STATE_DIR", None)
        else:
            os.environ["VMBACKUP_STATE_DIR"] = old
