"""Repository commands: init, snapshots, verify, forget, prune, gc."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import InvalidInputError
from .output import Progress as _Progress
from .output import emit as _emit
from .output import fmt_bytes
from .parsing import count, parse_size, repo, seconds, shown_path
from .paths import repository_path


def _repo(args: argparse.Namespace) -> str:
    from .keys import open_repo

    return open_repo(args)[0]


def cmd_init(args: argparse.Namespace) -> int:
    from .. import _mover
    from .keys import PASSPHRASE_ENV, new_passphrase

    chunk_size = parse_size(args.chunk_size)
    if args.plan:
        return _init_plan(args, chunk_size)
    path = repository_path(repo(args), create=True)
    if args.encryption:
        from ..keys import init_encrypted

        passphrase = new_passphrase(args, "--passphrase-file", PASSPHRASE_ENV)
        created, slot = init_encrypted(path, passphrase, chunk_size, args.compression)
        config = created.to_dict() | {"encrypted": True, "key_slots": [slot]}
    else:
        config = _mover.init_repository(path, chunk_size, args.compression).to_dict() | {"encrypted": False}
    config["path"] = shown_path(os.path.abspath(repo(args)))
    if args.encryption is None:
        print(
            "vmbackup: note: this repository is not encrypted; `vmbackup init --encryption` makes one that is "
            "(docs/operations.md, Keys)",
            file=sys.stderr,
        )
    how = "encrypted, key slot " + config["key_slots"][0] if args.encryption else "not encrypted"
    _emit(
        args,
        config,
        f"created repository {config['path']} (chunk size {fmt_bytes(config['chunk_size'])}, "
        f"compression {config['compression']}, {how})",
    )
    return 0


def _init_plan(args: argparse.Namespace, chunk_size: int) -> int:
    """``init --plan FILE``: the plan's repository, encrypted unless the plan says ``encryption: none``."""
    from ..keys import create_plan_repository
    from ..plan import load_plan

    if args.repo or args.encryption is not None:
        raise InvalidInputError(
            "with --plan the plan names the repository and its encryption: drop --repo/--encryption"
        )
    plan = load_plan(args.plan)
    if plan.encryption != "none" and plan.passphrase_secret is not None:
        from .keys import use_server_for_blocks

        use_server_for_blocks(args)  # the passphrase's Secret block is on the server the flows use
    created, slot = create_plan_repository(plan, chunk_size, args.compression)
    config = created.to_dict() | {"encrypted": slot is not None, "path": str(plan.repository)}
    if slot is not None:
        config["key_slots"] = [slot]
    how = f"encrypted, key slot {slot}" if slot else "not encrypted (the plan says encryption: none)"
    _emit(
        args,
        config,
        f"created repository {config['path']} (chunk size {fmt_bytes(config['chunk_size'])}, "
        f"compression {config['compression']}, {how})",
    )
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from ..catalog import list_backups, summary, untrusted_summary

    backups, bad = list_backups(_repo(args), args.vm)
    for u in bad:
        print(f"vmbackup: warning: not trusted: {u.problem}", file=sys.stderr)
    # Untrusted manifests are listed too, marked "!" (and `trusted: false` with
    # the `problem` in --json), so nobody takes them for restorable backups.
    rows = [(b, None) for b in backups] + [(u.info, u) for u in bad]
    # VM_ID (and HOST) tell two VMs of one name apart; "-" for a backup
    # without them (backup-disk, vSphere points written before ids were stored).
    lines = [
        f"  {'ID':<26} {'VM':<20} {'CREATED':<21} {'DISKS':>5} {'SIZE':>10} {'STORED':>10} {'PARENT':<26} "
        f"{'HOST':<12} VM_ID"
    ]
    for b, u in rows:
        bid = u.file_id if u else b.id
        if b is None:
            lines.append(f"! {bid:<26} {'?':<20} {'?':<21} {'?':>5} {'?':>10} {'?':>10} {'-':<26} {'?':<12} ?")
            continue
        s = summary(b)
        lines.append(
            f"{'!' if u else ' '} {bid:<26} {b.vm[:20]:<20} {b.created:<21} {len(b.disks):>5} "
            f"{fmt_bytes(b.size):>10} {fmt_bytes(b.bytes_stored):>10} {b.parent or '-':<26} "
            f"{(s['host'] or '-')[:12]:<12} {s['vm_id'] or '-'}"
        )
    if bad:
        lines.append(f"{len(bad)} manifest(s) marked ! are not trusted: damaged, or not what the file name says")
    data = [summary(b) | {"trusted": True} for b in backups] + [untrusted_summary(u) for u in bad]
    _emit(args, data, "\n".join(lines) if rows else "no backups")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .. import _mover
    from .keys import open_repo

    # Without the key of an encrypted repository, verify still checks that
    # every chunk is present and that its ciphertext matches its checksum;
    # the manifests' contents and the plaintext need the key.
    repo_path, locked = open_repo(args, required=False)
    progress = _Progress("verifying", not args.json, unit="chunks")
    try:
        r = _mover.verify(repo_path, args.ids or None, read_data=args.read_data, progress=progress)
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
        "with_key": not locked,
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
    if locked:
        lines.append(
            "without the key: chunks checked for presence and ciphertext checksums only "
            "(give the passphrase to check everything)"
        )
    _emit(args, data, "\n".join(lines))
    return 0 if r.ok else 1


def cmd_forget(args: argparse.Namespace) -> int:
    from .. import _mover
    from ..catalog import list_backups

    repo = _repo(args)
    good, bad = list_backups(repo)
    # An untrusted manifest can be forgotten by its file name: that is how a
    # damaged or duplicated one is cleaned up.
    known = {b.id for b in good} | {u.file_id for u in bad}
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
    from .. import _mover
    from ..catalog import list_backups
    from ..retention import Policy, apply, series, vm_id_of

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
    if args.vm is not None:
        # --vm names VMs (by label or by the name a point was taken under);
        # each of them is pruned over all its points, whatever name they carry.
        named = {series(b) for b in backups}
        backups = [b for b in list_backups(repo)[0] if series(b) in named]
    # Untrusted manifests are neither kept by a rule (they must not stand in
    # for a restorable backup) nor removed (they may be all that is left of one).
    for u in bad:
        print(f"vmbackup: warning: not trusted, neither kept nor removed: {u.problem}", file=sys.stderr)
    # Per VM identity: a point's vm_id when it has one, else its label
    # (retention.series).
    decisions = apply(policy, backups)

    def row(d: Any) -> dict[str, Any]:
        return {"id": d.backup.id, "vm": d.backup.vm, "vm_id": vm_id_of(d.backup), "created": d.backup.created}

    kept = [row(d) | {"reasons": d.reasons} for d in decisions if d.keep]
    removed = [row(d) for d in decisions if not d.keep]
    if not args.dry_run:
        for r in removed:
            _mover.forget(repo, r["id"])
    verb = "would remove" if args.dry_run else "removed"

    def who(x: dict[str, Any]) -> str:
        return f"{x['vm']} [{x['vm_id']}]" if x["vm_id"] else x["vm"]

    lines = [f"keep   {k['id']} {who(k)} ({', '.join(k['reasons'])})" for k in kept]
    lines += [f"{'remove' if args.dry_run else 'gone  '} {r['id']} {who(r)}" for r in removed]
    lines += [f"untrusted {u.file_id} (left alone: {u.problem})" for u in bad]
    lines.append(f"{verb} {len(removed)} backup(s), kept {len(kept)}")
    untrusted = [{"id": u.file_id, "vm": u.info.vm if u.info else None, "problem": u.problem} for u in bad]
    _emit(args, {"dry_run": args.dry_run, "kept": kept, "removed": removed, "untrusted": untrusted}, "\n".join(lines))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .. import _mover

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


def add_parsers(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds this module's commands through ``main``'s ``command`` helper."""
    sp = command("init", cmd_init, "create a repository")
    sp.add_argument("--chunk-size", default="1MiB", help="power of two, 256KiB to 8MiB (default 1MiB)")
    sp.add_argument("--compression", default="zstd:1", help="zstd:LEVEL or none (default zstd:1)")
    sp.add_argument(
        "--plan",
        metavar="FILE",
        help="create the plan's repository instead (encrypted unless the plan says encryption: none; "
        "the passphrase from its passphrase_env or passphrase_secret)",
    )
    enc = sp.add_mutually_exclusive_group()
    enc.add_argument(
        "--encryption",
        action="store_true",
        default=None,
        help="encrypt the repository: a new master key wrapped by the passphrase of --passphrase-file "
        "or $VMBACKUP_PASSPHRASE",
    )
    enc.add_argument(
        "--no-encryption", dest="encryption", action="store_false", default=None, help="do not encrypt (the default)"
    )

    sp = command("snapshots", cmd_snapshots, "list backups")
    sp.add_argument("--vm", help="only the backups of VMs of this name (label, or the name when taken)")

    sp = command("verify", cmd_verify, "check backups; exit 0 only if all is sound")
    sp.add_argument("--read-data", action="store_true", help="re-read and re-hash every chunk")
    sp.add_argument("ids", nargs="*", metavar="ID")

    sp = command("forget", cmd_forget, "remove backups by id (chunks go at the next gc)")
    sp.add_argument("ids", nargs="+", metavar="ID")

    sp = command("prune", cmd_prune, "apply a retention policy per VM (per vm_id where backups carry one)")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        sp.add_argument(f"--keep-{rule}", type=count, default=0, metavar="N")
    sp.add_argument("--vm", help="only this VM's backups")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")

    sp = command("gc", cmd_gc, "remove chunks that no backup uses")
    sp.add_argument(
        "--grace",
        type=seconds,
        default=900.0,
        metavar="SECONDS",
        help="keep unreferenced chunks younger than this (default 900; running backups are always safe)",
    )
    sp.add_argument("--dry-run", action="store_true")
