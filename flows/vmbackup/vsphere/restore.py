"""vSphere restore: a point's saved configuration becomes a new VM (or rolls
an existing, powered-off one back), and the mover writes its disks.

``describe_point`` turns a vSphere point (its config is the snapshot's
``VirtualMachineConfigInfo`` as JSON, its attributes hold the disks, the
``.vmx`` and the ``.nvram``) into a ``VmDescription``. ``VSphereRestoreSteps``
implements ``hypervisors.base.RestoreSteps``:

- reconcile: a dead restore's ledger entry for the same name (its process gone
  from this machine, or its heartbeat stale) names its half-made VM: detached
  from the agents, destroyed, the entry removed (``reconcile_restore``; the
  sweeper calls it too);
- prepare: every check before anything is made (``RestoreInputError``, exit 2),
  and the ``CreateVM_Task`` spec: a new name, new BIOS and instance UUIDs and
  MACs (unless in place), networks mapped or disconnected, a CD-ROM whose ISO
  is missing disconnected, passthrough and USB devices dropped; thin disks of
  the saved sizes on the buses and units the disks' names give; the VM
  folder and resource pool asked for (``--folder``, ``--resource-pool``, a
  drill's ``drill.vsphere``), else the datacenter's VM folder and the host's
  root pool;
- create: the ledger entry first, then ``CreateVM_Task``; the new disks
  hot-added writable to the agent VM (a backup SCSI controller of its own, as
  backups do), the ones hot-add cannot reach written through ``/folder``;
- write_disk: the mover writes the point into the hot-added device (only
  non-zero blocks: thin stays thin), or the bytes stream through an HTTPS PUT
  (never staged on the agent's disk); in place, only what differs (CBT's
  areas changed since the point, else a comparison);
- finish: the ``.nvram``, detach (the VM stays off); read_back (a drill):
  the disks hot-added read-only, IDE disks through ``/folder``; power_on:
  those let go, then PowerOnVM_Task; release: detach always, destroy the
  half-made VM after a failure.

No Prefect.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim, vmodl

from ..errors import (
    BackupError,
    CancelledError,
    HypervisorBusyError,
    HypervisorError,
    RestoreInputError,
    TaskTimeoutError,
    TransportImpossible,
)
from ..hypervisors import base as hv
from ..plan import Agent, Plan
from .hypervisor import RESTORES_FROM
from .inventory import DiskInfo, datastore_of, disks_of
from .ledger import Entry, Ledger
from .tasks import run_task, task_state, wait_task
from .transport import Context, Frozen, HotAdd, Nbd, _rel, detach_files, folder_url

log = logging.getLogger(__name__)

#: extraConfig key a restored VM carries: the run that made it (reconcile destroys only a VM it names).
MARK = "vmbackup.restore.run"
# A /folder upload sends pieces of this size, read by _UPLOAD_READERS threads at
# most _UPLOAD_AHEAD pieces ahead of the one that sends (the reads release the GIL).
_UPLOAD_CHUNK = 8 << 20
_UPLOAD_READERS = 4
_UPLOAD_AHEAD = 6
_COMPARE_BLOCK = 1 << 20

_SCSI = {
    "vim.vm.device.ParaVirtualSCSIController": vim.vm.device.ParaVirtualSCSIController,
    "vim.vm.device.VirtualLsiLogicController": vim.vm.device.VirtualLsiLogicController,
    "vim.vm.device.VirtualLsiLogicSASController": vim.vm.device.VirtualLsiLogicSASController,
    "vim.vm.device.VirtualBusLogicController": vim.vm.device.VirtualBusLogicController,
}
_OTHER_CTRL = {
    "vim.vm.device.VirtualAHCIController": ("sata", vim.vm.device.VirtualAHCIController),
    "vim.vm.device.VirtualNVMEController": ("nvme", vim.vm.device.VirtualNVMEController),
}
_NICS = {
    "vim.vm.device.VirtualVmxnet3": ("vmxnet3", vim.vm.device.VirtualVmxnet3),
    "vim.vm.device.VirtualVmxnet2": ("vmxnet2", vim.vm.device.VirtualVmxnet2),
    "vim.vm.device.VirtualE1000e": ("e1000e", vim.vm.device.VirtualE1000e),
    "vim.vm.device.VirtualE1000": ("e1000", vim.vm.device.VirtualE1000),
    "vim.vm.device.VirtualPCNet32": ("pcnet32", vim.vm.device.VirtualPCNet32),
}
_LABEL = {"hyperv": "Hyper-V", "vsphere": "vSphere"}
# Devices that tie a VM to one host's hardware: never recreated (a warning says so).
_DROPPED = {
    "vim.vm.device.VirtualPCIPassthrough": "PCI passthrough device",
    "vim.vm.device.VirtualSriovEthernetCard": "SR-IOV passthrough network adapter",
    "vim.vm.device.VirtualUSB": "USB device",
    "vim.vm.device.VirtualSCSIPassthrough": "SCSI passthrough device",
}


# -- describe ------------------------------------------------------------------


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    return config if isinstance(config, dict) else {}


def _devices(config: dict[str, Any]) -> list[dict[str, Any]]:
    return list(((config.get("hardware") or {}).get("device")) or [])


def _bus_of(name: str) -> str:
    return name.rstrip("0123456789:") or "scsi"


def _split_name(name: str) -> tuple[str, int, int]:
    """``scsi0:1`` -> ``("scsi", 0, 1)``."""
    bus = _bus_of(name)
    number, unit = name[len(bus) :].split(":", 1)
    return bus, int(number), int(unit)


def _nic_network(dev: dict[str, Any]) -> str:
    b = dev.get("backing") or {}
    if "DistributedVirtualPortBackingInfo" in str(b.get("_vimtype")):
        port = b.get("port") or {}
        return f"dvportgroup:{port.get('portgroupKey')}"
    return str(b.get("deviceName") or "")


def describe_point(config: Any, attributes: dict[str, Any]) -> hv.VmDescription:
    """The VM of a vSphere point. Raises ``RestoreInputError`` when the point has no configuration."""
    attributes = attributes if isinstance(attributes, dict) else {}
    cfg = _config_dict(config)
    vm = attributes.get("vm") or cfg.get("name") or "?"
    if not cfg.get("hardware"):
        raise RestoreInputError(f"the backup point of VM {vm} has no VM configuration: restore its disks instead")
    hw = cfg["hardware"]
    saved = {d["name"]: d for d in attributes.get("disks") or [] if isinstance(d, dict) and d.get("name")}
    disks = []
    for name, d in sorted(saved.items()):
        disks.append(
            hv.DiskSpec(name=name, capacity=int(d.get("capacity") or 0), bus=_bus_of(name), file=d.get("file"))
        )
    nics = []
    for dev in _devices(cfg):
        kind = _NICS.get(str(dev.get("_vimtype")))
        if kind is not None:
            nics.append(hv.NicSpec(network=_nic_network(dev), mac=dev.get("macAddress"), kind=kind[0]))
    files = {}
    nvram = attributes.get("nvram") or {}
    if isinstance(nvram, dict) and nvram.get("data_base64"):
        files["nvram"] = nvram["data_base64"]
    changes = []
    for s in attributes.get("skipped_disks") or []:
        changes.append(f"disk {s.get('disk')} is not in the point ({s.get('reason')}): not restored")
    home = ((cfg.get("files") or {}).get("vmPathName")) or ""
    return hv.VmDescription(
        name=str(vm),
        hypervisor="vsphere",
        firmware=str(cfg.get("firmware") or "bios"),
        cpus=int(hw.get("numCPU") or 1),
        memory_mb=int(hw.get("memoryMB") or 1024),
        guest_os=cfg.get("guestId"),
        disks=disks,
        nics=nics,
        raw=cfg,
        files=files,
        host=attributes.get("host"),
        location=datastore_of(home) or None,
        changes=changes,
    )


# -- the restorer --------------------------------------------------------------


class VSphereRestore:
    """``hypervisors.base.Restorer`` for a vCenter (``VSphere`` delegates here)."""

    kind = "vsphere"
    restores_from = RESTORES_FROM

    def __init__(self, client: Any) -> None:
        self.client = client

    @staticmethod
    def describe_point(config: Any, attributes: dict[str, Any]) -> hv.VmDescription:
        return describe_point(config, attributes)

    def restore_steps(self, request: hv.RestoreRequest, plan: Any, agent: Any, *, run_id: str) -> VSphereRestoreSteps:
        return VSphereRestoreSteps(self.client, request, plan, agent, run_id=run_id)


@dataclass
class _Disk:
    """One disk being written: where, and how."""

    spec: hv.DiskSpec
    file: str  # "[ds] vm/vm.vmdk"
    key: int = 0
    datastore: str = ""
    capacity: int = 0
    change_id: str | None = None  # in place: the point's (CBT's areas since then)
    transport: str = "hotadd"
    device: str | None = None  # hot-add: the agent's device path


@dataclass
class _Handle:
    """What prepare found and create made (``Target.handle`` / ``Made.handle``)."""

    host: Any = None
    datastore: Any = None
    pool: Any = None
    folder: Any = None
    spec: Any = None
    vm: Any = None
    disks: dict[str, _Disk] = field(default_factory=dict)


def _find(client: Any, kind: type, name: str) -> Any:
    for obj in client.objects(kind):
        try:
            if obj.name == name:
                return obj
        except vmodl.fault.ManagedObjectNotFound:
            continue
    return None


def _child(root: Any, path: str | None, kind: type, children: str) -> Any:
    """The object at ``path`` ("drills" or "lab/drills": names separated by
    "/") under ``root`` (a datacenter's VM folder, a host's root resource
    pool), following ``children``; ``root`` itself for no path; None when
    missing."""
    here = root
    for name in [p for p in (path or "").split("/") if p]:
        here = next((c for c in getattr(here, children) or [] if isinstance(c, kind) and c.name == name), None)
        if here is None:
            return None
    return here


def _vm_exists(client: Any, name: str) -> list[Any]:
    return client.vm_index(refresh=True).get(name, [])


class VSphereRestoreSteps:
    """``hypervisors.base.RestoreSteps`` for one VM restored into a vCenter."""

    def __init__(self, client: Any, request: hv.RestoreRequest, plan: Plan, agent: Agent, *, run_id: str) -> None:
        self.client, self.request, self.plan, self.agent, self.run_id = client, request, plan, agent, run_id
        self.name = request.vm
        self.repo = str(plan.repository)
        self.ledger = Ledger(self.repo)
        self.timeout = float(getattr(plan.timeouts, "task", 600.0))
        self.entry: Entry | None = None
        self.hotadd: HotAdd | None = None
        self.reader: HotAdd | None = None  # read_back's read-only attachments
        self.folder_reader: Nbd | None = None  # read_back's NBD servers over /folder (IDE disks)
        self.drill_snapshot: Any = None
        self.created: Any = None  # the VM this restore made (destroyed if it fails)
        self.description: hv.VmDescription | None = None

    # -- reconcile ----------------------------------------------------------

    def reconcile(self) -> None:
        for e in self.ledger.entries(self.request.restored_as):
            if e.restore is None:
                continue
            if e.alive():
                raise HypervisorBusyError(f"VM {self.request.restored_as} is being restored by {e.holder()}")
            problems = reconcile_restore(self.client, self.plan, self.ledger, e, self.timeout)
            if problems:
                raise HypervisorError(
                    f"removing what an earlier restore of {self.request.restored_as} left failed: {'; '.join(problems)}"
                )

    # -- prepare ------------------------------------------------------------

    def prepare(self, description: hv.VmDescription) -> hv.Target:
        req = self.request
        self.description = description
        cross = description.hypervisor != "vsphere"
        if cross and description.hypervisor not in RESTORES_FROM:
            raise RestoreInputError(f"VM {req.vm}: a {description.hypervisor} point is not restored into vSphere")
        if cross and req.in_place:
            raise RestoreInputError(
                f"VM {req.vm}: a {_LABEL.get(description.hypervisor, description.hypervisor)} point is restored "
                "into vSphere as a new VM, not in place"
            )
        h = _Handle()
        changes = list(description.changes)
        warnings: list[str] = []
        existing = _vm_exists(self.client, req.restored_as)
        if req.in_place:
            if not existing:
                raise RestoreInputError(f"VM {req.restored_as} does not exist: nothing to roll back in place")
            h.vm = existing[0]
            if str(h.vm.runtime.powerState) != "poweredOff":
                raise RestoreInputError(f"VM {req.restored_as} is powered on: power it off to roll it back in place")
            h.host = h.vm.runtime.host
        elif existing:
            raise RestoreInputError(f"a VM named {req.restored_as} exists already: choose another name (--as)")
        # another hypervisor's point names its own host and folder: neither is vSphere's
        host_name = req.host or (h.host.name if h.host is not None else None if cross else description.host)
        if h.host is None:
            if not host_name:
                if cross:
                    raise RestoreInputError(
                        f"VM {req.vm}'s point is a {_LABEL.get(description.hypervisor, description.hypervisor)} "
                        "point: give the ESXi host "
                        "to restore it onto (--host)"
                    )
                raise RestoreInputError(f"VM {req.vm}: the point names no host; give one (--host)")
            h.host = _find(self.client, vim.HostSystem, host_name)
            if h.host is None:
                raise RestoreInputError(f"host {host_name} does not exist in {self.client.conn.host}")
        ds_name = req.datastore or (None if cross else description.location)
        if not req.in_place and not ds_name and cross:
            from .crossrestore import default_datastore

            h.datastore, why = default_datastore(self.client, h.host, self.agent, self._space_needed())
            ds_name = h.datastore.name
            changes.append(why)
        elif not req.in_place:
            if not ds_name:
                raise RestoreInputError(f"VM {req.vm}: the point names no datastore; give one (--datastore)")
            h.datastore = next((d for d in h.host.datastore if d.name == ds_name), None)
            if h.datastore is None:
                known = _find(self.client, vim.Datastore, ds_name) is not None
                raise RestoreInputError(
                    f"datastore {ds_name} is not mounted on host {host_name}"
                    if known
                    else f"datastore {ds_name} does not exist in {self.client.conn.host}"
                )
            need = self._space_needed()
            free = int(h.datastore.summary.freeSpace or 0)
            if need > free:
                raise RestoreInputError(
                    f"datastore {ds_name} has {free} bytes free; the point's disks hold {need} bytes of data"
                )
        networks = {n.name: n for n in h.host.network}
        for src, dst in sorted(req.network_map.items()):
            if dst not in networks:
                raise RestoreInputError(f"network map {src}={dst}: network {dst} does not exist on host {host_name}")
        if req.in_place:
            h.disks = self._in_place_disks(h.vm, description)
        elif cross:
            from .crossrestore import cross_spec

            h.spec, h.disks = cross_spec(
                description, req, h, networks, self.run_id, changes, warnings, sizes=self._point_sizes()
            )
        else:
            h.spec, h.disks = self._spec(description, h, networks, changes, warnings)
        if not req.in_place:
            dc = self.client.datacenter_of(h.host)
            h.folder = _child(dc.vmFolder, req.folder, vim.Folder, "childEntity")
            if h.folder is None:
                raise RestoreInputError(f"VM folder {req.folder} does not exist in datacenter {dc.name}")
            h.pool = _child(h.host.parent.resourcePool, req.resource_pool, vim.ResourcePool, "resourcePool")
            if h.pool is None:
                raise RestoreInputError(
                    f"resource pool {req.resource_pool} does not exist on {h.host.parent.name} (host {h.host.name})"
                )
            if req.folder:
                changes.append(f"in VM folder {req.folder}")
            if req.resource_pool:
                changes.append(f"in resource pool {req.resource_pool}")
        return hv.Target(
            restored_as=req.restored_as,
            host=h.host.name,
            location=ds_name,
            disks=[d.spec for d in h.disks.values()],
            changes=changes,
            warnings=warnings,
            handle=h,
        )

    def _space_needed(self) -> int:
        """The bytes of data the point's disks hold (their non-zero blocks): thin disks need that much."""
        from .. import _mover

        infos, _ = _mover.list_backups(self.repo)
        info = next((i for i in infos if i.id == self.request.point), None)
        if info is None:
            return 0
        return sum(max(0, d.blocks - d.zero_blocks) * info.chunk_size for d in info.disks)

    def _point_sizes(self) -> dict[str, int]:
        """Each disk's size in the point (the bytes the mover restores), by name."""
        from .. import _mover

        infos, _ = _mover.list_backups(self.repo)
        info = next((i for i in infos if i.id == self.request.point), None)
        return {d.name: int(d.disk_size) for d in info.disks} if info is not None else {}

    def _in_place_disks(self, vm: Any, description: hv.VmDescription) -> dict[str, _Disk]:
        now = {name: dev for name, dev in disks_of(list(vm.config.hardware.device))}
        out = {}
        for spec in description.disks:
            dev = now.get(spec.name)
            if dev is None:
                raise RestoreInputError(f"VM {vm.name} has no disk {spec.name}: it cannot be rolled back in place")
            cap = int(dev.capacityInBytes or dev.capacityInKB * 1024)
            if cap != spec.capacity:
                raise RestoreInputError(
                    f"disk {spec.name} of VM {vm.name} is {cap} bytes, the point's {spec.capacity}: not rolled back"
                )
            out[spec.name] = _Disk(
                spec,
                dev.backing.fileName,
                key=dev.key,
                datastore=datastore_of(dev.backing.fileName),
                capacity=cap,
                change_id=_point_change_id(self.repo, self.request.point, spec.name),
            )
        return out

    def _spec(
        self,
        description: hv.VmDescription,
        h: _Handle,
        networks: dict[str, Any],
        changes: list[str],
        warnings: list[str],
    ) -> tuple[Any, dict[str, _Disk]]:
        req = self.request
        cfg = description.raw or {}
        name, ds = req.restored_as, h.datastore.name
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId=description.guest_os,
            numCPUs=description.cpus,
            memoryMB=description.memory_mb,
            firmware=description.firmware,
            files=vim.vm.FileInfo(vmPathName=f"[{ds}]"),
            extraConfig=[vim.option.OptionValue(key=MARK, value=self.run_id)],
        )
        hw = cfg.get("hardware") or {}
        if hw.get("numCoresPerSocket"):
            spec.numCoresPerSocket = int(hw["numCoresPerSocket"])
        if cfg.get("annotation"):
            spec.annotation = cfg["annotation"]
        if cfg.get("changeTrackingEnabled"):
            spec.changeTrackingEnabled = True
        # vSphere gives a VM created without uuid/instanceUuid new ones (VirtualMachineConfigSpec).
        if cfg.get("uuid"):
            changes.append(f"new BIOS UUID (the source's was {cfg['uuid']})")
        if cfg.get("instanceUuid"):
            changes.append(f"new instance UUID (the source's was {cfg['instanceUuid']})")
        if cfg.get("keyId"):
            changes.append("restored unencrypted: encrypt it again with a VM storage policy")
        changes_dev: list[Any] = []
        ctrl_keys: dict[tuple[str, int], int] = {("ide", 0): 200, ("ide", 1): 201}
        next_key = -100
        for dev in _devices(cfg):
            t = str(dev.get("_vimtype"))
            cls, bus = _SCSI.get(t), "scsi"
            if cls is None and t in _OTHER_CTRL:
                bus, cls = _OTHER_CTRL[t]
            if cls is None:
                continue
            c = cls(key=next_key, busNumber=int(dev.get("busNumber") or 0))
            if bus == "scsi":
                c.sharedBus = dev.get("sharedBus") or "noSharing"
            ctrl_keys[(bus, c.busNumber)] = next_key
            next_key -= 1
            changes_dev.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=c))
        disks: dict[str, _Disk] = {}
        for i, d in enumerate(description.disks):
            bus, number, unit = _split_name(d.name)
            if (bus, number) not in ctrl_keys:
                cls = {
                    "scsi": vim.vm.device.ParaVirtualSCSIController,
                    "sata": vim.vm.device.VirtualAHCIController,
                }.get(bus, vim.vm.device.VirtualNVMEController)
                c = cls(key=next_key, busNumber=number)
                if bus == "scsi":
                    c.sharedBus = "noSharing"
                ctrl_keys[(bus, number)] = next_key
                next_key -= 1
                changes_dev.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=c))
                changes.append(f"a {bus} controller {number} added for disk {d.name} (not in the saved configuration)")
            add, file = disk_device(name, i, ds, d.capacity, ctrl_keys[(bus, number)], unit, next_key)
            next_key -= 1
            changes_dev.append(add)
            disks[d.name] = _Disk(d, file, datastore=ds, capacity=d.capacity)
        nic_no = 0
        for dev in _devices(cfg):
            t = str(dev.get("_vimtype"))
            label = ((dev.get("deviceInfo") or {}).get("label")) or t.rsplit(".", 1)[-1]
            if t in _DROPPED:
                warnings.append(f"{_DROPPED[t]} {label!r} dropped: it ties the VM to the source host's hardware")
                continue
            if t in _NICS:
                nic_no += 1
                changes_dev.append(self._nic(dev, _NICS[t][1], nic_no, next_key, networks, changes))
                next_key -= 1
            elif t == "vim.vm.device.VirtualCdrom":
                cd = self._cdrom(dev, ctrl_keys, next_key, label, changes)
                next_key -= 1
                if cd is not None:
                    changes_dev.append(cd)
        spec.deviceChange = changes_dev
        return spec, disks

    def _nic(
        self, dev: dict[str, Any], cls: Any, n: int, key: int, networks: dict[str, Any], changes: list[str]
    ) -> Any:
        return nic_device(
            cls, n, key, _nic_network(dev), dev.get("macAddress"), networks, self.request, changes, keep_mac=True
        )

    def _cdrom(
        self, dev: dict[str, Any], ctrl_keys: dict[tuple[str, int], int], key: int, label: str, changes: list[str]
    ) -> Any:
        ctrl = dev.get("controllerKey")
        keys = {200: ("ide", 0), 201: ("ide", 1)}
        where = keys.get(ctrl)
        ck = ctrl_keys.get(where) if where else None
        if ck is None:
            ck = next((v for (b, _), v in ctrl_keys.items() if b == "sata"), 200)
        cd = vim.vm.device.VirtualCdrom(key=key, controllerKey=ck, unitNumber=dev.get("unitNumber"))
        b = dev.get("backing") or {}
        iso = b.get("fileName") if "IsoBackingInfo" in str(b.get("_vimtype")) else None
        if iso and self._datastore_file_exists(iso):
            cd.backing = vim.vm.device.VirtualCdrom.IsoBackingInfo(fileName=iso)
            cd.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True)
        else:
            cd.backing = vim.vm.device.VirtualCdrom.RemotePassthroughBackingInfo(deviceName="", exclusive=False)
            cd.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=False, allowGuestControl=True)
            if iso:
                changes.append(f"{label}: ISO {iso} is missing: disconnected")
        return vim.vm.device.VirtualDeviceSpec(operation="add", device=cd)

    def _datastore_file_exists(self, ds_path: str) -> bool:
        url = folder_url(self.client.base_url, _rel(ds_path), self._dc_name(), datastore_of(ds_path))
        try:
            return _http(self.client, "HEAD", url)[0] == 200
        except (OSError, HypervisorError):
            return False

    def _dc_name(self) -> str:
        for dc in self.client.objects(vim.Datacenter):
            return dc.name
        return ""

    # -- create -------------------------------------------------------------

    def create(self, target: hv.Target) -> hv.Made:
        h: _Handle = target.handle
        req = self.request
        self.entry = Entry(run_id=self.run_id, vm=req.restored_as, vm_moref="", attempt="restore")
        self.entry.restore = {
            "name": req.restored_as,
            "source": req.vm,
            "point": req.point,
            "in_place": req.in_place,
        }
        # Held (with a heartbeat) before CreateVM_Task: a killed run's half-made VM is named.
        self.ledger.hold(self.entry)
        if not req.in_place:

            def note(task: str) -> None:
                assert self.entry is not None and self.entry.restore is not None
                self.entry.restore["create_task"] = task
                self.ledger.write(self.entry)

            h.vm = run_task(
                lambda: h.folder.CreateVM_Task(config=h.spec, pool=h.pool, host=h.host),
                f"creating VM {req.restored_as}",
                self.timeout,
                on_task=note,
            )
            self.created = h.vm
            self.entry.vm_moref = self.entry.restore["moref"] = h.vm._moId
            self.ledger.write(self.entry)
            now = {name: dev for name, dev in disks_of(list(h.vm.config.hardware.device))}
            for name, d in h.disks.items():
                dev = now.get(d.spec.place or name)
                if dev is None:
                    raise HypervisorError(f"VM {req.restored_as} was created without its disk {d.spec.place or name}")
                d.key, d.file = dev.key, dev.backing.fileName
        else:
            self.entry.vm_moref = self.entry.restore["moref"] = h.vm._moId
            self.ledger.write(self.entry)
        self._attach(h)
        transports = sorted({d.transport for d in h.disks.values()})
        return hv.Made(vm_id=_instance_uuid(h.vm), transport="+".join(transports) or "hotadd", handle=h)

    def _attach(self, h: _Handle) -> None:
        """Hot-adds the disks hot-add reaches, writable; the others go through /folder."""
        assert self.entry is not None
        ctx = Context(
            self.client, h.vm, self.request.restored_as, None, self.plan, self.agent, self.run_id, self.ledger,
            self.entry, self.timeout,
        )  # fmt: skip
        frozen = [
            Frozen(DiskInfo(d.key, name, d.file, d.datastore, d.capacity), d.file, d.datastore, None, False)
            for name, d in h.disks.items()
        ]
        hot = [f for f in frozen if not f.disk.name.startswith("ide")]
        for f in frozen:
            h.disks[f.disk.name].transport = "folder"
        if not hot:
            return
        self.hotadd = HotAdd(ctx, disk_mode="persistent")
        try:
            self.hotadd.agent_obj = self.hotadd._check(hot)
            by_file = self.hotadd._attach([f.file for f in hot])
        except TransportImpossible as e:
            log.info("VM %s: hot-add impossible (%s): the disks go through /folder", self.request.restored_as, e)
            problems = self.hotadd.close()
            self.hotadd = None
            if problems:
                raise HypervisorError("; ".join(problems)) from e
            return
        for f in hot:
            d = h.disks[f.disk.name]
            d.transport, d.device = "hotadd", by_file[f.file]

    # -- write --------------------------------------------------------------

    def write_disk(self, made: hv.Made, disk: hv.DiskSpec, point: str, *, cancel: Any, progress: Any) -> hv.Written:
        h: _Handle = made.handle
        d = h.disks[disk.name]
        t0 = time.monotonic()
        if d.transport == "hotadd":
            assert d.device is not None
            if self.request.in_place:
                n = self._roll_back(h, d, point, cancel, progress)
            else:
                n = _write_new(self.repo, point, d.device, disk.name, cancel, progress)
        else:
            n = self._upload(h, d, point, cancel, progress)
        return hv.Written(n, time.monotonic() - t0)

    def _roll_back(self, h: _Handle, d: _Disk, point: str, cancel: Any, progress: Any) -> int:
        """Only what differs from the point: CBT's areas changed since the point's change id
        (QueryChangedDiskAreas without a snapshot: the powered-off VM's current state),
        else every block compared."""
        from . import cbt

        extents = None
        if d.change_id:
            info = DiskInfo(d.key, d.spec.name, d.file, d.datastore, d.capacity)
            try:
                extents = cbt.changed_areas(h.vm, None, info, d.change_id)
            except (cbt.ChangeIdRejected, BackupError) as e:
                log.info("VM %s disk %s: no CBT areas since the point (%s): comparing", h.vm.name, d.spec.name, e)
        assert d.device is not None
        return _write_in_place(self.repo, point, d.device, d.spec.name, extents, cancel, progress)

    def _upload(self, h: _Handle, d: _Disk, point: str, cancel: Any, progress: Any) -> int:
        """Streams the disk to its ``-flat.vmdk`` through the datastore's ``/folder`` (HTTPS PUT):
        read from the repository by a few threads a few pieces ahead of the send, never staged whole."""
        from .. import _mover

        rel = _rel(d.file)
        flat = rel[: -len(".vmdk")] + "-flat.vmdk" if rel.endswith(".vmdk") else rel
        url = folder_url(self.client.base_url, flat, self._dc_name(), d.datastore)
        reader = _mover.DiskReader.backup(self.repo, point, d.spec.name)
        size = reader.size
        with ThreadPoolExecutor(_UPLOAD_READERS, thread_name_prefix=f"upload-{d.spec.name}") as pool:
            pieces = _pieces(reader, pool, cancel, progress)
            try:
                status, body = _http(self.client, "PUT", url, pieces, size)
            finally:
                pieces.close()  # a failed send: the reads queued ahead are cancelled
        if status not in (200, 201, 204):
            raise HypervisorError(f"uploading disk {d.spec.name} to {d.file} failed: HTTP {status} {body}")
        return size

    # -- finish, read back, remove, release -----------------------------------

    def finish(self, made: hv.Made) -> None:
        h: _Handle = made.handle
        nvram = (self.description.files if self.description else {}).get("nvram")
        if nvram:
            self._put_nvram(h.vm, base64.b64decode(nvram))
        self._detach()
        if self.entry is not None and self.entry.restore is not None:
            self.entry.restore["done"] = True  # from here on, never destroyed by reconcile
            self.ledger.write(self.entry)

    def power_on(self, made: hv.Made) -> None:
        """PowerOnVM_Task, once read_back's attachments are gone (a disk still
        attached to the agent would keep the VM from opening it)."""
        h: _Handle = made.handle
        problems = self._release_reader()
        if problems:
            raise HypervisorError("; ".join(problems))
        run_task(lambda: h.vm.PowerOnVM_Task(), f"powering on VM {h.vm.name}", self.timeout)

    def _put_nvram(self, vm: Any, data: bytes) -> None:
        files = [f for f in (vm.layoutEx.file if vm.layoutEx is not None else None) or [] if f.type == "nvram"]
        home = vm.config.files.vmPathName  # "[ds] vm/vm.vmx"
        path = str(files[0].name) if files else home.rsplit("/", 1)[0] + f"/{vm.name}.nvram"
        url = folder_url(self.client.base_url, _rel(path), self._dc_name(), datastore_of(path))
        status, body = _http(self.client, "PUT", url, iter([data]), len(data))
        if status not in (200, 201, 204):
            raise HypervisorError(f"writing {path} failed: HTTP {status} {body}")

    def _detach(self) -> list[str]:
        problems: list[str] = []
        if self.hotadd is not None:
            problems = self.hotadd.close()
            if problems:
                raise HypervisorError("; ".join(problems))
            self.hotadd = None
        return problems

    def read_back(self, made: hv.Made) -> dict[str, str]:
        """The restored disks as the mover reads them: hot-added read-only to
        the agent, and the ones hot-add cannot reach (IDE) through the
        datastore's ``/folder`` by the plan's NBD command (nbdkit curl, as
        backups read them). A drill reads the powered-off VM; a running one
        is read through a snapshot."""
        h: _Handle = made.handle
        assert self.entry is not None
        files = {name: d.file for name, d in h.disks.items()}
        if str(h.vm.runtime.powerState) == "poweredOn":
            self.drill_snapshot = run_task(
                lambda: h.vm.CreateSnapshot_Task(name="vmbackup-drill", memory=False, quiesce=False),
                f"a snapshot of VM {h.vm.name} to read it back",
                self.timeout,
            )
            now = {name: dev for name, dev in disks_of(list(self.drill_snapshot.config.hardware.device))}
            places = {name: d.spec.place or name for name, d in h.disks.items()}
            files = {name: now[places[name]].backing.fileName for name in files if places[name] in now}
        ctx = Context(
            self.client, h.vm, h.vm.name, self.drill_snapshot, self.plan, self.agent, self.run_id, self.ledger,
            self.entry, self.timeout,
        )  # fmt: skip
        frozen = [
            Frozen(
                DiskInfo(h.disks[n].key, n, f, datastore_of(f), h.disks[n].capacity), f, datastore_of(f), None, False
            )
            for n, f in files.items()
        ]
        hot = [f for f in frozen if not f.disk.name.startswith("ide")]
        ide = [f for f in frozen if f.disk.name.startswith("ide")]
        out: dict[str, str] = {}
        if hot:
            self.reader = HotAdd(ctx)
            self.reader.agent_obj = self.reader._check(hot)
            by_file = self.reader._attach([f.file for f in hot])
            out |= {f.disk.name: by_file[f.file] for f in hot}
        if ide:
            if self.drill_snapshot is not None:  # a snapshot's delta is not one file to read by URL
                raise HypervisorError(
                    f"VM {h.vm.name} runs: its IDE disk {ide[0].disk.name} is read back only while it is off"
                )
            self.folder_reader = Nbd(ctx)
            out |= self.folder_reader.open(ide)
        return out

    def remove(self, made: hv.Made) -> None:
        h: _Handle = made.handle
        self._release_reader()
        destroy_vm(h.vm, self.timeout)

    def _release_reader(self) -> list[str]:
        problems: list[str] = []
        if self.reader is not None:
            problems += self.reader.close()
            self.reader = None
        if self.folder_reader is not None:
            problems += self.folder_reader.close()
            self.folder_reader = None
        if self.drill_snapshot is not None:
            snap = self.drill_snapshot
            try:
                run_task(
                    lambda: snap.RemoveSnapshot_Task(removeChildren=False), "removing the drill snapshot", self.timeout
                )
                self.drill_snapshot = None
            except BackupError as e:
                problems.append(str(e))
        return problems

    def release(self, made: hv.Made | None, *, succeeded: bool) -> list[BaseException]:
        problems: list[BaseException] = []
        for close in (lambda: self.hotadd.close() if self.hotadd is not None else [], self._release_reader):
            try:
                problems += [HypervisorError(p) for p in close()]
            except BackupError as e:
                problems.append(e)
        self.hotadd = None
        if not succeeded and self.created is not None and not self.request.in_place:
            try:
                destroy_vm(self.created, self.timeout)
                self.created = None
            except BackupError as e:
                problems.append(e)
        if self.entry is not None:
            self.ledger.release(self.entry)
            if not problems:
                self.ledger.remove(self.entry)
        return problems


# -- devices ---------------------------------------------------------------------


def disk_device(vm: str, i: int, ds: str, capacity: int, controller: int, unit: int, key: int) -> tuple[Any, str]:
    """A new thin disk (the VM's ``i``-th) of ``capacity`` bytes at ``unit`` of ``controller``:
    its device spec and its file (``[ds] vm/vm.vmdk``, ``[ds] vm/vm_1.vmdk``...)."""
    file = f"[{ds}] {vm}/{vm}.vmdk" if i == 0 else f"[{ds}] {vm}/{vm}_{i}.vmdk"
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=file, diskMode="persistent", thinProvisioned=True)
    disk = vim.vm.device.VirtualDisk(
        key=key,
        controllerKey=controller,
        unitNumber=unit,
        backing=backing,
        capacityInBytes=capacity,
        capacityInKB=capacity // 1024,
    )
    return vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk), file


def nic_device(
    cls: Any,
    n: int,
    key: int,
    src: str,
    mac: str | None,
    networks: dict[str, Any],
    request: hv.RestoreRequest,
    changes: list[str],
    *,
    keep_mac: bool,
) -> Any:
    """Network adapter ``n`` (of class ``cls``) on ``src`` mapped by the request's network map,
    or disconnected when the network does not exist on the target host (said in ``changes``);
    a new MAC address unless in place (``keep_mac``: the source's MAC is vSphere's to keep)."""
    dst = request.network_map.get(src, src)
    net = networks.get(dst) if dst else None
    nic = cls(key=key)
    # vSphere wants a backing that exists: a NIC whose network is missing sits,
    # disconnected, on one of the host's networks until someone connects it.
    backing_net = net if net is not None else next(iter(networks.values()), None)
    nic.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=net is not None, allowGuestControl=True)
    if isinstance(backing_net, vim.dvs.DistributedVirtualPortgroup):
        dvs = backing_net.config.distributedVirtualSwitch
        nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(portgroupKey=backing_net.key, switchUuid=dvs.uuid)
        )
    elif backing_net is not None:
        nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=backing_net.name, network=backing_net
        )
    if net is None:
        on = f" (on {backing_net.name} until connected)" if backing_net is not None else ""
        what = f"network {src} does not exist on the target" if src else "it was not connected"
        changes.append(f"network adapter {n}: {what}: disconnected{on}")
    elif dst != src:
        changes.append(f"network adapter {n}: network {src} mapped to {dst}")
    if request.in_place and keep_mac:
        nic.addressType, nic.macAddress = "manual", mac
    else:
        nic.addressType = "generated"
        if mac:
            changes.append(f"network adapter {n}: new MAC address (the source's was {mac})")
    return vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)


# -- the mover's writes --------------------------------------------------------


def _write_new(repo: str, point: str, device: str, disk: str, cancel: Any, progress: Any) -> int:
    """The point's disk into a new (blank) hot-added disk: only the non-zero blocks (thin stays thin)."""
    from .. import _mover

    r = _mover.restore_disk(repo, point, device, disk=disk, existing=True, blank=True, progress=progress, cancel=cancel)
    return int(r.bytes_written)


def _write_in_place(
    repo: str, point: str, device: str, disk: str, extents: list[tuple[int, int]] | None, cancel: Any, progress: Any
) -> int:
    """Only what differs: the blocks of ``extents`` (the areas CBT says changed
    since the point) or of the whole disk that differ from the point; returns
    the bytes changed (written, or deallocated where the point has zeros)."""
    from .. import _mover

    r = _mover.restore_disk(
        repo, point, device, disk=disk, existing=True, compare=True, extents=extents, progress=progress, cancel=cancel
    )
    return int(r.bytes_written) + int(r.bytes_punched)


def _point_change_id(repo: str, point: str, disk: str) -> str | None:
    from .. import _mover

    infos, _ = _mover.list_backups(repo)
    info = next((i for i in infos if i.id == point), None)
    if info is None:
        return None
    for d in info.disks:
        if d.name == disk:
            return d.change_id
    return None


# -- HTTP (/folder) -------------------------------------------------------------


def _pieces(reader: Any, pool: ThreadPoolExecutor, cancel: Any, progress: Any) -> Any:
    """The disk of ``reader`` in order, in pieces of ``_UPLOAD_CHUNK`` bytes, read
    by ``pool`` at most ``_UPLOAD_AHEAD`` pieces ahead of the consumer: the next
    pieces are read and decompressed while one is encrypted and sent (memory:
    ``_UPLOAD_AHEAD`` pieces)."""
    size = reader.size
    ahead: deque[Any] = deque()
    queued = sent = 0
    try:
        while sent < size:
            while queued < size and len(ahead) < _UPLOAD_AHEAD:
                n = min(_UPLOAD_CHUNK, size - queued)
                ahead.append(pool.submit(reader.read, queued, n))
                queued += n
            if cancel is not None and cancel.cancelled:
                raise CancelledError("cancelled")
            piece = ahead.popleft().result()
            yield piece
            sent += len(piece)
            if progress is not None:
                progress(sent, size)
    finally:
        for f in ahead:
            f.cancel()


def _http(client: Any, method: str, url: str, body: Any = None, length: int | None = None) -> tuple[int, str]:
    """One request on the datastore's HTTPS access with the session's cookie; ``body``
    an iterable of bytes sent as they come (``length`` bytes in all)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=client.ssl_context, timeout=300)
    try:
        conn.putrequest(method, f"{u.path}?{u.query}")
        conn.putheader("Cookie", client.cookie)
        if body is not None:
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(length or 0))
        conn.endheaders()
        sent: OSError | None = None
        if body is not None:
            try:
                for chunk in body:
                    conn.send(chunk)
            except OSError as e:  # the server answered early and closed: its answer says why
                sent = e
        try:
            res = conn.getresponse()
        except (http.client.HTTPException, OSError) as e:
            raise HypervisorError(f"{method} {u.path}: {sent or e}") from e
        text = res.read(300).decode("utf-8", errors="replace").strip()
        return res.status, text
    except (http.client.HTTPException, OSError) as e:
        raise HypervisorError(f"{method} {u.path}: {e}") from e
    finally:
        conn.close()


# -- removal ---------------------------------------------------------------------


def _instance_uuid(vm: Any) -> str | None:
    try:
        return str(vm.config.instanceUuid) or None
    except AttributeError:
        return None


def destroy_vm(vm: Any, timeout: float) -> None:
    """Powers off (if on) and destroys a VM with its files."""
    try:
        name = vm.name
        if str(vm.runtime.powerState) == "poweredOn":
            run_task(lambda: vm.PowerOffVM_Task(), f"powering off VM {name}", timeout)
    except vmodl.fault.ManagedObjectNotFound:
        return
    try:
        run_task(lambda: vm.Destroy_Task(), f"destroying VM {name}", timeout)
    except HypervisorError as e:
        if "ManagedObjectNotFound" in str(e):
            return
        raise


def _marked(vm: Any, run_id: str) -> bool:
    try:
        return any(o.key == MARK and str(o.value) == run_id for o in vm.config.extraConfig or [])
    except (AttributeError, vmodl.fault.ManagedObjectNotFound):
        return False


def reconcile_restore(client: Any, plan: Plan, ledger: Ledger, entry: Entry, timeout: float = 600.0) -> list[str]:
    """Removes what a dead restore left (its ledger entry names it): its disks
    detached from the plan's agent VMs, the controllers it added, and, unless it
    was in place or had finished, the VM it made (only one that carries its mark).
    Returns the problems; the entry is removed when there are none."""
    from .reconcile import agent_objects, remove_added_controllers

    r = entry.restore or {}
    name = r.get("name") or entry.vm
    problems: list[str] = []
    task = r.get("create_task")
    if task and task_state(client._stub, task) == "running":
        try:
            wait_task(vim.Task(task, client._stub), f"creating VM {name} (run {entry.run_id})", timeout)
        except TaskTimeoutError as e:
            return [str(e)]
        except BackupError:
            pass  # it failed: nothing made
    files = {a["file"] for a in entry.attachments}
    agents = agent_objects(client, plan)
    for agent in agents:
        try:
            detach_files(agent, files, timeout, f"detaching the disks of restored VM {name} from {agent.name}")
        except BackupError as e:
            problems.append(str(e))
        except vmodl.fault.ManagedObjectNotFound:
            continue
    if entry.controllers and not problems:
        for what, action in remove_added_controllers(client, agents, ledger, [entry], timeout):
            try:
                action()
            except BackupError as e:
                problems.append(f"{what}: {e}")
    if not r.get("in_place") and not r.get("done") and not problems:
        victims = []
        if r.get("moref"):
            vm = client.vm_by_moref(r["moref"])
            if _marked(vm, entry.run_id):
                victims.append(vm)
        if not victims:
            victims = [vm for vm in client.vm_index(refresh=True).get(name, []) if _marked(vm, entry.run_id)]
        for vm in victims:
            try:
                destroy_vm(vm, timeout)
                log.info("restore of %s by run %s: half-made VM removed", name, entry.run_id)
            except BackupError as e:
                problems.append(str(e))
    if not problems:
        ledger.remove(entry)
    return problems


__all__ = ["MARK", "VSphereRestore", "VSphereRestoreSteps", "describe_point", "destroy_vm", "reconcile_restore"]
