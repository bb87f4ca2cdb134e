"""Leases on a repository shared by several hosts (NFS, SMB): gc honours a
lease by its heartbeat (the file's mtime), not only by its flock, and allows
for clock skew between hosts. Times are back-dated with os.utime; nothing
waits on the clock."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import MiB
from vmbackup import _mover
from vmbackup.errors import RepositoryError

STALE_AFTER = 900  # lease::STALE_AFTER_SECONDS
SKEW = 300  # lease::CLOCK_SKEW_SECONDS


def chunk_files(repo):
    return [p for d in (repo / "chunks").iterdir() for p in d.iterdir() if not p.name.startswith(".")]


def unreferenced_chunks(cli, image, touched_ago: float):
    """Chunks that no backup names, last touched `touched_ago` seconds ago."""
    r = cli.json("backup-disk", "--vm", "v", str(image("d.img", 8 * MiB)))
    cli.json("forget", r["id"])
    files = chunk_files(cli.repo)
    assert files
    t = time.time() - touched_ago
    for p in files:
        os.utime(p, (t, t))
    return files


def foreign_lease(repo, started_ago: float, heartbeat_ago: float, host="agent-on-another-host"):
    """A lease as a backup on another host leaves it: its flock is not seen here."""
    p = repo / "locks" / "20260101T000000Z-0badf00d.lease"
    info = {"id": p.stem, "pid": 1, "started_unix": time.time() - started_ago, "host": host}
    p.write_text(json.dumps(info))
    t = time.time() - heartbeat_ago
    os.utime(p, (t, t))
    return p


def test_a_fresh_heartbeat_without_a_lock_keeps_gc_off_the_chunks(cli, image):
    files = unreferenced_chunks(cli, image, touched_ago=300)
    lease = foreign_lease(cli.repo, started_ago=600, heartbeat_ago=30)
    g = cli.json("gc", "--grace", "0")
    assert g["active_backups"] == 1 and g["stale_leases_removed"] == 0
    assert g["chunks_removed"] == 0 and g["chunks_in_grace"] == len(files)
    assert lease.exists() and all(p.exists() for p in files)


def test_a_stale_heartbeat_is_removed_and_no_longer_protects(cli, image):
    files = unreferenced_chunks(cli, image, touched_ago=300)
    lease = foreign_lease(cli.repo, started_ago=4 * 3600, heartbeat_ago=STALE_AFTER + 60)
    g = cli.json("gc", "--grace", "0")
    assert g["stale_leases_removed"] == 1 and g["active_backups"] == 0
    assert not lease.exists()
    assert g["chunks_removed"] == len(files) and not any(p.exists() for p in files)


def test_a_lease_from_a_host_whose_clock_runs_ahead(cli, image):
    """The other host's clock is 2 minutes fast: its backup 'started' in gc's
    future, but the chunks it touched carry the file server's (earlier) time."""
    files = unreferenced_chunks(cli, image, touched_ago=60)
    foreign_lease(cli.repo, started_ago=-120, heartbeat_ago=0)
    g = cli.json("gc", "--grace", "0")
    assert g["active_backups"] == 1 and g["chunks_removed"] == 0
    assert all(p.exists() for p in files)
    assert g["cutoff_unix"] < time.time() - SKEW + 120


def test_a_crashed_backup_on_this_host_is_not_waited_for(cli, image):
    """Same host, its process gone, its lock free: stale at once, whatever its mtime."""
    files = unreferenced_chunks(cli, image, touched_ago=300)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    foreign_lease(cli.repo, started_ago=600, heartbeat_ago=0, host=os.uname().nodename)
    p = next((cli.repo / "locks").glob("*.lease"))
    p.write_text(json.dumps({**json.loads(p.read_text()), "pid": dead}))
    g = cli.json("gc", "--grace", "0")
    assert g["stale_leases_removed"] == 1 and g["chunks_removed"] == len(files)


def test_a_backup_whose_lease_was_taken_for_stale_does_not_commit(cli, image):
    """A gc on another host removed this backup's lease (its heartbeat had
    stalled): chunks it reused may be gone, so its manifest must not appear."""
    disk = image("d.img", 8 * MiB)
    s = _mover.BackupSession(str(cli.repo), "v")
    s.add_disk(str(disk), "scsi0:0")
    (lease,) = (cli.repo / "locks").glob("*.lease")
    lease.unlink()
    with pytest.raises(RepositoryError, match="lease"):
        s.commit()
    assert list((cli.repo / "backups").glob("*.tib")) == []


def test_a_live_lease_that_cannot_be_read_keeps_every_chunk(cli, image):
    """Its start is unknown: gc removes nothing while its heartbeat is fresh."""
    files = unreferenced_chunks(cli, image, touched_ago=7 * 86400)
    (cli.repo / "locks" / "20260101T000000Z-0badf00d.lease").write_text("{not json")
    g = cli.json("gc", "--grace", "0")
    assert g["active_backups"] == 1 and g["chunks_removed"] == 0 and g["cutoff_unix"] < 0
    assert all(p.exists() for p in files)
