"""The hypervisor protocol: what an adapter supplies so that one procedure
(``procedure.backup_one``) backs up a VM of any hypervisor.

Two levels:

- :class:`Hypervisor`: one hypervisor of a plan (a vCenter, a Hyper-V host):
  ``connect``, ``select`` (the plan's VMs it has), ``limit_keys`` (what a
  VM's backup holds a slot of), ``steps`` (the per-VM part below) and
  ``sweep`` (what crashed runs left). Restore verbs (``restore_disks``,
  ``register_vm``...) come with the restore issue: they go in
  :class:`Restorer` below, a separate protocol, so that an adapter can back
  up before it can restore.
- :class:`VmSteps`: the backup of one VM, in the order the procedure calls
  them. Each step is the hypervisor's own; the order, the mover session, the
  parallel reads, the error semantics and cleanup on every path are the
  procedure's (docs/architecture.md, "One procedure for every hypervisor").

Nothing here imports Prefect, pyVmomi or WinRM: the adapters do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..pointmeta import Previous
    from ..results import VmResult

# The consistency of a point (the row's ``consistency``).
APPLICATION = "application"  # the guest's writers were quiesced (VMware Tools, the Hyper-V writer)
CRASH = "crash"  # as after a power cut
POWERED_OFF = "powered-off"  # nothing ran: satisfies ``quiesce: required``
CONSISTENCIES = (APPLICATION, CRASH, POWERED_OFF)


@dataclass
class Frozen:
    """What ``freeze`` made: a point in time of the VM's disks.

    ``handle`` is the adapter's own object (a vSphere snapshot, a Hyper-V
    shadow copy set's answer); the procedure never looks inside it.
    """

    point_unix: float  # the backup's point in time
    consistency: str  # one of CONSISTENCIES
    note: str | None = None  # why not application-consistent, when it is not
    handle: Any = None
    label: str = ""  # the snapshot's name / the shadow copy id, for on_frozen


@dataclass
class Exposed:
    """Where the mover reads each disk of the frozen point (``sources``:
    disk name -> path or NBD URI), and how it got there."""

    sources: dict[str, str]
    transport: str  # vSphere: hotadd|direct|nbd; Hyper-V: local|share
    detail: str | None = None  # "through linked clone <name>", "shadow copy shared as ..."


@dataclass
class DiskRead:
    """How the mover reads one disk into the point."""

    name: str
    source: str
    capacity: int
    change_id: str | None = None  # the frozen disk's change id, stored in the point
    changed: list[tuple[int, int]] | None = None  # incremental: the areas changed since the parent
    allocated: list[tuple[int, int]] | None = None  # full: read only these (CBT's "*")
    full_reason: str | None = None  # a full's reason (None for an incremental)
    row: dict[str, Any] = field(default_factory=dict)  # the disk's fields in the row and the point (key, uuid, file...)


@dataclass
class ReadPlan:
    """The reads of one point: its parent (None: a full) and one read per disk."""

    parent: str | None
    disks: list[DiskRead]
    full_reason: str | None = None  # the VM-wide reason of a full (first backup, periodic full...)
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"disk", "reason"}] not read


@runtime_checkable
class VmSteps(Protocol):
    """The backup of one VM, step by step (``procedure.backup_one`` calls them
    in this order). Every step may raise ``vmbackup.errors`` classes; their
    ``retryable`` decides retries (errors.py)."""

    name: str  # the VM's name (its label in the repository)
    # A release problem after the commit keeps its class (and so its
    # retryability) when True; else it is a HypervisorError (not retried:
    # the point exists).
    cleanup_keeps_class: bool

    def reconcile(self) -> None:
        """Remove what earlier (crashed) runs left on this VM (snapshots,
        shadow copies, hot-added disks), before anything new is made."""

    def describe(self, result: VmResult) -> None:
        """Read the VM as it is now and fill the row's identity fields
        (``vm_id``, ``host``, ``datastores``...); raise ``VmNotFoundError``
        if it is gone. The procedure then finds the VM's latest point by
        ``result.vm_id``."""

    def freeze(self) -> Frozen:
        """Make the point in time (a snapshot, a shadow copy set), following
        the plan's quiesce policy. Whatever it made, ``release`` undoes."""

    def expose(self, frozen: Frozen) -> Exposed:
        """Make the frozen disks readable by the mover on this agent."""

    def plan_reads(self, frozen: Frozen, exposed: Exposed, previous: Previous | None) -> ReadPlan:
        """Full or incremental, per disk, and what to read. ``previous`` is the
        VM's latest point (``pointmeta.latest``: by ``vm_id``, by name for
        points without one); when its metadata cannot be used
        (``previous.full_reason()``), a full with that reason."""

    def still_frozen(self, frozen: Frozen, error: BaseException | None) -> BaseException | None:
        """None when the frozen point still holds; else the error to raise
        (a ``SnapshotError``: our snapshot or shadow copy vanished, so what
        was read may not be the point in time). ``error`` is the read's
        failure, if any: the check then explains it, or returns None to let
        it stand."""

    def point(
        self, frozen: Frozen, exposed: Exposed, reads: ReadPlan, disks: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any]]:
        """The point's config (JSON text) and the adapter's own attributes
        (``vm_moref``, transport, consistency...), once every disk is read;
        the procedure adds the contract's fields (``pointmeta.PointMeta``)."""

    def committed(self, backup_id: str, mode: str) -> None:
        """The point is committed (a full may end what made it one: a chain
        marked broken by the CBT audit)."""

    def release(self, frozen: Frozen | None, *, succeeded: bool) -> list[BaseException]:
        """Undo expose and freeze (detach, remove the snapshot, end the
        shadow copy set), whatever happened before; ``frozen`` is None when
        freeze did not finish. Returns the problems (never raises), so that
        the procedure decides what they mean."""


@runtime_checkable
class Hypervisor(Protocol):
    """One hypervisor of a plan (a vCenter, a Hyper-V host)."""

    kind: str  # "vsphere" or "hyperv" (the row's ``hypervisor``)
    label: str  # "vCenter vc1", "Hyper-V host hv1"

    def connect(self) -> None:
        """Log in (raises ``AuthenticationError``, ``CertificateError``...)."""

    def close(self) -> None:
        """Log out; never raises."""

    def select(self, selection: Any) -> Sequence[Any]:
        """The VMs of ``selection`` this hypervisor has (the adapter's VM
        objects, each with ``name``, ``host`` and ``vm_id`` when known)."""

    @staticmethod
    def limit_keys(vm: Any) -> list[tuple[str, str]]:
        """What one VM's backup holds a slot of besides its agent:
        ``[("host", "esx1"), ("datastore", "ds1")]`` or
        ``[("host", "hv1"), ("volume", "hv1:D")]``. A static method: the
        orchestration asks it for VMs before any connection."""

    def steps(self, vm: Any, plan: Any, agent: Any, *, run_id: str, **hooks: Any) -> VmSteps:
        """The per-VM steps of ``vm``, read by ``agent``."""

    def sweep(self, *, older_than_seconds: float) -> list[Any]:
        """Remove what crashed runs left (ours only, older than the threshold)."""


# -- Restore (docs/restore.md) -------------------------------------------------


@dataclass
class DiskSpec:
    """One disk of a VM as a restore sees it, whatever the hypervisor."""

    name: str  # the disk's name in the point ("scsi0:0", "sata0:1", "ide0:0"): kept where the target has the bus
    capacity: int  # bytes
    bus: str = "scsi"  # "scsi", "sata", "ide", "nvme" (the name's prefix)
    file: str | None = None  # the source's file name, when known ("vm1/vm1.vmdk", "D:\\VMs\\vm1.vhdx")
    # where the target put it when that is not ``name`` (a target without the bus: SATA onto Hyper-V)
    place: str | None = None


@dataclass
class NicSpec:
    """One network adapter of a VM."""

    network: str  # the network (vSphere port group) or virtual switch it was connected to
    mac: str | None = None
    kind: str | None = None  # "vmxnet3", "e1000e", "synthetic", ...


@dataclass
class VmDescription:
    """A point's VM in the terms every restore understands (``Restorer.describe_point``):
    what crosses hypervisors. ``raw`` is the source hypervisor's own
    configuration (vSphere's config; Hyper-V's description), which a restore
    onto the same hypervisor uses in full."""

    name: str
    hypervisor: str  # the point's hypervisor ("vsphere" or "hyperv")
    firmware: str = "bios"  # "bios" or "efi" (Hyper-V: generation 1 or 2)
    cpus: int = 1
    memory_mb: int = 1024
    guest_os: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)
    raw: Any = None
    files: dict[str, str] = field(default_factory=dict)  # other files in the point ("nvram" -> base64, ...)
    host: str | None = None  # where the point's VM ran (the default target host)
    location: str | None = None  # its datastore (vSphere: the .vmx's) or folder (Hyper-V): the default target
    changes: list[str] = field(default_factory=list)  # what the point cannot give back, said in the row


@dataclass
class RestoreRequest:
    """What a user asked to restore (``vmbackup restore`` / the ``restore`` deployment), resolved
    to one point. Locations left None mean "where the point came from" (docs/restore.md)."""

    vm: str  # the source VM's name (the row's ``vm``)
    point: str  # the backup id
    restored_as: str  # the new VM's name (the source's name for --in-place)
    host: str | None = None  # an ESXi host or Hyper-V host of the plan
    datastore: str | None = None  # vSphere datastore
    path: str | None = None  # Hyper-V folder
    network_map: dict[str, str] = field(default_factory=dict)  # source network -> target network
    power_on: bool = False
    in_place: bool = False  # roll the existing (powered-off) VM back to the point
    drill: bool = False  # a restore drill: the plan's isolated target, removed afterwards
    folder: str | None = None  # vSphere: the VM folder (a path under the datacenter's VM folder)
    resource_pool: str | None = None  # vSphere: the resource pool (a path under the host's root pool)


@dataclass
class Target:
    """Where a restore goes, checked before anything is made (``RestoreSteps.prepare``)."""

    restored_as: str
    host: str | None
    location: str | None  # datastore or folder
    disks: list[DiskSpec]  # the disks to write, by name
    changes: list[str] = field(default_factory=list)  # what differs from the source and why ("new MAC ...")
    warnings: list[str] = field(default_factory=list)  # devices dropped, ...
    handle: Any = None  # the adapter's own (a create spec)


@dataclass
class Made:
    """What ``create`` made (or, in place, found): the VM the disks go into."""

    vm_id: str | None  # the new VM's id (vSphere instanceUuid, Hyper-V VM Id), once known
    transport: str  # how the disks are written: "hotadd", "folder" (vSphere); "share", "local" (Hyper-V)
    handle: Any = None


@dataclass
class Written:
    """What writing one disk did."""

    bytes_written: int
    seconds: float


@runtime_checkable
class RestoreSteps(Protocol):
    """The restore of one VM, step by step (``restore.restore_one`` calls them in order).

    Nothing is created before ``create``; ``release`` undoes what was made
    when the restore failed (the half-made VM removed, disks detached), and
    the adapter's ledger names it before it exists, so that a killed run's
    leftovers are removed by the next ``reconcile`` or the sweeper.
    """

    name: str  # the source VM's name

    def reconcile(self) -> None:
        """Remove what an earlier (killed) restore to the same name left."""

    def prepare(self, description: VmDescription) -> Target:
        """Check the request against the target (name free, host, datastore or
        path exists and has room, mapped networks exist; in place: the VM
        exists and is powered off) and build what ``create`` makes. Raises
        ``RestoreInputError`` (exit 2) on any of them; nothing is made."""

    def create(self, target: Target) -> Made:
        """Make the VM (or, in place, take the existing one) with its disks
        ready to be written: thin disks of the saved sizes attached where the
        agent can write them."""

    def write_disk(self, made: Made, disk: DiskSpec, point: str, *, cancel: Any, progress: Any) -> Written:
        """Write one disk of ``point`` into the made VM (called for several
        disks at once, from threads)."""

    def finish(self, made: Made) -> None:
        """Complete the VM once every disk is written (detach from the agent,
        the ``.nvram``, Hyper-V's import), leaving it powered off."""

    def read_back(self, made: Made) -> dict[str, str]:
        """Sources the mover can read the restored (powered-off) disks from
        (disk name -> path or NBD URI), for a drill's comparison; ``power_on``
        and ``release`` let go of them."""

    def power_on(self, made: Made) -> None:
        """Power the finished VM on (``--power-on``, a drill after its
        comparison), first letting go of what ``read_back`` holds."""

    def remove(self, made: Made) -> None:
        """Remove the restored VM and its files (a drill's end)."""

    def release(self, made: Made | None, *, succeeded: bool) -> list[BaseException]:
        """Undo what the restore holds (attached disks, sessions); when it
        failed, remove the half-made VM. Returns the problems, never raises."""


@runtime_checkable
class Restorer(Protocol):
    """Restore verbs of a hypervisor: an adapter that restores implements
    ``Hypervisor`` and ``Restorer``."""

    kind: str

    @staticmethod
    def describe_point(config: Any, attributes: dict[str, Any]) -> VmDescription:
        """The VM of one of this hypervisor's points, from its saved configuration.
        Raises ``RestoreInputError`` when the point has no configuration."""

    def restore_steps(self, request: RestoreRequest, plan: Any, agent: Any, *, run_id: str) -> RestoreSteps:
        """The per-VM restore steps, writing through ``agent``."""
