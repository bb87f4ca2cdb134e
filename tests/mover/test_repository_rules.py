"""The rules of docs/format.md, each held to by the code: what readers refuse,
what they ignore, what retention trusts, and what verify finds (everything
restore would refuse). Manifests are read and rewritten here by a reader
written from docs/format.md alone, checksummed with the real `xxh128sum`."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

from conftest import MiB

MAGIC = b"VMBKTIB\0"


def xxh128(data: bytes, tmp_path) -> bytes:
    f = tmp_path / ".xxh-input"
    f.write_bytes(data)
    out = subprocess.run(["xxh128sum", str(f)], capture_output=True, text=True, check=True).stdout
    return bytes.fromhex(out.split()[0])


def read_manifest(path):
    """Parses a version-2 manifest: (metadata, [block map as a list of 32-hex ids or None])."""
    data = path.read_bytes()
    assert data[:8] == MAGIC
    version, reserved, m = struct.unpack_from("<IIQ", data, 8)
    assert (version, reserved) == (2, 0)
    meta = json.loads(data[24 : 24 + m])
    at = 24 + m
    maps = []
    for d in meta["disks"]:
        ids: list[str | None] = []
        while len(ids) < d["blocks"]:
            tag, n = struct.unpack_from("<BQ", data, at)
            at += 9
            if tag == 0:
                ids += [None] * n
            else:
                assert tag == 1
                ids += [data[at + 16 * k : at + 16 * (k + 1)].hex() for k in range(n)]
                at += 16 * n
        maps.append(ids)
    assert at == len(data) - 16
    return meta, maps


def write_manifest(path, meta, maps, tmp_path, version=2, reserved=0):
    body = json.dumps(meta).encode()
    out = MAGIC + struct.pack("<IIQ", version, reserved, len(body)) + body
    for ids in maps:
        k = 0
        while k < len(ids):
            j = k
            while j < len(ids) and (ids[j] is None) == (ids[k] is None):
                j += 1
            out += struct.pack("<BQ", 0 if ids[k] is None else 1, j - k)
            if ids[k] is not None:
                out += b"".join(bytes.fromhex(h) for h in ids[k:j])
            k = j
    path.write_bytes(out + xxh128(out, tmp_path))


def manifest(cli, backup_id):
    return cli.repo / "backups" / f"{backup_id}.tib"


def chunk_path(cli, hex_id):
    return cli.repo / "chunks" / hex_id[:2] / hex_id


def test_the_reader_from_the_document_agrees_and_a_rewrite_is_accepted(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB) + bytes(3 * MiB) + os.urandom(MiB // 2))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    meta, maps = read_manifest(manifest(cli, b["id"]))
    assert meta["id"] == b["id"] and [m is None for m in maps[0]] == [False, True, True, True, False]
    # An unknown mode is informational: readers go on (format.md §5.1).
    meta["disks"][0]["mode"] = "something-new"
    write_manifest(manifest(cli, b["id"]), meta, maps, tmp_path)
    cli.run("restore-disk", b["id"], str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == disk.read_bytes()
    assert cli.json("verify", "--read-data")["ok"]


def _two_backups_one_damaged_one_duplicated(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(2 * MiB))
    good = cli.json("backup-disk", "--vm", "vm1", str(disk))
    newer = cli.json("backup-disk", "--vm", "vm1", str(disk))
    # Damage the newer one in its block map (its header and metadata still read).
    path = manifest(cli, newer["id"])
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    # The good one copied under a newer name: it lies about its id.
    dup = "29991231T235959Z-deadbeef"
    shutil.copy(manifest(cli, good["id"]), manifest(cli, dup))
    return good, newer, dup


def test_prune_keeps_the_only_restorable_backup_whatever_else_is_there(cli, tmp_path):
    good, newer, dup = _two_backups_one_damaged_one_duplicated(cli, tmp_path)
    p = cli.run("prune", "--keep-last", "1", "--json")
    r = json.loads(p.stdout)
    assert [k["id"] for k in r["kept"]] == [good["id"]]
    assert r["removed"] == []
    assert sorted(u["id"] for u in r["untrusted"]) == sorted([newer["id"], dup])
    assert "not trusted" in p.stderr
    for i in (good["id"], newer["id"], dup):
        assert manifest(cli, i).exists()
    cli.run("restore-disk", good["id"], str(tmp_path / "out"))


def test_snapshots_marks_what_it_cannot_trust_and_forget_cleans_it_up(cli, tmp_path):
    good, newer, dup = _two_backups_one_damaged_one_duplicated(cli, tmp_path)
    (cli.repo / "backups" / "20000101T000000Z-00000000.tib").write_bytes(b"not a manifest")
    listed = {b["id"]: b for b in cli.json("snapshots")}
    assert listed[good["id"]]["trusted"] is True and "problem" not in listed[good["id"]]
    assert listed[newer["id"]]["trusted"] is False and "checksum" in listed[newer["id"]]["problem"]
    assert listed[dup]["trusted"] is False and good["id"] in listed[dup]["problem"]
    assert listed["20000101T000000Z-00000000"] == {
        "id": "20000101T000000Z-00000000",
        "vm": None,
        "created": None,
        "trusted": False,
        "problem": listed["20000101T000000Z-00000000"]["problem"],
    }
    human = cli.run("snapshots").stdout.splitlines()
    marked = {line.split()[1] for line in human if line.startswith("! ")}
    assert marked == {newer["id"], dup, "20000101T000000Z-00000000"}
    assert any(line.startswith("  " + good["id"]) for line in human)
    # --vm keeps untrusted manifests whose VM is unknown: they may be that VM's.
    assert {b["id"] for b in cli.json("snapshots", "--vm", "other")} == {"20000101T000000Z-00000000"}

    cli.run("forget", dup, newer["id"], "20000101T000000Z-00000000")
    assert [(b["id"], b["trusted"]) for b in cli.json("snapshots")] == [(good["id"], True)]


def test_snapshots_and_retention_order_by_created_unix(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    a = cli.json("backup-disk", "--vm", "vm1", str(disk))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    # b's id sorts after a's, but it says it started a day earlier.
    meta, maps = read_manifest(manifest(cli, b["id"]))
    meta["created_unix"] -= 86400
    write_manifest(manifest(cli, b["id"]), meta, maps, tmp_path)
    assert [x["id"] for x in cli.json("snapshots")] == [b["id"], a["id"]]
    assert [k["id"] for k in cli.json("prune", "--keep-last", "1", "--dry-run")["kept"]] == [a["id"]]


def test_a_foreign_manifest_is_refused_everywhere(cli, tmp_path):
    other = tmp_path / "other"
    cli.run("init", "--repo", str(other), repo=False)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    theirs = cli.json("backup-disk", "--repo", str(other), "--vm", "vm1", str(disk), repo=False)
    shutil.copy(other / "backups" / f"{theirs['id']}.tib", manifest(cli, theirs["id"]))
    shutil.copytree(other / "chunks", cli.repo / "chunks", dirs_exist_ok=True)
    for args in (["verify"], ["verify", "--read-data"]):
        r = cli.json(*args, expect=1)
        assert [(p["kind"], p["object"]) for p in r["problems"]] == [("bad_manifest", theirs["id"])]
        assert "belongs to repository" in r["problems"][0]["message"]
    p = cli.run("restore-disk", theirs["id"], str(tmp_path / "out"), expect=1)
    assert "belongs to repository" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert cli.json("snapshots")[0]["trusted"] is False


def test_verify_finds_a_block_whose_length_is_not_its_chunks(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB + MiB // 2))
    b = cli.json("backup-disk", "--vm", "vm1", "--disk", "d0", str(disk))
    meta, maps = read_manifest(manifest(cli, b["id"]))
    full, short = maps[0]
    write_manifest(manifest(cli, b["id"]), meta, [[short, full]], tmp_path)
    for args in (["verify"], ["verify", "--read-data"]):
        r = cli.json(*args, expect=1)
        got = {(p["kind"], p["object"]) for p in r["problems"]}
        assert got == {("length_mismatch", full), ("length_mismatch", short)}, args
        assert r["problems"][0]["affected"] == [{"backup": b["id"], "vm": "vm1", "disk": "d0"}]
    # The chunks are sound: nothing was quarantined.
    assert chunk_path(cli, full).is_file() and chunk_path(cli, short).is_file()
    p = cli.run("restore-disk", b["id"], str(tmp_path / "out"), expect=1)
    assert "needs" in p.stderr


def test_verify_finds_chunks_that_are_not_regular_files(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(2 * MiB))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    _, maps = read_manifest(manifest(cli, b["id"]))
    link, directory = chunk_path(cli, maps[0][0]), chunk_path(cli, maps[0][1])
    outside = tmp_path / "outside"
    shutil.move(link, outside)
    link.symlink_to(outside)
    directory.unlink()
    directory.mkdir()
    r = cli.json("verify", expect=1)
    kinds = {p["object"]: (p["kind"], p["message"]) for p in r["problems"]}
    assert kinds[link.name][0] == "corrupt_chunk" and "symbolic link" in kinds[link.name][1]
    assert kinds[directory.name][0] == "corrupt_chunk" and "not a regular file" in kinds[directory.name][1]
    assert cli.run("restore-disk", b["id"], str(tmp_path / "out"), expect=1)


def test_verify_read_data_finds_a_symlinked_chunk(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    _, maps = read_manifest(manifest(cli, b["id"]))
    c = chunk_path(cli, maps[0][0])
    shutil.move(c, tmp_path / "outside")
    c.symlink_to(tmp_path / "outside")
    r = cli.json("verify", "--read-data", expect=1)
    assert [(p["kind"], p["object"]) for p in r["problems"]] == [("corrupt_chunk", c.name)]


def test_symlinked_config_or_chunk_directory_is_refused(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    _, maps = read_manifest(manifest(cli, b["id"]))
    sub = cli.repo / "chunks" / maps[0][0][:2]
    shutil.move(sub, tmp_path / "sub")
    sub.symlink_to(tmp_path / "sub")
    for args in (["verify"], ["verify", "--read-data"], ["restore-disk", b["id"], str(tmp_path / "o")]):
        p = cli.run(*args, expect=1)
        assert "is a symbolic link" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    sub.unlink()
    shutil.move(tmp_path / "sub", sub)
    assert cli.json("verify")["ok"]

    config = cli.repo / "config.json"
    shutil.move(config, tmp_path / "config.json")
    config.symlink_to(tmp_path / "config.json")
    for args in (["verify"], ["restore-disk", b["id"], str(tmp_path / "o")]):
        p = cli.run(*args, expect=1)
        assert "symbolic link" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_quarantined_and_temporary_names_are_ignored(cli, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(MiB))
    b = cli.json("backup-disk", "--vm", "vm1", str(disk))
    backups = cli.repo / "backups"
    (backups / f".tmp-{b['id']}.tib-1-00000000").write_bytes(b"partial")
    (backups / ".hidden.tib").write_bytes(b"partial")
    (backups / f"{b['id']}.tib.bad").write_bytes(b"x")
    (backups / "notes.txt").write_bytes(b"x")
    chunks = cli.repo / "chunks" / "00"
    (chunks / ("00" * 16 + ".bad")).write_bytes(b"x")
    (chunks / ".tmp-0000-1").write_bytes(b"x")
    (chunks / "README").write_bytes(b"x")
    assert [(x["id"], x["trusted"]) for x in cli.json("snapshots")] == [(b["id"], True)]
    r = cli.json("verify", "--read-data")
    assert r["ok"] and r["backups_checked"] == 1
    cli.run("restore-disk", b["id"], str(tmp_path / "out"))
