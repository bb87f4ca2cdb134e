"""``vmbackup demo``: what ``make demo`` runs. The demo lives with the lab
(``vmbackup_lab.demo``), loaded only here."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .lab import load_lab
from .parsing import parse_size


def cmd_demo(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    load_lab()
    from vmbackup_lab.demo import run_demo

    return run_demo(args.dir, size=size)


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command(
        "demo", cmd_demo, "back up the lab's VMs as Prefect flows, verify and restore them", json_flag=False, repo=False
    )
    sp.add_argument("--dir", default="demo-output", help="where the lab (and its repository) goes")
    sp.add_argument("--size", help="size of every disk of the lab's VMs (default: the lab's default topology)")
