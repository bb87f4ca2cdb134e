"""The sweeper: find what crashed runs left (older than a threshold) and remove it.

It looks in three places: the ledger (runs that are dead: their heartbeat is
stale, or their process is gone from this machine; see ledger.py), every VM's
snapshot tree (our prefix and a run id in the description), and the
inventory (our linked clones). A VM that a live run holds (a fresh heartbeat
in the repository, whichever machine the run is on) is skipped whole, and
so is one an entry names that cannot be authenticated here (sealed and
swept without the passphrase, or altered) while its file's mtime, the
heartbeat, is fresh: its file name says the VM. A clone the ledger names
whose name lacks ``CLONE_PREFIX`` is never destroyed (reconcile.py).
Anything younger than the threshold may belong to a run in progress and is
left alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pyVmomi import vim

from ..errors import BackupError
from ..plan import Plan
from . import snapshots
from .inventory import CLONE_PREFIX
from .ledger import Ledger, safe_name
from .reconcile import Leftover, reconcile_vm

log = logging.getLogger(__name__)


def _age(dt: Any, now: float) -> float:
    return now - dt.timestamp() if dt is not None else float("inf")


def sweep(client: Any, plan: Plan, *, older_than_seconds: float) -> list[Leftover]:
    """Removes leftovers older than ``older_than_seconds``; returns each one found (removed or not)."""
    now = time.time()
    ledger = Ledger(plan.repository)
    found: list[Leftover] = []
    every = ledger.entries()
    # A run whose heartbeat is fresh is alive, on whichever machine: its VM is
    # not swept at all (not its snapshots, not its clones), however old it is.
    held = {e.vm for e in every if e.alive(now)}
    # An entry this process cannot authenticate (sealed and no key here, or altered) whose
    # heartbeat is fresh may be a live run's: the VMs its file name may name are left alone.
    unread = ledger.unread_vm_names(now)
    # A dead restore's half-made VM (its entry names it): detached, destroyed (vsphere/restore.py).
    for e in every:
        if e.restore is not None and not e.alive(now) and now - e.created_unix >= older_than_seconds:
            if safe_name(e.vm) in unread:
                log.info("VM %s: skipped, an unreadable ledger entry with a fresh heartbeat may hold it", e.vm)
                continue
            from .restore import reconcile_restore

            problems = reconcile_restore(client, plan, ledger, e)
            found.append(
                Leftover("restore", e.vm, f"restore by run {e.run_id}", not problems, "; ".join(problems) or None)
            )
    every = [e for e in every if e.restore is None]
    entries = [e for e in every if now - e.created_unix >= older_than_seconds and e.vm not in held]
    by_vm: dict[str, list[Any]] = {}
    for e in entries:
        by_vm.setdefault(e.vm, []).append(e)
    # Every VM's name, snapshot tree and creation date in one request (a page
    # per 1000 VMs), not a round trip per VM and property.
    listed = client.properties_of_all(vim.VirtualMachine, ["name", "snapshot", "config.createDate"])
    index: dict[str, list[Any]] = {}
    vms: dict[str, Any] = {}
    props_of: dict[str, dict[str, Any]] = {}
    for vm, props in listed:
        if "name" in props:
            index.setdefault(props["name"], []).append(vm)
            vms[props["name"]] = vm
            props_of[props["name"]] = props
    client.set_vm_index(index)
    # VMs with old snapshots of ours, or old clones of ours, even without a ledger entry.
    for name in vms:
        if name.startswith(CLONE_PREFIX):
            continue
        tree = props_of[name].get("snapshot")
        old = [n for _, n in snapshots.ours_in(tree) if _age(n.createTime, now) >= older_than_seconds]
        if old:
            by_vm.setdefault(name, [])
    for name, vm in vms.items():
        if name.startswith(CLONE_PREFIX):
            created = props_of[name].get("config.createDate")
            if _age(created, now) >= older_than_seconds:
                owner = _clone_owner(name, vms)
                if owner is not None:
                    by_vm.setdefault(owner, [])
                elif any(safe_name(name[len(CLONE_PREFIX) :]).startswith(u + "-") for u in unread):
                    log.info("clone %s: skipped, an unreadable ledger entry with a fresh heartbeat may hold it", name)
                else:  # its VM is gone: the clone alone
                    found += _remove_orphan_clone(client, plan, vm)
    young = {e.vm for e in every if now - e.created_unix < older_than_seconds}
    for name, vm_entries in sorted(by_vm.items()):
        vm = vms.get(name)
        if name in held:
            log.info("VM %s: skipped, a run that is alive holds it", name)
            continue
        if safe_name(name) in unread:
            log.info(
                "VM %s: skipped, ledger entry %s cannot be authenticated here and its heartbeat is fresh",
                name,
                ledger.unread_holds(name, now),
            )
            continue
        if name in young:  # a run may be at work on it: its leftovers wait for the next sweep
            continue
        try:
            found += reconcile_vm(
                client,
                vm,
                name,
                plan,
                ledger,
                current_run=None,
                entries=vm_entries,
                snapshot_filter=lambda n: _age(n.createTime, now) >= older_than_seconds,
            )
        except BackupError as err:
            found.append(Leftover("vm", name, name, False, str(err)))
    return found


def _clone_owner(clone_name: str, vms: dict[str, Any]) -> str | None:
    """The VM a clone ``vmbackup-clone-<vm>-<run id>`` was made of (the longest matching name)."""
    rest = clone_name[len(CLONE_PREFIX) :]
    owners = [n for n in vms if rest.startswith(n + "-") and not n.startswith(CLONE_PREFIX)]
    return max(owners, key=len) if owners else None


def _remove_orphan_clone(client: Any, plan: Plan, clone: Any) -> list[Leftover]:
    from .reconcile import agent_objects, vm_files
    from .transport import destroy_clone, detach_files

    name = clone.name
    try:
        files = vm_files(clone)
        for agent in agent_objects(client, plan):
            detach_files(agent, files, 600, f"detaching {name}'s disks from {agent.name}")
        destroy_clone(clone, 600)
        return [Leftover("clone", name, name, True)]
    except BackupError as err:
        return [Leftover("clone", name, name, False, str(err))]
