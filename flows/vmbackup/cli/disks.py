"""Disk commands: backup-disk, restore-disk, serve."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

from ..errors import CancelledError, InvalidInputError
from .interrupt import Interruptible
from .output import Progress, emit, fmt_bytes, warn
from .output import emit as _emit
from .parsing import env_number, read_extents, shown_path, utf8
from .paths import output_path, source_path

_NBD_SCHEMES = ("nbd:", "nbd+", "nbds:", "nbds+")


def _repo(args: argparse.Namespace) -> str:
    from .keys import open_repo

    return open_repo(args)[0]


def cmd_backup_disk(args: argparse.Namespace) -> int:
    from .. import _mover

    repo = _repo(args)
    vm, disk_name = utf8(args.vm, "--vm"), utf8(args.disk, "--disk")
    change_id = None if args.change_id is None else utf8(args.change_id, "--change-id")
    parent = None if args.parent is None else utf8(args.parent, "--parent")
    extents = None
    if args.changed_extents:
        if not parent:
            raise InvalidInputError("--changed-extents needs --parent: the unchanged areas come from the parent backup")
        extents = read_extents(args.changed_extents)
    allocated = None
    if args.allocated_extents:
        if args.changed_extents:
            raise InvalidInputError("give --changed-extents or --allocated-extents, not both")
        allocated = read_extents(args.allocated_extents, "allocated extents")
    nbd_timeout = env_number("--nbd-timeout", "VMBACKUP_NBD_TIMEOUT", args.nbd_timeout, float)
    nbd_connections = env_number("--nbd-connections", "VMBACKUP_NBD_CONNECTIONS", args.nbd_connections, int)
    nbd = args.source.startswith(_NBD_SCHEMES)
    if nbd:
        utf8(args.source, "SOURCE")
    elif not os.path.exists(args.source):
        raise InvalidInputError(f"source {shown_path(args.source)} does not exist")
    attributes = {"tool": "vmbackup backup-disk"}
    if not nbd and shown_path(args.source) != args.source:
        attributes["source"] = shown_path(args.source)  # the mover records an alias (cli/paths.py)
    progress = Progress(f"backing up {shown_path(args.source)}", not args.json)
    with Interruptible() as interrupt, source_path(args.source) as source:
        session = _mover.BackupSession(repo, vm, parent)
        try:
            disk = session.add_disk(
                source,
                disk_name,
                extents,
                change_id,
                progress=progress,
                cancel=interrupt.token,
                nbd_timeout=nbd_timeout,
                nbd_connections=nbd_connections,
                allocated_extents=allocated,
            )
            # A signal that came while the last blocks were stored stops here,
            # before anything is committed.
            interrupt.stop_if_requested("the backup was not committed; nothing was recorded")
            meta = session.commit(attributes=json.dumps(attributes))
        except CancelledError:
            session.abort()
            interrupt.stop_if_requested("the backup was not committed; nothing was recorded")
            raise
        except BaseException:
            session.abort()
            raise
        finally:
            progress.close()
        if interrupt.signum is not None:
            warn("the signal came while the backup was being committed; the backup is complete")
    result = {
        "id": meta.id,
        "vm": meta.vm,
        "disk": disk.name,
        "created": meta.created,
        "parent": meta.parent,
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
    emit(
        args,
        result,
        f"backup {meta.id} of {meta.vm} disk {disk.name}: {fmt_bytes(disk.disk_size)} disk, "
        f"read {fmt_bytes(disk.bytes_read)}, stored {fmt_bytes(disk.bytes_stored)} "
        f"({disk.new_chunks} new chunks, {disk.reused_chunks} reused, {disk.zero_blocks} zero blocks, "
        f"{disk.parent_blocks} from parent) in {disk.seconds:.2f} s",
    )
    return 0


def cmd_restore_disk(args: argparse.Namespace) -> int:
    from .. import _mover

    if not args.output:
        raise InvalidInputError("OUTPUT is empty: give the file or block device to restore to")
    repo = _repo(args)
    backup_id = utf8(args.id, "ID")
    disk = None if args.disk is None else utf8(args.disk, "--disk")
    shown = shown_path(args.output)
    progress = Progress(f"restoring {backup_id}", not args.json)
    with Interruptible() as interrupt:
        try:
            with output_path(args.output, args.force) as output:
                r = _mover.restore_disk(
                    repo,
                    backup_id,
                    output,
                    disk=disk,
                    format=args.format,
                    overwrite=args.force,
                    progress=progress,
                    cancel=interrupt.token,
                )
        except CancelledError:
            interrupt.stop_if_requested(f"{shown} was not written")
            raise
        finally:
            progress.close()
        if interrupt.signum is not None:
            warn(f"the signal came as the restore finished; {shown} is complete")
    result = {
        "id": r.backup,
        "disk": r.disk,
        "output": shown,
        "format": args.format,
        "disk_size": r.disk_size,
        "bytes_written": r.bytes_written,
        "zero_blocks": r.zero_blocks,
        "seconds": round(r.seconds, 3),
    }
    emit(
        args,
        result,
        f"restored disk {r.disk} of {r.backup} to {shown}: {fmt_bytes(r.disk_size)}, "
        f"{fmt_bytes(r.bytes_written)} written in {r.seconds:.2f} s",
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .. import _mover

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


def add_parsers(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds this module's commands through ``main``'s ``command`` helper."""
    sp = command("backup-disk", cmd_backup_disk, "back up one disk image, block device or NBD export")
    sp.add_argument("--vm", required=True, help="the VM the disk belongs to")
    sp.add_argument("--disk", default="disk0", help="the disk's name in the backup (default disk0)")
    sp.add_argument("--parent", help="backup id this one is incremental to")
    sp.add_argument(
        "--changed-extents",
        metavar="FILE",
        help="JSON list of {start, length} changed since --parent (QueryChangedDiskAreas)",
    )
    sp.add_argument(
        "--allocated-extents",
        metavar="FILE",
        help="JSON list of {start, length} that hold data (QueryChangedDiskAreas with change id *); "
        "the rest is recorded as zeros without being read",
    )
    sp.add_argument("--change-id", help="the hypervisor's CBT change id to record")
    sp.add_argument(
        "--nbd-connections",
        metavar="N",
        help="most connections to an NBD export that allows several, 1-16 (default $VMBACKUP_NBD_CONNECTIONS or 4)",
    )
    sp.add_argument(
        "--nbd-timeout",
        metavar="SECONDS",
        help="connect, handshake and wait for each NBD reply at most this long (default $VMBACKUP_NBD_TIMEOUT or 60)",
    )
    sp.add_argument("source", metavar="SOURCE")

    sp = command("restore-disk", cmd_restore_disk, "restore a disk of a backup")
    sp.add_argument("--disk", help="disk name (needed when the backup has several)")
    sp.add_argument("--format", default="raw", choices=["raw", "vmdk", "vmdk-sparse", "vhdx"])
    sp.add_argument("--force", action="store_true", help="overwrite a non-empty OUTPUT file")
    sp.add_argument("id", metavar="ID")
    sp.add_argument("output", metavar="OUTPUT")

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
