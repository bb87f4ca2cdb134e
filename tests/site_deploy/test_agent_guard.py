"""A per-agent run takes only its agent, refuses a worker of another agent,
and reads the password from the Secret block a deployment names."""

from __future__ import annotations

import pytest
import yaml
from vmbackup.errors import InvalidInputError
from vmbackup.orchestration.backup_vsphere import AGENT_ENV, AgentMismatchError, _only_agent, _with_secret
from vmbackup.plan import load_plan


@pytest.fixture
def plan(tmp_path):
    data = {
        "connection": {"url": "vc.example.org", "user": "u", "password_env": "PW", "thumbprint": "ab" * 32},
        "repository": str(tmp_path / "repo"),
        "agents": [{"name": "a1", "transports": ["nbd"]}, {"name": "a2", "transports": ["nbd"]}],
        "selection": {"vms": ["*"]},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_plan(path)


def test_only_the_named_agent(plan, monkeypatch):
    monkeypatch.delenv(AGENT_ENV, raising=False)
    assert [a.name for a in _only_agent(plan, None)] == ["a1", "a2"]
    assert [a.name for a in _only_agent(plan, "a2")] == ["a2"]
    with pytest.raises(InvalidInputError, match="no agent named 'a3'"):
        _only_agent(plan, "a3")


def test_a_worker_of_another_agent_refuses(plan, monkeypatch):
    monkeypatch.setenv(AGENT_ENV, "a1")
    assert [a.name for a in _only_agent(plan, "a1")] == ["a1"]
    with pytest.raises(AgentMismatchError, match="serves agent 'a1', not 'a2'"):
        _only_agent(plan, "a2")


def test_password_secret_replaces_the_plans_password_setting(plan):
    assert _with_secret(plan, None) is plan
    conn = _with_secret(plan, "vsphere-password").connection
    assert (conn.password_secret, conn.password_env) == ("vsphere-password", None)
    assert plan.connection.password_env == "PW"  # the loaded plan is unchanged
