"""The lab Hyper-V host's topology: its VMs and their disks (JSON)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEFAULT = {
    "host": "hv1",
    "user": "labadmin",
    "volumes": ["C", "D", "E"],
    # a volume's file system (Win32_Volume.FileSystem); any volume not named here is NTFS
    "file_systems": {},
    # Cluster Shared Volumes by name: C:\\ClusterStorage\\<name>\\, file system CSVFS;
    # a VM's "volume" may name one
    "csv_volumes": [],
    # how long VSS takes to create a shadow copy set (one creation at a time per host)
    "shadow_create_seconds": 0.2,
    # the language of Get-VMIntegrationService's names (en-US, de-DE)
    "locale": "en-US",
    # the host's virtual switches (Get-VMSwitch); a VM's "nics" name one each (default: the first)
    "switches": ["LAN", "Isolated"],
    "vms": [
        {
            "name": "win01",
            "state": "running",
            "backup": True,
            "volume": "D",
            "generation": 2,
            "disks": [
                {"controller": "scsi", "number": 0, "location": 0, "format": "vhdx", "size_mib": 64},
                # one checkpoint: the VM writes to an .avhdx over the base
                {"controller": "scsi", "number": 0, "location": 1, "format": "vhdx", "size_mib": 32, "differencing": 1},
            ],
        },
        {
            "name": "legacy01",
            "state": "running",
            "backup": False,
            "volume": "D",
            "generation": 1,
            "disks": [{"controller": "ide", "number": 0, "location": 0, "format": "vhd", "size_mib": 32}],
        },
        {
            "name": "off01",
            "state": "off",
            "backup": True,
            "volume": "E",
            "generation": 2,
            "disks": [
                {"controller": "scsi", "number": 0, "location": 0, "format": "vhdx", "size_mib": 16, "differencing": 2}
            ],
        },
    ],
    "faults": {"host": {}, "vms": {}},
}

CONTROLLERS = ("ide", "scsi")
# a NetBIOS computer name, as in \\HV1\ share paths (15 characters at most)
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,14}")
VOLUME = re.compile(r"[A-Z]")
FORMATS = ("vhdx", "vhd")
FILE_SYSTEMS = ("NTFS", "ReFS", "CSVFS")
LOCALES = ("en-US", "de-DE")
CSV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,31}")
# an SMB folder holding a VM's disks: \\SERVER\share[\folder...]
SMB_PATH = re.compile(r"\\\\[A-Za-z0-9][A-Za-z0-9-]{0,14}\\[A-Za-z0-9$_.-]+(\\[A-Za-z0-9 _.-]+)*\\?")


class TopologyError(ValueError):
    """The topology file is malformed (one line)."""


def load(path: Path | None) -> dict:
    """The topology in `path` over the defaults, checked."""
    given = None
    if path is not None:
        try:
            given = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise TopologyError(f"topology {path}: {e}") from None
        if not isinstance(given, dict):
            raise TopologyError(f"topology {path}: not a JSON object")
    return check(given)


def check(given: dict | None, where: str = "") -> dict:
    """`given` (one host's topology, any field may be missing) over the
    defaults, checked; `where` prefixes the field names in messages
    (`hyperv[1].` for a host of `vmbackup lab up`'s topology)."""
    topo = json.loads(json.dumps(DEFAULT))
    if given is not None:
        if not isinstance(given, dict):
            raise TopologyError(f"{where.rstrip('.') or 'topology'}: not a JSON object")
        topo.update(json.loads(json.dumps(given)))
    if not isinstance(topo["host"], str) or not HOST_NAME.fullmatch(topo["host"]):
        raise TopologyError(f"{where}host: {topo['host']!r} is not a computer name (letters, digits, '-', 1-15)")
    if not isinstance(topo["user"], str) or not topo["user"]:
        raise TopologyError(f"{where}user: a non-empty string")
    vols = topo["volumes"]
    if not isinstance(vols, list) or not vols or not all(isinstance(v, str) and VOLUME.fullmatch(v) for v in vols):
        raise TopologyError(f'{where}volumes: a list of drive letters such as ["C", "D"]')
    if not isinstance(topo["vms"], list) or not all(isinstance(vm, dict) for vm in topo["vms"]):
        raise TopologyError(f"{where}vms: a list of objects")
    if not isinstance(topo.get("file_systems"), dict):
        raise TopologyError(f"{where}file_systems: an object of volume letter to file system")
    for letter, fs in topo["file_systems"].items():
        if letter not in topo["volumes"]:
            raise TopologyError(f"{where}file_systems.{letter}: {letter!r} is not one of {topo['volumes']}")
        if fs not in FILE_SYSTEMS:
            raise TopologyError(f"{where}file_systems.{letter}: {fs!r} is not one of {FILE_SYSTEMS}")
    csvs = topo["csv_volumes"]
    if not isinstance(csvs, list) or not all(isinstance(c, str) and CSV_NAME.fullmatch(c) for c in csvs):
        raise TopologyError(f'{where}csv_volumes: a list of Cluster Shared Volume names such as ["Volume1"]')
    secs = topo["shadow_create_seconds"]
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not 0 <= secs <= 600:
        raise TopologyError(f"{where}shadow_create_seconds: a number of seconds from 0 to 600")
    if topo["locale"] not in LOCALES:
        raise TopologyError(f"{where}locale: {topo['locale']!r} is not one of {LOCALES}")
    switches = topo["switches"]
    if not isinstance(switches, list) or not all(isinstance(w, str) and w for w in switches):
        raise TopologyError(f'{where}switches: a list of virtual switch names such as ["LAN"]')
    names = set()
    for i, vm in enumerate(topo["vms"]):
        where_vm = f"{where}vms[{i}]"
        if not isinstance(vm.get("name"), str) or not vm["name"] or vm["name"] in names:
            raise TopologyError(f"{where_vm}.name: missing or repeated")
        names.add(vm["name"])
        vm.setdefault("state", "running")
        vm.setdefault("backup", True)
        vm.setdefault("volume", topo["volumes"][1] if len(topo["volumes"]) > 1 else topo["volumes"][0])
        vm.setdefault("generation", 2)
        vm.setdefault("cpus", 2)
        vm.setdefault("memory_mib", 2048)
        vm.setdefault("nics", [{"switch": switches[0]}] if switches else [])
        if vm["generation"] not in (1, 2):
            raise TopologyError(f"{where_vm}.generation: 1 or 2")
        nics = vm["nics"]
        if not isinstance(nics, list) or not all(
            isinstance(n, dict) and isinstance(n.get("switch"), str) for n in nics
        ):
            raise TopologyError(f'{where_vm}.nics: a list of objects such as {{"switch": "LAN"}}')
        if vm["state"] not in ("running", "off"):
            raise TopologyError(f"{where_vm}.state: {vm['state']!r} is not running or off")
        if vm["volume"] not in topo["volumes"] + csvs:
            raise TopologyError(f"{where_vm}.volume: {vm['volume']!r} is not one of {topo['volumes'] + csvs}")
        seen = set()
        disks = vm.get("disks", [])
        if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
            raise TopologyError(f"{where_vm}.disks: a list of objects")
        for j, d in enumerate(disks):
            dw = f"{where_vm}.disks[{j}]"
            d.setdefault("format", "vhdx")
            d.setdefault("differencing", 0)
            if d.get("controller") not in CONTROLLERS:
                raise TopologyError(f"{dw}.controller: must be one of {CONTROLLERS}")
            if d["format"] not in FORMATS:
                raise TopologyError(f"{dw}.format: must be one of {FORMATS}")
            if not isinstance(d["differencing"], int) or d["differencing"] < 0:
                raise TopologyError(f"{dw}.differencing: a number of checkpoint levels (0 or more)")
            if d["differencing"] and d["format"] != "vhdx":
                raise TopologyError(f"{dw}.differencing: the lab makes differencing disks as .avhdx over a .vhdx only")
            # a pass-through disk: a physical disk of the host attached to the VM (no file)
            if not isinstance(d.get("passthrough", False), bool):
                raise TopologyError(f"{dw}.passthrough: true or false")
            # a disk whose file is on an SMB share (Hyper-V over SMB), not on a volume of the host
            smb = d.get("smb")
            if smb is not None and (not isinstance(smb, str) or not SMB_PATH.fullmatch(smb)):
                raise TopologyError(f"{dw}.smb: a share path such as \\\\FS1\\vms")
            if (d.get("passthrough") or smb) and d["differencing"]:
                raise TopologyError(f"{dw}: a pass-through or SMB disk has no checkpoint levels here")
            if d.get("passthrough") and smb:
                raise TopologyError(f"{dw}: a disk is either pass-through or on an SMB share")
            key = (d["controller"], d.get("number", 0), d.get("location", 0))
            if key in seen:
                raise TopologyError(f"{dw}: two disks at {key[0]}{key[1]}:{key[2]}")
            seen.add(key)
            # the lab writes its pattern at 1 MiB and each checkpoint level at N/2 MiB
            if not isinstance(d.get("size_mib"), int) or d["size_mib"] < 2:
                raise TopologyError(f"{dw}.size_mib: an integer, at least 2")
    return topo
