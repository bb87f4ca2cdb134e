"""The VM's own files that a point keeps beside its disks, read over the
datastore's HTTPS access (``/folder``): the ``.vmx`` and the ``.nvram``.

The ``.nvram`` holds the firmware's variables (UEFI boot entries, Secure Boot
keys): a VM restored without it may not boot. vSphere names it in
``layoutEx.file`` with type ``nvram`` (``VirtualMachineFileLayoutExFileType``:
"Non-volatile RAM (nvram) file"), by its datastore path ``[ds] vm/vm.nvram``.
Both are read once the snapshot is taken, before the disks; they are the
live files (the point's ``config`` is the snapshot's own configuration).
"""

from __future__ import annotations

import base64
import logging
import urllib.request
from typing import Any

from .transport import folder_url

log = logging.getLogger(__name__)

VMX_LIMIT = 4 << 20  # read at most this much of the .vmx (a real one is a few KiB)
NVRAM_LIMIT = 4 << 20  # a larger .nvram is not stored (a real one is some KiB)


def _split(ds_path: str) -> tuple[str, str] | None:
    """``"[ds] vm/vm.nvram"`` -> ``("ds", "vm/vm.nvram")``, None if not a datastore path."""
    if not ds_path.startswith("[") or "] " not in ds_path:
        return None
    ds, rel = ds_path[1:].split("] ", 1)
    return ds, rel


def _get(client: Any, dc: str, ds_path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a datastore file (raises ``OSError``, HTTP errors included)."""
    parts = _split(ds_path)
    if parts is None:
        raise OSError(f"not a datastore path: {ds_path!r}")
    url = folder_url(client.base_url, parts[1], dc, parts[0])
    req = urllib.request.Request(url, headers={"Cookie": client.cookie})
    with urllib.request.urlopen(req, context=client.ssl_context, timeout=60) as res:
        return res.read(limit)


def _dc_name(client: Any, vm: Any) -> str:
    dc = client.datacenter_of(vm)
    return dc.name if dc is not None else ""


def vmx_text(client: Any, vm: Any, vm_name: str, dc: str | None = None) -> str | None:
    """The .vmx file's text (None if it cannot be read: a warning)."""
    path = vm.config.files.vmPathName  # "[ds] vm/vm.vmx"
    if _split(path) is None:
        return None
    try:
        data = _get(client, dc if dc is not None else _dc_name(client, vm), path, VMX_LIMIT)
    except OSError as e:
        log.warning("VM %s: reading %s failed: %s", vm_name, path, e)
        return None
    return data.decode("utf-8", errors="replace")


def nvram_entry(client: Any, vm: Any, vm_name: str, dc: str | None = None) -> dict[str, Any]:
    """The point's ``nvram`` attribute (docs/format.md, "What a vSphere point holds"):

    - ``{"file", "size", "data_base64"}``: the file's exact bytes;
    - ``{"file", "size", "skipped"}``: larger than ``NVRAM_LIMIT`` (a warning);
    - ``{"file", "error"}``: listed but could not be read (a warning);
    - ``{"file": None, "missing"}``: the VM has none listed (recorded, not a warning:
      a VM being created, or a layout vSphere has not refreshed).
    """
    layout = vm.layoutEx
    files = [f for f in (layout.file if layout is not None else None) or [] if f.type == "nvram"]
    if not files:
        return {"file": None, "missing": "the VM's layoutEx lists no nvram file"}
    f = files[0]
    name = str(f.name)
    listed = int(f.size or 0)
    if listed > NVRAM_LIMIT:
        log.warning("VM %s: %s not backed up: %d bytes, larger than %d", vm_name, name, listed, NVRAM_LIMIT)
        return {"file": name, "size": listed, "skipped": f"larger than {NVRAM_LIMIT} bytes"}
    try:
        data = _get(client, dc if dc is not None else _dc_name(client, vm), name, NVRAM_LIMIT + 1)
    except OSError as e:
        log.warning("VM %s: reading %s failed, the point has no nvram: %s", vm_name, name, e)
        return {"file": name, "error": f"reading it failed: {e}"}
    if len(data) > NVRAM_LIMIT:
        log.warning("VM %s: %s not backed up: larger than %d bytes", vm_name, name, NVRAM_LIMIT)
        return {"file": name, "size": listed, "skipped": f"larger than {NVRAM_LIMIT} bytes"}
    return {"file": name, "size": len(data), "data_base64": base64.b64encode(data).decode("ascii")}
