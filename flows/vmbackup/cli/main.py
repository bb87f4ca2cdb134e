"""The parser, the dispatch to a command module, and the exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import BackupError, OutputError, exit_code_of
from . import output
from .parsing import Parser, shown_path

# Commands whose result is what they print: an unwritable stdout fails them
# (verify's verdict unread is no verdict).
_OUTPUT_ONLY = {"snapshots", "verify"}


def exit_code(error: BaseException) -> int:
    """The one map from an error to the exit code: 0 success, 1 the operation
    failed, 2 bad usage or bad input, 128 + N stopped by signal N."""
    if isinstance(error, (OverflowError, UnicodeError)):
        return 2  # a number or a name the mover cannot take
    return exit_code_of(error)


def _message(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, UnicodeEncodeError) and isinstance(error.object, str):
        return f"{shown_path(error.object)!r} is not valid UTF-8"
    if isinstance(error, OverflowError):
        return f"a number is out of range: {error}"
    return str(error)


def build_parser() -> argparse.ArgumentParser:
    from . import demo, disks, keys, lab, repository

    p = Parser(prog="vmbackup", description="Hypervisor-level backup of virtual machines.")
    p.add_argument("--version", action="version", version=f"vmbackup {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, json_flag: bool = True, repo: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if repo:
            sp.add_argument("--repo", help="repository directory (default: $VMBACKUP_REPO)")
            keys.add_key_arguments(sp, recovery=name != "init")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(func=func)
        return sp

    repository.add_parsers(command)
    disks.add_parsers(command)
    keys.add_parsers(sub)
    demo.add_parser(command)
    lab.add_parser(sub)
    # `backup` and `server`: the flows; they import Prefect only when run.
    from .backup import add_parser as add_orchestration_parser

    add_orchestration_parser(sub)
    from .restore import add_parser as add_restore_parser

    add_restore_parser(sub)
    from .maintain import add_parser as add_maintain_parser

    add_maintain_parser(sub)
    from .copy import add_parser as add_copy_parser

    add_copy_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmbackup ARGS``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["lab"]:
            from .lab import run_lab

            rc = run_lab(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            output.work_beyond_output = args.command not in _OUTPUT_ONLY
            from .offsite import remote_repo

            url = remote_repo(args)
            if url is not None:  # --repo s3://...: the command runs on a local mirror of the copy
                from .offsite import run as run_remote

                rc = run_remote(args, url)
            else:
                rc = int(args.func(args) or 0)
            if output.stdout_failed and args.command in _OUTPUT_ONLY:
                rc = max(rc, exit_code(OutputError("writing to stdout failed")))
        return rc
    except (BackupError, KeyboardInterrupt, OverflowError, UnicodeError) as e:
        print(f"vmbackup: error: {_message(e)}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
