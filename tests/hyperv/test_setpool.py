"""The shadow copy set pool (`hyperv.setpool`), without Prefect: the per-VM
procedures of one run, each in its own thread with its own WinRM client,
share one set per volume group on the lab's host."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import sha256
from vmbackup import _mover
from vmbackup.hyperv.procedure import backup_vm
from vmbackup.hyperv.setpool import SetPool

from .conftest import client
from .test_host_truth import _counter, _quiesces, _select
from .test_procedure import repo  # noqa: F401  (a fixture)


def _pool(plan, host, lab, vms, run_id="pool-run"):
    pool = SetPool(host, run_id=run_id, quiesce=plan.quiesce, connect=lambda: client(lab, "https-ntlm"))
    for vm in vms:
        pool.add(vm, plan.agents[0])
    return pool


def _backup_all(plan, host, lab, vms, pool, run_id="pool-run"):
    out: dict[str, object] = {}

    def one(vm):
        try:
            out[vm.name] = backup_vm(
                client(lab, "https-ntlm"), vm, plan, host, plan.agents[0], run_id=run_id, pool=pool
            )
        except Exception as e:  # noqa: BLE001  (the test reads it)
            out[vm.name] = e

    threads = [threading.Thread(target=one, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return out


def test_vms_of_one_volume_share_one_set_and_each_guest_is_quiesced_once(mixed, repo, tmp_path):
    plan, host, hv, vms = _select(mixed, repo, ["g*", "pt01"])
    before, created = _quiesces(mixed), _counter(mixed, "shadow_sets_created")
    pool = _pool(plan, host, mixed, vms)
    try:
        results = _backup_all(plan, host, mixed, vms, pool)
    finally:
        assert pool.close() == []
    for name, r in results.items():
        assert not isinstance(r, Exception), f"{name}: {r}"
        assert r.status == "ok" and r.consistency == "application", r
    # one set for D: (g1, g2, g3), one for E: (pt01)
    assert _counter(mixed, "shadow_sets_created") == created + 2
    assert pool.stats.sets_made == 2 and pool.stats.backup_complete == 2 and pool.stats.closed_open == 0
    after = _quiesces(mixed)
    assert {n: after[n] - before[n] for n in ("g1", "g2", "g3", "pt01")} == dict.fromkeys(["g1", "g2", "g3", "pt01"], 1)
    # the group's points name one set
    points = {b.id: b for b in _mover.list_backups(str(repo))[0]}
    sets = {points[results[n].backup_id].attributes["shadow_set_id"] for n in ("g1", "g2", "g3")}
    assert len(sets) == 1
    for name in ("g1", "g2", "g3"):
        for d in results[name].disks:
            img, out = tmp_path / f"{name}-{d['name']}.lab", tmp_path / f"{name}-{d['name']}.raw"
            mixed.disk_image(name, d["name"], img)
            _mover.restore_disk(str(repo), results[name].backup_id, str(out), disk=d["name"])
            assert sha256(out) == sha256(img), (name, d["name"])
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []


def test_a_member_that_fails_alone_does_not_hold_back_the_set_and_its_retry_gets_a_new_one(mixed, repo):
    """g2's read fails (its VHDX headers are broken): g1 and g3 commit, the set is
    completed with BackupComplete; g2's second attempt gets a set of its own."""
    plan, host, hv, vms = _select(mixed, repo, ["g*"])
    g2 = next(v for v in mixed.status()["vms"] if v["name"] == "g2")
    top = Path(g2["disks"][0]["chain"][0]["local"])
    good = top.read_bytes()[64 << 10 : 192 << 10]
    with open(top, "r+b") as f:  # both VHDX headers (64 KiB and 128 KiB) zeroed
        f.seek(64 << 10)
        f.write(bytes(128 << 10))
    completes = {v["name"]: v["backup_complete"] for v in mixed.status()["vms"]}
    created = _counter(mixed, "shadow_sets_created")
    pool = _pool(plan, host, mixed, vms)
    try:
        results = _backup_all(plan, host, mixed, vms, pool)
        assert isinstance(results["g2"], Exception) and "not a valid VHDX image" in str(results["g2"])
        assert results["g1"].status == "ok" and results["g3"].status == "ok"
        assert _counter(mixed, "shadow_sets_created") == created + 1
        assert pool.stats.backup_complete == 1 and pool.open == []
        after = {v["name"]: v["backup_complete"] for v in mixed.status()["vms"]}
        assert after["g1"] == completes["g1"] + 1 and after["g3"] == completes["g3"] + 1
        assert mixed.status()["runs"] == []
        # the retry, once the disk is readable again: a new set, of g2 alone
        with open(top, "r+b") as f:
            f.seek(64 << 10)
            f.write(good)
        (again,) = _backup_all(plan, host, mixed, [next(v for v in vms if v.name == "g2")], pool).values()
        assert not isinstance(again, Exception) and again.status == "ok", again
        assert _counter(mixed, "shadow_sets_created") == created + 2
    finally:
        with open(top, "r+b") as f:
            f.seek(64 << 10)
            f.write(good)
        assert pool.close() == []
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []


def test_closing_the_pool_ends_a_set_whose_members_never_came(mixed, repo):
    """g1 backs up; g2 and g3 never run (the run was interrupted): the set stays
    open for them until the pool is closed, which ends it as failed."""
    plan, host, hv, vms = _select(mixed, repo, ["g*"])
    pool = _pool(plan, host, mixed, vms)
    (r,) = _backup_all(plan, host, mixed, [vms[0]], pool).values()
    assert not isinstance(r, Exception) and r.status == "ok", r
    assert len(mixed.status()["runs"]) == 1  # held for g2 and g3
    assert pool.close() == []
    assert pool.stats.closed_open == 1 and pool.stats.backup_complete == 0
    st = mixed.status()
    assert st["shadow_copies"] == [] and st["runs"] == []
