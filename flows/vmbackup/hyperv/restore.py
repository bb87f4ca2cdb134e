"""Hyper-V restore verbs (``hypervisors.base.Restorer``); docs/hyperv.md, "Restore".

A point's VM comes back as a new VM on a Hyper-V host:

1. reconcile: a killed restore to the same name (the repository's restore
   ledger names it, its process is dead or its heartbeat stale) is undone on
   the host (`Remove-VmbackupRestore.ps1`);
2. prepare (`Get-VmbackupRestoreTarget.ps1`): the name is free, the folder
   does not exist but its parent does, its volume has room for the disks, the
   network map's switches exist; in place, the VM exists and is off. Nothing
   is made; a refusal is ``RestoreInputError`` (exit 2);
3. create: the ledger entry (repository, then host: `New-VmbackupRestore.ps1`)
   before the folder, which is shared to the agent unless it runs on the host;
4. write_disk: the mover writes each disk as a dynamic VHDX into the folder's
   staging subfolder, through the share or on the host;
5. finish: the configuration files staged beside them, then
   `Import-VmbackupRestore.ps1`: Compare-VM, each incompatibility resolved,
   Import-VM -Copy -GenerateNewId (a new VM Id), or the VM rebuilt from its
   description (New-VM) where the configuration cannot be imported; Start-VM
   if asked;
6. release: on success the staging, the share and the entries go; on
   failure the half-made VM and its folder too.

Every call is an adapter script over WinRM (`scripts.py`: parameters as data,
never in the script text). No Prefect.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from .. import records
from ..errors import BackupError, HypervScriptError, InvalidInputError, RestoreInputError, WinRMError
from ..hypervisors import base as hv
from ..vsphere.ledger import CLOCK_SKEW_SECONDS, STALE_AFTER_SECONDS, Heartbeat, process_space, process_started
from .client import HypervClient
from .procedure import _on_host, shadow_run_id

log = logging.getLogger(__name__)

STAGING = ".vmbackup-staging"  # the subfolder of the restore's folder the agent writes into
STATE_OFF = 3


def describe_point(config: Any, attributes: dict[str, Any]) -> hv.VmDescription:
    """The VM of a Hyper-V point (its config: ``procedure._config``)."""
    if isinstance(config, str | bytes):
        try:
            config = json.loads(config) if config else None
        except ValueError:
            config = None
    if not isinstance(config, dict) or config.get("hypervisor") != "hyperv":
        raise RestoreInputError("the backup point holds no Hyper-V configuration to restore a VM from")
    excluded = set((attributes or {}).get("excluded_disks") or [])
    disks = []
    for d in config.get("disks") or []:
        if d["name"] in excluded:
            continue
        bus = "".join(c for c in d["name"].split(":")[0] if c.isalpha()) or "scsi"
        disks.append(hv.DiskSpec(name=d["name"], capacity=int(d["size"]), bus=bus, file=d.get("file")))
    generation = config.get("generation")
    changes = []
    for d in config.get("disks") or []:
        if d["name"] not in excluded and len(d.get("chain") or []) > 1:
            changes.append(
                f"disk {d['name']}: its checkpoint chain comes back as one VHDX (checkpoints are not restored)"
            )
    if generation is None:
        changes.append(
            "the point does not record the VM's generation, processors, memory or network adapters "
            "(made before restore existed): the .vmcx gives them, else generation 2, 1 processor, 1 GiB"
        )
    where = config.get("configuration_location")
    if not where and config.get("config_files"):
        # <folder>\Virtual Machines\<id>.vmcx
        where = str(PureWindowsPath(config["config_files"][0]["path"]).parent.parent)
    return hv.VmDescription(
        name=config["name"],
        hypervisor="hyperv",
        firmware="efi" if generation == 2 else "bios" if generation == 1 else "efi",
        cpus=int(config.get("cpus") or 1),
        memory_mb=int(config.get("memory_mb") or 1024),
        disks=disks,
        nics=[
            hv.NicSpec(network=n.get("switch") or "", mac=n.get("mac"), kind="synthetic")
            for n in config.get("nics") or []
        ],
        raw=config,
        host=(attributes or {}).get("host") or config.get("host"),
        location=where or None,
        changes=changes,
    )


def generation(d: hv.VmDescription) -> int:
    """The Hyper-V generation of a described VM: 2 for UEFI firmware, 1 for BIOS."""
    return 2 if d.firmware == "efi" else 1


def places(d: hv.VmDescription) -> dict[str, str]:
    """Where each disk of ``d`` goes on Hyper-V, by name: its own name where
    the generation has that place (IDE 0-1 locations 0-1 in generation 1, SCSI
    0-3 locations 0-63), else the next free location of SCSI controller 0 (SATA
    and NVMe disks of a vSphere VM, IDE disks in generation 2, which has no
    IDE). In generation 1, which boots from IDE only, the first disk that has
    no place of its own (a SATA or NVMe boot disk) goes to IDE 0 location 0
    when no disk is there."""
    gen = generation(d)
    out: dict[str, str] = {}
    used = set()
    moved = []
    for disk in d.disks:
        bus, number, unit = _split(disk.name)
        ok = (bus == "scsi" and number < 4 and unit < 64) or (bus == "ide" and gen == 1 and number < 2 and unit < 2)
        if ok and disk.name not in used:
            out[disk.name] = disk.name
            used.add(disk.name)
        else:
            moved.append(disk.name)
    if gen == 1 and moved and "ide0:0" not in used:
        first = next((n for n in moved if _split(n)[0] not in ("scsi", "ide")), None)
        if first is not None:
            out[first] = "ide0:0"
            used.add("ide0:0")
            moved.remove(first)
    loc = 0
    for name in moved:
        while f"scsi0:{loc}" in used:
            loc += 1
        out[name] = f"scsi0:{loc}"
        used.add(out[name])
    return {disk.name: out[disk.name] for disk in d.disks}


def _split(name: str) -> tuple[str, int, int]:
    """``sata0:1`` -> ``("sata", 0, 1)``; a name of another shape -> ``(name, 99, 99)`` (no place of its own)."""
    bus = name.rstrip("0123456789:")
    try:
        number, unit = name[len(bus) :].split(":", 1)
        return bus, int(number), int(unit)
    except ValueError:
        return name, 99, 99


def hyperv_mac(mac: str | None) -> str | None:
    """A MAC address as Hyper-V writes it ('00155D0A0B0C'), from any separators."""
    if not mac:
        return None
    return "".join(c for c in mac if c.isalnum()).upper() or None


# --- the restore ledger ----------------------------------------------------------


@dataclass
class RestoreEntry:
    """A Hyper-V restore under way: written to ``<repository>/ledger/restores/``
    before anything is made on the host, removed once it is finished or undone.
    Liveness as for backups (``vsphere/ledger.py``): on this machine a dead
    pid, anywhere a heartbeat (the file's mtime) older than the bound."""

    restore_id: str
    host: str
    name: str
    path: str
    kind: str = "hyperv"
    pid: int = field(default_factory=os.getpid)
    machine: str = field(default_factory=socket.gethostname)
    space: str | None = field(default_factory=process_space)
    # the process's start (clock ticks since boot, /proc/<pid>/stat): a reused pid is not the writer
    started: int | None = field(default_factory=lambda: process_started(os.getpid()))
    created_unix: float = field(default_factory=time.time)
    file: Path | None = None

    def alive(self, now: float | None = None) -> bool:
        if self.file is None:
            return False
        if self.space is not None and self.space == process_space():
            if self.pid == os.getpid():
                return self.file in _held
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            if self.started is not None and process_started(self.pid) not in (None, self.started):
                return False  # the pid was reused: the writer is gone
        try:
            age = (time.time() if now is None else now) - self.file.stat().st_mtime
        except OSError:
            return False
        return age <= STALE_AFTER_SECONDS + CLOCK_SKEW_SECONDS


_held: dict[Path, Heartbeat] = {}


def restore_ledger(repository: str | os.PathLike) -> Path:
    return Path(repository) / "ledger" / "restores"


def _write_entry(repository: str, e: RestoreEntry) -> None:
    d = restore_ledger(repository)
    d.mkdir(parents=True, exist_ok=True)
    e.file = d / f"hyperv--{e.host}--{e.restore_id}.json"
    tmp = e.file.with_name(f".{e.file.name}.{os.getpid()}.tmp")
    body = {k: v for k, v in e.__dict__.items() if k != "file"}
    text = records.encode(repository, e.file, body)  # sealed in an encrypted repository
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, e.file)
    _held[e.file] = Heartbeat(e.file)


def _drop_entry(e: RestoreEntry, *, remove: bool) -> None:
    if e.file is None:
        return
    beat = _held.pop(e.file, None)
    if beat is not None:
        beat.stop()
    if remove:
        e.file.unlink(missing_ok=True)


def restore_entries(repository: str | os.PathLike, host: str, *, unread: set[str] | None = None) -> list[RestoreEntry]:
    """The host's restore entries that can be trusted. ``unread`` given, the
    restore id (from the file name) of each entry that cannot be authenticated
    here but is a regular file with a fresh heartbeat (its mtime) is added to
    it: that restore may be running."""
    d = restore_ledger(repository)
    out = []
    for p in sorted(d.glob(f"hyperv--{host}--*.json")) if d.is_dir() else []:
        try:
            doc = records.read(repository, p)
            if not isinstance(doc, dict):
                raise records.UntrustedRecord(f"{records.name_of(repository, p)}: not a restore entry")
            e = RestoreEntry(**doc)
        except records.UntrustedRecord as err:
            log.warning("restore ledger entry skipped, nothing it names is touched: %s", err)
            if unread is not None and _fresh_file(p):
                unread.add(p.name.removesuffix(".json")[len(f"hyperv--{host}--") :])
            continue
        except (OSError, ValueError, TypeError):
            continue  # a torn or foreign file: not ours to act on
        e.file = p
        out.append(e)
    return out


def _fresh_file(p: Path) -> bool:
    """A regular file whose mtime (the heartbeat) is within the liveness bound."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime <= STALE_AFTER_SECONDS + CLOCK_SKEW_SECONDS


def undo(client: HypervClient, restore_id: str, *, keep_vm: bool = False) -> dict[str, Any]:
    """`Remove-VmbackupRestore.ps1`: the VM registered in the restore's folder (unless ``keep_vm``),
    its share, staging, folder and host entry."""
    return client.run_script("Remove-VmbackupRestore.ps1", {"RestoreId": restore_id, "KeepVm": keep_vm}) or {}


def sweep_restores(
    client: HypervClient, repository: str | None, host: str, *, older_than_seconds: float
) -> list[dict[str, Any]]:
    """Undo the restores on ``host`` that are no longer running: those the
    repository's ledger names as dead (whatever their age), and host entries
    older than the threshold that no live ledger entry names (without a
    repository, every host entry older than the threshold: choose it above the
    longest restore, as for backups). Returns one ``{"RunId", "Kind":
    "restore", "VMs", "Created", "Deleted": []}`` per restore undone."""
    removed: list[dict[str, Any]] = []
    live: set[str] = set()  # restore ids that may be running; an unreadable entry with a fresh heartbeat too
    for e in restore_entries(repository, host, unread=live) if repository else []:
        if e.alive():
            live.add(e.restore_id)
            continue
        undo(client, e.restore_id)
        _drop_entry(e, remove=True)
        removed.append(_swept(e.restore_id, e.name, e.created_unix))
        log.warning(
            "host %s: removed restore %s of VM %s left by pid %s on %s", host, e.restore_id, e.name, e.pid, e.machine
        )
    done = {r["RunId"] for r in removed}
    answer = client.run_script("Get-VmbackupRestores.ps1") or {}
    for r in _list(answer.get("Restores")):
        rid = r.get("RestoreId")
        if not rid or rid in live or rid in done:
            continue
        created = _parse_time(r.get("Created"))
        if created is not None and time.time() - created >= older_than_seconds:
            undo(client, rid)
            removed.append(_swept(rid, r.get("Name"), created))
            log.warning("host %s: removed restore %s of VM %s (no running restore names it)", host, rid, r.get("Name"))
    return removed


def _swept(rid: str, name: Any, created: float | None) -> dict[str, Any]:
    import datetime

    when = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat() if created else None
    return {"RunId": rid, "Kind": "restore", "VMs": [str(name)] if name else [], "Created": when, "Deleted": []}


def _parse_time(text: Any) -> float | None:
    import datetime

    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- the steps -----------------------------------------------------------------------


@dataclass
class _Made:
    restore_id: str
    path: str  # the VM's folder on the host
    stage: str  # its staging subfolder
    share: str | None  # \\HOST\vmbr-...$ (None: the agent runs on the host)
    files: dict[str, str] = field(default_factory=dict)  # disk name -> staged VHDX (Windows path)
    rolled: dict[str, str] = field(default_factory=dict)  # disk name -> the VM's VHDX rolled back where it is
    final: dict[str, str] = field(default_factory=dict)  # disk name -> the VM's VHDX after import
    target: hv.Target | None = None


class HypervRestoreSteps:
    """``hypervisors.base.RestoreSteps`` onto one Hyper-V host."""

    def __init__(
        self, client: HypervClient, request: hv.RestoreRequest, plan: Any, host: Any, agent: Any, *, run_id: str
    ):
        self.client, self.request, self.plan, self.host, self.agent = client, request, plan, host, agent
        self.name = request.vm
        self.repository = str(plan.repository)
        self.local = _on_host(agent)
        self.restore_id = shadow_run_id(run_id, "restore-" + request.restored_as)
        self.description: hv.VmDescription | None = None
        self.entry: RestoreEntry | None = None
        self.made = False
        self.places: dict[str, str] = {}  # the point's disk name -> its place on Hyper-V (``places``)
        # in place: the point's disk name -> the VM's VHDX at that place, or why it cannot be rolled back there
        self.live: dict[str, str] = {}
        self.not_live: dict[str, str] = {}

    def reconcile(self) -> None:
        for e in restore_entries(self.repository, self.host.name):
            if e.name.lower() != self.request.restored_as.lower():
                continue
            if e.alive():
                raise RestoreInputError(
                    f"a restore to VM {e.name} on Hyper-V host {self.host.name} is running "
                    f"(pid {e.pid} on {e.machine}); wait for it or remove it"
                )
            log.warning(
                "restore of %s: removing what killed restore %s left on %s", e.name, e.restore_id, self.host.name
            )
            undo(self.client, e.restore_id)
            _drop_entry(e, remove=True)

    def _folder(self, d: hv.VmDescription) -> str:
        if self.request.path:
            return self.request.path.rstrip("\\")
        if d.hypervisor != "hyperv":
            # another hypervisor's point: the host's default VM path (Get-VMHost's VirtualMachinePath)
            t = self.client.run_script("Get-VmbackupRestoreTarget.ps1", {"Name": self.request.restored_as, "Path": ""})
            return str((t or {}).get("VirtualMachinePath") or "").rstrip("\\") + "\\" + self.request.restored_as
        where = d.location
        if not where:
            raise RestoreInputError(
                f"backup point {self.request.point} does not say where VM {d.name} was; give --path"
            )
        return str(PureWindowsPath(where).parent / self.request.restored_as)

    def prepare(self, description: hv.VmDescription) -> hv.Target:
        self.description = d = description
        req = self.request
        where = self.host.name
        if req.in_place:
            return self._prepare_in_place(d)
        path = self._folder(d)
        t = self.client.run_script("Get-VmbackupRestoreTarget.ps1", {"Name": req.restored_as, "Path": path}) or {}
        if t.get("Vm"):
            raise RestoreInputError(f"a VM named {req.restored_as} already exists on Hyper-V host {where}")
        if t.get("PathExists"):
            raise RestoreInputError(
                f"folder {path} already exists on Hyper-V host {where}; choose another --path or --as"
            )
        if not t.get("ParentExists"):
            raise RestoreInputError(f"folder {PureWindowsPath(path).parent} does not exist on Hyper-V host {where}")
        self._check_room_and_switches(t, d, path)
        changes = [f"new VM Id (Import-VM -GenerateNewId); folder {path}"] + list(d.changes)
        if req.restored_as != d.name:
            changes.append(f"named {req.restored_as} (was {d.name})")
        self.places = places(d)
        warnings: list[str] = []
        gen = generation(d)
        if d.hypervisor != "hyperv":
            changes.append(
                f"a {d.hypervisor} VM made as a Hyper-V generation {gen} VM (New-VM, {d.firmware.upper()} firmware): "
                "each disk as a VHDX; the guest needs Hyper-V's drivers (docs/hyperv.md, 'Across hypervisors')"
            )
            changes.append(
                "VMware Tools and the VMware devices (PVSCSI, VMXNET3, the .nvram's boot entries) do not carry over"
            )
            if gen == 1 and d.disks and not any(p.startswith("ide") for p in self.places.values()):
                # Hyper-V's BIOS boots from the emulated IDE controller only (docs/hyperv.md)
                warnings.append(
                    "a generation 1 VM boots from IDE only and every disk keeps its SCSI place (its name): "
                    "move the boot disk to IDE 0 location 0 (Set-VMHardDiskDrive) before starting the VM"
                )
        for src, dst in self.places.items():
            if src != dst:
                why = "the guest boots from IDE 0 in generation 1" if dst == "ide0:0" else "no such place"
                changes.append(f"disk {src} is {dst} on Hyper-V (generation {gen}: {why})")
        disks = [
            dataclasses.replace(x, place=self.places[x.name] if self.places[x.name] != x.name else None)
            for x in d.disks
        ]
        return hv.Target(
            restored_as=req.restored_as, host=where, location=path, disks=disks, changes=changes, warnings=warnings
        )

    def _prepare_in_place(self, d: hv.VmDescription) -> hv.Target:
        """The VM exists, is off and has a drive at each of the point's disks' places."""
        req, where = self.request, self.host.name
        t = self.client.run_script("Get-VmbackupRestoreTarget.ps1", {"Name": req.restored_as, "Path": ""}) or {}
        vm = t.get("Vm")
        if not vm:
            raise RestoreInputError(f"no VM named {req.restored_as} on Hyper-V host {where} to restore in place")
        if int(vm.get("State") or 0) != STATE_OFF:
            raise RestoreInputError(
                f"VM {req.restored_as} on Hyper-V host {where} is not powered off; an in-place restore needs it off"
            )
        places = {str(x.get("Name")) for x in _list(vm.get("Disks"))}
        missing = [x.name for x in d.disks if x.name not in places]
        if missing:
            raise RestoreInputError(
                f"VM {req.restored_as} on Hyper-V host {where} has no disk {missing[0]} (the point has it); "
                "restore as a new VM instead"
            )
        path = str(vm["ConfigurationLocation"]).rstrip("\\")
        t2 = self.client.run_script("Get-VmbackupRestoreTarget.ps1", {"Name": req.restored_as, "Path": path}) or {}
        self._check_room_and_switches(t2, d, path)
        drives = {str(x.get("Name")): str(x.get("Path") or "") for x in _list(vm.get("Disks"))}
        for x in d.disks:
            live = drives.get(x.name, "")
            if not live.lower().endswith(".vhdx"):
                self.not_live[x.name] = f"its drive's file {live or '(none)'} is not a VHDX"
            elif not live.lower().startswith(path.lower() + "\\"):
                # the agent reaches the VM's folder only (the restore's share)
                self.not_live[x.name] = f"its VHDX {live} is outside the VM's folder {path}"
            else:
                self.live[x.name] = live
        changes = [
            "in place: each disk's VHDX rolled back where it is, only the blocks that differ from the point "
            "written (compared by chunk id); the VM keeps its Id, name and configuration"
        ] + list(d.changes)
        return hv.Target(
            restored_as=req.restored_as, host=where, location=path, disks=list(d.disks), changes=changes, handle=vm
        )

    def _check_room_and_switches(self, t: dict[str, Any], d: hv.VmDescription, path: str) -> None:
        where = self.host.name
        need = sum(x.capacity for x in d.disks)
        free = t.get("FreeBytes")
        if free is not None and int(free) < need:
            raise RestoreInputError(
                f"the volume of {path} on Hyper-V host {where} has {int(free)} bytes free; "
                f"VM {d.name}'s disks need up to {need}"
            )
        switches = [str(s) for s in _list(t.get("Switches"))]
        for src, dst in self.request.network_map.items():
            if dst not in switches:
                raise RestoreInputError(
                    f"network map {src}={dst}: Hyper-V host {where} has no virtual switch {dst} "
                    f"(it has {', '.join(switches) or 'none'})"
                )

    def create(self, target: hv.Target) -> hv.Made:
        path = target.location or ""
        # named before it exists: a kill from here on leaves an entry reconcile or the sweeper follows
        self.entry = RestoreEntry(self.restore_id, self.host.name, target.restored_as, path)
        _write_entry(self.repository, self.entry)
        self.made = True
        params: dict[str, Any] = {"RestoreId": self.restore_id, "Name": target.restored_as, "Path": path}
        if not self.local:
            params["ShareTo"] = self.agent.share_account
        if self.request.in_place:
            params["InPlace"] = True
        answer = self.client.run_script("New-VmbackupRestore.ps1", params) or {}
        m = _Made(self.restore_id, path, answer.get("StagePath") or f"{path}\\{STAGING}", answer.get("SharePath"))
        m.target = target
        vm_id = str(target.handle["Id"]) if self.request.in_place and target.handle else None
        return hv.Made(vm_id=vm_id, transport="local" if self.local else "share", handle=m)

    def _mapped(self, m: _Made, winpath: str) -> Path:
        """Where the agent reaches ``winpath`` (inside the restore's folder): through the share or on the host."""
        inside = winpath
        if m.share:
            inside = m.share + winpath[len(m.path) :]
        mapped = self.agent.map_windows_path(inside)
        if mapped is None:
            raise BackupError(f"agent {self.agent.name} has no windows_paths entry for {inside}")
        return Path(mapped)

    def _file_name(self, disk: hv.DiskSpec) -> str:
        """The restored VHDX's name: the disk's base file's, renamed with the VM (``win01-disk1`` -> ``new-disk1``)."""
        raw = self.description.raw if self.description.hypervisor == "hyperv" else None
        saved = (raw or {}).get("disks", []) if isinstance(raw, dict) else []
        chain = next((x.get("chain") for x in saved if isinstance(x, dict) and x.get("name") == disk.name), None)
        base = PureWindowsPath((chain or [disk.file or disk.name.replace(":", "-")])[-1].replace("/", "\\")).stem
        src, new = self.description.name, self.request.restored_as
        if base.lower().startswith(src.lower()):
            base = new + base[len(src) :]
        if self.request.in_place:  # beside the VM's own files, never over one
            base += time.strftime("-restored-%Y%m%d%H%M%S", time.gmtime())
        return base + ".vhdx"

    def write_disk(self, made: hv.Made, disk: hv.DiskSpec, point: str, *, cancel: Any, progress: Any) -> hv.Written:
        from .. import _mover

        m: _Made = made.handle
        if self.request.in_place:
            written = self._roll_back(m, disk, point, cancel=cancel, progress=progress)
            if written is not None:
                return written
        winpath = f"{m.stage}\\{self._file_name(disk)}"
        m.files[disk.name] = winpath
        out = self._mapped(m, winpath)
        r = _mover.restore_disk(
            self.repository, point, str(out), disk=disk.name, format="vhdx", progress=progress, cancel=cancel
        )
        return hv.Written(bytes_written=r.bytes_written, seconds=r.seconds)

    def _roll_back(self, m: _Made, disk: hv.DiskSpec, point: str, *, cancel: Any, progress: Any) -> hv.Written | None:
        """In place: the blocks of the VM's own VHDX that differ from the point written where they are
        (``restore_disk(format="vhdx", existing=True, compare=True)``). None when the mover refuses the
        file before writing (a differencing disk, a log not empty, another size): the disk is then
        written whole to a new VHDX and swapped in, as the row's warnings say."""
        from .. import _mover

        live = self.live.get(disk.name)
        why = self.not_live.get(disk.name, "")
        if live:
            try:
                r = _mover.restore_disk(
                    self.repository,
                    point,
                    str(self._mapped(m, live)),
                    disk=disk.name,
                    format="vhdx",
                    existing=True,
                    compare=True,
                    progress=progress,
                    cancel=cancel,
                )
            except InvalidInputError as e:
                why = str(e)
            else:
                m.rolled[disk.name] = live
                if m.target is not None:
                    m.target.changes.append(
                        f"disk {disk.name}: {r.blocks_written} of {r.blocks_compared} blocks differed and were "
                        f"written into {live}"
                    )
                # what changed: written, or deallocated where the point has zeros (as vSphere counts it)
                return hv.Written(bytes_written=r.bytes_written + r.bytes_punched, seconds=r.seconds)
        if m.target is not None:
            m.target.warnings.append(
                f"disk {disk.name} could not be rolled back in place ({why}): written whole to a new VHDX "
                "and swapped in"
            )
        return None

    def finish(self, made: hv.Made) -> None:
        m: _Made = made.handle
        d = self.description
        assert d is not None
        raw = d.raw or {}
        config_file = ""
        for f in [] if self.request.in_place else raw.get("config_files") or []:
            if "data_base64" not in f:
                continue
            name = PureWindowsPath(f["path"]).name
            winpath = f"{m.stage}\\Virtual Machines\\{name}"
            self._mapped(m, winpath).write_bytes(base64.b64decode(f["data_base64"]))
            if name.lower().endswith(".vmcx"):
                config_file = winpath
        if self.request.in_place and not m.files:
            # every disk rolled back where it is: nothing to move in, the drives stay as they are
            m.final = dict(m.rolled)
            return
        desc = {
            "Generation": generation(d),
            "ProcessorCount": d.cpus,
            "MemoryStartupBytes": d.memory_mb << 20,
            "NetworkAdapters": [{"SwitchName": n.network or None, "MacAddress": hyperv_mac(n.mac)} for n in d.nics],
        }
        answer = (
            self.client.run_script(
                "Import-VmbackupRestore.ps1",
                {
                    "RestoreId": m.restore_id,
                    "Name": self.request.restored_as,
                    "Disks": [{"Name": k, "Place": self.places.get(k, k), "Path": v} for k, v in m.files.items()],
                    "Description": desc,
                    "ConfigFile": config_file,
                    "NetworkMap": dict(self.request.network_map),
                    "PowerOn": False,  # power_on, once a drill has compared the disks
                    "InPlace": self.request.in_place,
                },
            )
            or {}
        )
        made.vm_id = str(answer.get("VmId") or "") or None
        # the point's disk names (read_back answers by them), from the places they were attached at
        back = {v: k for k, v in self.places.items()}
        m.final = {back.get(x["Name"], x["Name"]): x["Path"] for x in _list(answer.get("Disks"))}
        m.final.update(m.rolled)
        t = m.target
        if t is not None:
            if answer.get("Method") == "rebuild":
                t.changes.append(
                    "rebuilt from the point's description (New-VM): the configuration could not be imported"
                    + ("" if config_file else " (the point holds no .vmcx)")
                )
            for x in _list(answer.get("Replaced")):
                t.changes.append(f"disk {x.get('Name')}: now {x.get('Path')} (was {x.get('Old')}, kept)")
            for i in _list(answer.get("Incompatibilities")):
                t.changes.append(
                    f"switch {i.get('Switch')} does not exist on {self.host.name}: adapter {i.get('Resolution')}"
                )
            for src, dst in self.request.network_map.items():
                if any(n.network == src for n in d.nics) and not any(
                    i.get("Switch") == src for i in _list(answer.get("Incompatibilities"))
                ):
                    t.changes.append(f"switch {src} -> {dst} (network map)")

    def read_back(self, made: hv.Made) -> dict[str, str]:
        m: _Made = made.handle
        return {k: str(self._mapped(m, v)) for k, v in m.final.items()}

    def power_on(self, made: hv.Made) -> None:
        """Start-VM (Start-VmbackupRestore.ps1) of the VM finish made or rolled back."""
        self.client.run_script(
            "Start-VmbackupRestore.ps1", {"VMId": made.vm_id or "", "Name": self.request.restored_as}
        )

    def remove(self, made: hv.Made) -> None:
        m: _Made = made.handle
        self.client.run_script(
            "Remove-VmbackupRestore.ps1", {"RestoreId": m.restore_id, "VMId": made.vm_id or "", "Path": m.path}
        )

    def release(self, made: hv.Made | None, *, succeeded: bool) -> list[BaseException]:
        if not self.made or self.entry is None:
            return []
        try:
            undo(self.client, self.restore_id, keep_vm=succeeded)
        except (HypervScriptError, WinRMError, BackupError) as e:
            _drop_entry(self.entry, remove=False)  # the entry stays for the next reconcile or the sweeper
            return [e]
        _drop_entry(self.entry, remove=True)
        return []


class HypervRestorer:
    """The restore verbs of a plan's Hyper-V host (mixed into ``hypervisor.HyperV``)."""

    kind = "hyperv"
    restores_from = ("hyperv", "vsphere")  # the points it restores (orchestration/restore_input.py asks)

    @staticmethod
    def describe_point(config: Any, attributes: dict[str, Any]) -> hv.VmDescription:
        return describe_point(config, attributes)

    def restore_steps(self, request: hv.RestoreRequest, plan: Any, agent: Any, *, run_id: str) -> HypervRestoreSteps:
        from .inventory import connect

        return HypervRestoreSteps(connect(self.host, self.password), request, plan, self.host, agent, run_id=run_id)


def _list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]
