"""Opening a repository with its key, and ``vmbackup key add|remove|list|export-recovery``.

Every command that opens a repository goes through :func:`open_repo`: the
passphrase comes from ``--passphrase-file FILE`` or ``$VMBACKUP_PASSPHRASE``
(or a recovery key from ``--recovery-key FILE``), a slot is unwrapped and
the master key registered with the mover (``vmbackup.keys.unlock``). An
unencrypted repository ignores them. The passphrase never reaches a
message, an argument list or the environment of a child process.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable

from pydantic import SecretStr

from .. import keys
from ..errors import InvalidInputError, KeyRequiredError
from .output import emit
from .parsing import repo as repo_arg
from .parsing import shown_path
from .paths import repository_path

PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"
NEW_PASSPHRASE_ENV = "VMBACKUP_NEW_PASSPHRASE"


def add_key_arguments(sp: argparse.ArgumentParser, recovery: bool = True) -> None:
    """``--passphrase-file`` and ``--recovery-key`` on a command that opens a repository."""
    sp.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help=f"the passphrase of an encrypted repository (default: ${PASSPHRASE_ENV})",
    )
    if not recovery:
        return
    sp.add_argument(
        "--recovery-key",
        metavar="FILE",
        help="open an encrypted repository with its recovery key (vmbackup key export-recovery) instead",
    )


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def key_source(args: argparse.Namespace) -> keys.KeySource:
    """Where this command's key comes from (nothing is read from a prompt here)."""
    recovery = getattr(args, "recovery_key", None)
    if recovery:
        if getattr(args, "passphrase_file", None):
            raise InvalidInputError("give --passphrase-file or --recovery-key, not both")
        return keys.KeySource(recovery_key=recovery, where=f"--recovery-key {shown_path(recovery)}")
    pfile = getattr(args, "passphrase_file", None)
    if pfile:
        return keys.KeySource(passphrase=keys.read_secret_file(pfile), where=f"--passphrase-file {shown_path(pfile)}")
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return keys.KeySource(passphrase=SecretStr(value), where=PASSPHRASE_ENV)
    return keys.KeySource()


def _prompted(source: keys.KeySource, what: str = "passphrase") -> keys.KeySource:
    if not source.empty or not _interactive():
        return source
    value = getpass.getpass(f"{what}: ")
    return keys.KeySource(passphrase=SecretStr(value), where="the prompt")


def open_repo(args: argparse.Namespace, required: bool = True) -> tuple[str, bool]:
    """The repository of a command as the mover opens it, unlocked when it
    is encrypted; and whether it is locked still (only with ``required``
    False: ``verify`` without a key checks what it can)."""
    path = repository_path(repo_arg(args))
    source = key_source(args)
    try:
        keys.unlock(path, source)
    except KeyRequiredError:
        prompted = _prompted(source)
        if prompted is not source:
            keys.unlock(path, prompted)
            return path, False
        if required:
            raise
        return path, True
    return path, False


def add_plan_key_argument(sp: argparse.ArgumentParser) -> None:
    """``--passphrase-file`` on a command that runs a plan's flow in this process."""
    sp.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="the passphrase of the plan's encrypted repository, instead of the plan's "
        "passphrase_env/passphrase_secret (default: those, else $VMBACKUP_PASSPHRASE)",
    )


def use_server_for_blocks(args: argparse.Namespace) -> None:
    """Points this process at the Prefect server its flows run on, before a
    Secret block the plan names (``passphrase_secret``) is read here: the
    block is on that server (otherwise Prefect would look in a temporary one
    of its own and find nothing)."""
    from .backup import use_server

    use_server(getattr(args, "command", None) or "backup")


def unlock_plan(args: argparse.Namespace, plan: object, required: bool = True) -> None:
    """Before a plan's flow runs in this process: the plan's encrypted
    repository unlocked with ``--passphrase-file`` or the plan's own source,
    so a wrong or missing passphrase is one line before any run starts (and
    before any server starts, unless the plan's ``passphrase_secret`` is to
    be read from it). The flow finds it unlocked and does not unwrap again."""
    pfile = getattr(args, "passphrase_file", None)
    if pfile:
        source = keys.KeySource(passphrase=keys.read_secret_file(pfile), where=f"--passphrase-file {shown_path(pfile)}")
        keys.unlock(str(plan.repository), source)  # type: ignore[attr-defined]
        return
    if getattr(plan, "passphrase_secret", None) is not None and keys.is_encrypted(str(plan.repository)):  # type: ignore[attr-defined]
        use_server_for_blocks(args)
    try:
        keys.unlock_plan_repository(plan)
    except KeyRequiredError:
        if required:
            raise


def new_passphrase(args: argparse.Namespace, flag: str, env: str) -> SecretStr:
    """A passphrase to wrap a key with: ``flag`` FILE, ``$env``, or asked twice at a terminal."""
    path = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if path:
        value = keys.read_secret_file(path)
    elif os.environ.get(env):
        value = SecretStr(os.environ[env])
    elif _interactive():
        first = getpass.getpass("new passphrase: ")
        if getpass.getpass("the same again: ") != first:
            raise InvalidInputError("the two passphrases differ; nothing was changed")
        value = SecretStr(first)
    else:
        raise InvalidInputError(f"no passphrase: pass {flag} FILE or set {env}")
    if not value.get_secret_value():
        raise InvalidInputError(f"the passphrase from {flag if path else env} is empty")
    return value


def _encrypted_repo(args: argparse.Namespace) -> tuple[str, keys.KeySource]:
    path = repository_path(repo_arg(args))
    if not keys.is_encrypted(path):
        raise InvalidInputError(
            f"repository {shown_path(repo_arg(args))} is not encrypted: it has no keys "
            "(create an encrypted one with `vmbackup init --encryption`)"
        )
    return path, _prompted(key_source(args))


def _repository_id(path: str) -> str:
    return keys._repository_id(path)


def cmd_key_list(args: argparse.Namespace) -> int:
    path = repository_path(repo_arg(args))
    slots = list(keys.slots_summary(path))
    if not slots and not keys.is_encrypted(path):
        emit(args, [], "the repository is not encrypted: no key slots")
        return 0
    lines = []
    for s in slots:
        if s["kind"] == "passphrase":
            k = s["kdf"]
            params = ", ".join(f"{n}={v}" for n, v in k.items() if n != "name")
            lines.append(f"{s['slot']:<22} passphrase  {s['created']}  {k['name']} ({params})")
        else:
            lines.append(f"{s['slot']:<22} recovery    {s['created']}  X25519 key {s['recovery_key']}")
    emit(args, slots, "\n".join(lines))
    return 0


def cmd_key_add(args: argparse.Namespace) -> int:
    path, source = _encrypted_repo(args)
    master = keys.master_key(path, source)
    rid = _repository_id(path)
    if args.new_recovery_key:
        private = keys.read_recovery_key(args.new_recovery_key)
        from cryptography.hazmat.primitives import serialization

        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        name = keys.add_recovery_slot(path, master, public, rid)
        what = f"recovery key {keys.fingerprint(public)}"
    else:
        name = keys.add_passphrase_slot(
            path, master, new_passphrase(args, "--new-passphrase-file", NEW_PASSPHRASE_ENV), rid
        )
        what = "the new passphrase"
    emit(args, {"added": name}, f"added key slot {name} for {what}")
    return 0


def cmd_key_remove(args: argparse.Namespace) -> int:
    path, source = _encrypted_repo(args)
    # Only someone who can open the repository removes a way to open it.
    slot_opened = keys.unwrap(path, source)[1]
    keys.remove_slot(path, args.slot)
    note = " (the one your key opened)" if slot_opened == args.slot else ""
    emit(args, {"removed": args.slot}, f"removed key slot {args.slot}{note}")
    return 0


def cmd_key_export_recovery(args: argparse.Namespace) -> int:
    path, source = _encrypted_repo(args)
    master = keys.master_key(path, source)
    rid = _repository_id(path)
    private = keys.new_recovery_key()
    fp = keys.write_recovery_key(args.output, private, rid)
    from cryptography.hazmat.primitives import serialization

    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        name = keys.add_recovery_slot(path, master, public, rid)
    except BaseException:
        os.unlink(args.output)  # a recovery key no slot knows would only mislead
        raise
    emit(
        args,
        {"added": name, "recovery_key": fp, "file": shown_path(os.path.abspath(args.output))},
        f"wrote recovery key {fp} to {shown_path(args.output)} and added key slot {name} for it; "
        "keep the file offline (it opens the repository without a passphrase)",
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``vmbackup key ...``: its own group of subcommands."""
    kp = sub.add_parser(
        "key", help="the keys of an encrypted repository", description="the keys of an encrypted repository"
    )
    ksub = kp.add_subparsers(dest="key_command", metavar="KEY_COMMAND")
    ksub.required = True

    def keycmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = ksub.add_parser(name, help=help, description=help)
        sp.add_argument("--repo", help="repository directory (default: $VMBACKUP_REPO)")
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        add_key_arguments(sp)
        sp.set_defaults(func=func)
        return sp

    keycmd("list", cmd_key_list, "list the key slots (no key needed)")
    sp = keycmd("add", cmd_key_add, "add a passphrase (or a recovery key's public half) as a new key slot")
    sp.add_argument(
        "--new-passphrase-file",
        metavar="FILE",
        help=f"the new passphrase (default: ${NEW_PASSPHRASE_ENV}, or asked at a terminal)",
    )
    sp.add_argument(
        "--new-recovery-key",
        metavar="FILE",
        help="add a slot for this recovery key file instead of a passphrase",
    )
    sp = keycmd("remove", cmd_key_remove, "remove a key slot (never the last)")
    sp.add_argument("slot", metavar="SLOT")
    sp = keycmd(
        "export-recovery",
        cmd_key_export_recovery,
        "write a new recovery private key to FILE (keep it offline) and add a slot for it",
    )
    sp.add_argument("output", metavar="FILE", help="where the recovery key goes (must not exist)")
