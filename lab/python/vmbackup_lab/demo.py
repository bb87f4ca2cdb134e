"""`vmbackup demo` (what `make demo` runs): the main job on the lab.

The lab (a simulated vCenter, a Hyper-V host and an S3 server with Object
Lock, its state under DIR/lab) is started with an encrypted repository (the
lab's passphrase in DIR/lab/passphrase, the plan's passphrase_env), every VM
of its plan, vSphere and Hyper-V, is backed up with `vmbackup backup --plan`
(one run of the backup_vms Prefect flow on the local Prefect server that
vmbackup starts and keeps), the guests write, a second run backs up again
(vSphere: incremental, only what CBT reports as changed; Hyper-V: the disks
read again from a new shadow copy, only new chunks stored), `vmbackup copy
--plan` copies the repository to the lab's S3 under Object Lock (and a
delete of a locked version with the copy's own credentials is refused),
`vmbackup verify --read-data` checks the repository, every disk of the
second backups is restored and compared with the disk as it is now, and a
report says, per VM, how it went. Exit 0 only if every step worked.

The demo drives the product only through its command line, as a person
would; the lab's own calls (guest writes, disk images) go to the lab.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import LabError

# Where the guests write between the two runs (per disk: offset, length).
WRITES = ((1 << 20, 2 << 20), (24 << 20, 1 << 20))


class DemoFailed(Exception):
    pass


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _vmbackup() -> list[str]:
    """The `vmbackup` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("vmbackup")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmbackup.cli.main"]


def _run(args: list[str], env: dict[str, str], what: str, show: bool = True) -> subprocess.CompletedProcess:
    """Runs `vmbackup ARGS`; its stderr goes to the terminal, stdout is returned."""
    if show:
        print(f"   $ vmbackup {' '.join(args)}", flush=True)
    p = subprocess.run(_vmbackup() + args, env=env, capture_output=True, text=True)
    # What vmbackup says on stderr: the Prefect UI's address (said once at
    # the end instead) unless something went wrong.
    said = [line for line in p.stderr.splitlines() if p.returncode != 0 or "local server started" in line]
    for line in said:
        print(f"   {line}", flush=True)
    if p.returncode not in (0, 1):
        raise DemoFailed(f"{what}: `vmbackup {' '.join(args)}` exited {p.returncode}")
    return p


def _backup(plan: Path, env: dict[str, str], label: str) -> tuple[list[dict], float]:
    t = time.monotonic()
    p = _run(["backup", "--plan", str(plan), "--json"], env, label)
    seconds = time.monotonic() - t
    try:
        rows = json.loads(p.stdout)["vms"]
    except (ValueError, KeyError, TypeError):
        raise DemoFailed(f"{label}: `vmbackup backup` printed no report (exit {p.returncode})") from None
    return rows, seconds


def _topology(directory: Path, size: int | None) -> Path | None:
    """The lab's default topology, every disk `size` bytes (None: as it is)."""
    if size is None:
        return None
    default = Path(__file__).resolve().parents[2] / "topologies" / "default.json"
    topo = json.loads(default.read_text())
    for vm in topo["vms"]:
        for d in vm["disks"]:
            d["size_mib"] = max(32, size >> 20)
    path = directory / "topology.json"
    path.write_text(json.dumps(topo, indent=1))
    return path


def _plan_hyperv(plan: Path) -> list[dict]:
    """The Hyper-V hosts of the lab's plan (their password variable)."""
    import yaml

    try:
        return list(yaml.safe_load(plan.read_text()).get("hyperv") or [])
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def _server_is_running(env: dict[str, str]) -> bool:
    p = subprocess.run(_vmbackup() + ["server", "status", "--json"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        return bool(json.loads(p.stdout).get("running"))
    except ValueError:
        return False


def _copy(plan: Path, env: dict[str, str], say: Any) -> list[str]:
    """`vmbackup copy --plan` to the lab's S3, what it did, and a delete of
    one locked version tried with the copy's own credentials; the problems."""
    t = time.monotonic()
    p = _run(["copy", "--plan", str(plan), "--json"], env, "the copy")
    seconds = time.monotonic() - t
    try:
        r = json.loads(p.stdout)
    except ValueError:
        r = None
    if p.returncode != 0 or not isinstance(r, dict):
        return [f"vmbackup copy exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"]
    say(
        f"   {r['backups']} backups in {r['objects']} objects ({_fmt_bytes(r['bytes'])}, ciphertext as in the "
        f"repository) at {r['url']} on {env.get('AWS_ENDPOINT_URL')}"
    )
    say(
        f"   uploaded {r['uploaded']} objects ({_fmt_bytes(r['bytes_uploaded'])}) in {seconds:.1f} s, each checked "
        f"on arrival; every version locked ({r['lock_mode']}) until at least {r['locked_until']}"
    )
    for w in r.get("warnings") or []:
        say(f"   note: {w}")
    refused = _delete_refused(env, r)
    if refused is None:
        return []
    if not refused.startswith("AccessDenied"):
        return [f"deleting a locked version of the copy was not refused: {refused}"]
    say(f"   deleting a locked version with the copy's own credentials: refused by the server ({refused})")
    return []


def _delete_refused(env: dict[str, str], r: dict) -> str | None:
    """Tries to delete one locked object version of the copy (its index) with
    the copy's credentials: the server's error code, "deleted" if it was not
    refused, None if there is nothing to try (no boto3, no index)."""
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        return None
    bucket = str(r.get("url", "")).removeprefix("s3://").split("/", 1)[0]
    key = str(r.get("index") or "")
    if not bucket or not key:
        return None
    s3 = boto3.client(
        "s3",
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name="us-east-1",
    )
    try:
        version = s3.head_object(Bucket=bucket, Key=key)["VersionId"]
        s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
    except botocore.exceptions.ClientError as e:
        return str(e.response.get("Error", {}).get("Code") or e)
    return "deleted"


def report(full: list[dict], inc: list[dict], full_s: float, inc_s: float) -> str:
    """The per-VM report a person reads: both runs side by side, then totals."""
    cols = [
        ("VM", 8),
        ("HYPERVISOR", 10),
        ("RUN", 5),
        ("MODE", 11),
        ("TRANSPORT", 9),
        ("CONSISTENCY", 11),
        ("DISKS", 5),
        ("READ", 10),
        ("STORED", 10),
        ("SNAPSHOT", 8),  # a Hyper-V VM's: its shadow copy
        ("SECONDS", 7),
    ]
    lines = ["  ".join(f"{t:<{w}}" for t, w in cols).rstrip()]
    for label, rows in (("1", full), ("2", inc)):
        # vSphere VMs, then Hyper-V VMs, by name (the runs list them as they finished).
        for r in sorted(rows, key=lambda r: (r.get("hypervisor") != "vsphere", str(r.get("vm")))):
            cells = [
                r.get("vm"),
                r.get("hypervisor"),
                label,
                r.get("mode") if r.get("status") == "ok" else "FAILED",
                r.get("transport"),
                r.get("consistency"),
                len(r.get("disks") or []),
                _fmt_bytes(r.get("bytes_read")),
                _fmt_bytes(r.get("bytes_stored")),
                f"{r.get('snapshot_seconds') or 0:.1f} s",
                f"{r.get('seconds') or 0:.1f}",
            ]
            lines.append(
                "  ".join(
                    f"{str('-' if c is None else c)[:w]:<{w}}" for c, (_, w) in zip(cells, cols, strict=True)
                ).rstrip()
            )
    for label, rows, secs in (("run 1 (first)", full, full_s), ("run 2 (after the writes)", inc, inc_s)):
        ok = sum(r.get("status") == "ok" for r in rows)
        lines.append(
            f"{label}: {ok} of {len(rows)} VMs ok, read {_fmt_bytes(sum(r.get('bytes_read') or 0 for r in rows))}, "
            f"stored {_fmt_bytes(sum(r.get('bytes_stored') or 0 for r in rows))}, {secs:.1f} s for the whole command"
        )
    lines += _why("why full", "full_reason", full + inc)
    lines += _why(
        "why crash-consistent", "consistency_note", [r for r in full + inc if r.get("consistency") == "crash"]
    )
    lines += [f"FAILED {r.get('vm')}: {r.get('error')}" for r in full + inc if r.get("status") != "ok"]
    return "\n".join(lines)


def _why(title: str, key: str, rows: list[dict]) -> list[str]:
    """One line per reason, with the VMs it applies to: ``title: reason (vm, vm)``."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r.get(key):
            vms = by_reason.setdefault(str(r[key]), [])
            if r.get("vm") not in vms:
                vms.append(r.get("vm"))
    return [f"{title}: {reason} ({', '.join(map(str, vms))})" for reason, vms in by_reason.items()]


def run_demo(directory: str, size: int | None = None) -> int:
    from .process import lab_down

    out = Path(directory).resolve()
    state = out / "lab"
    if (state / "lab.json").exists():
        lab_down(state)  # a lab left by an earlier demo
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    say = print
    ok = True
    try:
        ok = _demo(out, state, size, say)
    except DemoFailed as e:
        say(f"demo FAILED: {e}")
        ok = False
    except LabError as e:
        say(f"demo FAILED: the lab: {e}")
        ok = False
    finally:
        if (state / "lab.json").exists():
            say(f"\nThe lab keeps running, for you to look at: stop it with `vmbackup lab down --state {state}`.")
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def _demo(out: Path, state: Path, size: int | None, say: Any) -> bool:
    from .plan import PASSPHRASE_ENV, PASSPHRASE_FILE, PASSWORD_ENV, write_lab_plan
    from .process import lab_up

    t = time.monotonic()
    lab = lab_up(state, _topology(out, size))
    summary = lab.summary()
    # Encrypted, as a plan's repository is by default (docs/plan.md): the
    # passphrase in STATE/passphrase, the plan's passphrase_env names the variable.
    plan = write_lab_plan(lab.state, summary, encrypted=True)
    say(
        f"1. started the lab in {state} ({time.monotonic() - t:.1f} s): a simulated vCenter at "
        f"{summary['vsphere']['url']}, hosts {', '.join(summary['hosts'])}, agents {', '.join(summary['agents'])}"
    )
    hyperv = summary.get("hyperv_hosts") or []
    for h in hyperv:
        say(f"   and a simulated Hyper-V host {h['host']}, WinRM at {h['url']} ({h['transport']}, its own CA)")
    s3 = summary.get("s3")
    if s3:
        say(f"   and an S3 server (SeaweedFS) at {s3['endpoint']}, bucket {s3['bucket']} with Object Lock")
    say(
        f"   its backup plan: {plan} (repository {lab.state / 'repository'}, encrypted: AES-256-GCM, "
        f"its passphrase in {lab.state / PASSPHRASE_FILE})"
    )
    env = dict(os.environ)
    env[PASSWORD_ENV] = lab.password
    envs = [f"${PASSWORD_ENV}"]
    for h in _plan_hyperv(plan):
        if h.get("password_env") and hyperv:
            env[h["password_env"]] = hyperv[0]["password"]
            envs.append(f"${h['password_env']}")
    env[PASSPHRASE_ENV] = (lab.state / PASSPHRASE_FILE).read_text().strip()
    envs.append(f"${PASSPHRASE_ENV}")
    if s3:
        env |= {
            "AWS_ENDPOINT_URL": s3["endpoint"],
            "AWS_ACCESS_KEY_ID": s3["access_key"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        envs.append("$AWS_SECRET_ACCESS_KEY")
    say(
        f"   the passwords, the passphrase{' and the S3 key' if s3 else ''} reach vmbackup through "
        f"{', '.join(dict.fromkeys(envs))}, never the plan"
    )

    if "PREFECT_API_URL" in env:
        say(f"2. Prefect: the server at PREFECT_API_URL={env['PREFECT_API_URL']}")
    elif _server_is_running(env):
        say("2. Prefect: the local server vmbackup started earlier is running; this run uses it")
    else:
        say(
            "2. Prefect: vmbackup now starts its local Prefect server (kept for later runs). The first start on "
            "a machine creates its database: allow up to a minute, it prints the UI's address when it is up."
        )

    say(
        "3. backing up every VM of the plan in one run (full: the allocated areas of every disk; "
        "Hyper-V VMs from a VSS shadow copy)"
    )
    full, full_s = _backup(plan, env, "the first backup")
    failed = [r for r in full if r.get("status") != "ok"]
    if failed or not full:
        say(report(full, [], full_s, 0.0))
        raise DemoFailed(f"{len(failed)} of {len(full)} VMs failed in the first backup")
    kinds = {}
    for r in full:
        kinds[r.get("hypervisor")] = kinds.get(r.get("hypervisor"), 0) + 1
    split = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: str(kv[0])))
    say(f"   {len(full)} VMs ({split}) backed up in {full_s:.1f} s")

    writes = 0
    seed = 100
    for r in full:
        for d in r.get("disks") or []:
            for offset, length in WRITES:
                if offset + length <= d["capacity"]:
                    seed += 1  # data of its own per write, so the repository stores it
                    lab.write(r["vm"], d["name"], offset, length, seed=seed)
                    writes += length
    say(f"4. the guests wrote {_fmt_bytes(writes)} over {sum(len(r['disks']) for r in full)} disks (Lab.write)")

    say(
        "5. backing up every VM again (vSphere: incremental, only the areas CBT reports as changed; "
        "Hyper-V: every disk read again, only new chunks stored)"
    )
    inc, inc_s = _backup(plan, env, "the second backup")
    problems = [f"{r['vm']}: {r.get('error')}" for r in inc if r.get("status") != "ok"]
    problems += [
        f"{r['vm']}: {r.get('mode')} backup, not incremental"
        for r in inc
        if r.get("status") == "ok" and r.get("hypervisor") != "hyperv" and r.get("mode") != "incremental"
    ]

    if s3:
        say(
            "6. copying the repository offsite to the lab's S3 (new chunks, then manifests, then an index; "
            "every object a version locked in compliance mode)"
        )
        problems += _copy(plan, env, say)
    else:
        say('6. no S3 server in this lab (VMBACKUP_LAB_S3=0 or the topology\'s "s3": false): no offsite copy')

    say("7. verifying the repository (every chunk re-read, decrypted and re-hashed)")
    repo = str(lab.state / "repository")
    v = _run(["verify", "--read-data", "--repo", repo, "--json"], env, "verify")
    try:
        verified = json.loads(v.stdout)
    except ValueError:
        verified = {}
    if v.returncode != 0:
        problems.append(f"vmbackup verify exited {v.returncode}: {v.stdout.strip()[:300]}")
    else:
        say(f"   {verified.get('backups_checked', '?')} backups, {verified.get('chunks_checked', '?')} chunks: sound")

    say("8. restoring every disk of the second backups and comparing it with the disk in the lab")
    restored = out / "restored"
    restored.mkdir()
    same = 0
    for r in inc:
        if r.get("status") != "ok":
            continue
        for d in r.get("disks") or []:
            name = d["name"].replace(":", "_")
            got, want = restored / f"{r['vm']}-{name}.img", restored / f"{r['vm']}-{name}.lab.img"
            p = _run(
                ["restore-disk", "--repo", repo, "--disk", d["name"], r["backup_id"], str(got)],
                env,
                "restore",
                show=False,
            )
            if p.returncode != 0:
                problems.append(f"{r['vm']} {d['name']}: restore-disk exited {p.returncode}")
                continue
            lab.disk_image(r["vm"], d["name"], want)
            if _sha256(got) == _sha256(want):
                same += 1
            else:
                problems.append(f"{r['vm']} {d['name']}: the restored disk differs from the lab's")
            got.unlink()
            want.unlink()
    say(f"   {same} disks restored, identical to the lab's")

    # A whole VM of each hypervisor back as a new VM beside the original.
    picks = [
        next((r["vm"] for r in inc if r.get("status") == "ok" and r.get("hypervisor") == k), None)
        for k in ("vsphere", "hyperv")
    ]
    picks = [v for v in picks if v is not None]
    if picks:
        say(f"9. bringing {' and '.join(picks)} back as new VMs (new name, UUIDs and MACs; disks written thin)")
        args = ["restore", "--plan", str(plan), "--json"]
        for v in picks:
            args += ["--vm", v]
        p = _run(args, env, "restore")
        try:
            rows = json.loads(p.stdout)["vms"]
        except (ValueError, KeyError, TypeError):
            rows = []
        if p.returncode != 0 or not rows:
            problems.append(f"vmbackup restore exited {p.returncode}: {(p.stderr or p.stdout).strip()[:300]}")
        for row in rows:
            if row.get("status") != "ok":
                problems.append(f"{row.get('vm')}: restore failed: {row.get('error')}")
                continue
            equal = 0
            for d in row.get("disks") or []:
                disk = d["disk"]
                got, want = restored / f"{row['restored_as']}.img", restored / f"{row['vm']}.lab.img"
                lab.disk_image(row["restored_as"], d.get("restored_as") or disk, got)
                lab.disk_image(row["vm"], disk, want)
                if _sha256(got) == _sha256(want):
                    equal += 1
                else:
                    problems.append(f"{row['restored_as']} {disk}: differs from {row['vm']}'s disk")
                got.unlink()
                want.unlink()
            say(
                f"   {row['vm']} -> {row['restored_as']} on {row.get('host')} in {row.get('seconds', 0):.1f} s (its RTO): "
                f"{equal} of {len(row.get('disks') or [])} disks identical to the original"
            )

    say(
        "\nReport (run 1: full, run 2: after the guests wrote; SNAPSHOT: how long the VM's snapshot, or "
        "Hyper-V shadow copy, stayed open)"
    )
    say(report(full, inc, full_s, inc_s))
    say(f"repository: {repo}   `vmbackup snapshots --repo {repo}` lists its backups")
    if s3:
        say(
            f"its copy: s3://{s3['bucket']}/{s3['prefix']}   `vmbackup snapshots --repo s3://{s3['bucket']}/"
            f"{s3['prefix']}` lists it (the AWS_* variables `vmbackup lab up` prints, and {PASSPHRASE_ENV})"
        )
    for p in problems:
        say(f"PROBLEM {p}")

    st = subprocess.run(_vmbackup() + ["server", "status", "--json"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        server = json.loads(st.stdout)
    except ValueError:
        server = {}
    say(
        "\nThe Prefect UI shows the runs (two backups, a copy, a restore), a flow run each with a task run per VM "
        "(backup-<vm>, restore-<vm>) and its logs:"
    )
    say(f"   open {server.get('ui_url', 'the URL printed above')}  (runs: Runs; the per-VM table: Artifacts)")
    if server.get("auth_file"):
        say(f"   log in with the string in {server['auth_file']} (the server refuses anyone without it)")
    if server.get("managed"):
        say(
            f"   the server keeps running for later runs (state {server.get('state_dir')}): `vmbackup server stop` stops it"
        )
    return not problems
