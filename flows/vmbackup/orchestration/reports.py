"""What people see of a run: artifacts, events, log context.

Two halves:

- pure functions that build the table rows, the markdown summary, the
  events and the progress value from result dicts (no Prefect; tested on
  their own, ``tests/test_reports.py``);
- thin ``publish_*`` / :func:`emit` functions that hand them to Prefect.
  They never raise: a report that cannot be stored must not fail a backup
  (they log a warning instead).

Any flow can use them (``verify_repository``, ``apply_retention``,
``sweep_vsphere``): ``publish_markdown(key, title, markdown)``,
``publish_table(key, rows, description)``, ``emit(event, resource,
related, payload)``, :class:`Progress`. Nothing here ever receives a
secret: callers pass result dicts, which hold none, and :func:`scrub`
replaces the run's secrets anyway where text comes from an error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import results

EVENT_BACKED_UP = "vmbackup.vm.backed-up"
EVENT_FAILED = "vmbackup.vm.failed"

# Derived from VmResult's fields (results.py): a new column is one field there.
TABLE_COLUMNS = results.table_columns()

# Prefect artifact keys: lowercase letters, digits and dashes only.
_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """A valid artifact key from ``parts`` (``vmbackup-vsphere-report``)."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-") or "vmbackup"


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# --- pure builders ---------------------------------------------------------


def read_seconds(row: Mapping[str, Any]) -> float:
    """How long the disks were being read: they are read at once, so the
    slowest disk's time; without disks, the row's ``read_seconds``."""
    disk_secs = [d.get("seconds") or 0.0 for d in row.get("disks") or ()]
    return float(max(disk_secs) if disk_secs else row.get("read_seconds") or 0.0)


def mb_per_s(row: Mapping[str, Any]) -> float | None:
    """Read speed in MB/s (10^6 bytes) over the time the disks were read;
    None when nothing was read or no time was measured."""
    secs = read_seconds(row)
    read = row.get("bytes_read") or 0
    if not read or secs <= 0:
        return None
    return round(read / 1e6 / secs, 1)


def dedup_ratio(row: Mapping[str, Any]) -> float | None:
    """Bytes read over bytes newly stored (deduplication and compression
    together): 4.0 means a quarter of what was read took new space. None
    when nothing was read; ``inf`` is never returned (nothing stored from
    something read gives None too, shown as "all known")."""
    read, stored = row.get("bytes_read") or 0, row.get("bytes_stored") or 0
    if not read or not stored:
        return None
    return round(read / stored, 2)


def _computed(row: Mapping[str, Any], name: str) -> Any:
    return {"mb_per_s": mb_per_s, "dedup_ratio": dedup_ratio}[name](row)


def table_rows(rows: Sequence[Mapping[str, Any]], cls: type = results.VmResult) -> list[dict]:
    """One row per VM for the table artifact: ``results.table_columns`` of
    ``cls`` (VmResult), MB/s and the dedup ratio computed."""
    columns = results.table_columns(cls)
    return [{c: _computed(r, c) if c in results.COMPUTED else r.get(c) for c in columns} for r in rows]


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n} B"  # pragma: no cover


def _md_cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "vSphere backup",
    repository_before: int | None = None,
    repository_after: int | None = None,
    removed: Sequence[Mapping[str, Any]] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The run's summary: ``warnings`` about the whole run (an unencrypted
    repository the plan wants encrypted), totals, failures with their
    reason, why a backup was a full and why one is only crash-consistent,
    what reconcile or the sweeper removed (when reported), the repository's
    size and growth."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    read = sum(r.get("bytes_read") or 0 for r in ok)
    stored = sum(r.get("bytes_stored") or 0 for r in ok)
    fulls = [r for r in ok if r.get("mode") == "full"]
    crash = [r for r in ok if r.get("consistency") == "crash"]
    off = [r for r in ok if r.get("consistency") == "powered-off"]
    lines = [f"# {title}", ""]
    for w in warnings:
        lines += [f"**Warning:** {_md_cell(w)}", ""]
    lines.append(f"**{len(ok)} of {len(rows)} VM(s) backed up**, {len(failed)} failed.")
    lines.append("")
    lines.append("| | |")
    lines.append("|---|---|")
    lines.append(f"| full / incremental | {len(fulls)} / {len(ok) - len(fulls)} |")
    # A powered-off VM is neither: nothing ran that could be inconsistent.
    lines.append(
        f"| application- / crash-consistent / powered off | {len(ok) - len(crash) - len(off)} / {len(crash)} / {len(off)} |"
    )
    lines.append(f"| read | {fmt_bytes(read)} |")
    lines.append(f"| stored (new) | {fmt_bytes(stored)} |")
    ratio = dedup_ratio({"bytes_read": read, "bytes_stored": stored})
    lines.append(f"| dedup ratio | {ratio if ratio is not None else '-'} |")
    if repository_after is not None:
        lines.append(f"| repository size | {fmt_bytes(repository_after)} |")
        if repository_before is not None:
            lines.append(f"| repository growth | {fmt_bytes(repository_after - repository_before)} |")
    lines.append("")
    if failed:
        lines += ["## Failures", "", "| VM | host | agent | reason |", "|---|---|---|---|"]
        for r in failed:
            lines.append(
                f"| {_md_cell(r.get('vm'))} | {_md_cell(r.get('host') or '-')} | "
                f"{_md_cell(r.get('agent') or '-')} | {_md_cell(r.get('error') or 'unknown error')} |"
            )
        lines.append("")
    if fulls:
        lines += ["## Full backups", "", "| VM | why |", "|---|---|"]
        for r in fulls:
            lines.append(f"| {_md_cell(r.get('vm'))} | {_md_cell(r.get('full_reason') or '-')} |")
        lines.append("")
    if crash:
        lines += ["## Crash-consistent backups", "", "| VM | why |", "|---|---|"]
        for r in crash:
            lines.append(f"| {_md_cell(r.get('vm'))} | {_md_cell(r.get('consistency_note') or '-')} |")
        lines.append("")
    skipped = [(r, s) for r in rows for s in r.get("skipped_disks") or ()]
    if skipped:
        lines += ["## Disks not backed up", "", "| VM | disk | why |", "|---|---|---|"]
        for r, s in skipped:
            lines.append(f"| {_md_cell(r.get('vm'))} | {_md_cell(s.get('disk'))} | {_md_cell(s.get('reason'))} |")
        lines.append("")
    if removed is not None:
        lines += ["## Removed leftovers", ""]
        if not removed:
            lines.append("Nothing was left by earlier runs.")
        else:
            lines += ["| kind | name | VM | result |", "|---|---|---|---|"]
            for item in removed:
                result = "removed" if item.get("removed") else f"NOT removed: {item.get('error')}"
                lines.append(
                    f"| {_md_cell(item.get('kind'))} | {_md_cell(item.get('name'))} | "
                    f"{_md_cell(item.get('vm'))} | {_md_cell(result)} |"
                )
        lines.append("")
    return "\n".join(lines)


def resource_id(kind: str, name: str) -> str:
    """A Prefect resource id: ``vmbackup.vm.<name>``."""
    return f"vmbackup.{kind}.{name}"


def vm_event(row: Mapping[str, Any], cls: type = results.VmResult) -> dict:
    """The event for one VM's row: name, resource, related resources (host,
    datastores, agent, repository) and the figures in the payload."""
    vm = str(row.get("vm"))
    ok = row.get("status") == "ok"
    related = []
    if row.get("host"):
        related.append({"prefect.resource.id": resource_id("host", row["host"]), "prefect.resource.role": "host"})
    # A Hyper-V row's "datastores" are its volume keys (hv1:D): related as volumes.
    storage = "volume" if row.get("hypervisor") == "hyperv" else "datastore"
    for ds in row.get("datastores") or ():
        related.append({"prefect.resource.id": resource_id(storage, ds), "prefect.resource.role": storage})
    if row.get("agent"):
        related.append({"prefect.resource.id": resource_id("agent", row["agent"]), "prefect.resource.role": "agent"})
    if row.get("repository"):
        related.append(
            {
                "prefect.resource.id": resource_id("repository", str(row["repository"])),
                "prefect.resource.role": "repository",
            }
        )
    # ``results.event_fields`` of ``cls`` (VmResult): a new field is in the payload.
    payload = {k: _computed(row, k) if k in results.COMPUTED else row.get(k) for k in results.event_fields(cls)}
    return {
        "event": EVENT_BACKED_UP if ok else EVENT_FAILED,
        "resource": {
            "prefect.resource.id": resource_id("vm", vm),
            "prefect.resource.name": vm,
            "vmbackup.vm": vm,
        },
        "related": related,
        "payload": payload,
    }


def directory_size(path: str | os.PathLike) -> int | None:
    """Bytes in the files under ``path`` (a local repository); None when it
    is not a local directory."""
    if not os.path.isdir(path):
        return None
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Progress:
    """Sums per-VM progress into one percentage and calls ``publish`` with
    it at most every ``min_interval`` seconds and only when it moved by
    ``min_step`` points (and always at 100). Thread-safe: the per-VM
    callbacks come from many worker threads."""

    def __init__(
        self,
        publish: Callable[[float], None],
        *,
        min_interval: float = 2.0,
        min_step: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.publish, self.min_interval, self.min_step, self.clock = publish, min_interval, min_step, clock
        self._lock = threading.Lock()
        self._done: dict[str, int] = {}
        self._total: dict[str, int] = {}
        self._last_time: float | None = None
        self._last_value = -1.0
        self.published: list[float] = []

    def expect(self, vm: str, total: int) -> None:
        with self._lock:
            self._total[vm] = max(int(total), 0)
            self._done.setdefault(vm, 0)

    def percent(self) -> float:
        with self._lock:
            return self._percent()

    def _percent(self) -> float:
        total = sum(self._total.values())
        if not total:
            return 100.0 if self._total else 0.0
        done = sum(min(self._done.get(k, 0), t) for k, t in self._total.items())
        return round(100.0 * done / total, 1)

    def update(self, vm: str, done: int, total: int | None = None) -> None:
        with self._lock:
            if total is not None:
                self._total[vm] = max(int(total), 0)
            self._done[vm] = int(done)
            value = self._percent()
            now = self.clock()
            due = self._last_time is None or now - self._last_time >= self.min_interval
            if value < 100.0 and (not due or value - self._last_value < self.min_step):
                return
            if value == self._last_value:
                return
            self._last_time, self._last_value = now, value
            self.published.append(value)
        self.publish(value)

    def finish(self, vm: str) -> None:
        """The VM is done (ok or failed): count it as all read."""
        with self._lock:
            total = self._total.get(vm, 0)
        self.update(vm, total)


# --- log context -------------------------------------------------------------


class VmLogAdapter(logging.LoggerAdapter):
    """Puts the VM's context (``vm``, ``host``, ``agent``) on every line:
    as a ``[vm=... host=... agent=...]`` prefix (the Prefect UI shows the
    message only) and in the record's ``extra``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        ctx = " ".join(f"{k}={v}" for k, v in self.extra.items() if v)
        extra = dict(kwargs.get("extra") or {})
        extra.update({f"vmbackup_{k}": v for k, v in self.extra.items()})
        kwargs["extra"] = extra
        return f"[{ctx}] {msg}", kwargs


def vm_logger(logger: Any, row: Mapping[str, Any]) -> VmLogAdapter:
    return VmLogAdapter(logger, {k: row.get(k) for k in ("vm", "host", "agent")})


_context = threading.local()


class vm_context:  # noqa: N801 - used as a context manager, like a function
    """``with vm_context(row):`` every ``vmbackup.*`` line logged on this
    thread carries the VM's context (see :func:`install_context_filter`)."""

    def __init__(self, row: Mapping[str, Any]):
        self.text = " ".join(f"{k}={row.get(k)}" for k in ("vm", "host", "agent") if row.get(k))

    def __enter__(self) -> vm_context:
        self.previous = getattr(_context, "value", None)
        _context.value = self.text
        return self

    def __exit__(self, *exc: object) -> None:
        _context.value = self.previous


_installed: set[str] = set()
_install_lock = threading.Lock()


def _task_run_context() -> str | None:
    """The VM context of the Prefect task run on this thread, from its
    parameters (``vm``, ``context``: host, agent), if it is a VM's task."""
    try:
        from prefect.context import TaskRunContext

        trc = TaskRunContext.get()
    except Exception:
        return None
    params = getattr(trc, "parameters", None) or {}
    if not isinstance(params.get("vm"), str):
        return None
    extra = params.get("context") if isinstance(params.get("context"), dict) else {}
    return " ".join(f"{k}={v}" for k, v in [("vm", params["vm"]), *extra.items()] if v)


def install_context_filter(prefix: str = "vmbackup") -> None:
    """Lines of the loggers named ``prefix`` or ``prefix.*`` logged on a
    thread inside :func:`vm_context`, and every line of a VM's task run
    (Prefect's own included), get the ``[vm=... host=... agent=...]``
    prefix. Done in the log record factory: a filter on the ``vmbackup``
    logger would not see its children's records, and the handlers are
    Prefect's."""
    with _install_lock:
        if prefix in _installed:
            return
        _installed.add(prefix)
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            name = record.name
            ours = name == prefix or name.startswith(prefix + ".")
            if not (ours or name.startswith("prefect.task_runs")):
                return record
            if isinstance(record.msg, str) and record.msg.startswith("[vm="):
                return record
            ctx = getattr(_context, "value", None) if ours else None
            ctx = ctx or _task_run_context()
            if ctx:
                record.msg = f"[{ctx}] {record.msg}"
                record.vmbackup_vm = ctx
            return record

        logging.setLogRecordFactory(factory)


# --- publishing (Prefect) ------------------------------------------------------


def _warn(what: str, e: BaseException) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().warning("could not store %s: %s", what, e)
    except Exception:
        logging.getLogger(__name__).warning("could not store %s: %s", what, e)


def publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str | None = None) -> Any:
    """A table artifact (``key``: lowercase letters, digits, dashes)."""
    try:
        from prefect.artifacts import create_table_artifact

        return create_table_artifact(key=key, table=[dict(r) for r in rows], description=description)
    except Exception as e:
        _warn(f"the table artifact {key}", e)
        return None


def publish_markdown(key: str, title: str, markdown: str) -> Any:
    """A markdown artifact; ``title`` is its description in the UI."""
    try:
        from prefect.artifacts import create_markdown_artifact

        return create_markdown_artifact(key=key, markdown=markdown, description=title)
    except Exception as e:
        _warn(f"the markdown artifact {key}", e)
        return None


def create_progress(key: str, description: str) -> Any:
    """A progress artifact at 0%; returns its id (None if it failed)."""
    try:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(progress=0.0, key=key, description=description)
    except Exception as e:
        _warn(f"the progress artifact {key}", e)
        return None


def update_progress(artifact_id: Any, percent: float, description: str | None = None) -> None:
    """Move the progress artifact to ``percent`` (and, at the end, say what
    happened instead of what was under way)."""
    if artifact_id is None:
        return
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id=artifact_id, progress=float(percent), description=description)
    except Exception as e:
        _warn("the progress", e)


def emit(
    event: str,
    resource: Mapping[str, str],
    related: Sequence[Mapping[str, str]] = (),
    payload: Mapping[str, Any] | None = None,
) -> Any:
    """A Prefect event (``prefect.events.emit_event``); returns it, or None."""
    try:
        from prefect.events import emit_event

        return emit_event(
            event=event, resource=dict(resource), related=[dict(r) for r in related], payload=dict(payload or {})
        )
    except Exception as e:
        _warn(f"the event {event}", e)
        return None


def emit_vm_events(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One ``vmbackup.vm.backed-up`` or ``vmbackup.vm.failed`` per row."""
    return [emit(**vm_event(r)) for r in rows]


def run_name(verb: str) -> Callable[[], str]:
    """A flow run name a person can read in the UI's list of runs:
    ``backup-<plan>-<when>`` (``-<vm>`` when one to three VMs were asked for)."""

    def name() -> str:
        from prefect.runtime import flow_run as runtime_flow_run

        params = runtime_flow_run.parameters or {}
        stem = Path(str(params.get("plan_path") or "plan")).stem
        vms = params.get("vms") or []
        who = "-" + "-".join(vms) if 0 < len(vms) <= 3 else ""
        return f"{verb}-{stem}{who}-{time.strftime('%Y%m%d-%H%M%S')}"

    return name


# --- restores and drills (results.RestoreResult rows) ---------------------------

EVENT_RESTORED = "vmbackup.restore.succeeded"
EVENT_RESTORE_FAILED = "vmbackup.restore.failed"
EVENT_DRILL_PASSED = "vmbackup.drill.passed"
EVENT_DRILL_FAILED = "vmbackup.drill.failed"


def write_mb_per_s(row: Mapping[str, Any]) -> float | None:
    """How fast a restore wrote its disks (MB/s over the slowest disk's time)."""
    secs = max([d.get("seconds") or 0.0 for d in row.get("disks") or ()] or [0.0])
    written = row.get("bytes_written") or 0
    if not written or secs <= 0:
        return None
    return round(written / 1e6 / secs, 1)


def restore_table_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The restore table artifact: RestoreResult's table fields, the write speed after ``seconds``."""
    from dataclasses import fields

    names = [f.name for f in fields(results.RestoreResult) if f.metadata.get("table", True)]
    at = names.index("seconds") + 1
    names = names[:at] + ["write_mb_per_s"] + names[at:]
    return [{c: write_mb_per_s(r) if c == "write_mb_per_s" else r.get(c) for c in names} for r in rows]


def drill_passed(row: Mapping[str, Any]) -> bool:
    """A drill passed: restored, every disk equal to the point, powered on, removed."""
    return row.get("status") == "ok" and row.get("verified") is True


def restore_markdown(rows: Sequence[Mapping[str, Any]], *, title: str, drill: bool = False) -> str:
    """What was restored, where, how long it took (the RTO), what was changed
    and why, per VM; for a drill, whether it passed."""
    if drill:
        good = [r for r in rows if drill_passed(r)]
        head = f"**{len(good)} of {len(rows)} drill(s) passed**, {len(rows) - len(good)} failed."
    else:
        good = [r for r in rows if r.get("status") == "ok"]
        head = f"**{len(good)} of {len(rows)} VM(s) restored**, {len(rows) - len(good)} failed."
    lines = [f"# {title}", "", head, ""]
    lines += ["| VM | restored as | point | host | location | RTO | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = drill_passed(r) if drill else r.get("status") == "ok"
        result = ("passed" if drill else "ok") if ok else f"FAILED: {r.get('error') or 'unknown error'}"
        rto = f"{r.get('seconds') or 0:.1f} s"
        lines.append(
            "| "
            + " | ".join(
                _md_cell(v if v not in (None, "") else "-")
                for v in (
                    r.get("vm"),
                    r.get("restored_as"),
                    r.get("point"),
                    r.get("host"),
                    r.get("location"),
                    rto,
                    result,
                )
            )
            + " |"
        )
    lines.append("")
    for r in rows:
        lines += [f"## {_md_cell(r.get('vm'))} -> {_md_cell(r.get('restored_as') or '-')}", ""]
        across = r.get("source_hypervisor") and r.get("source_hypervisor") != r.get("hypervisor")
        where = f"{r.get('hypervisor')}" + (f" (from a {r.get('source_hypervisor')} point)" if across else "")
        lines.append(f"- target: {where}, host {r.get('host') or '-'}, {r.get('location') or '-'}")
        lines.append(
            f"- point {r.get('point') or '-'}; {'rolled back in place' if r.get('in_place') else 'a new VM'}"
            f"{', powered on' if r.get('powered_on') else ''}; through {r.get('transport') or '-'}"
            f"{'; agent ' + str(r.get('agent')) if r.get('agent') else ''}"
        )
        lines.append(f"- RTO {r.get('seconds') or 0:.1f} s; {fmt_bytes(r.get('bytes_written') or 0)} written")
        if r.get("vm_id"):
            # the id a person finds the VM by in vCenter (instanceUuid) or Hyper-V (VM Id)
            lines.append(f"- {'VM' if r.get('in_place') else 'new VM'} id {_md_cell(r['vm_id'])}")
        if drill or r.get("verified") is not None:
            verdict = {True: "equal to the backup", False: "DIFFERENT from the backup", None: "not compared"}
            lines.append(f"- disks read back: {verdict[r.get('verified')]}")
        if r.get("error"):
            lines.append(f"- error: {_md_cell(r['error'])}")
        lines.append("")
        if r.get("disks"):
            lines += ["| disk | written | seconds |", "|---|---|---|"]
            for d in r["disks"]:
                lines.append(
                    f"| {_md_cell(d.get('disk'))} | {fmt_bytes(d.get('bytes_written') or 0)} | {d.get('seconds')} |"
                )
            lines.append("")
        if r.get("changes"):
            lines += ["What was changed, and why:", ""] + [f"- {_md_cell(c)}" for c in r["changes"]] + [""]
        if r.get("warnings"):
            lines += ["Warnings:", ""] + [f"- {_md_cell(w)}" for w in r["warnings"]] + [""]
    return "\n".join(lines)


def restore_event(row: Mapping[str, Any], *, drill: bool = False) -> dict:
    """The event of one VM's restore (``vmbackup.restore.succeeded|failed``) or
    drill (``vmbackup.drill.passed|failed``): the source VM is the resource,
    the target host, agent and repository related, RestoreResult's event
    fields the payload."""
    from dataclasses import fields

    vm = str(row.get("vm"))
    if drill:
        name = EVENT_DRILL_PASSED if drill_passed(row) else EVENT_DRILL_FAILED
    else:
        name = EVENT_RESTORED if row.get("status") == "ok" else EVENT_RESTORE_FAILED
    related = []
    for role, key in (("host", "host"), ("agent", "agent"), ("repository", "repository")):
        if row.get(key):
            related.append({"prefect.resource.id": resource_id(role, str(row[key])), "prefect.resource.role": role})
    if row.get("restored_as"):
        related.append(
            {
                "prefect.resource.id": resource_id("vm", str(row["restored_as"])),
                "prefect.resource.role": "restored-as",
                "prefect.resource.name": str(row["restored_as"]),
            }
        )
    payload = {f.name: row.get(f.name) for f in fields(results.RestoreResult) if f.metadata.get("event", True)}
    return {
        "event": name,
        "resource": {"prefect.resource.id": resource_id("vm", vm), "prefect.resource.name": vm, "vmbackup.vm": vm},
        "related": related,
        "payload": payload,
    }


def emit_restore_events(rows: Sequence[Mapping[str, Any]], *, drill: bool = False) -> list[Any]:
    return [emit(**restore_event(r, drill=drill)) for r in rows]
