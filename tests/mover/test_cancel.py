"""Cancelling a long mover call from another thread (``CancelToken.cancel``)
stops it with ``CancelledError`` and leaves nothing behind. The cancel is
triggered from the first progress report, which comes while the call is
under way (done < total), and the call is held until the other thread has
cancelled: no clock is involved."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from conftest import MiB
from vmbackup import _mover
from vmbackup.errors import CancelledError


def files(root: str | Path) -> dict[str, int]:
    """Every file under root with its size."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


class CancelFromAnotherThread:
    """A progress callback: at the first report, wakes a thread that calls
    ``token.cancel()``, and returns only once it has."""

    def __init__(self) -> None:
        self.token = _mover.CancelToken()
        self.reported = threading.Event()
        self.cancelled = threading.Event()
        self.seen: list[tuple[int, int]] = []
        self.thread = threading.Thread(target=self._cancel)
        self.thread.start()

    def _cancel(self) -> None:
        self.reported.wait()
        self.token.cancel()
        self.cancelled.set()

    def __call__(self, done: int, total: int) -> None:
        self.seen.append((done, total))
        self.reported.set()
        self.cancelled.wait()

    def join(self) -> None:
        self.reported.set()  # never leave the thread waiting
        self.thread.join()
        assert self.token.cancelled
        done, total = self.seen[0]
        assert 0 < done < total, self.seen  # it was cancelled mid-way


@pytest.fixture
def repo(tmp_path):
    r = str(tmp_path / "repo")
    _mover.init_repository(r, chunk_size=256 * 1024)
    return r


def test_cancelled_backup_commits_nothing_and_holds_no_lease(repo, image):
    disk = str(image("d.img", 32 * MiB))
    before = files(repo)
    c = CancelFromAnotherThread()
    s = _mover.BackupSession(repo, "v")
    with pytest.raises(CancelledError):
        s.add_disk(disk, "scsi0:0", progress=c, cancel=c.token)
    c.join()
    s.abort()
    assert _mover.list_backups(repo) == ([], [])
    left = {f for f in files(repo) if f not in before and not f.startswith("chunks/")}
    assert left == set()  # no manifest, lease or temporary file
    # The chunks it stored are whole and reusable: a new backup restores byte for byte.
    s = _mover.BackupSession(repo, "v")
    s.add_disk(disk, "scsi0:0")
    out = Path(repo).parent / "out.raw"
    _mover.restore_disk(repo, s.commit().id, str(out))
    assert out.read_bytes() == Path(disk).read_bytes()


def test_cancelled_restore_leaves_no_output(repo, image, tmp_path):
    disk = str(image("d.img", 32 * MiB))
    s = _mover.BackupSession(repo, "v")
    s.add_disk(disk, "scsi0:0")
    bid = s.commit().id
    outdir = tmp_path / "restore"
    outdir.mkdir()
    for fmt in ("raw", "vmdk"):
        c = CancelFromAnotherThread()
        with pytest.raises(CancelledError):
            _mover.restore_disk(repo, bid, str(outdir / f"out.{fmt}"), format=fmt, progress=c, cancel=c.token)
        c.join()
        assert files(outdir) == {}, fmt


def test_cancelled_verify_changes_nothing(repo, image):
    s = _mover.BackupSession(repo, "v")
    s.add_disk(str(image("d.img", 32 * MiB)), "scsi0:0")
    s.commit()
    before = files(repo)
    c = CancelFromAnotherThread()
    with pytest.raises(CancelledError):
        _mover.verify(repo, read_data=True, progress=c, cancel=c.token)
    c.join()
    assert files(repo) == before
    assert _mover.verify(repo, read_data=True).ok
