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
  mover's NBD client reads ``nbd+unix:///?socket=...``. The session cookie
  file nbdkit's cookie script reads is kept current while the read runs.
  With a pinned thumbprint (no CA file), nbdkit curl reaches the server
  through the agent's ``PinnedRelay`` (tlsrelay.py), which holds each TLS
  connection to the pin: curl would check the certificate's host name.
- ``Vddk``: nbdkit's vddk plugin over VMware's VDDK (installed by the site).

A datastore without flat files (vSAN, vVols: ``summary.type`` ``vsan`` or
``VVOL``) makes ``direct`` and a ``{url}`` NBD command impossible at expose
time: their disks are objects, not ``-flat.vmdk`` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
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

from pyVmomi import vim, vmodl

from ..errors import BackupError, HypervisorError, TransportImpossible
from ..plan import Agent, Plan
from .inventory import CLONE_PREFIX, DiskInfo, datastore_of, disks_of
from .ledger import Entry, Ledger
from .tasks import run_task
from .tlsrelay import PinnedRelay

log = logging.getLogger(__name__)

NBD_START_TIMEOUT = 30.0
# nbdkit curl's URL parameter in an NBD command; with a pinned thumbprint the
# transport gives it an http:// URL and the relay's socket (unix-socket-path=).
CURL_URL_ARG = "url={url}"


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


FLATLESS_TYPES = ("vsan", "VVOL")


def datastore_types(client: Any, vm: Any) -> dict[str, str]:
    """``summary.type`` of each datastore of the VM (``VMFS``, ``NFS``, ``vsan``, ``VVOL``, ...)."""
    out = {}
    for ds in vm.datastore or []:
        try:
            out[ds.name] = str(ds.summary.type)
        except Exception:  # noqa: BLE001 (a datastore we cannot read: no claim about it)
            continue
    return out


def _flatless(ctx: Any, disks: list[Frozen], what: str) -> None:
    """TransportImpossible if a disk is on a datastore that keeps no flat file."""
    kinds = datastore_types(ctx.client, ctx.vm)
    for f in disks:
        kind = kinds.get(f.datastore)
        if kind in FLATLESS_TYPES:
            raise TransportImpossible(
                f"disk {f.disk.name} is on {kind} datastore {f.datastore}, which has no flat file for {what}"
            )


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
    """The agent's VM (from the client's VM index: no call once the run's selection made it), or None."""
    if agent.vm is None:
        return None
    return client.vm_named(agent.vm)


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
# The SCSI controllers this process added to each agent VM for backup disks
# (removed once empty); never the agent's own boot controller.
_added_controllers: dict[str, set[int]] = {}
_attach_locks_guard = threading.Lock()


def _attach_lock(agent_moref: str) -> threading.Lock:
    with _attach_locks_guard:
        return _attach_locks.setdefault(agent_moref, threading.Lock())


class HotAdd(Transport):
    name = "hotadd"

    def __init__(self, ctx: Context, disk_mode: str = "independent_nonpersistent"):
        super().__init__(ctx)
        # A backup reads (independent_nonpersistent: nothing written reaches the
        # file); a restore writes (persistent: vsphere/restore.py).
        self.disk_mode = disk_mode
        self.agent_obj: Any = None
        self.files: set[str] = set()
        self.clone: Any = None

    def _check(self, disks: list[Frozen]) -> Any:
        a = self.ctx.agent
        if a.vm is None or a.device_dir is None:
            raise TransportImpossible(f"agent {a.name} has no agent VM or device_dir")
        ide = [f.disk.name for f in disks if f.disk.name.startswith("ide")]
        if ide:
            # VDDK: "HotAdd ... SCSI disks only; IDE disks are not supported" (Best Practices for HotAdd).
            raise TransportImpossible(
                f"disk {', '.join(ide)} is on an IDE controller; hot-add attaches SCSI disks only"
            )
        obj = agent_vm(self.ctx.client, a)
        if obj is None:
            raise TransportImpossible(f"agent VM {a.vm} does not exist")
        try:
            host = obj.runtime.host
        except vmodl.fault.ManagedObjectNotFound:  # the index named an agent VM since removed
            obj = self.ctx.client.vm_index(refresh=True).get(a.vm, [None])[0]
            if obj is None:
                raise TransportImpossible(f"agent VM {a.vm} does not exist") from None
            host = obj.runtime.host
        if self.ctx.encryption and getattr(obj.config, "keyId", None) is None:
            # vSphere decrypts a hot-added encrypted disk only for an encrypted VM
            # (whose host holds the key provider's keys); an unencrypted VM cannot
            # have encrypted disks at all.
            raise TransportImpossible(
                f"VM {self.ctx.vm_name} is encrypted ({self.ctx.encryption}) and agent VM {a.vm} is not: "
                "its host cannot decrypt the disks"
            )
        # The names of the datastores the agent's host sees: one request, however many.
        seen = self.ctx.client.properties(list(host.datastore), ["name"]) if host is not None else {}
        visible = {p["name"] for p in seen.values() if "name" in p}
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
        ctrl = self._backup_controller(len(files))
        devices = list(obj.config.hardware.device)
        used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctrl.key}
        free = [u for u in range(16) if u != 7 and u not in used]
        if len(free) < len(files):
            raise TransportImpossible(f"agent VM {obj.name} has {len(free)} free SCSI units, {len(files)} needed")
        changes = []
        for i, (fname, unit) in enumerate(zip(files, free, strict=False)):
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=fname, diskMode=self.disk_mode)
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

    def _backup_controller(self, n: int) -> Any:
        """A SCSI controller of the agent for backup disks, never its boot
        controller (the one holding the agent's own disks): a free one with
        room for ``n`` disks, else a paravirtual one added now (and removed by
        ``close`` once empty). Called under the agent's attach lock."""
        obj = self.agent_obj
        devices = list(obj.config.hardware.device)
        scsi = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)]
        added = _added_controllers.setdefault(obj._moId, set())
        own = {
            dev.controllerKey
            for _, dev in disks_of(devices)
            if dev.backing.fileName not in self.files and dev.controllerKey not in added
        }
        for c in scsi:
            if c.key in own:
                continue  # the agent's boot controller (or one with its own disks)
            used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == c.key}
            if len([u for u in range(16) if u != 7 and u not in used]) >= n:
                if c.key in added:  # another VM's run in this process added it: this entry names it too
                    self._note_controller(obj, c.busNumber, c.key)
                return c
        buses = {c.busNumber for c in scsi}
        bus = next((b for b in range(4) if b not in buses), None)
        if bus is None:
            raise TransportImpossible(
                f"agent VM {obj.name} has no SCSI controller free for backup disks and no bus left"
            )
        # Written down before it is added: a process killed before removing it
        # leaves a trace for reconcile (``reconcile.remove_added_controllers``).
        self._note_controller(obj, bus, None)
        new = vim.vm.device.ParaVirtualSCSIController(key=-300, busNumber=bus, sharedBus="noSharing")
        spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=new)])
        run_task(
            lambda: obj.ReconfigVM_Task(spec=spec),
            f"adding a SCSI controller for backup disks to agent VM {obj.name}",
            self.ctx.timeout,
        )
        for c in obj.config.hardware.device:
            if isinstance(c, vim.vm.device.VirtualSCSIController) and c.busNumber == bus:
                added.add(c.key)
                self._note_controller(obj, bus, c.key)
                return c
        raise TransportImpossible(f"the SCSI controller added to agent VM {obj.name} did not appear")

    def _note_controller(self, obj: Any, bus: int, key: int | None) -> None:
        """Names in the ledger entry a controller this process added (or is about to add) to the agent VM."""
        rec = {"agent": self.ctx.agent.name, "agent_vm": obj.name, "bus": bus}
        mine = [c for c in self.ctx.entry.controllers if c.get("agent_vm") == obj.name and c.get("bus") == bus]
        if mine and (key is None or mine[0].get("key") == key):
            return
        if key is not None:
            rec["key"] = key
        self.ctx.entry.controllers = [c for c in self.ctx.entry.controllers if c not in mine] + [rec]
        self.ctx.ledger.write(self.ctx.entry)

    def _remove_empty_controllers(self) -> None:
        """Removes the controllers this process added to the agent once no disk is on them."""
        obj = self.agent_obj
        with _attach_lock(obj._moId):
            added = _added_controllers.get(obj._moId, set())
            devices = list(obj.config.hardware.device)
            busy = {dev.controllerKey for _, dev in disks_of(devices)}
            empty = [d for d in devices if d.key in added and d.key not in busy]
            if not empty:
                return
            changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in empty]
            run_task(
                lambda: obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)),
                f"removing the backup SCSI controller of agent VM {obj.name}",
                self.ctx.timeout,
            )
            added -= {d.key for d in empty}

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
        if self.agent_obj is not None and not self.files:
            try:
                self._remove_empty_controllers()
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
        _flatless(self.ctx, disks, "a mount to read")
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
        self.relay: PinnedRelay | None = None
        self._stop: threading.Event | None = None
        self._keeper: threading.Thread | None = None

    def _url(self, f: Frozen) -> str:
        rel = _rel(f.file)
        flat = rel[: -len(".vmdk")] + "-flat.vmdk" if rel.endswith(".vmdk") else rel
        dc = self.ctx.client.datacenter_of(self.ctx.vm)
        return folder_url(self.ctx.client.base_url, flat, dc.name if dc is not None else "", f.datastore)

    def _keep_cookie(self, cookie_file: Path, every: float) -> None:
        """Every ``every`` seconds: a call on the session (which keeps it from
        idling out, and logs in again if it was dropped), then the cookie file
        rewritten if the cookie changed (nbdkit's cookie script re-reads it)."""
        assert self._stop is not None
        last = self.ctx.client.cookie
        while not self._stop.wait(every):
            try:
                now = self.ctx.client.cookie  # a round trip: re-login on NotAuthenticated
            except Exception as e:  # noqa: BLE001 (the read notices on its own if this lasts)
                log.warning("VM %s: keeping the session alive failed: %s", self.ctx.vm_name, type(e).__name__)
                continue
            if now != last:
                _write_private(cookie_file, now)
                last = now
                log.info("VM %s: session cookie renewed for the NBD servers", self.ctx.vm_name)

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        template = self.ctx.agent.nbd_command or self.ctx.plan.nbd_command
        uses_url = any("{url}" in a for a in template)
        if uses_url and self.ctx.encryption:
            raise TransportImpossible(_ciphertext(self.ctx))
        if uses_url:
            _flatless(self.ctx, disks, "the NBD command to read by URL")
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
        conn = self.ctx.client.conn
        if conn.ca_file is None and conn.thumbprint is not None and CURL_URL_ARG in template:
            # A pin, not a CA: curl's name check would refuse a certificate that
            # names another host, so the relay does TLS, held to the pin.
            self.relay = PinnedRelay(
                self.workdir / "tls.sock", conn.host, conn.port, self.ctx.client.ssl_context, conn.thumbprint
            )
            self.relay.start()
            self.relay.check()  # a certificate that is not the pinned one: one line, before nbdkit starts
        renew = int(getattr(self.ctx.plan, "cookie_renew_seconds", 300))
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_cookie, args=(cookie_file, renew), name=f"cookie-{self.ctx.vm_name}", daemon=True
        )
        self._keeper.start()
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
                "cookie_script": f"cat {shlex.quote(str(cookie_file))}",
                "cookie_renew": str(renew),
                "ca_file": ca_file,
                "path": f.file,
                "vm": self.ctx.vm_name,
                "disk": f.disk.name,
                "snapshot": self.ctx.snapshot._moId if self.ctx.snapshot is not None else "",
            }
            if self.relay is not None:
                values["url"] = "http://" + values["url"].removeprefix("https://")
            argv = [a.format(**values) for a in template]
            if self.relay is not None:
                argv.insert(template.index(CURL_URL_ARG) + 1, f"unix-socket-path={self.relay.path}")
            # The log can echo arguments; the cookie stays out of the message.
            out[f.disk.name] = self._start(argv, f, sock, self.workdir / f"disk{i}.log", "NBD server", cookie)
        return out

    def _start(self, argv: list[str], f: Frozen, sock: Path, log_path: Path, what: str, secret: str = "") -> str:
        """Start one server (recorded in the ledger before it is waited for) and
        wait for its socket; ``TransportImpossible`` with its log's last lines
        (``secret`` masked) if it exits or does not listen in time."""
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        self.procs.append(proc)
        self.ctx.entry.nbd.append({"pid": proc.pid, "socket": str(sock)})
        self.ctx.ledger.write(self.ctx.entry)
        deadline = time.monotonic() + NBD_START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                msg = " / ".join(log_path.read_text(errors="replace").strip().splitlines()[-2:])
                if secret:
                    msg = msg.replace(secret, "***")
                raise TransportImpossible(f"{what} for disk {f.disk.name} did not start: {msg}")
            time.sleep(0.02)
        return f"nbd+unix:///?socket={sock}"

    def close(self) -> list[str]:
        if self._stop is not None:
            self._stop.set()
            if self._keeper is not None:
                self._keeper.join(timeout=30)
            self._stop = self._keeper = None
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
        if self.relay is not None:
            self.relay.close()  # after nbdkit: its connections end first
            self.relay = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return []


def folder_url(base_url: str, rel: str, dc_path: str, ds_name: str) -> str:
    """The datastore HTTPS URL of a file: ``/folder/<path>?dcPath=<dc>&dsName=<ds>``
    (vSphere Web Services SDK guide, "Datastore Access (/folder)"). The path is
    percent-encoded keeping its slashes; ``dcPath`` and ``dsName`` are encoded
    whole, so a space, ``&``, ``#``, ``+`` or ``/`` in a name stays in the value."""
    return f"{base_url}/folder/{quote(rel)}?dcPath={quote(dc_path, safe='')}&dsName={quote(ds_name, safe='')}"


def _write_private(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text``, mode 0600, atomically (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def vddk_plugin_installed(nbdkit: str = "nbdkit") -> str | None:
    """None if nbdkit's vddk plugin loads, else why not (one line)."""
    if shutil.which(nbdkit) is None and not os.path.isfile(nbdkit):
        return f"{nbdkit} is not installed"
    try:
        p = subprocess.run([nbdkit, "vddk", "--dump-plugin"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"{nbdkit} cannot run: {e.strerror or e}"
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return f"nbdkit's vddk plugin is not installed ({tail})"
    return None


def server_sha1(client: Any) -> str:
    """The server certificate's SHA-1 fingerprint, as VDDK's thumbprint wants it,
    fetched over the session's own verified TLS context."""
    from .client import _peer_certificate

    der = _peer_certificate(client.conn.host, client.conn.port, client.ssl_context)
    h = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 (VDDK's format, not a security choice here)
    return ":".join(h[i : i + 2] for i in range(0, 40, 2))


def vddk_command(
    cfg: Any, *, conn: Any, thumbprint: str, vm_moref: str, snapshot_moref: str, file: str, socket: str, pidfile: str,
    password_file: str,
) -> list[str]:  # fmt: skip
    """The nbdkit command serving one frozen disk through VDDK (nbdkit-vddk-plugin(1)).

    The password goes in a 0600 file (``password=+FILE``), never on the command line."""
    argv = [cfg.nbdkit, "--exit-with-parent", "-r", "-U", socket, "-P", pidfile, "vddk"]
    argv += [f"libdir={cfg.libdir}", f"server={conn.host}"]
    if conn.port != 443:
        argv.append(f"port={conn.port}")
    argv += [f"user={conn.user}", f"password=+{password_file}", f"thumbprint={thumbprint}"]
    argv += [f"vm=moref={vm_moref}", f"snapshot={snapshot_moref}", f"transports={cfg.transports}"]
    if cfg.config is not None:
        argv.append(f"config={cfg.config}")
    argv.append(f"file={file}")
    return argv


class Vddk(Nbd):
    """nbdkit's vddk plugin: VDDK opens the frozen disk by the VM's moref and the
    snapshot's (any of VDDK's own transports: nbdssl, hotadd). VDDK is VMware's
    and not redistributable, so this is built and checked here but not run
    against the lab (docs/vsphere.md)."""

    name = "vddk"

    def open(self, disks: list[Frozen]) -> dict[str, str]:
        cfg = self.ctx.agent.vddk
        if cfg is None:
            raise TransportImpossible(f"agent {self.ctx.agent.name} has no vddk settings")
        why = vddk_plugin_installed(cfg.nbdkit)
        if why is not None:
            raise TransportImpossible(why)
        if not Path(cfg.libdir).is_dir():
            raise TransportImpossible(f"VDDK libdir {cfg.libdir} does not exist on agent {self.ctx.agent.name}")
        client = self.ctx.client
        thumbprint = cfg.thumbprint or server_sha1(client)
        self.workdir = Path(tempfile.mkdtemp(prefix="vmbackup-vddk-"))
        pw_file = self.workdir / "password"
        _write_private(pw_file, client._password.get_secret_value())
        out = {}
        for i, f in enumerate(disks):
            sock, pidfile = self.workdir / f"disk{i}.sock", self.workdir / f"disk{i}.pid"
            argv = vddk_command(
                cfg, conn=client.conn, thumbprint=thumbprint, vm_moref=self.ctx.vm._moId,
                snapshot_moref=self.ctx.snapshot._moId, file=f.file, socket=str(sock), pidfile=str(pidfile),
                password_file=str(pw_file),
            )  # fmt: skip
            out[f.disk.name] = self._start(argv, f, sock, self.workdir / f"{sock.stem}.log", "nbdkit vddk")
        pw_file.unlink(missing_ok=True)  # nbdkit read it at start
        return out


TRANSPORT_CLASSES: dict[str, type[Transport]] = {"hotadd": HotAdd, "direct": Direct, "nbd": Nbd, "vddk": Vddk}


def expose(ctx: Context, disks: list[Frozen]) -> tuple[Transport, dict[str, str]]:
    """The first of the agent's transports, in the plan's order, that reaches
    the disks; one that is impossible is undone before the next is tried."""
    reasons = []
    for name in [t for t in ctx.plan.transports if t in ctx.agent.transports]:
        t = TRANSPORT_CLASSES[name](ctx)
        try:
            return t, t.open(disks)
        except TransportImpossible as e:
            reasons.append(f"{name}: {e}")
            log.info("VM %s: transport %s impossible: %s", ctx.vm_name, name, e)
            problems = t.close()
            if problems:
                raise HypervisorError(f"undoing {name} for VM {ctx.vm_name} failed: {'; '.join(problems)}") from e
        except BaseException:
            t.close()
            raise
    raise HypervisorError(f"no transport reaches the disks of VM {ctx.vm_name}: " + "; ".join(reasons))
