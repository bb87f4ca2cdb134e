"""The adapter's scripts as the lab host carries them out.

Each function gives the answer the script in flows/vmbackup/hyperv/scripts
gives on a real host (the same fields, enums as numbers), acting on the model:
the ledger files are written under C:\\ProgramData\\vmbackup as the scripts
write them; diskshadow's open backup is a `Run` that ends with
Complete-VmbackupShadowCopy.ps1 (BackupComplete only with -Succeeded).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import PureWindowsPath

from .host import BACKUP_SERVICE_GUID, VM_RUNNING, WORK_DIR, Host, HostError, Run, ScriptFailure


def run(host: Host, name: str, params: dict):
    fn = SCRIPTS.get(name)
    if fn is None:
        raise ScriptFailure(f"ScriptFailed: the lab host has no model of {name}")
    import inspect

    args = _params(name, params)
    known = inspect.signature(fn).parameters
    for k in args:
        if k not in known or k == "host":
            raise ScriptFailure(f"ScriptFailed: A parameter cannot be found that matches parameter name '{k}'.")
    for k, p in known.items():
        if k != "host" and p.default is inspect.Parameter.empty and k not in args:
            raise ScriptFailure(f"ScriptFailed: Cannot process command because of a missing mandatory parameter: {k}.")
    with host.lock:
        if name in SLOWED and host.faults.get("slow_ms"):
            _slow(host, float(host.faults["slow_ms"]) / 1000.0)
        return fn(host, **args)


def _slow(host: Host, seconds: float) -> None:
    """The fault `slow_ms`: the script takes that long before it acts (the
    host's lock released meanwhile, so the lab answers other requests)."""
    import time

    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        host.changed.wait(left)


def _params(name: str, params: dict) -> dict:
    # Parameter names are case-insensitive in PowerShell.
    return {k.lower(): v for k, v in params.items()}


def _find_vm(host: Host, name: str):
    """Get-VM -Name: VM names are case-insensitive on Windows."""
    for v in host.vms.values():
        if isinstance(name, str) and v.name.lower() == name.lower():
            return v
    raise ScriptFailure(f"VmNotFound: no VM named '{name}' on {host.name.upper()}")


def _ledger(host: Host, run_id: str):
    return host.local(f"{WORK_DIR}\\ledger\\{run_id}.json")


def _run_id(run_id) -> str:
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", run_id):
        raise ScriptFailure(
            f"ScriptFailed: Cannot validate argument on parameter 'RunId'. {run_id!r} does not match the pattern"
        )
    return run_id


def get_host(host: Host, workdir: str = WORK_DIR) -> dict:
    runs = []
    ledger = host.local(f"{WORK_DIR}\\ledger")
    if ledger.is_dir():
        runs = [json.loads(p.read_text()) for p in sorted(ledger.glob("*.json"))]
    for r in runs:
        r["Existing"] = [sid for sid in r.get("ShadowIds") or [] if sid in host.shadows]
    return {
        "ComputerName": host.name.upper(),
        "Writer": host.writer(),
        "Volumes": [
            {
                # Win32_Volume: a CSV has no drive letter; Name is its root
                "DriveLetter": None if v in host.csvs else f"{v}:",
                "Name": host.root_of(v),
                "DeviceID": f"\\\\?\\Volume{{{host.volume_guids[v]}}}\\",
                "Capacity": 1 << 40,
                "FreeSpace": host.free_bytes(v),
                "FileSystem": host.file_systems[v],
            }
            for v in host.volumes
        ],
        "Runs": runs,
    }


def _volume_root(winpath: str) -> str:
    """Get-VolumeRoot of Get-VmbackupVm.ps1: a CSV's root, else the drive's."""
    m = re.match(r"^([A-Za-z]:\\ClusterStorage\\[^\\]+\\)", winpath)
    return m.group(1) if m else PureWindowsPath(winpath).anchor


def get_vm_list(host: Host) -> dict:
    return {
        "ComputerName": host.name.upper(),
        "VMs": [
            {"Name": v.name, "Id": v.id.lower(), "State": v.state}
            for v in sorted(host.vms.values(), key=lambda v: v.name)
        ],
    }


def _backup_service(host: Host, v) -> dict | None:
    """Get-VMIntegrationService | Where-Object Id ends in the Backup service's GUID (names are localized)."""
    for svc in v.integration_services(host.locale):
        if svc["Id"].upper().endswith("\\" + BACKUP_SERVICE_GUID):
            return svc
    return None


def _backup_problem(host: Host, v) -> str:
    """Get-BackupServiceProblem of New-VmbackupShadowCopy.ps1: '' when on and answering."""
    svc = _backup_service(host, v)
    if svc is None or not svc["Enabled"]:
        return "its Backup integration service is off"
    if svc["Status"] != 2:
        return "its Backup integration service does not answer"
    return ""


PASSTHROUGH_REASON = (
    "a pass-through disk (physical disk {n} of the host): it has no virtual disk file, so no shadow copy "
    "of the host's volumes holds it; back it up from inside the guest"
)
SMB_REASON = (
    "its file {path} is on an SMB share: a shadow copy of the host's volumes does not hold it (a share's "
    "shadow copy is made on the file server, by its File Server VSS Agent Service), so the agent has no "
    "point-in-time copy to read"
)


def get_vm(host: Host, vmname: str) -> dict:
    v = _find_vm(host, vmname)
    svc = _backup_service(host, v)
    volumes = {_volume_root(v.config_location)}
    disks = []
    skipped = []
    for d in v.disks:
        if d.passthrough:
            path = f"Disk {d.disk_number} {d.size / 2**30:.2f} GB Bus 0 Lun {d.location} Target {d.number}"
            reason = PASSTHROUGH_REASON.format(n=d.disk_number)
            skipped.append({"Name": d.name, "Path": path, "DiskNumber": d.disk_number, "Reason": reason})
            continue
        if d.top.winpath.startswith("\\\\"):
            reason = SMB_REASON.format(path=d.top.winpath)
            skipped.append({"Name": d.name, "Path": d.top.winpath, "DiskNumber": None, "Reason": reason})
            continue
        chain = []
        for f in d.chain():
            local = host.local(f.winpath)
            chain.append(
                {
                    "Path": f.winpath,
                    "VhdFormat": 3 if f.fmt == "vhdx" else 2,
                    "VhdType": 4 if f.differencing else 3,
                    "Size": d.size,
                    "FileSize": local.stat().st_size,
                    "ParentPath": f.parent.winpath if f.parent else None,
                }
            )
            volumes.add(_volume_root(f.winpath))
        disks.append(
            {
                "Name": d.name,
                "ControllerType": 0 if d.controller == "ide" else 1,
                "ControllerNumber": d.number,
                "ControllerLocation": d.location,
                "Path": d.top.winpath,
                "Chain": chain,
            }
        )
    return {
        "Name": v.name,
        "Id": v.id.lower(),
        "State": v.state,
        "Backup": None
        if svc is None
        else {
            "Name": svc["Name"],
            "Id": svc["Id"],
            "Enabled": svc["Enabled"],
            "PrimaryOperationalStatus": svc["Status"] or 0,
        },
        "ConfigurationLocation": v.config_location,
        "Generation": v.generation,
        "Version": v.version,
        "ProcessorCount": v.cpus,
        "MemoryStartup": v.memory_mib * 1024 * 1024,
        "NetworkAdapters": [
            {"Name": "Network Adapter", "SwitchName": n["switch"], "MacAddress": n["mac"]} for n in v.nics
        ],
        "ConfigFiles": v.config_files(),
        "Disks": disks,
        "SkippedDisks": skipped,
        "Volumes": sorted(volumes),
    }


def new_shadow_copy(
    host: Host,
    runid: str,
    vmname: list,
    volumes: list,
    quiesce: str = "preferred",
    shareto: str = "",
    holdseconds: int = 86400,
    createtimeoutseconds: int = 600,
    workdir: str = WORK_DIR,
) -> dict:
    run_id = _run_id(runid)
    if quiesce not in ("required", "preferred", "off"):
        raise ScriptFailure(f"ScriptFailed: Cannot validate argument on parameter 'Quiesce'. {quiesce!r}")
    if isinstance(vmname, str):
        vmname = [vmname]
    if isinstance(volumes, str):
        volumes = [volumes]
    letters = []
    for vol in volumes:
        try:
            letter = host.key_of(vol)
        except HostError:
            raise ScriptFailure(f"ShadowCopyFailed: the volume {vol} does not exist on {host.name.upper()}") from None
        if _volume_root(vol if vol.endswith("\\") else vol + "\\").lower() != host.root_of(letter).lower():
            raise ScriptFailure(f"ShadowCopyFailed: the volume {vol} does not exist on {host.name.upper()}")
        fs = host.file_systems[letter]
        if fs != "NTFS":
            what = "a Cluster Shared Volume (CSVFS)" if fs == "CSVFS" else fs
            raise ScriptFailure(
                f"ShadowCopyFailed: volume {host.root_of(letter)} is {what}: vmbackup makes persistent shadow copies "
                "(diskshadow 'set context persistent'), which VSS makes only for NTFS volumes; to back up this VM, "
                "move its files to an NTFS volume of the host (Move-VMStorage), or use a product that backs up "
                "through Hyper-V's WMI backup (recovery checkpoints with RCT, Windows Server 2016 and later)"
            )
        letters.append(letter)
    reasons = []
    per_vm: dict[str, list[str]] = {}
    off_reasons = []
    if quiesce == "off":
        reasons.append("quiesce is off")
    else:
        for name in vmname:
            v = _find_vm(host, name)
            if v.state != VM_RUNNING:
                per_vm[name] = [f"{name} is not running"]
                off_reasons.append(f"{name} is not running")
                continue
            problem = _backup_problem(host, v)
            if problem == "its Backup integration service is off":
                reasons.append(f"{name} has its Backup integration service off")
            elif problem:
                reasons.append(f"{name}'s Backup integration service does not answer")
        # VMs that are off take part without being frozen: they keep the writer
        # from the others only when no VM asked for runs.
        if len(off_reasons) == len(vmname):
            reasons += off_reasons
        # Every other running VM on the volumes takes part too; one that cannot
        # do its own VSS backup would be put into a saved state.
        asked = {n.lower() for n in vmname}
        for v in sorted(host.vms.values(), key=lambda v: v.name):
            if v.name.lower() in asked or v.state != VM_RUNNING or v.volume not in letters:
                continue
            problem = _backup_problem(host, v)
            if problem:
                on = host.root_of(v.volume)
                reasons.append(f"{v.name} is also on {on} and would be put into a saved state: {problem}")
        w = host.writer()
        if w["LastError"] != "No error":
            reasons.append(f"the Hyper-V VSS writer failed: {w['LastError']}")
        if w["State"] != 1:
            reasons.append(f"the Hyper-V VSS writer is not stable (state {w['State']})")
    writer_in = not reasons
    vms_out = []
    for name in vmname:
        if name in per_vm:
            vms_out.append({"Name": name, "Consistency": "crash", "Reasons": per_vm[name]})
        else:
            c = "application" if writer_in else "crash"
            vms_out.append({"Name": name, "Consistency": c, "Reasons": [] if writer_in else list(reasons)})
    consistency = "application" if writer_in and not off_reasons else "crash"
    if not writer_in and quiesce == "required":
        raise ScriptFailure(f"QuiesceUnavailable: {'; '.join(reasons)}")
    if writer_in:
        reasons += off_reasons
    run_dir = f"{WORK_DIR}\\runs\\{run_id}"
    ledger = _ledger(host, run_id)
    if ledger.exists():
        raise ScriptFailure(f"ScriptFailed: a backup run '{run_id}' is already open on {host.name.upper()}")
    ledger.parent.mkdir(parents=True, exist_ok=True)
    host.local(run_dir).mkdir(parents=True, exist_ok=True)
    runner = host.start_process("powershell.exe", run_id)
    diskshadow = host.start_process("diskshadow.exe", run_id, parent=runner.pid)
    entry = {
        "RunId": run_id,
        "Created": datetime.datetime.now(datetime.UTC).isoformat(),
        "VMs": list(vmname),
        "ProcessId": diskshadow.pid,  # diskshadow's own, from <run>\\diskshadow.pid
        "RunnerProcessId": runner.pid,
        "SetId": None,
        "ShadowIds": [],
        "Shares": [],
        "RunDir": run_dir,
    }
    ledger.write_text(json.dumps(entry))
    # From here a failure leaves the ledger entry, as on Windows; Complete or
    # the sweeper removes it.
    try:
        set_id, copies = host.create_shadow_set(letters, writer=writer_in, run_id=run_id)
    except ScriptFailure as e:
        host.end_process(diskshadow.pid, "create failed")
        host.end_process(runner.pid, "exited")
        if str(e).startswith("ShadowSetInProgress:"):
            # as the script does: nothing of this run exists, so it leaves no trace
            ledger.unlink(missing_ok=True)
            _rmtree(host.local(run_dir))
        raise
    entry["SetId"] = set_id
    entry["ShadowIds"] = [c.id for c in copies]
    out = []
    for i, (vol, sc) in enumerate(zip(volumes, copies, strict=True)):
        exposed = f"{run_dir}\\mnt\\{i}"
        host.expose(sc, exposed)
        share = None
        if shareto:
            share_name = f"vmbk-{run_id}-{i}$"
            host.share(share_name, exposed)
            entry["Shares"].append(share_name)
            share = f"\\\\{host.name.upper()}\\{share_name}"
        out.append(
            {
                "Volume": vol,
                "ShadowId": sc.id,
                "DeviceObject": f"\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy{sc.number}",
                "ExposedPath": exposed,
                "SharePath": share,
            }
        )
    ledger.write_text(json.dumps(entry))
    host.runs[run_id] = Run(
        run_id,
        set_id,
        entry["ShadowIds"],
        entry["Shares"],
        consistency,
        list(vmname),
        runner.pid,
        diskshadow.pid,
        list(letters),
    )
    return {
        "RunId": run_id,
        "SetId": set_id,
        "Consistency": consistency,
        "Reasons": reasons,
        "VMs": vms_out,
        "ShadowCopies": out,
    }


def _end_diskshadow(host: Host, entry: dict, marker: str) -> bool:
    """The scripts' ending of a run's diskshadow: write `durable` or `abort`; diskshadow
    then runs or skips 'end backup' and quits, or (fault `diskshadow_hangs`) is
    stopped after the wait. True when it ran 'end backup'."""
    p = host.process(entry.get("ProcessId"))
    if p is None or p.name != "diskshadow.exe":
        return False
    if host.faults.get("diskshadow_hangs"):
        how = "stopped"
    else:
        how = "end backup" if marker == "durable" else "exec failed"
    host.end_process(p.pid, how)
    # run.ps1 records diskshadow's exit code and exits with it
    host.end_process(p.parent, "exited")
    return how == "end backup"


def _remove_run(host: Host, entry: dict) -> list[str]:
    # abort first: a crashed run's diskshadow still holds the VSS backup open
    _end_diskshadow(host, entry, "abort")
    for share in entry.get("Shares") or []:
        host.unshare(share)
    deleted = []
    for sid in list(host.shadows):
        sc = host.shadows[sid]
        if sid in (entry.get("ShadowIds") or []) or (entry.get("SetId") and sc.set_id == entry["SetId"]):
            host.delete_shadow(sid)
            deleted.append(sid)
    _rmtree(host.local(entry["RunDir"]))
    _ledger(host, entry["RunId"]).unlink(missing_ok=True)
    host.runs.pop(entry["RunId"], None)
    return deleted


def _rmtree(run_dir) -> None:
    """Remove a run's directory; its mount points are links (never followed)."""
    if run_dir.exists():
        import shutil

        for p in sorted(run_dir.rglob("*"), reverse=True):
            if p.is_symlink() or p.is_file():
                p.unlink()
        shutil.rmtree(run_dir, ignore_errors=True)


def complete_shadow_copy(
    host: Host, runid: str, succeeded: bool = False, timeoutseconds: int = 300, workdir: str = WORK_DIR
) -> dict:
    run_id = _run_id(runid)
    ledger = _ledger(host, run_id)
    if not ledger.exists():
        raise ScriptFailure(f"RunNotFound: no backup run '{run_id}' in {WORK_DIR}\\ledger")
    entry = json.loads(ledger.read_text())
    r = host.runs.get(run_id)
    ended = _end_diskshadow(host, entry, "durable" if succeeded else "abort")
    complete = bool(succeeded) and r is not None and ended
    if complete and r.consistency == "application":
        # the Hyper-V writer's BackupComplete covers every VM of the set's volumes
        for v in host.vms.values():
            if v.volume in r.volumes:
                v.backup_complete += 1
    if host.faults.get("drop_during") == "Complete-VmbackupShadowCopy.ps1":
        # The shell dies while the script waits for diskshadow: diskshadow runs
        # outside the shell and ends the backup, but nothing is removed; the
        # ledger entry stays for the next run of the VM or the sweeper. The
        # backup has ended: a second Complete must not count BackupComplete again.
        if r is not None:
            r.consistency = "ended"
        return {"RunId": run_id, "BackupComplete": complete, "Deleted": []}
    deleted = _remove_run(host, entry)
    return {"RunId": run_id, "BackupComplete": complete, "Deleted": deleted}


def remove_shadow_copies(
    host: Host, olderthanseconds: int = 3600, vmname: str = "", stoptimeoutseconds: int = 30, workdir: str = WORK_DIR
) -> dict:
    removed = []
    ledger_dir = host.local(f"{WORK_DIR}\\ledger")
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(olderthanseconds))
    for p in sorted(ledger_dir.glob("*.json")) if ledger_dir.is_dir() else []:
        entry = json.loads(p.read_text())
        if datetime.datetime.fromisoformat(entry["Created"]) > cutoff:
            continue
        if vmname and vmname.lower() not in [n.lower() for n in entry.get("VMs") or []]:
            continue
        removed.append({"RunId": entry["RunId"], "Created": entry["Created"], "Deleted": _remove_run(host, entry)})
    return {"Removed": removed}


from .restore import SCRIPTS as RESTORE_SCRIPTS  # noqa: E402  (it uses this module's helpers)

# The scripts the host fault `slow_ms` delays: those that make or remove a restore's things
# (as the vSphere lab's slow_ms delays CreateVM_Task and ReconfigVM_Task).
SLOWED = ("New-VmbackupRestore.ps1", "Import-VmbackupRestore.ps1", "Remove-VmbackupRestore.ps1")

SCRIPTS = {
    "Get-VmbackupHost.ps1": get_host,
    "Get-VmbackupVm.ps1": get_vm,
    "Get-VmbackupVmList.ps1": get_vm_list,
    "New-VmbackupShadowCopy.ps1": new_shadow_copy,
    "Complete-VmbackupShadowCopy.ps1": complete_shadow_copy,
    "Remove-VmbackupShadowCopies.ps1": remove_shadow_copies,
    **RESTORE_SCRIPTS,
}

__all__ = ["run", "SCRIPTS", "HostError"]
