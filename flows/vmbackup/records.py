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
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from .errors import KeyRequiredError, NotFoundError, RepositoryError, TamperedRepositoryError

ENVELOPE_FORMAT = "vmbackup-sealed-record"
ENVELOPE_VERSION = 1
AEAD = "aes-256-gcm"


class UntrustedRecord(Exception):
    """A record that cannot be authenticated: never acted upon. Its text says why, in one line."""


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
        doc = json.loads(text)
    except ValueError:
        raise UntrustedRecord(f"{name}: not JSON (torn or foreign)") from None
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
        return json.loads(plain)
    except ValueError:
        raise UntrustedRecord(f"{name}: authentic, but not JSON") from None
