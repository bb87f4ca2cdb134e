"""A disk size claimed by an image or an NBD server, up to 2^64, gives one
line and exit 2, never an abort (an overflow, a block map that cannot be
allocated)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MAX_DISK_SIZE = 64 << 40  # source::MAX_DISK_SIZE


def zero_vmdk(path, sectors: int):
    """A VMDK descriptor whose one extent is ZERO: any size, no data file."""
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW {sectors} ZERO\n'
    )
    return path


@pytest.mark.parametrize("size", [2**64 - 512, MAX_DISK_SIZE + 512], ids=["2^64", "64TiB+512"])
def test_a_vmdk_claiming_a_huge_disk(cli, tmp_path, size):
    img = zero_vmdk(tmp_path / "z.vmdk", size // 512)
    p = cli.run("backup-disk", "--vm", "v", str(img), expect=2, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{size} bytes" in lines[0] and "64 TiB" in lines[0], p.stderr
    assert list((cli.repo / "backups").iterdir()) == []


def test_an_nbd_server_claiming_a_huge_disk(cli):
    # nbdkit runs the command with $uri set to its export and exits after it.
    cmd = f'{sys.executable} -m vmbackup backup-disk --repo {cli.repo} --vm v "$uri"'
    p = subprocess.run(
        ["nbdkit", "-U", "-", "null", f"size={2**63 - 1}", "--run", cmd], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "64 TiB" in lines[0], p.stderr
