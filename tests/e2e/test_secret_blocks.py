"""The plan's Prefect Secret blocks for the repository and the copy, on the
real server `vmbackup` runs its flows on: ``passphrase_secret`` (the
passphrase of an encrypted repository) and ``copy.credentials_secret`` (the
copy's S3 access key and secret key, a JSON object). With the block saved,
`vmbackup backup` and `vmbackup copy` work with nothing in the environment;
a block that does not exist is one line naming the plan's field (exit 2),
and nothing is backed up or copied."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pydantic
import yaml
from vmbackup import copy as s3copy
from vmbackup import keys

from .conftest import backup, run
from .test_hyperv import _api

PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"
SAVE_BLOCK = (
    "import json,os,sys; from prefect.blocks.system import Secret; "
    "v=os.environ['VALUE']; Secret(value=json.loads(v) if sys.argv[2]=='json' else v).save(sys.argv[1])"
)


def _save_block(env: dict[str, str], name: str, value: str, kind: str = "text") -> None:
    """A Secret block on the server of ``env``, saved as a site's admin does (its value never an argument)."""
    s = subprocess.run(
        [sys.executable, "-c", SAVE_BLOCK, name, kind],
        env=dict(env, PREFECT_API_URL=_api(env), VALUE=value),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert s.returncode == 0, s.stderr


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI:")]


def _one_vm_plan(small_lab, path: Path, **changes) -> tuple[Path, str]:
    """The lab's plan for its smallest VM only, with ``changes``; the VM's name."""
    vm = "app01"  # tests/e2e/topology.json: one 16 MiB disk
    data = small_lab.plan_data()
    data.update(selection={"vms": [vm]}, **{k: str(v) if isinstance(v, Path) else v for k, v in changes.items()})
    for k in [k for k, v in changes.items() if v is None]:
        data.pop(k)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, vm


def _name_block(plan: Path, name: str) -> None:
    data = yaml.safe_load(plan.read_text())
    data["passphrase_secret"] = name
    plan.write_text(yaml.safe_dump(data, sort_keys=False))


def test_passphrase_from_a_secret_block_and_a_missing_block_is_one_line(small_lab, env, tmp_path):
    """`init --plan` and `backup --plan` read the passphrase from the block on
    the server the flows use (the commands' own server, as the site's)."""
    passphrase = secrets.token_urlsafe(16)
    repo = tmp_path / "repo"
    block = f"passphrase-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in env.items() if k != PASSPHRASE_ENV}  # only the block holds it
    plan, vm = _one_vm_plan(
        small_lab, tmp_path / "plan.yaml", repository=repo, passphrase_secret="no-such-block-e2e", encryption=None
    )
    missing = "vmbackup: error: passphrase_secret: there is no Secret block named 'no-such-block-e2e'"

    p = run("init", "--plan", str(plan), env=env, expect=2)
    assert p.stdout == "" and _errors(p) == [missing] and not repo.exists(), p.stderr
    _save_block(env, block, passphrase)
    _name_block(plan, block)
    out = json.loads(run("init", "--plan", str(plan), "--json", env=env).stdout)
    assert out["encrypted"] is True and keys.is_encrypted(repo), out
    # the slot opens with the block's passphrase
    assert keys.unwrap(repo, keys.KeySource(passphrase=pydantic.SecretStr(passphrase), where="test"))[0]

    _name_block(plan, "no-such-block-e2e")
    p = run("backup", "--plan", str(plan), "--json", env=env, expect=2)
    assert p.stdout == "" and _errors(p) == [missing], p.stderr
    assert not list(repo.glob("backups/*")), "a backup was written without the passphrase"

    _name_block(plan, block)
    rows = backup("--plan", str(plan), env=env)
    assert [(r["vm"], r["status"]) for r in rows] == [(vm, "ok")], rows
    # The backup is in the encrypted repository, readable with the passphrase the block holds.
    listed = json.loads(run("snapshots", "--repo", str(repo), "--json", env=env | {PASSPHRASE_ENV: passphrase}).stdout)
    assert [b["id"] for b in listed] == [rows[0]["backup_id"]], listed
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert passphrase.encode() not in f.read_bytes(), f


def test_copy_credentials_from_a_secret_block_and_a_missing_block_is_one_line(small_lab, env, tmp_path):
    s3 = small_lab.summary["s3"]
    assert s3, small_lab.summary
    repo = tmp_path / "repo"
    from vmbackup import _mover

    _mover.init_repository(str(repo))
    prefix = f"secret-{uuid.uuid4().hex[:8]}"
    block = f"s3-credentials-{uuid.uuid4().hex[:8]}"
    copy = {k: v for k, v in small_lab.plan_data()["copy"].items() if not k.endswith("_key_env")}
    copy.update(prefix=prefix, credentials_secret="no-such-block-e2e")
    plan, vm = _one_vm_plan(small_lab, tmp_path / "plan.yaml", repository=repo, copy=copy)
    # nothing of S3 in the environment: the endpoint is the plan's, the keys only the block's
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | {
        "AWS_DEFAULT_REGION": "us-east-1",
        "VMBACKUP_CACHE_DIR": str(tmp_path / "cache"),
    }
    rows = backup("--plan", str(plan), env=env)
    assert [(r["vm"], r["status"]) for r in rows] == [(vm, "ok")], rows

    p = run("copy", "--plan", str(plan), "--json", env=env, expect=2)
    assert p.stdout == "" and _errors(p) == [
        "vmbackup: error: copy.credentials_secret: there is no Secret block named 'no-such-block-e2e'"
    ], p.stderr
    t = s3copy.Target(
        s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"), s3["bucket"], prefix
    )
    assert s3copy.list_versions(t)[0] == {}, "the copy wrote something without its credentials"

    _save_block(env, block, json.dumps({"access_key": s3["access_key"], "secret_key": s3["secret_key"]}), "json")
    plan.write_text(plan.read_text().replace("no-such-block-e2e", block))
    out = json.loads(run("copy", "--plan", str(plan), "--json", env=env).stdout)
    assert out["backups"] == 1 and out["uploaded"] == out["objects"] > 1, out
    assert set(s3copy.read_index(t)["objects"]) <= set(s3copy.list_versions(t)[0]), out
