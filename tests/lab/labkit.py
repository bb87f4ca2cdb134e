"""Helpers for the lab tests: pyVmomi connections, lookups, task waiting, files."""

from __future__ import annotations

import hashlib
import ssl
import time
from pathlib import Path

from pyVim.connect import SmartConnect
from pyVmomi import vim
from vmbackup_lab import Lab


def connect(lab: Lab):
    host, port = lab.host.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=lab.ca_file)
    return SmartConnect(host=host, port=int(port), user=lab.user, pwd=lab.password, sslContext=ctx)


def find(si, kind, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        for obj in view.view:
            if obj.name == name:
                return obj
    finally:
        view.Destroy()
    raise LookupError(name)


def wait(task, timeout: float = 30):
    """Wait for a task; return its result or raise its fault."""
    deadline = time.monotonic() + timeout
    while task.info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
        if time.monotonic() > deadline:
            raise TimeoutError(task)
        time.sleep(0.02)
    if task.info.state == vim.TaskInfo.State.error:
        raise task.info.error
    return task.info.result


def disk(vm, key):
    """The disk with this key of a VM, or of a snapshot's config."""
    config = vm if isinstance(vm, vim.vm.ConfigInfo) else vm.config
    for dev in config.hardware.device:
        if isinstance(dev, vim.vm.device.VirtualDisk) and dev.key == key:
            return dev
    raise LookupError(key)


def disks(vm):
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def snapshot(vm, name, memory=False, quiesce=False):
    return wait(vm.CreateSnapshot_Task(name=name, description="", memory=memory, quiesce=quiesce))


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def datastore_file(lab: Lab, ds_path: str) -> Path:
    ds, rel = ds_path[1:].split("] ", 1)
    return Path(lab.info["datastores"][ds]) / rel


def flat_file(lab: Lab, ds_path: str) -> Path:
    """The extent file of a disk descriptor (base "-flat" or snapshot "-delta")."""
    desc = datastore_file(lab, ds_path)
    for line in desc.read_text().splitlines():
        if line.startswith("RW "):
            return desc.parent / line.split('"')[1]
    raise LookupError(ds_path)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes `lab write --seed` puts at [offset, offset+length) (docs/lab.md)."""
    mask = (1 << 64) - 1

    def splitmix64(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    start = offset & ~7
    out = bytearray()
    for w in range(start, offset + length, 8):
        out += splitmix64(((seed * 0x9E3779B97F4A7C15) & mask) ^ (w // 8)).to_bytes(8, "little")
    return bytes(out[offset - start : offset - start + length])
