"""One conformance suite that every disk source passes.

The same guest content (a raw reference filled by qemu-io at scattered,
unaligned offsets) is presented through every kind of source: a raw file, a
block device, every VMDK, VHDX and VHD subformat qemu-img makes, and NBD
exports from qemu-nbd (over a qcow2) and nbdkit. For each one a backup must
restore to exactly the reference, read less than the whole disk where the
source knows its allocation, and produce exactly the chunks of the raw
backup: the same disk gives the same block map whatever carried it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Cli, MiB, socket_activated, tcp_listener

SIZE = 40 * MiB + 3 * 65536  # not a multiple of the chunk size
WRITES = [
    (0x11, 0, 4096),
    (0x22, 1 * MiB + 512, 70_000),
    (0x33, 7 * MiB - 4096, 2 * MiB + 8192),
    (0x44, 20 * MiB + 12345, 1),
    (0x55, 33 * MiB, 3 * MiB),
    (0x66, SIZE - 65536, 65536),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("conformance")
    ref = d / "ref.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(ref), str(SIZE)], check=True)
    for pattern, off, length in WRITES:
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {off} {length}", str(ref)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    cli = Cli(d / "repo")
    cli.run("init")
    raw = cli.json("backup-disk", "--vm", "ref", "--disk", "scsi0:0", str(ref))
    return d, ref, cli, raw


def _convert(ref: Path, out: Path, fmt: str, opts: str | None) -> Path:
    cmd = ["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt]
    if opts:
        cmd += ["-o", opts]
    subprocess.run(cmd + [str(ref), str(out)], check=True)
    return out


IMAGES = {
    "vmdk-monolithicSparse": ("vmdk", "subformat=monolithicSparse"),
    "vmdk-monolithicFlat": ("vmdk", "subformat=monolithicFlat"),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", "subformat=twoGbMaxExtentSparse"),
    "vmdk-twoGbMaxExtentFlat": ("vmdk", "subformat=twoGbMaxExtentFlat"),
    "vmdk-streamOptimized": ("vmdk", "subformat=streamOptimized"),
    "vhdx-dynamic": ("vhdx", "subformat=dynamic,block_size=1M"),  # 32 MiB blocks would cover it all
    "vhdx-fixed": ("vhdx", "subformat=fixed"),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on"),
}


def _wait(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 15
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "NBD server did not start"
        time.sleep(0.05)


@pytest.fixture
def source(request, world, tmp_path):
    """Yields (spec, knows_allocation) for the source kind named by the parameter."""
    _, ref, _, _ = world
    kind = request.param
    procs = []
    if kind == "raw-file":
        yield str(ref), True
    elif kind == "block-device":
        dev = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(ref)], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            yield dev, False
        finally:
            subprocess.run(["losetup", "--detach", dev], check=False)
    elif kind in IMAGES:
        fmt, opts = IMAGES[kind]
        yield str(_convert(ref, tmp_path / f"disk.{fmt}", fmt, opts)), not kind.endswith(("Flat", "fixed"))
    elif kind == "nbd-qemu-nbd-qcow2":
        img = _convert(ref, tmp_path / "disk.qcow2", "qcow2", None)
        sock = tmp_path / "q.sock"
        procs.append(
            subprocess.Popen(
                ["qemu-nbd", "--read-only", "--persistent", "-f", "qcow2", "-k", str(sock), str(img)],
                stderr=subprocess.DEVNULL,
            )
        )
        _wait(procs[-1], sock.exists)
        yield f"nbd+unix:///?socket={sock}", True
    elif kind == "nbd-nbdkit-file-tcp":
        # The socket listens before nbdkit starts (socket activation): no port race, no wait.
        listener = tcp_listener()
        port = listener.getsockname()[1]
        procs.append(
            subprocess.Popen(
                socket_activated(["nbdkit", "-f", "-r", "file", str(ref)], listener),
                stderr=subprocess.DEVNULL,
                pass_fds=(listener.fileno(),),
            )
        )
        try:
            yield f"nbd://127.0.0.1:{port}/", True
        finally:
            listener.close()
    else:
        raise AssertionError(kind)
    for p in procs:
        p.terminate()
        p.wait(10)


KINDS = ["raw-file", "block-device", *IMAGES, "nbd-qemu-nbd-qcow2", "nbd-nbdkit-file-tcp"]


@pytest.mark.parametrize("source", KINDS, indirect=True)
def test_every_source_gives_the_same_backup(world, source, tmp_path):
    _, ref, cli, raw = world
    spec, knows_allocation = source
    b = cli.json("backup-disk", "--vm", "conformance", "--disk", "scsi0:0", spec)
    assert b["disk_size"] == SIZE
    # Same content, same chunks: nothing new is stored after the raw backup.
    assert b["new_chunks"] == 0 and b["bytes_stored"] == 0, b
    assert b["zero_blocks"] == raw["zero_blocks"]
    if knows_allocation:
        assert b["bytes_read"] < SIZE // 2, b
    out = tmp_path / "restored.raw"
    cli.json("restore-disk", b["id"], str(out))
    assert _sha(out) == _sha(ref)
    meta = next(m for m in cli.json("snapshots") if m["id"] == b["id"])
    assert meta["disks"][0]["name"] == "scsi0:0"


@pytest.mark.parametrize("fmt", ["vmdk", "vmdk-sparse", "vhdx"])
def test_restored_images_are_valid_for_qemu(world, fmt, tmp_path):
    _, ref, cli, raw = world
    out = tmp_path / f"restored.{fmt}"
    cli.json("restore-disk", "--format", fmt, raw["id"], str(out))
    qfmt = "vhdx" if fmt == "vhdx" else "vmdk"
    subprocess.run(["qemu-img", "check", "-q", "-f", qfmt, str(out)], check=True)
    p = subprocess.run(["qemu-img", "compare", "-q", "-f", qfmt, "-F", "raw", str(out), str(ref)])
    assert p.returncode == 0, "qemu-img compare found a difference"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", qfmt, str(out)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert info["virtual-size"] == SIZE
