"""`vmbackup demo` (what `make demo` runs), until it runs on the lab's simulator: a generated VM-like disk is backed up in
full, changed as a guest would change it, backed up again incrementally from
its changed areas (as CBT reports them), verified by re-reading every chunk,
and both backups are restored and compared byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from vmbackup import _mover
from vmbackup.cli.output import fmt_bytes

from .diskimage import make_image, rewrite_blocks


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_demo(directory: str, size: int = 512 << 20) -> int:
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    disk = os.path.join(directory, "web01-disk0.img")
    repo = os.path.join(directory, "repo")
    say = print

    t = time.monotonic()
    layout = make_image(disk, size, seed=7)
    say(
        f"1. generated {disk}: {fmt_bytes(size)} VM-like disk, {layout.holes} of {layout.blocks} MiB blocks "
        f"unallocated, {layout.duplicates} duplicated ({time.monotonic() - t:.1f} s)"
    )
    before = _sha256(disk)

    _mover.init_repository(repo)
    say(f"2. created repository {repo} (1 MiB chunks, zstd:1)")

    s = _mover.BackupSession(repo, "web01")
    d = s.add_disk(disk, "scsi0:0", change_id="52 8e 1c-demo/1")
    full = s.commit(config=json.dumps({"name": "web01", "memoryMB": 2048, "numCPU": 2}))
    say(
        f"3. full backup {full.id}: read {fmt_bytes(d.bytes_read)} (skipped {fmt_bytes(d.bytes_skipped)} of holes), "
        f"stored {fmt_bytes(d.bytes_stored)}, {d.reused_chunks} duplicate blocks deduplicated, {d.seconds:.2f} s"
    )

    changed = rewrite_blocks(disk, 0.05, seed=8)
    after = _sha256(disk)
    say(f"4. guest wrote {len(changed)} MiB blocks; CBT reports {len(changed)} changed areas")

    s = _mover.BackupSession(repo, "web01", parent=full.id)
    d = s.add_disk(
        disk, "scsi0:0", changed_extents=[(c["start"], c["length"]) for c in changed], change_id="52 8e 1c-demo/2"
    )
    inc = s.commit()
    say(
        f"5. incremental backup {inc.id}: read only {fmt_bytes(d.bytes_read)}, {d.parent_blocks} blocks "
        f"taken from the parent, stored {fmt_bytes(d.bytes_stored)}, {d.seconds:.2f} s"
    )

    v = _mover.verify(repo, read_data=True)
    say(
        f"6. verify --read-data: {v.backups_checked} backups, {v.chunks_checked} chunks re-hashed: "
        f"{'ok' if v.ok else 'PROBLEMS'}"
    )

    ok = v.ok
    for label, meta, want in (("full", full, before), ("incremental", inc, after)):
        out = os.path.join(directory, f"restored-{label}.img")
        r = _mover.restore_disk(repo, meta["id"], out)
        same = _sha256(out) == want
        ok &= same
        say(
            f"7. restored the {label} backup to {out} in {r.seconds:.2f} s: "
            f"{'identical to' if same else 'DIFFERENT FROM'} the disk as it was"
        )

    g = _mover.gc(repo, grace_seconds=0)
    say(f"8. gc: {g.referenced_chunks} chunks in use, {g.chunks_removed} removed")
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1
