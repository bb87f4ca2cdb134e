"""``--repo s3://BUCKET/PREFIX`` for ``snapshots``, ``verify`` and ``restore-disk``.

The command runs as it does on a directory, on a local mirror of the copy
(``vmbackup.offsite``): the mirror holds what the command reads, each object
fetched in the version the copy wrote and checked. ``verify`` adds the
copy's own checks (objects missing, written over, damaged) to the mover's.
Endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import argparse
import os

from ..errors import InvalidInputError
from .output import Progress, fmt_bytes
from .output import emit as _emit

COMMANDS = ("snapshots", "verify", "restore-disk")


def remote_repo(args: argparse.Namespace) -> str | None:
    """The s3:// URL this command names (by --repo or $VMBACKUP_REPO), or None."""
    if getattr(args, "command", None) not in COMMANDS:
        return None
    url = getattr(args, "repo", None) or os.environ.get("VMBACKUP_REPO")
    return url if url and url.startswith("s3://") else None


def run(args: argparse.Namespace, url: str) -> int:
    from .. import offsite
    from .keys import key_source

    # The key (--passphrase-file, --recovery-key, $VMBACKUP_PASSPHRASE)
    # chooses the copy's index too: the newest one authentic under it.
    key = key_source(args)
    _show_warnings()
    if args.command == "snapshots":
        args.repo = str(offsite.open_copy(url, key=key).mirror)
        return int(args.func(args) or 0)
    if args.command == "restore-disk":
        if not args.id:
            raise InvalidInputError("ID must not be empty")
        args.repo = offsite.prepare_restore(url, args.id, key=key)
        return int(args.func(args) or 0)
    return _verify(args, url, key)


def _show_warnings() -> None:
    """The copy's warnings (an index skipped as not authentic) on stderr, one line each."""
    import logging
    import sys

    log = logging.getLogger("vmbackup.offsite")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("vmbackup: warning: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.WARNING)
        log.propagate = False


def _verify(args: argparse.Namespace, url: str, key: object) -> int:
    from .. import _mover, offsite

    c, problems = offsite.verify_copy(url, args.ids or None, args.read_data, key=key)  # type: ignore[arg-type]
    progress = Progress("verifying", not args.json, unit="chunks")
    try:
        r = _mover.verify(str(c.mirror), args.ids or None, read_data=args.read_data, progress=progress)
    finally:
        progress.close()
    for p in r.problems:
        rel = f"chunks/{p.object[:2]}/{p.object}"
        if p.kind == "missing_chunk" and not args.read_data and rel in c.objects:
            continue  # in the copy (the listing found its version); the mirror only lacks it
        problems.append(
            {
                "kind": p.kind,
                "object": p.object,
                "message": p.message,
                "affected": [{"backup": b, "vm": vm, "disk": d} for b, vm, d in p.affected],
            }
        )
    ok = not problems
    data = {
        "ok": ok,
        "read_data": args.read_data,
        "repo": url,
        "index": c.index["key"],
        "backups_checked": r.backups_checked,
        "chunks_checked": r.chunks_checked,
        "bytes_checked": r.bytes_checked,
        "objects": len(c.objects),
        "problems": problems,
    }
    lines = []
    for p in problems:
        who = ", ".join(f"{a['backup']} (VM {a['vm']}, disk {a['disk'] or '?'})" for a in p["affected"])
        lines.append(f"PROBLEM {p['kind']}: {p['message']}" + (f"; affects {who}" if who else ""))
    verdict = "ok" if ok else f"{len(problems)} problem(s)"
    lines.append(
        f"verified the copy {url} ({c.index['key']}): {r.backups_checked} backup(s), {len(c.objects)} object(s)"
        f"{', ' + fmt_bytes(r.bytes_checked) + ' re-read' if args.read_data else ' present'}: {verdict}"
    )
    _emit(args, data, "\n".join(lines))
    return 0 if ok else 1
