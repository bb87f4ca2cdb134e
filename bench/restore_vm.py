#!/usr/bin/env python3
"""Whole-VM restore through the lab, as a user gets it: the part of
``make bench-restore`` after the mover's rows (bench/restore.py).

A lab (``vmbackup lab up``) of one ESXi host with one powered-off VM
``big01`` whose one disk is 2 GiB, filled with bench/run.py's VM-like image
(about 40% holes, 30% text, 20% random, 10% duplicated 1 MiB blocks: the
bytes of the mover's rows) through the datastore's ``/folder`` upload that
the lab serves (the lab's ``write`` puts only incompressible patterns),
is backed up once (``vsphere.procedure.backup_vm``), then restored as a new
VM through ``hypervisors.restore.restore_one`` and the vSphere restore steps
(``vsphere.restore.VSphereRestoreSteps``), each a median of --runs:

  hotadd   the new thin disk hot-added writable to the agent VM of the host,
           the mover writing only the point's non-zero blocks;
  folder   the same restore by an agent that cannot hot-add (a plan agent
           without ``vm``/``device_dir``: a machine outside vSphere), so the
           adapter streams the disk through the datastore's HTTPS ``/folder``.

Each row: the RTO (the row's ``seconds``), the bytes the row wrote, and the
floor: ``dd bs=1M conv=fsync`` of the bytes the restored disk holds on the
datastore (its allocated bytes, the same for both rows) into a new file in
the lab's datastore directory, right after the restore; the ratio is taken
per run, then the median. Beside it, what the lab itself costs, measured
apart: for hot-add, the detach (the simulator copies what the agent wrote
into its disk model then: ``persist`` in lab/vsphere/restore.go; a real ESXi
wrote the blocks into the VMDK as they came); for both, the CPU seconds of
the restore (mover and Python) and of the lab's simulator during it (the
simulator decrypts the upload's TLS and stores it grain by grain); and the
repository read alone, as the upload reads it.

Then a drill of the default lab's VMs (``vmbackup lab up`` without a
topology, a ``drill:`` section naming every VM): every VM backed up with
``vmbackup backup --plan``, then ``vmbackup maintain drill --plan --json``
timed (its wall clock and each VM's RTO), --runs times in the same lab.

Usage: ``bench/restore_vm.py [--size 2GiB] [--runs 3] [--dir DIR]
[--parts vm,drill]``. Writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))
sys.path.insert(0, str(ROOT / "lab" / "python"))
sys.path.insert(0, str(ROOT / "bench"))
import yaml  # noqa: E402
from restore import MiB, allocated, settle, write_floor  # noqa: E402
from vmbackup import _mover  # noqa: E402
from vmbackup.cli.output import fmt_bytes  # noqa: E402
from vmbackup.cli.parsing import parse_size  # noqa: E402
from vmbackup_lab import lab_down, lab_up  # noqa: E402
from vmbackup_lab.diskimage import make_image  # noqa: E402
from vmbackup_lab.plan import HYPERV_PASSWORD_ENV, PASSWORD_ENV, write_lab_plan  # noqa: E402

VM = "big01"
DISK = "scsi0:0"
DATASTORE = "esx1-local"
VMBACKUP = [str(Path(sys.executable).with_name("vmbackup"))]


def topology(size: int) -> dict:
    return {
        "mode": "vcenter",
        "datacenter": "dc1",
        "clusters": [{"name": "cluster1", "hosts": ["esx1"]}],
        "shared_datastores": [],
        "agents_per_host": 1,
        "s3": False,
        "vms": [
            {
                "name": VM,
                "host": "esx1",
                "datastore": DATASTORE,
                "power": "off",
                "disks": [{"bus": "scsi", "size_mib": size // MiB}],
            }
        ],
    }


class StepTimes:
    """Wraps methods of the steps object in place, summing each one's seconds."""

    def __init__(self, steps: Any, names: list[str]) -> None:
        self.seconds: dict[str, float] = {}
        for name in names:
            setattr(steps, name, self._timed(name, getattr(steps, name)))

    def _timed(self, name: str, f: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        return timed


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process (all its threads) or by ``pid``."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flat(file: str) -> str:
    """``[ds] vm/vm.vmdk`` -> ``vm/vm-flat.vmdk``."""
    rel = file.split("] ", 1)[1]
    return rel[: -len(".vmdk")] + "-flat.vmdk"


def upload(client: Any, path_in_ds: str, data: Any, size: int) -> None:
    """A ``/folder`` PUT of ``size`` bytes (an iterable of pieces) with the product's own HTTP code."""
    from vmbackup.vsphere.restore import _http
    from vmbackup.vsphere.transport import folder_url

    url = folder_url(client.base_url, path_in_ds, "dc1", DATASTORE)
    status, body = _http(client, "PUT", url, data, size)
    if status not in (200, 201, 204):
        raise SystemExit(f"PUT {path_in_ds}: HTTP {status} {body}")


def file_pieces(path: Path, piece: int = 4 * MiB):
    with open(path, "rb") as f:
        while b := f.read(piece):
            yield b


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            p, q = x.read(16 * MiB), y.read(16 * MiB)
            if p != q:
                return False
            if not p:
                return True


def bench_vm(work: Path, size: int, runs: int, image: Path, payload: Path, modes: list[str]) -> dict:
    from vmbackup.hypervisors.base import RestoreRequest
    from vmbackup.hypervisors.restore import restore_one
    from vmbackup.plan import Selection, load_plan, resolve_password
    from vmbackup.vsphere.client import VSphereClient
    from vmbackup.vsphere.inventory import disks_of, select_vms
    from vmbackup.vsphere.procedure import backup_vm
    from vmbackup.vsphere.restore import VSphereRestoreSteps, describe_point, destroy_vm

    state = work / "lab"
    lab_down(state)
    shutil.rmtree(state, ignore_errors=True)
    topo = work / "topology.json"
    topo.write_text(json.dumps(topology(size), indent=1))
    lab = lab_up(state, topo)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    lab_costs: dict[str, list[float]] = {"repo_read": []}
    try:
        summary = lab.summary()
        ds_dir = Path(summary["datastores"][DATASTORE])
        sim = int(summary["pid"])
        plan_path = write_lab_plan(lab.state, summary)
        os.environ[PASSWORD_ENV] = lab.password
        repo = work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        _mover.init_repository(str(repo))
        plan = load_plan(plan_path).model_copy(update={"repository": repo})
        client = VSphereClient.connect(plan.connection, resolve_password(plan.connection))
        (info,) = select_vms(client, Selection(vms=[VM]))
        src = client.find_vm(VM)
        ((_, dev),) = disks_of(list(src.config.hardware.device))
        print(f"filling {VM} {DISK} with the {fmt_bytes(size)} image through /folder ...", file=sys.stderr)
        upload(client, _flat(dev.backing.fileName), file_pieces(image), size)
        agent = next(a for a in plan.agents if "esx1" in a.hosts)
        print("backing it up ...", file=sys.stderr)
        b = backup_vm(client, info, plan, agent, run_id="bench-backup")
        if b.status != "ok":
            raise SystemExit(f"backup of {VM} failed: {b.error}")
        point = b.backup_id
        infos, _ = _mover.list_backups(str(repo))
        pinfo = next(i for i in infos if i.id == point)
        desc = describe_point(pinfo.config, pinfo.attributes)
        # An agent that cannot hot-add: no agent VM (a machine outside vSphere).
        blind = agent.model_copy(update={"name": agent.name + "-outside", "vm": None, "device_dir": None})
        for run in range(runs):
            for mode in rows:
                new = f"{VM}-r{run}-{mode}"
                req = RestoreRequest(vm=VM, point=point, restored_as=new)
                steps = VSphereRestoreSteps(
                    client, req, plan, agent if mode == "hotadd" else blind, run_id=f"bench-{run}-{mode}"
                )
                timed = StepTimes(steps, ["create", "write_disk", "finish", "_detach", "release"])
                settle()
                cpu0, sim0 = cpu_seconds(), cpu_seconds(sim)
                res = restore_one(
                    steps,
                    req,
                    desc,
                    hypervisor="vsphere",
                    repository=str(repo),
                    agent=agent.name,
                    disks_per_vm=plan.limits.disks_per_vm,
                )
                cpu, sim_cpu = cpu_seconds() - cpu0, cpu_seconds(sim) - sim0
                if res.status != "ok" or res.transport != mode:
                    raise SystemExit(f"restore {new}: {res.status} through {res.transport}: {res.error}")
                flat = ds_dir / new / f"{new}-flat.vmdk"
                stored = allocated(flat)
                floor = write_floor(payload, stored, ds_dir / "floor.bin")
                if run == 0:
                    got = work / "restored.img"
                    lab.disk_image(new, DISK, got)
                    if not same_file(got, image):
                        raise SystemExit(f"restore {new} ({mode}) does not equal the backup")
                    got.unlink()
                rows[mode].append(
                    dict(
                        seconds=res.seconds,
                        bytes_written=res.bytes_written,
                        stored=stored,
                        floor=floor,
                        steps=timed.seconds,
                        cpu=cpu,
                        sim_cpu=sim_cpu,
                    )
                )
                destroy_vm(client.find_vm(new), 600)
            # The repository read alone, as the upload reads it.
            settle()
            t = time.perf_counter()
            for _ in _read_point(str(repo), point, DISK):
                pass
            lab_costs["repo_read"].append(time.perf_counter() - t)
        client.close()
    finally:
        lab_down(state)
    return {"rows": rows, "lab": lab_costs}


def _read_point(repo: str, point: str, disk: str, piece: int = 4 * MiB):
    """The point's disk in pieces, as the adapter's upload reads it."""
    reader = _mover.DiskReader.backup(repo, point, disk)
    for off in range(0, reader.size, piece):
        yield reader.read(off, min(piece, reader.size - off))


def vmbackup(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(VMBACKUP + args, env=env, stdout=subprocess.PIPE, text=True)


def bench_drill(work: Path, runs: int) -> dict:
    """The default lab's VMs backed up, then drills of all of them, timed (the median run)."""
    state = work / "lab-default"
    os.environ.setdefault("VMBACKUP_LAB_S3", "0")  # no object storage: the drill does not copy
    lab_down(state)
    shutil.rmtree(state, ignore_errors=True)
    lab = lab_up(state)
    try:
        summary = lab.summary()
        plan_path = write_lab_plan(lab.state, summary)
        plan = yaml.safe_load(plan_path.read_text())
        repo = work / "repo-drill"
        shutil.rmtree(repo, ignore_errors=True)
        _mover.init_repository(str(repo))
        plan["repository"] = str(repo)
        plan["drill"] = {
            "vsphere": {"network": "VM Network"},
            "hyperv": {"switch": "Isolated"},
            "sample": 100,
            "vms": ["*"],
        }
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        env = dict(os.environ, **{PASSWORD_ENV: lab.password})
        if summary.get("hyperv"):
            env[HYPERV_PASSWORD_ENV] = summary["hyperv"]["password"]
        if not env.get("PREFECT_API_URL"):
            from vmbackup.localserver.server import ensure_server

            ensure_server()  # started (and warm) before anything is timed
        p = vmbackup(["backup", "--plan", str(plan_path), "--json"], env)
        backed = json.loads(p.stdout)["vms"] if p.stdout else []
        if p.returncode != 0 or not backed:
            raise SystemExit(f"backup of the default lab failed (exit {p.returncode})")
        drills = []
        for _ in range(runs):
            t = time.perf_counter()
            p = vmbackup(["maintain", "drill", "--plan", str(plan_path), "--json"], env)
            wall = time.perf_counter() - t
            out = json.loads(p.stdout) if p.stdout else {}
            if p.returncode != 0:
                raise SystemExit(f"the drill failed (exit {p.returncode}): {out.get('failed')}")
            drills.append(
                {
                    "seconds": wall,
                    "vms": {r["vm"]: r["seconds"] for r in out["vms"]},
                    "passed": out["passed"],
                    "bytes_written": sum(r["bytes_written"] or 0 for r in out["vms"]),
                }
            )
        return dict(sorted(drills, key=lambda d: d["seconds"])[len(drills) // 2], runs=[d["seconds"] for d in drills])
    finally:
        lab_down(state)


def report(size: int, runs: int, vm: dict | None, drill: dict | None, work: Path) -> None:
    med = statistics.median
    results: dict[str, Any] = {}
    if vm is not None:
        print(f"whole-VM restore of a {fmt_bytes(size)} VM-like disk through the lab in {work} (median of {runs})")
        print(
            f"{'':22} {'RTO s':>7} {'written':>10} {'stored':>10} {'MB/s':>6} {'floor s':>8} {'ratio':>6}"
            f" {'lab s':>6} {'ratio-lab':>9}"
        )
        for mode, rs in vm["rows"].items():
            secs = med(r["seconds"] for r in rs)
            written = int(med(r["bytes_written"] for r in rs))
            stored = int(med(r["stored"] for r in rs))
            floor = med(r["floor"] for r in rs)
            ratio = med(r["seconds"] / r["floor"] for r in rs)
            # the lab's part: hot-add's detach (the simulator's write-back into its disk model)
            lab_s = [r["steps"].get("_detach", 0.0) if mode == "hotadd" else 0.0 for r in rs]
            ratio_lab = med((r["seconds"] - s) / r["floor"] for r, s in zip(rs, lab_s, strict=True))
            steps = {k: med(r["steps"].get(k, 0.0) for r in rs) for k in rs[0]["steps"]}
            results[mode] = dict(
                seconds=secs,
                bytes_written=written,
                stored=stored,
                floor_seconds=floor,
                ratio=ratio,
                lab_seconds=med(lab_s),
                ratio_without_lab=ratio_lab,
                steps=steps,
                runs=rs,
            )
            name = {"hotadd": "(f) VM, hot-add", "folder": "(g) VM, /folder upload"}[mode]
            lab_txt = f"{med(lab_s):6.2f} {ratio_lab:9.2f}" if mode == "hotadd" else f"{'-':>6} {'-':>9}"
            print(
                f"{name:22} {secs:7.2f} {fmt_bytes(written):>10} {fmt_bytes(stored):>10}"
                f" {stored / secs / 1e6:6.0f} {floor:8.2f} {ratio:6.2f} {lab_txt}"
            )
            print(f"{'':22} steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
            cpu, sim_cpu = med(r["cpu"] for r in rs), med(r["sim_cpu"] for r in rs)
            results[mode].update(cpu_seconds=cpu, simulator_cpu_seconds=sim_cpu)
            print(f"{'':22} CPU (s): restore (mover + Python) {cpu:.2f}, lab simulator {sim_cpu:.2f}")
        read = med(vm["lab"]["repo_read"])
        results["repo_read_seconds"] = read
        print(f"reading the point alone, as the upload reads it: {read:.2f} s")
        if "hotadd" in results and "folder" in results:
            h, f = results["hotadd"], results["folder"]
            print(
                f"targets: hot-add within 1.2x of the floor: {'met' if h['ratio'] <= 1.2 else 'NOT met'}"
                f" ({h['ratio']:.2f}x; {h['ratio_without_lab']:.2f}x without the lab's write-back);"
                f" /folder within 1.5x: {'met' if f['ratio'] <= 1.5 else 'NOT met'} ({f['ratio']:.2f}x)"
            )
    if drill is not None:
        results["drill"] = drill
        per_vm = ", ".join(f"{k} {v:.1f}" for k, v in sorted(drill["vms"].items()))
        verdict = "met" if drill["seconds"] < 60 else "NOT met"
        print(
            f"drill of the default lab's {len(drill['vms'])} VMs: {drill['seconds']:.1f} s (median of"
            f" {', '.join(f'{s:.1f}' for s in drill['runs'])}; under a minute: {verdict}); RTO per VM (s): {per_vm}"
        )
    load = os.getloadavg()
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    (work / "results.json").write_text(json.dumps(dict(size=size, results=results), indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="bench-output/restore-vm", help="work directory (default: %(default)s)")
    ap.add_argument("--parts", default="vm,drill", help="which parts (default: %(default)s)")
    ap.add_argument("--modes", default="hotadd,folder", help="which VM restores (default: %(default)s)")
    args = ap.parse_args()
    size = parse_size(args.size)
    parts = args.parts.split(",")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", file=sys.stderr)
    vm = drill = None
    if "vm" in parts:
        image = work / "disk.img"
        if not (image.exists() and image.stat().st_size == size):
            print(f"generating a {fmt_bytes(size)} image ...", file=sys.stderr)
            make_image(str(image), size, seed=2026)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
        payload = Path(tempfile.mkstemp(dir=shm, prefix="vmbackup-bench-restore-vm-")[1])
        try:
            with open(image, "rb") as src, open(payload, "wb") as out:
                shutil.copyfileobj(src, out, 16 * MiB)
            vm = bench_vm(work, size, args.runs, image, payload, args.modes.split(","))
        finally:
            payload.unlink(missing_ok=True)
    if "drill" in parts:
        drill = bench_drill(work, args.runs)
    report(size, args.runs, vm, drill, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
