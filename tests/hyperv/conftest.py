"""The lab's Hyper-V host for the adapter tests: one per session, started as
its own process, with clients over each transport pywinrm uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import vmbackup_lab.hyperv  # noqa: F401  (installed editable by make dev)
except ImportError:  # the lab package not installed yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab" / "python"))

from vmbackup.hyperv.client import HypervClient  # noqa: E402
from vmbackup_lab.hyperv import HypervLab  # noqa: E402

# (name, which URL, auth): the three ways the adapter may talk to a host.
TRANSPORTS = [("http-ntlm", "http_url", "ntlm"), ("https-basic", "url", "basic"), ("https-ntlm", "url", "ntlm")]


@pytest.fixture(scope="session")
def hvlab(tmp_path_factory) -> HypervLab:
    lab = HypervLab.start(tmp_path_factory.mktemp("hvlab"))
    yield lab
    lab.stop()


@pytest.fixture
def lab(hvlab: HypervLab) -> HypervLab:
    """The session's host, with faults cleared and no run left open afterwards."""
    yield hvlab
    hvlab.set_faults()
    for vm in hvlab.status()["vms"]:
        hvlab.set_faults(vm["name"])
    client(hvlab, "https-ntlm").run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0})
    assert hvlab.status()["shadow_copies"] == []


def client(lab: HypervLab, transport: str, password: str | None = None, ca_file: str | None = None) -> HypervClient:
    _, attr, auth = next(t for t in TRANSPORTS if t[0] == transport)
    return HypervClient(
        getattr(lab, attr), lab.user, password or lab.password, auth=auth, ca_file=ca_file or lab.ca_file
    )


@pytest.fixture(params=[t[0] for t in TRANSPORTS])
def hv(request, lab) -> HypervClient:
    return client(lab, request.param)
