"""A Prefect server that does not answer a request for slots (a 503 under
load, nothing listening) is a retryable error before any work starts, not a
failed VM: ``limits.hold`` raises ``LimitsUnavailableError``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

PROBE = """
from vmbackup.errors import LimitsUnavailableError
from vmbackup.orchestration import limits
started = False
try:
    with limits.hold(["vmbackup-agent-a", "vmbackup-host-esx1"]):
        started = True
except LimitsUnavailableError as e:
    assert not started
    print("retryable" if e.retryable else "permanent", e)
"""


def test_no_answer_from_the_server_is_a_retryable_error_before_any_work():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_CLIENT_MAX_RETRIES="1",
        DO_NOT_TRACK="1",
    )
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("retryable the Prefect server did not grant the limits vmbackup-agent-a"), p.stdout
