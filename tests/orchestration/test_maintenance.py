"""The maintenance flows on a real Prefect server and real repositories:
verify names the VM a damaged chunk affects, retention keeps a VM's last
good backup when its newest are damaged, gc gives the space back; each
publishes its markdown artifact and its event; `vmbackup maintain` prints
the same report."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from conftest import backdate
from vmbackup import _mover

from .procs import child_env, vmbackup

MiB = 1024 * 1024


class Site:
    """A repository with backups made by the mover, and a plan naming it."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "repo"
        _mover.init_repository(str(self.repo))
        (root / "ca.pem").write_text("not read by the repository flows\n")

    def plan(self, retention: dict | None = None) -> str:
        plan = {
            "connection": {"url": "https://127.0.0.1:1/sdk", "user": "u", "password_env": "UNUSED", "ca_file": "ca.pem"},
            "repository": "repo",
            "agents": [{"name": "a1", "transports": ["nbd"]}],
            "selection": {"vms": ["*"]},
        }  # fmt: skip
        if retention:
            plan["retention"] = retention
        path = self.root / "plan.yaml"
        path.write_text(json.dumps(plan))  # JSON is YAML
        return str(path)

    def backup(self, vm: str, data: bytes, attributes: dict | None = None) -> str:
        disk = self.root / f"{vm}.img"
        disk.write_bytes(data)
        s = _mover.BackupSession(str(self.repo), vm)
        s.add_disk(str(disk), "scsi0:0")
        return s.commit(attributes=json.dumps(attributes)).id if attributes else s.commit().id

    def damage(self, block: bytes) -> Path:
        """Flips a byte in the middle of the chunk that holds ``block``."""
        cid = _mover.repository_chunk_id(str(self.repo), block)
        path = self.repo / "chunks" / cid[:2] / cid
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return path


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def events(name: str, resource_id: str, expect: int = 1) -> list:
    """The server's events of this name about this resource, once
    ``expect`` of them have arrived (the server stores them in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()

    async def read() -> list:
        async with get_client() as c:
            page = await c.read_events(
                filter=EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])),
                limit=50,
            )
            return list(page.events)

    deadline = time.monotonic() + 120  # a bound on a broken server, not a wait
    while True:
        found = asyncio.run(read())
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> str:
        async with get_client() as c:
            found = await c.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            return str(found[0].data)

    return asyncio.run(read())


def repo_resource(site: Site) -> str:
    return f"vmbackup.repository.{_mover.open_repository(str(site.repo)).id}"


def test_verify_names_the_vm_a_damaged_chunk_affects(prefect_server, site):
    from vmbackup.orchestration.maintenance import RepositoryDamagedError, verify_repository

    blocks = {vm: [os.urandom(MiB), os.urandom(MiB)] for vm in ("web", "db")}
    for vm, (b1, b2) in blocks.items():
        site.backup(vm, b1 + b2)
    plan = site.plan()
    ok = verify_repository(plan_path=plan)
    assert ok["ok"] and ok["backups_checked"] == 2 and ok["chunks_checked"] == 4 and ok["problems"] == []
    [sound] = events("vmbackup.repository.verified", repo_resource(site))
    assert sound.payload["ok"] is True and sound.payload["backups_checked"] == 2

    site.damage(blocks["db"][1])
    state = verify_repository(plan_path=plan, return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, RepositoryDamagedError) and "VMs affected: db" in str(err)
    assert err.report["vms_affected"] == ["db"] and err.report["problems"][0]["kind"]
    [failed] = events("vmbackup.repository.verify-failed", repo_resource(site))
    assert failed.payload["vms_affected"] == ["db"] and failed.payload["problems"] >= 1
    assert [r.id for r in failed.related if r.role == "vm"] == ["vmbackup.vm.db"]
    md = artifact("vmbackup-verify-repository")
    assert "problem(s)" in md and "VMs affected: db\n" in md


def test_a_sample_always_holds_every_vms_newest(prefect_server, site):
    from vmbackup.orchestration.maintenance import verify_repository

    newest = {}
    for vm in ("a", "b"):
        for _ in range(3):
            newest[vm] = site.backup(vm, os.urandom(MiB))
    r = verify_repository(plan_path=site.plan(), sample=1, read_data=False, seed=7)  # as a deployment passes it
    assert r["ok"] and r["sample"] == "1" and r["backups_total"] == 6
    assert sorted(r["verified"]) == sorted(newest.values()) and r["backups_checked"] == 2
    half = verify_repository(plan_path=site.plan(), sample="50%", seed=7)
    assert half["backups_checked"] == 3 and set(newest.values()) <= set(half["verified"])


def test_retention_keeps_the_last_good_backup_when_the_newest_are_damaged_and_gc_reclaims(
    prefect_server, site, tmp_path
):
    from vmbackup.orchestration.maintenance import apply_retention

    good_data = os.urandom(MiB) + os.urandom(MiB)
    good = site.backup("db", good_data)
    bad_block = os.urandom(MiB)
    bad = [site.backup("db", bad_block + os.urandom(MiB)) for _ in range(2)]  # share the damaged chunk
    web = [site.backup("web", os.urandom(2 * MiB)) for _ in range(3)]
    site.damage(bad_block)
    # Everything was written "an hour ago": gc's grace period is over.
    backdate(site.repo / "chunks")

    r = apply_retention(plan_path=site.plan({"last": 1}))
    kept = {k["id"]: k for k in r["kept"]}
    assert set(kept) == {bad[1], good, web[2]}
    assert kept[good]["reasons"] == ["newest good"] and kept[good]["damaged"] is None
    assert kept[bad[1]]["reasons"] == ["last"] and kept[bad[1]]["damaged"]
    assert sorted(x["id"] for x in r["removed"]) == sorted([bad[0], *web[:2]])
    assert r["vms_without_good_backup"] == []
    # gc gave back the space of web's four removed chunks (and bad[0]'s own one)
    assert r["gc"]["chunks_removed"] >= 5 and r["gc"]["bytes_removed"] >= 5 * MiB
    assert r["repository_bytes_after"] <= r["repository_bytes_before"] - 5 * MiB
    # the good one restores bit-exact
    _mover.restore_disk(str(site.repo), good, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == good_data
    listed = {b.id for b in _mover.list_backups(str(site.repo))[0]}
    assert listed == {bad[1], good, web[2]}

    [ev] = events("vmbackup.retention.applied", repo_resource(site))
    assert ev.payload["kept_for_newest_good"] == [good] and ev.payload["removed"] == 3
    assert ev.payload["bytes_removed"] == r["gc"]["bytes_removed"]
    md = artifact("vmbackup-apply-retention")
    assert good in md and "newest good" in md and bad[0] in md


def test_retention_counts_each_vm_by_its_id_two_of_one_name_and_a_renamed_one(prefect_server, site):
    from vmbackup.orchestration.maintenance import apply_retention

    def point(label, vm_id, name=None):
        return site.backup(label, os.urandom(MiB), {"vm": name or label, "vm_id": vm_id, "host": "esx1"})

    a = [point("web", "uuid-a") for _ in range(2)]
    b_block = os.urandom(MiB)
    b = site.backup("web", b_block, {"vm": "web", "vm_id": "uuid-b", "host": "esx2"})  # its only point
    renamed = [point("app", "uuid-c"), point("app", "uuid-c", "app-new"), point("app-new", "uuid-c")]
    site.damage(b_block)

    r = apply_retention(plan_path=site.plan({"last": 1}), dry_run=True)
    kept = {k["id"]: k for k in r["kept"]}
    assert set(kept) == {a[1], b, renamed[2]}
    assert kept[b]["vm_id"] == "uuid-b" and kept[b]["damaged"] and kept[b]["reasons"] == ["last"]
    assert sorted(x["id"] for x in r["removed"]) == sorted([a[0], *renamed[:2]])
    # uuid-a has a good backup, uuid-b has none: the series says which web it is.
    assert r["vms_without_good_backup"] == ["web"]
    assert r["series_without_good_backup"] == [{"vm": "web", "vm_id": "uuid-b"}]
    assert "uuid-b" in artifact("vmbackup-apply-retention")


def test_an_untrusted_manifest_never_stands_in_for_the_good_backup(prefect_server, site):
    from vmbackup.orchestration.maintenance import GcRefusedError, apply_retention

    old = site.backup("solo", os.urandom(MiB))
    good = site.backup("solo", os.urandom(MiB))
    newer = site.backup("solo", os.urandom(MiB))
    manifest = site.repo / "backups" / f"{newer}.tib"
    data = bytearray(manifest.read_bytes())
    data[-20] ^= 0x01  # its checksum fails: not trusted
    manifest.write_bytes(bytes(data))

    state = apply_retention(plan_path=site.plan({"last": 1}), read_data=False, return_state=True)
    # gc refuses to run beside a manifest it cannot read: the run fails, with its report
    err = state.result(raise_on_failure=False)
    assert state.is_failed() and isinstance(err, GcRefusedError) and "gc refused" in str(err)
    r = err.report
    assert [(k["id"], k["reasons"]) for k in r["kept"]] == [(good, ["last"])]
    assert [x["id"] for x in r["removed"]] == [old] and r["gc"] is None and "corrupt" in r["gc_error"]
    assert [u["id"] for u in r["untrusted"]] == [newer] and manifest.exists()
    assert r["vms_without_good_backup"] == []
    assert "gc refused" in artifact("vmbackup-apply-retention")


def test_maintain_commands_print_the_report_and_exit_by_it(prefect_server, site):
    state = Path(os.environ["VMBACKUP_STATE_DIR"])
    env = child_env(state, prefect_server.api_url)
    block = os.urandom(MiB)
    ids = [site.backup("vm1", block + os.urandom(MiB)) for _ in range(2)]
    plan = site.plan({"last": 1})
    sound = json.loads(vmbackup("maintain", "verify", "--plan", plan, "--json", env=env).stdout)
    assert sound["ok"] and sound["backups_checked"] == 2
    # The command kept a record of its process while its flow ran, and removed it at the end.
    assert (state / "runs").is_dir() and list((state / "runs").glob("*.json")) == []

    dry = vmbackup("maintain", "retention", "--plan", plan, "--dry-run", env=env)
    assert f"keep   {ids[1]} vm1 (last)" in dry.stdout and f"remove {ids[0]} vm1" in dry.stdout
    assert len(_mover.list_backups(str(site.repo))[0]) == 2

    site.damage(block)
    p = vmbackup("maintain", "verify", "--plan", plan, "--json", env=env, expect=1)
    bad = json.loads(p.stdout)
    assert bad["ok"] is False and bad["vms_affected"] == ["vm1"] and sorted(bad["backups_affected"]) == sorted(ids)
    human = vmbackup("maintain", "verify", "--plan", plan, env=env, expect=1).stdout
    assert "VMs affected: vm1" in human


def test_maintain_usage_errors_exit_2_in_one_line(tmp_path, site):
    env = child_env(tmp_path / "state")
    p = vmbackup("maintain", "verify", "--plan", site.plan(), "--sample", "lots", env=env, expect=2)
    assert p.stderr.startswith("vmbackup: error: --sample") and len(p.stderr.splitlines()) == 1
    p = vmbackup("maintain", "retention", "--plan", site.plan(), env=env, expect=2)
    assert "has no retention rules" in p.stderr and len(p.stderr.splitlines()) == 1
    p = vmbackup("maintain", "sweep", "--plan", site.plan(), "--hypervisor", "hyperv", env=env, expect=2)
    assert p.stderr.strip() == f"vmbackup: error: plan {site.plan()} has no Hyper-V hosts to sweep"
    p = vmbackup("maintain", "sweep", "--plan", site.plan(), "--older-than", "-1", env=env, expect=2)
    assert p.stderr.strip() == "vmbackup: error: --older-than must not be negative"
    assert "verify" in vmbackup("maintain", env=env, expect=2).stderr
    assert not (tmp_path / "state").exists(), "a usage error started something"
