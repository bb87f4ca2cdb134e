"""Transports: how the frozen disks of a snapshot reach the mover.

Each transport's ``open`` returns one mover source per disk or raises
``TransportImpossible`` (the procedure then tries the next one in the plan's
order); ``close`` undoes everything ``open`` did, on every path, and is safe
to call twice. What they create is written in the ledger before it exists.

- ``HotAdd``: attach the frozen disk files to the agent VM (ReconfigVM, no
  fileOperation, so detaching never deletes a file); if the frozen files
  cannot be attached, a linked clone of the snapshot is made and its disks
  are attached. The mover reads ``agent.device_dir/<disk uuid>``.
- ``Direct``: the agent's own mount of the datastore; the mover reads the
  frozen base disk's VMDK descriptor (a delta of an older snapshot chain is
  not readable that way, so it is impossible then).
- ``Nbd``: one NBD server per disk from the plan's command template; the
  mover's NBD client reads ``nbd+unix:///?socket=...``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pyVmomi import vim

from ..errors import BackupError
from ..plan import Agent, Plan
from .inventory import CLONE_PREFIX, DiskInfo, datastore_of, disks_of
from .ledger import Entry, Ledger
from .tasks import run_task

log = logging.getLogger(__name__)

NBD_START_TIMEOUT = 30.0


class TransportImpossible(Exception):
    """This transport cannot reach these disks; try the next one."""


@dataclass(frozen=True)
class Frozen:
    """A disk as of the snapshot."""

    disk: DiskInfo
    file: str  # "[ds] vm/disk.vmdk": the frozen top of the chain
    datastore: str
    change_id: str | None
    has_parent: bool


def frozen_disks(snapshot: Any, disks: list[DiskInfo]) -> list[Frozen]:
    by_key = {dev.key: dev for _, dev in disks_of(list(snapshot.config.hardware.device))}
    out = []
    for d in disks:
        dev = by_key.get(d.key)
        if dev is None:
            raise BackupError(f"disk {d.name} is not in the snapshot's configuration")
        b = dev.backing
        out.append(Frozen(d, b.fileName, datastore_of(b.fileName), getattr(b, "changeId", None), b.parent is not None))
    return out


def _rel(file_name: str) -> str:
    return file_name.split("] ", 1)[1] if "] " in file_name else file_name


@dataclass
class Context:
    client: Any
    vm: Any  # vim.VirtualMachine
    vm_name: str
    snapshot: Any
    plan: Plan
    agent: Agent
    run_id: str
    ledger: Ledger
    entry: Entry
    timeout: float = 600.0
    # VM Encryption ("key K of provider P", VmInfo.encryption) or None: the VM's
    # flat files hold ciphertext whose key is not stored with them.
    encryption: str | None = None


def _ciphertext(ctx: Context) -> str:
    return (
        f"VM {ctx.vm_name} is encrypted ({ctx.encryption}): its disk files hold ciphertext; "
        "only hot-add to an encrypted agent VM reads them"
    )


class Transport:
    name = ""
    detail: str | None = None

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        raise NotImplementedError

    def close(self) -> list[str]:
        """Undoes ``open``; returns the problems (empty if all went)."""
        return []


def agent_vm(client: Any, agent: Agent) -> Any:
    if agent.vm is None:
        return None
    for vm in client.objects(vim.VirtualMachine):
        if vm.name == agent.vm:
            return vm
    return None


def detach_files(agent_obj: Any, files: set[str], timeout: float, what: str) -> int:
    """Detaches from the agent VM every disk backed by one of ``files`` (never deleting them)."""
    devs = [dev for _, dev in disks_of(list(agent_obj.config.hardware.device)) if dev.backing.fileName in files]
    if not devs:
        return 0
    changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=dev) for dev in devs]
    run_task(lambda: agent_obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), what, timeout)
    return len(devs)


def destroy_clone(clone: Any, timeout: float) -> None:
    name = clone.name
    if str(clone.runtime.powerState) == "poweredOn":
        run_task(lambda: clone.PowerOffVM_Task(), f"powering off linked clone {name}", timeout)
    run_task(lambda: clone.Destroy_Task(), f"destroying linked clone {name}", timeout)


# One attach at a time per agent VM in this process: the free SCSI units are
# read from the agent's configuration, so two VMs attaching at once would pick
# the same unit.
_attach_locks: dict[str, threading.Lock] = {}
_attach_locks_guard = threading.Lock()


def _attach_lock(agent_moref: str) -> threading.Lock:
    with _attach_locks_guard:
        return _attach_locks.setdefault(agent_moref, threading.Lock())


class HotAdd(Transport):
    name = "hotadd"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.agent_obj: Any = None
        self.files: set[str] = set()
        self.clone: Any = None

    def _check(self, disks: list[Frozen]) -> Any:
        a = self.ctx.agent
        if a.vm is None or a.device_dir is None:
            raise TransportImpossible(f"agent {a.name} has no agent VM or device_dir")
        obj = agent_vm(self.ctx.client, a)
        if obj is None:
            raise TransportImpossible(f"agent VM {a.vm} does not exist")
        host = obj.runtime.host
        if self.ctx.encryption and getattr(obj.config, "keyId", None) is None:
            # vSphere decrypts a hot-added encrypted disk only for an encrypted VM
            # (whose host holds the key provider's keys); an unencrypted VM cannot
            # have encrypted disks at all.
            raise TransportImpossible(
                f"VM {self.ctx.vm_name} is encrypted ({self.ctx.encryption}) and agent VM {a.vm} is not: "
                "its host cannot decrypt the disks"
            )
        visible = {ds.name for ds in host.datastore} if host is not None else set()
        blind = sorted({f.datastore for f in disks} - visible)
        if blind:
            raise TransportImpossible(
                f"agent VM {a.vm} on host {host.name if host else '?'} cannot see datastore {', '.join(blind)}"
            )
        return obj

    def _attach(self, files: list[str]) -> dict[str, str]:
        with _attach_lock(self.agent_obj._moId):
            return self._attach_locked(files)

    def _attach_locked(self, files: list[str]) -> dict[str, str]:
        obj = self.agent_obj
        devices = list(obj.config.hardware.device)
        ctrl = next((d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)), None)
        if ctrl is None:
            raise TransportImpossible(f"agent VM {obj.name} has no SCSI controller for hot-add")
        used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctrl.key}
        free = [u for u in range(16) if u != 7 and u not in used]
        if len(free) < len(files):
            raise TransportImpossible(f"agent VM {obj.name} has {len(free)} free SCSI units, {len(files)} needed")
        changes = []
        for i, (fname, unit) in enumerate(zip(files, free, strict=False)):
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=fname, diskMode="independent_nonpersistent"
            )
            dev = vim.vm.device.VirtualDisk(key=-100 - i, controllerKey=ctrl.key, unitNumber=unit, backing=backing)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=dev))
        # Written down before the attach: a process killed during it leaves a trace to follow.
        self.ctx.entry.attachments += [{"agent": self.ctx.agent.name, "agent_vm": obj.name, "file": f} for f in files]
        self.ctx.ledger.write(self.ctx.entry)
        run_task(
            lambda: obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)),
            f"attaching the disks of VM {self.ctx.vm_name} to agent VM {obj.name}",
            self.ctx.timeout,
        )
        # Only now are they ours to detach: a refused attach (a file locked by
        # another attachment) must not make close() detach someone else's disk.
        self.files |= set(files)
        found = {dev.backing.fileName: dev.backing.uuid for _, dev in disks_of(list(obj.config.hardware.device))}
        out = {}
        for fname in files:
            uuid = found.get(fname)
            path = Path(self.ctx.agent.device_dir or "") / (uuid or "?")
            if uuid is None or not path.exists():
                raise TransportImpossible(f"attached disk {fname} does not appear as {path} on agent {obj.name}")
            out[fname] = str(path)
        return out

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        self.agent_obj = self._check(disks)
        try:
            by_file = self._attach([f.file for f in disks])
            return {f.disk.name: by_file[f.file] for f in disks}
        except BackupError as e:
            first = str(e)
            self.close()
        # The frozen files could not be attached (locked, say): a linked clone
        # of the snapshot gives new child disks on the same frozen content.
        try:
            clone_name = f"{CLONE_PREFIX}{self.ctx.vm_name}-{self.ctx.run_id}"
            self.ctx.entry.clones.append({"name": clone_name})
            self.ctx.ledger.write(self.ctx.entry)
            spec = vim.vm.CloneSpec(
                snapshot=self.ctx.snapshot,
                powerOn=False,
                template=False,
                location=vim.vm.RelocateSpec(diskMoveType="createNewChildDiskBacking"),
            )
            vm = self.ctx.vm
            self.clone = run_task(
                lambda: vm.CloneVM_Task(folder=vm.parent, name=clone_name, spec=spec),
                f"linked clone of VM {self.ctx.vm_name}",
                self.ctx.timeout,
            )
            self.ctx.entry.clones[-1]["moref"] = self.clone._moId
            self.ctx.ledger.write(self.ctx.entry)
            cdisks = {dev.key: dev.backing.fileName for _, dev in disks_of(list(self.clone.config.hardware.device))}
            files = [cdisks[f.disk.key] for f in disks]
            by_file = self._attach(files)
            self.detail = f"through linked clone {clone_name} ({first})"
            return {f.disk.name: by_file[cdisks[f.disk.key]] for f in disks}
        except (BackupError, KeyError) as e:
            raise TransportImpossible(f"attaching the frozen disks failed ({first}); the linked clone too ({e})") from e

    def close(self) -> list[str]:
        problems = []
        if self.agent_obj is not None and self.files:
            try:
                detach_files(
                    self.agent_obj, self.files, self.ctx.timeout, f"detaching disks from {self.agent_obj.name}"
                )
                self.files = set()
            except BackupError as e:
                problems.append(str(e))
        if self.clone is not None:
            try:
                destroy_clone(self.clone, self.ctx.timeout)
                self.clone = None
            except BackupError as e:
                problems.append(str(e))
        return problems


class Direct(Transport):
    name = "direct"

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        if self.ctx.encryption:
            raise TransportImpossible(_ciphertext(self.ctx))
        out = {}
        for f in disks:
            root = self.ctx.agent.datastores.get(f.datastore)
            if root is None:
                raise TransportImpossible(f"agent {self.ctx.agent.name} does not mount datastore {f.datastore}")
            if f.has_parent:
                raise TransportImpossible(
                    f"disk {f.disk.name} is a delta of an older snapshot; direct reads base disks only"
                )
            path = Path(root) / _rel(f.file)
            if not path.is_file():
                raise TransportImpossible(f"{path} is not on agent {self.ctx.agent.name}'s mount of {f.datastore}")
            out[f.disk.name] = str(path)
        return out


class Nbd(Transport):
    name = "nbd"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.workdir: Path | None = None
        self.procs: list[subprocess.Popen] = []

    def _url(self, f: Frozen) -> str:
        rel = _rel(f.file)
        flat = rel[: -len(".vmdk")] + "-flat.vmdk" if rel.endswith(".vmdk") else rel
        dc = self.ctx.client.datacenter_of(self.ctx.vm)
        dc_name = dc.name if dc is not None else ""
        return (
            f"{self.ctx.client.base_url}/folder/{quote(flat)}?dcPath={quote(dc_name, safe='')}"
            f"&dsName={quote(f.datastore, safe='')}"
        )

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        template = self.ctx.agent.nbd_command or self.ctx.plan.nbd_command
        uses_url = any("{url}" in a for a in template)
        if uses_url and self.ctx.encryption:
            raise TransportImpossible(_ciphertext(self.ctx))
        for f in disks:
            if uses_url and f.has_parent:
                raise TransportImpossible(
                    f"disk {f.disk.name} is a delta of an older snapshot; the NBD command reads one file by URL"
                )
        if shutil.which(template[0]) is None and not os.path.isfile(template[0]):
            raise TransportImpossible(f"NBD server {template[0]} is not installed")
        self.workdir = Path(tempfile.mkdtemp(prefix="vmbackup-nbd-"))
        cookie = self.ctx.client.cookie
        cookie_file = self.workdir / "cookie"
        fd = os.open(cookie_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(cookie)
        ca_file = self.ctx.client.ca_file_for_tools(self.workdir)
        out = {}
        for i, f in enumerate(disks):
            sock = self.workdir / f"disk{i}.sock"
            pidfile = self.workdir / f"disk{i}.pid"
            values = {
                "socket": str(sock),
                "pidfile": str(pidfile),
                "url": self._url(f),
                "cookie": cookie,
                "cookie_file": str(cookie_file),
                "ca_file": ca_file,
                "path": f.file,
                "vm": self.ctx.vm_name,
                "disk": f.disk.name,
                "snapshot": self.ctx.snapshot._moId,
            }
            argv = [a.format(**values) for a in template]
            log_path = self.workdir / f"disk{i}.log"
            with open(log_path, "wb") as logf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            self.procs.append(proc)
            self.ctx.entry.nbd.append({"pid": proc.pid, "socket": str(sock)})
            self.ctx.ledger.write(self.ctx.entry)
            deadline = time.monotonic() + NBD_START_TIMEOUT
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-2:]
                    # The log can echo arguments; keep the cookie out of the message.
                    msg = " / ".join(tail).replace(cookie, "***")
                    raise TransportImpossible(f"NBD server for disk {f.disk.name} did not start: {msg}")
                time.sleep(0.02)
            out[f.disk.name] = f"nbd+unix:///?socket={sock}"
        return out

    def close(self) -> list[str]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return []


TRANSPORT_CLASSES: dict[str, type[Transport]] = {"hotadd": HotAdd, "direct": Direct, "nbd": Nbd}
