"""Several writers and gc on one repository at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from conftest import MiB, backdate, sha256
from vmbackup import _mover


def test_two_processes_back_up_into_one_repository(cli, image, tmp_path):
    a = image("a.img", 64 * MiB, seed=11)
    b = tmp_path / "b.img"
    # b shares half of a's content, so both writers race on the same chunks.
    with open(a, "rb") as src, open(b, "wb") as dst:
        dst.write(src.read(32 * MiB))
        dst.write(os.urandom(32 * MiB))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vmbackup", "backup-disk", "--repo", str(cli.repo), "--vm", vm, "--json", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for vm, path in (("vm-a", a), ("vm-b", b))
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert cli.json("verify", "--read-data")["ok"]
    for r, path in zip(results, (a, b), strict=False):
        out = tmp_path / f"{r['vm']}.out"
        cli.json("restore-disk", r["id"], str(out))
        assert sha256(out) == sha256(path)


def test_gc_during_a_backup_keeps_what_the_backup_reuses(cli, image, tmp_path):
    """The backup reuses chunks that only a forgotten backup named; gc runs
    (with no grace at all) between the data and the manifest."""
    disk = image("d.img", 32 * MiB)
    old = cli.json("backup-disk", "--vm", "v", str(disk))
    s = _mover.BackupSession(str(cli.repo), "v")
    d = s.add_disk(str(disk), "scsi0:0")
    assert d.new_chunks == 0 and d.reused_chunks > 0
    cli.json("forget", old["id"])
    g = _mover.gc(str(cli.repo), grace_seconds=0)
    assert g.active_backups == 1 and g.chunks_removed == 0 and g.chunks_in_grace > 0
    meta = s.commit()
    assert cli.json("verify", "--read-data")["ok"]
    cli.json("restore-disk", meta.id, str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(disk)
    # Once nothing runs and nothing names them, gc does remove chunks
    # (after the two seconds of slack for coarse file timestamps).
    cli.json("forget", meta.id)
    backdate(cli.repo / "chunks")
    g = cli.json("gc", "--grace", "0")
    assert g["chunks_removed"] == g["chunks_scanned"] > 0 and g["bytes_removed"] > 0


def test_gc_in_a_loop_while_backups_run(cli, image, tmp_path):
    disk = image("d.img", 96 * MiB, seed=5)
    seed_backup = cli.json("backup-disk", "--vm", "v", str(disk))
    cli.json("forget", seed_backup["id"])  # its chunks are now garbage, unless reused
    stop = threading.Event()
    runs = []

    def gc_loop():
        while not stop.is_set():
            runs.append(_mover.gc(str(cli.repo), grace_seconds=0))

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        ids = [cli.json("backup-disk", "--vm", "v", str(disk))["id"] for _ in range(3)]
    finally:
        stop.set()
        t.join()
    assert len(runs) >= 2
    assert cli.json("verify", "--read-data")["ok"]
    for i in ids:
        cli.json("restore-disk", "--force", i, str(tmp_path / "o"))
        assert sha256(tmp_path / "o") == sha256(disk)


def test_gc_keeps_the_parent_chunks_an_unfinished_incremental_reuses(cli, image, tmp_path):
    """CBT incremental B takes most blocks from parent P; P is forgotten and gc
    runs (no grace) before B commits: B's manifest must still be whole."""
    disk = image("d.img", 32 * MiB)
    parent = cli.json("backup-disk", "--vm", "v", str(disk))
    backdate(cli.repo / "chunks")  # P's chunks are now older than any cutoff gc could pick for B
    s = _mover.BackupSession(str(cli.repo), "v", parent=parent["id"])
    d = s.add_disk(str(disk), "disk0", changed_extents=[(0, 4096)])
    assert d.parent_blocks > 0
    cli.json("forget", parent["id"])
    g = _mover.gc(str(cli.repo), grace_seconds=0)
    assert g.chunks_removed == 0, "gc removed chunks the running incremental names"
    meta = s.commit()
    assert cli.json("verify", "--read-data")["ok"]
    cli.json("restore-disk", meta.id, str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(disk)


def test_an_incremental_reads_again_what_its_parent_lost(cli, image, tmp_path):
    disk = image("d.img", 16 * MiB)
    parent = cli.json("backup-disk", "--vm", "v", str(disk))
    chunks = sorted(p for d in (cli.repo / "chunks").iterdir() for p in d.iterdir())
    chunks[0].unlink()  # lost (a disk error, or quarantined by verify)
    ext = tmp_path / "e.json"
    ext.write_text("[]")  # CBT says nothing changed
    inc = cli.json("backup-disk", "--vm", "v", "--parent", parent["id"], "--changed-extents", str(ext), str(disk))
    assert inc["new_chunks"] == 1 and inc["bytes_read"] > 0
    cli.json("restore-disk", inc["id"], str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(disk)


def test_gc_puts_back_what_a_crashed_gc_left_in_its_trash(cli, image):
    disk = image("d.img", 8 * MiB)
    b = cli.json("backup-disk", "--vm", "v", str(disk))
    chunk = next(p for d in (cli.repo / "chunks").iterdir() for p in d.iterdir())
    trash = chunk.with_name(f".gc-{chunk.name}-999999999")  # no such process
    chunk.rename(trash)
    assert cli.run("verify", expect=1)
    cli.json("gc")
    assert chunk.exists() and not trash.exists()
    assert cli.json("verify", "--read-data", b["id"])["ok"]
