"""``vmbackup maintain verify|retention|sweep|audit``: the maintenance flows run
in this process, on ``$PREFECT_API_URL`` or the embedded server, as
``vmbackup backup`` runs the backup flow.

Prefect is imported only when a command runs, after the server's address
is in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import BackupError, InvalidInputError
from ..sampling import parse_sample
from .keys import add_plan_key_argument, unlock_plan


def add_parser(sub: Any) -> None:
    """Adds ``maintain`` and its three commands to the command line."""
    sp = sub.add_parser(
        "maintain",
        help="maintenance flows: verify the repository, apply retention, sweep vSphere and Hyper-V, audit CBT, "
        "restore drills",
        description="Run a maintenance flow of a plan (verify_repository, apply_retention, sweep_vsphere, "
        "sweep_hyperv, audit_cbt, drill) "
        "on $PREFECT_API_URL or on the local Prefect server vmbackup starts and keeps.",
    )
    msub = sp.add_subparsers(dest="maintain_command", metavar="{verify,retention,sweep,audit,drill}")
    msub.required = True

    def cmd(name: str, helptext: str) -> argparse.ArgumentParser:
        p = msub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--plan", required=True, metavar="FILE", help="the plan (YAML, see docs/plan.md)")
        p.add_argument("--json", action="store_true", help="print the flow's report as one JSON document on stdout")
        add_plan_key_argument(p)
        p.set_defaults(func=run_maintain)
        return p

    p = cmd("verify", "verify the plan's repository (a sample or all); exit 0 only if sound")
    p.add_argument(
        "--sample",
        metavar="N|F|all",
        help="N backups, a fraction (0.1 or 10%%) or all (default); every VM's newest is always verified",
    )
    p.add_argument("--no-read-data", action="store_true", help="check chunks are present, do not re-read them")
    p.add_argument("--seed", type=int, help="seed of the random sample (default: random)")

    p = cmd("retention", "verify, prune by the plan's retention (never a VM's only good backup), then gc")
    p.add_argument("--no-read-data", action="store_true", help="verify by presence only before deciding")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing, no gc")
    p.add_argument(
        "--grace", type=float, default=900.0, metavar="SECONDS", help="gc keeps unreferenced chunks this young"
    )

    p = cmd(
        "sweep",
        "remove what crashed runs left: in vSphere (snapshots, clones, attached disks; sweep_vsphere) and on "
        "the plan's Hyper-V hosts (shadow copies, their shares; sweep_hyperv)",
    )
    p.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only leftovers this old (default: 3600 in vSphere, 25200 on Hyper-V hosts, above the 6 h VM deadline)",
    )
    p.add_argument(
        "--hypervisor",
        choices=("vsphere", "hyperv"),
        help="sweep only this hypervisor (default: every one the plan has)",
    )

    p = cmd(
        "audit",
        "check that CBT told the truth: per vSphere VM, a short-lived snapshot, CBT asked what changed since "
        "the latest backup, a sample of what it says did not change compared with the backup (audit_cbt); "
        "exit 0 if every compared area matches, 1 if one does not (that VM's next backup is a full)",
    )
    p.add_argument("--vm", action="append", metavar="NAME", help="only this VM (repeat for more)")
    p.add_argument(
        "--sample",
        metavar="N|all",
        help="random 64 KiB blocks per disk of the areas CBT says did not change (default 64), or all of them",
    )
    p.add_argument("--seed", type=int, help="seed of the random sample (default: random)")

    p = cmd(
        "drill",
        "restore drills (the drill flow): the newest point of a sample of VMs restored into the plan's isolated "
        "target (drill:), its disks compared with the backup, powered on, timed, then removed; "
        "exit 0 if every drill passed, 1 if one failed",
    )
    p.add_argument("--vm", action="append", metavar="NAME", help="drill this VM (repeat for more; default: a sample)")
    p.add_argument("--sample", type=int, metavar="N", help="how many VMs (default: the plan's drill.sample)")


def _prepare(args: argparse.Namespace) -> str:
    """Checks the input, then points this process at a Prefect server;
    returns the UI's address."""
    from ..plan import load_plan
    from ..retention import Policy

    # A bad plan: one line, exit 2, before any server starts.
    plan = load_plan(args.plan)
    # So is a wrong passphrase (verify goes on without one: it checks what it can).
    unlock_plan(args, plan, required=args.maintain_command not in ("verify", "sweep"))
    if args.maintain_command == "retention" and (not plan.retention or Policy(**plan.retention).empty()):
        raise InvalidInputError(f"plan {args.plan} has no retention rules (retention: {{daily: 7, ...}})")
    if args.maintain_command == "drill":
        _check_drill(plan, args)
    if args.maintain_command == "sweep" and not _sweeps(plan, args.hypervisor):
        which = {"vsphere": "vSphere connection", "hyperv": "Hyper-V hosts", None: "hypervisor"}[args.hypervisor]
        raise InvalidInputError(f"plan {args.plan} has no {which} to sweep")
    from .backup import use_server

    info = use_server("maintain")
    print(f"Prefect UI: {info.ui_url}", file=sys.stderr)
    return str(info.ui_url)


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(human)


def _verify_text(r: dict[str, Any]) -> str:
    lines = []
    for p in r["problems"]:
        who = ", ".join(f"{a['backup']} (VM {a['vm']}, disk {a['disk'] or '?'})" for a in p["affected"])
        lines.append(f"PROBLEM {p['kind']}: {p['message']}; affects {who}")
    verdict = "sound" if r["ok"] else f"{len(r['problems'])} problem(s); VMs affected: {', '.join(r['vms_affected'])}"
    lines.append(
        f"verified {r['backups_checked']} of {r['backups_total']} backup(s) (sample {r['sample']}), "
        f"{r['chunks_checked']} chunk(s) {'re-read' if r['read_data'] else 'present'}: {verdict}"
    )
    return "\n".join(lines)


def _retention_text(r: dict[str, Any]) -> str:
    lines = [
        f"keep   {k['id']} {k['vm']} ({', '.join(k['reasons'])}){' DAMAGED: ' + k['damaged'] if k['damaged'] else ''}"
        for k in r["kept"]
    ]
    lines += [f"{'remove' if r['dry_run'] else 'gone  '} {x['id']} {x['vm']}" for x in r["removed"]]
    lines += [f"untrusted {u['id']} (left alone: {u['problem']})" for u in r["untrusted"]]
    if r["vms_without_good_backup"]:
        lines.append(f"NO GOOD BACKUP: {', '.join(r['vms_without_good_backup'])}")
    gc = r["gc"]
    tail = f"; gc reclaimed {gc['bytes_removed']} bytes in {gc['chunks_removed']} chunk(s)" if gc else ""
    if r.get("gc_error"):
        tail = f"; GC REFUSED: {r['gc_error']}"
    lines.append(
        f"{'would remove' if r['dry_run'] else 'removed'} {len(r['removed'])} backup(s), kept {len(r['kept'])}{tail}"
    )
    return "\n".join(lines)


def _sweep_text(items: list[dict]) -> str:
    lines = []
    for i in items:
        what = f"{i.get('kind')} {i.get('name')}"
        if i.get("vm"):
            what += f" of {i.get('vm')}"
        if i.get("hypervisor") == "hyperv" and i.get("kind") != "host":
            what += f" on {i.get('host')}"
        lines.append(f"{what}: " + ("removed" if i.get("removed") else f"NOT removed ({i.get('error')})"))
    lines.append(f"{sum(bool(i.get('removed')) for i in items)} of {len(items)} leftover(s) removed")
    return "\n".join(lines)


def run_maintain(args: argparse.Namespace) -> int:
    sample = getattr(args, "sample", None)
    if args.maintain_command == "drill":
        pass  # _prepare checks the plan and the VMs
    elif args.maintain_command == "audit":
        from ..audit import parse_audit_sample

        parse_audit_sample(sample)  # bad input: exit 2 before any server starts
        for name in args.vm or ():
            if not name.strip():
                raise InvalidInputError("--vm: a VM name must not be empty")
    elif sample is not None:
        parse_sample(sample)  # bad input: exit 2 before any server starts
    for flag in ("grace", "older_than"):
        if (getattr(args, flag, None) or 0) < 0:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must not be negative")
    ui = _prepare(args)
    from ..localserver import runs as local_runs

    with local_runs.tagged(os.environ["PREFECT_API_URL"]):
        return _run(args, sample, ui)


def _run(args: argparse.Namespace, sample: Any, ui: str) -> int:
    from ..orchestration import maintenance
    from ..orchestration.vmtask import one_line

    plan = os.path.abspath(args.plan)
    if args.maintain_command == "verify":
        flow_fn, kw = (
            maintenance.verify_repository,
            {"sample": sample, "read_data": not args.no_read_data, "seed": args.seed},
        )
    elif args.maintain_command == "retention":
        flow_fn, kw = (
            maintenance.apply_retention,
            {"read_data": not args.no_read_data, "dry_run": args.dry_run, "gc_grace_seconds": args.grace},
        )
    elif args.maintain_command == "audit":
        return _run_audit(args, plan, ui)
    elif args.maintain_command == "drill":
        return _run_drill(args, plan, ui)
    else:
        return _run_sweeps(args, plan, ui)
    state = flow_fn(plan_path=plan, return_state=True, **kw)
    result = state.result(raise_on_failure=False)
    if isinstance(result, maintenance.MaintenanceError):
        text = _verify_text if args.maintain_command == "verify" else _retention_text
        _print(args, result.report, text(result.report))
        if not args.json or args.maintain_command != "verify":
            print(f"vmbackup: error: {result}", file=sys.stderr)
        return 1
    if isinstance(result, BaseException):
        if isinstance(result, BackupError):
            raise result
        raise BackupError(f"the {args.maintain_command} flow failed: {one_line(result)} (details: {ui})")
    if args.maintain_command == "verify":
        _print(args, result, _verify_text(result))
        return 0
    if args.maintain_command == "retention":
        _print(args, result, _retention_text(result))
        return 0
    raise AssertionError(args.maintain_command)  # pragma: no cover


def _sweeps(plan: Any, only: str | None) -> list[str]:
    """The hypervisors ``maintain sweep`` sweeps: the plan's, or only ``only``."""
    have = [h for h, there in (("vsphere", plan.connection is not None), ("hyperv", bool(plan.hyperv))) if there]
    return [h for h in have if only in (None, h)]


def _run_sweeps(args: argparse.Namespace, plan_path: str, ui: str) -> int:
    """``maintain sweep``: sweep_vsphere and/or sweep_hyperv, each as a flow
    run of its own, one list of leftovers (each with ``hypervisor``)."""
    from ..orchestration import maintenance
    from ..orchestration.vmtask import one_line
    from ..plan import load_plan

    flows = {"vsphere": maintenance.sweep_vsphere, "hyperv": maintenance.sweep_hyperv}
    items: list[dict] = []
    for hypervisor in _sweeps(load_plan(plan_path), args.hypervisor):
        flow_fn = flows[hypervisor]
        kw = {} if args.older_than is None else {"older_than_seconds": args.older_than}
        state = flow_fn(plan_path=plan_path, return_state=True, **kw)
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            if isinstance(result, BackupError):
                raise result
            raise BackupError(f"the {flow_fn.name} flow failed: {one_line(result)} (details: {ui})")
        items += [{"hypervisor": hypervisor, **i} for i in result]
    _print(args, {"leftovers": items}, _sweep_text(items))
    return 0 if all(i.get("removed") for i in items) else 1


def _audit_text(r: dict[str, Any]) -> str:
    lines = []
    for v in r["vms"]:
        if v["status"] == "ok":
            lines.append(
                f"ok       {v['vm']}: point {v['point']}, {', '.join(v['disks_compared'])}: "
                f"{v['bytes_compared']} bytes compared, no difference"
            )
        elif v["status"] == "mismatch":
            where = ", ".join(f"{m['disk']} at {m['offset']}+{m['length']}" for m in v["mismatches"])
            lines.append(
                f"MISMATCH {v['vm']}: point {v['point']} differs where CBT reported no change ({where}); "
                "the chain is marked broken, the next backup is a full"
            )
        elif v["status"] == "skipped":
            lines.append(f"skipped  {v['vm']}: {v['reason']}")
        else:
            lines.append(f"FAILED   {v['vm']}: {v['error']}")
    lines.append(
        f"CBT audit ({r['sample']}): {len(r['ok_vms'])} ok, {len(r['mismatched'])} mismatch, "
        f"{len(r['skipped'])} skipped, {len(r['failed'])} failed; {r['bytes_compared']} bytes compared"
    )
    return "\n".join(lines)


def _run_audit(args: argparse.Namespace, plan_path: str, ui: str) -> int:
    """``maintain audit``: the audit_cbt flow; exit 1 (the VMs named on
    stdout and stderr) when an area differs or a VM could not be audited."""
    from ..orchestration import maintenance
    from ..orchestration.vmtask import one_line

    state = maintenance.audit_cbt(
        plan_path=plan_path, vms=args.vm or None, sample=args.sample, seed=args.seed, return_state=True
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, maintenance.CbtMismatchError):
        _print(args, result.report, _audit_text(result.report))
        print(f"vmbackup: error: {result}", file=sys.stderr)
        return 1
    if isinstance(result, BaseException):
        if isinstance(result, BackupError):
            raise result
        raise BackupError(f"the audit flow failed: {one_line(result)} (details: {ui})")
    _print(args, result, _audit_text(result))
    return 0


def _check_drill(plan: Any, args: argparse.Namespace) -> None:
    """A drill's input, before any server starts: the plan's drill: section,
    --sample, and each --vm's newest point (exit 2, one line)."""
    from ..orchestration import restore_input

    if plan.drill is None:
        raise InvalidInputError(f"plan {args.plan} has no drill: section (where drill VMs go: docs/plan.md)")
    if args.sample is not None and args.sample < 1:
        raise InvalidInputError("--sample must be at least 1")
    for name in args.vm or ():
        job = restore_input.resolve(plan, [name], assign=False)[0]
        restore_input.drill_requests(plan, [job], "check")
        restore_input.assign_agents([job], plan.agents)


def _drill_text(r: dict[str, Any]) -> str:
    from ..orchestration.reports import drill_passed

    lines = []
    for v in r["vms"]:
        if drill_passed(v):
            lines.append(
                f"passed   {v['vm']}: point {v['point']} restored as {v['restored_as']} on {v['host']}, "
                f"disks equal to the backup, RTO {v['seconds']:.1f} s, removed"
            )
        else:
            lines.append(f"FAILED   {v['vm']}: {v.get('error') or 'the disks were not compared'}")
    lines.append(f"drill: {len(r['passed'])} passed, {len(r['failed'])} failed")
    return "\n".join(lines)


def _run_drill(args: argparse.Namespace, plan_path: str, ui: str) -> int:
    """``maintain drill``: the drill flow; exit 1 when a drill failed."""
    from ..errors import DrillFailedError
    from ..orchestration.restore import drill
    from ..orchestration.vmtask import one_line

    state = drill(plan_path=plan_path, vms=args.vm or None, sample=args.sample, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, DrillFailedError):
        _print(args, result.report, _drill_text(result.report))
        print(f"vmbackup: error: {result}", file=sys.stderr)
        return 1
    if isinstance(result, BaseException):
        if isinstance(result, BackupError):
            raise result
        raise BackupError(f"the drill flow failed: {one_line(result)} (details: {ui})")
    _print(args, result, _drill_text(result))
    return 0
