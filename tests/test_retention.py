"""Retention rules, against a model, and `vmbackup prune` end to end."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmbackup.errors import InvalidInputError
from vmbackup.retention import Policy, apply


@dataclass(frozen=True)
class B:
    id: str
    vm: str
    created_unix: float


def _backups(times, vms=("a", "b")):
    return [B(f"{i:04d}", vms[i % len(vms)], t) for i, t in enumerate(times)]


times = st.lists(st.integers(1_600_000_000, 1_700_000_000), min_size=0, max_size=60)


@given(times, st.integers(0, 5), st.integers(0, 5), st.integers(0, 3))
def test_rules_match_their_definition(ts, last, daily, monthly):
    policy = Policy(last=last, daily=daily, monthly=monthly, yearly=1)
    decisions = apply(policy, _backups(ts))
    assert len(decisions) == len(ts)
    for vm in ("a", "b"):
        mine = [d for d in decisions if d.backup.vm == vm]
        newest_first = sorted(mine, key=lambda d: (d.backup.created_unix, d.backup.id), reverse=True)
        assert [d.backup.id for d in mine] == [d.backup.id for d in newest_first]
        # last: exactly the newest N
        assert [d for d in mine if "last" in d.reasons] == newest_first[:last]

        # daily: the newest backup of each of the newest N days that have one
        def day(d):
            return datetime.fromtimestamp(d.backup.created_unix, tz=UTC).date()

        days = []
        for d in newest_first:
            if day(d) not in days:
                days.append(day(d))
        expect = [next(d for d in newest_first if day(d) == x) for x in days[:daily]]
        assert [d for d in mine if "daily" in d.reasons] == expect
        # yearly=1 always keeps the newest backup of the VM
        if mine:
            assert newest_first[0].keep


def test_empty_policy_and_negative_counts_are_refused():
    with pytest.raises(InvalidInputError):
        apply(Policy(), [])
    with pytest.raises(InvalidInputError):
        Policy(daily=-1)


def test_prune_cli_dry_run_then_for_real(cli, tmp_path):
    disk = tmp_path / "d"
    disk.write_bytes(os.urandom(300_000))
    ids = {vm: [cli.json("backup-disk", "--vm", vm, str(disk))["id"] for _ in range(3)] for vm in ("x", "y")}
    dry = cli.json("prune", "--keep-last", "1", "--dry-run")
    assert dry["dry_run"] is True
    assert sorted(k["id"] for k in dry["kept"]) == sorted([ids["x"][-1], ids["y"][-1]])
    assert sorted(r["id"] for r in dry["removed"]) == sorted(ids["x"][:2] + ids["y"][:2])
    assert len(cli.json("snapshots")) == 6
    only_x = cli.json("prune", "--keep-last", "2", "--vm", "x")
    assert [r["id"] for r in only_x["removed"]] == ids["x"][:1]
    assert sorted(b["id"] for b in cli.json("snapshots")) == sorted(ids["x"][1:] + ids["y"])
