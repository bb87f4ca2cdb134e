"""File names that are not UTF-8, handed to the mover.

Linux file names are bytes; Python gives undecodable bytes to us as lone
surrogates (``os.fsencode`` turns them back into the same bytes). The mover
takes names as UTF-8 text, so a name with undecodable bytes reaches it
through a directory descriptor (``/proc/self/fd/N/NAME``) when only the
directory's part is undecodable, and otherwise through a UTF-8 alias: a
symbolic link for a source, a temporary name renamed at the end for a
restored file. Messages show such names with ``\\xNN`` escapes.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InvalidInputError, TargetError
from .parsing import shown_path


def is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _open_dir(raw: bytes, what: str) -> int:
    try:
        return os.open(raw or b".", os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise InvalidInputError(
            f"{what} directory {shown_path(os.fsdecode(raw))} cannot be opened: {e.strerror}"
        ) from e


_kept_open: list[int] = []


def repository_path(path: str, create: bool = False) -> str:
    """The repository directory as the mover can open it (the descriptor
    stays open for the life of the command)."""
    if is_utf8(path):
        return path
    raw = os.fsencode(path)
    if create and not os.path.lexists(raw):
        os.mkdir(raw, 0o777)
    fd = _open_dir(raw, "repository")
    _kept_open.append(fd)
    return f"/proc/self/fd/{fd}"


def _split(path: str) -> tuple[bytes, bytes, str | None]:
    """The directory and file name of ``path`` as bytes, and the file name as
    text if it is UTF-8 (None if not)."""
    head, tail = os.path.split(os.fsencode(path))
    try:
        return head, tail, tail.decode("utf-8")
    except UnicodeDecodeError:
        return head, tail, None


@contextmanager
def source_path(path: str) -> Iterator[str]:
    """A name the mover can open for the source ``path``."""
    if is_utf8(path):
        yield path
        return
    head, tail, name = _split(path)
    if name is not None:
        fd = _open_dir(head, "source")
        try:
            yield f"/proc/self/fd/{fd}/{name}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="vmbackup-source-") as tmp:
        link = os.path.join(tmp, tail.decode("utf-8", "backslashreplace"))
        os.symlink(os.path.abspath(os.fsencode(path)), link)
        yield link


@contextmanager
def output_path(path: str, overwrite: bool) -> Iterator[str]:
    """A name the mover can restore to for ``path``. When the file name itself
    is undecodable, the mover writes a temporary UTF-8 name in the same
    directory, renamed to ``path`` once the restore succeeded and removed
    if it did not."""
    if is_utf8(path):
        yield path
        return
    head, tail, name = _split(path)
    fd = _open_dir(head, "output")
    try:
        if name is not None:
            yield f"/proc/self/fd/{fd}/{name}"
            return
        try:
            st = os.stat(tail, dir_fd=fd)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            # A block device is written in place: reach it through an alias.
            with tempfile.TemporaryDirectory(prefix="vmbackup-output-") as tmp:
                link = os.path.join(tmp, "device")
                os.symlink(f"/proc/self/fd/{fd}/".encode() + tail, link)
                yield link
            return
        if st is not None and st.st_size > 0 and not overwrite:
            raise InvalidInputError(f"refusing to overwrite {shown_path(path)}: it is not empty (use --force)")
        staged = f".vmbackup-restore-{secrets.token_hex(6)}"
        try:
            yield f"/proc/self/fd/{fd}/{staged}"
            os.rename(staged, tail, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            try:
                os.unlink(staged, dir_fd=fd)
            except FileNotFoundError:
                pass
            raise
    except OSError as e:
        raise TargetError(f"restoring to {shown_path(path)} failed: {e.strerror or e}") from e
    finally:
        os.close(fd)
