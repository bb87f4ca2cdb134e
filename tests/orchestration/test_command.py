"""`vmbackup backup` and `vmbackup server` as commands: usage, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vmbackup.cli.backup import table

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


def _dead_pid_and_start() -> tuple[int, str]:
    """A process that ran and ended, with the start time it had."""
    from vmbackup.localserver.server import _start_time

    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = _start_time(p.pid)
    p.communicate(b"")
    assert start is not None and _start_time(p.pid) is None
    return p.pid, start


def test_only_records_of_gone_processes_on_this_server_are_acted_on(tmp_path, monkeypatch):
    from vmbackup.localserver import runs as local_runs
    from vmbackup.localserver.server import _start_time

    monkeypatch.setenv("VMBACKUP_STATE_DIR", str(tmp_path))
    api, other = "http://127.0.0.1:1/api", "http://127.0.0.1:2/api"
    dead, dead_start = _dead_pid_and_start()
    me, my_start = os.getpid(), _start_time(os.getpid())
    runs = tmp_path / "runs"
    runs.mkdir()
    records = {
        "dead": {"pid": dead, "start_time": dead_start, "api_url": api, "tag": "t-dead"},
        "recycled": {"pid": me, "start_time": str(int(my_start) - 1), "api_url": api, "tag": "t-recycled"},
        "alive": {"pid": me, "start_time": my_start, "api_url": api, "tag": "t-alive"},
        "other-server": {"pid": dead, "start_time": dead_start, "api_url": other, "tag": "t-other"},
        "no-tag": {"pid": dead, "start_time": dead_start, "api_url": api},
    }
    for name, rec in records.items():
        (runs / f"{name}.json").write_text(json.dumps(rec))
    (runs / "garbage.json").write_text("{not json")
    assert sorted(rec["tag"] for _, rec in local_runs.dead_records(api)) == ["t-dead", "t-recycled"]
    assert [rec["tag"] for _, rec in local_runs.dead_records(other)] == ["t-other"]


def test_a_record_is_kept_while_its_command_runs_and_removed_after(tmp_path, monkeypatch):
    from vmbackup.localserver import runs as local_runs

    monkeypatch.setenv("VMBACKUP_STATE_DIR", str(tmp_path))
    api = "http://127.0.0.1:1/api"
    record = tmp_path / "runs" / f"{os.getpid()}.json"
    try:
        with local_runs.recorded(api) as tag:
            assert json.loads(record.read_text())["tag"] == tag and tag.startswith(f"vmbackup-pid-{os.getpid()}-")
            assert local_runs.dead_records(api) == []
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not record.exists()
    # No dead record: nothing to do, and Prefect is not needed for that.
    assert local_runs.mark_crashed(api) == []
    assert local_runs.summary([{}]) == "marked 1 flow run that a killed vmbackup left Running as Crashed"
    assert local_runs.summary([{}, {}]).startswith("marked 2 flow runs that")
