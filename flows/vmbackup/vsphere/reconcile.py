"""Reconcile: remove what earlier runs left on a VM before backing it up again.

In this order (each step makes the next possible): stop NBD servers they
started, detach the VM's disk files from the plan's agent VMs (a hot-added
file locks the chain), destroy their linked clones, remove the empty SCSI
controllers they added to agent VMs for backup disks, remove their snapshots
(name prefix and run id in the description; a user's snapshot is never
touched), consolidate if vSphere says it is needed.

A retry is another attempt of the same run: the snapshots and ledger entries
of the run's earlier attempts (another attempt id) are leftovers like any
other. A snapshot task an earlier attempt gave up waiting for (its create or
remove task timed out and goes on in vSphere, the ledger names it) is waited
for first, so that a snapshot made after the time-out is removed too, and
consolidation never starts while a removal runs.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyVmomi import vim

from ..errors import BackupError, HypervisorBusyError, KeyRequiredError, TaskTimeoutError
from ..plan import Plan
from . import snapshots
from .inventory import CLONE_PREFIX, chain_files, disks_of
from .ledger import Entry, Ledger
from .tasks import run_task, task_state, wait_task
from .transport import _added_controllers, agent_vm, destroy_clone, detach_files

log = logging.getLogger(__name__)


@dataclass
class Leftover:
    """Something a crashed run left behind, and whether it is gone now."""

    kind: str  # "snapshot", "attachment", "clone", "controller", "nbd", "consolidation", "ledger"
    vm: str
    name: str
    removed: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _stop_nbd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"nbd" not in cmdline:  # the pid was reused by something else
        return False
    os.kill(pid, signal.SIGTERM)
    return True


def vm_files(vm: Any) -> set[str]:
    """Every disk file of the VM: each disk's chain (the frozen files of its snapshots included)."""
    files: set[str] = set()
    for _, dev in disks_of(list(vm.config.hardware.device)):
        files |= set(chain_files(dev.backing))
    return files


def clones_of(client: Any, vm_name: str) -> list[Any]:
    """Our linked clones of the VM, from the client's VM index (the run's selection made it).

    A clone made after that by a run that died is in that run's ledger entry
    (written before the clone exists): ``_ledger_clones`` finds it.
    """
    prefix = f"{CLONE_PREFIX}{vm_name}-"
    return [v for name, vms in client.vm_index().items() if name.startswith(prefix) for v in vms]


def agent_objects(client: Any, plan: Plan) -> list[Any]:
    out = []
    seen: set[str] = set()
    for a in plan.agents:
        obj = agent_vm(client, a)
        if obj is not None and obj._moId not in seen:
            seen.add(obj._moId)
            out.append(obj)
    return out


def _devices(client: Any, objs: list[Any]) -> dict[str, tuple[str, list[Any]]]:
    """``{moref: (name, devices)}`` of the VMs that still exist, in one request."""
    props = client.properties(objs, ["name", "config.hardware.device"])
    return {
        moref: (p.get("name", moref), list(p.get("config.hardware.device") or []))
        for moref, p in props.items()
        if "config.hardware.device" in p
    }


def reconcile_vm(
    client: Any,
    vm: Any,
    vm_name: str,
    plan: Plan,
    ledger: Ledger,
    *,
    current_run: str | None,
    timeout: float = 600.0,
    entries: list[Entry] | None = None,
    snapshot_filter: Any = None,
    current_attempt: str | None = None,
    remove_timeout: float = snapshots.REMOVE_TIMEOUT,
) -> list[Leftover]:
    """Removes what earlier runs left on one VM; returns what it found.

    ``current_attempt`` given, only that attempt of ``current_run`` is spared:
    the run's earlier attempts are cleaned like other runs. Without it the
    whole current run is spared. Raises HypervisorBusyError if a run that is
    still alive (its ledger entry's heartbeat is fresh, on any machine) holds
    the VM; TaskTimeoutError if a snapshot task an earlier attempt left
    running does not finish in time.
    """

    def current(run_id: str | None, att: str | None) -> bool:
        return run_id == current_run and (current_attempt is None or att == current_attempt)

    # Entries of this VM: by its name, and by its moref when both are known (another
    # VM of the same name, in another folder, has entries of its own).
    named = ledger.entries(vm_name)
    everyone = [e for e in named if vm is None or not e.vm_moref or e.vm_moref == getattr(vm, "_moId", None)]
    # Clones are found by name too (``clones_of``): those a live run of the
    # other VM of this name holds are that run's, never ours to destroy.
    theirs = {
        v
        for e in named
        if not any(e is m for m in everyone) and e.alive()
        for c in e.clones
        for v in (c.get("moref"), c.get("name"))
        if v
    }
    # A restore's entry (its half-made VM) is the restore's to reconcile (vsphere/restore.py); it still makes the VM busy.
    entries = [
        e
        for e in (entries if entries is not None else everyone)
        if not current(e.run_id, e.attempt) and e.restore is None
    ]
    for e in everyone:
        # Alive is a fresh heartbeat, whichever machine the run is on (ledger.py).
        if not current(e.run_id, e.attempt) and e.alive():
            raise HypervisorBusyError(f"VM {vm_name} is held by {e.holder()}")
    unread = ledger.unread_holds(vm_name)
    if unread is not None:  # liveness needs no key: the file's mtime is the heartbeat (ledger.py)
        raise HypervisorBusyError(
            f"VM {vm_name} may be held by a live run: ledger entry {unread} cannot be authenticated here "
            "and its heartbeat is fresh"
        )
    found: list[Leftover] = []
    removing = False  # a snapshot removal timed out and goes on: no consolidation now

    def attempt(kind: str, name: str, action: Any) -> bool:
        nonlocal removing
        try:
            action()
            found.append(Leftover(kind, vm_name, name, True))
            return True
        except BackupError as err:
            if kind == "snapshot" and isinstance(err, TaskTimeoutError):
                removing = True
            found.append(Leftover(kind, vm_name, name, False, str(err)))
            return False

    if vm is not None:
        _wait_for_pending_tasks(vm._stub, vm_name, entries, timeout, remove_timeout)

    for e in entries:
        for n in e.nbd:
            if _stop_nbd(int(n["pid"])):
                found.append(Leftover("nbd", vm_name, f"pid {n['pid']}", True))

    found_clones = (clones_of(client, vm_name) if vm is not None else []) + _ledger_clones(client, vm, entries)
    clones = list({c._moId: c for c in found_clones}.values())
    files = {a["file"] for e in entries for a in e.attachments}
    if vm is not None:
        files |= vm_files(vm)
    # The clones' and the agents' devices: one request each, however many there are.
    clone_devices = _devices(client, clones)
    clones = [
        c
        for c in clones
        if c._moId in clone_devices  # gone since the index was made
        and c._moId not in theirs
        and clone_devices[c._moId][0] not in theirs
    ]
    for c in [c for c in clones if not str(clone_devices[c._moId][0]).startswith(CLONE_PREFIX)]:
        # a ledger entry names a VM that is no clone of ours (forged, or its moref reused): never destroyed
        log.warning(
            "VM %s: the ledger names VM %s (%s) as a clone, but its name lacks the prefix %s: not touched",
            vm_name,
            clone_devices[c._moId][0],
            c._moId,
            CLONE_PREFIX,
        )
        clones.remove(c)
    for c in clones:
        files |= {f for _, dev in disks_of(clone_devices[c._moId][1]) for f in chain_files(dev.backing)}
    agents = agent_objects(client, plan)
    agent_devices = _devices(client, agents)
    for agent in agents:
        name, devices = agent_devices.get(agent._moId, (None, []))
        mine = {dev.backing.fileName for _, dev in disks_of(devices)} & files
        for f in sorted(mine):
            attempt(
                "attachment",
                f"{f} on {name}",
                lambda a=agent, f=f, n=name: detach_files(a, {f}, timeout, f"detaching {f} from {n}"),
            )
    for c in clones:
        attempt("clone", clone_devices[c._moId][0], lambda c=c: destroy_clone(c, timeout))
    if any(e.controllers for e in entries):
        for name, action in remove_added_controllers(client, agents, ledger, entries, timeout):
            attempt("controller", name, action)
    ok = all(x.removed for x in found)
    if vm is not None:
        for rid, node in snapshots.ours(vm):
            if current(rid, snapshots.attempt_of(node)) or (snapshot_filter is not None and not snapshot_filter(node)):
                continue
            ok &= attempt(
                "snapshot",
                node.name,
                lambda n=node, rid=rid: _remove_leftover(ledger, vm, vm_name, rid, n, remove_timeout),
            )
        if removing:
            log.warning("VM %s: a snapshot removal goes on; consolidation waits for it", vm_name)
        elif vm.runtime.consolidationNeeded:
            ok &= attempt(
                "consolidation",
                vm_name,
                lambda: run_task(lambda: vm.ConsolidateVMDisks_Task(), f"consolidating VM {vm_name}", timeout),
            )
    if ok:
        for e in entries:
            ledger.remove(e)
    return found


def remove_added_controllers(
    client: Any, agents: list[Any], ledger: Ledger, entries: list[Entry], timeout: float
) -> list[tuple[str, Any]]:
    """``(name, action)`` for each controller the entries say a dead run added to
    one of the plan's agent VMs for backup disks, that is there and empty (its
    disks are detached above): a paravirtual SCSI controller on the bus the
    entry names (and of the key, once it was written). One that holds a disk,
    that this process added (a run of it uses it), or that a live run's entry
    names (it may be about to attach to it) is left alone."""
    wanted = {(c.get("agent_vm"), c.get("bus")): c.get("key") for e in entries for c in e.controllers}
    live = {
        (c.get("agent_vm"), c.get("bus"))
        for e in ledger.entries()
        if e.alive() and e.path not in {x.path for x in entries}
        for c in e.controllers
    }
    unread = ledger.unread_holders()
    if unread:  # a live run's entry this process cannot read may name any of them
        log.info("agent SCSI controllers kept: ledger entries %s cannot be authenticated here and are fresh", unread)
        return []
    devices = _devices(client, agents)  # read again: the detaches above emptied them
    out: list[tuple[str, Any]] = []
    for agent in agents:
        name, devs = devices.get(agent._moId, (None, []))
        busy = {dev.controllerKey for _, dev in disks_of(devs)}
        ours_now = _added_controllers.get(agent._moId, set())
        for d in devs:
            if not isinstance(d, vim.vm.device.ParaVirtualSCSIController) or (name, d.busNumber) not in wanted:
                continue
            key = wanted[(name, d.busNumber)]
            if (key is not None and key != d.key) or d.key in busy or d.key in ours_now or (name, d.busNumber) in live:
                log.info("agent VM %s: SCSI controller %s (bus %s) is in use, kept", name, d.key, d.busNumber)
                continue

            def remove(a: Any = agent, d: Any = d, n: str = name) -> None:
                spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)])
                run_task(lambda: a.ReconfigVM_Task(spec=spec), f"removing SCSI controller {d.key} of {n}", timeout)

            out.append((f"SCSI controller {d.busNumber} of {name}", remove))
    return out


def _wait_for_pending_tasks(
    stub: Any, vm_name: str, entries: list[Entry], timeout: float, remove_timeout: float
) -> None:
    """Waits for the snapshot tasks earlier attempts left running (the ledger names them)."""
    for e in entries:
        snap = e.snapshot or {}
        for key, limit, what in (("create_task", timeout, "creating"), ("remove_task", remove_timeout, "removing")):
            moref = snap.get(key)
            if not moref or task_state(stub, moref) != "running":
                continue
            log.info("VM %s: waiting for task %s (%s a snapshot of run %s)", vm_name, moref, what, e.run_id)
            try:
                wait_task(vim.Task(moref, stub), f"{what} snapshot {snap.get('name')} of VM {vm_name}", limit)
            except TaskTimeoutError:
                raise
            except BackupError as err:  # it failed: nothing of it to wait for
                log.info("VM %s: task %s ended in an error: %s", vm_name, moref, err)


def _remove_leftover(ledger: Ledger, vm: Any, vm_name: str, run_id: str, node: Any, timeout: float) -> None:
    """Removes a leftover snapshot; its removal task is written down before it is
    waited for (it may outlive this process), and forgotten once it finished."""
    e = Entry(run_id=run_id, vm=vm_name, vm_moref=vm._moId, attempt=f"{snapshots.attempt_of(node) or 'x'}-rm")
    e.snapshot = {"name": node.name, "moref": node.snapshot._moId}

    def note(task: str) -> None:
        e.snapshot["remove_task"] = task
        try:
            if e.path is None:  # held while this process waits (a removal may take hours)
                ledger.hold(e)
            else:
                ledger.write(e)
        except KeyRequiredError:  # a sweep of an encrypted repository without its passphrase
            log.warning(
                "VM %s: removing snapshot %s (task %s) unrecorded: the repository is locked", vm_name, node.name, task
            )

    try:
        snapshots.remove(node.snapshot, f"removing leftover snapshot {node.name} of {vm_name}", timeout, on_task=note)
    finally:
        ledger.release(e)  # a removal that timed out keeps its entry, which names the task
    ledger.remove(e)


def _ledger_clones(client: Any, vm: Any, entries: list[Entry]) -> list[Any]:
    """The clones the ledger names: by moref when it was recorded, else by name in the VM's folder
    (where the clone is made: one ``SearchIndex.FindChild``), else in the index."""
    out = []
    folder = None
    for c in (c for e in entries for c in e.clones):
        if c.get("moref"):
            out.append(client.vm_by_moref(c["moref"]))
            continue
        name = c.get("name")
        if not name:
            continue
        if vm is not None:
            if folder is None:
                folder = vm.parent
            found = client.content.searchIndex.FindChild(folder, name)
            if found is not None:
                out.append(found)
                continue
        out += client.vm_index().get(name, [])
    return out
