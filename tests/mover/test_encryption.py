"""Encrypted repositories and keyed chunk ids (docs/format.md §3, §4.1, §5.5, §9),
on real files: what an encrypted repository's files hold, what verify finds with
and without the key, what a wrong key or a tampered manifest does, version-1
repositories still working, and chunk ids that a guest can forge under the old
scheme and cannot under the new."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB
from vmbackup import _mover, errors

BS = 256 * 1024


def files(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file()]


def chunk_files(repo: Path) -> list[Path]:
    return sorted(p for d in (repo / "chunks").iterdir() for p in d.iterdir() if not p.name.startswith("."))


def backup(repo: Path, vm: str, disk: Path, parent: str | None = None) -> str:
    s = _mover.BackupSession(str(repo), vm, parent)
    s.add_disk(str(disk), "scsi0:0")
    return s.commit(config=json.dumps({"name": vm})).id


def restored(repo: Path, backup_id: str, out: Path) -> bytes:
    _mover.restore_disk(str(repo), backup_id, str(out), overwrite=True)
    return out.read_bytes()


def keyless(code: str) -> dict:
    """Runs ``code`` in a process that never unlocked anything; it sets ``out``."""
    prog = "import json, sys\nfrom vmbackup import _mover, errors\nout = {}\n" + code + "\nprint(json.dumps(out))"
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def verify_keyless(repo: Path, read_data: bool) -> list[tuple[str, str]]:
    out = keyless(
        f"r = _mover.verify({str(repo)!r}, read_data={read_data})\n"
        "out['problems'] = [(p.kind, p.object) for p in r.problems]"
    )
    return [tuple(p) for p in out["problems"]]


# A block whose bytes are easy to search for, and one that does not compress.
MARKER = b"vmbackup-known-plaintext-0123456789abcdef-"


def known_disk(path: Path) -> bytes:
    text = (MARKER * (BS // len(MARKER) + 1))[:BS]
    data = text + os.urandom(BS) + bytes(BS) + text[::-1]
    path.write_bytes(data)
    return data


@pytest.fixture
def encrypted(tmp_path):
    key = os.urandom(32)
    repo = tmp_path / "enc"
    config = _mover.init_repository(str(repo), BS, "zstd:1", key=key)
    assert config.encrypted and config.encryption == "aes-256-gcm" and config.id_hash == "blake3-keyed"
    return repo, key


def test_an_encrypted_repository_holds_no_plaintext(encrypted, tmp_path):
    repo, key = encrypted
    disk = tmp_path / "d.img"
    data = known_disk(disk)
    bid = backup(repo, "secret-vm-name", disk)
    assert restored(repo, bid, tmp_path / "out.img") == data
    random_part = data[BS + 1000 : BS + 1064]
    found = [p for p in files(repo) if MARKER[:24] in p.read_bytes() or random_part in p.read_bytes()]
    assert found == []
    assert not any(b"secret-vm-name" in p.read_bytes() for p in files(repo))
    assert all(p.read_bytes()[:4] == b"VMBS" for p in chunk_files(repo))
    assert len(chunk_files(repo)) == 3  # text, random, reversed text; the zero block is not stored
    # No key material in the repository: the key's bytes are nowhere.
    assert not any(key in p.read_bytes() or key.hex().encode() in p.read_bytes() for p in files(repo))
    assert _mover.verify(str(repo), read_data=True).ok


def test_a_flipped_bit_in_a_chunk_is_found_with_and_without_the_key(encrypted, tmp_path):
    repo, _ = encrypted
    disk = tmp_path / "d.img"
    known_disk(disk)
    backup(repo, "vm", disk)
    assert verify_keyless(repo, read_data=True) == []
    chunk = chunk_files(repo)[0]
    good = chunk.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x04
    chunk.write_bytes(bytes(flipped))

    # Without the key: the checksum over the ciphertext.
    assert verify_keyless(repo, read_data=True) == [("corrupt_chunk", chunk.name)]
    # Verify quarantined it; put the damaged copy back for the keyed check.
    chunk.with_name(chunk.name + ".bad").rename(chunk)
    # With the key, even with the checksum made good again: the AEAD.
    import_checksum = _mover.chunk_id(bytes(flipped[:-16]))
    chunk.write_bytes(bytes(flipped[:-16]) + bytes.fromhex(import_checksum))
    assert verify_keyless(repo, read_data=True) == []  # the checksum alone is fooled...
    r = _mover.verify(str(repo), read_data=True)
    assert [(p.kind, p.object) for p in r.problems] == [("corrupt_chunk", chunk.name)]  # ...the key is not
    assert "authentication failed" in r.problems[0].message
    # A missing chunk is found without the key and without reading data.
    chunk.with_name(chunk.name + ".bad").unlink()
    assert verify_keyless(repo, read_data=False) == [("missing_chunk", chunk.name)]


def test_a_flipped_bit_in_a_manifest_makes_it_untrusted(encrypted, tmp_path):
    repo, _ = encrypted
    disk = tmp_path / "d.img"
    data = known_disk(disk)
    keep = backup(repo, "vm", disk)
    bid = backup(repo, "vm", disk, parent=keep)
    path = repo / "backups" / f"{bid}.tib"
    raw = bytearray(path.read_bytes())
    assert raw[:8] == b"VMBKTIB\0" and struct.unpack_from("<I", raw, 8)[0] == 3
    sealed_len = struct.unpack_from("<Q", raw, 16)[0]
    for where in (30, 24 + sealed_len + 5):  # in the sealed metadata; in the clear block maps
        tampered = bytearray(raw)
        tampered[where] ^= 0x01
        body = bytes(tampered[:-16])
        path.write_bytes(body + bytes.fromhex(_mover.chunk_id(body)))  # checksum made good
        good, bad = _mover.list_backups(str(repo))
        assert [b.id for b in good] == [keep]
        assert [u.file_id for u in bad] == [bid] and bad[0].info is None
        assert "not authentic" in bad[0].problem or "corrupt" in bad[0].problem
        with pytest.raises(errors.RepositoryError):
            _mover.restore_disk(str(repo), bid, str(tmp_path / "x.img"))
        kinds = [(p.kind, p.object) for p in _mover.verify(str(repo)).problems]
        assert kinds == [("bad_manifest", bid)]
    path.write_bytes(bytes(raw))
    assert restored(repo, bid, tmp_path / "out.img") == data
    # A plain (version-2) manifest dropped into an encrypted repository is not trusted.
    plain = tmp_path / "plain"
    _mover.init_repository(str(plain), BS, "zstd:1")
    other = backup(plain, "vm", disk)
    (repo / "backups" / f"{other}.tib").write_bytes((plain / "backups" / f"{other}.tib").read_bytes())
    good, bad = _mover.list_backups(str(repo))
    assert other in [u.file_id for u in bad] and other not in [b.id for b in good]


def test_a_wrong_key_and_a_missing_key_are_one_line_each(encrypted, tmp_path):
    repo, key = encrypted
    disk = tmp_path / "d.img"
    known_disk(disk)
    backup(repo, "vm", disk)
    with pytest.raises(errors.WrongKeyError) as e:
        _mover.unlock_repository(str(repo), os.urandom(32))
    assert "\n" not in str(e.value) and errors.exit_code_of(e.value) == 2
    with pytest.raises(errors.InvalidInputError):
        _mover.unlock_repository(str(repo), b"short")
    # The right key still opens it after a wrong one was tried.
    assert _mover.unlock_repository(str(repo), key).encrypted
    out = keyless(
        f"repo = {str(repo)!r}\n"
        "for name, call in [('list', lambda: _mover.list_backups(repo)),\n"
        "                   ('backup', lambda: _mover.BackupSession(repo, 'vm')),\n"
        "                   ('gc', lambda: _mover.gc(repo))]:\n"
        "    try:\n"
        "        call()\n"
        "        out[name] = None\n"
        "    except errors.KeyRequiredError as e:\n"
        "        out[name] = [str(e), errors.exit_code_of(e)]\n"
        f"_mover.unlock_repository(repo, bytes.fromhex({key.hex()!r}))\n"
        "out['after'] = len(_mover.list_backups(repo)[0])"
    )
    for name in ("list", "backup", "gc"):
        message, code = out[name]
        assert code == 2 and message == (
            f"repository {repo} is encrypted: give its passphrase (VMBACKUP_PASSPHRASE or --passphrase-file)"
        )
    assert out["after"] == 1
    # An unencrypted repository takes no key.
    plain = tmp_path / "plain"
    _mover.init_repository(str(plain))
    with pytest.raises(errors.InvalidInputError):
        _mover.unlock_repository(str(plain), key)


def test_a_version_1_repository_still_backs_up_restores_and_verifies(tmp_path):
    repo = tmp_path / "v1"
    config = _mover.init_legacy_repository(str(repo), BS, "zstd:1")
    assert (config.version, config.id_hash, config.encrypted) == (1, "xxh3-128", False)
    on_disk = json.loads((repo / "config.json").read_text())
    assert on_disk["version"] == 1 and "id_hash" not in on_disk and "encryption" not in on_disk
    disk = tmp_path / "d.img"
    data = known_disk(disk)
    full = backup(repo, "vm", disk)
    with open(disk, "r+b") as f:
        f.seek(BS)
        f.write(os.urandom(BS))
    inc = backup(repo, "vm", disk, parent=full)
    assert restored(repo, full, tmp_path / "a.img") == data
    assert restored(repo, inc, tmp_path / "b.img") == disk.read_bytes()
    names = {p.name for p in chunk_files(repo)}
    assert _mover.chunk_id(data[:BS]) in names  # still named by XXH3-128
    assert _mover.verify(str(repo), read_data=True).ok
    assert json.loads((repo / "config.json").read_text()) == on_disk


def xxh3_colliding_blocks(size: int = MiB) -> tuple[bytes, bytes]:
    """Two different blocks with the same XXH3-128, built from nothing but the
    published algorithm and its public default secret: what any guest can do.

    XXH3 (inputs over 240 bytes) adds each 8-byte lane to one accumulator and
    the product of the lane-xor-secret's two 32-bit halves to another. A lane
    whose low half equals the secret's makes that product zero, and such lanes
    add linearly: moving 2^32·d from lane 0 of stripe 0 to lane 0 of stripe 1
    (secret offsets 0 and 8) leaves every accumulator, so the hash, unchanged.
    """
    secret = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1c")  # XXH3's kSecret, bytes 0..16
    x = bytearray(os.urandom(size))
    x[0:4], x[64:68] = secret[0:4], secret[8:12]
    hi0, hi1 = struct.unpack_from("<I", x, 4)[0], struct.unpack_from("<I", x, 68)[0]
    y = bytearray(x)
    d = 0x5EED
    struct.pack_into("<I", y, 4, (hi0 + d) % 2**32)
    struct.pack_into("<I", y, 68, (hi1 - d) % 2**32)
    return bytes(x), bytes(y)


def test_forged_chunk_ids_work_on_xxh3_ids_and_never_on_keyed_ids(tmp_path):
    victim_block, forged_block = xxh3_colliding_blocks()
    assert victim_block != forged_block
    assert _mover.chunk_id(victim_block) == _mover.chunk_id(forged_block)  # a real XXH3-128 collision
    guest_disk, victim_disk = tmp_path / "guest.img", tmp_path / "victim.img"
    guest_disk.write_bytes(forged_block)
    victim_disk.write_bytes(victim_block)

    # The old scheme: the guest backs up first, the victim's block deduplicates
    # against the guest's, and the victim restores the guest's bytes while
    # verify says all is well.
    old = tmp_path / "old"
    _mover.init_legacy_repository(str(old))
    backup(old, "guest", guest_disk)
    victim = backup(old, "victim", victim_disk)
    assert restored(old, victim, tmp_path / "r.img") == forged_block
    assert _mover.verify(str(old), read_data=True).ok

    # The new scheme, unencrypted and encrypted: two ids, each VM its own bytes.
    for name, key in (("new", None), ("new-enc", os.urandom(32))):
        new = tmp_path / name
        _mover.init_repository(str(new), key=key)
        ids = {_mover.repository_chunk_id(str(new), b) for b in (victim_block, forged_block)}
        assert len(ids) == 2 and _mover.chunk_id(victim_block) not in ids
        backup(new, "guest", guest_disk)
        victim = backup(new, "victim", victim_disk)
        assert restored(new, victim, tmp_path / "r.img") == victim_block
        assert len(chunk_files(new)) == 2

    # Keyed ids of the same block differ between repositories: computing one
    # needs the repository's key.
    a, b = tmp_path / "a", tmp_path / "b"
    _mover.init_repository(str(a))
    _mover.init_repository(str(b))
    assert _mover.repository_chunk_id(str(a), victim_block) != _mover.repository_chunk_id(str(b), victim_block)


def test_an_unlocked_repository_serves_every_call(encrypted, tmp_path):
    repo, _ = encrypted
    disk = tmp_path / "d.img"
    data = known_disk(disk)
    first = backup(repo, "vm", disk)
    second = backup(repo, "vm", disk, parent=first)
    reader = _mover.DiskReader.backup(str(repo), second)
    assert reader.read(0, len(data)) == data
    _mover.forget(str(repo), first)
    assert [b.id for b in _mover.list_backups(str(repo))[0]] == [second]
    assert _mover.gc(str(repo), grace_seconds=0).chunks_removed == 0
    assert _mover.verify(str(repo), read_data=True).ok


@pytest.mark.parametrize(
    "field, value",
    [("chunk_size", 2 * BS), ("compression", "none"), ("key_check", "00" * 16), ("config_mac", "00" * 32)],
)
def test_an_altered_config_of_an_encrypted_repository_is_refused(encrypted, tmp_path, field, value):
    """Every field readers act on is under the config's MAC (docs/format.md §2):
    a chunk size or compression changed by hand is "altered", never believed."""
    repo, key = encrypted
    path = repo / "config.json"
    config = json.loads(path.read_text())
    assert config[field] != value
    path.write_text(json.dumps(config | {field: value}))
    if field == "key_check":  # the check value is the key's: another one is a wrong key
        with pytest.raises(errors.WrongKeyError):
            _mover.unlock_repository(str(repo), key)
        return
    with pytest.raises(errors.RepositoryError, match="has been altered: its MAC does not match its fields") as e:
        _mover.unlock_repository(str(repo), key)
    assert "\n" not in str(e.value) and not isinstance(e.value, errors.WrongKeyError)
    # This process holds the key (init registered it): every call refuses the repository.
    for call in (lambda: _mover.list_backups(str(repo)), lambda: _mover.record_sealer(str(repo))):
        with pytest.raises(errors.RepositoryError, match="has been altered"):
            call()


def test_records_are_sealed_under_their_name_with_the_repository_key(encrypted, tmp_path):
    repo, key = encrypted
    sealer = _mover.record_sealer(str(repo))
    assert sealer is not None and key.hex() not in repr(sealer)
    doc = b'{"vm": "web01", "clones": [{"moref": "vm-42"}]}'
    sealed = sealer.seal("ledger/web01--r1.json", doc)
    assert b"web01" not in sealed and b"vm-42" not in sealed and len(sealed) == 12 + len(doc) + 16
    assert sealer.open("ledger/web01--r1.json", sealed) == doc
    assert sealer.seal("ledger/web01--r1.json", doc) != sealed  # a random nonce each time
    assert sealer.open("ledger/db01--r1.json", sealed) is None  # moved to another name
    for i in (0, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        flipped = bytearray(sealed)
        flipped[i] ^= 0x01
        assert sealer.open("ledger/web01--r1.json", bytes(flipped)) is None
    # Another repository's key does not open it; an unencrypted repository has no sealer.
    other = tmp_path / "other"
    _mover.init_repository(str(other), key=os.urandom(32))
    assert _mover.record_sealer(str(other)).open("ledger/web01--r1.json", sealed) is None
    _mover.init_repository(str(tmp_path / "plain"))
    assert _mover.record_sealer(str(tmp_path / "plain")) is None
    # A process that never unlocked the repository cannot seal or open its records.
    out = keyless(
        f"try:\n    _mover.record_sealer({str(repo)!r})\nexcept errors.KeyRequiredError as e:\n    out['e'] = str(e)"
    )
    assert "is encrypted" in out["e"]
