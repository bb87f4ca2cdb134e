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


def test_a_deep_file_a_fifo_and_a_symlink_in_the_ledger_are_each_skipped_in_one_line(tmp_path, caplog):
    """Read with bounds (records.read): JSON nested past the parser's depth, a
    FIFO (which a plain read would wait on forever) and a symlink (here to
    /dev/zero) are untrusted, one line each; the good entry is still read."""
    repo = tmp_path / "plain"
    ledger = Ledger(repo)
    ledger.write(Entry(run_id="ok", vm="web01", vm_moref="vm-1"))
    (ledger.dir / "deep--r1.json").write_text("[" * 200000)
    os.mkfifo(ledger.dir / "fifo--r1.json")
    os.symlink("/dev/zero", ledger.dir / "link--r1.json")
    big = ledger.dir / "big--r1.json"
    big.write_text(" " * (records.MAX_RECORD_BYTES + 1))
    with caplog.at_level(logging.WARNING):
        assert [e.run_id for e in ledger.entries()] == ["ok"]
    lines = skipped(caplog)
    assert len(lines) == 4 and all("\n" not in x for x in lines)
    by = {n: next(x for x in lines if n in x) for n in ("deep", "fifo", "link", "big")}
    assert "not JSON" in by["deep"] and "not a regular file" in by["fifo"]
    assert "symlink" in by["link"] and "larger than a record" in by["big"]
    # none of them holds a VM: only a regular file can be an entry
    assert ledger.unread_holders() == ["big--r1.json", "deep--r1.json"]


def test_a_drills_record_whose_vms_is_no_dict_restarts_the_rotation(tmp_path, caplog):
    repo = tmp_path / "plain"
    repo.mkdir()
    (repo / DRILL_STATE).write_text(json.dumps({"version": 1, "vms": ["web01"]}))
    with caplog.at_level(logging.WARNING):
        assert load_drill_state(str(repo)) == {}
    (repo / DRILL_STATE).write_text("[" * 200000)
    assert load_drill_state(str(repo)) == {}


KEYLESS = """
import json, sys
from vmbackup.vsphere.ledger import Ledger
ledger = Ledger(sys.argv[1])
print(json.dumps([len(ledger.entries()), ledger.untrusted(), ledger.unread_holds("web01")]))
"""


def test_a_sealed_entry_read_without_the_key_holds_its_vm_while_its_heartbeat_is_fresh(encrypted, tmp_path):
    """Liveness needs no key: a sweeper without the passphrase (another process,
    the repository never unlocked there) cannot read the entry, but its file's
    mtime is fresh, so the VM its file name says is held; stale, it is not.
    Altered, the same (reconcile of the VM is busy, without touching a hypervisor)."""
    import subprocess
    import sys
    import time

    from vmbackup.errors import HypervisorBusyError
    from vmbackup.vsphere.ledger import CLOCK_SKEW_SECONDS, STALE_AFTER_SECONDS
    from vmbackup.vsphere.reconcile import reconcile_vm

    entry = Entry(run_id="r1", vm="web01", vm_moref="vm-17", pid=1, created_unix=time.time() - 6 * 3600)
    entry.space = "another-boot/1"
    Ledger(encrypted).write(entry)

    def keyless():
        out = subprocess.run(
            [sys.executable, "-c", KEYLESS, str(encrypted)], capture_output=True, text=True, timeout=60, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert keyless() == [0, ["web01--r1.json"], "web01--r1.json"]
    flip(entry.path)
    ledger = Ledger(encrypted)
    assert ledger.entries() == [] and ledger.unread_holds("web01") == "web01--r1.json"
    assert ledger.unread_holds("web0") is None and ledger.unread_vm_names() == {"web01"}
    with pytest.raises(HypervisorBusyError, match="web01--r1.json cannot be authenticated here"):
        reconcile_vm(None, None, "web01", None, ledger, current_run=None)
    t = time.time() - STALE_AFTER_SECONDS - CLOCK_SKEW_SECONDS - 30
    os.utime(entry.path, (t, t))
    assert ledger.unread_holds("web01") is None and keyless()[2] is None
