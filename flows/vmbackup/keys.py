"""Key slots: the master key of an encrypted repository, wrapped for the people and machines that may open it.

An encrypted repository has one master key: 32 random bytes from ``secrets``,
made once by ``vmbackup init --encryption`` and never stored in the clear. The
mover derives everything it seals and names chunks with from it
(docs/format.md). What the repository stores is the master key *wrapped*, once
per key slot, in ``keys/<slot>.json`` (0600, written to a temporary name and
renamed):

- a passphrase slot: a key derived from the passphrase with Argon2id
  (RFC 9106's second recommended setting: 64 MiB, 3 passes, 4 lanes; about a
  quarter of a second here), or scrypt (N=2^17, r=8, p=1) where the installed
  ``cryptography`` has no Argon2id, then AES-256-GCM over the master key;
- a recovery slot: the master key sealed to an X25519 public key (an
  ephemeral key pair, ECDH, HKDF-SHA256, AES-256-GCM). Its private key is
  written once by ``vmbackup key export-recovery`` to a file the owner keeps
  offline; with it, ``--recovery-key FILE`` opens the repository when every
  passphrase is lost.

Each slot's header (kind, KDF and its parameters, repository id) is the
associated data of its AES-GCM seal, so a slot edited or moved from another
repository does not open. Any slot opens the repository; the last slot is
never removed. :func:`unlock` is the one place a repository is opened with a
key, for the command line and the flows alike: it unwraps a slot and hands the
master key to the mover (``_mover.unlock_repository``), which keeps it for the
rest of the process. No Prefect here, and no passphrase in any message.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .errors import InvalidInputError, KeyRequiredError, RepositoryError, TamperedRepositoryError, WrongKeyError

MASTER_KEY_BYTES = 32
SLOT_FORMAT = "vmbackup-key-slot"
SLOT_VERSION = 1
RECOVERY_FORMAT = "vmbackup-recovery-key"
KEYS_DIR = "keys"
# A passphrase or key file larger than this is not one.
MAX_SECRET_FILE = 64 * 1024
MAX_SLOT_FILE = 64 * 1024

# RFC 9106 section 4, the second recommended option (memory-constrained):
# Argon2id, 64 MiB, 3 passes, 4 lanes, 128-bit salt, 256-bit tag.
ARGON2ID = {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
# RFC 7914's parameters as scrypt's authors raise them for interactive use
# today: N=2^17 (128 MiB with r=8), p=1.
SCRYPT = {"name": "scrypt", "n": 2**17, "r": 8, "p": 1}
_HKDF_INFO = b"vmbackup recovery slot v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise RepositoryError(f"{what} is not base64") from None


def has_argon2id() -> bool:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id  # noqa: F401
    except ImportError:
        return False
    return True


def default_kdf() -> dict[str, Any]:
    """The KDF and parameters a new passphrase slot uses."""
    return dict(ARGON2ID if has_argon2id() else SCRYPT)


def _derive(passphrase: bytes, kdf: dict[str, Any], salt: bytes) -> bytes:
    if kdf.get("name") == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(
            salt=salt,
            length=32,
            iterations=int(kdf["iterations"]),
            lanes=int(kdf["lanes"]),
            memory_cost=int(kdf["memory_kib"]),
        ).derive(passphrase)
    if kdf.get("name") == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(passphrase)
    raise RepositoryError(f"key slot KDF {kdf.get('name')!r} is not one this vmbackup knows (argon2id, scrypt)")


def _aad(header: dict[str, Any]) -> bytes:
    """The associated data of a slot's seal: its header, canonical JSON."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Slot:
    """One key slot file, as ``vmbackup key list`` shows it."""

    name: str
    kind: str  # "passphrase" or "recovery"
    created: str
    header: dict[str, Any]
    nonce: bytes
    wrapped: bytes
    extra: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slot": self.name, "kind": self.kind, "created": self.created}
        if self.kind == "passphrase":
            out["kdf"] = {k: v for k, v in self.header["kdf"].items() if k != "salt"}
        else:
            out["recovery_key"] = fingerprint(_unb64(self.header["recovery_public"], "recovery_public"))
        return out


def fingerprint(public: bytes) -> str:
    """A short name of a recovery public key (first 16 hex digits of its SHA-256)."""
    import hashlib

    return hashlib.sha256(public).hexdigest()[:16]


# --- the files ----------------------------------------------------------------


def keys_dir(repo: str | os.PathLike) -> Path:
    return Path(repo) / KEYS_DIR


def _write_private(path: Path, data: bytes, exclusive: bool = False) -> None:
    """``data`` into ``path`` (0600): a temporary name, fsync, rename, fsync
    the directory; with ``exclusive``, never over an existing file."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_slot(path: Path) -> Slot:
    what = f"key slot {path.name}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SLOT_FILE + 1)
        if len(raw) > MAX_SLOT_FILE:
            raise RepositoryError(f"{what} is larger than a key slot can be")
        doc = json.loads(raw)
        header = doc["header"]
        if header.get("format") != SLOT_FORMAT:
            raise RepositoryError(f"{what} is not a vmbackup key slot")
        if header.get("version") != SLOT_VERSION:
            raise RepositoryError(f"{what} has version {header.get('version')!r}; this vmbackup reads version 1")
        return Slot(
            name=path.name.removesuffix(".json"),
            kind=str(header["kind"]),
            created=str(header.get("created", "")),
            header=header,
            nonce=_unb64(doc["nonce"], f"{what}: nonce"),
            wrapped=_unb64(doc["wrapped_key"], f"{what}: wrapped_key"),
            extra=doc,
        )
    except OSError as e:
        raise RepositoryError(f"cannot read {what}: {e.strerror or e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RepositoryError(f"{what} is damaged: {e}") from None


def list_slots(repo: str | os.PathLike) -> list[Slot]:
    """The repository's key slots, oldest first (none: not encrypted, or pre-slot)."""
    d = keys_dir(repo)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RepositoryError(f"cannot list the key slots in {d}: {e.strerror or e}") from e
    slots = [_read_slot(d / n) for n in names]
    return sorted(slots, key=lambda s: (s.created, s.name))


def _new_slot_name(repo: str | os.PathLike, kind: str) -> str:
    existing = {p.name for p in keys_dir(repo).glob("*.json")} if keys_dir(repo).exists() else set()
    while True:
        name = f"{kind}-{secrets.token_hex(4)}"
        if f"{name}.json" not in existing:
            return name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _store(repo: str | os.PathLike, kind: str, header: dict[str, Any], nonce: bytes, wrapped: bytes) -> str:
    name = _new_slot_name(repo, kind)
    doc = {"header": header, "nonce": _b64(nonce), "wrapped_key": _b64(wrapped)}
    _write_private(keys_dir(repo) / f"{name}.json", (json.dumps(doc, indent=2) + "\n").encode(), exclusive=True)
    return name


# --- wrapping -------------------------------------------------------------------


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def add_passphrase_slot(
    repo: str | os.PathLike,
    master_key: bytes,
    passphrase: SecretStr,
    repository_id: str,
    kdf: dict[str, Any] | None = None,
) -> str:
    """Wraps ``master_key`` with ``passphrase`` into a new slot; returns its name."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt = secrets.token_bytes(16)
    kdf_params = dict(kdf or default_kdf()) | {"salt": _b64(salt)}
    header = {
        "format": SLOT_FORMAT,
        "version": SLOT_VERSION,
        "kind": "passphrase",
        "repository": repository_id,
        "created": _now(),
        "kdf": kdf_params,
        "cipher": "aes-256-gcm",
    }
    wrap_key = _derive(_passphrase_bytes(passphrase), kdf_params, salt)
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(wrap_key).encrypt(nonce, master_key, _aad(header))
    return _store(repo, "passphrase", header, nonce, wrapped)


def _passphrase_bytes(passphrase: SecretStr) -> bytes:
    value = passphrase.get_secret_value()
    if not value:
        raise InvalidInputError("the passphrase is empty")
    return value.encode("utf-8", "surrogateescape")


def _recovery_wrap_key(shared: bytes, ephemeral_public: bytes, recovery_public: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recovery_public, info=_HKDF_INFO).derive(
        shared
    )


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def add_recovery_slot(repo: str | os.PathLike, master_key: bytes, recovery_public: bytes, repository_id: str) -> str:
    """Seals ``master_key`` to an X25519 public key in a new slot; returns its name."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ephemeral = X25519PrivateKey.generate()
    eph_public = _raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recovery_public))
    header = {
        "format": SLOT_FORMAT,
        "version": SLOT_VERSION,
        "kind": "recovery",
        "repository": repository_id,
        "created": _now(),
        "kdf": {"name": "x25519-hkdf-sha256", "ephemeral_public": _b64(eph_public)},
        "recovery_public": _b64(recovery_public),
        "cipher": "aes-256-gcm",
    }
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(_recovery_wrap_key(shared, eph_public, recovery_public)).encrypt(nonce, master_key, _aad(header))
    return _store(repo, "recovery", header, nonce, wrapped)


def _open_slot(slot: Slot, wrap_key: bytes) -> bytes | None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        key = AESGCM(wrap_key).decrypt(slot.nonce, slot.wrapped, _aad(slot.header))
    except InvalidTag:
        return None
    return key if len(key) == MASTER_KEY_BYTES else None


def unwrap_with_passphrase(slots: list[Slot], passphrase: SecretStr) -> tuple[bytes, str] | None:
    """The master key and the slot that opened, or None when no passphrase slot opens."""
    secret = _passphrase_bytes(passphrase)
    for slot in slots:
        if slot.kind != "passphrase":
            continue
        kdf = slot.header["kdf"]
        key = _open_slot(slot, _derive(secret, kdf, _unb64(kdf.get("salt"), f"key slot {slot.name}: salt")))
        if key is not None:
            return key, slot.name
    return None


def unwrap_with_recovery(slots: list[Slot], private_key: Any) -> tuple[bytes, str] | None:
    """The master key and the slot that opened with an X25519 recovery private key, or None."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    public = _raw_public(private_key.public_key())
    for slot in slots:
        if slot.kind != "recovery" or _unb64(slot.header.get("recovery_public"), "recovery_public") != public:
            continue
        eph = _unb64(slot.header["kdf"].get("ephemeral_public"), f"key slot {slot.name}: ephemeral_public")
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph))
        key = _open_slot(slot, _recovery_wrap_key(shared, eph, public))
        if key is not None:
            return key, slot.name
    return None


def remove_slot(repo: str | os.PathLike, name: str) -> None:
    """Removes slot ``name``; refuses to remove the last one (the repository
    could never be opened again)."""
    slots = list_slots(repo)
    if name not in {s.name for s in slots}:
        raise InvalidInputError(f"no key slot {name!r} in the repository (see `vmbackup key list`)")
    if len(slots) == 1:
        raise InvalidInputError(f"key slot {name!r} is the repository's last: add another before removing it")
    path = keys_dir(repo) / f"{name}.json"
    path.unlink()
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- recovery key files --------------------------------------------------------------


def new_recovery_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.generate()


def write_recovery_key(path: str | os.PathLike, private_key: Any, repository_id: str) -> str:
    """Writes the recovery private key to ``path`` (0600, never over an
    existing file); returns its public key's fingerprint."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    fp = fingerprint(_raw_public(private_key.public_key()))
    doc = {
        "format": RECOVERY_FORMAT,
        "version": 1,
        "repository": repository_id,
        "fingerprint": fp,
        "created": _now(),
        "note": "Opens the repository without a passphrase (vmbackup ... --recovery-key FILE). Keep it offline.",
        "private_key": _b64(raw),
    }
    target = Path(path)
    try:
        _write_private(target, (json.dumps(doc, indent=2) + "\n").encode(), exclusive=True)
    except FileExistsError:
        raise InvalidInputError(f"{target} exists; the recovery key is never written over a file") from None
    except OSError as e:
        raise InvalidInputError(f"cannot write the recovery key to {target}: {e.strerror or e}") from None
    return fp


def read_recovery_key(path: str | os.PathLike) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    text = read_secret_file(str(path), "recovery key file")
    try:
        doc = json.loads(text.get_secret_value())
        if doc.get("format") != RECOVERY_FORMAT:
            raise ValueError("not a vmbackup recovery key")
        return X25519PrivateKey.from_private_bytes(base64.b64decode(doc["private_key"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInputError(f"{path} is not a vmbackup recovery key file") from None


def read_secret_file(path: str, what: str = "passphrase file") -> SecretStr:
    """A regular file's text as a secret (one trailing newline dropped).
    Its contents never appear in a message."""
    try:
        fd = os.open(os.fsencode(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"{what} {path} is not a regular file")
        if st.st_size > MAX_SECRET_FILE:
            raise InvalidInputError(f"{what} {path} is {st.st_size} bytes, more than {MAX_SECRET_FILE}")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    text = data.decode("utf-8", "surrogateescape")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return SecretStr(text)


# --- opening a repository -------------------------------------------------------------


@dataclass(frozen=True)
class KeySource:
    """Where the key of an encrypted repository comes from: a passphrase
    (from a file, the environment, a plan's variable or Secret block) or a
    recovery key file. ``where`` names it in messages, never its value."""

    passphrase: SecretStr | None = None
    recovery_key: str | None = None
    where: str = "VMBACKUP_PASSPHRASE"

    @property
    def empty(self) -> bool:
        return self.passphrase is None and self.recovery_key is None


# Repositories this process has unlocked (resolved paths): a flow unlocks once per run.
_unlocked: dict[str, bytes] = {}


def _real(repo: str | os.PathLike) -> str:
    return os.path.realpath(os.fsencode(repo)).decode("utf-8", "surrogateescape")


def is_encrypted(repo: str | os.PathLike) -> bool:
    """Whether the repository is encrypted (its config says so).

    Raises ``TamperedRepositoryError`` (exit 2) for a repository whose
    ``keys/`` holds slots while its config says it is unencrypted: only an
    edit makes that (``vmbackup init`` writes slots only for an encrypted
    config, and no command turns encryption off), and it is a downgrade
    attack: the mover, believing the config, would write new backups in
    plaintext and new chunk ids under a key in the clear."""
    from . import _mover

    try:
        config = _mover.open_repository(str(repo))
    except KeyRequiredError:
        return True
    if getattr(config, "encrypted", False):
        return True
    slots = list_slots(repo)
    if slots:
        raise TamperedRepositoryError(
            f"repository {repo} has {len(slots)} key slot(s) in keys/ but its config.json says it is unencrypted: "
            "config.json was altered (encryption switched off); refused, restore config.json from a copy"
        )
    return False


def _repository_id(repo: str | os.PathLike) -> str:
    from . import _mover

    try:
        return str(_mover.open_repository(str(repo)).id)
    except KeyRequiredError:
        return ""


def unwrap(repo: str | os.PathLike, source: KeySource, repository_id: str | None = None) -> tuple[bytes, str]:
    """The master key from ``source`` and the slot that gave it (the slots of
    ``repository_id``, default: the id the mover reads in ``repo``'s config).

    ``KeyRequiredError`` (exit 2) when ``source`` is empty, ``WrongKeyError``
    (exit 2) when it opens no slot: one line each, naming where the key came
    from, never the key."""
    rid = _repository_id(repo) if repository_id is None else repository_id
    # A slot of another repository (copied in) never opens this one.
    slots = [s for s in list_slots(repo) if not rid or s.header.get("repository") in (rid, "")]
    if not slots:
        raise RepositoryError(f"repository {repo} is encrypted but has no key slot in {keys_dir(repo)}")
    if source.recovery_key is not None:
        got = unwrap_with_recovery(slots, read_recovery_key(source.recovery_key))
        if got is None:
            raise WrongKeyError(f"the recovery key {source.recovery_key} opens no key slot of repository {repo}")
        return got
    if source.passphrase is None:
        raise KeyRequiredError(
            f"repository {repo} is encrypted: give its passphrase in VMBACKUP_PASSPHRASE or --passphrase-file FILE"
        )
    got = unwrap_with_passphrase(slots, source.passphrase)
    if got is None:
        raise WrongKeyError(f"the passphrase from {source.where} opens no key slot of repository {repo}")
    return got


def unlock(repo: str | os.PathLike, source: KeySource) -> bool:
    """Opens ``repo`` for this process: for an encrypted repository, unwraps
    a slot with ``source`` and registers the master key with the mover.
    Returns whether the repository is encrypted. Idempotent: a repository
    already unlocked in this process is not unwrapped again."""
    if _real(repo) in _unlocked:
        return True
    if not is_encrypted(repo):
        return False
    key, _slot = unwrap(repo, source)
    _register(repo, key)
    return True


def register(repo: str | os.PathLike, key: bytes) -> None:
    """Hands ``key`` (a master key unwrapped elsewhere: an offsite copy's
    mirror, vmbackup.offsite) to the mover for ``repo``, as :func:`unlock` does."""
    _register(repo, key)


def _register(repo: str | os.PathLike, key: bytes) -> None:
    from . import _mover

    _mover.unlock_repository(str(repo), key)
    _unlocked[_real(repo)] = key


def unlocked_key(repo: str | os.PathLike) -> bytes | None:
    """The master key this process unlocked ``repo`` with, or None."""
    return _unlocked.get(_real(repo))


def master_key(repo: str | os.PathLike, source: KeySource) -> bytes:
    """The master key (for adding a slot): from this process's unlock, else unwrapped."""
    known = _unlocked.get(_real(repo))
    if known is not None:
        return known
    key, _slot = unwrap(repo, source)
    return key


def init_encrypted(
    repo: str, passphrase: SecretStr, chunk_size: int, compression: str, kdf: dict[str, Any] | None = None
) -> tuple[Any, str]:
    """Creates an encrypted repository with a new master key wrapped by
    ``passphrase`` (its first slot); returns the config and the slot's name. If the slot cannot be written, the new
    repository is removed again: a repository whose key is nowhere is worse
    than none."""
    import shutil

    from . import _mover

    _passphrase_bytes(passphrase)  # an empty one is refused before anything is made
    key = new_master_key()
    existed = os.path.lexists(repo)
    config = _mover.init_repository(repo, chunk_size, compression, key=key)
    try:
        slot = add_passphrase_slot(repo, key, passphrase, str(config.id), kdf)
    except BaseException:
        if existed:
            for entry in os.listdir(repo):
                p = os.path.join(repo, entry)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        else:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    _register(repo, key)
    return config, slot


def slots_summary(repo: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for s in list_slots(repo):
        yield s.describe()


# --- plans ------------------------------------------------------------------------------


def plan_key_source(plan: Any) -> KeySource:
    """The key of a plan's repository: its ``passphrase_env`` or
    ``passphrase_secret``, else ``$VMBACKUP_PASSPHRASE`` (plan.py)."""
    from .plan import resolve_passphrase

    passphrase, where = resolve_passphrase(plan)
    return KeySource(passphrase=passphrase, where=where)


def unlock_plan_repository(plan: Any) -> bool:
    """Opens the plan's repository for this process (a flow calls it once per
    run, before any task): nothing for an unencrypted repository or one this
    process already unlocked (``vmbackup backup --passphrase-file``); for an
    encrypted one, a missing or wrong passphrase is one line (exit 2) before
    anything starts. Returns whether the repository is encrypted."""
    repo = str(plan.repository)
    if _real(repo) in _unlocked or not is_encrypted(repo):
        return _real(repo) in _unlocked
    source = plan_key_source(plan)
    if source.empty:
        raise KeyRequiredError(
            f"repository {repo} is encrypted: the plan needs passphrase_env or passphrase_secret "
            "(or set VMBACKUP_PASSPHRASE)"
        )
    return unlock(repo, source)


def encryption_warning(plan: Any) -> str | None:
    """One line when the plan asks for encryption (its default) and its
    repository, made earlier, is not encrypted; None otherwise (and always
    with ``encryption: none``). A backup into it goes on: an existing
    repository is what it was made, only a new one can be encrypted."""
    if plan.encryption == "none" or is_encrypted(plan.repository):
        return None
    return (
        f"repository {plan.repository} is not encrypted; the plan asks for encryption: see `vmbackup init --plan "
        "FILE` to create an encrypted repository (a new directory, which the plan's repository then names; "
        "docs/operations.md, Keys), or say encryption: none in the plan to keep this one"
    )


def create_plan_repository(plan: Any, chunk_size: int, compression: str) -> tuple[Any, str | None]:
    """Creates the plan's repository: encrypted (the passphrase from the
    plan's source) unless the plan says ``encryption: none``. Returns the
    config and the first key slot's name (None when unencrypted)."""
    from . import _mover

    repo = str(plan.repository)
    if plan.encryption == "none":
        return _mover.init_repository(repo, chunk_size, compression), None
    source = plan_key_source(plan)
    if source.passphrase is None:
        raise InvalidInputError(
            "the plan's repository is to be encrypted: give the plan passphrase_env or passphrase_secret "
            "(or set VMBACKUP_PASSPHRASE), or say encryption: none"
        )
    return init_encrypted(repo, source.passphrase, chunk_size, compression)
