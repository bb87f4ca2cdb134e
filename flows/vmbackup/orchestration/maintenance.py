"""The maintenance flows: ``verify_repository``, ``apply_retention``,
``sweep_vsphere``, ``sweep_hyperv``, ``audit_cbt``.

Orchestration only: what to keep and what to sample is plain Python
(``vmbackup.retention``, ``vmbackup.sampling``), the work is the mover's
(verify, forget, gc) or the adapters' (the sweeps). Each flow
returns a report (a dict; ``vmbackup maintain ...`` prints it), publishes
it as a markdown artifact, and emits one Prefect event with the figures
in its payload, so an automation can alert on it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

from prefect import flow, get_run_logger

from .. import _mover
from ..errors import BackupError, GcRefusedError, InvalidInputError, RepositoryDamagedError
from ..errors import CbtMismatchError as CbtMismatchError
from ..errors import MaintenanceError as MaintenanceError
from . import reports

VERIFY_KEY = "vmbackup-verify-repository"
RETENTION_KEY = "vmbackup-apply-retention"
SWEEP_KEY = "vmbackup-sweep-vsphere"
SWEEP_HYPERV_KEY = "vmbackup-sweep-hyperv"
AUDIT_KEY = "vmbackup-cbt-audit"
AUDIT_TABLE_KEY = "vmbackup-cbt-audit-table"
EVENT_CBT_MISMATCH = "vmbackup.cbt.mismatch"
EVENT_CBT_AUDITED = "vmbackup.cbt.audited"
# Above the backup flows' default VM deadline (6 h, after which a backup is
# cancelled and deletes its shadow copy itself), so the sweeper never takes
# a shadow copy from under a backup that is still reading it.
DEFAULT_HYPERV_SWEEP_AGE = 7 * 3600.0


# --- small local publishing helpers (to be unified with reports.py) ---------


def _md_cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _publish_markdown_report(key: str, markdown: str, description: str) -> None:
    """Stores the report as a markdown artifact (a warning, never the flow's failure)."""
    reports.publish_markdown(key, description, markdown)


def _emit_maintenance_event(
    event: str, resource: dict[str, str], payload: dict[str, Any], vms: list[str] | None = None
) -> None:
    """Emits one event; the VMs concerned are related resources."""
    related = [
        {"prefect.resource.id": f"vmbackup.vm.{vm}", "prefect.resource.role": "vm", "prefect.resource.name": vm}
        for vm in sorted(set(vms or ()))
    ]
    reports.emit(event, resource, related, payload)


def _repository_resource(path: str) -> dict[str, str]:
    try:
        rid = _mover.open_repository(path).id
    except BackupError:
        rid = os.path.abspath(path)
    return {"prefect.resource.id": f"vmbackup.repository.{rid}", "prefect.resource.name": str(path)}


# --- shared pieces ------------------------------------------------------------


def _repository_of(plan_path: str, key_required: bool = True) -> str:
    """The plan's repository, unlocked for this run when it is encrypted
    (without ``key_required``, a plan that gives no passphrase leaves it
    locked: verify then checks what it can without the key)."""
    from ..errors import KeyRequiredError
    from ..keys import unlock_plan_repository
    from ..plan import load_plan

    plan = load_plan(plan_path)
    try:
        unlock_plan_repository(plan)
    except KeyRequiredError:
        if key_required:
            raise
        get_run_logger().warning(
            "the repository is encrypted and the plan gives no passphrase: verify checks that chunks are "
            "present and their ciphertext checksums only"
        )
    return str(plan.repository)


def _unlock_for_sweep(plan: Any) -> None:
    """Unlocks an encrypted repository when the plan gives its passphrase: its
    ledger entries are sealed (records.py) and trusted only with the key.
    Without one the sweep goes on with what the hypervisors show, and an entry
    it cannot read whose heartbeat (the file's mtime) is fresh keeps its VM
    busy (vsphere/ledger.py)."""
    from ..errors import KeyRequiredError
    from ..keys import unlock_plan_repository

    try:
        unlock_plan_repository(plan)
    except KeyRequiredError:
        get_run_logger().warning(
            "the repository is encrypted and the plan gives no passphrase: its ledger entries cannot be "
            "authenticated and are skipped (a VM whose entry has a fresh heartbeat is left alone)"
        )


def _problems(result: Any) -> list[dict[str, Any]]:
    return [
        {
            "kind": p.kind,
            "object": p.object,
            "message": p.message,
            "affected": [{"backup": b, "vm": vm, "disk": d} for b, vm, d in p.affected],
        }
        for p in result.problems
    ]


def _untrusted(bad: list[Any]) -> list[dict[str, Any]]:
    return [{"id": u.file_id, "vm": u.info.vm if u.info else None, "problem": u.problem} for u in bad]


def repository_bytes(path: str) -> int:
    """Bytes in the repository's chunk store (what gc can give back)."""
    total = 0
    for dirpath, _, files in os.walk(os.path.join(path, "chunks")):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


# --- verify_repository ------------------------------------------------------


def _verify_markdown(r: dict[str, Any]) -> str:
    verdict = "sound" if r["ok"] else f"**{len(r['problems'])} problem(s)**"
    out = [
        f"# Verify of {r['repository']}: {verdict}\n",
        f"- sample: {r['sample']} ({r['backups_checked']} of {r['backups_total']} backup(s), "
        f"every VM's newest included), {'data re-read' if r['read_data'] else 'chunks present'}",
        f"- chunks checked: {r['chunks_checked']}, bytes re-read: {r['bytes_checked']}, {r['seconds']:.1f} s",
    ]
    if r["vms_affected"]:
        out.append(f"- VMs affected: {', '.join(r['vms_affected'])}")
    out.append("\n## Problems\n")
    out.append(
        _md_table(
            ["kind", "object", "message", "affects"],
            [
                [
                    p["kind"],
                    p["object"],
                    p["message"],
                    ", ".join(f"{a['vm']} {a['backup']} ({a['disk'] or '?'})" for a in p["affected"]),
                ]
                for p in r["problems"]
            ],
        )
    )
    if r["untrusted"]:
        out.append("\n## Untrusted manifests\n")
        out.append(_md_table(["id", "vm", "problem"], [[u["id"], u["vm"], u["problem"]] for u in r["untrusted"]]))
    return "\n".join(out)


def verify_report(repo: str, sample: str | float | int | None, read_data: bool, seed: int | None) -> dict[str, Any]:
    """The verify: chooses the sample, runs the mover's verify on it, says
    which VMs and backups a problem affects."""
    from ..catalog import list_backups
    from ..sampling import choose_sample, parse_sample

    chosen = parse_sample(sample)
    backups, bad = list_backups(repo)
    ids = choose_sample(backups, chosen, random.Random(seed))
    started = time.monotonic()
    result = _mover.verify(repo, ids, read_data=read_data) if ids else None
    problems = _problems(result) if result else []
    affected = [a for p in problems for a in p["affected"]]
    return {
        "repository": repo,
        "ok": result.ok if result else True,
        "read_data": read_data,
        "sample": chosen.describe(),
        "backups_total": len(backups),
        "backups_checked": result.backups_checked if result else 0,
        "verified": ids,
        "chunks_checked": result.chunks_checked if result else 0,
        "bytes_checked": result.bytes_checked if result else 0,
        "seconds": round(time.monotonic() - started, 3),
        "problems": problems,
        "vms_affected": sorted({a["vm"] for a in affected if a["vm"]}),
        "backups_affected": sorted({a["backup"] for a in affected if a["backup"]}),
        "untrusted": _untrusted(bad),
    }


@flow(name="verify_repository", flow_run_name=reports.run_name("verify"), log_prints=False)
def verify_repository(
    plan_path: str, sample: str | int | float | None = None, read_data: bool = True, seed: int | None = None
) -> dict[str, Any]:
    """Verify the plan's repository: every backup, or a sample (``"20"``
    backups, ``"10%"``, ``"all"``) that always holds every VM's newest.

    Returns the report; when verify finds a problem the flow fails with
    :class:`RepositoryDamagedError` (carrying the report) after the
    artifact and the ``vmbackup.repository.verify-failed`` event.
    """
    log = get_run_logger()
    repo = _repository_of(plan_path, key_required=False)
    r = verify_report(repo, sample, read_data, seed)
    log.info(
        "verified %d of %d backup(s) (%s), %d chunk(s): %s",
        r["backups_checked"],
        r["backups_total"],
        r["sample"],
        r["chunks_checked"],
        "sound" if r["ok"] else f"{len(r['problems'])} problem(s)",
    )
    for p in r["problems"]:
        log.error("%s %s: %s", p["kind"], p["object"], p["message"])
    _publish_markdown_report(
        VERIFY_KEY, _verify_markdown(r), "repository sound" if r["ok"] else f"{len(r['problems'])} problem(s)"
    )
    payload = {k: r[k] for k in ("repository", "ok", "read_data", "sample", "backups_total", "backups_checked")}
    payload |= {
        "chunks_checked": r["chunks_checked"],
        "bytes_checked": r["bytes_checked"],
        "problems": len(r["problems"]),
        "vms_affected": r["vms_affected"],
        "backups_affected": r["backups_affected"],
        "untrusted": len(r["untrusted"]),
    }
    event = "vmbackup.repository.verified" if r["ok"] else "vmbackup.repository.verify-failed"
    _emit_maintenance_event(event, _repository_resource(repo), payload, r["vms_affected"])
    if not r["ok"]:
        who = ", ".join(r["vms_affected"]) or "no backup named"
        raise RepositoryDamagedError(f"repository {repo}: {len(r['problems'])} problem(s); VMs affected: {who}", r)
    return r


# --- apply_retention --------------------------------------------------------


def _retention_markdown(r: dict[str, Any]) -> str:
    verb = "would remove" if r["dry_run"] else "removed"
    gc = r["gc"]
    out = [
        f"# Retention on {r['repository']}: {verb} {len(r['removed'])}, kept {len(r['kept'])}\n",
        f"- policy: {', '.join(f'{k} {v}' for k, v in r['policy'].items() if v)}",
        f"- verified first: {r['backups_verified']} backup(s), "
        f"{'data re-read' if r['read_data'] else 'chunks present'}; damaged: {len(r['damaged'])}",
        f"- gc: {gc['chunks_removed']} chunk(s), {gc['bytes_removed']} bytes reclaimed"
        if gc
        else f"- **gc refused:** {r['gc_error']}"
        if r["gc_error"]
        else "- gc: not run (dry run)",
        f"- chunk store: {r['repository_bytes_before']} -> {r['repository_bytes_after']} bytes",
        "\n## Kept, and why\n",
        _md_table(
            ["vm", "vm_id", "backup", "created", "why", "verify"],
            [
                [k["vm"], k["vm_id"] or "-", k["id"], k["created"], ", ".join(k["reasons"]), k["damaged"] or "good"]
                for k in r["kept"]
            ],
        ),
        f"\n## {verb.capitalize()}\n",
        _md_table(
            ["vm", "vm_id", "backup", "created", "verify"],
            [[x["vm"], x["vm_id"] or "-", x["id"], x["created"], x["damaged"] or "good"] for x in r["removed"]],
        ),
    ]
    if r["untrusted"]:
        out.append("\n## Untrusted manifests (neither kept by a rule nor removed)\n")
        out.append(_md_table(["id", "vm", "problem"], [[u["id"], u["vm"], u["problem"]] for u in r["untrusted"]]))
    if r["vms_without_good_backup"]:
        out.append(f"\n**VMs with no good backup:** {', '.join(r['vms_without_good_backup'])}\n")
    return "\n".join(out)


def retention_report(
    repo: str, rules: dict[str, int], *, read_data: bool, dry_run: bool, gc_grace_seconds: float
) -> dict[str, Any]:
    """Verify every trusted backup, decide (never the only good backup of
    a VM), forget what goes, then gc."""
    from ..catalog import list_backups
    from ..retention import Policy, apply_guarded, vm_id_of

    policy = Policy(**rules)
    if policy.empty():
        raise InvalidInputError("the plan's retention keeps nothing: give at least one rule (daily: 7, ...)")
    before = repository_bytes(repo)
    backups, bad = list_backups(repo)
    damaged: dict[str, str] = {}
    if backups:
        result = _mover.verify(repo, [b.id for b in backups], read_data=read_data)
        for p in result.problems:
            for backup_id, _vm, _disk in p.affected:
                damaged.setdefault(backup_id, f"{p.kind} {p.object}: {p.message}")
    decisions = apply_guarded(policy, backups, damaged)

    def row(d: Any) -> dict[str, Any]:
        return {
            "id": d.backup.id,
            "vm": d.backup.vm,
            "vm_id": vm_id_of(d.backup),
            "created": d.backup.created,
            "damaged": d.damaged,
        }

    kept = [row(d) | {"reasons": d.reasons} for d in decisions if d.keep]
    removed = [row(d) for d in decisions if not d.keep]
    gc: dict[str, Any] | None = None
    gc_error: str | None = None
    if not dry_run:
        for x in removed:
            _mover.forget(repo, x["id"])
        try:
            g = _mover.gc(repo, grace_seconds=gc_grace_seconds)
        except BackupError as e:  # e.g. an untrusted manifest: gc removes nothing then
            gc_error = str(e)
        else:
            gc = {k: getattr(g, k) for k in ("chunks_removed", "bytes_removed", "chunks_in_grace", "referenced_chunks")}
    vms = sorted({b.vm for b in backups})
    # A VM is a retention series (its vm_id, or the label of points without
    # one): two VMs of one name are two, a renamed VM is one. Each series is
    # named by its newest point's label (decisions come newest first).
    newest: dict[str, Any] = {}
    for d in decisions:
        newest.setdefault(d.series, d.backup)
    good = {d.series for d in decisions if d.keep and d.good}
    without_good = [{"vm": b.vm, "vm_id": vm_id_of(b)} for s, b in newest.items() if s not in good]
    return {
        "repository": repo,
        "dry_run": dry_run,
        "policy": dict(policy.rules()),
        "read_data": read_data,
        "backups_verified": len(backups),
        "kept": kept,
        "removed": removed,
        "damaged": [{"id": i, "problem": m} for i, m in sorted(damaged.items())],
        "untrusted": _untrusted(bad),
        "vms": vms,
        "vms_without_good_backup": sorted({x["vm"] for x in without_good}),
        "series_without_good_backup": without_good,
        "gc": gc,
        "gc_error": gc_error,
        "repository_bytes_before": before,
        "repository_bytes_after": repository_bytes(repo),
    }


@flow(name="apply_retention", flow_run_name=reports.run_name("retention"), log_prints=False)
def apply_retention(
    plan_path: str, read_data: bool = True, dry_run: bool = False, gc_grace_seconds: float = 900.0
) -> dict[str, Any]:
    """Prune the plan's repository by the plan's ``retention`` per VM, then gc.

    Every trusted backup is verified first (``read_data``: re-read its
    chunks); the newest good backup of each VM is always kept, untrusted
    manifests are neither counted as kept nor removed. Returns the report
    (what was kept and why, what was removed, what gc reclaimed). When gc
    refuses (it does while an untrusted manifest is in the repository) the
    flow fails with :class:`GcRefusedError` after the report and event.
    """
    from ..plan import load_plan

    log = get_run_logger()
    plan = load_plan(plan_path)
    if not plan.retention:
        raise InvalidInputError(f"plan {plan_path} has no retention rules (retention: {{daily: 7, ...}})")
    repo = _repository_of(plan_path)
    r = retention_report(
        repo, dict(plan.retention), read_data=read_data, dry_run=dry_run, gc_grace_seconds=gc_grace_seconds
    )
    for k in r["kept"]:
        log.info("keep %s of %s (%s)%s", k["id"], k["vm"], ", ".join(k["reasons"]), " DAMAGED" if k["damaged"] else "")
    for x in r["removed"]:
        log.info("%s %s of %s", "would remove" if dry_run else "removed", x["id"], x["vm"])
    if r["vms_without_good_backup"]:
        log.warning("VM(s) with no good backup: %s", ", ".join(r["vms_without_good_backup"]))
    _publish_markdown_report(
        RETENTION_KEY,
        _retention_markdown(r),
        f"{'would remove' if dry_run else 'removed'} {len(r['removed'])} backup(s), kept {len(r['kept'])}",
    )
    gc = r["gc"] or {}
    payload = {
        "repository": repo,
        "dry_run": dry_run,
        "kept": len(r["kept"]),
        "removed": len(r["removed"]),
        "damaged": len(r["damaged"]),
        "untrusted": len(r["untrusted"]),
        "kept_for_newest_good": [k["id"] for k in r["kept"] if "newest good" in k["reasons"]],
        "vms_without_good_backup": r["vms_without_good_backup"],
        "gc_error": r["gc_error"],
        "chunks_removed": gc.get("chunks_removed", 0),
        "bytes_removed": gc.get("bytes_removed", 0),
        "repository_bytes_before": r["repository_bytes_before"],
        "repository_bytes_after": r["repository_bytes_after"],
    }
    _emit_maintenance_event("vmbackup.retention.applied", _repository_resource(repo), payload, r["vms"])
    if r["gc_error"]:
        # The backups are gone but their space is not: fail the run so that
        # somebody looks (a repository that never gets gc fills up).
        raise GcRefusedError(f"removed {len(r['removed'])} backup(s) but gc refused: {r['gc_error']}", r)
    return r


# --- sweep_vsphere ------------------------------------------------------------


def _leftover_dict(item: Any) -> dict:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return dict(vars(item))


def _sweep_markdown(items: list[dict], older_than_seconds: float) -> str:
    removed = sum(bool(i.get("removed")) for i in items)
    return "\n".join(
        [
            f"# Sweep: {len(items)} leftover(s) older than {older_than_seconds:g} s, {removed} removed\n",
            _md_table(
                ["kind", "name", "vm", "result"],
                [
                    [i.get("kind"), i.get("name"), i.get("vm"), "removed" if i.get("removed") else i.get("error")]
                    for i in items
                ],
            ),
        ]
    )


@flow(name="sweep_vsphere", flow_run_name=reports.run_name("sweep"), log_prints=False)
def sweep_vsphere(plan_path: str, older_than_seconds: float = 3600.0, password_secret: str | None = None) -> list[dict]:
    """Find what crashed runs left (our snapshots, linked clones, attached
    disks) older than the threshold, remove it, and report each item (a
    markdown artifact and a ``vmbackup.sweep.done`` event too).
    ``password_secret``: a Prefect Secret block's name, as for ``backup_vsphere_vms``."""
    from ..plan import load_plan, resolve_password
    from ..vsphere.client import VSphereClient
    from ..vsphere.sweep import sweep
    from .backup import with_secret as _with_secret

    log = get_run_logger()
    plan = _with_secret(load_plan(plan_path), password_secret)
    if plan.connection is None:
        raise InvalidInputError(f"plan {plan_path} has no vSphere connection (connection: ...)")
    _unlock_for_sweep(plan)
    password = resolve_password(plan.connection)
    with VSphereClient.connect(plan.connection, password) as client:
        leftovers = [_leftover_dict(x) for x in sweep(client, plan, older_than_seconds=older_than_seconds)]
    for item in leftovers:
        log.info(
            "%s %s of %s: %s",
            item.get("kind"),
            item.get("name"),
            item.get("vm"),
            "removed" if item.get("removed") else f"NOT removed ({item.get('error')})",
        )
    removed = sum(bool(i.get("removed")) for i in leftovers)
    _publish_markdown_report(
        SWEEP_KEY, _sweep_markdown(leftovers, older_than_seconds), f"{removed} of {len(leftovers)} leftover(s) removed"
    )
    payload = {
        "vcenter": plan.connection.host,
        "older_than_seconds": older_than_seconds,
        "found": len(leftovers),
        "removed": removed,
        "not_removed": len(leftovers) - removed,
        "items": [{k: i.get(k) for k in ("kind", "name", "vm", "removed", "error")} for i in leftovers],
    }
    resource = {
        "prefect.resource.id": f"vmbackup.vcenter.{plan.connection.host}",
        "prefect.resource.name": plan.connection.host,
    }
    _emit_maintenance_event("vmbackup.sweep.done", resource, payload, [str(i.get("vm")) for i in leftovers])
    return leftovers


# --- sweep_hyperv -------------------------------------------------------------


@flow(name="sweep_hyperv", flow_run_name=reports.run_name("sweep-hyperv"), log_prints=False)
def sweep_hyperv(
    plan_path: str,
    older_than_seconds: float = DEFAULT_HYPERV_SWEEP_AGE,
    hyperv_password_secret: str | None = None,
) -> list[dict]:
    """On every Hyper-V host of the plan, remove the shadow copies (and
    their shares, mount points and ledger entries) that this system's
    crashed backups left and that are older than the threshold; report each
    (a markdown artifact and a ``vmbackup.sweep.done`` event per host).

    Only runs in vmbackup's ledger on the host are touched: shadow copies
    that another product made are never removed. A host that cannot be
    reached is one item with ``removed: false`` and the one-line reason (the
    other hosts are still swept). ``hyperv_password_secret``: a Prefect
    Secret block's name for every host's password, as for ``backup_vms``.
    """
    from ..hyperv import inventory
    from ..hyperv.sweep import sweep_host
    from ..plan import load_plan, resolve_password
    from .backup import with_secret
    from .vmtask import one_line

    log = get_run_logger()
    plan = with_secret(load_plan(plan_path), None, hyperv_password_secret)
    if not plan.hyperv:
        raise InvalidInputError(f"plan {plan_path} has no Hyper-V hosts (hyperv: [...])")
    _unlock_for_sweep(plan)  # the repository's restore ledger
    passwords = {h.name: resolve_password(h) for h in plan.hyperv}
    secrets = [p.get_secret_value() for p in passwords.values()]
    items: list[dict] = []
    for host in plan.hyperv:
        found: list[dict] = []
        try:
            client = inventory.connect(host, passwords[host.name])
            for r in sweep_host(
                client, older_than_seconds=older_than_seconds, repository=str(plan.repository), host=host.name
            ):
                found.append(
                    {
                        "hypervisor": "hyperv",
                        "host": host.name,
                        "kind": r.get("Kind") or "shadow copy run",
                        "name": r.get("RunId"),
                        "vm": ", ".join(r["VMs"]) if isinstance(r.get("VMs"), list) else r.get("VMs"),
                        "created": r.get("Created"),
                        "shadow_copies": list(r.get("Deleted") or []),
                        "removed": True,
                        "error": None,
                    }
                )
        except Exception as e:
            found.append(
                {
                    "hypervisor": "hyperv",
                    "host": host.name,
                    "kind": "host",
                    "name": host.name,
                    "vm": None,
                    "created": None,
                    "shadow_copies": [],
                    "removed": False,
                    "error": f"Hyper-V host {host.name} was not swept: {one_line(e, secrets)}",
                }
            )
        for item in found:
            log.info(
                "%s %s on %s: %s",
                item["kind"],
                item["name"],
                host.name,
                "removed" if item["removed"] else f"NOT removed ({item['error']})",
            )
        payload = {
            "host": host.name,
            "older_than_seconds": older_than_seconds,
            "found": len(found),
            "removed": sum(bool(i["removed"]) for i in found),
            "not_removed": sum(not i["removed"] for i in found),
            "items": [{k: i.get(k) for k in ("kind", "name", "vm", "removed", "error")} for i in found],
        }
        resource = {"prefect.resource.id": f"vmbackup.host.{host.name}", "prefect.resource.name": host.name}
        _emit_maintenance_event("vmbackup.sweep.done", resource, payload, [str(i["vm"]) for i in found if i["vm"]])
        items += found
    removed = sum(bool(i["removed"]) for i in items)
    _publish_markdown_report(
        SWEEP_HYPERV_KEY,
        _sweep_markdown(items, older_than_seconds),
        f"{removed} of {len(items)} leftover(s) removed from {len(plan.hyperv)} Hyper-V host(s)",
    )
    return items


# --- audit_cbt ------------------------------------------------------------------

AUDIT_COLUMNS = (
    "vm",
    "hypervisor",
    "status",
    "point",
    "disks_compared",
    "bytes_compared",
    "mismatches",
    "transport",
    "reason",
)


def audit_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table artifact's rows: one per VM."""
    out = []
    for r in report["vms"]:
        row = {k: r.get(k) for k in AUDIT_COLUMNS}
        row["disks_compared"] = ", ".join(r["disks_compared"]) or None
        row["mismatches"] = ", ".join(f"{m['disk']} {m['offset']}+{m['length']}" for m in r["mismatches"]) or None
        row["reason"] = r.get("error") or r.get("reason")
        out.append(row)
    return out


def _audit_markdown(r: dict[str, Any]) -> str:
    bad = r["mismatched"] + r["failed"]
    verdict = "every compared area matches" if not bad else f"**CBT or the backup is wrong for {', '.join(bad)}**"
    out = [
        f"# CBT audit of {r['plan']}: {verdict}\n",
        f"- sample: {r['sample']}; {r['bytes_compared']} bytes compared on {r['audited']} VM(s)",
        f"- ok {len(r['ok_vms'])}, mismatch {len(r['mismatched'])}, skipped {len(r['skipped'])}, "
        f"failed {len(r['failed'])}",
    ]
    if r["mismatched"]:
        out.append(
            "- the chains of the mismatched VMs are marked broken: their next backup is a full "
            "(`broken-chains/` in the repository)"
        )
    out.append("\n## VMs\n")
    rows = audit_table(r)
    out.append(_md_table(list(AUDIT_COLUMNS), [[x[k] for k in AUDIT_COLUMNS] for x in rows]))
    return "\n".join(out)


def audit_report(plan_path: str, plan: Any, rows: list[Any], sample: Any) -> dict[str, Any]:
    """The flow's report (what ``vmbackup maintain audit --json`` prints)."""
    vms = [x.to_dict() for x in rows]
    by = {s: [v["vm"] for v in vms if v["status"] == s] for s in ("ok", "mismatch", "skipped", "failed")}
    return {
        "plan": plan_path,
        "repository": str(plan.repository),
        "sample": sample.describe(),
        "ok": not by["mismatch"] and not by["failed"],
        "audited": len(by["ok"]) + len(by["mismatch"]),
        "bytes_compared": sum(v["bytes_compared"] for v in vms),
        "ok_vms": by["ok"],
        "mismatched": by["mismatch"],
        "skipped": [
            {"vm": v["vm"], "hypervisor": v["hypervisor"], "reason": v["reason"]}
            for v in vms
            if v["status"] == "skipped"
        ],
        "failed": by["failed"],
        "vms": vms,
    }


@flow(name="audit_cbt", flow_run_name=reports.run_name("cbt-audit"), log_prints=False)
def audit_cbt(
    plan_path: str,
    vms: list[str] | None = None,
    sample: str | int | None = None,
    seed: int | None = None,
    password_secret: str | None = None,
    hyperv_password_secret: str | None = None,
    transports: list[str] | None = None,
) -> dict[str, Any]:
    """Check that CBT told the truth: per vSphere VM of the plan (or ``vms``),
    a short-lived snapshot, CBT asked what changed since the latest point,
    and a sample of the areas it says did not change (``sample``: blocks per
    disk, default 64, or ``"all"``) compared with the point
    (``vmbackup.audit``; docs/vsphere.md, "CBT audit").

    Hyper-V VMs, VMs without a point and VMs with CBT off are listed as
    skipped with the reason. Each mismatch marks the VM's chain broken (its
    next backup is a full), emits ``vmbackup.cbt.mismatch``, and fails the
    run (:class:`CbtMismatchError`, carrying the report) after the artifacts
    and a ``vmbackup.cbt.audited`` event. ``password_secret`` and
    ``hyperv_password_secret``: Secret block names, as for ``backup_vms``.
    ``transports``: only these (in this order) instead of the plan's: the
    snapshot is read on the machine that runs the flow, so a worker that is
    not an agent (the site's control pool) audits through ``nbd`` only.
    """
    from ..audit import audit_plan, parse_audit_sample
    from ..plan import load_plan
    from .backup import with_secret

    log = get_run_logger()
    chosen = parse_audit_sample(sample)
    plan = with_secret(load_plan(plan_path), password_secret, hyperv_password_secret)
    _repository_of(plan_path)  # the points are read: an encrypted repository is unlocked
    if transports:
        from ..plan import TRANSPORTS

        unknown = [t for t in transports if t not in TRANSPORTS]
        if unknown:
            raise InvalidInputError(f"transports: {', '.join(unknown)} is not one of {', '.join(TRANSPORTS)}")
        plan = plan.model_copy(update={"transports": list(transports)})
    rows = audit_plan(plan, vms, chosen, seed=seed)
    r = audit_report(plan_path, plan, rows, chosen)
    for v in r["vms"]:
        if v["status"] == "ok":
            log.info("VM %s: point %s, %d bytes compared, no difference", v["vm"], v["point"], v["bytes_compared"])
        elif v["status"] == "mismatch":
            log.error("VM %s: %s; the chain is marked broken, the next backup is a full", v["vm"], v["reason"])
        elif v["status"] == "skipped":
            log.info("VM %s skipped: %s", v["vm"], v["reason"])
        else:
            log.error("VM %s: the audit failed: %s", v["vm"], v["error"])
    bad = r["mismatched"] + r["failed"]
    title = "CBT audit: every compared area matches" if not bad else f"CBT audit: {', '.join(bad)} failed"
    _publish_markdown_report(AUDIT_KEY, _audit_markdown(r), title)
    reports.publish_table(AUDIT_TABLE_KEY, audit_table(r), title)
    repo = _repository_resource(r["repository"])
    for v in r["vms"]:
        if v["status"] != "mismatch":
            continue
        resource = {
            "prefect.resource.id": reports.resource_id("vm", v["vm"]),
            "prefect.resource.name": v["vm"],
            "vmbackup.vm": v["vm"],
        }
        payload = {k: v[k] for k in ("vm", "vm_id", "host", "point", "reason", "bytes_compared", "mismatches")}
        payload["chain_marked_broken"] = v["chain_marked_broken"]
        payload["repository"] = r["repository"]
        reports.emit(EVENT_CBT_MISMATCH, resource, [dict(repo, **{"prefect.resource.role": "repository"})], payload)
    payload = {k: r[k] for k in ("repository", "sample", "ok", "audited", "bytes_compared", "mismatched", "failed")}
    payload["skipped"] = len(r["skipped"])
    _emit_maintenance_event(EVENT_CBT_AUDITED, repo, payload, [v["vm"] for v in r["vms"]])
    if bad:
        what = []
        if r["mismatched"]:
            what.append(f"CBT or the backup is wrong for VM {', '.join(r['mismatched'])} (chain marked broken)")
        if r["failed"]:
            what.append(f"the audit failed for VM {', '.join(r['failed'])}")
        raise CbtMismatchError("CBT audit: " + "; ".join(what), r)
    return r
