"""``vmbackup demo``: what ``make demo`` runs. The demo lives with the lab
(``vmbackup_lab.demo``), loaded only here."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from ..errors import InvalidInputError
from .lab import load_lab
from .parsing import parse_size, shown_path

# The lab's disks are whole MiB, at least this large (vmbackup_lab.demo).
MIN_DISK = 32 * 1024 * 1024


def cmd_demo(args: argparse.Namespace) -> int:
    size = None if args.size is None else parse_size(args.size)
    if size is not None and (size < MIN_DISK or size % (1024 * 1024)):
        raise InvalidInputError(f"--size {args.size!r}: the lab's disks are a whole number of MiB, at least 32MiB")
    load_lab()
    # A directory that cannot be made is bad input, said before the lab starts.
    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"--dir {shown_path(args.dir)} cannot be created: {e.strerror or e}") from None
    if not os.access(args.dir, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--dir {shown_path(args.dir)} is not writable")
    from vmbackup_lab.demo import run_demo

    return run_demo(args.dir, size=size)


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command(
        "demo", cmd_demo, "back up the lab's VMs as Prefect flows, verify and restore them", json_flag=False, repo=False
    )
    sp.add_argument("--dir", default="demo-output", help="where the lab (and its repository) goes")
    sp.add_argument("--size", help="size of every disk of the lab's VMs (default: the lab's default topology)")
