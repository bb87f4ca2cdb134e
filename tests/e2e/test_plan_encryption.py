"""A plan's ``encryption`` (docs/plan.md): `vmbackup init --plan FILE` makes
the plan's repository encrypted unless the plan says ``encryption: none``;
a plan left at the default that points at an existing unencrypted
repository is backed up all the same, but `vmbackup backup` says on stderr,
and the run's summary artifact at its top, that the repository is not
encrypted and what to do; ``encryption: none`` silences it."""

from __future__ import annotations

import json
import secrets

import yaml
from vmbackup import _mover, keys

from .conftest import run
from .test_hyperv import _artifacts, _runs_of

PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"
VM = "app01"  # tests/e2e/topology.json: one 16 MiB disk


def _plan(small_lab, path, repo, **changes):
    data = small_lab.plan_data()
    data.pop("encryption", None)  # the default: encrypted
    data.update(repository=str(repo), selection={"vms": [VM]}, **changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_init_plan_creates_the_repository_encrypted_by_default_and_plain_with_encryption_none(small_lab, tmp_path):
    passphrase = secrets.token_urlsafe(16)
    env = {k: v for k, v in small_lab.env(tmp_path / "state").items() if k != PASSPHRASE_ENV}

    enc = tmp_path / "enc"
    plan = _plan(small_lab, tmp_path / "enc.yaml", enc, passphrase_env="MY_PASSPHRASE")
    # The default wants a passphrase: without one, one line, nothing made.
    p = run("init", "--plan", str(plan), env=env, expect=2)
    assert p.stderr.count("\n") == 1 and "passphrase_env: the environment variable MY_PASSPHRASE" in p.stderr
    assert not enc.exists() or not any(enc.iterdir())
    out = json.loads(run("init", "--plan", str(plan), "--json", env=env | {"MY_PASSPHRASE": passphrase}).stdout)
    assert out["encrypted"] is True and out["path"] == str(enc) and len(out["key_slots"]) == 1, out
    assert keys.is_encrypted(enc) and [s["kind"] for s in keys.slots_summary(enc)] == ["passphrase"]
    # It opens with that passphrase, and with no other.
    run("snapshots", "--repo", str(enc), env=env | {PASSPHRASE_ENV: passphrase})
    p = run("snapshots", "--repo", str(enc), env=env | {PASSPHRASE_ENV: passphrase + "x"}, expect=2)
    assert "opens no key slot" in p.stderr and passphrase not in p.stderr

    plain = tmp_path / "plain"
    plan = _plan(small_lab, tmp_path / "plain.yaml", plain, encryption="none")
    p = run("init", "--plan", str(plan), "--json", env=env)
    out = json.loads(p.stdout)
    assert out["encrypted"] is False and "key_slots" not in out and out["path"] == str(plain), out
    assert not keys.is_encrypted(plain) and list(keys.slots_summary(plain)) == []
    assert "not encrypted" not in p.stderr, p.stderr  # the plan chose it: no note


def test_an_unencrypted_repository_the_plan_wants_encrypted_is_backed_up_with_a_warning(small_lab, env, tmp_path):
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    warning = (
        f"vmbackup: warning: repository {repo} is not encrypted; the plan asks for encryption: "
        "see `vmbackup init --plan FILE` to create an encrypted repository"
    )

    plan = _plan(small_lab, tmp_path / "plan.yaml", repo)
    p = run("backup", "--plan", str(plan), "--json", env=env)
    rows = json.loads(p.stdout)["vms"]
    assert [(r["vm"], r["status"]) for r in rows] == [(VM, "ok")], rows  # never a failure
    said = [line for line in p.stderr.splitlines() if "not encrypted" in line]
    assert len(said) == 1 and said[0].startswith(warning) and "encryption: none" in said[0], p.stderr
    (flow_run,) = _runs_of(env, "backup_vms", plan)
    summary = _artifacts(env, flow_run["id"])["vmbackup-backup-summary"]["data"]
    assert f"**Warning:** repository {repo} is not encrypted; the plan asks for encryption" in summary, summary
    assert not keys.is_encrypted(repo)  # the repository is what it was made

    quiet = _plan(small_lab, tmp_path / "quiet.yaml", repo, encryption="none")
    p = run("backup", "--plan", str(quiet), "--json", env=env)
    assert [r["status"] for r in json.loads(p.stdout)["vms"]] == ["ok"]
    assert "not encrypted" not in p.stderr, p.stderr
    (flow_run,) = _runs_of(env, "backup_vms", quiet)
    assert "Warning" not in _artifacts(env, flow_run["id"])["vmbackup-backup-summary"]["data"]
