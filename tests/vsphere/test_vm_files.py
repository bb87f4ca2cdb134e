"""What a restore needs besides the disks (issue 16, part 2, item 9): the
VM's configuration as of the snapshot (not as it is when the reads end) and
its ``.nvram`` (the firmware's variables), in the point."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

from pyVmomi import vim
from vmbackup import _mover
from vmbackup.vsphere.tasks import run_task
from vmbackup.vsphere.vmfiles import NVRAM_LIMIT

from .helpers import backup


def _meta(plan, backup_id):
    return next(b for b in _mover.list_backups(str(plan.repository))[0] if b.id == backup_id)


def _reconfigure(vm, **spec):
    run_task(lambda: vm.ReconfigVM_Task(vim.vm.ConfigSpec(**spec)), f"reconfiguring {vm.name}", 60)


def _nvram_listed(vm) -> list[str]:
    vm.RefreshStorageInfo()
    return [f.name for f in vm.layoutEx.file if f.type == "nvram"]


def _lab_file(vlab, ds_path: str) -> Path:
    """The lab's own copy of a datastore file (docs/lab.md: DIR/datastores/<ds>/...)."""
    ds, rel = ds_path[1:].split("] ", 1)
    return Path(vlab.state) / "datastores" / re.sub(r"[^A-Za-z0-9._-]", "_", ds) / rel


def _nvram_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and ".nvram" in r.getMessage()]


def test_the_point_config_is_the_vm_as_of_the_snapshot_not_a_reconfigure_during_the_backup(client, plan, checks):
    vm = client.find_vm("sata01")
    cpus, note = vm.config.hardware.numCPU, vm.config.annotation or ""

    def reconfigure_during_backup(_snapshot_name):
        _reconfigure(vm, numCPUs=cpus + 2, annotation="reconfigured during the backup")

    try:
        r = backup(client, plan, "sata01", on_snapshot=reconfigure_during_backup)
        # The reconfiguration took effect on the VM while it was backed up...
        assert vm.config.hardware.numCPU == cpus + 2 and vm.config.annotation == "reconfigured during the backup"
    finally:
        _reconfigure(vm, numCPUs=cpus, annotation=note)
    assert r.status == "ok"
    config = _meta(plan, r.backup_id).config
    # ...and not in the point: its config is the snapshot's.
    assert config["name"] == "sata01"
    assert config["hardware"]["numCPU"] == cpus
    assert (config.get("annotation") or "") == note
    checks.assert_clean(plan)


def test_the_point_holds_the_exact_bytes_of_the_vm_nvram(client, plan, checks, vlab):
    r = backup(client, plan, "sata01")
    assert r.status == "ok"
    nvram = _meta(plan, r.backup_id).attributes["nvram"]
    (listed,) = _nvram_listed(client.find_vm("sata01"))
    want = _lab_file(vlab, listed).read_bytes()
    assert nvram["file"] == listed == "[shared1] sata01/sata01.nvram"
    assert nvram["size"] == len(want) and base64.b64decode(nvram["data_base64"]) == want
    # The lab's .nvram is binary and each VM's its own: a copy of another's, or one
    # that went through text, would not match.
    (other,) = _nvram_listed(client.find_vm("multi01"))
    assert want.startswith(b"MRVN") and want != _lab_file(vlab, other).read_bytes()
    checks.assert_clean(plan)


def test_an_unreadable_nvram_is_one_warning_and_a_missing_one_is_recorded(client, plan, checks, vlab, caplog):
    vm = client.find_vm("sata01")
    (listed,) = _nvram_listed(vm)
    path = _lab_file(vlab, listed)
    saved = path.read_bytes()
    try:

        def remove_nvram(_snapshot_name):
            path.unlink()  # after vSphere listed it in layoutEx: /folder has no such file now

        with caplog.at_level(logging.WARNING):
            r = backup(client, plan, "sata01", on_snapshot=remove_nvram)
        assert r.status == "ok"
        nvram = _meta(plan, r.backup_id).attributes["nvram"]
        assert nvram["file"] == listed and "404" in nvram["error"] and "data_base64" not in nvram
        assert len(_nvram_warnings(caplog)) == 1, _nvram_warnings(caplog)

        assert _nvram_listed(vm) == []  # vSphere's layout lists none now
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            r = backup(client, plan, "sata01")
        assert r.status == "ok"
        assert _meta(plan, r.backup_id).attributes["nvram"] == {
            "file": None,
            "missing": "the VM's layoutEx lists no nvram file",
        }
        assert _nvram_warnings(caplog) == []
    finally:
        path.write_bytes(saved)
        assert _nvram_listed(vm) == [listed]
    checks.assert_clean(plan)


def test_an_nvram_over_the_limit_is_skipped_with_its_size(client, plan, checks, vlab, caplog):
    vm = client.find_vm("sata01")
    (listed,) = _nvram_listed(vm)
    path = _lab_file(vlab, listed)
    saved = path.read_bytes()
    try:
        path.write_bytes(saved + bytes(NVRAM_LIMIT))
        _nvram_listed(vm)  # layoutEx gives the new size
        with caplog.at_level(logging.WARNING):
            r = backup(client, plan, "sata01")
    finally:
        path.write_bytes(saved)
        _nvram_listed(vm)
    assert r.status == "ok"
    assert _meta(plan, r.backup_id).attributes["nvram"] == {
        "file": listed,
        "size": len(saved) + NVRAM_LIMIT,
        "skipped": f"larger than {NVRAM_LIMIT} bytes",
    }
    assert len(_nvram_warnings(caplog)) == 1
    checks.assert_clean(plan)
