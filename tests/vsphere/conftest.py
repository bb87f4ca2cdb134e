"""A lab of its own for the vSphere adapter's tests (tests/vsphere/topology.json).

Everything from the lab's Python is imported here only, so that the tests
themselves see the lab through these fixtures (its import path may move).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

try:
    import vmbackup_lab  # noqa: F401
except ImportError:  # not installed (make dev installs it): use the work tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab" / "python"))

from pyVmomi import vim  # noqa: E402
from vmbackup import _mover  # noqa: E402
from vmbackup.plan import load_plan, resolve_password  # noqa: E402
from vmbackup.vsphere.client import VSphereClient  # noqa: E402
from vmbackup.vsphere.inventory import CLONE_PREFIX, disks_of  # noqa: E402
from vmbackup.vsphere.snapshots import PREFIX  # noqa: E402
from vmbackup_lab import lab_down, lab_up  # noqa: E402
from vmbackup_lab.plan import PASSWORD_ENV, write_lab_plan  # noqa: E402

TOPOLOGY = Path(__file__).with_name("topology.json")
# One ESXi host whose certificate names only esx.lab.invalid, reached at 127.0.0.1.
MISNAMED_TOPOLOGY = Path(__file__).with_name("topology_misnamed.json")


@pytest.fixture(scope="session")
def vlab(tmp_path_factory):
    state = tmp_path_factory.mktemp("vlab")
    lab = lab_up(state, TOPOLOGY)
    yield lab
    lab_down(state)


@pytest.fixture(scope="session")
def lab_plan_path(vlab):
    """The plan `vmbackup lab up` writes, with the password in the environment it names."""
    path = write_lab_plan(vlab.state, vlab.summary())
    os.environ[PASSWORD_ENV] = vlab.password
    return path


@pytest.fixture
def plan(lab_plan_path, tmp_path):
    """The lab's plan with a fresh repository of this test."""
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    return load_plan(lab_plan_path).model_copy(update={"repository": repo})


@pytest.fixture(scope="session")
def _client(lab_plan_path):
    p = load_plan(lab_plan_path)
    client = VSphereClient.connect(p.connection, resolve_password(p.connection))
    yield client
    client.close()


@pytest.fixture
def client(_client):
    return _client


class Checks:
    """Looks at the lab two ways (its counters and pyVmomi) to say nothing is left behind."""

    def __init__(self, lab, client):
        self.lab = lab
        self.client = client

    def image(self, vm: str, disk: str, out: Path, snapshot: str | None = None) -> str:
        self.lab.disk_image(vm, disk, out, snapshot=snapshot)
        return sha(out)

    def assert_clean(self, plan, user_snapshots: dict[str, list[str]] | None = None) -> None:
        user_snapshots = user_snapshots or {}
        st = self.lab.status()
        for kind in ("snapshots", "attached_disks"):
            for scope, names in st["counters"][kind].items():
                for name, c in names.items():
                    if kind == "attached_disks" or not user_snapshots:
                        assert c["now"] == 0, (kind, scope, name, c)
        for vm in st["vms"]:
            assert not vm["name"].startswith(CLONE_PREFIX), vm["name"]
            assert not vm["consolidation_needed"], vm["name"]
            names = [s["name"] if isinstance(s, dict) else s for s in vm["snapshots"]]
            assert sorted(names) == sorted(user_snapshots.get(vm["name"], [])), (vm["name"], names)
        for vm in self.client.objects(vim.VirtualMachine):
            assert not vm.name.startswith(CLONE_PREFIX)
            assert not vm.runtime.consolidationNeeded
            if vm.snapshot is not None:
                stack = list(vm.snapshot.rootSnapshotList)
                while stack:
                    node = stack.pop()
                    assert not node.name.startswith(PREFIX), (vm.name, node.name)
                    stack += node.childSnapshotList or []
            if vm.name in self.lab.agents:
                assert len(disks_of(list(vm.config.hardware.device))) == 1, vm.name
        ledger = Path(plan.repository) / "ledger"
        assert not ledger.exists() or not list(ledger.glob("*.json"))


@pytest.fixture(scope="module")
def misnamed_lab(tmp_path_factory):
    """A lab of its own whose certificate does not name the address the plan uses."""
    state = tmp_path_factory.mktemp("misnamed")
    lab = lab_up(state, MISNAMED_TOPOLOGY)
    yield lab
    lab_down(state)


@pytest.fixture(scope="module")
def misnamed_plan_path(misnamed_lab):
    """The misnamed lab's plan (``ca_file``, as `vmbackup lab up` writes it; its password
    is ``misnamed_lab.password``, not in the environment, which the main lab's plan uses)."""
    return write_lab_plan(misnamed_lab.state, misnamed_lab.summary())


@pytest.fixture
def checks(vlab, client):
    return Checks(vlab, client)


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
