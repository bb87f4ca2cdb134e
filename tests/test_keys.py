"""Key slots (vmbackup.keys): the master key wrapped by passphrases and a
recovery key; any slot opens it, a wrong one opens none, the last slot stays."""

from __future__ import annotations

import json
import os
import stat

import pytest
from pydantic import SecretStr
from vmbackup import keys
from vmbackup.errors import InvalidInputError, KeyRequiredError, WrongKeyError

# Fast parameters for the many unwraps below; the defaults are tested once.
FAST = {"name": "argon2id", "memory_kib": 1024, "iterations": 1, "lanes": 1}
RID = "0123456789abcdef"


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    return r


def test_default_kdf_is_argon2id_with_rfc9106_parameters(repo):
    assert keys.has_argon2id()  # cryptography >= 44 has it; the venv's must
    master = keys.new_master_key()
    name = keys.add_passphrase_slot(repo, master, SecretStr("correct horse"), RID)
    (slot,) = keys.list_slots(repo)
    assert slot.name == name and slot.kind == "passphrase"
    assert {k: v for k, v in slot.header["kdf"].items() if k != "salt"} == keys.ARGON2ID
    assert keys.unwrap_with_passphrase([slot], SecretStr("correct horse")) == (master, name)
    path = repo / "keys" / f"{name}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert master not in path.read_bytes() and b"correct horse" not in path.read_bytes()


def test_scrypt_slots_open_too(repo):
    master = keys.new_master_key()
    scrypt = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1}
    name = keys.add_passphrase_slot(repo, master, SecretStr("pw"), RID, kdf=scrypt)
    assert keys.unwrap_with_passphrase(keys.list_slots(repo), SecretStr("pw")) == (master, name)


def test_every_slot_opens_and_a_wrong_passphrase_opens_none(repo):
    master = keys.new_master_key()
    a = keys.add_passphrase_slot(repo, master, SecretStr("alpha"), RID, kdf=FAST)
    b = keys.add_passphrase_slot(repo, master, SecretStr("beta"), RID, kdf=FAST)
    slots = keys.list_slots(repo)
    assert {s.name for s in slots} == {a, b}
    assert keys.unwrap_with_passphrase(slots, SecretStr("alpha")) == (master, a)
    assert keys.unwrap_with_passphrase(slots, SecretStr("beta")) == (master, b)
    assert keys.unwrap_with_passphrase(slots, SecretStr("gamma")) is None
    with pytest.raises(InvalidInputError, match="empty"):
        keys.unwrap_with_passphrase(slots, SecretStr(""))


def test_remove_never_the_last_slot(repo):
    master = keys.new_master_key()
    a = keys.add_passphrase_slot(repo, master, SecretStr("alpha"), RID, kdf=FAST)
    b = keys.add_passphrase_slot(repo, master, SecretStr("beta"), RID, kdf=FAST)
    keys.remove_slot(repo, a)
    assert [s.name for s in keys.list_slots(repo)] == [b]
    assert keys.unwrap_with_passphrase(keys.list_slots(repo), SecretStr("alpha")) is None
    with pytest.raises(InvalidInputError, match="last"):
        keys.remove_slot(repo, b)
    with pytest.raises(InvalidInputError, match="no key slot"):
        keys.remove_slot(repo, "passphrase-00000000")
    assert [s.name for s in keys.list_slots(repo)] == [b]


def test_a_tampered_slot_header_does_not_open(repo):
    master = keys.new_master_key()
    name = keys.add_passphrase_slot(repo, master, SecretStr("alpha"), RID, kdf=FAST)
    path = repo / "keys" / f"{name}.json"
    doc = json.loads(path.read_text())
    doc["header"]["repository"] = "ffffffffffffffff"  # a slot moved to another repository
    path.write_text(json.dumps(doc))
    assert keys.unwrap_with_passphrase(keys.list_slots(repo), SecretStr("alpha")) is None


def test_recovery_key_opens_and_only_its_own_slot(repo, tmp_path):
    master = keys.new_master_key()
    keys.add_passphrase_slot(repo, master, SecretStr("alpha"), RID, kdf=FAST)
    private = keys.new_recovery_key()
    out = tmp_path / "recovery.key"
    fp = keys.write_recovery_key(out, private, RID)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    public = keys._raw_public(private.public_key())
    name = keys.add_recovery_slot(repo, master, public, RID)
    slots = keys.list_slots(repo)
    recovery = [s for s in slots if s.kind == "recovery"]
    assert [s.name for s in recovery] == [name] and recovery[0].describe()["recovery_key"] == fp
    # the file read back opens the repository; another recovery key does not
    assert keys.unwrap_with_recovery(slots, keys.read_recovery_key(out)) == (master, name)
    assert keys.unwrap_with_recovery(slots, keys.new_recovery_key()) is None
    # the passphrase slot does not open with the recovery key and vice versa
    assert keys.unwrap_with_passphrase(recovery, SecretStr("alpha")) is None
    # never written over an existing file
    with pytest.raises(InvalidInputError, match="exists"):
        keys.write_recovery_key(out, keys.new_recovery_key(), RID)
    assert keys.unwrap_with_recovery(slots, keys.read_recovery_key(out)) == (master, name)


def test_read_secret_file_drops_one_newline_and_refuses_odd_files(tmp_path):
    f = tmp_path / "pw"
    f.write_text("two words\n")
    assert keys.read_secret_file(str(f)).get_secret_value() == "two words"
    f.write_text("ends in spaces  \n\n")
    assert keys.read_secret_file(str(f)).get_secret_value() == "ends in spaces  \n"
    with pytest.raises(InvalidInputError, match="not a regular file"):
        keys.read_secret_file(str(tmp_path))
    with pytest.raises(InvalidInputError, match="cannot read"):
        keys.read_secret_file(str(tmp_path / "nope"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        keys.read_secret_file(str(tmp_path / "fifo"))  # does not block


def test_unwrap_errors_name_the_source_never_the_secret(tmp_path):
    from vmbackup import _mover

    repo = tmp_path / "real"
    rid = _mover.init_repository(str(repo)).id  # unwrap() keeps only the slots of this repository's id
    master = keys.new_master_key()
    keys.add_passphrase_slot(repo, master, SecretStr("alpha"), rid, kdf=FAST)
    keys.add_passphrase_slot(repo, keys.new_master_key(), SecretStr("other"), RID, kdf=FAST)
    with pytest.raises(KeyRequiredError, match="VMBACKUP_PASSPHRASE or --passphrase-file"):
        keys.unwrap(repo, keys.KeySource())
    with pytest.raises(WrongKeyError) as e:
        keys.unwrap(repo, keys.KeySource(passphrase=SecretStr("sekrit-wrong"), where="--passphrase-file pw"))
    assert "--passphrase-file pw" in str(e.value) and "sekrit" not in str(e.value)
    assert keys.unwrap(repo, keys.KeySource(passphrase=SecretStr("alpha")))[0] == master
    # a slot of another repository, copied in, is not tried
    with pytest.raises(WrongKeyError):
        keys.unwrap(repo, keys.KeySource(passphrase=SecretStr("other")))
