"""The cleanup ledger: what a run made in vSphere, written down before it is made.

One JSON file per run and VM in ``<repository>/ledger/`` (shared by every agent
writing to the repository), replaced atomically (write, fsync, rename, fsync
the directory) at each step. A step is recorded *before* it is taken, so a
process killed between the two leaves an entry that reconcile or the sweeper
can follow; what the entry names may not exist, and removing it is then a
no-op. The entry is deleted once everything it names is gone.

Liveness is a heartbeat in the repository, as the mover's leases
(``mover/core/src/lease.rs``): while a run holds an entry (``Ledger.hold``), a
thread of the holder sets the entry file's mtime to now every
``HEARTBEAT_SECONDS``. Every agent sharing the repository sees it, so a
sweeper on another machine never takes a run that is alive for dead. A run
is dead when its heartbeat is older than ``STALE_AFTER_SECONDS`` plus
``CLOCK_SKEW_SECONDS`` (the mtime is the file server's clock, the judge's
clock is its own), or, on the machine that wrote the entry (same boot, same
pid namespace), when its process no longer runs there: a run that crashed
here is not waited for. A different machine's entry is never judged by its
pid. On that machine the entry's pid is taken with its process's start time
(``process_started``): a pid the kernel gave again to another process (or
to this one, after a restart) is not the writer, which is dead. Entries
written before the heartbeat existed are judged by their mtime as well (their
last write).

In an encrypted repository each entry is sealed under the repository's
record key (``records.py``, docs/format.md §1.1), so whoever can write the
repository cannot forge an entry that names a VM to destroy or a disk to
detach: an entry that fails authentication is skipped by every reader
(reconcile, the sweeper, restores), with one warning line, and nothing it
names is touched. The heartbeat only sets the mtime, so it costs no sealing,
and liveness needs no key: an entry that cannot be authenticated (swept
without the passphrase, or altered) whose file is fresh still holds the VM
its file name says (``Ledger.unread_holds``), so no reader removes what a
live run it cannot read is using.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import records

log = logging.getLogger(__name__)

#: How often a holder sets its entry's mtime to now.
HEARTBEAT_SECONDS = 60.0
#: Five missed heartbeats: a holder stalled for minutes (an NFS server
#: failing over, a suspended agent) is not taken for dead.
STALE_AFTER_SECONDS = 5 * HEARTBEAT_SECONDS
#: How far the file server's clock (which sets the mtime) and the judge's may
#: disagree; the same allowance as the mover's leases.
CLOCK_SKEW_SECONDS = 300.0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def ledger_dir(repository: str | os.PathLike) -> Path:
    return Path(repository) / "ledger"


def process_space() -> str | None:
    """Where this process's pid means something: the boot and the pid namespace.

    Two agents with one host name (cloned VMs, containers) have different
    boot ids or pid namespaces, so neither reads the other's pid as its own.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/{ns}"


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of
    ``/proc/<pid>/stat``), or None when it does not run (or there is no /proc).

    With the pid it names one process of a boot: a pid the kernel gave again
    to another process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after its last ')'
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


#: ``Entry.started`` until ``__post_init__`` reads the start of the entry's ``pid``.
_UNREAD = -1


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Entry:
    """What one run did to one VM."""

    run_id: str
    vm: str
    vm_moref: str
    pid: int = field(default_factory=os.getpid)
    machine: str = field(default_factory=socket.gethostname)
    space: str | None = field(default_factory=process_space)  # where ``pid`` means something
    # when ``pid`` started (process_started): a pid reused by another process is not the writer.
    # None in an entry of an older version (judged by pid alone).
    started: int | None = _UNREAD
    created_unix: float = field(default_factory=time.time)
    attempt: str | None = None  # this try of the run (snapshots.new_attempt); a retry has another
    snapshot: dict[str, str] | None = None  # {"name", "moref", "create_task", "remove_task"}
    attachments: list[dict[str, Any]] = field(default_factory=list)  # {"agent", "agent_vm", "file"}
    clones: list[dict[str, str]] = field(default_factory=list)  # {"name", "moref"}
    # SCSI controllers hot-add added to an agent VM for backup disks: {"agent", "agent_vm", "bus", "key"}
    # ("key" once it exists); reconcile removes one left empty by a process killed before removing it.
    controllers: list[dict[str, Any]] = field(default_factory=list)
    nbd: list[dict[str, Any]] = field(default_factory=list)  # {"pid", "socket"}
    # A restore's entry (vsphere/restore.py): {"name", "source", "point", "in_place", "create_task",
    # "moref", "done"}; ``vm`` is then the restored VM's name. Written before CreateVM_Task, so that a
    # killed restore's half-made VM is named; reconcile and the sweeper destroy it unless "done" or in place.
    restore: dict[str, Any] | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.started == _UNREAD:
            self.started = process_started(self.pid)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "path"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    def heartbeat_age(self, now: float | None = None) -> float:
        """Seconds since the holder's last heartbeat (the entry file's mtime); inf if it is gone."""
        if self.path is None:
            return float("inf")
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return float("inf")
        return (time.time() if now is None else now) - mtime

    def _here(self) -> bool:
        """Whether ``pid`` is a process of this machine (the same boot and pid namespace)."""
        if self.space is not None:
            return self.space == process_space()
        return self.machine == socket.gethostname()  # an entry of an older version

    def alive(self, now: float | None = None) -> bool:
        """True while the run that wrote this entry may still be at work on its VM.

        On the entry's own machine a process that is gone is dead at once
        (and one of this process is alive while it holds the entry); on any
        machine a heartbeat older than the staleness bound is dead.
        """
        if self._here():
            if self.started is not None and process_started(self.pid) not in (None, self.started):
                return False  # the pid is another process's now: the writer is gone
            if self.pid == os.getpid():
                return self.path is not None and _held(self.path)
            if not _pid_runs(self.pid):
                return False
        return self.heartbeat_age(now) <= STALE_AFTER_SECONDS + CLOCK_SKEW_SECONDS

    def holder(self) -> str:
        """Who holds the entry, for a message: run, pid, machine, heartbeat age."""
        age = self.heartbeat_age()
        beat = f"heartbeat {age:.0f} s ago" if age != float("inf") else "no heartbeat"
        return f"run {self.run_id} (pid {self.pid} on {self.machine}, {beat})"


class Heartbeat:
    """A thread that sets an entry file's mtime to now every ``every`` seconds until stopped.

    It never creates the file: once the entry is removed (by its run, or by
    a sweeper that took the run for dead) it stops and says so in ``lost``.
    """

    def __init__(self, path: Path, every: float = HEARTBEAT_SECONDS):
        self.path = path
        self.every = every
        self.beats = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ledger-heartbeat {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                log.warning("ledger entry %s is gone while its run holds it", self.path.name)
                return
            except OSError as err:  # a file server failing over: the next beat tries again
                log.warning("heartbeat of ledger entry %s failed: %s", self.path.name, err)
                continue
            self.beats += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


# The entries this process holds, by path: their heartbeats.
_beating: dict[Path, Heartbeat] = {}
_beating_lock = threading.Lock()


def _held(path: Path) -> bool:
    with _beating_lock:
        return path in _beating


class Ledger:
    """The ledger directory of a repository."""

    def __init__(self, repository: str | os.PathLike):
        self.root = Path(repository)
        self.dir = ledger_dir(repository)
        self._untrusted: set[str] = set()  # said once per ledger: skipped entries
        self._unread: dict[str, Path] = {}  # the entries the last reads could not trust, by file name

    def path(self, run_id: str, vm: str, attempt: str | None = None) -> Path:
        # One file per attempt: a retry never overwrites what an earlier attempt left.
        att = f"--{_safe(attempt)}" if attempt else ""
        return self.dir / f"{_safe(vm)}--{_safe(run_id)}{att}.json"

    def write(self, entry: Entry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = entry.path or self.path(entry.run_id, entry.vm, entry.attempt)
        text = records.encode(self.root, path, entry.to_dict(), indent=1)  # sealed when encrypted
        entry.path = path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def hold(self, entry: Entry, *, every: float = HEARTBEAT_SECONDS) -> Heartbeat:
        """Writes the entry and keeps it alive (a heartbeat thread) until ``release`` or ``remove``.

        Call ``release`` (or ``remove``) on every path out of the run: an entry
        held by a process that goes on (a worker) but left by its run would
        keep its VM busy until the process exits.
        """
        self.write(entry)
        assert entry.path is not None
        with _beating_lock:
            beat = _beating.get(entry.path)
            if beat is None:
                beat = _beating[entry.path] = Heartbeat(entry.path, every)
        return beat

    def release(self, entry: Entry) -> None:
        """Stops the entry's heartbeat (the run lets go); the file stays for reconcile or the sweeper."""
        if entry.path is None:
            return
        with _beating_lock:
            beat = _beating.pop(entry.path, None)
        if beat is not None:
            beat.stop()

    def remove(self, entry: Entry) -> None:
        self.release(entry)
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    def entries(self, vm: str | None = None) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        out = []
        pattern = f"{_safe(vm)}--*.json" if vm is not None else "*.json"
        for p in sorted(self.dir.glob(pattern)):
            try:
                d = records.read(self.root, p)
                if not _well_formed(d):
                    raise records.UntrustedRecord(f"{records.name_of(self.root, p)}: not a ledger entry")
                d.setdefault("space", None)  # written before entries said where their pid runs
                d.setdefault("restore", None)
                d.setdefault("started", None)  # written before entries said when their process started
                e = Entry(**d)
            except records.UntrustedRecord as err:
                self._skip(p, str(err))
                continue
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # a torn or foreign file, or gone meanwhile: not ours to act on
            self._unread.pop(p.name, None)
            if vm is not None and e.vm != vm:
                continue
            e.path = p
            out.append(e)
        return out

    def _skip(self, path: Path, why: str) -> None:
        """Says once per ledger (one line) that an entry is not acted upon."""
        self._unread[path.name] = path
        if path.name in self._untrusted:
            return
        self._untrusted.add(path.name)
        log.warning("ledger entry skipped, nothing it names is touched: %s", why)

    def untrusted(self) -> list[str]:
        """The names of the entries this ledger skipped as untrusted so far."""
        return sorted(self._untrusted)

    def unread_holders(self, now: float | None = None) -> list[str]:
        """The entries ``entries`` could not authenticate (sealed and read
        without the key, altered, foreign) whose file is a regular file with a
        fresh heartbeat (its mtime, within the bound a trusted entry's
        liveness uses): the run that holds one may be alive, so the VMs its
        file name may name are busy (``unread_holds``)."""
        t = time.time() if now is None else now
        out = []
        for name, p in sorted(self._unread.items()):
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and t - st.st_mtime <= STALE_AFTER_SECONDS + CLOCK_SKEW_SECONDS:
                out.append(name)
        return out

    def unread_holds(self, vm: str, now: float | None = None) -> str | None:
        """The name of an unread entry with a fresh heartbeat whose file name is
        one of ``vm``'s (``<safe vm>--*.json``), or None. Liveness needs no
        key: the heartbeat is the file's mtime and the VM is in its name."""
        prefix = f"{_safe(vm)}--"
        return next((n for n in self.unread_holders(now) if n.startswith(prefix)), None)

    def unread_vm_names(self, now: float | None = None) -> set[str]:
        """Every safe VM name an unread entry with a fresh heartbeat may be of: its file
        name up to each ``--`` (a VM's name may hold ``--`` itself)."""
        out = set()
        for n in self.unread_holders(now):
            parts = n.removesuffix(".json").split("--")
            out |= {"--".join(parts[:i]) for i in range(1, len(parts))}
        return out


def safe_name(name: str) -> str:
    """A VM's name as it is in its ledger entries' file names."""
    return _safe(name)


_LISTS = ("attachments", "clones", "controllers", "nbd")


def _well_formed(d: Any) -> bool:
    """Whether an authentic document has the shape of an entry (the readers index into it)."""
    if not isinstance(d, dict) or not isinstance(d.get("vm"), str) or not isinstance(d.get("run_id"), str):
        return False
    if not all(isinstance(x, dict) for k in _LISTS for x in (d.get(k) or [])):
        return False
    if not all(isinstance(d.get(k) or [], list) for k in _LISTS):
        return False
    return all(d.get(k) is None or isinstance(d.get(k), dict) for k in ("snapshot", "restore"))
