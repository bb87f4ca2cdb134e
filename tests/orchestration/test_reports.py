"""The reports on a real Prefect server: artifacts and events stored and
read back, and deployments/automations.yaml accepted by
`prefect automation create --from-file` and firing on a failed VM."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from prefect import flow
from vmbackup.orchestration import reports

from .procs import child_env

ROOT = Path(__file__).resolve().parents[2]


def _rows(tag: str) -> list[dict]:
    return [
        {"vm": f"web-{tag}", "status": "ok", "backup_id": "B1", "repository": "/r", "mode": "full",
         "full_reason": "first backup", "bytes_read": 8_000_000, "bytes_stored": 2_000_000, "seconds": 2.0,
         "host": "esx1", "agent": "a1", "datastores": ["ds1"], "disks": [{"seconds": 1.0}], "error": None},
        {"vm": f"db-{tag}", "status": "failed", "repository": "/r", "bytes_read": 0, "bytes_stored": 0,
         "seconds": 0.5, "host": "esx2", "agent": "a2", "datastores": ["ds2"], "error": "snapshot refused"},
    ]  # fmt: skip


def _until(read, what: str, tries: int = 60):
    """Read until the server has stored it: the server persists events in
    batches, so a fresh event is readable a moment after it was sent."""
    delay = 0.1
    for _ in range(tries):
        found = read()
        if found:
            return found
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise AssertionError(f"the server never had {what}")


def test_artifacts_and_events_are_stored_and_read_back(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    tag = uuid.uuid4().hex[:8]
    rows = _rows(tag)

    @flow(name="reports-test")
    def publish() -> str:
        reports.publish_table(f"t-{tag}", reports.table_rows(rows), "2 VMs")
        reports.publish_markdown(f"m-{tag}", "summary", reports.summary_markdown(rows))
        pid = reports.create_progress(f"p-{tag}", "reading")
        progress = reports.Progress(lambda pct: reports.update_progress(pid, pct), min_interval=0)
        progress.expect("a", 4)
        progress.update("a", 1)
        progress.update("a", 4)
        reports.emit_vm_events(rows)
        return str(pid)

    progress_id = publish()
    EventsWorker.drain_all()

    with get_client(sync_client=True) as client:

        def artifact(key):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert len(found) == 1, found
            return found[0]

        table = artifact(f"t-{tag}")
        data = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert [r["vm"] for r in data] == [f"web-{tag}", f"db-{tag}"]
        assert data[0]["mb_per_s"] == 8.0 and data[0]["dedup_ratio"] == 4.0
        assert "| db-" in artifact(f"m-{tag}").data and "snapshot refused" in artifact(f"m-{tag}").data
        prog = artifact(f"p-{tag}")
        assert str(prog.id) == progress_id and prog.type == "progress" and float(prog.data) == 100.0

        ev_filter = EventFilter(
            event=EventNameFilter(prefix=["vmbackup.vm."]),
            resource=EventResourceFilter(id=[f"vmbackup.vm.web-{tag}", f"vmbackup.vm.db-{tag}"]),
        )
        events = _until(
            lambda: (lambda p: p.events if len(p.events) == 2 else None)(
                client.read_events(filter=ev_filter, limit=50)
            ),
            "both events",
        )
    by_name = {e.event: e for e in events}
    ok, failed = by_name["vmbackup.vm.backed-up"], by_name["vmbackup.vm.failed"]
    assert ok.resource.id == f"vmbackup.vm.web-{tag}" and failed.resource.id == f"vmbackup.vm.db-{tag}"
    assert {(r.role, r.id) for r in ok.related} >= {
        ("host", "vmbackup.host.esx1"),
        ("datastore", "vmbackup.datastore.ds1"),
        ("agent", "vmbackup.agent.a1"),
    }
    assert ok.payload["bytes_read"] == 8_000_000 and ok.payload["mode"] == "full"
    assert failed.payload["error"] == "snapshot refused"
    # The flow run is related too (Prefect adds it): the UI links the event to its run.
    assert any(r.role == "flow-run" for r in ok.related)


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    got = threading.Event()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).received.append(json.loads(body or b"{}"))
        type(self).got.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_automation_file_is_accepted_and_alerts_on_a_failed_vm(prefect_server, tmp_path):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        block = CustomWebhookNotificationBlock(
            name="vmbackup-test",
            url=f"http://127.0.0.1:{hook.server_port}/alert",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
            allow_private_urls=True,
        )
        block_id = block.save(f"vmbackup-alert-{uuid.uuid4().hex[:8]}", overwrite=True)
        text = (ROOT / "deployments" / "automations.yaml").read_text()
        assert "NOTIFICATION_BLOCK_ID" in text
        path = tmp_path / "automations.yaml"
        path.write_text(text.replace("NOTIFICATION_BLOCK_ID", str(block_id)))

        env = child_env(tmp_path / "unused", api_url=prefect_server.api_url)
        p = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "automation", "create", "--from-file", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Created 5 automation(s)" in p.stdout, p.stdout

        with get_client(sync_client=True) as client:
            failed_auto = client.read_automations_by_name("vmbackup-vm-failed")
            stale_auto = client.read_automations_by_name("vmbackup-vm-no-good-backup")
            cbt_auto = client.read_automations_by_name("vmbackup-cbt-mismatch")
            drill_auto = client.read_automations_by_name("vmbackup-drill-failed")
        assert drill_auto and drill_auto[-1].trigger.expect == {"vmbackup.drill.failed"}
        assert cbt_auto and cbt_auto[-1].trigger.expect == {"vmbackup.cbt.mismatch"}
        assert failed_auto and failed_auto[-1].trigger.posture == "Reactive"
        assert stale_auto and stale_auto[-1].trigger.posture == "Proactive"
        assert stale_auto[-1].trigger.within.total_seconds() == 26 * 3600

        from prefect.events.worker import EventsWorker

        vm = f"db-{uuid.uuid4().hex[:8]}"
        row = _rows("x")[1] | {"vm": vm}
        reports.emit_vm_events([row])
        EventsWorker.drain_all()
        # The server's triggers and actions services act on the event: the
        # webhook is called (an event, not a sleep; the bound is generous).
        assert _Hook.got.wait(timeout=240), "the automation never called the webhook"
        alert = _Hook.received[-1]
        assert vm in alert["subject"] and "failed" in alert["subject"], alert
        assert "snapshot refused" in alert["body"] and "vmbackup.host.esx2" in alert["body"], alert

        # A failed restore drill alerts too (its own automation, its own words).
        _Hook.got.clear()
        drill_row = {"vm": vm, "status": "failed", "point": "P1", "restored_as": f"drill-{vm}-1a2b3c4d"}
        drill_row["error"] = "disk scsi0:0 differs from backup point P1 at or after byte 0"
        reports.emit_restore_events([drill_row], drill=True)
        EventsWorker.drain_all()
        assert _Hook.got.wait(timeout=240), "the drill automation never called the webhook"
        alert = next(a for a in reversed(_Hook.received) if "drill" in a.get("subject", ""))
        assert vm in alert["subject"] and "differs from backup point P1" in alert["body"], alert
    finally:
        hook.shutdown()
