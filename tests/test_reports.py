"""The reports' pure half (no Prefect): table rows, summary, events, progress, log context."""

from __future__ import annotations

import logging

from vmbackup.orchestration import reports

OK = {
    "vm": "web01", "status": "ok", "backup_id": "B1", "repository": "/r", "mode": "full",
    "full_reason": "first backup", "transport": "hotadd", "consistency": "application",
    "bytes_read": 40_000_000, "bytes_stored": 10_000_000, "seconds": 5.0, "error": None,
    "host": "esx1", "agent": "agent1", "datastores": ["ds1", "nfs/a"],
    "disks": [{"name": "scsi0:0", "seconds": 2.0}, {"name": "scsi0:1", "seconds": 4.0}],
}  # fmt: skip
FAILED = {
    "vm": "db|01", "status": "failed", "repository": "/r", "bytes_read": 0, "bytes_stored": 0,
    "seconds": 1.0, "error": "snapshot refused", "host": "esx2", "agent": "agent2", "datastores": ["ds2"],
}  # fmt: skip


def test_table_rows_add_speed_dedup_and_why_full():
    rows = reports.table_rows([OK, FAILED])
    assert list(rows[0]) == list(reports.TABLE_COLUMNS)
    # 40 MB over the slowest disk's 4 s (disks are read at once), 40 MB read for 10 MB stored.
    assert rows[0]["mb_per_s"] == 10.0 and rows[0]["dedup_ratio"] == 4.0
    assert rows[0]["full_reason"] == "first backup"
    assert rows[1]["mb_per_s"] is None and rows[1]["dedup_ratio"] is None and rows[1]["error"] == "snapshot refused"


def test_summary_has_totals_failures_fulls_removed_and_growth():
    md = reports.summary_markdown(
        [OK, FAILED],
        repository_before=1 << 20,
        repository_after=3 << 20,
        removed=[{"kind": "snapshot", "name": "vmbackup-x", "vm": "web01", "removed": True}],
    )
    assert "**1 of 2 VM(s) backed up**, 1 failed." in md
    assert "| db\\|01 | esx2 | agent2 | snapshot refused |" in md
    assert "| web01 | first backup |" in md
    assert "| repository size | 3.0 MiB |" in md and "| repository growth | 2.0 MiB |" in md
    assert "| snapshot | vmbackup-x | web01 | removed |" in md
    assert "| dedup ratio | 4.0 |" in md
    assert (
        "| application- / crash-consistent / powered off | 1 / 0 / 0 |" in md and "Crash-consistent backups" not in md
    )
    assert "Removed leftovers" not in reports.summary_markdown([OK])
    assert "Failures" not in reports.summary_markdown([OK])


def test_summary_says_why_a_backup_is_only_crash_consistent():
    crash = dict(
        OK, vm="legacy01", consistency="crash", consistency_note="legacy01 has its Backup integration service off"
    )
    off = dict(OK, vm="off01", consistency="powered-off")
    md = reports.summary_markdown([OK, crash, off])
    assert "| application- / crash-consistent / powered off | 1 / 1 / 1 |" in md
    assert "## Crash-consistent backups" in md
    assert "| legacy01 | legacy01 has its Backup integration service off |" in md


def test_vm_event_names_related_resources_and_figures():
    ev = reports.vm_event(OK)
    assert ev["event"] == "vmbackup.vm.backed-up"
    assert ev["resource"]["prefect.resource.id"] == "vmbackup.vm.web01"
    assert [(r["prefect.resource.role"], r["prefect.resource.id"]) for r in ev["related"]] == [
        ("host", "vmbackup.host.esx1"),
        ("datastore", "vmbackup.datastore.ds1"),
        ("datastore", "vmbackup.datastore.nfs/a"),
        ("agent", "vmbackup.agent.agent1"),
        ("repository", "vmbackup.repository./r"),
    ]
    assert ev["payload"]["bytes_read"] == 40_000_000 and ev["payload"]["mb_per_s"] == 10.0
    assert ev["payload"]["mode"] == "full" and ev["payload"]["backup_id"] == "B1"
    bad = reports.vm_event(FAILED)
    assert bad["event"] == "vmbackup.vm.failed" and bad["payload"]["error"] == "snapshot refused"


def test_progress_is_throttled_and_reaches_100():
    now = [0.0]
    seen = []
    p = reports.Progress(seen.append, min_interval=2.0, min_step=1.0, clock=lambda: now[0])
    p.expect("a", 100)
    p.expect("b", 100)
    p.update("a", 10)  # first: published
    p.update("a", 50)  # too soon
    now[0] = 1.0
    p.update("a", 60)  # still too soon
    now[0] = 3.0
    p.update("a", 60)  # due, moved 25 points
    now[0] = 10.0
    p.update("a", 60)  # due but did not move
    p.finish("a")  # 50%: due? no, 0 s since the last... interval counted from 3.0: due
    p.finish("b")  # 100%: always
    assert seen == [5.0, 30.0, 50.0, 100.0]
    assert p.percent() == 100.0


def test_vm_log_lines_carry_the_context(caplog):
    logger = logging.getLogger("vmbackup.test_reports.child")
    reports.install_context_filter("vmbackup.test_reports")
    with caplog.at_level(logging.INFO, logger="vmbackup.test_reports"):
        reports.vm_logger(logger, {"vm": "web01", "host": "esx1", "agent": "a1"}).info("hello %d", 1)
        with reports.vm_context({"vm": "db01", "host": "esx2", "agent": "a2"}):
            logger.info("from the adapter")
        logger.info("outside")
    assert [r.getMessage() for r in caplog.records] == [
        "[vm=web01 host=esx1 agent=a1] hello 1",
        "[vm=db01 host=esx2 agent=a2] from the adapter",
        "outside",
    ]
    assert caplog.records[0].vmbackup_vm == "web01"


def test_artifact_keys_and_scrub():
    assert reports.artifact_key("vmbackup", "Verify_Repo /x") == "vmbackup-verify-repo-x"
    assert reports.scrub("pw=hunter2!", ["hunter2", ""]) == "pw=***!"


def test_a_field_added_to_vm_result_is_in_the_json_row_the_tables_and_the_event():
    """A new column is one edit: a field of VmResult (here of a subclass
    with one more field) reaches every place a row is shown."""
    import dataclasses
    import json

    from vmbackup import results
    from vmbackup.orchestration import vmtask

    extra = results.col("none", title="WIDGETS", width=8)
    Row = dataclasses.make_dataclass("Row", [("widgets", str, extra)], bases=(results.VmResult,))
    row = Row(vm="web01", status="ok", widgets="three").to_dict()
    assert json.loads(json.dumps(row))["widgets"] == "three"  # the JSON row
    assert "widgets" in results.row_fields(Row) and results.empty_row(Row)["widgets"] == "none"
    assert reports.table_rows([row], Row)[0]["widgets"] == "three"  # the table artifact
    assert ("widgets", "WIDGETS", 8) in results.text_columns(Row)  # the command line's table
    assert reports.vm_event(row, Row)["payload"]["widgets"] == "three"  # the event
    # And the real row: the new contract fields are everywhere, derived from VmResult.
    for name in ("vm_id", "skipped_disks", "hypervisor"):
        assert name in vmtask.ROW_FIELDS and name in reports.TABLE_COLUMNS
    assert {"vm_id", "skipped_disks", "hypervisor"} <= set(reports.vm_event(OK)["payload"])
    assert results.empty_row()["skipped_disks"] == [] and results.VmResult(vm="x").skipped_disks == []


def test_summary_lists_the_disks_not_backed_up():
    row = dict(OK, skipped_disks=[{"disk": "scsi0:1", "reason": "independent disk: not in snapshots"}])
    md = reports.summary_markdown([row])
    assert "## Disks not backed up" in md and "| web01 | scsi0:1 | independent disk: not in snapshots |" in md
    assert "Disks not backed up" not in reports.summary_markdown([OK])


RESTORED = {
    "vm": "web01", "hypervisor": "vsphere", "source_hypervisor": "vsphere", "status": "ok", "point": "P1",
    "restored_as": "web01-restored", "host": "esx1", "location": "esx1-local", "seconds": 12.34,
    "bytes_written": 3_000_000, "vm_id": "5003-new", "transport": "hotadd", "agent": "agent1", "error": None,
    "disks": [{"disk": "scsi0:0", "bytes_written": 3_000_000, "seconds": 2.0}],
    "changes": ["network adapter 1: network LAN mapped to VM Network"],
}  # fmt: skip


def test_restore_summary_says_what_where_how_long_and_what_changed():
    md = reports.restore_markdown([RESTORED, dict(RESTORED, vm="db01", restored_as="db01", in_place=True)], title="R")
    assert "**2 of 2 VM(s) restored**" in md
    assert "| web01 | web01-restored | P1 | esx1 | esx1-local | 12.3 s | ok |" in md
    assert "- RTO 12.3 s" in md and "- new VM id 5003-new" in md and "- VM id 5003-new" in md
    assert "- network adapter 1: network LAN mapped to VM Network" in md
    failed = reports.restore_markdown([dict(RESTORED, status="failed", error="no room")], title="R")
    assert "FAILED: no room" in failed and "0 of 1 VM(s) restored" in failed
