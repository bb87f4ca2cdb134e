"""The flows' benchmark: `vmbackup backup` of 30 VMs on the lab.

The lab runs lab/topologies/bench-30.json (30 small VMs over 3 hosts, on
local and shared datastores); the plan keeps 2 of the lab's agents (one
reaching esx1 and esx2, one reaching esx3) and the default limits (5 per
agent, 4 per host, 4 per datastore, 2 disks per VM). It measures:

- VMs per minute of the whole `vmbackup backup --plan` command (full, then
  incremental after the guests wrote);
- how long each VM holds its snapshot open (median, max) and how much longer
  than its disks take to read (target: at most 5 s for every VM);
- the flow's overhead: the command's wall time against the sum of the
  mover's time per disk; and Prefect's own overhead per VM (target: median
  at most 1 s): the task run's time as the Prefect server recorded it
  (Running to Completed) minus the wait for the concurrency limits and minus
  the adapter's own time (the row's ``seconds``: vSphere calls and mover).

And 20 Hyper-V VMs on one host (lab/topologies/hyperv-20.json's twenty VMs
moved onto hv1: 14 on D:, 6 on E:; the default limits), backed up twice in
one lab: with one shadow copy set per volume group (the run's pool) and with
one set per VM (``VMBACKUP_HYPERV_SHARED_SETS=0``, the diagnostic): VMs per
minute, the shadow copy sets the host made and the guest quiesces, for both.
``--hyperv-only`` runs only that part.

Uses the local Prefect server vmbackup keeps (started before the timing) or
$PREFECT_API_URL. Run: ``python bench/flows.py [--dir bench-output/flows]``.
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
import urllib.request
from pathlib import Path

import yaml
from vmbackup_lab.plan import HYPERV_PASSWORD_ENV, PASSWORD_ENV, write_lab_plan
from vmbackup_lab.process import lab_down, lab_up

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "lab" / "topologies" / "bench-30.json"
HYPERV_TOPOLOGY = ROOT / "lab" / "topologies" / "hyperv-20.json"
VMBACKUP = [str(Path(sys.executable).with_name("vmbackup"))]


def vmbackup(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(VMBACKUP + args, env=env, stdout=subprocess.PIPE, text=True)


def api(url: str, path: str, body: dict) -> list:
    import base64

    from vmbackup.localserver.server import read_auth

    headers = {"Content-Type": "application/json"}
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or read_auth()  # the local server asks for its string
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def task_runs(api_url: str, n: int) -> dict[str, float]:
    """Running-to-Completed seconds of the newest flow run's task runs, by VM."""
    flow_run = api(api_url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
    out: dict[str, float] = {}
    for _ in range(50):  # task states reach the server as events, shortly after the run
        runs = api(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}, "limit": 200})
        done = [r for r in runs if r["state_type"] == "COMPLETED" and r["start_time"] and r["end_time"]]
        if len(done) >= n:
            break
        time.sleep(0.2)
    from datetime import datetime

    for r in done:
        start, end = (datetime.fromisoformat(r[k].replace("Z", "+00:00")) for k in ("start_time", "end_time"))
        out[r["name"].removeprefix("backup-")] = (end - start).total_seconds()
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(label: str, plan: Path, env: dict, api_url: str | None) -> dict:
    t = time.monotonic()
    p = vmbackup(["backup", "--plan", str(plan), "--json"], env)
    wall = time.monotonic() - t
    rows = json.loads(p.stdout)["vms"]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        sys.exit(f"{label}: {len(failed)} VMs failed, e.g. {failed[0]['vm']}: {failed[0]['error']}")
    runs = task_runs(api_url, len(rows)) if api_url else {}
    disk_seconds = sum(d["seconds"] for r in rows for d in r["disks"])
    # The disks of a VM are read at once (2 per VM): reading takes the longest disk's time.
    extra = [r["snapshot_seconds"] - max(d["seconds"] for d in r["disks"]) for r in rows]
    prefect = []
    for r in rows:
        task = runs.get(r["vm"])
        if task is not None:
            prefect.append(task - r["limit_wait_seconds"] - r["seconds"])
    held = [r["held_seconds"] - r["seconds"] for r in rows]
    return {
        "run": label,
        "vms": len(rows),
        "modes": sorted({r["mode"] for r in rows}),
        "transports": sorted({r["transport"] for r in rows}),
        "wall_s": wall,
        "vms_per_min": 60 * len(rows) / wall,
        "bytes_read": sum(r["bytes_read"] for r in rows),
        "mover_disk_s": disk_seconds,
        "adapter_s_median": median([r["seconds"] for r in rows]),
        "snapshot_s_median": median([r["snapshot_seconds"] for r in rows]),
        "snapshot_s_max": max(r["snapshot_seconds"] for r in rows),
        "snapshot_over_read_s_median": median(extra),
        "snapshot_over_read_s_max": max(extra),
        "prefect_overhead_s_median": median(prefect),
        "prefect_overhead_s_max": max(prefect) if prefect else float("nan"),
        "task_runs_seen": len(prefect),
        "in_task_overhead_s_median": median(held),
        "limit_wait_s_median": median([r["limit_wait_seconds"] for r in rows]),
    }


def one_host_topology(out: Path) -> Path:
    """hyperv-20.json with its twenty Hyper-V VMs on one host (hv1)."""
    topo = json.loads(HYPERV_TOPOLOGY.read_text())
    first = topo["hyperv"][0]
    first["vms"] = [vm for h in topo["hyperv"] for vm in h["vms"]]
    topo["hyperv"] = [first]
    path = out / "hyperv-20-one-host.json"
    path.write_text(json.dumps(topo, indent=1))
    return path


def measure_hyperv(out: Path, api_url: str | None) -> list[dict]:
    """20 Hyper-V VMs of one host: a set per volume group (the pool), then a set per VM."""
    state = out / "lab-hyperv"
    lab_down(state)
    lab = lab_up(state, one_host_topology(out))
    try:
        plan_path = write_lab_plan(lab.state, lab.summary())
        plan = yaml.safe_load(plan_path.read_text())
        (hv,) = lab.hyperv_hosts()
        names = sorted(v["name"] for v in hv.status()["vms"])
        if len(names) != 20:
            sys.exit(f"expected 20 Hyper-V VMs on {hv.host}, found {len(names)}")
        plan["selection"] = {"vms": names}
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        env = dict(os.environ, **{PASSWORD_ENV: lab.password, HYPERV_PASSWORD_ENV: lab.summary()["hyperv"]["password"]})
        results = []
        for label, shared in (("hyperv set per group", "1"), ("hyperv set per VM", "0")):
            st = hv.status()
            sets0, quiesces0 = st["counters"]["shadow_sets_created"], sum(v["quiesce_count"] for v in st["vms"])
            r = measure(label, plan_path, dict(env, VMBACKUP_HYPERV_SHARED_SETS=shared), api_url)
            st = hv.status()
            r["shadow_sets_created"] = st["counters"]["shadow_sets_created"] - sets0
            r["guest_quiesces"] = sum(v["quiesce_count"] for v in st["vms"]) - quiesces0
            if st["shadow_copies"] or st["runs"]:
                sys.exit(f"{label}: the run left {len(st['shadow_copies'])} shadow copies, {len(st['runs'])} runs")
            results.append(r)
        return results
    finally:
        lab_down(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench-output/flows")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hyperv-only", action="store_true", help="only the 20 Hyper-V VMs on one host")
    args = ap.parse_args()
    out = Path(args.dir).resolve()
    state = out / "lab"
    lab_down(state)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.hyperv_only:
        from vmbackup.localserver.server import ensure_server

        api_url = os.environ.get("PREFECT_API_URL") or ensure_server().api_url
        return report(measure_hyperv(out, api_url), {}, args.json)
    lab = lab_up(state, TOPOLOGY)
    try:
        plan_path = write_lab_plan(lab.state, lab.summary())
        plan = yaml.safe_load(plan_path.read_text())
        keep = {"vmbackup-agent-esx1": ["esx1", "esx2"], "vmbackup-agent-esx3": ["esx3"]}
        plan["agents"] = [dict(a, hosts=keep[a["name"]]) for a in plan["agents"] if a["name"] in keep]
        if len(plan["agents"]) != 2:
            sys.exit(f"expected agents {sorted(keep)} in the lab, found {lab.agents}")
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        env = dict(os.environ, **{PASSWORD_ENV: lab.password})
        # The server is started (and warm) before anything is timed.
        api_url = env.get("PREFECT_API_URL")
        if not api_url:
            from vmbackup.localserver.server import ensure_server

            api_url = ensure_server().api_url
        results = [measure("full", plan_path, env, api_url)]
        for name in _vm_names():
            lab.write(name, "scsi0:0", 1 << 20, 1 << 20, seed=5)
        results.append(measure("incremental", plan_path, env, api_url))
        counters = lab.status().get("counters", {})
    finally:
        lab_down(state)
    results += measure_hyperv(out, api_url)
    return report(results, counters, args.json)


def report(results: list[dict], counters: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"results": results, "counters": counters}, indent=1))
        return 0
    keys = list(dict.fromkeys(k for r in results for k in r if k != "run"))
    print(f"{'':30}" + "".join(f"{r['run']:>22}" for r in results))
    for k in keys:
        cells = []
        for r in results:
            v = r.get(k, "-")
            cells.append(
                f"{v:>22.2f}" if isinstance(v, float) else f"{', '.join(v) if isinstance(v, list) else v!s:>22}"
            )
        print(f"{k:30}" + "".join(cells))
    load = os.getloadavg()
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    vsphere = [r for r in results if not r["run"].startswith("hyperv")]
    if vsphere:
        ok = all(r["prefect_overhead_s_median"] <= 1.0 and r["snapshot_over_read_s_max"] <= 5.0 for r in vsphere)
        print("targets (Prefect overhead median <= 1 s, snapshot over read <= 5 s): " + ("met" if ok else "NOT met"))
    hv = {r["run"]: r for r in results if r["run"].startswith("hyperv")}
    if len(hv) == 2:
        pool, per_vm = hv["hyperv set per group"], hv["hyperv set per VM"]
        faster = pool["vms_per_min"] > per_vm["vms_per_min"]
        print(
            f"Hyper-V, 20 VMs on one host: {pool['vms_per_min']:.1f} VMs/min with a set per volume group "
            f"against {per_vm['vms_per_min']:.1f} with a set per VM ({'faster' if faster else 'NOT faster'})"
        )
    return 0


def _vm_names() -> list[str]:
    topo = json.loads(TOPOLOGY.read_text())
    return [v["name"] for v in topo["vms"]]


if __name__ == "__main__":
    sys.exit(main())
