"""What goes to stdout and stderr.

With ``--json`` exactly one JSON document goes to stdout; everything for
people goes to stderr (progress, warnings, errors) or, without ``--json``,
to stdout. The demo and the benchmark format numbers with ``fmt_bytes``.

A stdout that cannot be written (a full disk, a closed pipe) does not undo
the work: the failure is one line on stderr, stdout is pointed at
/dev/null so that nothing fails again at exit, and ``stdout_failed`` tells
the command line, which keeps the work's exit code (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

stdout_failed = False
# False for commands whose only work is what they print (`snapshots`).
work_beyond_output = True


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def vm_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> list[str]:
    """Rows of VMs (``results.text_columns``: field, title, width) as lines
    for people: sizes as ``fmt_bytes``, seconds to a tenth, ``-`` for none."""
    lines = [" ".join(f"{title:<{w}}" for _, title, w in columns).rstrip()]
    for r in rows:
        cells = []
        for key, _, w in columns:
            v = r.get(key)
            if key.startswith("bytes_"):
                text = fmt_bytes(v) if isinstance(v, int | float) else "-"
            elif key == "seconds" and isinstance(v, int | float):
                text = f"{v:.1f}"
            else:
                text = "-" if v is None else str(v)
            cells.append(f"{text[:w]:<{w}}")
        lines.append(" ".join(cells).rstrip())
    return lines


def vm_totals(rows: list[dict], done: str) -> list[str]:
    """``N of M VM(s) <done>``, then one ``FAILED vm: error`` line per failed VM."""
    ok = sum(r.get("status") == "ok" for r in rows)
    lines = [f"{ok} of {len(rows)} VM(s) {done}"]
    return lines + [f"FAILED {r['vm']}: {r.get('error') or 'unknown error'}" for r in rows if r.get("status") != "ok"]


def warn(message: str) -> None:
    """One line on stderr."""
    try:
        print(f"vmbackup: warning: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def write_stdout(text: str) -> bool:
    """Writes and flushes ``text``; on failure says so once on stderr."""
    global stdout_failed
    if stdout_failed:
        return False
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    except OSError as e:
        stdout_failed = True
        _silence_stdout()
        done = "; the work itself is done" if work_beyond_output else ""
        warn(f"could not write to stdout ({e.strerror or e}){done}")
        return False


def _silence_stdout() -> None:
    # What is still buffered would fail again when Python flushes at exit.
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    """The command's result: ``data`` as JSON with ``--json``, else ``human``."""
    if getattr(args, "json", False):
        write_stdout(json.dumps(data, indent=2 if sys.stdout.isatty() else None) + "\n")
    elif human:
        write_stdout(human + "\n")


class Progress:
    """A progress line on stderr, only for people at a terminal."""

    def __init__(self, label: str, enabled: bool, unit: str = "bytes"):
        self.label, self.enabled, self.unit = label, enabled and sys.stderr.isatty(), unit
        self.t0 = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / total if total else 100.0
        rate = done / max(time.monotonic() - self.t0, 1e-6)
        extra = f" {fmt_bytes(rate)}/s" if self.unit == "bytes" else ""
        sys.stderr.write(f"\r{self.label}: {pct:5.1f}%{extra}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
