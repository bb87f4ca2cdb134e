"""``vmbackup lab ...``: loads the lab package (``vmbackup_lab``, installed
by ``make dev`` from lab/python) only when the command is run. This and
``demo`` are the only modules of the product that name the lab."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InvalidInputError

NOT_INSTALLED = "the lab is not installed (`make dev` installs it: pip install -e lab/python)"


def add_parser(subparsers: Any) -> None:
    """``lab`` in the main help; ``main`` hands its arguments to ``run_lab``."""
    subparsers.add_parser(
        "lab",
        help="the simulated vSphere datacenter and Hyper-V hosts (see docs/lab.md)",
        add_help=False,
        prefix_chars="\0",
    ).add_argument("rest", nargs=argparse.REMAINDER)


def load_lab() -> Any:
    """The ``vmbackup_lab`` package, or one clear line (exit 2) without it."""
    try:
        import vmbackup_lab
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != "vmbackup_lab":
            raise
        raise InvalidInputError(NOT_INSTALLED) from None
    return vmbackup_lab


def run_lab(argv: list[str]) -> int:
    """Runs ``vmbackup lab ARGV`` with the lab's own command line."""
    load_lab()
    from vmbackup_lab.cli import main

    return main(["lab", *argv])
