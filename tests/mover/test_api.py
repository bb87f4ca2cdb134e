"""The extension's Python API: progress, cancellation, the GIL, sessions."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import MiB
from vmbackup import _mover
from vmbackup.errors import CancelledError, InvalidInputError, SourceError


@pytest.fixture
def repo(tmp_path):
    r = str(tmp_path / "repo")
    _mover.init_repository(r)
    return r


@pytest.fixture
def disk(image):
    return str(image("d.img", 64 * MiB))


def test_progress_reaches_the_total(repo, disk):
    calls = []
    s = _mover.BackupSession(repo, "v")
    d = s.add_disk(disk, "scsi0:0", progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] == d.bytes_read
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))


def test_an_exception_in_progress_aborts_and_propagates(repo, disk):
    class Stop(Exception):
        pass

    def progress(done, total):
        raise Stop()

    s = _mover.BackupSession(repo, "v")
    with pytest.raises(Stop):
        s.add_disk(disk, "scsi0:0", progress=progress)
    s.abort()
    assert _mover.list_backups(repo) == ([], [])


def test_cancel_token_stops_a_backup_and_writes_no_manifest(repo, disk):
    token = _mover.CancelToken()
    token.cancel()
    s = _mover.BackupSession(repo, "v")
    with pytest.raises(CancelledError):
        s.add_disk(disk, "scsi0:0", cancel=token)
    with pytest.raises(InvalidInputError):
        s.commit()  # no disk was added
    assert _mover.list_backups(repo)[0] == []


def test_the_gil_is_released_while_data_moves(repo, tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    s = _mover.BackupSession(repo, "v")
    t.start()
    start = time.monotonic()
    s.add_disk(str(big), "scsi0:0")
    end = time.monotonic()
    stop.set()
    t.join()
    during = [x for x in ticks if start <= x <= end]
    # A thread holding the GIL for the whole call would leave no ticks inside it.
    # (held for the whole call, it would leave at most one.)
    assert len(during) >= 3, (len(during), end - start)


def test_source_errors_are_source_errors(repo, disk, tmp_path):
    s = _mover.BackupSession(repo, "v")
    with pytest.raises(SourceError):
        s.add_disk(str(tmp_path / "missing"), "d")
    with pytest.raises(InvalidInputError):
        s.add_disk(disk, "")


def test_commit_records_config_and_attributes(repo, disk):
    s = _mover.BackupSession(repo, "v")
    s.add_disk(disk, "scsi0:0", change_id="52 de/7")
    meta = s.commit(config=json.dumps({"numCPU": 2}), attributes=json.dumps({"consistency": "crash"}))
    assert isinstance(meta, _mover.BackupInfo)
    assert meta.config == {"numCPU": 2} and meta.attributes == {"consistency": "crash"}
    assert meta.vm == "v" and meta.parent is None and meta.size == meta.disks[0].disk_size
    assert meta.disks[0].change_id == "52 de/7" and meta.disks[0].name == "scsi0:0"
    meta.config["numCPU"] = 9  # a copy: the result stays as committed
    assert meta.config == {"numCPU": 2}
    (listed,), bad = _mover.list_backups(repo)
    assert bad == [] and isinstance(listed, _mover.BackupInfo)
    fields = ("id", "vm", "created", "created_unix", "parent", "repository", "chunk_size", "config", "attributes")
    assert [getattr(listed, f) for f in fields] == [getattr(meta, f) for f in fields]
    assert listed.repository == _mover.open_repository(repo).id


def test_a_cancelled_verify_gives_no_verdict(repo, disk):
    s = _mover.BackupSession(repo, "v")
    s.add_disk(disk, "scsi0:0")
    s.commit()
    token = _mover.CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        _mover.verify(repo, read_data=True, cancel=token)
