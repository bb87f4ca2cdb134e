"""Wrong password, untrusted certificate, unknown VM: one clear line, no traceback, no password."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import PASSWORD_ENV, run


def _other_ca(tmp_path) -> str:
    path = tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not the lab",
         "-keyout", str(tmp_path / "other-ca.key"), "-out", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    "case, expect, message",
    [
        ("password", 1, "refused user administrator@vsphere.local: wrong user name or password"),
        ("certificate", 1, "is not trusted by"),
        ("vm", 2, "VM nosuch does not exist"),
    ],
)
def test_one_clear_line(small_lab, env, tmp_path, case, expect, message):
    plan, args = small_lab.plan, []
    if case == "password":
        env[PASSWORD_ENV] = "not-the-password-4711"
    elif case == "certificate":
        data = small_lab.plan_data()
        plan = small_lab.write_plan(
            tmp_path / "plan.yaml", connection=dict(data["connection"], ca_file=_other_ca(tmp_path))
        )
    else:
        args = ["--vm", "nosuch"]

    def touched():  # snapshots, attached disks...; not the API calls (the login is one)
        return {k: v for k, v in small_lab.lab.status()["counters"].items() if k != "api_calls"}

    before = touched()
    p = run("backup", "--plan", str(plan), *args, "--json", env=env, expect=expect)
    errors = [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI:")]
    assert len(errors) == 1 and errors[0].startswith("vmbackup: error: ") and message in errors[0], p.stderr
    assert p.stdout == ""
    for secret in (small_lab.password, env[PASSWORD_ENV]):
        assert secret not in p.stdout + p.stderr
    assert touched() == before  # nothing was touched
