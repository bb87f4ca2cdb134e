"""The offsite copy to S3 under Object Lock, against the lab's real SeaweedFS.

The ransomware drill: the lab's VMs backed up, copied with `vmbackup copy`;
with the copy's own credentials no locked version can be deleted and an
overwrite leaves it in place; the local repository deleted whole, every
VM's newest point restores from the copy alone, byte for byte. A copy
killed with SIGKILL resumes without sending any object twice; verify of
the copy finds an object written over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import botocore.exceptions
import pytest
from vmbackup import _mover
from vmbackup import copy as s3copy
from vmbackup_lab import s3server

from .conftest import backup, run, sha
from .test_hyperv import _artifacts, _runs_of


def _s3_env(env: dict[str, str], s3: dict, cache: Path) -> dict[str, str]:
    return env | {
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "VMBACKUP_CACHE_DIR": str(cache),
    }


@pytest.fixture
def s3(small_lab):
    s = small_lab.summary["s3"]
    assert s and s["endpoint"].startswith("http://127.0.0.1:"), small_lab.summary
    return s


def _target(s3: dict, prefix: str) -> s3copy.Target:
    return s3copy.Target(
        s3copy.client(s3["endpoint"], s3["access_key"], s3["secret_key"], "us-east-1"), s3["bucket"], prefix
    )


def test_ransomware_drill(small_lab, env, s3, tmp_path):
    prefix = f"drill-{uuid.uuid4().hex[:8]}"
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo))
    copy = dict(small_lab.plan_data()["copy"], prefix=prefix)
    plan = small_lab.write_plan(tmp_path / "plan.yaml", repository=repo, copy=copy)
    e = _s3_env(env, s3, tmp_path / "cache")

    rows = backup("--plan", str(plan), env=e)
    assert rows and all(r["status"] == "ok" for r in rows), rows
    out = json.loads(run("copy", "--plan", str(plan), "--json", env=e).stdout)
    assert out["backups"] == len(rows) and out["uploaded"] == out["objects"] > len(rows), out
    assert out["lock_mode"] == "COMPLIANCE" and out["index"].startswith(prefix + "/index/"), out
    # one run of the flow copy_repository, its report as an artifact
    (flow_run,) = _runs_of(e, "copy_repository", plan)
    assert flow_run["state_type"] == "COMPLETED", flow_run
    assert out["index"] in _artifacts(e, flow_run["id"])["vmbackup-copy-repository"]["data"]

    # Every version the copy wrote is locked; deleting it with the copy's own credentials is refused.
    t = _target(s3, prefix)
    versions, _ = s3copy.list_versions(t)
    index = s3copy.read_index(t)
    assert set(index["objects"]) <= set(versions) and len(index["objects"]) == out["objects"]
    for rel, vs in versions.items():
        for v in vs:
            with pytest.raises(botocore.exceptions.ClientError) as err:
                t.s3.delete_object(Bucket=t.bucket, Key=t.key(rel), VersionId=v["version"])
            assert err.value.response["Error"]["Code"] == "AccessDenied", rel
            h = t.s3.head_object(Bucket=t.bucket, Key=t.key(rel), VersionId=v["version"])
            assert h["ObjectLockMode"] == "COMPLIANCE", rel
    # An attacker writes over every manifest and a chunk, and "deletes" a chunk (a delete marker).
    chunk = next(r for r in index["objects"] if r.startswith("chunks/"))
    for rel in [r for r in index["objects"] if r.startswith("backups/")] + [chunk]:
        t.s3.put_object(Bucket=t.bucket, Key=t.key(rel), Body=b"encrypted by ransomware")
    other = [r for r in index["objects"] if r.startswith("chunks/")][-1]
    t.s3.delete_object(Bucket=t.bucket, Key=t.key(other))
    for rel in (chunk, other):
        mine = index["objects"][rel]["version"]
        assert t.s3.head_object(Bucket=t.bucket, Key=t.key(rel), VersionId=mine)["ContentLength"] > 0

    # The copy's verify names what was written over, and exits 1.
    p = run("verify", "--repo", f"s3://{s3['bucket']}/{prefix}", "--json", env=e, expect=1)
    v = json.loads(p.stdout)
    changed = {x["object"] for x in v["problems"] if x["kind"] == "changed_object"}
    assert {t.key(chunk), t.key(other)} <= changed, v

    # The newest point of each VM, restored from the repository while it is there.
    points = json.loads(run("snapshots", "--repo", str(repo), "--json", env=e).stdout)
    newest: dict[str, dict] = {}
    for b in points:
        if b["vm"] not in newest or b["created"] > newest[b["vm"]]["created"]:
            newest[b["vm"]] = b
    want = {}
    for b in newest.values():
        for d in b["disks"]:
            f = tmp_path / f"local-{b['id']}-{d['name']}.img"
            _mover.restore_disk(str(repo), b["id"], str(f), disk=d["name"])
            want[(b["id"], d["name"])] = sha(f)
            f.unlink()
    shutil.rmtree(repo)

    url = f"s3://{s3['bucket']}/{prefix}"
    listed = json.loads(run("snapshots", "--repo", url, "--json", env=e).stdout)
    assert sorted(b["id"] for b in listed) == sorted(b["id"] for b in points)
    for (bid, disk), digest in want.items():
        f = tmp_path / "from-s3.img"
        run("restore-disk", "--repo", url, "--disk", disk, bid, str(f), "--force", env=e)
        assert sha(f) == digest, (bid, disk)


def _small_repo(tmp_path: Path, chunks: int) -> tuple[Path, str]:
    repo = tmp_path / "repo"
    _mover.init_repository(str(repo), 262144, "none")
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(chunks * 262144))
    p = run("backup-disk", "--repo", str(repo), "--vm", "vm1", "--json", str(img), env=dict(os.environ))
    return repo, json.loads(p.stdout)["id"]


KILLED_COPY = """
import sys, time
from vmbackup import copy as c
t = c.Target(c.client(sys.argv[2], sys.argv[3], sys.argv[4], "us-east-1"), sys.argv[5], sys.argv[6])
n = 0
def on_put(key):
    global n
    n += 1
    if n == int(sys.argv[7]):
        print("puts", n, flush=True)
        time.sleep(3600)  # held here until killed: the kill lands mid-copy
# one worker: when it stops in its 20th PUT no other PUT is in flight, so the listing
# after the kill is exactly what the server holds (a PUT cut off mid-body is not stored)
c.copy_repository(sys.argv[1], t, days=1, generation_days=0, workers=1, on_put=on_put)
"""


def test_a_killed_copy_resumes_without_sending_anything_twice(s3, tmp_path):
    repo, bid = _small_repo(tmp_path, 48)
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    args = [repo, s3["endpoint"], s3["access_key"], s3["secret_key"], s3["bucket"], prefix, 20]
    child = subprocess.Popen([sys.executable, "-c", KILLED_COPY, *map(str, args)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("puts 20")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    t = _target(s3, prefix)
    assert s3copy.read_index(t) is None  # no index: the copy did not complete
    before, _ = s3copy.list_versions(t)
    assert 0 < len(before) < 50

    puts: list[str] = []
    t.s3.meta.events.register("provide-client-params.s3.PutObject", lambda params, **kw: puts.append(params["Key"]))
    res = s3copy.copy_repository(repo, t, days=1, generation_days=0)
    assert res.objects == 50 and res.adopted == len(before) and res.uploaded == 50 - len(before), res
    assert len(puts) == res.uploaded + 1  # the missing objects and the index, nothing else
    assert not {t.rel(k) for k in puts} & set(before)
    after, _ = s3copy.list_versions(t)
    assert all(len(vs) == 1 for vs in after.values()), after  # one version each: nothing sent twice

    # A longer lock in the plan extends every lock (as a newer backup's needs do: a lock
    # runs to now + days at every copy); the objects are not sent again.
    puts.clear()
    res = s3copy.copy_repository(repo, t, days=2, generation_days=0)
    assert res.uploaded == 0 and res.extended == 50 and len(puts) == 1, res
    rel = next(r for r in s3copy.read_index(t)["objects"] if r.startswith("chunks/"))
    e = s3copy.read_index(t)["objects"][rel]
    h = t.s3.head_object(Bucket=t.bucket, Key=t.key(rel), VersionId=e["version"])
    until = datetime.strptime(res.locked_until, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert int(h["ObjectLockRetainUntilDate"].timestamp()) == e["retain_until"] == until
    # the first index is no backup's: it waits for its lock, and is not a failure
    assert res.waiting >= 1 and res.deleted == 0, res


def test_the_copy_s_gc_deletes_only_unlocked_versions_no_backup_needs(s3, tmp_path):
    repo, bid = _small_repo(tmp_path, 4)
    t = _target(s3, f"gc-{uuid.uuid4().hex[:8]}")
    s3copy.copy_repository(repo, t, days=1)
    # something no backup needs and nobody locked: an unlocked stray object and a delete marker
    t.s3.put_object(Bucket=t.bucket, Key=t.key("chunks/00/stray"), Body=b"x")
    idx = s3copy.read_index(t)
    chunk = next(r for r in idx["objects"] if r.startswith("chunks/"))
    t.s3.delete_object(Bucket=t.bucket, Key=t.key(chunk))
    # the backup forgotten and gc'd locally: its manifest and chunks are locked in the copy, so they wait
    _mover.forget(str(repo), bid)
    _mover.gc(str(repo), grace_seconds=0)
    res = s3copy.copy_repository(repo, t, days=1)
    # the manifest and the first index wait (the chunks, young, are still in the repository and the copy)
    assert res.backups == 0 and res.deleted == 2 and res.waiting == 2, res
    waiting = {w["rel"] for w in s3copy.read_index(t)["waiting"]}
    assert f"backups/{bid}.tib" in waiting and any(w.startswith("index/") for w in waiting), waiting
    versions, markers = s3copy.list_versions(t)
    assert "chunks/00/stray" not in versions and not markers
    assert len(versions[chunk]) == 1


def test_lab_up_starts_s3_with_object_lock_and_lab_down_stops_it(small_lab, s3):
    record = json.loads((small_lab.lab.state / s3server.RECORD).read_text())
    assert s3server.alive(record["pid"], small_lab.lab.state)
    ports = record["ports"]
    assert len(set(ports.values())) == len(ports) and s3["endpoint"].endswith(f":{ports['s3.port']}")
    t = _target(s3, "x")
    cfg = t.s3.get_object_lock_configuration(Bucket=s3["bucket"])["ObjectLockConfiguration"]
    assert cfg["ObjectLockEnabled"] == "Enabled"
    bad = s3copy.client(s3["endpoint"], s3["access_key"], "wrong", "us-east-1")
    with pytest.raises(botocore.exceptions.ClientError):
        bad.list_objects_v2(Bucket=s3["bucket"])


def test_verify_of_the_copy_finds_a_version_damaged_on_the_server(small_lab, s3, tmp_path):
    repo, bid = _small_repo(tmp_path, 6)  # stored raw (compression none), so its bytes are findable
    prefix = f"damage-{uuid.uuid4().hex[:8]}"
    t = _target(s3, prefix)
    s3copy.copy_repository(repo, t, days=1)
    rel = sorted(r for r in s3copy.read_index(t)["objects"] if r.startswith("chunks/"))[0]
    needle = (repo / rel).read_bytes()[4096:4160]
    # flip a bit of that version where SeaweedFS keeps it (its volume files)
    hits = 0
    for f in (small_lab.lab.state / "s3" / "data").rglob("*.dat"):
        data = bytearray(f.read_bytes())
        i = data.find(needle)
        if i >= 0:
            with open(f, "r+b") as fh:
                fh.seek(i + 10)
                fh.write(bytes([data[i + 10] ^ 1]))
            hits += 1
    assert hits == 1
    # SeaweedFS spends about 26 s failing to read a damaged needle: one try, not five
    e = _s3_env(dict(os.environ), s3, tmp_path / "cache") | {"AWS_MAX_ATTEMPTS": "1"}
    url = f"s3://{s3['bucket']}/{prefix}"
    run("verify", "--repo", url, env=e)  # without --read-data: every version is there
    p = run("verify", "--repo", url, "--read-data", "--json", env=e, expect=1)
    problems = json.loads(p.stdout)["problems"]
    assert {(x["kind"], x["object"]) for x in problems if x["object"] == t.key(rel)} == {
        ("unreadable_object", t.key(rel))
    }, problems
    assert any(x["kind"] == "missing_chunk" and x["affected"][0]["backup"] == bid for x in problems), problems


@pytest.mark.parametrize(
    "repo, change, code, message",
    [
        ("s3://A_B/x", {}, 2, "is not s3://BUCKET/PREFIX"),
        ("s3://vmbackup-lab/never-copied", {}, 1, "holds no copy"),
        ("s3://vmbackup-lab/x", {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, 1, "reading the index of"),
        ("s3://no-such-bucket-vmb/x", {}, 1, "NoSuchBucket"),
    ],
)
def test_a_copy_that_cannot_be_read_is_one_line(s3, tmp_path, repo, change, code, message):
    e = _s3_env(dict(os.environ), s3, tmp_path / "cache") | change
    p = run("snapshots", "--repo", repo, env=e, expect=code)
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert s3["secret_key"] not in p.stderr and "wrong-secret" not in p.stderr
