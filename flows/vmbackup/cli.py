"""The ``vmbackup`` command.

Repository commands talk to the Rust mover directly and never import
Prefect, so they start fast. Exit codes: 0 success, 1 the operation failed,
2 bad usage or bad input. With ``--json`` exactly one JSON document goes to
stdout; everything for people goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import BackupError, InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """``1MiB``, ``256KiB``, ``4M``, ``1048576`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidInputError(f"{text!r} is not a size (e.g. 1MiB, 256KiB, 4194304)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def read_extents(path: str) -> list[tuple[int, int]]:
    """Reads a changed-extents file: a JSON list of ``{"start", "length"}``,
    or vSphere's DiskChangeInfo object with a ``changedArea`` list."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise InvalidInputError(f"cannot read changed extents {path}: {e.strerror}") from e
    except ValueError as e:
        raise InvalidInputError(f"changed extents {path} is not JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("changedArea"), list):
        data = data["changedArea"]
    if not isinstance(data, list):
        raise InvalidInputError(f"changed extents {path} must be a JSON list of {{start, length}}")
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise InvalidInputError(f"changed extents {path}: item {i} is not an object")
        start, length = e.get("start"), e.get("length")
        if (
            not (isinstance(start, int) and isinstance(length, int))
            or isinstance(start, bool)
            or start < 0
            or length < 0
        ):
            raise InvalidInputError(f"changed extents {path}: item {i} needs non-negative integer start and length")
        out.append((start, length))
    return out


class _Progress:
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


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=None if not sys.stdout.isatty() else 2)
        sys.stdout.write("\n")
    elif human:
        print(human)


def _repo(args: argparse.Namespace) -> str:
    repo = args.repo or os.environ.get("VMBACKUP_REPO")
    if not repo:
        raise InvalidInputError("no repository: pass --repo PATH or set VMBACKUP_REPO")
    return repo


# --- commands -------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from . import _mover

    config = json.loads(_mover.init_repository(_repo(args), parse_size(args.chunk_size), args.compression))
    config["path"] = os.path.abspath(_repo(args))
    _emit(
        args,
        config,
        f"created repository {config['path']} (chunk size {fmt_bytes(config['chunk_size'])}, "
        f"compression {config['compression']})",
    )
    return 0


def cmd_backup_disk(args: argparse.Namespace) -> int:
    from . import _mover

    repo = _repo(args)
    extents = None
    if args.changed_extents:
        if not args.parent:
            raise InvalidInputError("--changed-extents needs --parent: the unchanged areas come from the parent backup")
        extents = read_extents(args.changed_extents)
    if not args.source.startswith(("nbd:", "nbd+", "nbds:", "nbds+")) and not os.path.exists(args.source):
        raise InvalidInputError(f"source {args.source} does not exist")
    session = _mover.BackupSession(repo, args.vm, args.parent)
    progress = _Progress(f"backing up {args.source}", not args.json)
    try:
        disk = session.add_disk(args.source, args.disk, extents, args.change_id, progress=progress)
        meta = json.loads(session.commit(attributes=json.dumps({"tool": "vmbackup backup-disk"})))
    except BaseException:
        session.abort()
        raise
    finally:
        progress.close()
    result = {
        "id": meta["id"],
        "vm": meta["vm"],
        "disk": disk.name,
        "created": meta["created"],
        "parent": meta["parent"],
        "mode": disk.mode,
        "disk_size": disk.disk_size,
        "bytes_read": disk.bytes_read,
        "bytes_stored": disk.bytes_stored,
        "bytes_skipped": disk.bytes_skipped,
        "new_chunks": disk.new_chunks,
        "reused_chunks": disk.reused_chunks,
        "zero_blocks": disk.zero_blocks,
        "parent_blocks": disk.parent_blocks,
        "seconds": round(disk.seconds, 3),
    }
    _emit(
        args,
        result,
        f"backup {meta['id']} of {meta['vm']} disk {disk.name}: {fmt_bytes(disk.disk_size)} disk, "
        f"read {fmt_bytes(disk.bytes_read)}, stored {fmt_bytes(disk.bytes_stored)} "
        f"({disk.new_chunks} new chunks, {disk.reused_chunks} reused, {disk.zero_blocks} zero blocks, "
        f"{disk.parent_blocks} from parent) in {disk.seconds:.2f} s",
    )
    return 0


def cmd_restore_disk(args: argparse.Namespace) -> int:
    from . import _mover

    progress = _Progress(f"restoring {args.id}", not args.json)
    try:
        r = _mover.restore_disk(
            _repo(args),
            args.id,
            args.output,
            disk=args.disk,
            format=args.format,
            overwrite=args.force,
            progress=progress,
        )
    finally:
        progress.close()
    result = {
        "id": r.backup,
        "disk": r.disk,
        "output": args.output,
        "format": args.format,
        "disk_size": r.disk_size,
        "bytes_written": r.bytes_written,
        "zero_blocks": r.zero_blocks,
        "seconds": round(r.seconds, 3),
    }
    _emit(
        args,
        result,
        f"restored disk {r.disk} of {r.backup} to {args.output}: {fmt_bytes(r.disk_size)}, "
        f"{fmt_bytes(r.bytes_written)} written in {r.seconds:.2f} s",
    )
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from .catalog import list_backups

    backups, bad = list_backups(_repo(args), args.vm)
    for msg in bad:
        print(f"vmbackup: warning: {msg}", file=sys.stderr)
    lines = [f"{'ID':<26} {'VM':<20} {'CREATED':<21} {'DISKS':>5} {'SIZE':>10} {'STORED':>10} PARENT"]
    for b in backups:
        lines.append(
            f"{b.id:<26} {b.vm[:20]:<20} {b.created:<21} {len(b.disks):>5} {fmt_bytes(b.size):>10} "
            f"{fmt_bytes(b.bytes_stored):>10} {b.parent or '-'}"
        )
    _emit(args, [b.summary() for b in backups], "\n".join(lines) if backups else "no backups")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import _mover

    progress = _Progress("verifying", not args.json, unit="chunks")
    try:
        r = _mover.verify(_repo(args), args.ids or None, read_data=args.read_data, progress=progress)
    finally:
        progress.close()
    problems = [
        {
            "kind": p.kind,
            "object": p.object,
            "message": p.message,
            "affected": [{"backup": b, "vm": vm, "disk": d} for b, vm, d in p.affected],
        }
        for p in r.problems
    ]
    data = {
        "ok": r.ok,
        "read_data": args.read_data,
        "backups_checked": r.backups_checked,
        "chunks_checked": r.chunks_checked,
        "bytes_checked": r.bytes_checked,
        "problems": problems,
    }
    lines = []
    for p in problems:
        who = ", ".join(f"{a['backup']} (VM {a['vm']}, disk {a['disk'] or '?'})" for a in p["affected"])
        lines.append(f"PROBLEM {p['kind']}: {p['message']}; affects {who}")
    verdict = "ok" if r.ok else f"{len(problems)} problem(s)"
    lines.append(
        f"verified {r.backups_checked} backup(s), {r.chunks_checked} chunk(s)"
        f"{' re-read, ' + fmt_bytes(r.bytes_checked) if args.read_data else ' present'}: {verdict}"
    )
    _emit(args, data, "\n".join(lines))
    return 0 if r.ok else 1


def cmd_forget(args: argparse.Namespace) -> int:
    from . import _mover
    from .catalog import list_backups

    repo = _repo(args)
    known = {b.id for b in list_backups(repo)[0]}
    missing = [i for i in args.ids if i not in known]
    if missing:
        raise InvalidInputError(f"no backup {', '.join(missing)} in the repository; nothing was forgotten")
    for i in args.ids:
        _mover.forget(repo, i)
    _emit(
        args,
        {"forgotten": args.ids},
        "\n".join(f"forgot {i}" for i in args.ids) + "\n(chunks are reclaimed by `vmbackup gc`)",
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import _mover
    from .catalog import list_backups
    from .retention import Policy, apply

    repo = _repo(args)
    policy = Policy(
        last=args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
    )
    backups, bad = list_backups(repo, args.vm)
    for msg in bad:
        print(f"vmbackup: warning: {msg}", file=sys.stderr)
    decisions = apply(policy, backups)
    kept = [
        {"id": d.backup.id, "vm": d.backup.vm, "created": d.backup.created, "reasons": d.reasons}
        for d in decisions
        if d.keep
    ]
    removed = [{"id": d.backup.id, "vm": d.backup.vm, "created": d.backup.created} for d in decisions if not d.keep]
    if not args.dry_run:
        for r in removed:
            _mover.forget(repo, r["id"])
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep   {k['id']} {k['vm']} ({', '.join(k['reasons'])})" for k in kept]
    lines += [f"{'remove' if args.dry_run else 'gone  '} {r['id']} {r['vm']}" for r in removed]
    lines.append(f"{verb} {len(removed)} backup(s), kept {len(kept)}")
    _emit(args, {"dry_run": args.dry_run, "kept": kept, "removed": removed}, "\n".join(lines))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from . import _mover

    if args.grace < 0:
        raise InvalidInputError("--grace must not be negative")
    r = _mover.gc(_repo(args), grace_seconds=args.grace, dry_run=args.dry_run)
    data = {
        k: getattr(r, k)
        for k in (
            "dry_run",
            "backups",
            "active_backups",
            "stale_leases_removed",
            "referenced_chunks",
            "chunks_scanned",
            "chunks_removed",
            "bytes_removed",
            "chunks_in_grace",
            "temp_files_removed",
            "cutoff_unix",
        )
    }
    verb = "would remove" if r.dry_run else "removed"
    _emit(
        args,
        data,
        f"{verb} {r.chunks_removed} chunk(s), {fmt_bytes(r.bytes_removed)}; "
        f"{r.referenced_chunks} referenced by {r.backups} backup(s), {r.chunks_in_grace} unreferenced "
        f"kept in the grace period, {r.active_backups} backup(s) running",
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from . import _mover

    if bool(args.socket) == bool(args.listen):
        raise InvalidInputError("give exactly one of --socket PATH or --listen HOST:PORT")
    if args.listen and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):\d+", args.listen):
        raise InvalidInputError(f"--listen {args.listen!r} is not HOST:PORT")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def ready(uri: str) -> None:
        if args.json:
            _emit(args, {"uri": uri}, "")
            sys.stdout.flush()
        else:
            print(
                f"serving backup {args.id} on {uri}{' (writable overlay)' if args.writable else ''}; Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )

    # SIGTERM ends serving as cleanly as Ctrl-C: clients are disconnected,
    # the socket and any overlay are removed, and the exit code is 0.
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        _mover.serve(
            _repo(args),
            args.id,
            disk=args.disk,
            socket=args.socket,
            listen=args.listen,
            writable=args.writable,
            ready=ready,
        )
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, size=parse_size(args.size))


# --- parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmbackup", description="Hypervisor-level backup of virtual machines.")
    p.add_argument("--version", action="version", version="vmbackup 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, json_flag: bool = True, repo: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if repo:
            sp.add_argument("--repo", help="repository directory (default: $VMBACKUP_REPO)")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(func=func)
        return sp

    sp = command("init", cmd_init, "create a repository")
    sp.add_argument("--chunk-size", default="1MiB", help="power of two, 256KiB to 8MiB (default 1MiB)")
    sp.add_argument("--compression", default="zstd:1", help="zstd:LEVEL or none (default zstd:1)")

    sp = command("backup-disk", cmd_backup_disk, "back up one disk image, block device or NBD export")
    sp.add_argument("--vm", required=True, help="the VM the disk belongs to")
    sp.add_argument("--disk", default="disk0", help="the disk's name in the backup (default disk0)")
    sp.add_argument("--parent", help="backup id this one is incremental to")
    sp.add_argument(
        "--changed-extents",
        metavar="FILE",
        help="JSON list of {start, length} changed since --parent (QueryChangedDiskAreas)",
    )
    sp.add_argument("--change-id", help="the hypervisor's CBT change id to record")
    sp.add_argument("source", metavar="SOURCE")

    sp = command("restore-disk", cmd_restore_disk, "restore a disk of a backup")
    sp.add_argument("--disk", help="disk name (needed when the backup has several)")
    sp.add_argument("--format", default="raw", choices=["raw", "vmdk", "vmdk-sparse", "vhdx"])
    sp.add_argument("--force", action="store_true", help="overwrite a non-empty OUTPUT file")
    sp.add_argument("id", metavar="ID")
    sp.add_argument("output", metavar="OUTPUT")

    sp = command("snapshots", cmd_snapshots, "list backups")
    sp.add_argument("--vm", help="only this VM's backups")

    sp = command("verify", cmd_verify, "check backups; exit 0 only if all is sound")
    sp.add_argument("--read-data", action="store_true", help="re-read and re-hash every chunk")
    sp.add_argument("ids", nargs="*", metavar="ID")

    sp = command("forget", cmd_forget, "remove backups by id (chunks go at the next gc)")
    sp.add_argument("ids", nargs="+", metavar="ID")

    sp = command("prune", cmd_prune, "apply a retention policy per VM")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        sp.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    sp.add_argument("--vm", help="only this VM's backups")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")

    sp = command("gc", cmd_gc, "remove chunks that no backup uses")
    sp.add_argument(
        "--grace",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="keep unreferenced chunks younger than this (default 900; running backups are always safe)",
    )
    sp.add_argument("--dry-run", action="store_true")

    sp = command("serve", cmd_serve, "serve a backup's disk as an NBD export (read-only unless --writable)")
    sp.add_argument("--disk", help="disk name (needed when the backup has several)")
    sp.add_argument("--socket", metavar="PATH", help="unix socket to create (removed on exit)")
    sp.add_argument("--listen", metavar="HOST:PORT", help="TCP address to listen on (port 0: any free port)")
    sp.add_argument(
        "--writable",
        action="store_true",
        help="accept writes into a temporary copy-on-write overlay, discarded on exit",
    )
    sp.add_argument("id", metavar="ID")

    sp = command("demo", cmd_demo, "back up, verify and restore a generated disk image", json_flag=False, repo=False)
    sp.add_argument("--dir", default="demo-output", help="where the image and repository go")
    sp.add_argument("--size", default="512MiB", help="size of the generated disk (default 512MiB)")

    from .lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    # `backup` and `server`: the flows; they import Prefect only when run.
    from .orchestration.command import add_parser as add_orchestration_parser

    add_orchestration_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BackupError as e:
        print(f"vmbackup: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vmbackup: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
