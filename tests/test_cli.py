"""The command line's contract: exit codes, one clear line for bad input,
JSON on stdout only, no Prefect at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MiB, backdate


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(MiB) + bytes(MiB))
    return p


BAD_INPUT = [
    ("missing source", ["backup-disk", "--vm", "v", "{tmp}/nope.img"], "does not exist"),
    ("source is a directory", ["backup-disk", "--vm", "v", "{tmp}"], "neither a file nor a block device"),
    (
        "changed extents without parent",
        ["backup-disk", "--vm", "v", "--changed-extents", "{tmp}/e.json", "{disk}"],
        "needs --parent",
    ),
    (
        "unknown parent",
        [
            "backup-disk",
            "--vm",
            "v",
            "--parent",
            "20260101T000000Z-00000000",
            "--changed-extents",
            "{tmp}/e.json",
            "{disk}",
        ],
        "no backup",
    ),
    (
        "extents not JSON",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/bad.json", "{disk}"],
        "not JSON",
    ),
    (
        "extent past the end",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/far.json", "{disk}"],
        "past the end",
    ),
    (
        "allocated extent past the end",
        ["backup-disk", "--vm", "v", "--allocated-extents", "{tmp}/far.json", "{disk}"],
        "past the end",
    ),
    (
        "allocated extents not JSON",
        ["backup-disk", "--vm", "v", "--allocated-extents", "{tmp}/bad.json", "{disk}"],
        "allocated extents",
    ),
    (
        "allocated and changed extents",
        [
            "backup-disk",
            "--vm",
            "v",
            "--parent",
            "{parent}",
            "--changed-extents",
            "{tmp}/e.json",
            "--allocated-extents",
            "{tmp}/e.json",
            "{disk}",
        ],
        "not both",
    ),
    ("vmdk sniffed by content", ["backup-disk", "--vm", "v", "{tmp}/x.raw"], "VMDK"),
    ("unknown backup", ["restore-disk", "20260101T000000Z-00000000", "{tmp}/out"], "no backup"),
    ("hostile id", ["restore-disk", "../../etc/passwd", "{tmp}/out"], "not a backup id"),
    ("unknown disk", ["restore-disk", "--disk", "ide0:0", "{parent}", "{tmp}/out"], "no disk"),
    ("output exists", ["restore-disk", "{parent}", "{disk}"], "refusing to overwrite"),
    ("empty output", ["restore-disk", "{parent}", ""], "OUTPUT is empty"),
    ("forget unknown", ["forget", "nope"], "no backup"),
    ("verify unknown", ["verify", "20260101T000000Z-00000000"], "no backup"),
    ("prune without rules", ["prune"], "at least one --keep"),
    ("not a repository", ["snapshots", "--repo", "{tmp}"], "not a vmbackup repository"),
    ("bad chunk size", ["init", "--repo", "{tmp}/new", "--chunk-size", "3MiB"], "power of two"),
    ("chunk size too small", ["init", "--repo", "{tmp}/new", "--chunk-size", "64KiB"], "power of two"),
    ("bad compression", ["init", "--repo", "{tmp}/new", "--compression", "brotli"], "unsupported compression"),
    ("init non-empty", ["init", "--repo", "{tmp}"], "not empty"),
    ("corrupt vhdx", ["backup-disk", "--vm", "v", "{tmp}/x.vhdx"], "not a valid VHDX image"),
    # Usage errors: one line that points to --help, not the usage block.
    ("missing arguments", ["backup-disk", "{disk}"], "see `vmbackup backup-disk --help`"),
    ("unknown option", ["snapshots", "--frobnicate"], "unrecognized arguments"),
    ("bad format choice", ["restore-disk", "--format", "qcow2", "{parent}", "{tmp}/out"], "invalid choice"),
    # Numbers beyond 64 bits.
    (
        "extent beyond 64 bits",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/huge.json", "{disk}"],
        "ends beyond",
    ),
    (
        "chunk size beyond 64 bits",
        ["init", "--repo", "{tmp}/new", "--chunk-size", "99999999999999999999999MiB"],
        "too large",
    ),
    ("keep count beyond 64 bits", ["prune", "--keep-last", "99999999999999999999999"], "not a count"),
    ("grace beyond any number", ["gc", "--grace", "1e400"], "not a number of seconds"),
    ("grace not a number", ["gc", "--grace", "nan"], "not a number of seconds"),
    # Deeply nested JSON.
    (
        "deeply nested extents",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/deep.json", "{disk}"],
        "nested too deeply",
    ),
    # A FIFO where a file is expected (it would block a plain open), and a directory.
    (
        "changed extents from a FIFO",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}/fifo", "{disk}"],
        "is not a regular file",
    ),
    (
        "changed extents from a directory",
        ["backup-disk", "--vm", "v", "--parent", "{parent}", "--changed-extents", "{tmp}", "{disk}"],
        "is not a regular file",
    ),
    # Names that are not UTF-8 where the repository stores text.
    ("VM name not UTF-8", ["backup-disk", "--vm", "v\udcff", "{disk}"], "not valid UTF-8"),
    ("backup id not UTF-8", ["restore-disk", "\udcff", "{tmp}/out"], "not valid UTF-8"),
    ("missing source not UTF-8", ["backup-disk", "--vm", "v", "{tmp}/n\udcffpe.img"], "n\\xffpe.img does not exist"),
]


@pytest.mark.parametrize("case,args,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_clear_line(cli, disk, tmp_path, case, args, message):
    parent = cli.json("backup-disk", "--vm", "v", str(disk))["id"]
    (tmp_path / "e.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "far.json").write_text(json.dumps([{"start": 0, "length": 10 * MiB}]))
    (tmp_path / "x.raw").write_bytes(b"KDMV" + bytes(4096))
    (tmp_path / "x.vhdx").write_bytes(b"vhdxfile" + bytes(2 * MiB))
    (tmp_path / "huge.json").write_text(json.dumps([{"start": 2**70, "length": 1}]))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "fifo")
    args = [a.format(tmp=tmp_path, disk=disk, parent=parent) for a in args]
    before = sorted(os.listdir(cli.repo / "backups"))
    p = cli.run(*args, expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert p.stdout == ""
    # Nothing already stored was touched.
    assert sorted(os.listdir(cli.repo / "backups")) == before


DEMO_BAD_INPUT = [
    ("size 0", ["--size", "0", "--dir", "{tmp}/demo"], "at least 32MiB"),
    ("size not whole MiB", ["--size", "33554433", "--dir", "{tmp}/demo"], "whole number of MiB"),
    ("dir under a file", ["--dir", "{tmp}/file/demo"], "cannot be created"),
    ("dir under /proc", ["--dir", "/proc/vmbackup-demo/x"], "cannot be created"),
]


@pytest.mark.parametrize("case,args,message", DEMO_BAD_INPUT, ids=[c[0] for c in DEMO_BAD_INPUT])
def test_demo_bad_input_exits_2_with_one_line_before_the_lab_starts(cli, tmp_path, case, args, message):
    (tmp_path / "file").write_text("")
    p = cli.run("demo", *[a.format(tmp=tmp_path) for a in args], expect=2, repo=False)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "demo").exists()


def test_repo_from_environment(cli, disk):
    env = dict(os.environ, VMBACKUP_REPO=str(cli.repo))
    p = subprocess.run(
        [sys.executable, "-m", "vmbackup", "backup-disk", "--vm", "v", "--json", str(disk)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["disk_size"] == 2 * MiB
    env.pop("VMBACKUP_REPO")
    p = subprocess.run([sys.executable, "-m", "vmbackup", "snapshots"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "VMBACKUP_REPO" in p.stderr


def test_json_results_have_the_contract_fields(cli, disk, tmp_path):
    b = cli.json("backup-disk", "--vm", "v", "--disk", "scsi0:0", str(disk))
    assert {"id", "bytes_read", "bytes_stored", "disk_size"} <= set(b)
    # The second MiB is written zeros, not a hole: read, then recorded without data.
    assert b["disk_size"] == 2 * MiB and b["bytes_read"] == 2 * MiB
    assert b["zero_blocks"] == 1 and b["new_chunks"] == 1
    snaps = cli.json("snapshots")
    assert snaps[0]["id"] == b["id"] and snaps[0]["disks"][0]["name"] == "scsi0:0"
    v = cli.json("verify")
    assert v["ok"] is True and v["backups_checked"] == 1


def test_usage_errors_exit_2_with_one_line(cli):
    for args in (["backup-disk"], ["frobnicate"], [], ["lab"], ["lab", "frobnicate"]):
        p = cli.run(*args, expect=2, repo=False)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "--help`" in lines[0] and "usage:" not in p.stderr, p.stderr


def test_names_that_are_not_utf8_are_backed_up_and_restored(cli, tmp_path):
    """Linux names are bytes: a source, an output and a repository whose
    names are not UTF-8 work like any other (docs/operations.md)."""
    base = os.fsencode(tmp_path)
    data = os.urandom(MiB) + bytes(MiB) + os.urandom(MiB // 2)
    weird_dir = os.path.join(base, b"dir-\xfe")
    os.mkdir(weird_dir)
    sources = [os.path.join(base, b"disk-\xff.img"), os.path.join(weird_dir, b"disk.img")]
    for s in sources:
        with open(s, "wb") as f:
            f.write(data)
    repo = os.fsdecode(os.path.join(base, b"repo-\xfc"))
    cli.run("init", "--repo", repo)
    outputs = [
        os.path.join(base, b"out-\xfd.img"),
        os.path.join(weird_dir, b"out.img"),
        os.path.join(base, b"plain.img"),
    ]
    for s, out in zip(sources + sources[:1], outputs, strict=True):
        b = cli.json("backup-disk", "--repo", repo, "--vm", "v", os.fsdecode(s))
        r = cli.json("restore-disk", "--repo", repo, b["id"], os.fsdecode(out))
        assert r["bytes_written"] > 0 and "\\x" in r["output"] or out.endswith(b"plain.img")
        with open(out, "rb") as f:
            assert f.read() == data
    # The name the mover could not record is in the backup's attributes.
    snaps = cli.json("snapshots", "--repo", repo)
    assert snaps[0]["attributes"]["source"].endswith("disk-\\xff.img")
    # Refused like any other: overwriting, and no temporary file is left behind.
    p = cli.run("restore-disk", "--repo", repo, b["id"], os.fsdecode(outputs[0]), expect=2)
    assert "refusing to overwrite" in p.stderr and p.stderr.count("\n") == 1
    cli.json("restore-disk", "--repo", repo, "--force", b["id"], os.fsdecode(outputs[0]))
    left = [n for d in (base, weird_dir) for n in os.listdir(d) if n.startswith(b".")]
    assert left == []


def test_an_unwritable_stdout_does_not_undo_the_work(cli, disk):
    """`> /dev/full`: the backup is committed and the exit code says so, with
    one line on stderr; a listing, whose only work is its output, fails."""
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "vmbackup",
                "backup-disk",
                "--repo",
                str(cli.repo),
                "--vm",
                "v",
                "--json",
                str(disk),
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.returncode == 0, p.stderr
        assert p.stderr.count("\n") == 1 and "could not write to stdout" in p.stderr, p.stderr
        assert len(cli.json("snapshots")) == 1
        p = subprocess.run(
            [sys.executable, "-m", "vmbackup", "snapshots", "--repo", str(cli.repo)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


def test_repository_commands_do_not_import_prefect(cli, disk, tmp_path):
    # Prefect is installed (make dev): the check below must see it when it is imported.
    code = (
        "import sys, vmbackup.cli as c; {pre}; rc = c.main(sys.argv[1:]); "
        "loaded = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]; "
        "assert not loaded, f'prefect was imported: {{loaded[:3]}}'; sys.exit(rc)"
    )
    env = {**os.environ, "VMBACKUP_STATE_DIR": str(tmp_path / "state")}
    env.pop("PREFECT_API_URL", None)

    def run(args, pre="pass"):
        return subprocess.run(
            [sys.executable, "-c", code.format(pre=pre), *args], capture_output=True, text=True, env=env
        )

    for args in (
        ["snapshots", "--repo", str(cli.repo)],
        ["backup-disk", "--repo", str(cli.repo), "--vm", "v", str(disk)],
        ["verify", "--repo", str(cli.repo)],
        ["gc", "--repo", str(cli.repo), "--dry-run"],
        ["server", "status", "--json"],
    ):
        p = run(args)
        assert p.returncode == 0, p.stderr
    # The control: the same check fails once anything imports Prefect.
    p = run(["snapshots", "--repo", str(cli.repo)], pre="import vmbackup.orchestration.vmtask")
    assert p.returncode != 0 and "prefect was imported" in p.stderr, p.stderr


def test_forget_and_gc_reclaim_space(cli, disk, tmp_path):
    a = cli.json("backup-disk", "--vm", "v", str(disk))
    dry = cli.json("gc", "--grace", "0", "--dry-run")
    assert dry["chunks_removed"] == 0
    cli.json("forget", a["id"])
    assert cli.json("snapshots") == []
    # Written a minute ago: past gc's two seconds of slack, within an hour's grace.
    assert backdate(cli.repo / "chunks", 60) > 0
    dry = cli.json("gc", "--grace", "0", "--dry-run")
    assert dry["chunks_removed"] == 1 and dry["dry_run"] is True
    assert cli.json("gc", "--grace", "3600")["chunks_removed"] == 0  # within the grace period
    g = cli.json("gc", "--grace", "0")
    assert g["chunks_removed"] == 1 and g["bytes_removed"] > 0
    assert cli.json("gc", "--grace", "0")["chunks_removed"] == 0


def test_corrupt_repository_config_is_one_clear_line(cli, disk):
    (cli.repo / "config.json").write_text('{"format": "vmbackup-repository", "version": 1, "chunk')
    for args in (["snapshots"], ["backup-disk", "--vm", "v", str(disk)], ["verify"], ["gc"]):
        p = cli.run(*args, expect=1)
        assert p.stderr.count("\n") == 1 and "config.json is corrupt" in p.stderr, p.stderr
    (cli.repo / "config.json").write_text(
        json.dumps(
            {
                "format": "vmbackup-repository",
                "version": 9,
                "id": "x",
                "chunk_size": MiB,
                "compression": "none",
                "created": "",
            }
        )
    )
    p = cli.run("snapshots", expect=1)
    assert "version 9 is not supported" in p.stderr


def _vm_point(repo, disk, label, attributes):
    """A real point labelled ``label`` with the attributes the hypervisors'
    procedure writes (the keys `snapshots` reads)."""
    from vmbackup import _mover

    session = _mover.BackupSession(str(repo), label, None)
    session.add_disk(str(disk), "scsi0:0", None, None)
    return session.commit(attributes=json.dumps(attributes)).id


def test_snapshots_tell_two_vms_of_one_name_apart_and_forget_and_restore_go_by_id(cli, tmp_path):
    data = {}
    for who in ("a", "b"):
        p = tmp_path / f"{who}.img"
        p.write_bytes(os.urandom(MiB))
        data[who] = p
    a = _vm_point(cli.repo, data["a"], "web01", {"vm": "web01", "vm_id": "uuid-a", "host": "esx1"})
    b = _vm_point(cli.repo, data["b"], "web01", {"vm": "web01", "vm_id": "uuid-b", "host": "esx2"})
    # A renamed VM's incremental keeps the chain's label; its name is in the attributes.
    renamed = _vm_point(cli.repo, data["a"], "app", {"vm": "app-new", "vm_id": "uuid-c"})
    plain = cli.json("backup-disk", "--vm", "web01", str(data["a"]))["id"]

    snaps = {s["id"]: s for s in cli.json("snapshots")}
    old_keys = {"id", "vm", "created", "parent", "disk_size", "bytes_stored", "disks", "attributes", "trusted"}
    assert all(old_keys | {"vm_id", "host"} <= set(s) for s in snaps.values())
    assert [(snaps[i]["vm"], snaps[i]["vm_id"], snaps[i]["host"]) for i in (a, b, plain)] == [
        ("web01", "uuid-a", "esx1"),
        ("web01", "uuid-b", "esx2"),
        ("web01", None, None),
    ]
    # --vm matches by name: both VMs named web01 (and the backup-disk point),
    # and the renamed VM by its new name although its label is the old one.
    assert sorted(s["id"] for s in cli.json("snapshots", "--vm", "web01")) == sorted([a, b, plain])
    assert [s["id"] for s in cli.json("snapshots", "--vm", "app-new")] == [renamed]
    assert [s["id"] for s in cli.json("snapshots", "--vm", "app")] == [renamed]
    table = cli.run("snapshots", "--vm", "web01").stdout
    line = {i: next(x for x in table.splitlines() if i in x) for i in (a, b, plain)}
    assert "uuid-a" in line[a] and "esx1" in line[a] and "uuid-b" in line[b] and "esx2" in line[b]
    assert "HOST" in table.splitlines()[0] and "VM_ID" in table.splitlines()[0]

    # forget and restore-disk go by backup id: one web01 goes, the other restores.
    assert cli.json("forget", a)["forgotten"] == [a]
    assert sorted(s["id"] for s in cli.json("snapshots", "--vm", "web01")) == sorted([b, plain])
    out = tmp_path / "out.img"
    cli.json("restore-disk", b, str(out))
    assert out.read_bytes() == data["b"].read_bytes()


# `vmbackup restore` and `vmbackup maintain drill`: bad input is one line, exit
# 2, found before any Prefect server starts (Prefect is not even imported) and
# before any hypervisor is asked. {vpoint} is a point that says it is a
# Hyper-V VM's (its metadata only: what the checks read).
RESTORE_BAD_INPUT = [
    ("unknown VM", ["--vm", "nope"], "VM nope has no trusted backup point"),
    ("unknown point", ["--vm", "hvvm", "--point", "20260101T000000Z-00000000"], "no trusted backup point 2026"),
    ("point of another VM", ["--vm", "hvvm", "--point", "{disk_point}"], "is of VM v, not hvvm"),
    ("not a hypervisor point", ["--vm", "v"], "not taken from a hypervisor"),
    ("nothing before", ["--vm", "hvvm", "--before", "2000-01-01"], "no trusted backup point before 2000-01-01"),
    ("point and before", ["--vm", "hvvm", "--point", "{vpoint}", "--before", "2026-01-01"], "not allowed with"),
    ("bad time", ["--vm", "hvvm", "--before", "yesterday"], "is not a date or time"),
    ("new name for two VMs", ["--vm", "hvvm", "--vm", "v", "--as", "x"], "--as names one VM"),
    ("VM twice", ["--vm", "hvvm", "--vm", "hvvm"], "--vm hvvm is given twice"),
    ("empty VM name", ["--vm", " "], "must not be empty"),
    ("in place with a new name", ["--vm", "hvvm", "--in-place", "--as", "x"], "takes no --as"),
    ("bad network map", ["--vm", "hvvm", "--network-map", "lan"], "give FROM=TO"),
    ("network mapped twice", ["--vm", "hvvm", "--network-map", "a=b", "--network-map", "a=c"], "mapped twice"),
    ("datastore and path", ["--vm", "hvvm", "--datastore", "ds1", "--path", "D:\\x"], "not allowed with"),
    ("unknown host", ["--vm", "hvvm", "--host", "esx9"], "--host esx9 is not a Hyper-V host of the plan"),
    ("datastore on Hyper-V", ["--vm", "hvvm", "--datastore", "ds1"], "a Hyper-V restore takes --path"),
    ("point's host not in the plan", ["--vm", "gone"], "Hyper-V host hv7, which is not in the plan"),
    ("negative timeout", ["--vm", "hvvm", "--vm-timeout", "-1"], "must not be negative"),
    ("folder on Hyper-V", ["--vm", "hvvm", "--folder", "drills"], "--folder is vSphere's"),
    ("resource pool on Hyper-V", ["--vm", "hvvm", "--resource-pool", "p"], "--resource-pool is vSphere's"),
    ("no repository there", ["--vm", "hvvm", "--repo", "/nonexistent/repo"], "repository /nonexistent/repo does not"),
]
_NO_PREFECT = (
    "import sys, vmbackup.cli as c; rc = c.main(sys.argv[1:]); "
    "loaded = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]; "
    "assert not loaded, f'prefect was imported: {loaded[:3]}'; sys.exit(rc)"
)


@pytest.fixture
def restore_site(cli, disk, tmp_path):
    """A plan with one Hyper-V host (hv1), and points: a plain disk's (VM v),
    Hyper-V VM hvvm's on hv1 and VM gone's on a host the plan no longer has."""
    from vmbackup import _mover

    disk_point = cli.json("backup-disk", "--vm", "v", str(disk))["id"]
    points = {}
    for vm, host in (("hvvm", "hv1"), ("gone", "hv7")):
        s = _mover.BackupSession(str(cli.repo), vm)
        s.add_disk(str(disk), "scsi0:0")
        attrs = {"meta_version": 1, "hypervisor": "hyperv", "vm": vm, "vm_id": "id-" + vm, "mode": "full"}
        attrs.update(full_reason="first", snapshot_unix=1.0, last_full_unix=1.0, host=host, volumes=["D:\\"])
        attrs["disks"] = [{"name": "scsi0:0", "capacity": 2 * MiB, "change_id": None}]
        points[vm] = s.commit(config=json.dumps({"Name": vm}), attributes=json.dumps(attrs)).id
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"hyperv: [{{name: hv1, url: hv1, user: u, password_env: HV_PW}}]\nrepository: {cli.repo}\n"
        "agents: [{name: a1}]\nselection: {vms: ['*']}\n"
    )
    return {"plan": plan, "disk_point": disk_point, "vpoint": points["hvvm"]}


@pytest.mark.parametrize("case,args,message", RESTORE_BAD_INPUT, ids=[c[0] for c in RESTORE_BAD_INPUT])
def test_restore_bad_input_exits_2_before_any_flow(cli, restore_site, tmp_path, case, args, message):
    args = [a.format(**{k: v for k, v in restore_site.items() if k != "plan"}) for a in args]
    env = {**os.environ, "VMBACKUP_STATE_DIR": str(tmp_path / "state"), "HV_PW": "x"}
    env.pop("PREFECT_API_URL", None)
    before = sorted(os.listdir(cli.repo / "backups"))
    p = subprocess.run(
        [sys.executable, "-c", _NO_PREFECT, "restore", "--plan", str(restore_site["plan"]), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert sorted(os.listdir(cli.repo / "backups")) == before
    assert not (tmp_path / "state").exists()  # no server was started


DRILL_BAD_INPUT = [
    ("no drill section", "", [], "has no drill: section"),
    ("sample of none", "drill: {hyperv: {switch: iso}}\n", ["--sample", "0"], "--sample must be at least 1"),
    ("unknown VM", "drill: {hyperv: {switch: iso}}\n", ["--vm", "nope"], "VM nope has no trusted backup point"),
    ("drill path not absolute", "drill: {hyperv: {switch: iso, path: drills}}\n", [], "not an absolute Windows path"),
    ("drill on a host not in the plan", "drill: {hyperv: {switch: iso, host: hv9}}\n", [], "drill.hyperv.host"),
    ("drill nowhere", "drill: {sample: 2}\n", [], "give vsphere (network, folder...) or hyperv"),
]


@pytest.mark.parametrize("case,section,args,message", DRILL_BAD_INPUT, ids=[c[0] for c in DRILL_BAD_INPUT])
def test_drill_bad_input_exits_2_before_any_flow(cli, restore_site, tmp_path, case, section, args, message):
    plan = tmp_path / "drill-plan.yaml"
    plan.write_text(restore_site["plan"].read_text() + section)
    env = {**os.environ, "VMBACKUP_STATE_DIR": str(tmp_path / "state"), "HV_PW": "x"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run(
        [sys.executable, "-c", _NO_PREFECT, "maintain", "drill", "--plan", str(plan), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "state").exists()
