"""The command line of encrypted repositories: init --encryption, the key
commands, passphrases from VMBACKUP_PASSPHRASE or --passphrase-file, a wrong
one as one line (exit 2), a recovery key, and no passphrase anywhere it
should not be."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading

from conftest import Cli, MiB
from vmbackup import _mover


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VMBACKUP_PASSPHRASE", "VMBACKUP_NEW_PASSPHRASE")}
    return env | extra


def _one_line(p: subprocess.CompletedProcess, words: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert p.stdout == ""


def test_bare_init_stays_unencrypted_and_recommends_encryption(tmp_path):
    cli = Cli(tmp_path / "repo")
    p = cli.run("init", "--json", env=_env())
    assert "vmbackup: note: this repository is not encrypted" in p.stderr
    assert p.stderr.count("\n") == 1
    assert '"encrypted": false' in p.stdout
    assert not (tmp_path / "repo" / "keys").exists()
    p = Cli(tmp_path / "quiet").run("init", "--no-encryption", env=_env())
    assert p.stderr == "" and "not encrypted" in p.stdout


def test_init_encryption_without_a_passphrase_is_one_line_and_makes_nothing(tmp_path):
    cli = Cli(tmp_path / "repo")
    _one_line(cli.run("init", "--encryption", expect=2, env=_env()), "no passphrase")
    _one_line(
        cli.run("init", "--encryption", "--passphrase-file", str(tmp_path / "nope"), expect=2, env=_env()),
        "cannot read passphrase file",
    )
    (tmp_path / "empty").write_text("\n")
    _one_line(
        cli.run("init", "--encryption", "--passphrase-file", str(tmp_path / "empty"), expect=2, env=_env()),
        "is empty",
    )
    _one_line(cli.run("init", "--encryption", "--no-encryption", expect=2, env=_env()), "not allowed with")
    assert not (tmp_path / "repo").exists()


def test_key_commands_on_an_unencrypted_repository(tmp_path):
    cli = Cli(tmp_path / "repo")
    cli.run("init", env=_env())
    assert cli.json("key", "list", "--repo", str(cli.repo)) == []
    _one_line(
        cli.run("key", "remove", "--repo", str(cli.repo), "passphrase-00000000", expect=2, env=_env()),
        "is not encrypted",
    )
    _one_line(
        cli.run("key", "export-recovery", "--repo", str(cli.repo), str(tmp_path / "rk"), expect=2, env=_env()),
        "is not encrypted",
    )
    assert not (tmp_path / "rk").exists()
    # the passphrase options are accepted and ignored
    assert cli.json("snapshots", env=_env(VMBACKUP_PASSPHRASE="whatever")) == []


def test_an_encrypted_repository_end_to_end(tmp_path):
    cli = Cli(tmp_path / "repo")
    pw = tmp_path / "pw"
    pw.write_text("first passphrase\n")
    created = cli.json("init", "--encryption", "--passphrase-file", str(pw), env=_env())
    assert created["encrypted"] is True and len(created["key_slots"]) == 1
    assert _mover.open_repository(str(cli.repo)).encrypted
    disk = tmp_path / "disk.img"
    data = os.urandom(3 * MiB) + bytes(MiB) + b"known block" * 1000
    disk.write_bytes(data)
    key = {"VMBACKUP_PASSPHRASE": "first passphrase"}
    bid = cli.json("backup-disk", "--vm", "v", str(disk), env=_env(**key))["id"]

    # without a passphrase, with a wrong one: one line, exit 2, never the passphrase
    _one_line(cli.run("snapshots", expect=2, env=_env()), "is encrypted")
    p = cli.run("restore-disk", bid, str(tmp_path / "out"), expect=2, env=_env(VMBACKUP_PASSPHRASE="wrong-pass"))
    _one_line(p, "opens no key slot")
    assert "wrong-pass" not in p.stderr and not (tmp_path / "out").exists()

    # the right one restores byte for byte, from the file or the environment
    cli.run("restore-disk", "--passphrase-file", str(pw), bid, str(tmp_path / "out"), env=_env())
    assert (tmp_path / "out").read_bytes() == data
    assert [s["id"] for s in cli.json("snapshots", env=_env(**key))] == [bid]

    # verify without the key checks what it can, and says so; with it, everything
    p = cli.run("verify", "--read-data", env=_env())
    assert "without the key" in p.stdout
    assert cli.json("verify", "--read-data", env=_env())["with_key"] is False
    assert cli.json("verify", "--read-data", env=_env(**key))["with_key"] is True

    # a second passphrase, a recovery key; the first passphrase removed
    first = cli.json("key", "list", "--repo", str(cli.repo), env=_env())[0]["slot"]
    added = cli.json(
        "key", "add", "--repo", str(cli.repo), env=_env(**key, VMBACKUP_NEW_PASSPHRASE="second passphrase")
    )["added"]
    rk = tmp_path / "recovery.key"
    rec = cli.json(
        "key", "export-recovery", "--repo", str(cli.repo), str(rk), env=_env(VMBACKUP_PASSPHRASE="second passphrase")
    )
    assert oct(rk.stat().st_mode & 0o777) == "0o600"
    assert {s["slot"] for s in cli.json("key", "list", "--repo", str(cli.repo), env=_env())} == {
        first,
        added,
        rec["added"],
    }
    cli.run("key", "remove", "--repo", str(cli.repo), first, env=_env(VMBACKUP_PASSPHRASE="second passphrase"))
    _one_line(cli.run("snapshots", expect=2, env=_env(**key)), "opens no key slot")
    assert cli.json("snapshots", env=_env(VMBACKUP_PASSPHRASE="second passphrase"))[0]["id"] == bid

    # every passphrase lost: the recovery key restores and sets a new passphrase
    cli.run("key", "remove", "--repo", str(cli.repo), added, env=_env(VMBACKUP_PASSPHRASE="second passphrase"))
    cli.run("restore-disk", "--force", "--recovery-key", str(rk), bid, str(tmp_path / "out"), env=_env())
    assert (tmp_path / "out").read_bytes() == data
    cli.run("key", "add", "--repo", str(cli.repo), "--recovery-key", str(rk), env=_env(VMBACKUP_NEW_PASSPHRASE="third"))
    assert cli.json("snapshots", env=_env(VMBACKUP_PASSPHRASE="third"))[0]["id"] == bid
    # ...and the last slot is never removed
    (slot,) = [
        s["slot"] for s in cli.json("key", "list", "--repo", str(cli.repo), env=_env()) if s["kind"] == "passphrase"
    ]
    cli.run("key", "remove", "--repo", str(cli.repo), rec["added"], env=_env(VMBACKUP_PASSPHRASE="third"))
    _one_line(
        cli.run("key", "remove", "--repo", str(cli.repo), slot, expect=2, env=_env(VMBACKUP_PASSPHRASE="third")), "last"
    )


def test_a_canary_passphrase_appears_nowhere(tmp_path):
    """In no output of any command, no file of the repository or the
    temporary directory, and no process listing while the commands run."""
    canary = "canary" + secrets.token_hex(10)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cli = Cli(tmp_path / "repo")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(2 * MiB))
    samples: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outputs = []
    try:
        env = _env(VMBACKUP_PASSPHRASE=canary, TMPDIR=str(tmp))
        for args, rc in [
            (["init", "--encryption"], 0),
            (["backup-disk", "--vm", "v", str(disk)], 0),
            (["snapshots"], 0),
            (["verify", "--read-data"], 0),
            (["key", "list", "--repo", str(cli.repo)], 0),
            (["key", "export-recovery", "--repo", str(cli.repo), str(tmp_path / "rk")], 0),
        ]:
            p = cli.run(*args, "--json", expect=rc, env=env)
            outputs += [p.stdout, p.stderr]
        wrong = _env(VMBACKUP_PASSPHRASE=canary + "-wrong", TMPDIR=str(tmp))
        p = cli.run("snapshots", expect=2, env=wrong)
        outputs += [p.stdout, p.stderr]
        p = cli.run(
            "key", "add", "--repo", str(cli.repo), expect=0, env=env | {"VMBACKUP_NEW_PASSPHRASE": canary + "-new"}
        )
        outputs += [p.stdout, p.stderr]
    finally:
        stop.set()
        sampler.join()
    assert samples
    assert not [o for o in outputs + samples if canary in o]
    for root in (cli.repo, tmp):
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                assert canary.encode() not in open(os.path.join(dirpath, f), "rb").read(), f


def test_no_passphrase_on_a_command_line_is_needed(tmp_path):
    """Every command that opens a repository takes the passphrase from a file
    or the environment, never as an argument value."""
    p = subprocess.run([sys.executable, "-m", "vmbackup", "restore-disk", "--help"], capture_output=True, text=True)
    assert "--passphrase-file FILE" in p.stdout and "--passphrase " not in p.stdout
