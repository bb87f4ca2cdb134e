"""``vmbackup backup`` (runs the ``backup_vms`` flow: vSphere and Hyper-V) and ``vmbackup server``
(the embedded Prefect server: status, stop).

Prefect is imported only inside :func:`run_backup`, after the server's
address is in the environment (Prefect reads its settings at import).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from .. import results
from ..errors import BackupError, InvalidInputError
from . import output

# The command line's columns: VmResult's fields with a title (results.py).
TABLE = results.text_columns()


def add_parser(sub: Any) -> None:
    """Adds ``backup`` and ``server`` to the command line's subparsers."""
    from .keys import add_plan_key_argument

    sp = sub.add_parser(
        "backup",
        help="back up the VMs of a plan as a Prefect flow",
        description="Back up the plan's VMs, vSphere and Hyper-V, (or only --vm NAME ...) in one run of the "
        "backup_vms flow, on "
        "$PREFECT_API_URL or on the local Prefect server vmbackup starts and keeps.",
    )
    sp.add_argument("--plan", required=True, metavar="FILE", help="the plan (YAML, see docs/plan.md)")
    sp.add_argument("--vm", action="append", metavar="NAME", help="only this VM (repeat for more)")
    sp.add_argument(
        "--vm-timeout",
        type=float,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="cancel a VM's backup after this long (default 21600; 0: never)",
    )
    sp.add_argument("--json", action="store_true", help='print one JSON document {"vms": [...]} on stdout')
    add_plan_key_argument(sp)
    sp.set_defaults(func=run_backup)

    sp = sub.add_parser("server", help="the local Prefect server vmbackup keeps", description=_server_doc())
    ssub = sp.add_subparsers(dest="server_command", metavar="{status,stop}")
    ssub.required = True
    for name, helptext in (("status", "is it running, where, its UI"), ("stop", "stop it (the next backup starts it)")):
        p = ssub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.set_defaults(func=run_server)


def _server_doc() -> str:
    return (
        "The embedded default Prefect server: started by `vmbackup backup` when PREFECT_API_URL is unset, kept "
        "for later runs, state in $VMBACKUP_STATE_DIR (default ~/.local/state/vmbackup). It lets no one in "
        "without its auth string (the file api-auth there, 0600): vmbackup's commands use it, and the UI's "
        "login asks for it."
    )


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        json.dump(data, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(human)


def run_server(args: argparse.Namespace) -> int:
    from ..localserver import server

    if args.server_command == "status":
        st = server.server_status()
        if st["running"] and st.get("healthy", True):
            st["crashed_runs_marked"] = len(_mark_crashed(st))
        if not st["managed"]:
            human = f"PREFECT_API_URL={st['api_url']} ({'answering' if st['running'] else 'NOT answering'})"
        elif st["running"]:
            human = (
                f"running: pid {st['pid']}, UI {st['ui_url']} , API {st['api_url']}"
                f"{'' if st['healthy'] else ' (NOT answering)'}; "
                f"{'login: the auth string in ' + st['auth_file'] if st['auth'] else 'NO authentication'}; "
                f"state {st['state_dir']}, log {st['log']}"
            )
        else:
            human = f"not running (state {st['state_dir']})"
        _emit(args, st, human)
        return 0
    result = server.stop_server()
    _emit(args, result, f"stopped the Prefect server (pid {result['pid']})" if result["stopped"] else "not running")
    return 0


def _mark_crashed(st: dict) -> list[dict]:
    """``server status`` marks the runs a killed vmbackup left Running too;
    Prefect is imported only when a record names a process that is gone."""
    from ..localserver import runs as local_runs

    api_url = st["api_url"]
    if not local_runs.dead_records(api_url):
        return []
    import importlib.util

    if importlib.util.find_spec("prefect") is None:
        return []
    from ..localserver import server

    info = server.ServerInfo(api_url=api_url, ui_url="", managed=st["managed"], state_dir=st["state_dir"])
    os.environ.update(server.client_env(info))
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    return local_runs.reconcile(api_url)


def table(rows: list[dict]) -> str:
    """The rows as a table for people; errors below it, one line per VM."""
    lines = output.vm_table(rows, TABLE)
    repos = sorted({str(r["repository"]) for r in rows if r.get("repository")})
    if repos:
        lines.append(f"repository: {', '.join(repos)}")
    return "\n".join(lines + output.vm_totals(rows, "backed up"))


def use_server(command: str) -> Any:
    """Points this process at a Prefect server (``$PREFECT_API_URL`` or the
    embedded one vmbackup keeps) for ``vmbackup COMMAND``: its client
    settings, the run's logs to the server (the terminal gets the table, not
    Prefect's tracebacks), and the runs a killed vmbackup left Running ended
    first. Returns the server's ``ServerInfo``."""
    import importlib.util

    if importlib.util.find_spec("prefect") is None:
        raise BackupError(f"`vmbackup {command}` needs Prefect: pip install 'vmbackup[prefect]'")
    from ..localserver import runs as local_runs
    from ..localserver import server

    info = server.ensure_server()
    os.environ.update(server.client_env(info))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "vmbackup")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    local_runs.reconcile(info.api_url)
    return info


def run_backup(args: argparse.Namespace) -> int:
    if args.vm_timeout < 0:
        raise InvalidInputError("--vm-timeout must not be negative")
    from ..plan import load_plan

    # A bad plan is reported before any server is started (one line, exit 2),
    # and so is a missing or wrong passphrase of an encrypted repository.
    plan = load_plan(args.plan)
    from ..keys import encryption_warning
    from .keys import unlock_plan

    unlock_plan(args, plan)
    warning = encryption_warning(plan)
    if warning:
        print(f"vmbackup: warning: {warning}", file=sys.stderr)

    info = use_server("backup")
    if info.managed:
        from ..localserver import server

        how = "started" if info.started else "running"
        print(
            f"Prefect UI: {info.ui_url} (local server {how}, pid {info.pid}; log in with the string in "
            f"{server.auth_path()}; `vmbackup server stop` stops it)",
            file=sys.stderr,
        )
    else:
        print(f"Prefect UI: {info.ui_url} (PREFECT_API_URL)", file=sys.stderr)

    from ..localserver import runs as local_runs
    from ..orchestration.backup import backup_vms
    from ..orchestration.vmtask import one_line

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM ends a run as Ctrl-C does: every running VM is cancelled and
    # cleaned up (snapshot removed, disks detached) before the exit.
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with local_runs.tagged(info.api_url):
            rows = backup_vms(
                plan_path=os.path.abspath(args.plan),
                vms=args.vm,
                vm_deadline_seconds=args.vm_timeout or None,
            )
    except (BackupError, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug or an unexpected library error: one line, the UI has the traceback
        raise BackupError(f"the backup flow failed: {one_line(e)} (details in the Prefect UI: {info.ui_url})") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    _emit(args, {"vms": rows}, table(rows))
    print(f"Prefect UI: {info.ui_url}", file=sys.stderr)
    return 1 if any(r.get("status") != "ok" for r in rows) else 0
