"""Retention that never removes the only good backup, and the verify sample
(plain Python, property-tested against their definitions)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmbackup.errors import InvalidInputError
from vmbackup.retention import NEWEST_GOOD, Policy, apply, apply_guarded
from vmbackup.sampling import Sample, choose_sample, parse_sample


@dataclass(frozen=True)
class B:
    id: str
    vm: str
    created_unix: float


backups_st = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1_600_000_000, 1_600_000_000 + 90 * 86400), st.booleans()),
    max_size=40,
)
policy_st = st.builds(
    Policy,
    last=st.integers(0, 3),
    hourly=st.integers(0, 3),
    daily=st.integers(0, 3),
    weekly=st.integers(0, 2),
    monthly=st.integers(0, 2),
    yearly=st.integers(0, 1),
).filter(lambda p: not p.empty())


def _make(items):
    bs = [B(f"{i:04d}", vm, t) for i, (vm, t, _) in enumerate(items)]
    damaged = {b.id: "chunk X is corrupt" for b, (_, _, bad) in zip(bs, items, strict=True) if bad}
    return bs, damaged


@given(backups_st, policy_st)
def test_the_newest_good_backup_of_every_vm_is_kept(items, policy):
    bs, damaged = _make(items)
    decisions = apply_guarded(policy, bs, damaged)
    assert sorted(d.backup.id for d in decisions) == sorted(b.id for b in bs)
    for vm in {b.vm for b in bs}:
        good = [b for b in bs if b.vm == vm and b.id not in damaged]
        kept_good = [d for d in decisions if d.backup.vm == vm and d.keep and d.good]
        if good:
            # never removes the only (or the newest) good backup
            newest = max(good, key=lambda b: (b.created_unix, b.id))
            assert newest.id in {d.backup.id for d in kept_good}
        # damaged backups are never counted as good
        assert all(d.backup.id not in damaged for d in kept_good)
        assert all(d.damaged == damaged[d.backup.id] for d in decisions if not d.good)


@given(backups_st, policy_st)
def test_the_guard_only_adds_to_what_the_policy_keeps(items, policy):
    bs, damaged = _make(items)
    plain = {d.backup.id: d.reasons for d in apply(policy, bs)}
    for d in apply_guarded(policy, bs, damaged):
        extra = [r for r in d.reasons if r not in plain[d.backup.id]]
        assert extra in ([], [NEWEST_GOOD])
        if extra:
            assert plain[d.backup.id] == [] and d.good
    if not damaged:  # with nothing damaged it is exactly the policy
        assert {d.backup.id: d.reasons for d in apply_guarded(policy, bs, damaged)} == plain


def test_newest_damaged_keeps_the_last_good_and_says_why():
    bs = [B("1", "a", 100.0), B("2", "a", 200.0), B("3", "a", 300.0)]
    out = {d.backup.id: d for d in apply_guarded(Policy(last=1), bs, {"2": "bad", "3": "bad"})}
    assert out["3"].reasons == ["last"] and not out["3"].good
    assert out["2"].reasons == [] and not out["2"].keep
    assert out["1"].reasons == [NEWEST_GOOD] and out["1"].good


@given(
    st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 10_000)), max_size=60),
    st.one_of(
        st.integers(1, 70).map(lambda n: Sample(count=n)), st.floats(0.01, 1.0).map(lambda f: Sample(fraction=f))
    ),
    st.integers(0, 2**32),
)
def test_the_sample_has_every_vms_newest_and_the_size_asked(items, sample, seed):
    bs = [B(f"{i:04d}", vm, float(t)) for i, (vm, t) in enumerate(items)]
    ids = choose_sample(bs, sample, random.Random(seed))
    assert len(ids) == len(set(ids)) and set(ids) <= {b.id for b in bs}
    newest = {
        vm: max((b for b in bs if b.vm == vm), key=lambda b: (b.created_unix, b.id)).id for vm in {b.vm for b in bs}
    }
    assert set(newest.values()) <= set(ids)
    assert len(ids) == max(len(newest), sample.size(len(bs)))


@pytest.mark.parametrize(
    ("text", "sample"),
    [(None, Sample()), ("all", Sample()), ("12", Sample(count=12)), ("25%", Sample(fraction=0.25)),
     ("0.5", Sample(fraction=0.5)), (3, Sample(count=3)), (0.1, Sample(fraction=0.1))],
)  # fmt: skip
def test_parse_sample(text, sample):
    assert parse_sample(text) == sample


@pytest.mark.parametrize("text", ["0", "-1", "150%", "1.5", "lots", "0%", True])
def test_bad_samples_are_one_clear_error(text):
    with pytest.raises(InvalidInputError, match="sample"):
        parse_sample(text)
