"""``vmbackup lab ...``: start, stop and drive the simulated datacenter.

Exit codes: 0 success, 1 the operation failed, 2 bad input. With ``--json`` exactly
one JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .errors import LabError, LabInputError


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except LabInputError as e:
            print(f"vmbackup lab: {e}", file=sys.stderr)
            return 2
        except LabError as e:
            print(f"vmbackup lab: {e}", file=sys.stderr)
            return 1

    handler.__name__ = func.__name__
    handler.__doc__ = func.__doc__
    return handler


@_guard
def cmd_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from .plan import (
        HYPERV_PASSWORD_ENV,
        HYPERV_PASSWORD_FILE,
        PASSPHRASE_ENV,
        PASSPHRASE_FILE,
        PASSWORD_ENV,
        write_lab_plan,
    )
    from .process import lab_up

    lab = lab_up(args.state, args.topology)
    s = lab.summary()
    s["plan"] = str(write_lab_plan(lab.state, s, encrypted=args.encrypted))
    passphrase = lab.state / PASSPHRASE_FILE
    # The plan follows an existing repository, encrypted or not.
    s["encrypted"] = "passphrase_env" in yaml.safe_load(Path(s["plan"]).read_text())
    if s["encrypted"]:
        s["passphrase_file"] = str(passphrase)
    lines = [f"lab running: {s['vsphere']['url']} (user {s['vsphere']['user']}, CA {s['vsphere']['ca_file']})"]
    for hv in s["hyperv_hosts"]:
        lines.append(
            f"Hyper-V host {hv['host']}: {hv['url']} (user {hv['user']}, {hv['transport']}, CA {hv['ca_file']}, "
            f"shares in {hv['share_root']})"
        )
    if s.get("s3"):
        lines.append(f"S3 (SeaweedFS): {s['s3']['endpoint']} bucket {s['s3']['bucket']} (Object Lock)")
    lines += [f"agents: {', '.join(s['agents'])}", f"plan: {s['plan']}"]
    lines.append(f'export {PASSWORD_ENV}="$(cat {lab.state / "vsphere-password"})"')
    if s["hyperv_hosts"]:
        lines.append(f'export {HYPERV_PASSWORD_ENV}="$(cat {lab.state / HYPERV_PASSWORD_FILE})"')
    if s.get("s3"):
        lines.append(
            f"export AWS_ENDPOINT_URL={s['s3']['endpoint']} AWS_ACCESS_KEY_ID={s['s3']['access_key']} "
            f'AWS_SECRET_ACCESS_KEY="$(cat {lab.state / "s3-secret-key"})"'
        )
    if s["encrypted"]:
        lines.append(f'export {PASSPHRASE_ENV}="$(cat {passphrase})"  # the repository is encrypted')
    _emit(args, s, "\n".join(lines))
    return 0


@_guard
def cmd_down(args: argparse.Namespace) -> int:
    from .process import lab_down

    stopped = lab_down(args.state)
    _emit(args, {"stopped": stopped}, "lab stopped" if stopped else "no lab was running")
    return 0


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    from .process import load_lab

    lab = load_lab(args.state)
    st = lab.status()
    summary = lab.summary()
    st["vsphere"] = summary["vsphere"]
    lines = [f"lab {st['vsphere']['url']} ({st['mode']}), hosts {', '.join(st['hosts'])}"]
    for vm in st["vms"]:
        disks = ", ".join(f"{d['name']} {d['capacity'] >> 20} MiB" for d in vm["disks"])
        extra = f", {len(vm['snapshots'])} snapshot(s)" if vm["snapshots"] else ""
        lines.append(f"  {vm['name']} on {vm['host']}: {vm['power']}, {disks}{extra}")
    urls = {h["host"]: h["url"] for h in summary["hyperv_hosts"]}
    for hv in st["hyperv_hosts"]:
        lines += _hyperv_status_lines(hv, urls.get(hv["host"], ""))
    _emit(args, st, "\n".join(lines))
    return 0


def _hyperv_status_lines(hv: dict, url: str) -> list[str]:
    faults = f", faults {json.dumps(hv['faults'])}" if hv["faults"] else ""
    lines = [
        f"Hyper-V host {hv['host']} {url}: writer {hv['writer']['StateText']}{faults}, "
        f"{len(hv['shadow_copies'])} shadow copy(ies), peak {hv['peak_shadow_copies']} set(s) open at once"
    ]
    for vm in hv["vms"]:
        disks = ", ".join(
            f"{d['name']} {d['size'] >> 20} MiB" + (f" ({len(d['chain'])} files)" if len(d["chain"]) > 1 else "")
            for d in vm["disks"]
        )
        backup = "Backup on" if vm["backup"] else "Backup off"
        extra = f", faults {json.dumps(vm['faults'])}" if vm["faults"] else ""
        lines.append(f"  {vm['name']} on {hv['host']}: {vm['state']}, {backup}, {disks}{extra}")
    for sc in hv["shadow_copies"]:
        where = f", exposed at {sc['exposed_path']}" if sc.get("exposed_path") else ""
        lines.append(f"  shadow copy {sc['id']} of {sc['volume']} (set {sc['set_id']}){where}")
    for run in hv["runs"]:
        lines.append(f"  open run {run}")
    return lines


@_guard
def cmd_write(args: argparse.Namespace) -> int:
    from .process import load_lab

    if args.offset < 0 or args.length <= 0:
        raise LabInputError("--offset must be >= 0 and --length > 0")
    res = load_lab(args.state).write(args.vm, args.disk, args.offset, args.length, args.seed, host=args.host)
    _emit(args, res, f"wrote {args.length} bytes at {args.offset} of {res['disk']} on {args.vm} ({res['file']})")
    return 0


@_guard
def cmd_disk_image(args: argparse.Namespace) -> int:
    from .process import load_lab

    res = load_lab(args.state).disk_image(
        args.vm, args.disk, args.output, args.snapshot, shadow=args.shadow, host=args.host
    )
    _emit(args, res, f"{res['output']}: {res['size']} bytes of {res['disk']} on {args.vm}")
    return 0


# Faults whose value is a word, not a switch or a number.
TEXT_FAULTS = ("drop_during",)


def _fault_value(key: str, value: str | None) -> Any:
    if value is None:
        return True
    if key in TEXT_FAULTS:
        return value
    # numbers as numbers (`create_seconds=0.5`, `-1`), so the host checks the value it was given
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value.lower() not in ("0", "false", "no", "off")


@_guard
def cmd_fault(args: argparse.Namespace) -> int:
    from .process import load_lab

    if bool(args.vm) == bool(args.host):
        raise LabInputError("give exactly one of --vm and --host")
    faults: dict[str, Any] = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        key = key.replace("-", "_")
        faults[key] = _fault_value(key, value if eq else None)
    res = load_lab(args.state).set_faults(vm=args.vm, host=args.host, **faults)
    _emit(args, res, f"faults of {args.vm or args.host}: {json.dumps(res['faults'])}")
    return 0


@_guard
def cmd_drop_sessions(args: argparse.Namespace) -> int:
    from .process import load_lab

    if args.idle is not None:
        n = load_lab(args.state).expire_idle_sessions(args.idle)
        _emit(args, {"dropped": n, "vsphere": n, "hyperv": {}}, f"expired {n} vSphere session(s) idle {args.idle:g} s")
        return 0
    per = load_lab(args.state).drop_all_sessions()
    n = sum(per.values())
    hosts = {k: v for k, v in per.items() if k != "vsphere"}
    text = f"dropped {per['vsphere']} vSphere session(s)" + "".join(
        f", {v} WinRM shell(s) on {k}" for k, v in hosts.items()
    )
    _emit(args, {"dropped": n, "vsphere": per["vsphere"], "hyperv": hosts}, text)
    return 0


@_guard
def cmd_build(args: argparse.Namespace) -> int:
    from .process import build_simulator

    path = build_simulator(force=args.force)
    _emit(args, {"binary": str(path)}, str(path))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vmbackup lab ARGS`` (also ``python -m vmbackup_lab ARGS``, with or without ``lab``)."""
    from vmbackup.cli.parsing import Parser

    parser = Parser(prog="vmbackup")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["lab"]:
        argv.insert(0, "lab")
    args = parser.parse_args(argv)
    return args.func(args)


def add_parser(subparsers: Any) -> None:
    """Add ``lab`` and its subcommands to the main parser's subparsers."""
    lab = subparsers.add_parser("lab", help="the simulated vSphere datacenter and Hyper-V hosts (see docs/lab.md)")
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    sub.required = True

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(func=func)
        return p

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", required=True, metavar="DIR", help="the lab's state directory")

    p = command("up", cmd_up, "start the lab in the background")
    state(p)
    p.add_argument(
        "--topology", metavar="FILE", help="topology JSON file (default: 2 ESXi hosts, 3 VMs; Hyper-V host hv1, 3 VMs)"
    )
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="create the lab's repository encrypted (passphrase in STATE/passphrase, "
        "the plan's passphrase_env VMBACKUP_PASSPHRASE)",
    )
    state(command("down", cmd_down, "stop the lab"))
    state(command("status", cmd_status, "VMs, disks, snapshots, attachments, counters"))
    p = command("write", cmd_write, "a guest write into a VM's disk")
    state(p)
    p.add_argument("--vm", required=True)
    p.add_argument("--disk", required=True, help="scsi0:0, sata0:1, nvme0:0 or the device key")
    p.add_argument("--offset", required=True, type=int)
    p.add_argument("--length", required=True, type=int)
    p.add_argument("--seed", type=int, default=1, help="pattern seed (docs/lab.md gives the pattern)")
    p.add_argument("--host", help="the Hyper-V host, when VMs of several have this name")
    p = command("disk-image", cmd_disk_image, "a disk's content as the guest sees it, as a raw file")
    state(p)
    p.add_argument("--vm", required=True)
    p.add_argument("--disk", required=True, help="scsi0:0, sata0:1, nvme0:0, ide0:1 or the device key")
    p.add_argument("--snapshot", help="as of this snapshot (name or moref; vSphere)")
    p.add_argument("--shadow", help="as of this shadow copy (its id; Hyper-V)")
    p.add_argument("--host", help="the Hyper-V host, when VMs of several have this name")
    p.add_argument("output")
    p = command("fault", cmd_fault, "inject faults into a VM or a host (replaces its faults)")
    state(p)
    p.add_argument("--vm")
    p.add_argument("--host")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME[=VALUE]",
        help="vSphere: quiesce_fail, snapshot_fail, slow_ms=N, leave_consolidation, refuse_snapshots, "
        "tools_not_running; Hyper-V host: writer_failed, shadow_fail, drop_during=SCRIPT.ps1, create_seconds=N; "
        "Hyper-V VM: backup_off, backup_no_contact; none clears all",
    )
    p = command(
        "drop-sessions",
        cmd_drop_sessions,
        "drop every vSphere session and every Hyper-V WinRM shell (clients must log in again)",
    )
    state(p)
    p.add_argument(
        "--idle",
        type=float,
        metavar="SECONDS",
        help="only the vSphere sessions idle that long (as vCenter's session idle timeout)",
    )
    p = command("build", cmd_build, "build the simulator binary")
    p.add_argument("--force", action="store_true")
