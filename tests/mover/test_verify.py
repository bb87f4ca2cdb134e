"""verify finds every damaged chunk, names what it affects, quarantines it,
and the next backup of the same data heals the repository."""

from __future__ import annotations

import os

from conftest import MiB


def _chunk_files(repo):
    return sorted(p for d in (repo / "chunks").iterdir() for p in d.iterdir() if not p.name.startswith("."))


def test_flipped_byte_and_truncated_chunk(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(6 * MiB))
    a = cli.json("backup-disk", "--vm", "app01", "--disk", "scsi0:0", str(disk))
    b = cli.json("backup-disk", "--vm", "app02", "--disk", "sata0:1", str(disk))  # same chunks
    chunks = _chunk_files(cli.repo)
    assert len(chunks) == 6
    flipped, truncated = chunks[1], chunks[4]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(5)

    # Without --read-data the truncated chunk is still caught (shorter than a header).
    quick = cli.run("verify", "--json", expect=1)
    import json

    quick = json.loads(quick.stdout)
    assert [p["object"] for p in quick["problems"]] == [truncated.name]

    p = cli.run("verify", "--read-data", "--json", expect=1)
    report = json.loads(p.stdout)
    assert report["ok"] is False
    bad = {pr["object"]: pr for pr in report["problems"]}
    assert set(bad) == {flipped.name, truncated.name}
    # The quick verify already quarantined the truncated one: now it is missing.
    assert bad[flipped.name]["kind"] == "corrupt_chunk"
    assert bad[truncated.name]["kind"] == "missing_chunk" and "quarantined" in bad[truncated.name]["message"]
    for pr in bad.values():
        assert {(x["backup"], x["vm"], x["disk"]) for x in pr["affected"]} == {
            (a["id"], "app01", "scsi0:0"),
            (b["id"], "app02", "sata0:1"),
        }
    # Quarantined: never trusted for dedup again.
    assert not flipped.exists() and flipped.with_name(flipped.name + ".bad").exists()

    # Restore refuses to write wrong bytes.
    r = cli.run("restore-disk", a["id"], str(tmp_path / "out"), expect=1)
    assert "missing" in r.stderr or "corrupt" in r.stderr
    assert not (tmp_path / "out").exists()

    # The next backup of the same data stores the chunks again; all is sound.
    c = cli.json("backup-disk", "--vm", "app01", str(disk))
    assert c["new_chunks"] == 2
    assert cli.json("verify", "--read-data")["ok"]


def test_corrupt_manifest_is_reported_and_gc_refuses_to_guess(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(2 * MiB))
    a = cli.json("backup-disk", "--vm", "v", str(disk))
    manifest = cli.repo / "backups" / f"{a['id']}.tib"
    data = bytearray(manifest.read_bytes())
    data[-20] ^= 0xFF
    manifest.write_bytes(bytes(data))
    import json

    report = json.loads(cli.run("verify", "--json", expect=1).stdout)
    assert report["problems"][0]["kind"] == "bad_manifest"
    assert report["problems"][0]["affected"][0]["vm"] == "v"
    p = cli.run("gc", "--grace", "0", expect=1)
    assert "nothing" in p.stderr.lower() or "before removing anything" in p.stderr
    assert len(_chunk_files(cli.repo)) == 2


def test_a_chunk_cut_short_by_a_power_cut_is_stored_again(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(3 * MiB))
    cli.json("backup-disk", "--vm", "v", str(disk))
    torn = _chunk_files(cli.repo)[0]
    torn.write_bytes(b"")  # what delayed allocation can leave after a crash
    b = cli.json("backup-disk", "--vm", "v", str(disk))
    assert b["new_chunks"] == 1 and b["reused_chunks"] == 2
    assert cli.json("verify", "--read-data", b["id"])["ok"]


def test_hostile_repository_files_are_errors_not_hangs(cli, tmp_path):
    import json

    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(2 * MiB))
    b = cli.json("backup-disk", "--vm", "v", str(disk))
    chunk = _chunk_files(cli.repo)[0]
    chunk.unlink()
    chunk.symlink_to("/dev/zero")  # reading it naively never ends
    report = json.loads(cli.run("verify", "--read-data", "--json", expect=1, timeout=30).stdout)
    assert report["problems"][0]["object"] == chunk.name
    # A manifest (with a valid checksum) claiming a 4 EiB chunk size must not
    # size an allocation: it is refused as corrupt.
    from vmbackup import _mover

    manifest = cli.repo / "backups" / f"{b['id']}.tib"
    data = manifest.read_bytes()
    n = int.from_bytes(data[16:24], "little")
    head = json.loads(data[24 : 24 + n])
    head["chunk_size"] = 1 << 62
    head["disks"][0]["blocks"] = 1
    meta = json.dumps(head).encode()
    one_zero_block = bytes([0]) + (1).to_bytes(8, "little")  # a run of one zero block (format.md §5.2)
    body = data[:16] + len(meta).to_bytes(8, "little") + meta + one_zero_block
    manifest.write_bytes(body + bytes.fromhex(_mover.chunk_id(body)))
    p = cli.run("restore-disk", b["id"], str(tmp_path / "out"), expect=1)
    assert "chunk size 4611686018427387904 where the repository uses 1048576" in p.stderr
