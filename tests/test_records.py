"""A repository's records (vmbackup/records.py, docs/format.md §1.1): the
cleanup ledger's entries and the drills' record are sealed in an encrypted
repository, and a record that fails authentication is never believed; an
unencrypted repository keeps plain JSON. Real repositories, no hypervisor
(tests/vsphere/test_ledger_heartbeat.py runs the sweeper and reconcile over a
tampered entry in the lab)."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil

import pytest
from vmbackup import _mover, records
from vmbackup.hyperv import restore as hv_restore
from vmbackup.orchestration.restore_input import DRILL_STATE, load_drill_state, save_drill_state
from vmbackup.vsphere.ledger import Entry, Ledger


@pytest.fixture
def encrypted(tmp_path):
    repo = tmp_path / "enc"
    _mover.init_repository(str(repo), key=os.urandom(32))
    return repo


def flip(path, index: int = 5) -> None:
    """Flips one bit of a sealed record's ciphertext (the envelope stays well formed)."""
    doc = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(doc["sealed"]))
    raw[index] ^= 0x01
    path.write_text(json.dumps(doc | {"sealed": base64.b64encode(bytes(raw)).decode()}))


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() or "not trusted" in r.getMessage()]


def test_a_ledger_entry_round_trips_sealed_and_a_flipped_one_is_skipped_once(encrypted, caplog):
    ledger = Ledger(encrypted)
    entry = Entry(run_id="r1", vm="web01", vm_moref="vm-17")
    entry.clones = [{"name": "vmbackup-clone-web01-r1", "moref": "vm-42"}]
    ledger.write(entry)
    text = entry.path.read_text()
    assert json.loads(text)["format"] == "vmbackup-sealed-record"
    assert "web01" not in text and "vm-42" not in text  # the file name says the VM; the content nothing
    (back,) = ledger.entries("web01")
    assert back.to_dict() == entry.to_dict() and back.path == entry.path

    good = entry.path.read_bytes()
    flip(entry.path)
    with caplog.at_level(logging.WARNING):
        assert ledger.entries("web01") == [] and ledger.entries() == []
    (line,) = skipped(caplog)
    assert "ledger/web01--r1.json" in line and "fails authentication" in line and "\n" not in line
    assert ledger.untrusted() == ["web01--r1.json"] and entry.path.exists()  # left alone, not removed

    # Moved under another VM's name: its name is associated data, so it does not open either.
    entry.path.write_bytes(good)
    moved = entry.path.with_name("db01--r1.json")
    shutil.copy(entry.path, moved)
    assert [e.path.name for e in Ledger(encrypted).entries()] == ["web01--r1.json"]
    # Plain JSON planted in an encrypted repository's ledger is not acted on.
    moved.write_text(entry.to_json())
    assert [e.path.name for e in Ledger(encrypted).entries()] == ["web01--r1.json"]


def test_an_unencrypted_repository_keeps_plain_json_entries(tmp_path):
    repo = tmp_path / "plain"
    _mover.init_repository(str(repo))
    ledger = Ledger(repo)
    entry = Entry(run_id="r1", vm="web01", vm_moref="vm-17")
    ledger.write(entry)
    assert json.loads(entry.path.read_text()) == entry.to_dict()  # as written before sealing existed
    (back,) = ledger.entries()
    assert back.to_dict() == entry.to_dict()


def test_a_locked_or_downgraded_repository_trusts_no_entry(encrypted, tmp_path, caplog):
    """Another process that never unlocked the repository (a sweep without the
    passphrase) skips every entry; plain JSON under a config switched to
    unencrypted while key slots remain is refused too."""
    import subprocess
    import sys

    Ledger(encrypted).write(Entry(run_id="r1", vm="web01", vm_moref="vm-17"))
    code = "import sys; from vmbackup.vsphere.ledger import Ledger; print(len(Ledger(sys.argv[1]).entries()))"
    p = subprocess.run([sys.executable, "-c", code, str(encrypted)], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "0" and "not unlocked here" in p.stderr, p.stderr

    plain = tmp_path / "downgraded"
    _mover.init_repository(str(plain))
    (plain / "keys").mkdir()
    (plain / "keys" / "slot-1.json").write_text("{}")
    ledger = Ledger(plain)
    (ledger.dir).mkdir()
    (ledger.dir / "web01--r1.json").write_text(Entry(run_id="r1", vm="web01", vm_moref="vm-17").to_json())
    with caplog.at_level(logging.WARNING):
        assert ledger.entries() == []
    assert "key slots" in skipped(caplog)[0]


def test_the_drills_record_is_sealed_and_an_altered_one_restarts_the_rotation(encrypted, caplog):
    state = {"web01": {"unix": 1.0, "point": "p1", "passed": True, "run": "r1"}}
    save_drill_state(str(encrypted), state)
    path = encrypted / DRILL_STATE
    assert "web01" not in path.read_text()
    assert load_drill_state(str(encrypted)) == state
    flip(path)
    with caplog.at_level(logging.WARNING):
        assert load_drill_state(str(encrypted)) == {}
    (line,) = skipped(caplog)
    assert "rotation starts again" in line and "drills.json" in line


def test_a_hyperv_restore_entry_round_trips_sealed_and_a_flipped_one_is_skipped(encrypted, caplog):
    e = hv_restore.RestoreEntry(restore_id="rs1", host="hv1", name="web01-restored", path=r"D:\VMs\web01-restored")
    hv_restore._write_entry(str(encrypted), e)
    hv_restore._drop_entry(e, remove=False)  # its heartbeat stops; the file stays
    assert "web01" not in e.file.read_text()
    (back,) = hv_restore.restore_entries(encrypted, "hv1")
    assert (back.restore_id, back.name, back.path) == ("rs1", "web01-restored", r"D:\VMs\web01-restored")
    flip(e.file)
    with caplog.at_level(logging.WARNING):
        assert hv_restore.restore_entries(encrypted, "hv1") == []
    (line,) = skipped(caplog)
    assert "ledger/restores/hyperv--hv1--rs1.json" in line


def test_a_sealed_record_is_not_believed_in_an_unencrypted_repository(encrypted, tmp_path):
    plain = tmp_path / "plain"
    _mover.init_repository(str(plain))
    save_drill_state(str(encrypted), {"web01": {"unix": 1.0}})
    shutil.copy(encrypted / DRILL_STATE, plain / DRILL_STATE)
    with pytest.raises(records.UntrustedRecord, match="sealed, but the repository is unencrypted"):
        records.decode(plain, plain / DRILL_STATE, (plain / DRILL_STATE).read_text())
