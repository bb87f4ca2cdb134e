"""Inventory: what a VM is made of, and which VMs a plan's selection picks."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from ..errors import HypervisorError, VmNotFoundError
from ..plan import Selection
from ..plan_names import VsphereNames

CLONE_PREFIX = "vmbackup-clone-"


@dataclass(frozen=True)
class DiskInfo:
    key: int
    name: str  # the .vmx name: scsi0:1, sata0:0, nvme0:0, ide0:1
    file: str  # "[datastore] vm/vm.vmdk", the running top of the chain
    datastore: str
    capacity: int
    uuid: str = ""
    mode: str = "persistent"  # backing.diskMode
    skip_reason: str | None = None  # why a snapshot does not cover it (never read then)
    encrypted: bool = False  # backing.keyId is set: its files hold ciphertext
    change_id: str = ""  # backing.changeId of the running disk ("" without CBT)
    datastore_type: str = ""  # VMFS, NFS, vsan, VVOL... (summary.type)


def skip_reason(dev: Any) -> str | None:
    """Why a snapshot does not freeze this disk, or None.

    VMware: independent disk modes are "not affected by snapshots"
    (VirtualDiskMode); a physical-compatibility RDM "cannot use disk modes"
    and passes commands straight to the LUN (VirtualDiskCompatibilityMode).
    Reading either during a backup reads the live, changing disk.
    """
    b = dev.backing
    if isinstance(b, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
        if getattr(b, "compatibilityMode", "") == "physicalMode":
            return "physical-mode RDM: not covered by snapshots"
    mode = getattr(b, "diskMode", "") or ""
    if mode.startswith("independent"):
        return f"independent disk ({mode}): not covered by snapshots"
    return None


def key_id_text(key: Any) -> str:
    """A CryptoKeyId as ``key <id> of provider <provider>``."""
    provider = getattr(getattr(key, "providerId", None), "id", None) or "?"
    return f"key {key.keyId} of provider {provider}"


@dataclass(frozen=True)
class VmInfo:
    name: str
    moref: str
    host: str
    cluster: str | None
    datastores: tuple[str, ...]
    disks: tuple[DiskInfo, ...]
    power_state: str
    tools_running: bool
    cbt_enabled: bool
    folder: str = ""
    # VM Encryption: config.keyId, or a disk's backing.keyId ("key K of provider P"), else None
    encryption: str | None = None
    has_snapshots: bool = False  # any snapshot at all when read (ours included)

    @property
    def skipped_disks(self) -> list[dict[str, str]]:
        """The disks never read, with why: ``[{"disk": "scsi0:1", "reason": ...}]``."""
        return [{"disk": d.name, "reason": d.skip_reason} for d in self.disks if d.skip_reason]

    @property
    def readable_disks(self) -> list[DiskInfo]:
        """The disks a snapshot freezes: the ones a backup reads."""
        return [d for d in self.disks if not d.skip_reason]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "moref": self.moref,
            "host": self.host,
            "cluster": self.cluster,
            "datastores": list(self.datastores),
            "disks": [d.__dict__ for d in self.disks],
            "power_state": self.power_state,
            "tools_running": self.tools_running,
            "cbt_enabled": self.cbt_enabled,
            "folder": self.folder,
            "encryption": self.encryption,
            "skipped_disks": self.skipped_disks,
        }


def check_skipped(info: VmInfo, policy: str) -> list[dict[str, str]]:
    """The VM's skipped disks under the plan's ``independent_disks`` policy.

    ``skip``: returned (the row and the backup point list them; the VM is ok
    with a warning). ``fail``: a VM with any raises HypervisorError, one line.
    """
    skipped = info.skipped_disks
    if skipped and policy == "fail":
        what = "; ".join(f"{s['disk']}: {s['reason']}" for s in skipped)
        raise HypervisorError(f"VM {info.name} has disks no snapshot covers (independent_disks: fail): {what}")
    return skipped


def _bus(ctrl: Any) -> str:
    if isinstance(ctrl, vim.vm.device.VirtualSCSIController):
        return "scsi"
    if isinstance(ctrl, vim.vm.device.VirtualNVMEController):
        return "nvme"
    if isinstance(ctrl, vim.vm.device.VirtualSATAController):
        return "sata"
    if isinstance(ctrl, vim.vm.device.VirtualIDEController):
        return "ide"
    return "disk"


def datastore_of(file_name: str) -> str:
    """``[ds1] vm/vm.vmdk`` -> ``ds1``."""
    return file_name[1:].split("]", 1)[0] if file_name.startswith("[") else ""


def disks_of(devices: list[Any]) -> list[tuple[str, Any]]:
    """The (name, VirtualDisk) pairs of a hardware device list."""
    ctrls = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    out = []
    for dev in devices:
        if isinstance(dev, vim.vm.device.VirtualDisk):
            ctrl = ctrls.get(dev.controllerKey)
            name = f"{_bus(ctrl)}{ctrl.busNumber}:{dev.unitNumber}" if ctrl is not None else str(dev.key)
            out.append((name, dev))
    return out


def base_uuid(backing: Any) -> str:
    """The uuid of the base disk of a backing chain: the disk's identity across snapshots."""
    while getattr(backing, "parent", None) is not None:
        backing = backing.parent
    return getattr(backing, "uuid", "") or ""


def chain_files(backing: Any) -> list[str]:
    """Every file of a backing chain, top first."""
    out = []
    while backing is not None:
        out.append(backing.fileName)
        backing = getattr(backing, "parent", None)
    return out


def _folder_path(vm: Any) -> str:
    names = []
    obj = vm.parent
    while obj is not None and isinstance(obj, vim.Folder):
        names.append(obj.name)
        obj = obj.parent
    # up to (excluding) the datacenter: "vm/prod/web"
    return "/".join(reversed(names))


def vm_info(vm: Any) -> VmInfo:
    """Everything the procedure and the planner need to know about a VM, read once."""
    config = vm.config
    runtime = vm.runtime
    host = runtime.host
    cluster = host.parent if host is not None else None
    disks = []
    ds_types: dict[str, str] = {}
    for name, dev in disks_of(list(config.hardware.device)):
        b = dev.backing
        fname = b.fileName
        ds = datastore_of(fname)
        if ds not in ds_types:
            ds_obj = getattr(b, "datastore", None)
            ds_types[ds] = str(getattr(getattr(ds_obj, "summary", None), "type", "") or "") if ds_obj else ""
        disks.append(
            DiskInfo(
                key=dev.key,
                name=name,
                file=fname,
                datastore=ds,
                capacity=int(dev.capacityInBytes or dev.capacityInKB * 1024),
                uuid=base_uuid(b),
                mode=getattr(b, "diskMode", "") or "persistent",
                skip_reason=skip_reason(dev),
                encrypted=getattr(b, "keyId", None) is not None,
                change_id=getattr(b, "changeId", None) or "",
                datastore_type=ds_types[ds],
            )
        )
    encryption = None
    if getattr(config, "keyId", None) is not None:
        encryption = key_id_text(config.keyId)
    else:
        keyed = [
            dev.backing.keyId
            for _, dev in disks_of(list(config.hardware.device))
            if getattr(dev.backing, "keyId", None)
        ]
        if keyed:
            encryption = key_id_text(keyed[0])
    guest = vm.guest
    tools = getattr(guest, "toolsRunningStatus", None) == "guestToolsRunning"
    return VmInfo(
        name=vm.name,
        moref=vm._moId,
        host=host.name if host is not None else "",
        cluster=cluster.name if isinstance(cluster, vim.ClusterComputeResource) else None,
        datastores=tuple(sorted({d.datastore for d in disks})),
        disks=tuple(disks),
        power_state=str(runtime.powerState),
        tools_running=bool(tools),
        cbt_enabled=bool(config.changeTrackingEnabled),
        folder=_folder_path(vm),
        encryption=encryption,
        has_snapshots=vm.snapshot is not None and bool(vm.snapshot.rootSnapshotList),
    )


def is_agent_or_ours(vm: Any, config: Any) -> bool:
    """Agent appliances and our own linked clones are never backed up."""
    return _is_agent_or_ours(vm.name, config.template, config.extraConfig)


def _is_agent_or_ours(name: str, template: Any, extra_config: Any) -> bool:
    if name.startswith(CLONE_PREFIX):
        return True
    for opt in extra_config or []:
        if opt.key == "vmbackup.agent" and str(opt.value).lower() == "true":
            return True
    return bool(template)


def _tags(client: Any, vm: Any) -> set[str]:
    """Custom attributes as ``Name=Value`` and ``Name`` (vSphere tags need the REST API)."""
    fields = {f.key: f.name for f in client.content.customFieldsManager.field or []} if _has_cfm(client) else {}
    out: set[str] = set()
    for cv in vm.customValue or []:
        name = fields.get(cv.key)
        if name:
            out |= {name, f"{name}={cv.value}"}
    return out


def _has_cfm(client: Any) -> bool:
    return client.content.customFieldsManager is not None


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def select_vms(client: Any, selection: Selection, agent_vms: set[str] | None = None) -> list[VmInfo]:
    """The VMs the selection picks (any criterion), minus exclusions, agents and our clones, by name
    (VMs of one name: each, by moref).

    Raises VmNotFoundError for a plain name in ``selection.vms`` that does not exist.
    """
    agent_vms = agent_vms or set()
    # By moref: two VMs of one name (in two folders, on two hosts) are both picked.
    picked: dict[str, tuple[str, Any]] = {}
    seen: set[str] = set()
    # One PropertyCollector request (a page per 1000 VMs) reads what every VM
    # is asked here; the criteria below read more only of VMs they look at.
    # It also renews the client's VM index (agents, clones) for the run.
    listed = client.properties_of_all(vim.VirtualMachine, ["name", "config.template", "config.extraConfig"])
    index: dict[str, list[Any]] = {}
    for vm, props in listed:
        if "name" in props:
            index.setdefault(props["name"], []).append(vm)
    client.set_vm_index(index)
    for vm, props in listed:
        name = props.get("name")
        if name is None or "config.template" not in props:  # no configuration (yet), or not ours to see
            continue
        seen.add(name)
        if name in agent_vms or _is_agent_or_ours(name, props["config.template"], props.get("config.extraConfig")):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in selection.exclude):
            continue
        hit = any(fnmatch.fnmatchcase(name, p) for p in selection.vms)
        if not hit and selection.hosts:
            host = vm.runtime.host
            hit = host is not None and any(fnmatch.fnmatchcase(host.name, p) for p in selection.hosts)
        if not hit and selection.clusters:
            host = vm.runtime.host
            cl = host.parent if host is not None else None
            hit = isinstance(cl, vim.ClusterComputeResource) and any(
                fnmatch.fnmatchcase(cl.name, p) for p in selection.clusters
            )
        if not hit and selection.folders:
            path = _folder_path(vm)
            parts = path.split("/")
            hit = any(fnmatch.fnmatchcase(path, p) or p in parts for p in selection.folders)
        if not hit and selection.tags:
            tags = _tags(client, vm)
            hit = any(t in tags for t in selection.tags)
        if hit:
            picked[vm._moId] = (name, vm)
    missing = [p for p in selection.vms if not _is_glob(p) and p not in seen]
    if missing:
        raise VmNotFoundError(f"VM {', '.join(missing)} does not exist in {client.conn.host}")
    return [vm_info(vm) for _, vm in sorted(picked.values(), key=lambda p: (p[0], p[1]._moId))]


def inventory_names(client: Any) -> VsphereNames:
    """The names of the inventory's hosts, clusters, datastores, VM folders
    and custom attributes, for checking a plan's names (``plan_names``).

    One ``RetrievePropertiesEx`` over a container view (and its pages), not
    a round trip per object: a vCenter's inventory may hold thousands.
    """
    content = client.content
    kinds = [vim.HostSystem, vim.ClusterComputeResource, vim.Datastore, vim.Folder, vim.Datacenter]
    view = content.viewManager.CreateContainerView(content.rootFolder, kinds, True)
    try:
        props = {
            vim.HostSystem: ["name"],
            vim.ClusterComputeResource: ["name"],
            vim.Datastore: ["name"],
            vim.Folder: ["name", "parent"],
            vim.Datacenter: ["vmFolder"],
        }
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[
                vim.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[vim.PropertyCollector.TraversalSpec(type=vim.view.ContainerView, path="view")],
                )
            ],
            propSet=[vim.PropertyCollector.PropertySpec(type=k, pathSet=p) for k, p in props.items()],
        )
        pc = content.propertyCollector
        objs = []
        result = pc.RetrievePropertiesEx([spec], vim.PropertyCollector.RetrieveOptions())
        while result is not None:
            objs += list(result.objects or [])
            result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
    finally:
        view.Destroy()

    names: dict[type, set[str]] = {vim.HostSystem: set(), vim.ClusterComputeResource: set(), vim.Datastore: set()}
    folders: dict[str, tuple[str, str | None]] = {}  # moref -> (name, parent moref)
    roots: set[str] = set()  # the datacenters' VM folders ("vm")
    for oc in objs:
        values = {p.name: p.val for p in oc.propSet or []}
        for kind, found in names.items():
            if isinstance(oc.obj, kind):
                found.add(values.get("name", ""))
        if isinstance(oc.obj, vim.Folder):
            parent = values.get("parent")
            folders[oc.obj._moId] = (values.get("name", ""), parent._moId if parent is not None else None)
        elif isinstance(oc.obj, vim.Datacenter) and values.get("vmFolder") is not None:
            roots.add(values["vmFolder"]._moId)

    # A VM folder's path is as the selection matches it: from the
    # datacenter's VM folder down ("vm/prod/web"); any of its names too.
    vm_folders: set[str] = set()
    for moref, (name, _) in folders.items():
        parts, at = [], moref
        while at in folders and at not in roots:
            parts.append(folders[at][0])
            at = folders[at][1]
        if at in roots:
            path = "/".join([folders[at][0], *reversed(parts)])
            vm_folders |= {name, path}

    attributes = set()
    cfm = content.customFieldsManager
    for f in (cfm.field or []) if cfm is not None else []:
        if f.managedObjectType in (None, vim.VirtualMachine):
            attributes.add(f.name)
    return VsphereNames(
        hosts=frozenset(names[vim.HostSystem]),
        clusters=frozenset(names[vim.ClusterComputeResource]),
        datastores=frozenset(names[vim.Datastore]),
        folders=frozenset(vm_folders),
        attributes=frozenset(attributes),
    )
