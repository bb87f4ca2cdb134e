"""Where the repository or an image format expects a regular file, a FIFO,
a device, a symlink out of the image's folder or an oversized file gives one
line and an exit code, never a hang or a huge allocation. (Each command has a
generous subprocess timeout only as a guard: a hang fails the test.)"""

from __future__ import annotations

import os
import subprocess

import pytest


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def flat_vmdk(tmp_path):
    """A monolithicFlat VMDK: descriptor `disk.vmdk`, extent `disk-flat.vmdk`."""
    d = tmp_path / "vm"
    d.mkdir()
    img = d / "disk.vmdk"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(img), "4M"], check=True
    )
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 7 1M 1M", str(img)], check=True, capture_output=True)
    assert (d / "disk-flat.vmdk").exists()
    return img


def test_a_fifo_as_the_source_is_refused(cli, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    p = cli.run("backup-disk", "--vm", "v", str(fifo), expect=2, timeout=60)
    assert "neither a file nor a block device" in one_line(p.stderr)


def test_a_fifo_as_a_vmdk_extent_is_refused(cli, flat_vmdk):
    extent = flat_vmdk.parent / "disk-flat.vmdk"
    extent.unlink()
    os.mkfifo(extent)
    p = cli.run("backup-disk", "--vm", "v", str(flat_vmdk), expect=2, timeout=60)
    assert "not a regular file" in one_line(p.stderr)


def test_an_extent_symlink_out_of_the_folder_is_refused(cli, flat_vmdk, tmp_path):
    extent = flat_vmdk.parent / "disk-flat.vmdk"
    elsewhere = tmp_path / "elsewhere-flat.vmdk"
    extent.rename(elsewhere)
    extent.symlink_to(elsewhere)
    p = cli.run("backup-disk", "--vm", "v", str(flat_vmdk), expect=2, timeout=60)
    assert "outside the descriptor's directory" in one_line(p.stderr)


def test_an_extent_symlink_within_the_folder_is_read(cli, flat_vmdk, tmp_path):
    extent = flat_vmdk.parent / "disk-flat.vmdk"
    extent.rename(flat_vmdk.parent / "real-flat.vmdk")
    extent.symlink_to("real-flat.vmdk")
    r = cli.json("backup-disk", "--vm", "v", str(flat_vmdk))
    out = tmp_path / "out.raw"
    cli.json("restore-disk", r["id"], str(out))
    assert out.read_bytes()[1 << 20 : 2 << 20] == b"\x07" * (1 << 20)


def test_a_fifo_as_config_json(cli):
    config = cli.repo / "config.json"
    config.unlink()
    os.mkfifo(config)
    p = cli.run("snapshots", expect=1, timeout=60)
    assert "config.json" in one_line(p.stderr) and "not a regular file" in p.stderr


def test_an_oversized_config_json(cli):
    config = cli.repo / "config.json"
    with open(config, "r+b") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB that must not be read into memory
    p = cli.run("snapshots", expect=1, timeout=60)
    assert "config.json" in one_line(p.stderr)


def test_a_fifo_as_a_manifest(cli, image):
    r = cli.json("backup-disk", "--vm", "v", str(image("d.img", 4 << 20)))
    os.mkfifo(cli.repo / "backups" / "20260101T000000Z-00000000.tib")
    p = cli.run("snapshots", "--json", expect=None, timeout=60)
    assert p.returncode in (0, 1), p.stderr
    if p.returncode == 1:
        assert "not a regular file" in one_line(p.stderr)
    # The real backup is unaffected.
    cli.json("restore-disk", r["id"], str(cli.repo.parent / "out.raw"))
