"""The plan's `copy:` section: what it accepts, what it refuses in one line, and
the warning when its locks are shorter than the retention's reach."""

from __future__ import annotations

import pytest
from vmbackup.copy import parse_url
from vmbackup.errors import InvalidInputError
from vmbackup.plan import parse_plan, resolve_copy_credentials

BASE = {
    "connection": {"url": "vc.example", "user": "u", "password_env": "P", "thumbprint": "ab" * 32},
    "repository": "/srv/repo",
    "agents": [{"name": "a1"}],
    "selection": {"vms": ["*"]},
}
COPY = {"bucket": "offsite-1", "prefix": "/site1/repo/", "object_lock": {"days": 35}}


def plan(**copy):
    return parse_plan({**BASE, "copy": {**COPY, **copy}})


def test_a_copy_section_is_read_with_its_defaults():
    c = plan().copy_
    assert (c.bucket, c.prefix, c.endpoint, c.workers) == ("offsite-1", "site1/repo", None, 8)
    assert (c.object_lock.mode, c.object_lock.days, c.object_lock.generation_days) == ("compliance", 35, 10)
    assert c.url == "s3://offsite-1/site1/repo"
    assert parse_plan(BASE).copy_ is None


@pytest.mark.parametrize(
    "copy, message",
    [
        ({"bucket": "A_B"}, "copy.bucket: 'A_B' is not a bucket name"),
        ({"object_lock": {"days": 0}}, "copy.object_lock.days: input should be greater than or equal to 1"),
        ({"object_lock": {"days": 3, "mode": "governance"}}, "copy.object_lock.mode: 'governance' is not one of"),
        ({"access_key_env": "A"}, "copy: give both access_key_env and secret_key_env"),
        (
            {"access_key_env": "A", "secret_key_env": "B", "credentials_secret": "s"},
            "copy: give access_key_env and secret_key_env, or credentials_secret, not both",
        ),
        ({"endpoint": "ftp://x"}, "copy.endpoint: 'ftp://x' must be an http(s) URL"),
        ({"secret_key": "inline"}, "copy.secret_key: is not a known field"),
    ],
)
def test_a_bad_copy_section_is_one_line(copy, message):
    with pytest.raises(InvalidInputError) as e:
        plan(**copy)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_locks_shorter_than_the_retention_s_reach_are_warned_about():
    p = parse_plan({**BASE, "retention": {"daily": 7, "weekly": 8}, "copy": COPY})
    (w,) = p.copy_warnings()
    assert "retention keeps backups up to 56 days" in w and "at least 56" in w
    p = parse_plan({**BASE, "retention": {"daily": 7, "weekly": 4}, "copy": COPY})
    assert p.copy_warnings() == []


def test_credentials_come_from_the_environment_never_the_plan(monkeypatch):
    c = plan(access_key_env="VMB_T_AK", secret_key_env="VMB_T_SK").copy_
    monkeypatch.delenv("VMB_T_SK", raising=False)
    monkeypatch.setenv("VMB_T_AK", "AK")
    with pytest.raises(InvalidInputError, match="copy.secret_key_env: the environment variable VMB_T_SK is not set"):
        resolve_copy_credentials(c)
    monkeypatch.setenv("VMB_T_SK", "very-secret")
    ak, sk = resolve_copy_credentials(c)
    assert ak.get_secret_value() == "AK" and "very-secret" not in repr(sk)


@pytest.mark.parametrize("url", ["s3://", "s3://AB/x", "s3:/b/x", "b/x"])
def test_a_bad_s3_url_is_bad_input(url):
    with pytest.raises(InvalidInputError):
        parse_url(url)


def test_vmbackup_copy_refuses_a_plan_without_copy_or_credentials_before_any_server(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    def copy(data: dict, **env: str) -> subprocess.CompletedProcess:
        plan = tmp_path / "plan.yaml"
        plan.write_text(yaml.safe_dump(data))
        e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VMB_T_"))}
        e.update(env, VMBACKUP_STATE_DIR=str(tmp_path / "state"))
        return subprocess.run(
            [sys.executable, "-m", "vmbackup", "copy", "--plan", str(plan)], capture_output=True, text=True, env=e
        )

    p = copy(BASE)
    assert (p.returncode, p.stderr) == (
        2,
        f"vmbackup: error: plan {tmp_path / 'plan.yaml'} has no copy: section (bucket, object_lock, ...)\n",
    )
    p = copy({**BASE, "copy": {**COPY, "access_key_env": "VMB_T_AK", "secret_key_env": "VMB_T_SK"}}, VMB_T_AK="x")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "copy.secret_key_env: the environment variable VMB_T_SK is not set" in p.stderr
    assert not (tmp_path / "state").exists()  # no server was started


def test_the_drill_record_is_copied_with_the_repository(tmp_path):
    """drills.json (the drills' rotation, docs/format.md §1) is one of the
    repository's other files: the copy holds it, beside config.json."""
    from pathlib import Path

    from vmbackup import _mover
    from vmbackup.copy import repository_files
    from vmbackup.orchestration.restore_input import DRILL_STATE, load_drill_state, save_drill_state

    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    record = {"web01": {"unix": 1.0, "point": "p1", "passed": True, "run": "r1"}}
    save_drill_state(str(repo), record)
    files = {f.rel: f.kind for f in repository_files(Path(repo))}
    assert files[DRILL_STATE] == "meta" and files["config.json"] == "meta"
    assert not any(rel.startswith(".") for rel in files)  # never the record's temporary
    assert load_drill_state(str(repo)) == record
