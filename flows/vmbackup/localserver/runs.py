"""Flow runs this machine's vmbackup processes run, and the ones a killed
process left "Running".

``vmbackup backup`` and ``vmbackup maintain`` run their flows in their own
process. Killed with -9 (or with the machine), that process never reports
an end, and the server shows its run as Running for good: there is no
worker heartbeat for a local command. So each such process keeps a record
while it runs flows::

    runs/<pid>.json   pid, process start time (/proc), API URL, a run tag

and every flow run it starts carries the tag (Prefect's ``tags`` context).
The record goes when the command ends in any way Python sees. At the start
of every later command that talks to a server (and ``vmbackup server
status``) the records of processes that are gone (pid not alive, or alive
with another start time: a recycled pid) are read, and their runs still
Running or Pending on that same server are set Crashed. Only runs carrying
a tag of a record in this state directory are touched: never runs of other
machines or of workers, nor those of a live process.

Prefect is imported only when there is a dead record to act on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import server

MESSAGE = (
    "the vmbackup process (pid {pid}) ended without finishing this run: killed or the machine stopped; "
    "the next run's reconcile and the sweepers remove what it left"
)


def _dir() -> Path:
    return server.state_dir() / "runs"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    d = _dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def recorded(api_url: str) -> Iterator[str]:
    """While inside, this process is recorded as running flows on
    ``api_url``; yields the tag its flow runs must carry."""
    pid = os.getpid()
    tag = f"vmbackup-pid-{pid}-{uuid.uuid4().hex[:8]}"
    record = {"pid": pid, "start_time": server._start_time(pid), "api_url": api_url, "tag": tag}
    with _locked() as d:
        path = d / f"{pid}.json"
        tmp = d / f"{pid}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    try:
        yield tag
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def tagged(api_url: str) -> Iterator[str]:
    """:func:`recorded` with Prefect's ``tags`` context around it: every
    flow run started inside carries the record's tag."""
    from prefect import tags

    with recorded(api_url) as tag, tags(tag):
        yield tag


def dead_records(api_url: str) -> list[tuple[Path, dict]]:
    """Records of processes that are gone and ran flows on ``api_url``."""
    d = _dir()
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.json")):
        rec = _read(path)
        if rec.get("api_url") == api_url and isinstance(rec.get("tag"), str) and not server._alive(rec):
            out.append((path, rec))
    return out


def mark_crashed(api_url: str) -> list[dict[str, Any]]:
    """Sets Crashed every Running/Pending flow run of a gone process's
    record (for ``api_url``); removes those records. The runs it marked.

    Call with Prefect's settings for ``api_url`` in the environment; Prefect
    is imported only when a dead record exists."""
    if not dead_records(api_url):
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    marked: list[dict[str, Any]] = []
    with _locked(), get_client(sync_client=True) as client:
        for path, rec in dead_records(api_url):  # again, under the lock: one command acts on a record
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[rec["tag"]]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
                )
            )
            for fr in runs:
                # force: the server's rules may refuse a jump from Pending,
                # and no process will ever report this run again.
                client.set_flow_run_state(fr.id, Crashed(message=MESSAGE.format(pid=rec["pid"])), force=True)
                marked.append({"id": str(fr.id), "name": fr.name, "pid": rec["pid"]})
            path.unlink(missing_ok=True)
    return marked


def summary(marked: list[dict[str, Any]]) -> str:
    n = len(marked)
    return f"marked {n} flow run{'s' if n != 1 else ''} that a killed vmbackup left Running as Crashed"


def reconcile(api_url: str) -> list[dict[str, Any]]:
    """:func:`mark_crashed`, told on stderr in one line; a failure to mark
    is told too and never stops the command."""
    import sys

    try:
        marked = mark_crashed(api_url)
    except Exception as e:  # the server refused or went away: the next command tries again
        from ..orchestration.vmtask import one_line

        print(f"could not mark the flow runs a killed vmbackup left Running: {one_line(e)}", file=sys.stderr)
        return []
    if marked:
        print(summary(marked), file=sys.stderr)
    return marked
