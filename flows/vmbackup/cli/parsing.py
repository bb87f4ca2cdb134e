"""What the user typed: usage errors as one line, sizes, changed extents."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, NoReturn

from ..errors import InvalidInputError

# The mover takes offsets, lengths and sizes as unsigned 64-bit numbers; a
# file offset on Linux is signed 64-bit, so that is the bound for all of them.
MAX_OFFSET = 2**63 - 1

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


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line with a pointer to
    ``--help`` (exit 2), not the usage block. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_size(text: str) -> int:
    """``1MiB``, ``256KiB``, ``4M``, ``1048576`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d{1,30})\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidInputError(f"{text!r} is not a size (e.g. 1MiB, 256KiB, 4194304)")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size > MAX_OFFSET:
        raise InvalidInputError(f"{text!r} is too large (at most {MAX_OFFSET} bytes)")
    return size


def count(text: str) -> int:
    """A non-negative count for argparse (``--keep-last N``), bounded to 64 bits."""
    if not re.fullmatch(r"\s*\d{1,19}\s*", text) or int(text) > MAX_OFFSET:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count from 0 to {MAX_OFFSET}")
    return int(text)


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds for argparse (``--grace``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 <= value <= 100 * 365 * 86400):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 100 years")
    return value


# A list of areas as QueryChangedDiskAreas returns them: far below this even
# for a 64 TiB disk written all over in 64 KiB pieces, merged.
MAX_EXTENTS_FILE = 256 * 1024 * 1024


def _read_regular(path: str, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. A FIFO, a device
    or a directory is refused without blocking on it (O_NONBLOCK), as is a
    file too large to be what it claims."""
    import stat

    fd = os.open(os.fsencode(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"{what} {shown_path(path)} is not a regular file")
        if st.st_size > limit:
            raise InvalidInputError(f"{what} {shown_path(path)} is {st.st_size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def read_extents(path: str, what: str = "changed extents") -> list[tuple[int, int]]:
    """Reads an extents file (``what`` names it in errors): a JSON list of
    ``{"start", "length"}``, or vSphere's DiskChangeInfo object with a
    ``changedArea`` list."""
    shown = shown_path(path)
    try:
        data = json.loads(_read_regular(path, MAX_EXTENTS_FILE, what))
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} {shown}: {e.strerror}") from e
    except ValueError as e:
        raise InvalidInputError(f"{what} {shown} is not JSON: {e}") from e
    except RecursionError:
        raise InvalidInputError(f"{what} {shown} is nested too deeply to be a list of extents") from None
    if isinstance(data, dict) and isinstance(data.get("changedArea"), list):
        data = data["changedArea"]
    if not isinstance(data, list):
        raise InvalidInputError(f"{what} {shown} must be a JSON list of {{start, length}}")
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise InvalidInputError(f"{what} {shown}: item {i} is not an object")
        start, length = e.get("start"), e.get("length")
        if (
            not (isinstance(start, int) and isinstance(length, int))
            or isinstance(start, bool)
            or isinstance(length, bool)
            or start < 0
            or length < 0
        ):
            raise InvalidInputError(f"{what} {shown}: item {i} needs non-negative integer start and length")
        if start + length > MAX_OFFSET:
            raise InvalidInputError(f"{what} {shown}: item {i} ends beyond {MAX_OFFSET}")
        out.append((start, length))
    return out


def repo(args: argparse.Namespace) -> str:
    """The repository of a command: ``--repo`` or ``$VMBACKUP_REPO``."""
    path = args.repo or os.environ.get("VMBACKUP_REPO")
    if not path:
        raise InvalidInputError("no repository: pass --repo PATH or set VMBACKUP_REPO")
    return path


def shown_path(path: str) -> str:
    """A file name as a message shows it: undecodable bytes as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8(text: str, what: str) -> str:
    """Text the repository stores (VM and disk names, ids) must be UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{what} {shown_path(text)!r} is not valid UTF-8") from None
    return text


def env_number(flag: str, env: str, value: str | None, kind: type[int] | type[float]) -> Any:
    """A number from a flag, else from the environment (read only here, at
    the edge), else None (the mover's default). A value that is not a
    number is refused with one line naming where it came from; the range is
    checked by the mover, which refuses rather than clamps."""
    where = flag
    if value is None:
        value, where = os.environ.get(env), env
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number of seconds"
        raise InvalidInputError(f"{where}={value!r} is not {what}") from None
