"""30 VMs over 3 hosts and 2 agents within limits 3 per agent, 2 per host, 2 per datastore."""

from __future__ import annotations

import time

from .conftest import PASSWORD_ENV, backup, base_env, leftovers

LIMITS = {"per_agent": 3, "per_host": 2, "per_datastore": 2, "disks_per_vm": 2}


def test_thirty_vms_never_exceed_any_limit(lab30, state_dir, tmp_path):
    lab = lab30.lab
    agents = lab30.plan_data()["agents"]
    # Two agents over three hosts: each reaches its own host and h3.
    by_host = {a["hosts"][0]: a for a in agents}
    two = [dict(by_host["h1"], hosts=["h1", "h3"]), dict(by_host["h2"], hosts=["h2", "h3"])]
    plan = lab30.write_plan(tmp_path / "plan.yaml", limits=LIMITS, agents=two)
    env = base_env(state_dir)
    env[PASSWORD_ENV] = lab30.password

    lab.reset_counters()
    t0 = time.monotonic()
    rows = backup("--plan", str(plan), env=env)
    elapsed = time.monotonic() - t0
    print(f"30 VMs in {elapsed:.1f} s: {30 * 60 / elapsed:.1f} VMs/min")

    assert len(rows) == 30 and all(r["status"] == "ok" and r["mode"] == "full" for r in rows), rows
    assert {r["agent"] for r in rows} == {a["name"] for a in two}
    counters = lab.status()["counters"]
    snaps, attached = counters["snapshots"], counters["attached_disks"]
    assert sorted(snaps["host"]) == ["h1", "h2", "h3"]
    assert all(c["peak"] <= LIMITS["per_host"] for c in snaps["host"].values()), snaps["host"]
    assert all(c["peak"] <= LIMITS["per_datastore"] for c in snaps["datastore"].values()), snaps["datastore"]
    # Every VM has one disk: attached disks per agent are its VMs at once;
    # the lab counts an attachment on the agent's host (bounded by the agent's
    # limit) and on the disk's datastore.
    assert sorted(attached["agent"]) == sorted(a["name"] for a in two)
    assert all(c["peak"] <= LIMITS["per_agent"] for c in attached["agent"].values()), attached["agent"]
    assert all(c["peak"] <= LIMITS["per_agent"] for c in attached["host"].values()), attached["host"]
    assert all(c["peak"] <= LIMITS["per_datastore"] for c in attached["datastore"].values()), attached["datastore"]
    # VMs did run at once (else the limits above prove nothing).
    assert max(c["peak"] for c in snaps["host"].values()) == LIMITS["per_host"], snaps["host"]
    assert leftovers(lab) == {"counters": {}, "snapshots": {}, "clones": []}
