"""A real Prefect server for the orchestration tests: the one vmbackup
manages (the embedded default), in a state directory of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .procs import session_ids


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The managed server, started once for the session; this process's
    Prefect settings point at it. Stopped at the end, leaving no process."""
    from vmbackup.localserver import server

    state = tmp_path_factory.mktemp("vmbackup-state")
    old = os.environ.get("VMBACKUP_STATE_DIR")
    os.environ["VMBACKUP_STATE_DIR"] = str(state)
    try:
        info = server.ensure_server()
        try:
            from prefect.settings import (
                PREFECT_API_AUTH_STRING,
                PREFECT_API_URL,
                PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
                temporary_settings,
            )

            # The server asks for its auth string (its state directory's api-auth).
            with temporary_settings(
                updates={
                    PREFECT_API_URL: info.api_url,
                    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False,
                    PREFECT_API_AUTH_STRING: server.read_auth(state),
                }
            ):
                yield info
                from prefect.logging.handlers import APILogHandler

                APILogHandler().flush()  # the runs' last log lines, before the server goes
        finally:
            server.stop_server()  # whatever happened: never leave a server behind
        assert session_ids(info.pid) == [], "the server left processes behind"
    finally:
        if old is None:
            os.environ.pop("VMBACKUP_STATE_DIR", None)
        else:
            os.environ["VMBACKUP_STATE_DIR"] = old


@pytest.fixture(autouse=True)
def _this_sessions_server(request, monkeypatch):
    """A test that uses ``prefect_server`` sees its settings and state
    directory, whatever another directory's session fixtures set in this
    process meanwhile (`make test` runs files on two pytest-xdist workers, so
    a worker may run a file of tests/e2e between two files of this one)."""
    if "prefect_server" not in request.fixturenames:
        yield
        return
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        temporary_settings,
    )
    from vmbackup.localserver import server

    info = request.getfixturevalue("prefect_server")
    state = os.fspath(info.state_dir)
    monkeypatch.setenv("VMBACKUP_STATE_DIR", state)
    with temporary_settings(
        updates={
            PREFECT_API_URL: info.api_url,
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False,
            PREFECT_API_AUTH_STRING: server.read_auth(Path(state)),
        }
    ):
        yield
