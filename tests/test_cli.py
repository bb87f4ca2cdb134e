"""The command line's contract: exit codes, one clear line for bad input,
JSON on stdout only, no Prefect at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MiB


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(MiB) + bytes(MiB))
    return p


BAD_INPUT = [
    ("missing source", ["backup-disk", "--vm", "v", "{tmp}/nope.img"], "does not exist"),
    ("source is a directory", ["backup-disk", "--vm", "v", "{tmp}"], "neither a file nor a block device"),
    (
        "changed extents without parent",
        ["backup-disk", "--vm", "v", "--changed-extents", "{tmp}/e.json", "{disk}"],
        "needs --parent",
    ),
    (
        "unknown parent",
        [
            "backup-disk",
            "--vm",
            "v",
            "--parent",
            "20260101T000000Z-00000000",
            "--changed-extents",
            "{tmp}/e.json",
            "{disk}",
        ],
        "no backup",
    ),
    (
        "extents not JSON",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/bad.json", "{disk}"],
        "not JSON",
    ),
    (
        "extent past the end",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/far.json", "{disk}"],
        "past the end",
    ),
    ("vmdk sniffed by content", ["backup-disk", "--vm", "v", "{tmp}/x.raw"], "VMDK"),
    ("unknown backup", ["restore-disk", "20260101T000000Z-00000000", "{tmp}/out"], "no backup"),
    ("hostile id", ["restore-disk", "../../etc/passwd", "{tmp}/out"], "not a backup id"),
    ("unknown disk", ["restore-disk", "--disk", "ide0:0", "{parent}", "{tmp}/out"], "no disk"),
    ("output exists", ["restore-disk", "{parent}", "{disk}"], "refusing to overwrite"),
    ("forget unknown", ["forget", "nope"], "no backup"),
    ("verify unknown", ["verify", "20260101T000000Z-00000000"], "no backup"),
    ("prune without rules", ["prune"], "at least one --keep"),
    ("not a repository", ["snapshots", "--repo", "{tmp}"], "not a vmbackup repository"),
    ("bad chunk size", ["init", "--repo", "{tmp}/new", "--chunk-size", "3MiB"], "power of two"),
    ("chunk size too small", ["init", "--repo", "{tmp}/new", "--chunk-size", "64KiB"], "power of two"),
    ("bad compression", ["init", "--repo", "{tmp}/new", "--compression", "brotli"], "unsupported compression"),
    ("init non-empty", ["init", "--repo", "{tmp}"], "not empty"),
    ("corrupt vhdx", ["backup-disk", "--vm", "v", "{tmp}/x.vhdx"], "not a valid VHDX image"),
]


@pytest.mark.parametrize("case,args,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_clear_line(cli, disk, tmp_path, case, args, message):
    parent = cli.json("backup-disk", "--vm", "v", str(disk))["id"]
    (tmp_path / "e.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "far.json").write_text(json.dumps([{"start": 0, "length": 10 * MiB}]))
    (tmp_path / "x.raw").write_bytes(b"KDMV" + bytes(4096))
    (tmp_path / "x.vhdx").write_bytes(b"vhdxfile" + bytes(2 * MiB))
    args = [a.format(tmp=tmp_path, disk=disk, parent=parent) for a in args]
    before = sorted(os.listdir(cli.repo / "backups"))
    p = cli.run(*args, expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert p.stdout == ""
    # Nothing already stored was touched.
    assert sorted(os.listdir(cli.repo / "backups")) == before


def test_repo_from_environment(cli, disk):
    env = dict(os.environ, VMBACKUP_REPO=str(cli.repo))
    p = subprocess.run(
        [sys.executable, "-m", "vmbackup", "backup-disk", "--vm", "v", "--json", str(disk)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["disk_size"] == 2 * MiB
    env.pop("VMBACKUP_REPO")
    p = subprocess.run([sys.executable, "-m", "vmbackup", "snapshots"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "VMBACKUP_REPO" in p.stderr


def test_json_results_have_the_contract_fields(cli, disk, tmp_path):
    b = cli.json("backup-disk", "--vm", "v", "--disk", "scsi0:0", str(disk))
    assert {"id", "bytes_read", "bytes_stored", "disk_size"} <= set(b)
    # The second MiB is written zeros, not a hole: read, then recorded without data.
    assert b["disk_size"] == 2 * MiB and b["bytes_read"] == 2 * MiB
    assert b["zero_blocks"] == 1 and b["new_chunks"] == 1
    snaps = cli.json("snapshots")
    assert snaps[0]["id"] == b["id"] and snaps[0]["disks"][0]["name"] == "scsi0:0"
    v = cli.json("verify")
    assert v["ok"] is True and v["backups_checked"] == 1


def test_usage_errors_exit_2(cli):
    p = cli.run("backup-disk", expect=2)
    assert "usage" in p.stderr
    cli.run("frobnicate", expect=2, repo=False)


def test_repository_commands_do_not_import_prefect(cli, disk, tmp_path):
    # Prefect is installed (make dev): the check below must see it when it is imported.
    code = (
        "import sys, vmbackup.cli as c; {pre}; rc = c.main(sys.argv[1:]); "
        "loaded = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]; "
        "assert not loaded, f'prefect was imported: {{loaded[:3]}}'; sys.exit(rc)"
    )
    env = {**os.environ, "VMBACKUP_STATE_DIR": str(tmp_path / "state")}
    env.pop("PREFECT_API_URL", None)

    def run(args, pre="pass"):
        return subprocess.run(
            [sys.executable, "-c", code.format(pre=pre), *args], capture_output=True, text=True, env=env
        )

    for args in (
        ["snapshots", "--repo", str(cli.repo)],
        ["backup-disk", "--repo", str(cli.repo), "--vm", "v", str(disk)],
        ["verify", "--repo", str(cli.repo)],
        ["gc", "--repo", str(cli.repo), "--dry-run"],
        ["server", "status", "--json"],
    ):
        p = run(args)
        assert p.returncode == 0, p.stderr
    # The control: the same check fails once anything imports Prefect.
    p = run(["snapshots", "--repo", str(cli.repo)], pre="import vmbackup.orchestration.vmtask")
    assert p.returncode != 0 and "prefect was imported" in p.stderr, p.stderr


def test_forget_and_gc_reclaim_space(cli, disk, tmp_path):
    import time

    a = cli.json("backup-disk", "--vm", "v", str(disk))
    dry = cli.json("gc", "--grace", "0", "--dry-run")
    assert dry["chunks_removed"] == 0
    cli.json("forget", a["id"])
    assert cli.json("snapshots") == []
    time.sleep(2.1)
    dry = cli.json("gc", "--grace", "0", "--dry-run")
    assert dry["chunks_removed"] == 1 and dry["dry_run"] is True
    assert cli.json("gc", "--grace", "3600")["chunks_removed"] == 0  # within the grace period
    g = cli.json("gc", "--grace", "0")
    assert g["chunks_removed"] == 1 and g["bytes_removed"] > 0
    assert cli.json("gc", "--grace", "0")["chunks_removed"] == 0


def test_corrupt_repository_config_is_one_clear_line(cli, disk):
    (cli.repo / "config.json").write_text('{"format": "vmbackup-repository", "version": 1, "chunk')
    for args in (["snapshots"], ["backup-disk", "--vm", "v", str(disk)], ["verify"], ["gc"]):
        p = cli.run(*args, expect=1)
        assert p.stderr.count("\n") == 1 and "config.json is corrupt" in p.stderr, p.stderr
    (cli.repo / "config.json").write_text(
        json.dumps(
            {
                "format": "vmbackup-repository",
                "version": 9,
                "id": "x",
                "chunk_size": MiB,
                "compression": "none",
                "created": "",
            }
        )
    )
    p = cli.run("snapshots", expect=1)
    assert "version 9 is not supported" in p.stderr
