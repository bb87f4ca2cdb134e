"""``python -m vmbackup.lab ...``: the lab's command line on its own."""

import argparse
import sys

from .cli import add_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vmbackup")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "lab":
        argv.insert(0, "lab")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
