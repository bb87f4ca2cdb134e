"""Retention rules, against a model, and `vmbackup prune` end to end."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmbackup import _mover
from vmbackup.errors import InvalidInputError
from vmbackup.retention import NEWEST_GOOD, Policy, apply, apply_guarded, series


@dataclass(frozen=True)
class B:
    id: str
    vm: str
    created_unix: float
    attributes: dict = field(default_factory=dict, hash=False)


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


# --- per VM identity: vm_id where points carry it, else the label -------------

# A point: (label, vm_id or None, time). Labels and ids are drawn from small
# sets so that one name has several ids (two VMs of one name) and one id
# several names (a renamed VM).
points = st.lists(
    st.tuples(
        st.sampled_from(["web", "db"]),
        st.sampled_from([None, "uuid-1", "uuid-2", "uuid-3"]),
        st.integers(1_600_000_000, 1_700_000_000),
    ),
    max_size=40,
)


def _identified(ps):
    return [
        B(f"{i:04d}", vm, t, {"vm_id": vid} if vid else {"tool": "vmbackup backup-disk"})
        for i, (vm, vid, t) in enumerate(ps)
    ]


def _owner(b):
    return ("id", b.attributes["vm_id"]) if b.attributes.get("vm_id") else ("label", b.vm)


@given(points, st.integers(1, 4), st.integers(0, 3))
def test_each_vm_id_is_one_series_whatever_its_labels_and_points_without_one_go_by_label(ps, last, daily):
    backups = _identified(ps)
    decisions = apply(Policy(last=last, daily=daily), backups)
    assert sorted(d.backup.id for d in decisions) == sorted(b.id for b in backups)
    owners = {_owner(b) for b in backups}
    # One series per VM identity, no more, no fewer.
    assert len({d.series for d in decisions}) == len(owners)
    for owner in owners:
        mine = [d for d in decisions if _owner(d.backup) == owner]
        assert len({d.series for d in mine}) == 1
        newest_first = sorted(mine, key=lambda d: (d.backup.created_unix, d.backup.id), reverse=True)
        # Contiguous, newest first, and keep-last counts this VM's points only.
        assert [d.backup.id for d in mine] == [d.backup.id for d in newest_first]
        assert [d for d in mine if "last" in d.reasons] == newest_first[:last]
        assert newest_first[0].keep


@given(points)
def test_keep_last_1_keeps_exactly_one_point_of_every_vm(ps):
    backups = _identified(ps)
    kept = [d.backup for d in apply(Policy(last=1), backups) if d.keep]
    assert sorted(_owner(b) for b in kept) == sorted({_owner(b) for b in backups})


@given(points, st.sets(st.integers(0, 39)))
def test_the_newest_good_point_of_every_vm_is_kept_even_among_same_named_vms(ps, broken):
    backups = _identified(ps)
    damaged = {b.id: "missing chunk" for i, b in enumerate(backups) if i in broken}
    decisions = apply_guarded(Policy(last=1), backups, damaged)
    for owner in {_owner(b) for b in backups}:
        mine = [d for d in decisions if _owner(d.backup) == owner]
        good = [d for d in mine if d.good]
        if good:
            assert good[0].keep  # newest first: the VM's newest good point
            assert all(NEWEST_GOOD not in d.reasons for d in mine if d is not good[0])


def test_series_names_the_id_or_the_label():
    assert series(B("1", "web", 1.0, {"vm_id": "u-1"})) == "vm_id u-1"
    assert series(B("2", "web", 1.0, {"vm_id": ""})) == "vm web"
    assert series(B("3", "web", 1.0)) == "vm web"


def _point(repo, disk, vm, attributes):
    """A real point in ``repo`` labelled ``vm`` with these attributes (what
    the hypervisors' procedure writes, reduced to what retention reads)."""
    session = _mover.BackupSession(str(repo), vm, None)
    session.add_disk(str(disk), "scsi0:0", None, None)
    return session.commit(attributes=json.dumps(attributes)).id


def test_prune_counts_two_vms_of_one_name_apart_and_a_renamed_vm_as_one(cli, tmp_path):
    disk = tmp_path / "d"
    disk.write_bytes(os.urandom(200_000))
    # Two VMs named web01 on two hosts; each has one point and must keep it.
    a = _point(cli.repo, disk, "web01", {"vm": "web01", "vm_id": "uuid-a", "host": "esx1"})
    b = _point(cli.repo, disk, "web01", {"vm": "web01", "vm_id": "uuid-b", "host": "esx2"})
    # A VM renamed from app to app-new: its full under the old label, an
    # incremental that kept the chain's label, and a full under the new one.
    old_full = _point(cli.repo, disk, "app", {"vm": "app", "vm_id": "uuid-c"})
    old_incr = _point(cli.repo, disk, "app", {"vm": "app-new", "vm_id": "uuid-c"})
    new_full = _point(cli.repo, disk, "app-new", {"vm": "app-new", "vm_id": "uuid-c"})
    # A point without an id (backup-disk) is its label's own VM.
    plain = cli.json("backup-disk", "--vm", "web01", str(disk))["id"]

    dry = cli.json("prune", "--keep-last", "1", "--dry-run")
    kept = {k["id"]: k for k in dry["kept"]}
    assert sorted(kept) == sorted([a, b, new_full, plain])
    assert (kept[a]["vm_id"], kept[b]["vm_id"], kept[plain]["vm_id"]) == ("uuid-a", "uuid-b", None)
    assert sorted(r["id"] for r in dry["removed"]) == sorted([old_full, old_incr])

    # --vm by either name prunes the renamed VM over all its points.
    for name in ("app", "app-new"):
        only = cli.json("prune", "--keep-last", "1", "--vm", name, "--dry-run")
        assert [k["id"] for k in only["kept"]] == [new_full]
        assert sorted(r["id"] for r in only["removed"]) == sorted([old_full, old_incr])

    cli.json("prune", "--keep-last", "1")
    assert sorted(s["id"] for s in cli.json("snapshots")) == sorted([a, b, new_full, plain])
