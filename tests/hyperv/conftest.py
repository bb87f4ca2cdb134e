"""The lab's Hyper-V host for the adapter tests: one per session, started as
its own process, with clients over each transport pywinrm uses."""

from __future__ import annotations

import json
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


def _clean(lab: HypervLab) -> None:
    lab.set_faults()
    for vm in lab.status()["vms"]:
        lab.set_faults(vm["name"])
    client(lab, "https-ntlm").run_script("Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": 0})
    assert lab.status()["shadow_copies"] == []


@pytest.fixture
def lab(hvlab: HypervLab) -> HypervLab:
    """The session's host (the default topology: win01 and legacy01 share D:),
    with faults cleared and no run left open afterwards."""
    yield hvlab
    _clean(hvlab)


def apart_topology() -> dict:
    """The default topology with legacy01 moved to C: (win01 alone on D:, so the
    Hyper-V writer can quiesce it), plus refs01 on F:, a ReFS volume."""
    from vmbackup_lab.hyperv.topology import DEFAULT

    topo = json.loads(json.dumps(DEFAULT))
    topo["volumes"] = ["C", "D", "E", "F"]
    topo["file_systems"] = {"F": "ReFS"}
    next(v for v in topo["vms"] if v["name"] == "legacy01")["volume"] = "C"
    topo["vms"].append(
        {"name": "refs01", "volume": "F", "disks": [{"controller": "scsi", "number": 0, "location": 0, "size_mib": 8}]}
    )
    return topo


@pytest.fixture(scope="session")
def hvlab_apart(tmp_path_factory) -> HypervLab:
    state = tmp_path_factory.mktemp("hvlab-apart")
    topology = state / "topology.json"
    topology.write_text(json.dumps(apart_topology()))
    lab = HypervLab.start(state / "state", topology)
    yield lab
    lab.stop()


@pytest.fixture
def apart(hvlab_apart: HypervLab) -> HypervLab:
    """A second host (`apart_topology`), cleaned up after each test like `lab`."""
    yield hvlab_apart
    _clean(hvlab_apart)


def client(lab: HypervLab, transport: str, password: str | None = None, ca_file: str | None = None) -> HypervClient:
    _, attr, auth = next(t for t in TRANSPORTS if t[0] == transport)
    return HypervClient(
        getattr(lab, attr), lab.user, password or lab.password, auth=auth, ca_file=ca_file or lab.ca_file
    )


@pytest.fixture(params=[t[0] for t in TRANSPORTS])
def hv(request, lab) -> HypervClient:
    return client(lab, request.param)


def mixed_topology() -> dict:
    """A German host (localized integration service names) with three VMs sharing D:
    (g1, g2, g3: Backup service on), a VM with a pass-through disk and a disk on an
    SMB share beside a VHDX (pt01, on E:), a VM on a ReFS volume (refs01, F:) and
    one on a Cluster Shared Volume (csv01, C:\\ClusterStorage\\Volume1\\); its
    switches are Prod and Isolated (the default lab's LAN is missing)."""
    small = {"controller": "scsi", "number": 0, "location": 0, "size_mib": 4}
    return {
        "host": "hv1",
        "volumes": ["C", "D", "E", "F"],
        "file_systems": {"F": "ReFS"},
        "csv_volumes": ["Volume1"],
        "locale": "de-DE",
        # no switch LAN (the default lab's): a restore from there meets a missing switch
        "switches": ["Prod", "Isolated"],
        "vms": [
            {"name": "g1", "volume": "D", "disks": [small, dict(small, location=1, differencing=1)]},
            {"name": "g2", "volume": "D", "disks": [small]},
            {"name": "g3", "volume": "D", "disks": [small]},
            {
                "name": "pt01",
                "volume": "E",
                "disks": [
                    small,
                    dict(small, location=1, passthrough=True),
                    dict(small, location=2, smb="\\\\FS1\\vms"),
                ],
            },
            {"name": "refs01", "volume": "F", "disks": [small]},
            {"name": "csv01", "volume": "Volume1", "disks": [small]},
        ],
    }


@pytest.fixture(scope="session")
def hvlab_mixed(tmp_path_factory) -> HypervLab:
    state = tmp_path_factory.mktemp("hvlab-mixed")
    topology = state / "topology.json"
    topology.write_text(json.dumps(mixed_topology()))
    lab = HypervLab.start(state / "state", topology)
    yield lab
    lab.stop()


@pytest.fixture
def mixed(hvlab_mixed: HypervLab) -> HypervLab:
    """The `mixed_topology` host, cleaned up after each test like `lab`."""
    yield hvlab_mixed
    _clean(hvlab_mixed)
