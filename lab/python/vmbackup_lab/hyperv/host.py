"""The model of one Hyper-V host behind the lab's WinRM server.

Volumes are directories (`<root>/volumes/<letter>`); Windows paths map onto
them one to one (`D:\\Hyper-V\\x` is `<root>/volumes/D/Hyper-V/x`). VM disks
are real VHDX/VHD files made with qemu-img; differencing disks (.avhdx) are
written by `vhdx.write_differencing` from an overlay kept in `<root>/model`.
A shadow copy is a point-in-time copy of a volume's directory (reflink when
the file system can, else a sparse copy) plus the model files of that moment,
under `<root>/shadows/<n>`. Guest writes change the live files only.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from . import vhdx
from .pattern import pattern

MiB = 1024 * 1024
HYPERV_WRITER = "{66841cd4-6ded-4f4b-8f17-fd23f8ddc3de}"
SOFTWARE_PROVIDER = "{b5946137-7b9f-4925-af80-51abd60b20d5}"
WORK_DIR = "C:\\ProgramData\\vmbackup"
VM_RUNNING, VM_OFF = 2, 3
CONTROLLER_TYPE = {"ide": 0, "scsi": 1}
# Hyper-V's integration services: the GUID that ends each one's Id
# (Get-VMIntegrationService; Msvm_*ComponentSettingData.InstanceID is
# 'Microsoft:<VMId>\\<GUID>'), and its name, which Windows localizes.
BACKUP_SERVICE_GUID = "5CED1297-4598-4915-A5FC-AD21BB4D02A4"
GUEST_SERVICE_GUID = "6C09BB55-D683-4DA0-8931-C9BF705F6480"
INTEGRATION_SERVICES = (
    (GUEST_SERVICE_GUID, {"en-US": "Guest Service Interface", "de-DE": "Gastdienstschnittstelle"}),
    ("84EAAE65-2F2E-45F5-9BB5-0E857DC8EB47", {"en-US": "Heartbeat", "de-DE": "Takt"}),
    (
        "2A34B1C2-FD73-4043-8A5B-DD2159BC743F",
        {"en-US": "Key-Value Pair Exchange", "de-DE": "Austausch von Schlüsselwertepaaren"},
    ),
    ("9F8233AC-BE49-4C79-8EE3-E7E1985B2077", {"en-US": "Shutdown", "de-DE": "Herunterfahren"}),
    ("2497F4DE-E9FA-4204-80E4-4B75C46419C0", {"en-US": "Time Synchronization", "de-DE": "Zeitsynchronisierung"}),
    (BACKUP_SERVICE_GUID, {"en-US": "VSS", "de-DE": "Sicherung (Volumeschattenkopie)"}),
)
# VSS_E_SNAPSHOT_SET_IN_PROGRESS: "only one shadow copy creation operation can be in
# progress at one time" (IVssBackupComponents::StartSnapshotSet).
SNAPSHOT_SET_IN_PROGRESS = 0x80042316
# `create_seconds=N`: shadow copy set creation takes N seconds (the topology's
# `shadow_create_seconds` otherwise); changing it wakes a creation under way.
# `import_fail`: Import-VM registers the VM, then fails (a restore caught mid-way).
# `slow_ms=N`: each restore script that makes or removes something waits N ms first.
HOST_FAULTS = (
    "writer_failed",
    "shadow_fail",
    "drop_during",
    "diskshadow_hangs",
    "shadow_vanish",
    "create_seconds",
    "import_fail",
    "slow_ms",
)
VM_FAULTS = ("backup_off", "backup_no_contact")


class HostError(Exception):
    """Bad input to the model (unknown VM or disk, a write outside the disk)."""


class ScriptFailure(Exception):
    """An adapter script failed on the host; the text is '<Code>: <message>'."""


@dataclass
class DiskFile:
    winpath: str
    fmt: str  # vhdx | vhd
    differencing: bool
    parent: DiskFile | None = None


@dataclass
class Disk:
    controller: str
    number: int
    location: int
    size: int
    top: DiskFile | None  # None: a pass-through disk (a physical disk of the host, no file)
    disk_number: int | None = None  # a pass-through disk's number on the host (Get-Disk)

    @property
    def name(self) -> str:
        return f"{self.controller}{self.number}:{self.location}"

    @property
    def passthrough(self) -> bool:
        return self.top is None

    def chain(self) -> list[DiskFile]:
        out, f = [], self.top
        while f is not None:
            out.append(f)
            f = f.parent
        return out


@dataclass
class Vm:
    name: str
    id: str
    state: int
    backup: bool
    generation: int
    volume: str
    disks: list[Disk]
    faults: dict = field(default_factory=dict)
    # What the Hyper-V writer did to this VM, as Microsoft documents it
    # (docs/hyperv.md): during the host's PrepareForSnapshot (diskshadow's
    # `create`) a running VM with a working Backup integration service runs a
    # whole VSS backup of its own ("Child VM Snapshot": the guest's writers
    # freeze, thaw and get their BackupComplete then, so guest applications may
    # truncate their logs at that moment); a running VM without one is put into
    # a saved state instead ("Saved State" method). `backup_complete` counts the
    # host's BackupComplete to the Hyper-V writer for this VM (diskshadow's
    # `end backup`, after our data is durable), which the guest does not see.
    guest_backups: int = 0
    saved: int = 0
    backup_complete: int = 0
    # every shadow copy set with the Hyper-V writer that froze this VM (its own
    # VSS backup, or a saved state): one per set, however many VMs the set is for
    quiesce_count: int = 0
    volume_root: str = ""  # 'D:\\' or a CSV's 'C:\\ClusterStorage\\Volume1\\'
    cpus: int = 2
    memory_mib: int = 2048
    # network adapters: {"switch": name or None (disconnected), "mac": "00155D......"}
    nics: list = field(default_factory=list)
    location: str | None = None  # an imported VM's folder (else <volume>\\Hyper-V\\<name>)
    version: str = "9.0"  # the configuration version (Get-VM's Version)

    @property
    def config_location(self) -> str:
        return self.location or f"{self.volume_root}Hyper-V\\{self.name}"

    def vmcx(self) -> dict:
        """What the lab's .vmcx holds: a JSON stand-in for Hyper-V's binary
        configuration, with what Compare-VM and Import-VM read from it."""
        return {
            "vmbackup_lab_vmcx": 1,
            "Name": self.name,
            "Id": self.id,
            "Version": self.version,
            "Generation": self.generation,
            "ProcessorCount": self.cpus,
            "MemoryStartupBytes": self.memory_mib * 1024 * 1024,
            "NetworkAdapters": [{"SwitchName": n["switch"], "MacAddress": n["mac"]} for n in self.nics],
            "HardDrives": [
                {
                    "ControllerType": CONTROLLER_TYPE[d.controller],
                    "ControllerNumber": d.number,
                    "ControllerLocation": d.location,
                    "Path": d.top.winpath if d.top is not None else None,
                }
                for d in self.disks
            ],
        }

    def config_files(self) -> list[str]:
        base = f"{self.config_location}\\Virtual Machines\\{self.id.upper()}"
        return [base + ".vmcx", base + ".vmrs"] + ([base + ".vmgs"] if self.generation == 2 else [])

    def integration_services(self, locale: str = "en-US") -> list[dict]:
        """Get-VMIntegrationService: Name (localized), Id (`Microsoft:<VMId>\\<GUID>`), Enabled, status."""
        out = []
        for guid, names in INTEGRATION_SERVICES:
            if guid == BACKUP_SERVICE_GUID:
                enabled, status = self.backup_service()
            elif guid == GUEST_SERVICE_GUID:
                enabled, status = False, None
            else:
                enabled, status = True, (2 if self.state == VM_RUNNING else 12)
            name = names.get(locale, names["en-US"])
            out.append({"Name": name, "Id": f"Microsoft:{self.id}\\{guid}", "Enabled": enabled, "Status": status})
        return out

    def backup_service(self) -> tuple[bool, int | None]:
        """(Enabled, PrimaryOperationalStatus) of the VSS integration service."""
        enabled = self.backup and not self.faults.get("backup_off")
        if not enabled:
            return False, None
        if self.state != VM_RUNNING or self.faults.get("backup_no_contact"):
            return True, 12  # No Contact
        return True, 2  # OK


@dataclass
class ShadowCopy:
    id: str
    set_id: str
    number: int
    volume: str
    created: datetime.datetime
    exposed_path: str | None = None
    exposed_name: str | None = None


@dataclass
class Process:
    """A process the scripts start on the host: run.ps1's powershell.exe and its child diskshadow.exe.

    As on Windows, stopping a process does not stop its children. diskshadow
    holds the VSS backup open (`exec wait.cmd`) until the run's `durable` or
    `abort` file appears, or it is stopped.
    """

    pid: int
    name: str
    run_id: str
    parent: int | None = None
    alive: bool = True
    ended: str | None = None  # 'end backup' | 'exec failed' (abort: no end backup) | 'stopped'


@dataclass
class Run:
    run_id: str
    set_id: str | None
    shadow_ids: list[str]
    shares: list[str]
    consistency: str
    vms: list[str]
    runner_pid: int | None = None
    diskshadow_pid: int | None = None
    volumes: list[str] = field(default_factory=list)  # the set's volume letters


class Host:
    """One Hyper-V host; every method holds the host's lock."""

    def __init__(self, root: Path, topology: dict):
        self.root = root
        self.name = topology["host"]
        self.user = topology["user"]
        self.lock = threading.RLock()
        # a volume's key: its drive letter, or a Cluster Shared Volume's name
        # ('Volume1', mounted at C:\\ClusterStorage\\Volume1\\ on every node, CSVFS)
        self.volumes = {v: root / "volumes" / v for v in topology["volumes"]}
        self.csvs = list(topology.get("csv_volumes", []))
        for name in self.csvs:
            self.volumes[name] = root / "volumes" / f"ClusterStorage-{name}"
        self.file_systems = {v: topology.get("file_systems", {}).get(v, "NTFS") for v in self.volumes}
        for name in self.csvs:
            self.file_systems[name] = "CSVFS"
        # Get-VMIntegrationService names are localized (a German host says
        # 'Sicherung (Volumeschattenkopie)'); the Id is not
        self.locale = topology.get("locale", "en-US")
        self.create_seconds_default = float(topology.get("shadow_create_seconds", 0.0))
        # the run whose shadow copy set VSS is creating now (one at a time per host)
        self.creating: str | None = None
        self.changed = threading.Condition(self.lock)
        self.smb_root = root / "smb"
        self.volume_guids = {v: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.name}/{v}")) for v in self.volumes}
        self.faults: dict = dict(topology.get("faults", {}).get("host", {}))
        self.switches: list[str] = list(topology.get("switches", []))
        self.free_mib: dict[str, int] = dict(topology.get("free_mib", {}))
        # Get-VMHost's VirtualMachinePath: where a VM goes when no folder is given
        first = "C" if "C" in self.volumes else next(iter(topology["volumes"]))
        self.vm_path = f"{first}:\\ProgramData\\Microsoft\\Windows\\Hyper-V"
        self.vms: dict[str, Vm] = {}
        self.shadows: dict[str, ShadowCopy] = {}
        self.runs: dict[str, Run] = {}
        self.processes: dict[int, Process] = {}
        # what happened to processes and shadow copies, in order (the last 200)
        self.events: list[str] = []
        self.next_pid = 4000
        self.shadow_number = 0
        # shadow_sets_created: sets made since the lab started (never reset);
        # shadow_sets_refused: creations refused with VSS_E_SNAPSHOT_SET_IN_PROGRESS
        self.counters = {"shadow_copies": {"now": 0, "peak": 0}, "shadow_sets_created": 0, "shadow_sets_refused": 0}
        # most shadow copy sets open at once, on the host and per volume (the limits tests)
        self.peaks: dict = {"sets": 0, "per_volume": {}}
        for d in ("volumes", "model", "shadows", "shares", "smb"):
            if (root / d).exists():
                shutil.rmtree(root / d)
        for p in self.volumes.values():
            p.mkdir(parents=True)
        (root / "model").mkdir()
        self.local(self.vm_path).mkdir(parents=True, exist_ok=True)
        (root / "shadows").mkdir()
        (root / "shares").mkdir()
        self.smb_root.mkdir()
        vm_faults = topology.get("faults", {}).get("vms", {})
        for spec in topology["vms"]:
            self._make_vm(spec, vm_faults.get(spec["name"], {}))

    # --- paths ---------------------------------------------------------------

    def root_of(self, key: str) -> str:
        """A volume's root as Windows names it: 'D:\\', or 'C:\\ClusterStorage\\Volume1\\' for a CSV."""
        return f"C:\\ClusterStorage\\{key}\\" if key in self.csvs else f"{key}:\\"

    def key_of(self, winpath: str) -> str:
        """The key of the volume holding a Windows path (HostError if none)."""
        p = PureWindowsPath(winpath)
        parts = p.parts
        if len(parts) > 2 and p.drive.upper() == "C:" and parts[1].lower() == "clusterstorage":
            for name in self.csvs:
                if name.lower() == parts[2].lower():
                    return name
        letter = p.drive.rstrip(":").upper()
        if letter not in self.volumes:
            raise HostError(f"no volume {p.drive or winpath} on {self.name}")
        return letter

    def local(self, winpath: str, base: Path | None = None) -> Path:
        """The file behind a Windows path on this host (or inside a shadow copy's root).

        A path on an SMB share (`\\\\FS1\\vms\\x.vhdx`) is a file of the lab's
        file server (`<root>/smb/FS1/vms/x.vhdx`), never inside a shadow copy.
        """
        p = PureWindowsPath(winpath)
        if p.drive.startswith("\\\\"):
            if base is not None:
                raise HostError(f"{winpath} is on an SMB share, not in a shadow copy of a volume of {self.name}")
            server, share = p.drive.strip("\\").split("\\", 1)
            return self.smb_root.joinpath(server.upper(), share, *p.parts[1:])
        key = self.key_of(winpath)
        skip = 3 if key in self.csvs else 1
        return (base if base is not None else self.volumes[key]).joinpath(*p.parts[skip:])

    def _model(self, f: DiskFile, base: Path | None = None) -> Path:
        key = f.winpath.replace(":", "").replace("\\", "_").replace(" ", "_")
        return (base if base is not None else self.root / "model") / key

    # --- making VMs -------------------------------------------------------------

    def _make_vm(self, spec: dict, faults: dict) -> None:
        name = spec["name"]
        vm = Vm(
            name=name,
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.name}/vm/{name}")).upper(),
            state=VM_RUNNING if spec["state"] == "running" else VM_OFF,
            backup=bool(spec["backup"]),
            generation=int(spec["generation"]),
            volume=spec["volume"],
            disks=[],
            faults=dict(faults),
            volume_root=self.root_of(spec["volume"]),
            cpus=int(spec.get("cpus", 2)),
            memory_mib=int(spec.get("memory_mib", 2048)),
            nics=[
                {"switch": n["switch"], "mac": n.get("mac") or _mac(f"{self.name}/{name}/{k}")}
                for k, n in enumerate(spec.get("nics", []))
            ],
        )
        for i, d in enumerate(spec.get("disks", [])):
            size = d["size_mib"] * MiB
            if d.get("passthrough"):
                # a physical disk of the host attached to the VM: no file, no VHD
                number = 2 + sum(1 for v in self.vms.values() for x in v.disks if x.passthrough)
                number += sum(1 for x in vm.disks if x.passthrough)
                vm.disks.append(Disk(d["controller"], d.get("number", 0), d.get("location", 0), size, None, number))
                continue
            stem = name if i == 0 else f"{name}-disk{i}"
            ext = "vhdx" if d["format"] == "vhdx" else "vhd"
            folder = (
                d["smb"].rstrip("\\") + "\\" + name if d.get("smb") else vm.config_location + "\\Virtual Hard Disks"
            )
            base = DiskFile(f"{folder}\\{stem}.{ext}", d["format"], False)
            local = self.local(base.winpath)
            local.parent.mkdir(parents=True, exist_ok=True)
            qfmt = "vhdx" if d["format"] == "vhdx" else "vpc"
            opts = "subformat=dynamic,block_size=1M" if qfmt == "vhdx" else "subformat=dynamic"
            _run("qemu-img", "create", "-q", "-f", qfmt, "-o", opts, str(local), str(size))
            seed = zlib.crc32(f"{name}/{i}".encode())
            writes = [(0, 64 * 1024), (MiB, 256 * 1024)] + [(size * k // 7 + 4096 * k, 192 * 1024) for k in range(1, 6)]
            for k, (off, length) in enumerate(writes):
                length = min(length, size - off)
                self._qemu_write(local, qfmt, off, pattern(seed + k, off, length))
            top = base
            for level in range(d["differencing"]):
                child = DiskFile(
                    f"{vm.config_location}\\Virtual Hard Disks\\{stem}_{str(uuid.uuid4()).upper()}.avhdx",
                    "vhdx",
                    True,
                    top,
                )
                ov = self._model(child)
                with open(ov, "wb") as f:
                    f.truncate(size)
                self._present_save(child, [])
                self._regenerate(child, size)
                top = child
                # each level changes a little of what is below it
                self._write_top(
                    Disk(d["controller"], 0, 0, size, top), MiB // 2 * (level + 1), 96 * 1024, seed + 100 + level
                )
            vm.disks.append(Disk(d["controller"], d.get("number", 0), d.get("location", 0), size, top))
        self.write_config(vm)
        self.vms[name] = vm

    def write_config(self, vm: Vm) -> None:
        """The VM's configuration files: the .vmcx (`Vm.vmcx`), a .vmrs and (generation 2) a .vmgs."""
        for i, cfg in enumerate(vm.config_files()):
            p = self.local(cfg)
            p.parent.mkdir(parents=True, exist_ok=True)
            if cfg.endswith(".vmcx"):
                p.write_text(json.dumps(vm.vmcx(), indent=1))
            else:
                p.write_bytes(f"<!-- vmbackup lab: {vm.name} configuration file {i} ({vm.id}) -->\n".encode())

    # --- disk content --------------------------------------------------------------

    @staticmethod
    def _qemu_write(path: Path, qfmt: str, offset: int, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="hvwrite-") as t:
            t.write(data)
            t.flush()
            _run("qemu-io", "-f", qfmt, "-c", f"write -q -s {t.name} {offset} {len(data)}", str(path))

    def _present_load(self, f: DiskFile, base: Path | None = None) -> list[tuple[int, int]]:
        return [tuple(x) for x in json.loads(self._model(f, base).with_suffix(".present").read_text())]

    def _present_save(self, f: DiskFile, present: list[tuple[int, int]]) -> None:
        self._model(f).with_suffix(".present").write_text(json.dumps(present))

    def _regenerate(self, f: DiskFile, size: int) -> None:
        parent = f.parent
        assert parent is not None and parent.fmt == "vhdx"
        name = PureWindowsPath(parent.winpath).name
        vhdx.write_differencing(
            self.local(f.winpath),
            size,
            self._model(f),
            self._present_load(f),
            vhdx.data_write_guid(self.local(parent.winpath)),
            {"relative_path": ".\\" + name, "absolute_win32_path": parent.winpath},
        )

    def _write_top(self, disk: Disk, offset: int, length: int, seed: int) -> None:
        data = pattern(seed, offset, length)
        top = disk.top
        if not top.differencing:
            self._qemu_write(self.local(top.winpath), "vhdx" if top.fmt == "vhdx" else "vpc", offset, data)
            return
        start, end = offset // 512 * 512, -(-(offset + length) // 512) * 512
        present = self._present_load(top)
        ov = self._model(top)
        with open(ov, "r+b") as f:
            # sectors only partly written take the rest from what the guest saw
            for s in {start, end - 512}:
                partial = s < offset or s + 512 > offset + length
                if partial and not _covered(present, s, 512):
                    f.seek(s)
                    f.write(self._read(disk, s, 512, from_level=1))
            f.seek(offset)
            f.write(data)
        self._present_save(top, _merge(present + [(start, end - start)]))
        self._regenerate(top, disk.size)

    def _read(
        self,
        disk: Disk,
        offset: int,
        length: int,
        from_level: int = 0,
        base: Path | None = None,
        model: Path | None = None,
    ) -> bytes:
        """Bytes of the guest's view composed from chain level `from_level` down."""
        out = bytearray(self._compose(disk, base, model, from_level, offset, length))
        return bytes(out)

    def _compose(
        self, disk: Disk, base: Path | None, model: Path | None, from_level: int, offset: int, length: int
    ) -> bytes:
        chain = disk.chain()[from_level:]
        bottom = chain[-1]
        with tempfile.TemporaryDirectory(prefix="hvimg-") as tmp:
            raw = Path(tmp) / "raw"
            self._base_raw(bottom, raw, base)
            self._apply_overlays(chain, raw, model)
            with open(raw, "rb") as f:
                f.seek(offset)
                return f.read(length)

    def _base_raw(self, f: DiskFile, out: Path, base: Path | None) -> None:
        src = self.local(f.winpath, base)
        _run("qemu-img", "convert", "-f", "vhdx" if f.fmt == "vhdx" else "vpc", "-O", "raw", str(src), str(out))

    def _apply_overlays(self, chain: list[DiskFile], raw: Path, model: Path | None) -> None:
        with open(raw, "r+b") as dst:
            for f in reversed(chain[:-1]):
                with open(self._model(f, model), "rb") as ov:
                    for off, length in self._present_load(f, model):
                        ov.seek(off)
                        dst.seek(off)
                        dst.write(ov.read(length))

    # --- the lab's control operations ---------------------------------------------

    def free_bytes(self, key: str) -> int:
        """A volume's free space as Win32_Volume.FreeSpace says it (the topology's `free_mib`, else 512 GiB)."""
        free = self.free_mib.get(key)
        return free * MiB if free is not None else 1 << 39

    def vm(self, name: str) -> Vm:
        if name not in self.vms:
            raise HostError(f"no VM named {name!r} on {self.name}")
        return self.vms[name]

    def disk(self, vm: str, name: str) -> Disk:
        v = self.vm(vm)
        for d in v.disks:
            if d.name == name:
                return d
        raise HostError(f"VM {vm} has no disk {name!r} (it has {', '.join(d.name for d in v.disks)})")

    def write(self, vm: str, disk: str, offset: int, length: int, seed: int) -> None:
        """A guest write into the disk's current top file."""
        with self.lock:
            d = self.disk(vm, disk)
            if offset < 0 or length <= 0 or offset + length > d.size:
                raise HostError(f"write {offset}+{length} is outside disk {disk} of {d.size} bytes")
            if d.passthrough:
                raise HostError(f"disk {disk} of {vm} is a pass-through disk: the lab keeps no content for it")
            self._write_top(d, offset, length, seed)
            if self.faults.get("shadow_vanish"):
                # The shadow storage (diff area) is full: Windows deletes the
                # volume's shadow copies, oldest first ("What happens when I run
                # out of space?", Volume Shadow Copy Service). One per write here.
                volume = self.key_of(d.top.winpath)
                oldest = sorted((s for s in self.shadows.values() if s.volume == volume), key=lambda s: s.number)
                if oldest:
                    self.delete_shadow(oldest[0].id, why="the shadow storage is full")

    def disk_image(self, vm: str, disk: str, output: Path, shadow: str | None = None) -> None:
        """The guest's view of a disk (now, or as of a shadow copy) as a raw file."""
        with self.lock:
            d = self.disk(vm, disk)
            if d.passthrough:
                raise HostError(f"disk {disk} of {vm} is a pass-through disk: the lab keeps no content for it")
            base = model = None
            if shadow is not None:
                sc = self._shadow(shadow)
                base = self.root / "shadows" / str(sc.number)
                model = self.root / "shadows" / f"{sc.number}.model"
            chain = d.chain()
            if shadow is not None and any(
                f.winpath.startswith("\\\\") or self.key_of(f.winpath) != sc.volume for f in chain
            ):
                raise HostError(f"disk {disk} of {vm} is not on the volume of shadow copy {shadow}")
            tmp = output.with_name(output.name + ".tmp")
            self._base_raw(chain[-1], tmp, base)
            self._apply_overlays(chain, tmp, model)
            os.replace(tmp, output)

    def set_faults(self, vm: str | None, faults: dict) -> None:
        with self.lock:
            allowed = VM_FAULTS if vm else HOST_FAULTS
            bad = [k for k in faults if k not in allowed]
            if bad:
                raise HostError(f"unknown fault {bad[0]!r} (known: {', '.join(allowed)})")
            if "slow_ms" in faults:
                v = faults["slow_ms"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise HostError(f"fault slow_ms: {v!r} is not a number of milliseconds")
            if "create_seconds" in faults:
                v = faults["create_seconds"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise HostError(f"fault create_seconds: {v!r} is not a number of seconds")
            if vm:
                self.vm(vm).faults = dict(faults)
            else:
                self.faults = dict(faults)
                self.changed.notify_all()  # a creation under way sees its new duration

    def _shadow(self, sid: str) -> ShadowCopy:
        for sc in self.shadows.values():
            if sid in (sc.id, sc.id.strip("{}"), str(sc.number)):
                return sc
        raise HostError(f"no shadow copy {sid!r} on {self.name}")

    def status(self) -> dict:
        with self.lock:
            return {
                "host": self.name,
                "faults": self.faults,
                "writer": self.writer(),
                "vms": [
                    {
                        "name": v.name,
                        "id": v.id,
                        "state": "running" if v.state == VM_RUNNING else "off",
                        "backup": v.backup_service()[0],
                        "faults": v.faults,
                        "guest_backups": v.guest_backups,
                        "saved": v.saved,
                        "backup_complete": v.backup_complete,
                        "quiesce_count": v.quiesce_count,
                        "generation": v.generation,
                        "cpus": v.cpus,
                        "memory_mib": v.memory_mib,
                        "nics": [dict(n) for n in v.nics],
                        "path": v.config_location,
                        "config_files": [{"path": p, "local": str(self.local(p))} for p in v.config_files()],
                        "disks": [
                            {
                                "name": d.name,
                                "size": d.size,
                                "disk_number": d.disk_number,
                                "chain": [
                                    {
                                        "path": f.winpath,
                                        "local": str(self.local(f.winpath)),
                                        "format": f.fmt,
                                        "differencing": f.differencing,
                                    }
                                    for f in d.chain()
                                ],
                            }
                            for d in v.disks
                        ],
                    }
                    for v in self.vms.values()
                ],
                "shadow_copies": [
                    {
                        "id": s.id,
                        "set_id": s.set_id,
                        "volume": self.root_of(s.volume),
                        "local": str(self.root / "shadows" / str(s.number)),
                        "exposed_path": s.exposed_path,
                        "created": s.created.isoformat(),
                    }
                    for s in self.shadows.values()
                ],
                "runs": sorted(self.runs),
                "processes": [
                    {
                        "pid": p.pid,
                        "name": p.name,
                        "parent": p.parent,
                        "run": p.run_id,
                        "alive": p.alive,
                        "ended": p.ended,
                    }
                    for p in self.processes.values()
                ],
                "events": list(self.events),
                "file_systems": {self.root_of(v): fs for v, fs in self.file_systems.items()},
                "shadow_set_in_progress": self.creating,
                "counters": self.counters,
                **self.peak_counters(),
            }

    # --- VSS ---------------------------------------------------------------------

    def writer(self) -> dict:
        if self.faults.get("writer_failed"):
            return {
                "Name": "Microsoft Hyper-V VSS Writer",
                "Id": HYPERV_WRITER,
                "State": 8,
                "StateText": "Failed",
                "LastError": "Non-retryable error",
            }
        return {
            "Name": "Microsoft Hyper-V VSS Writer",
            "Id": HYPERV_WRITER,
            "State": 1,
            "StateText": "Stable",
            "LastError": "No error",
        }

    def create_seconds(self) -> float:
        return float(self.faults.get("create_seconds", self.create_seconds_default))

    def create_shadow_set(
        self, volumes: list[str], writer: bool = False, run_id: str = ""
    ) -> tuple[str, list[ShadowCopy]]:
        """A shadow copy of each volume, all at one instant (the host's lock).

        VSS creates one shadow copy set at a time per host: from StartSnapshotSet
        until DoSnapshotSet returns, another requester's StartSnapshotSet fails
        with VSS_E_SNAPSHOT_SET_IN_PROGRESS and "should wait and try again"
        (Microsoft, "State Transitions in Shadow Copy Providers"). Creation takes
        `create_seconds()` here, with the host's lock released meanwhile, so a
        second creation can really arrive during it.

        With the Hyper-V writer taking part (`writer`), every VM with files on
        those volumes takes part, not only the ones being backed up (Microsoft,
        "Backing up and restoring virtual machines"): each running VM whose
        Backup integration service answers runs its own VSS backup now (its
        guest applications may truncate their logs now); each other running VM
        is put into a saved state during the copy. Either way the VM is frozen
        once for the set (`quiesce_count`), however many of its VMs the set is for.
        """
        with self.lock:
            if self.creating is not None:
                self.counters["shadow_sets_refused"] += 1
                raise ScriptFailure(
                    f"ShadowSetInProgress: another shadow copy set is being created on {self.name.upper()} "
                    f"(VSS_E_SNAPSHOT_SET_IN_PROGRESS, 0x{SNAPSHOT_SET_IN_PROGRESS:08X}): VSS creates one set "
                    "at a time per host; nothing was made, try again"
                )
            self.creating = run_id or "(unnamed)"
            try:
                return self._create_shadow_set(volumes, writer)
            finally:
                self.creating = None

    def _create_shadow_set(self, volumes: list[str], writer: bool) -> tuple[str, list[ShadowCopy]]:
        start = time.monotonic()
        while (left := start + self.create_seconds() - time.monotonic()) > 0:
            self.changed.wait(left)  # releases the host's lock while VSS "works"
        if self.faults.get("shadow_fail"):
            raise ScriptFailure(
                "ShadowCopyFailed: diskshadow ended before the shadow copy existed: "
                "VSS_E_UNEXPECTED_PROVIDER_ERROR (0x8004230F) while creating the shadow copy set"
            )
        if writer:
            for v in self.vms.values():
                if v.volume not in volumes or v.state != VM_RUNNING:
                    continue
                v.quiesce_count += 1
                if v.backup_service() == (True, 2):
                    v.guest_backups += 1
                else:
                    v.saved += 1
        set_id = "{" + str(uuid.uuid4()) + "}"
        made = []
        for letter in volumes:
            self.shadow_number += 1
            n = self.shadow_number
            dst = self.root / "shadows" / str(n)
            _copy_tree(self.volumes[letter], dst)
            _copy_tree(self.root / "model", self.root / "shadows" / f"{n}.model")
            sc = ShadowCopy("{" + str(uuid.uuid4()) + "}", set_id, n, letter, datetime.datetime.now(datetime.UTC))
            self.shadows[sc.id] = sc
            made.append(sc)
        self.counters["shadow_sets_created"] += 1
        c = self.counters["shadow_copies"]
        c["now"] = len(self.shadows)
        c["peak"] = max(c["peak"], c["now"])
        self._note_peaks()
        return set_id, made

    def open_sets(self) -> tuple[int, dict[str, int]]:
        """Shadow copy sets open now: on the host, and per volume (sets holding a copy of it)."""
        sets = {s.set_id for s in self.shadows.values()}
        per_volume = {v: len({s.set_id for s in self.shadows.values() if s.volume == v}) for v in self.volumes}
        return len(sets), per_volume

    def _note_peaks(self) -> None:
        # peaks only grow when a set is made, so this runs there (and at reset)
        now, per_volume = self.open_sets()
        self.peaks["sets"] = max(self.peaks.get("sets", 0), now)
        pv = self.peaks.setdefault("per_volume", {})
        for v, n in per_volume.items():
            pv[v] = max(pv.get(v, 0), n)

    def reset_counters(self) -> dict:
        """Every peak becomes what is open now (as the vSphere lab's counters/reset)."""
        with self.lock:
            now, per_volume = self.open_sets()
            self.peaks = {"sets": now, "per_volume": dict(per_volume)}
            self.counters["shadow_copies"]["peak"] = self.counters["shadow_copies"]["now"] = len(self.shadows)
            return self.peak_counters()

    def peak_counters(self) -> dict:
        with self.lock:
            now, per_volume = self.open_sets()
            return {
                "shadow_sets_open": now,
                "shadow_sets_open_per_volume": per_volume,
                "peak_shadow_copies": self.peaks.get("sets", 0),
                "peak_shadow_copies_per_volume": {v: self.peaks.get("per_volume", {}).get(v, 0) for v in self.volumes},
            }

    def delete_shadow(self, sid: str, why: str = "") -> None:
        with self.lock:
            sc = self.shadows.pop(sid)
            self.event(f"shadow copy {sid} deleted" + (f": {why}" if why else ""))
            for p in (self.root / "shadows" / str(sc.number), self.root / "shadows" / f"{sc.number}.model"):
                _make_writable(p)
                shutil.rmtree(p, ignore_errors=True)
            if sc.exposed_path:
                link = self.local(sc.exposed_path)
                if link.is_symlink():
                    link.unlink()
            self.counters["shadow_copies"]["now"] = len(self.shadows)

    # --- processes ----------------------------------------------------------------

    def start_process(self, name: str, run_id: str, parent: int | None = None) -> Process:
        with self.lock:
            self.next_pid += 4
            p = Process(self.next_pid, name, run_id, parent)
            self.processes[p.pid] = p
            return p

    def process(self, pid) -> Process | None:
        """Get-Process -Id: a live process, or None."""
        p = self.processes.get(pid) if isinstance(pid, int) else None
        return p if p is not None and p.alive else None

    def end_process(self, pid: int, how: str) -> None:
        """The process ends by itself (`how`), or is stopped ('stopped'); its children live on."""
        p = self.process(pid)
        if p is not None:
            p.alive, p.ended = False, how
            self.event(f"{p.name} {p.pid} of run {p.run_id}: {how}")

    def event(self, text: str) -> None:
        self.events = (self.events + [text])[-200:]

    def expose(self, sc: ShadowCopy, winpath: str) -> None:
        link = self.local(winpath)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            link.rmdir()
        link.symlink_to(self.root / "shadows" / str(sc.number), target_is_directory=True)
        sc.exposed_path = winpath

    def share(self, name: str, winpath: str) -> None:
        (self.root / "shares" / name).symlink_to(self.local(winpath), target_is_directory=True)

    def unshare(self, name: str) -> None:
        p = self.root / "shares" / name
        if p.is_symlink():
            p.unlink()


def _mac(seed: str) -> str:
    """A MAC address in Hyper-V's range (00-15-5D), fixed by `seed`."""
    return "00155D" + f"{zlib.crc32(seed.encode()) & 0xFFFFFF:06X}"


def _covered(present: list[tuple[int, int]], off: int, length: int) -> bool:
    return any(o <= off and off + length <= o + n for o, n in present)


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for o, n in sorted(extents):
        if out and o <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], o + n - out[-1][0])
        else:
            out.append([o, n])
    return [(o, n) for o, n in out]


def _copy_tree(src: Path, dst: Path) -> None:
    """A point-in-time copy: reflinks where the file system has them, else sparse copies."""
    _run("cp", "-a", "--reflink=auto", "--sparse=always", str(src), str(dst))
    # a shadow copy is read-only
    for dirpath, _dirs, files in os.walk(dst):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                p.chmod(0o444)


def _make_writable(root: Path) -> None:
    for dirpath, dirs, files in os.walk(root):
        for f in files + dirs:
            p = Path(dirpath) / f
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)


def _run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout
