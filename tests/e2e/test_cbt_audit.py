"""`vmbackup maintain audit` on the lab: CBT that tells the truth passes; CBT
that leaves a write out (the lab's `cbt_omit` fault) makes an incremental miss
it, the audit finds it (exit 1, the VM named, `vmbackup.cbt.mismatch`), and the
next backup is a full with the reason that restores bit-exact. No snapshot is
left after any audit; Hyper-V VMs and VMs without a point are listed skipped."""

from __future__ import annotations

import asyncio
import json
import time

from vmbackup import _mover

from .conftest import backup, leftovers, pyvmomi_leftovers, run, sha
from .test_hyperv import _artifacts, _runs_of

CLEAN = {"counters": {}, "snapshots": {}, "clones": []}
VM = "web01"
WRITE = (5 << 20, 128 << 10)  # offset, length of the write CBT leaves out


def _read(api_url: str, coro_fn):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(coro_fn())


def _mismatch_events(api: str, point: str) -> list:
    async def events():
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter

        async with get_client() as c:
            page = await c.read_events(
                filter=EventFilter(event=EventNameFilter(name=["vmbackup.cbt.mismatch"])), limit=50
            )
            return [e for e in page.events if e.payload.get("point") == point]

    deadline = time.monotonic() + 120  # a bound on a broken server, not a wait
    found = _read(api, events)
    while not found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = _read(api, events)
    return found


def _audit(plan, *args: str, env, expect: int) -> tuple[dict, str]:
    p = run("maintain", "audit", "--plan", str(plan), *args, "--json", env=env, expect=expect)
    return json.loads(p.stdout), p.stderr


def _restores_bit_exact(lab, repository: str, backup_id: str, disks, tmp_path) -> bool:
    for disk in disks:
        image, restored = tmp_path / f"lab-{disk}.img", tmp_path / f"restored-{disk}.img"
        restored.unlink(missing_ok=True)
        lab.disk_image(VM, disk, image)
        _mover.restore_disk(repository, backup_id, str(restored), disk=disk)
        if sha(restored) != sha(image):
            return False
    return True


def test_cbt_audit_passes_then_finds_the_write_cbt_left_out(default_lab, state_dir, tmp_path):
    e2e, lab = default_lab, default_lab.lab
    env = e2e.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = e2e.write_plan(tmp_path / "plan.yaml", repository=repo)
    disks = ["scsi0:0", "scsi0:1"]
    hyperv = sorted(v["name"] for hv in lab.hyperv_hosts() for v in hv.status()["vms"])
    others = sorted(v["name"] for v in lab.status()["vms"] if v["name"] not in lab.agents and v["name"] != VM)

    # A full and an incremental: CBT told the truth, every compared area matches.
    (full,) = backup("--plan", str(plan), "--vm", VM, env=env)
    assert full["mode"] == "full", full
    lab.write(VM, "scsi0:0", 3 << 20, 1 << 20, seed=21)
    (incr,) = backup("--plan", str(plan), "--vm", VM, env=env)
    assert incr["mode"] == "incremental" and incr["status"] == "ok", incr
    report, _ = _audit(plan, env=env, expect=0)
    rows = {r["vm"]: r for r in report["vms"]}
    assert sorted(rows) == sorted([VM, *others, *hyperv]), sorted(rows)
    web = rows[VM]
    assert web["status"] == "ok" and web["point"] == incr["backup_id"] and web["mismatches"] == [], web
    assert web["vm_id"] and web["disks_compared"] == disks and web["bytes_compared"] > 0, web
    assert web["transport"] == "hotadd" and web["sample"] == "64 block(s) per disk", web
    for name in others:
        assert rows[name]["status"] == "skipped" and rows[name]["reason"] == "no backup point yet", rows[name]
    for name in hyperv:
        assert rows[name]["status"] == "skipped" and rows[name]["hypervisor"] == "hyperv", rows[name]
        assert "no changed block tracking" in rows[name]["reason"], rows[name]
    assert report["ok"] and report["mismatched"] == [] and report["failed"] == [], report
    assert leftovers(lab) == CLEAN and pyvmomi_leftovers(e2e) == []

    # CBT leaves the next write out: the incremental misses it.
    run("lab", "fault", "--state", str(lab.state), "--vm", VM, "--set", "cbt_omit", env=env)
    lab.write(VM, "scsi0:0", *WRITE, seed=22)
    run("lab", "fault", "--state", str(lab.state), "--vm", VM, env=env)
    (missed,) = backup("--plan", str(plan), "--vm", VM, env=env)
    assert missed["mode"] == "incremental", missed
    assert {d["name"]: d["changed_bytes"] for d in missed["disks"]} == {"scsi0:0": 0, "scsi0:1": 0}, missed
    assert not _restores_bit_exact(lab, str(repo), missed["backup_id"], ["scsi0:0"], tmp_path)

    # The audit finds it: exit 1, the VM named, the chain marked broken.
    report, stderr = _audit(plan, "--vm", VM, "--sample", "all", env=env, expect=1)
    (web,) = report["vms"]
    assert web["status"] == "mismatch" and web["point"] == missed["backup_id"], web
    assert web["mismatches"] == [{"disk": "scsi0:0", "offset": WRITE[0], "length": WRITE[1]}], web
    assert web["chain_marked_broken"] and report["mismatched"] == [VM] and not report["ok"], report
    assert [line for line in stderr.splitlines() if line.startswith("vmbackup: error:") and VM in line], stderr
    assert leftovers(lab) == CLEAN and pyvmomi_leftovers(e2e) == []
    human = run("maintain", "audit", "--plan", str(plan), "--vm", VM, "--sample", "all", env=env, expect=1)
    assert f"MISMATCH {VM}: point {missed['backup_id']}" in human.stdout and VM in human.stderr, human

    runs = _runs_of(env, "audit_cbt", plan)
    assert runs[0]["state_type"] == "FAILED", runs[0]
    arts = _artifacts(env, runs[0]["id"])
    table = json.loads(arts["vmbackup-cbt-audit-table"]["data"])
    assert [(r["vm"], r["status"]) for r in table] == [(VM, "mismatch")], table
    assert f"scsi0:0 {WRITE[0]}+{WRITE[1]}" in table[0]["mismatches"], table
    assert f"CBT or the backup is wrong for {VM}" in arts["vmbackup-cbt-audit"]["data"]

    api = json.loads(run("server", "status", "--json", env=env).stdout)["api_url"]
    events = _mismatch_events(api, missed["backup_id"])
    assert events and all(e.resource.id == f"vmbackup.vm.{VM}" for e in events), events
    assert events[0].payload["mismatches"][0]["offset"] == WRITE[0] and events[0].payload["vm_id"] == web["vm_id"]

    # The next backup is a full, says why, and restores bit-exact to the disk now.
    (fixed,) = backup("--plan", str(plan), "--vm", VM, env=env)
    assert fixed["mode"] == "full" and fixed["full_reason"].startswith("CBT audit: "), fixed
    assert missed["backup_id"] in fixed["full_reason"], fixed
    assert _restores_bit_exact(lab, str(repo), fixed["backup_id"], disks, tmp_path)
    assert not list((repo / "broken-chains").glob("*.json"))
    report, _ = _audit(plan, "--vm", VM, "--sample", "all", env=env, expect=0)
    assert report["vms"][0]["status"] == "ok" and report["vms"][0]["point"] == fixed["backup_id"], report
    assert leftovers(lab) == CLEAN and pyvmomi_leftovers(e2e) == []


def test_cbt_audit_bad_input_is_one_line_exit_2(default_lab, state_dir, tmp_path):
    env = default_lab.env(state_dir)
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    plan = default_lab.write_plan(tmp_path / "plan.yaml", repository=repo)
    for args, says in [
        (["--sample", "0"], "--sample"),
        (["--sample", "ten"], "--sample"),
        (["--vm", "no-such-vm"], "no-such-vm"),
    ]:
        p = run("maintain", "audit", "--plan", str(plan), *args, env=env, expect=2)
        errors = [line for line in p.stderr.splitlines() if not line.startswith("Prefect UI: ")]
        assert len(errors) == 1 and errors[0].startswith("vmbackup: error: ") and says in errors[0], (args, p.stderr)
    p = run("maintain", "audit", "--plan", str(tmp_path / "missing.yaml"), env=env, expect=2)
    assert p.stderr.count("\n") == 1, p.stderr
