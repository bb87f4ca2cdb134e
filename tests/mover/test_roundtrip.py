"""Backups restore to exactly the bytes that were backed up: full, CBT
incremental and dedup incremental, through the real command line."""

from __future__ import annotations

import json
import os

from conftest import MiB, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmbackup import _mover
from vmbackup_lab.diskimage import rewrite_blocks, write_extents


def test_full_then_cbt_incremental_then_dedup_incremental(cli, image, tmp_path):
    disk = image(size=40 * MiB + 12345)  # a last block shorter than a chunk
    full_hash = sha256(disk)
    full = cli.json("backup-disk", "--vm", "web01", "--disk", "scsi0:0", str(disk))
    assert full["disk_size"] == os.path.getsize(disk)
    # Holes are not read: the generated image is about 40% unallocated.
    assert 0 < full["bytes_read"] < full["disk_size"]
    assert full["bytes_stored"] < full["bytes_read"]
    assert full["reused_chunks"] > 0  # the image has duplicated blocks

    changed = rewrite_blocks(str(disk), 0.1, seed=3)
    extents = tmp_path / "changed.json"
    write_extents(str(extents), changed)
    inc_hash = sha256(disk)
    inc = cli.json(
        "backup-disk",
        "--vm",
        "web01",
        "--disk",
        "scsi0:0",
        "--parent",
        full["id"],
        "--changed-extents",
        str(extents),
        str(disk),
    )
    assert inc["parent"] == full["id"] and inc["mode"] == "changed"
    assert inc["bytes_read"] == sum(c["length"] for c in changed)
    assert inc["parent_blocks"] == -(-full["disk_size"] // MiB) - len(changed)

    dedup = cli.json("backup-disk", "--vm", "web01", "--disk", "scsi0:0", str(disk))
    assert dedup["new_chunks"] == 0 and dedup["bytes_stored"] == 0

    for backup, want in ((full, full_hash), (inc, inc_hash), (dedup, inc_hash)):
        out = tmp_path / f"{backup['id']}.raw"
        r = cli.json("restore-disk", backup["id"], str(out))
        assert r["disk_size"] == full["disk_size"]
        assert sha256(out) == want
        # Zero blocks became holes: the restored file is sparse.
        assert os.stat(out).st_blocks * 512 < full["disk_size"]

    listing = cli.json("snapshots", "--vm", "web01")
    assert [b["id"] for b in listing] == [full["id"], inc["id"], dedup["id"]]
    assert cli.json("verify", "--read-data")["ok"] is True


def test_chunk_ids_are_keyed_and_version_1_ids_xxh128_of_the_plaintext(cli, tmp_path):
    """A new repository never names a chunk by the plain XXH3-128 of its data
    (a guest could compute it); a version-1 repository does, and a third party
    can recompute those ids with standard tools (docs/format.md §3)."""
    import subprocess

    block = tmp_path / "block"
    block.write_bytes(os.urandom(MiB))
    xxh = subprocess.run(["xxh128sum", str(block)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert _mover.chunk_id(block.read_bytes()) == xxh
    b = cli.json("backup-disk", "--vm", "v", str(block))
    keyed = _mover.repository_chunk_id(str(cli.repo), block.read_bytes())
    assert keyed != xxh and b["new_chunks"] == 1
    assert (cli.repo / "chunks" / keyed[:2] / keyed).exists()
    assert not (cli.repo / "chunks" / xxh[:2] / xxh).exists()

    legacy = tmp_path / "legacy"
    assert _mover.init_legacy_repository(str(legacy)).id_hash == "xxh3-128"
    cli.json("backup-disk", "--repo", str(legacy), "--vm", "v", str(block))
    assert (legacy / "chunks" / xxh[:2] / xxh).exists()
    assert _mover.repository_chunk_id(str(legacy), block.read_bytes()) == xxh


def test_disk_grown_since_parent_rereads_the_boundary(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(3 * MiB + 100))
    full = cli.json("backup-disk", "--vm", "v", str(disk))
    with open(disk, "ab") as f:
        f.write(os.urandom(2 * MiB))  # the disk grew; CBT reports only the new area
    size = os.path.getsize(disk)
    ext = tmp_path / "e.json"
    ext.write_text(json.dumps([{"start": 3 * MiB + 100, "length": size - 3 * MiB - 100}]))
    inc = cli.json("backup-disk", "--vm", "v", "--parent", full["id"], "--changed-extents", str(ext), str(disk))
    out = tmp_path / "out"
    cli.json("restore-disk", inc["id"], str(out))
    assert out.read_bytes() == disk.read_bytes()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(st.tuples(st.integers(0, 8 * MiB - 1), st.integers(1, 300_000)), min_size=1, max_size=8),
    chunk=st.sampled_from([256 * 1024, MiB]),
)
def test_cbt_incremental_of_random_guest_writes(tmp_path_factory, writes, chunk):
    """Arbitrary guest writes plus their changed areas restore exactly."""
    d = tmp_path_factory.mktemp("cbt")
    repo = str(d / "repo")
    _mover.init_repository(repo, chunk_size=chunk)
    disk = d / "disk"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
    s = _mover.BackupSession(repo, "vm")
    s.add_disk(str(disk), "scsi0:0")
    parent = s.commit().id
    extents = []
    with open(disk, "r+b") as f:
        for start, length in writes:
            length = min(length, 8 * MiB - start)
            f.seek(start)
            f.write(os.urandom(length))
            extents.append((start, length))
    s = _mover.BackupSession(repo, "vm", parent=parent)
    s.add_disk(str(disk), "scsi0:0", changed_extents=extents)
    inc = s.commit().id
    out = d / "out"
    _mover.restore_disk(repo, inc, str(out))
    assert out.read_bytes() == disk.read_bytes()


def test_multi_disk_backup_and_disk_selection(tmp_path, cli):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(MiB + 1))
    b.write_bytes(os.urandom(2 * MiB))
    s = _mover.BackupSession(str(cli.repo), "db01")
    s.add_disk(str(a), "scsi0:0")
    s.add_disk(str(b), "scsi0:1")
    meta = s.commit(config=json.dumps({"numCPU": 4}))
    assert [d.name for d in meta.disks] == ["scsi0:0", "scsi0:1"]
    p = cli.run("restore-disk", meta.id, str(tmp_path / "x"), expect=2)
    assert "--disk" in p.stderr
    cli.run("restore-disk", "--disk", "scsi0:1", meta.id, str(tmp_path / "x"))
    assert (tmp_path / "x").read_bytes() == b.read_bytes()
