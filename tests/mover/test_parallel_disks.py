"""Several threads add disks to one backup session at once: both disks are
provably in their data path together (each one's first progress report waits
at a barrier for the other's), the backup restores both bit-exact; commit
refuses while a disk is under way, abort cancels it. No clock is involved."""

from __future__ import annotations

import threading

import pytest
from conftest import MiB, sha256
from vmbackup import _mover
from vmbackup.errors import CancelledError, InvalidInputError


def test_two_threads_add_two_disks_to_one_session_at_once(cli, image, tmp_path):
    disks = {"scsi0:0": image("a.img", 24 * MiB, seed=3), "scsi0:1": image("b.img", 16 * MiB, seed=4)}
    session = _mover.BackupSession(str(cli.repo), "vm")
    meet = threading.Barrier(len(disks))
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        # The first report comes while the disk is under way (done < total):
        # returning from it needs the other disk to have reported too.
        if done < total:
            meet.wait()

    def add(name: str) -> None:
        try:
            results[name] = session.add_disk(str(disks[name]), name, progress=progress)
        except BaseException as e:  # an "Already borrowed" must not leave the other waiting forever
            errors.append(e)
            meet.abort()

    threads = [threading.Thread(target=add, args=(n,)) for n in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not meet.broken
    info = session.commit()
    # Recorded in the order the disks began; both complete.
    assert sorted(d.name for d in info.disks) == sorted(disks)
    for name, path in disks.items():
        out = tmp_path / f"{name}.out"
        cli.json("restore-disk", "--disk", name, info.id, str(out))
        assert sha256(out) == sha256(path)
        assert results[name].bytes_read > 0
    assert cli.json("verify", "--read-data")["ok"]


class Held:
    """A progress callback that, at the first report, says the disk is under
    way and returns only when released."""

    def __init__(self) -> None:
        self.under_way = threading.Event()
        self.release = threading.Event()

    def __call__(self, done: int, total: int) -> None:
        if not self.under_way.is_set():
            self.under_way.set()
            self.release.wait()


def test_commit_refuses_while_a_disk_is_under_way_and_a_second_disk_of_that_name(cli, image, tmp_path):
    disk = image("a.img", 24 * MiB, seed=5)
    session = _mover.BackupSession(str(cli.repo), "vm")
    held = Held()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(session.add_disk(str(disk), "d", progress=held)))
    t.start()
    held.under_way.wait()
    try:
        with pytest.raises(InvalidInputError, match="d is still being added"):
            session.commit()
        with pytest.raises(InvalidInputError, match="already being added"):
            session.add_disk(str(disk), "d")
    finally:
        held.release.set()
        t.join()
    with pytest.raises(InvalidInputError, match="already in this backup"):
        session.add_disk(str(disk), "d")
    info = session.commit()  # the session stayed open
    cli.json("restore-disk", info.id, str(tmp_path / "o"))
    assert sha256(tmp_path / "o") == sha256(disk)


def test_abort_cancels_a_disk_under_way_and_releases_the_lease(cli, image):
    disk = image("a.img", 24 * MiB, seed=6)
    session = _mover.BackupSession(str(cli.repo), "vm")
    held = Held()
    raised: list[BaseException] = []

    def add() -> None:
        try:
            session.add_disk(str(disk), "d", progress=held)
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=add)
    t.start()
    held.under_way.wait()
    session.abort()
    assert len(list((cli.repo / "locks").glob("*.lease"))) == 1  # held while the disk runs
    held.release.set()
    t.join()
    assert len(raised) == 1 and isinstance(raised[0], CancelledError)
    assert list((cli.repo / "locks").glob("*.lease")) == []
    assert cli.json("snapshots") == []
    with pytest.raises(InvalidInputError, match="closed"):
        session.add_disk(str(disk), "e")
