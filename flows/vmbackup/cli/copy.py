"""``vmbackup copy --plan FILE [--json]``: the flow ``copy_repository`` run in this
process, on ``$PREFECT_API_URL`` or the local server (as ``vmbackup maintain``).

Exit 0 once the copy is complete (its index written); objects waiting for
their lock to expire are not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import BackupError


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "copy",
        help="copy the plan's repository to S3 with Object Lock (the flow copy_repository)",
        description="Copy the plan's repository to its copy: target (S3 object storage, Object Lock in "
        "compliance mode), as the Prefect flow copy_repository on $PREFECT_API_URL or the local server.",
    )
    sp.add_argument("--plan", required=True, metavar="FILE", help="the plan (YAML, see docs/plan.md)")
    sp.add_argument("--json", action="store_true", help="print the copy's report as one JSON document on stdout")
    from .keys import add_plan_key_argument

    add_plan_key_argument(sp)  # an encrypted repository's key authenticates the copy's index
    sp.set_defaults(func=run_copy)


def text(r: dict[str, Any]) -> str:
    lines = [f"warning: {w}" for w in r["warnings"]]
    lines.append(
        f"copied to {r['url']}: {r['backups']} backup(s), {r['objects']} object(s); uploaded {r['uploaded']} "
        f"({r['bytes_uploaded']} bytes, {r['mib_per_second'] or 0} MiB/s), adopted {r['adopted']}, "
        f"extended {r['extended']} lock(s); locked until at least {r['locked_until']}; index {r['index']}"
    )
    if r["deleted"] or r["waiting"]:
        tail = (
            f", {r['waiting']} no backup needs wait for their lock (last {r['waiting_until']})" if r["waiting"] else ""
        )
        lines.append(f"deleted {r['deleted']} unlocked object version(s){tail}")
    return "\n".join(lines)


def run_copy(args: argparse.Namespace) -> int:
    from ..plan import load_plan

    plan = load_plan(args.plan)  # bad plan: one line, exit 2, before any server starts
    if plan.copy_ is None:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"plan {args.plan} has no copy: section (bucket, object_lock, ...)")
    if plan.copy_.credentials_secret is None:
        from ..plan import resolve_copy_credentials

        resolve_copy_credentials(plan.copy_)  # a variable not set: one line, exit 2, before any server starts
    from .keys import unlock_plan

    unlock_plan(args, plan)  # so is a missing or wrong passphrase; the flow finds the repository unlocked
    from .backup import use_server

    ui = use_server("copy").ui_url
    print(f"Prefect UI: {ui}", file=sys.stderr)
    from ..localserver import runs as local_runs
    from ..orchestration import copy as copy_flow
    from ..orchestration.vmtask import one_line

    with local_runs.tagged(os.environ["PREFECT_API_URL"]):
        state = copy_flow.copy_repository(plan_path=os.path.abspath(args.plan), return_state=True)
        result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        if isinstance(result, BackupError):
            raise result
        raise BackupError(f"the copy flow failed: {one_line(result)} (details: {ui})")
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(text(result))
    return 0
