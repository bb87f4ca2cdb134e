"""``vmbackup restore``: runs the ``restore_vm`` flow (docs/restore.md).

The request is checked before any Prefect server starts: the plan, the
options, each VM's point in the repository, its configuration, the target
hypervisor and an agent for it, the passwords (one line, exit 2, nothing
made). What only the target can tell (a name in use, an unknown ESXi host,
datastore, folder or network) the flow checks for every VM before it makes
anything, with the same exit 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from .. import results
from ..errors import BackupError, InvalidInputError
from . import output

# The command line's columns: RestoreResult's fields with a title (results.py).
TABLE = results.text_columns(results.RestoreResult)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "restore",
        help="restore VMs from their backups as a Prefect flow (restore_vm)",
        description="Restore VMs of the plan's repository as new VMs (or roll one back in place) in one run of the "
        "restore_vm flow, on $PREFECT_API_URL or on the local Prefect server vmbackup starts and keeps. "
        "Without --as a VM is restored as <vm>-restored, on its point's host and datastore (Hyper-V: its "
        "original folder's parent).",
    )
    sp.add_argument("--plan", required=True, metavar="FILE", help="the plan (YAML, see docs/plan.md)")
    sp.add_argument("--vm", action="append", required=True, metavar="NAME", help="the VM to restore (repeat for more)")
    when = sp.add_mutually_exclusive_group()
    when.add_argument("--point", metavar="ID", help="this backup point (default: the VM's newest trusted one)")
    when.add_argument(
        "--before", metavar="TIME", help="the newest point before TIME (2026-12-01T18:00; UTC unless it says)"
    )
    sp.add_argument("--as", dest="restored_as", metavar="NEW_NAME", help="the new VM's name (default: <vm>-restored)")
    sp.add_argument(
        "--host", metavar="H", help="an ESXi host or a Hyper-V host of the plan (the other hypervisor: across)"
    )
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--datastore", metavar="DS", help="vSphere: the new VM's datastore")
    where.add_argument("--path", metavar="DIR", help="Hyper-V: the folder the new VM goes under (D:\\VMs)")
    sp.add_argument(
        "--folder",
        metavar="PATH",
        help="vSphere: the VM folder of the new VM (drills or lab/drills; default: the datacenter's VM folder)",
    )
    sp.add_argument(
        "--resource-pool",
        metavar="PATH",
        help="vSphere: the resource pool of the new VM (default: the host's root pool)",
    )
    sp.add_argument(
        "--network-map",
        action="append",
        metavar="FROM=TO",
        help="connect the backup's network FROM to the target's network TO (repeat for more)",
    )
    sp.add_argument(
        "--repo",
        metavar="R",
        help="read the points here instead of the plan's repository: a directory, or its offsite copy "
        "s3://BUCKET/PREFIX (the plan's copy: endpoint and credentials when it names that bucket, else the AWS "
        "environment's); without it, the plan's copy: when the plan's repository is gone",
    )
    sp.add_argument("--power-on", action="store_true", help="power the VM on once restored")
    sp.add_argument(
        "--in-place",
        action="store_true",
        help="roll the existing VM (powered off) back to the point, writing only what differs",
    )
    sp.add_argument(
        "--vm-timeout",
        type=float,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="cancel a VM's restore after this long (default 21600; 0: never)",
    )
    sp.add_argument("--json", action="store_true", help='print one JSON document {"vms": [...]} on stdout')
    from .keys import add_plan_key_argument

    add_plan_key_argument(sp)
    sp.set_defaults(func=run_restore)


def table(rows: list[dict]) -> str:
    """The rows for people; changes, warnings and errors below, one line each."""
    lines = output.vm_table(rows, TABLE)
    for r in rows:
        lines += [f"{r['vm']}: {c}" for c in r.get("changes") or ()]
        lines += [f"{r['vm']}: warning: {w}" for w in r.get("warnings") or ()]
    return "\n".join(lines + output.vm_totals(rows, "restored"))


def check(args: argparse.Namespace) -> Any:
    """Everything that can be checked without the hypervisors; the jobs."""
    from ..orchestration import restore_input
    from ..plan import load_plan

    if args.vm_timeout < 0:
        raise InvalidInputError("--vm-timeout must not be negative")
    from .keys import unlock_plan

    key = None
    if getattr(args, "passphrase_file", None):
        from .. import keys
        from .parsing import shown_path

        key = keys.KeySource(
            passphrase=keys.read_secret_file(args.passphrase_file),
            where=f"--passphrase-file {shown_path(args.passphrase_file)}",
        )
    plan = restore_input.restore_source(load_plan(args.plan), args.repo, key=key, unlock=False).plan
    # An encrypted repository: a missing or wrong passphrase is one line
    # before any server starts; the flow finds it unlocked.
    unlock_plan(args, plan)
    jobs = restore_input.resolve(
        plan,
        args.vm,
        point=args.point,
        before=restore_input.parse_before(args.before),
        restored_as=args.restored_as,
        host=args.host,
        datastore=args.datastore,
        path=args.path,
        network_map=restore_input.parse_network_map(args.network_map),
        power_on=args.power_on,
        in_place=args.in_place,
        folder=args.folder,
        resource_pool=args.resource_pool,
    )
    restore_input.passwords(plan, jobs, env_only=True)
    return jobs


def run_restore(args: argparse.Namespace) -> int:
    from ..orchestration import restore_input

    # Plain checks first: no Prefect is imported for a mistake.
    restore_input.parse_network_map(args.network_map)
    restore_input.parse_before(args.before)
    check(args)
    ui = prepare_server()
    from ..orchestration.restore import restore_vm
    from ..orchestration.vmtask import one_line

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM ends a run as Ctrl-C does: each VM's restore is cancelled and
    # its half-made VM removed before the exit.
    previous = signal.signal(signal.SIGTERM, on_term)
    from ..localserver import runs as local_runs

    try:
        with local_runs.tagged(os.environ["PREFECT_API_URL"]):
            rows = restore_vm(
                plan_path=os.path.abspath(args.plan),
                vms=args.vm,
                point=args.point,
                before=args.before,
                restored_as=args.restored_as,
                host=args.host,
                datastore=args.datastore,
                path=args.path,
                network_map=restore_input.parse_network_map(args.network_map) or None,
                power_on=args.power_on,
                in_place=args.in_place,
                folder=args.folder,
                resource_pool=args.resource_pool,
                repo=args.repo,
                vm_deadline_seconds=args.vm_timeout or None,
            )
    except (BackupError, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug or an unexpected library error: one line, the UI has the traceback
        raise BackupError(f"the restore flow failed: {one_line(e)} (details in the Prefect UI: {ui})") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    output.emit(args, {"vms": rows}, table(rows))
    print(f"Prefect UI: {ui}", file=sys.stderr)
    return 1 if any(r.get("status") != "ok" for r in rows) else 0


def prepare_server() -> str:
    """Points this process at a Prefect server as ``vmbackup backup`` does;
    returns the UI's address."""
    from .backup import use_server

    info = use_server("restore")
    print(f"Prefect UI: {info.ui_url}", file=sys.stderr)
    return str(info.ui_url)
