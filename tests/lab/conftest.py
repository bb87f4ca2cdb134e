"""One lab for the whole test session (tests/lab/topology.json)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import vmbackup_lab  # noqa: F401
except ImportError:  # not installed (make dev installs it): use the work tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab" / "python"))

from pyVim.connect import Disconnect  # noqa: E402
from pyVmomi import vim  # noqa: E402
from vmbackup_lab import Lab, lab_down, lab_up  # noqa: E402

from .labkit import connect  # noqa: E402

TOPOLOGY = Path(__file__).with_name("topology.json")


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    state = tmp_path_factory.mktemp("lab")
    lab = lab_up(state, TOPOLOGY)
    yield lab
    lab_down(state)


@pytest.fixture(scope="session")
def _connection(lab):
    holder = {"si": connect(lab)}
    yield holder
    Disconnect(holder["si"])


@pytest.fixture
def si(lab, _connection):
    """A logged-in ServiceInstance (logged in again after a test dropped sessions)."""
    try:
        alive = _connection["si"].content.sessionManager.currentSession is not None
    except vim.fault.NotAuthenticated:
        alive = False
    if not alive:
        _connection["si"] = connect(lab)
    return _connection["si"]
