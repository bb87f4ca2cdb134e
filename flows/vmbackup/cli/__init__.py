"""The ``vmbackup`` command: a module per group of commands.

- ``main``: the parser, dispatch and the one map from errors to exit codes;
- ``parsing``: what the user typed (one-line usage errors, sizes, extents);
- ``output``: what goes to stdout and stderr (also used by the demo and bench);
- ``interrupt``: Ctrl-C and SIGTERM cancel a running mover call;
- ``paths``: file names that are not UTF-8, handed to the mover;
- ``repository``: init, snapshots, verify, forget, prune, gc;
- ``disks``: backup-disk, restore-disk, serve;
- ``lab`` and ``demo``: load the lab package only when run.

Repository commands talk to the Rust mover directly and never import
Prefect, so they start fast. Exit codes: 0 success, 1 the operation failed,
2 bad usage or bad input. With ``--json`` exactly one JSON document goes to
stdout; everything for people goes to stderr.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
