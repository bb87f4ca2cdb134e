"""``vmbackup demo``: what ``make demo`` runs. The demo and its generated
disk images live with the lab (``vmbackup_lab.demo``), loaded only here."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .lab import load_lab
from .parsing import parse_size


def cmd_demo(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    load_lab()
    from vmbackup_lab.demo import run_demo

    return run_demo(args.dir, size=size)


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("demo", cmd_demo, "back up, verify and restore a generated disk image", json_flag=False, repo=False)
    sp.add_argument("--dir", default="demo-output", help="where the image and repository go")
    sp.add_argument("--size", default="512MiB", help="size of the generated disk (default 512MiB)")
