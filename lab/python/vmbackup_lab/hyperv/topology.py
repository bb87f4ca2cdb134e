"""The lab Hyper-V host's topology: its VMs and their disks (JSON)."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT = {
    "host": "hv1",
    "user": "labadmin",
    "volumes": ["C", "D", "E"],
    # a volume's file system (Win32_Volume.FileSystem); any volume not named here is NTFS
    "file_systems": {},
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
FORMATS = ("vhdx", "vhd")
FILE_SYSTEMS = ("NTFS", "ReFS", "CSVFS")


class TopologyError(ValueError):
    """The topology file is malformed (one line)."""


def load(path: Path | None) -> dict:
    """The topology in `path` over the defaults, checked."""
    topo = json.loads(json.dumps(DEFAULT))
    if path is not None:
        try:
            given = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise TopologyError(f"topology {path}: {e}") from None
        if not isinstance(given, dict):
            raise TopologyError(f"topology {path}: not a JSON object")
        topo.update(given)
    if not isinstance(topo.get("file_systems"), dict):
        raise TopologyError("file_systems: an object of volume letter to file system")
    for letter, fs in topo["file_systems"].items():
        if letter not in topo["volumes"]:
            raise TopologyError(f"file_systems.{letter}: {letter!r} is not one of {topo['volumes']}")
        if fs not in FILE_SYSTEMS:
            raise TopologyError(f"file_systems.{letter}: {fs!r} is not one of {FILE_SYSTEMS}")
    names = set()
    for i, vm in enumerate(topo["vms"]):
        where = f"vms[{i}]"
        if not isinstance(vm.get("name"), str) or not vm["name"] or vm["name"] in names:
            raise TopologyError(f"{where}.name: missing or repeated")
        names.add(vm["name"])
        vm.setdefault("state", "running")
        vm.setdefault("backup", True)
        vm.setdefault("volume", topo["volumes"][1] if len(topo["volumes"]) > 1 else topo["volumes"][0])
        vm.setdefault("generation", 2)
        if vm["state"] not in ("running", "off"):
            raise TopologyError(f"{where}.state: {vm['state']!r} is not running or off")
        if vm["volume"] not in topo["volumes"]:
            raise TopologyError(f"{where}.volume: {vm['volume']!r} is not one of {topo['volumes']}")
        seen = set()
        for j, d in enumerate(vm.get("disks", [])):
            dw = f"{where}.disks[{j}]"
            d.setdefault("format", "vhdx")
            d.setdefault("differencing", 0)
            if d.get("controller") not in CONTROLLERS:
                raise TopologyError(f"{dw}.controller: must be one of {CONTROLLERS}")
            if d["format"] not in FORMATS:
                raise TopologyError(f"{dw}.format: must be one of {FORMATS}")
            if d["differencing"] and d["format"] != "vhdx":
                raise TopologyError(f"{dw}.differencing: the lab makes differencing disks as .avhdx over a .vhdx only")
            key = (d["controller"], d.get("number", 0), d.get("location", 0))
            if key in seen:
                raise TopologyError(f"{dw}: two disks at {key[0]}{key[1]}:{key[2]}")
            seen.add(key)
            if not isinstance(d.get("size_mib"), int) or d["size_mib"] < 1:
                raise TopologyError(f"{dw}.size_mib: a positive integer")
    return topo
