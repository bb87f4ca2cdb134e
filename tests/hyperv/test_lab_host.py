"""The lab host's own pieces: the guest-write pattern, the topology check,
the entry point's bad input, guest writes through an .avhdx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vmbackup_lab.hyperv.pattern import pattern

MASK = (1 << 64) - 1


def _reference(seed: int, offset: int, length: int) -> bytes:
    """docs/lab.md's formula, byte by byte."""

    def splitmix64(x):
        x = (x + 0x9E3779B97F4A7C15) & MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
        return x ^ (x >> 31)

    out = bytearray()
    for o in range(offset, offset + length):
        w = o & ~7
        word = splitmix64(((seed * 0x9E3779B97F4A7C15) & MASK) ^ (w // 8))
        out.append(word.to_bytes(8, "little")[o - w])
    return bytes(out)


@pytest.mark.parametrize("seed, offset, length", [(1, 0, 64), (7, 3, 29), (2**40, 4093, 300), (0, 8, 8)])
def test_pattern_is_the_vsphere_labs(seed, offset, length):
    assert pattern(seed, offset, length) == _reference(seed, offset, length)


@pytest.mark.parametrize(
    "topology, message",
    [
        ({"vms": [{"name": "a"}, {"name": "a"}]}, "vms[1].name: missing or repeated"),
        ({"vms": [{"name": "a", "state": "paused"}]}, "vms[0].state: 'paused' is not running or off"),
        ({"vms": [{"name": "a", "disks": [{"controller": "nvme", "size_mib": 1}]}]}, "vms[0].disks[0].controller"),
        (
            {
                "vms": [
                    {"name": "a", "disks": [{"controller": "ide", "format": "vhd", "size_mib": 1, "differencing": 1}]}
                ]
            },
            "differencing",
        ),
        ({"file_systems": {"D": "FAT32"}}, "file_systems.D: 'FAT32' is not one of"),
        ({"file_systems": {"Z": "ReFS"}}, "file_systems.Z: 'Z' is not one of"),
    ],
)
def test_bad_topology_is_one_line_and_exit_2(tmp_path, topology, message):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(topology))
    root = Path(__file__).resolve().parents[2] / "lab" / "python"
    p = subprocess.run(
        [sys.executable, "-m", "vmbackup_lab.hyperv", "--state", str(tmp_path / "s"), "--topology", str(f)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_unaligned_write_through_an_avhdx_keeps_the_rest_of_its_sectors(lab, tmp_path):
    before = lab.disk_image("win01", "scsi0:1", tmp_path / "before.raw").read_bytes()
    lab.write("win01", "scsi0:1", 10 * 1024 * 1024 + 100, 1000, seed=5)
    after = lab.disk_image("win01", "scsi0:1", tmp_path / "after.raw").read_bytes()
    start, end = 10 * 1024 * 1024 + 100, 10 * 1024 * 1024 + 1100
    assert after[start:end] == pattern(5, start, 1000)
    assert after[:start] == before[:start] and after[end:] == before[end:]


def test_control_refuses_bad_input(lab):
    from vmbackup_lab.hyperv import HypervLabError

    with pytest.raises(HypervLabError, match="no VM named 'nope'"):
        lab.write("nope", "scsi0:0", 0, 1)
    with pytest.raises(HypervLabError, match="outside disk"):
        lab.write("win01", "scsi0:0", 64 * 1024 * 1024 - 1, 2)
    with pytest.raises(HypervLabError, match="unknown fault"):
        lab.set_faults(writer_broken=True)
