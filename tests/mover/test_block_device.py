"""Block devices as source and restore target: a loop device over a file
(the same kernel path a hot-added disk or a SAN LUN takes)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import MiB, sha256


@pytest.fixture
def loop_device(tmp_path):
    devices = []

    def attach(path) -> str:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        devices.append(dev)
        return dev

    yield attach
    for d in devices:
        subprocess.run(["losetup", "--detach", d], check=False)


def test_backup_from_and_restore_to_a_block_device(cli, image, loop_device, tmp_path):
    src_file = image("src.img", 24 * MiB)
    src = loop_device(src_file)
    b = cli.json("backup-disk", "--vm", "v", "--disk", "scsi0:0", src)
    assert b["disk_size"] == 24 * MiB
    # A block device has no holes to skip: every block is read.
    assert b["bytes_read"] == 24 * MiB and b["bytes_skipped"] == 0

    target_file = tmp_path / "target.img"
    with open(target_file, "wb") as f:
        f.write(os.urandom(24 * MiB))  # garbage that zero blocks must overwrite
    target = loop_device(target_file)
    r = cli.json("restore-disk", b["id"], target)
    assert r["disk_size"] == 24 * MiB
    subprocess.run(["sync"], check=True)
    assert sha256(target_file) == sha256(src_file)

    small_file = tmp_path / "small.img"
    small_file.write_bytes(bytes(MiB))
    p = cli.run("restore-disk", b["id"], loop_device(small_file), expect=2)
    assert "needs" in p.stderr
