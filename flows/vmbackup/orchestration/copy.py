"""The flow ``copy_repository``: the plan's repository copied offsite (``vmbackup.copy``).

Orchestration only: the copy itself is plain Python over boto3. The flow
returns the copy's report (a dict; ``vmbackup copy`` prints it), publishes it
as a markdown artifact and emits one event with its figures.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from .. import copy as s3copy
from ..plan import load_plan
from . import reports

COPY_KEY = "vmbackup-copy-repository"
EVENT_COPIED = "vmbackup.repository.copied"


def _markdown(r: dict[str, Any]) -> str:
    rows = [
        ("copy", r["url"]),
        ("index", r["index"]),
        ("backups held", r["backups"]),
        ("objects held", f"{r['objects']} ({r['bytes']} bytes)"),
        ("uploaded", f"{r['uploaded']} object(s), {r['bytes_uploaded']} bytes, {r['mib_per_second'] or 0} MiB/s"),
        ("adopted from a copy that did not finish", r["adopted"]),
        ("locks extended", r["extended"]),
        ("locked until at least", f"{r['locked_until']} ({r['lock_mode']}, {r['lock_days']} days + generation)"),
        ("deleted (unlocked, no backup needs them)", r["deleted"]),
        (
            "waiting for their lock to expire",
            f"{r['waiting']}" + (f" (last {r['waiting_until']})" if r["waiting"] else ""),
        ),
    ]
    text = "# Offsite copy\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    for w in r["warnings"]:
        text += f"\n**Warning:** {w}\n"
    return text


@flow(name="copy_repository", flow_run_name=reports.run_name("copy"), log_prints=False)
def copy_repository(plan_path: str) -> dict[str, Any]:
    """Copy the plan's repository to its ``copy:`` target (S3 with Object Lock)."""
    logger = get_run_logger()
    plan = load_plan(plan_path)
    for w in plan.copy_warnings():
        logger.warning(w)
    res = s3copy.copy_plan(plan).to_dict()
    logger.info(
        "copied %s to %s: %d object(s) uploaded (%d bytes), %d adopted, %d lock(s) extended, %d deleted, %d waiting",
        plan.repository,
        res["url"],
        res["uploaded"],
        res["bytes_uploaded"],
        res["adopted"],
        res["extended"],
        res["deleted"],
        res["waiting"],
    )
    reports.publish_markdown(COPY_KEY, f"copy of {plan.repository} to {res['url']}", _markdown(res))
    reports.emit(
        EVENT_COPIED,
        {"prefect.resource.id": f"vmbackup.copy.{res['url']}", "prefect.resource.name": res["url"]},
        [],
        {k: res[k] for k in ("index", "backups", "objects", "uploaded", "bytes_uploaded", "deleted", "waiting")},
    )
    return res
