"""A repository's small records: the cleanup ledger's entries and the drills' record.

The ledger (``ledger/``, ``ledger/restores/``: what a run made in a
hypervisor, which reconcile and the sweeper remove) and ``drills.json`` (the
drills' rotation) are JSON documents that vmbackup acts on, so in an
encrypted repository whoever can write the repository must not be able to
forge or alter them: a forged ledger entry could name any VM's moref for
destruction. There each record is sealed (docs/format.md §1.1):

    {"format": "vmbackup-sealed-record", "version": 1, "aead": "aes-256-gcm", "sealed": BASE64}

``sealed`` is a random 96-bit nonce, the AES-256-GCM ciphertext of the JSON
document and its tag, under the repository's record key (derived from the
master key by the mover, once per unlocked repository: sealing a record costs
no KDF), with the record's path in the repository as associated data, so a
sealed record copied under another name does not open. A record that does
not open (altered, moved, plain JSON where a sealed one belongs, or the
repository is locked in this process) is :class:`UntrustedRecord`: callers
never act on it. An unencrypted repository keeps plain JSON, as before.

Every reader reads a record with :func:`read`: a regular file, not followed
through a symlink, opened without blocking (a FIFO never hangs it), of at most
``MAX_RECORD_BYTES``; a JSON document nested too deeply for the parser is
untrusted too, never an exception that stops the reader.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import KeyRequiredError, NotFoundError, RepositoryError, TamperedRepositoryError, UntrustedRecord

ENVELOPE_FORMAT = "vmbackup-sealed-record"
ENVELOPE_VERSION = 1
AEAD = "aes-256-gcm"
#: The largest record read: a ledger entry or the drills' record is a few KiB.
MAX_RECORD_BYTES = 1 << 20


# Each repository's record sealer (None: unencrypted), by real path, with the
# identity of the config.json it was read from: derived once per repository.
_sealers: dict[str, tuple[tuple[int, int, int, int], Any]] = {}


def _config_stamp(root: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(root / "config.json")
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def sealer(root: str | os.PathLike) -> Any:
    """The repository's ``_mover.RecordSealer``, or None when its records are plain JSON
    (unencrypted, or a directory that is no repository and has no key slots).

    Raises ``KeyRequiredError`` (encrypted, not unlocked in this process),
    ``TamperedRepositoryError`` (key slots in ``keys/`` but a config that says
    unencrypted, or none: plain records would then be believed), or the
    ``RepositoryError`` of a corrupt or altered config."""
    from . import _mover

    path = Path(root)
    real = os.path.realpath(path)
    stamp = _config_stamp(path)
    cached = _sealers.get(real)
    if cached is not None and stamp is not None and cached[0] == stamp:
        return cached[1]
    try:
        found = _mover.record_sealer(str(path))
    except NotFoundError:
        found = None
        stamp = None  # not a repository: nothing to cache
    if found is None and any((path / "keys").glob("*.json")):
        raise TamperedRepositoryError(
            f"repository {root} has key slots in keys/ but its config.json is missing or says it is unencrypted: "
            "its records are not trusted"
        )
    if stamp is not None:
        _sealers[real] = (stamp, found)
    return found


def name_of(root: str | os.PathLike, path: Path) -> str:
    """A record's name: its path relative to the repository, with ``/``."""
    return Path(os.path.relpath(path, root)).as_posix()


def encode(root: str | os.PathLike, path: Path, doc: Any, **dump: Any) -> str:
    """The text to store at ``path``: ``doc`` as JSON, sealed in an encrypted repository.

    ``KeyRequiredError`` when the repository is encrypted and locked: a
    plain record there would never be trusted."""
    text = json.dumps(doc, sort_keys=True, **dump)
    s = sealer(root)
    if s is None:
        return text
    raw = s.seal(name_of(root, path), text.encode())
    envelope = {
        "format": ENVELOPE_FORMAT,
        "version": ENVELOPE_VERSION,
        "aead": AEAD,
        "sealed": base64.b64encode(raw).decode(),
    }
    return json.dumps(envelope)


def _json(text: str | bytes) -> Any:
    """``json.loads``; ``ValueError`` for anything it cannot parse, however deep or large."""
    try:
        return json.loads(text)
    except (RecursionError, MemoryError) as err:
        raise ValueError(f"{type(err).__name__}") from None


def read_bytes(root: str | os.PathLike, path: Path) -> bytes:
    """The bytes of the record at ``path``, read with bounds.

    ``FileNotFoundError`` when there is none; ``UntrustedRecord`` for a
    symlink, anything but a regular file (a FIFO, a device), a file larger
    than ``MAX_RECORD_BYTES``, or one that cannot be read."""
    name = name_of(root, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as err:
        if os.path.islink(path):
            raise UntrustedRecord(f"{name}: a symlink, not a record") from None
        raise UntrustedRecord(f"{name}: cannot be opened ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedRecord(f"{name}: not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise UntrustedRecord(f"{name}: {st.st_size} bytes, larger than a record ({MAX_RECORD_BYTES})")
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RECORD_BYTES:
                raise UntrustedRecord(f"{name}: larger than a record ({MAX_RECORD_BYTES} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise UntrustedRecord(f"{name}: cannot be read ({err.strerror})") from None
    finally:
        os.close(fd)


def read(root: str | os.PathLike, path: Path) -> Any:
    """The JSON document of the record at ``path`` (``read_bytes``, then ``decode``).

    ``FileNotFoundError`` when there is none, ``UntrustedRecord`` when it
    cannot be read within bounds or authenticated."""
    return decode(root, path, read_bytes(root, path))


def decode(root: str | os.PathLike, path: Path, text: str | bytes) -> Any:
    """The JSON document stored at ``path``; ``UntrustedRecord`` if it cannot be trusted."""
    name = name_of(root, path)
    try:
        s = sealer(root)
    except KeyRequiredError:
        raise UntrustedRecord(
            f"{name}: the repository is encrypted and not unlocked here, so it cannot be authenticated"
        ) from None
    except RepositoryError as err:
        raise UntrustedRecord(f"{name}: {err}") from None
    try:
        doc = _json(text)
    except ValueError:
        raise UntrustedRecord(f"{name}: not JSON (torn, foreign, or nested too deeply)") from None
    sealed = isinstance(doc, dict) and doc.get("format") == ENVELOPE_FORMAT
    if s is None:
        if sealed:
            raise UntrustedRecord(f"{name}: sealed, but the repository is unencrypted")
        return doc
    if not sealed:
        raise UntrustedRecord(f"{name}: not sealed, in an encrypted repository")
    if doc.get("version") != ENVELOPE_VERSION or doc.get("aead") != AEAD:
        raise UntrustedRecord(
            f"{name}: sealed record version {doc.get('version')!r} ({doc.get('aead')!r}) is not supported "
            f"(this vmbackup reads version {ENVELOPE_VERSION}, {AEAD})"
        )
    try:
        raw = base64.b64decode(str(doc.get("sealed", "")), validate=True)
    except (binascii.Error, ValueError):
        raise UntrustedRecord(f"{name}: its sealed text is not base64") from None
    plain = s.open(name, raw)
    if plain is None:
        raise UntrustedRecord(
            f"{name}: fails authentication (altered, moved from another name, or sealed under another key)"
        )
    try:
        return _json(plain)
    except ValueError:
        raise UntrustedRecord(f"{name}: authentic, but not JSON") from None
