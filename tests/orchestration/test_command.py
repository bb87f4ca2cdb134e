"""`vmbackup backup` and `vmbackup server` as commands: usage, the table."""

from __future__ import annotations

from vmbackup.orchestration.command import table

from .procs import child_env, vmbackup


def test_usage_errors_exit_2_in_one_line(tmp_path):
    env = child_env(tmp_path / "state")
    p = vmbackup("backup", "--plan", str(tmp_path / "p.yaml"), "--vm-timeout", "-1", env=env, expect=2)
    assert p.stderr.strip() == "vmbackup: error: --vm-timeout must not be negative" and p.stdout == ""
    assert "--plan" in vmbackup("backup", env=env, expect=2).stderr
    assert "status" in vmbackup("server", env=env, expect=2).stderr
    assert not (tmp_path / "state").exists(), "a usage error started something"


def test_table_has_a_row_per_vm_and_the_errors_below():
    rows = [
        {"vm": "web", "hypervisor": "vsphere", "status": "ok", "backup_id": "B1", "repository": "/r", "mode": "full", "transport": "nbd",
         "consistency": "application", "bytes_read": 3 * 1024**2, "bytes_stored": 1024, "seconds": 2.25, "error": None},
        {"vm": "db", "hypervisor": "hyperv", "status": "failed", "backup_id": None, "repository": "/r", "mode": None, "transport": None,
         "consistency": None, "bytes_read": 0, "bytes_stored": 0, "seconds": 0.5, "error": "snapshot refused"},
    ]  # fmt: skip
    lines = table(rows).splitlines()
    assert lines[0].split() == [
        "VM", "HYPERVISOR", "STATUS", "BACKUP", "MODE", "TRANSPORT", "CONSISTENCY", "READ", "STORED", "SECONDS",
    ]  # fmt: skip
    assert lines[1].split() == [
        "web",
        "vsphere",
        "ok",
        "B1",
        "full",
        "nbd",
        "application",
        "3.0",
        "MiB",
        "1.0",
        "KiB",
        "2.2",
    ]
    assert lines[2].split()[:4] == ["db", "hyperv", "failed", "-"]
    assert lines[3:] == ["repository: /r", "1 of 2 VM(s) backed up", "FAILED db: snapshot refused"]
