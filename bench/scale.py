"""The scale benchmark: `vmbackup backup` of 300 VMs against 30 VMs on the lab.

Two labs of the same shape, each a topology generated here: 6 ESXi hosts in
one cluster, one agent VM per host (6 agents), and N VMs of one 4 MiB disk,
spread over the hosts round-robin, two VMs of three on their host's local
datastore and the third on one of two shared ones. The plan is the lab's own
(every agent reaching its host, hot-add first) with the default limits. For
N = 30 and N = 300 it times the whole `vmbackup backup --plan` command (full
backups; the Prefect server started before the timing) and counts the vSphere
API requests the lab served during it (`counters.api_calls`, docs/lab.md),
and prints VMs per minute, API calls per VM, the simulator's CPU time, and
the ratios against the targets (issue 16: VMs per minute at 300 within 1.5x
of 30; API calls per VM at 300 within 1.2x of those at 30).

Uses the local Prefect server vmbackup keeps (started before the timing) or
$PREFECT_API_URL. Run: ``python bench/scale.py [--dir bench-output/scale]
[--sizes 30,300] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vmbackup_lab.plan import PASSWORD_ENV, write_lab_plan
from vmbackup_lab.process import lab_down, lab_up

VMBACKUP = [str(Path(sys.executable).with_name("vmbackup"))]
HOSTS = [f"esx{i}" for i in range(1, 7)]
SHARED = ["shared1", "shared2"]
DISK_MIB = 4
TARGET_SPEED = 1.5  # VMs/min at the large size at least the small size's / 1.5
TARGET_CALLS = 1.2  # API calls per VM at the large size at most 1.2x the small size's


def topology(n: int) -> dict:
    vms = []
    for i in range(n):
        host = HOSTS[i % len(HOSTS)]
        ds = SHARED[(i // 3) % len(SHARED)] if i % 3 == 2 else f"{host}-local"
        vms.append(
            {"name": f"vm{i:04d}", "host": host, "datastore": ds, "disks": [{"bus": "scsi", "size_mib": DISK_MIB}]}
        )
    return {
        "mode": "vcenter",
        "datacenter": "dc1",
        "clusters": [{"name": "cluster1", "hosts": HOSTS}],
        "shared_datastores": SHARED,
        "agents_per_host": 1,
        "vms": vms,
    }


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(n: int, out: Path) -> dict:
    state = out / f"lab-{n}"
    lab_down(state)
    topo = out / f"topology-{n}.json"
    topo.write_text(json.dumps(topology(n)))
    t_up = time.monotonic()
    lab = lab_up(state, topo)
    up_s = time.monotonic() - t_up
    try:
        plan_path = write_lab_plan(lab.state, lab.summary())
        env = dict(os.environ, **{PASSWORD_ENV: lab.password})
        pid = lab.summary()["pid"]
        calls0 = lab.counters()["api_calls"]
        cpu0 = cpu_seconds(pid)
        t = time.monotonic()
        p = subprocess.run(
            VMBACKUP + ["backup", "--plan", str(plan_path), "--json"], env=env, stdout=subprocess.PIPE, text=True
        )
        wall = time.monotonic() - t
        calls = lab.counters()["api_calls"] - calls0
        sim_cpu = cpu_seconds(pid) - cpu0
    finally:
        lab_down(state)
    rows = json.loads(p.stdout)["vms"] if p.stdout.strip() else []
    if len(rows) != n:
        sys.exit(f"{n} VMs: `vmbackup backup` exited {p.returncode} with {len(rows)} rows")
    # A failed VM is reported (and fails the targets), not hidden: the figures stand beside it.
    failed = [f"{r['vm']}: {r['error']}" for r in rows if r["status"] != "ok"]
    rows = [r for r in rows if r["status"] == "ok"] or rows
    return {
        "vms": n,
        "lab_up_s": up_s,
        "wall_s": wall,
        "vms_per_min": 60 * n / wall,
        "api_calls": calls,
        "api_calls_per_vm": calls / n,
        "simulator_cpu_s": sim_cpu,
        "adapter_s_median": statistics.median(r["seconds"] for r in rows),
        "held_s_median": statistics.median(r.get("held_seconds") or 0.0 for r in rows),
        "limit_wait_s_median": statistics.median(r.get("limit_wait_seconds") or 0.0 for r in rows),
        "transports": sorted({r["transport"] for r in rows if r.get("transport")}),
        "failed": len(failed),
        "first_failure": failed[0] if failed else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench-output/scale")
    ap.add_argument("--sizes", default="30,300", help="the small and the large number of VMs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    small, large = (int(x) for x in args.sizes.split(","))
    out = Path(args.dir).resolve()
    for n in (small, large):
        lab_down(out / f"lab-{n}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not os.environ.get("PREFECT_API_URL"):  # the server is started (and warm) before anything is timed
        from vmbackup.localserver.server import ensure_server

        os.environ["PREFECT_API_URL"] = ensure_server().api_url
    load_before = os.getloadavg()
    results = [measure(small, out), measure(large, out)]
    load = os.getloadavg()
    a, b = results
    speed_ratio = a["vms_per_min"] / b["vms_per_min"]
    calls_ratio = b["api_calls_per_vm"] / a["api_calls_per_vm"]
    summary = {
        "results": results,
        "speed_ratio": speed_ratio,
        "calls_ratio": calls_ratio,
        "targets_met": speed_ratio <= TARGET_SPEED
        and calls_ratio <= TARGET_CALLS
        and not any(r["failed"] for r in results),
        "load_before": load_before,
        "load_after": load,
        "cpus": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{'':24}" + "".join(f"{str(r['vms']) + ' VMs':>14}" for r in results))
    for k in [k for k in a if k not in ("vms", "first_failure")]:
        cells = []
        for r in results:
            v = r[k]
            cells.append(
                f"{v:>14.2f}" if isinstance(v, float) else f"{', '.join(v) if isinstance(v, list) else v!s:>14}"
            )
        print(f"{k:24}" + "".join(cells))
    print(
        f"VMs per minute, {small} over {large}: {speed_ratio:.2f}x (target <= {TARGET_SPEED}x); "
        f"API calls per VM, {large} over {small}: {calls_ratio:.2f}x (target <= {TARGET_CALLS}x)"
    )
    print(
        f"load average (1/5/15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, on {os.cpu_count()} CPUs"
    )
    for r in results:
        if r["failed"]:
            print(f"{r['vms']} VMs: {r['failed']} failed, e.g. {r['first_failure']}")
    print("targets: " + ("met" if summary["targets_met"] else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
