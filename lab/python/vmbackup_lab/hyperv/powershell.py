"""What the lab host answers to the commands a WinRM shell receives.

This is not a PowerShell interpreter. It recognises exactly:
- cmd.exe commands `hostname`, `whoami`, `echo ...`; anything else is "not
  recognized", as cmd.exe says it;
- `powershell -encodedcommand <base64 UTF-16LE>` (pywinrm's `run_ps`) whose
  text is either
  - one of the adapter's scripts in the fixed wrapper of
    `vmbackup.hyperv.scripts.wrap` (recognised by rebuilding the wrapper from
    the script's name and the decoded parameters and comparing the whole text;
    anything else is refused), or
  - an administrator's read-only query: `Get-VM [[-Name] X]`,
    `Get-VMHardDiskDrive -VMName X`, `Get-VMIntegrationService [-VMName] X [-Name N]`,
    `Get-CimInstance [-ClassName] Win32_ShadowCopy`, each optionally piped to
    `Select-Object [-Property] A, B` and `ConvertTo-Json [-Depth N] [-Compress]`.
Answers follow Windows PowerShell 5.1: enums are numbers in JSON (names in
text), DateTime is "\\/Date(ms)\\/", ConvertTo-Json's default depth is 2 and
one object is not wrapped in an array. Text output (no ConvertTo-Json) is
always in list form. Errors go to stderr as CLIXML, as powershell.exe writes
them over WinRM, with exit status 1.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from dataclasses import dataclass
from xml.sax.saxutils import escape

from . import adapter
from .host import Host, HostError, ScriptFailure


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes = b""
    status: int = 0
    script: str | None = None  # the adapter script's name, when one ran


@dataclass(frozen=True)
class Enum:
    """A .NET enum value: a number in JSON, a name in text."""

    value: int
    name: str


class Date(str):
    """A DateTime: '\\/Date(ms)\\/' in JSON."""


def run(host: Host, command: str, args: list[str]) -> Outcome:
    words = command.split() + list(args)
    if not words:
        return Outcome(b"")
    head = words[0].lower()
    if head in ("powershell", "powershell.exe"):
        return _powershell(host, words[1:])
    if head == "hostname":
        return Outcome(f"{host.name}\r\n".encode())
    if head == "whoami":
        return Outcome(f"{host.name}\\{host.user}\r\n".lower().encode())
    if head == "echo":
        return Outcome((" ".join(words[1:]) + "\r\n").encode())
    msg = f"'{words[0]}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
    return Outcome(b"", msg.encode(), 1)


def _powershell(host: Host, argv: list[str]) -> Outcome:
    encoded = None
    for i, a in enumerate(argv):
        if a.lower() in ("-encodedcommand", "-enc", "-e", "-ec") and i + 1 < len(argv):
            encoded = argv[i + 1]
    if encoded is None:
        return _ps_error("The lab host runs PowerShell only as -EncodedCommand (as pywinrm's run_ps sends it).")
    try:
        text = base64.b64decode(encoded, validate=True).decode("utf-16-le")
    except (binascii.Error, UnicodeDecodeError):
        return _ps_error(
            "Cannot process the command because the value specified with -EncodedCommand is not properly encoded."
        )
    if text.startswith("# vmbackup: "):
        return _adapter(host, text)
    return _query(host, text.strip())


def _adapter(host: Host, text: str) -> Outcome:
    from vmbackup.hyperv import scripts

    first = text.split("\n", 1)[0]
    name = first[len("# vmbackup: ") :].strip()
    m = re.search(r"^\$vmbackupParameters = '([A-Za-z0-9+/=]*)'$", text, re.M)
    try:
        params = json.loads(base64.b64decode(m.group(1))) if m else None
        expected = scripts.wrap(name, params) if isinstance(params, dict) else None
    except Exception:  # an unknown name or bad parameters: the text is not ours
        expected = None
    if expected is None or expected != text:
        return _ps_error(f"the lab host does not know this script ({name!r}): only the adapter's own scripts run here")
    try:
        result = adapter.run(host, name, params)
    except ScriptFailure as e:
        return Outcome(json.dumps({"error": str(e)}, separators=(",", ":")).encode(), status=1, script=name)
    return Outcome(_to_json(result, depth=8, compress=True).encode(), script=name)


# --- administrator queries ---------------------------------------------------------


def _query(host: Host, text: str) -> Outcome:
    stages = [s.strip() for s in text.split("|")]
    try:
        words = shlex.split(stages[0], posix=True)
    except ValueError:
        return _ps_error(f"cannot parse {stages[0]!r}")
    if not words:
        return Outcome(b"")
    cmd, rest = words[0].lower(), words[1:]
    try:
        if cmd == "get-vm":
            objs = _get_vm(host, _one(rest, "-name", positional=True))
        elif cmd == "get-vmharddiskdrive":
            objs = _get_hdd(host, _one(rest, "-vmname", positional=True))
        elif cmd == "get-vmintegrationservice":
            objs = _get_is(host, _one(rest, "-vmname", positional=True), _one(rest, "-name"))
        elif cmd == "get-ciminstance":
            cls = _one(rest, "-classname", positional=True)
            if (cls or "").lower() != "win32_shadowcopy":
                return _ps_error(f"Get-CimInstance : the lab host answers only Win32_ShadowCopy, not {cls!r}")
            objs = _shadow_copies(host)
        else:
            return _ps_error(
                f"The term '{words[0]}' is not recognized as the name of a cmdlet, function, script file, or operable program."
            )
    except HostError as e:
        return _ps_error(f"{words[0]} : {e}")
    json_stage = None
    for stage in stages[1:]:
        sw = shlex.split(stage.replace(",", " , "))
        if not sw:
            continue
        name = sw[0].lower()
        if name in ("select-object", "select"):
            props = [w for w in sw[1:] if w not in (",",) and w.lower() != "-property"]
            objs = [{p: _lookup(o, p) for p in props} for o in objs]
        elif name == "convertto-json":
            depth, compress = 2, False
            for i, w in enumerate(sw[1:], 1):
                if w.lower() == "-depth" and i + 1 < len(sw):
                    depth = int(sw[i + 1])
                elif w.lower() == "-compress":
                    compress = True
            json_stage = (depth, compress)
        else:
            return _ps_error(f"the lab host does not run '{sw[0]}' in a pipeline")
    if json_stage is not None:
        if not objs:
            return Outcome(b"")
        value = objs[0] if len(objs) == 1 else objs
        return Outcome((_to_json(value, *json_stage) + "\r\n").encode())
    return Outcome(_to_text(objs).encode())


def _one(words: list[str], flag: str, positional: bool = False) -> str | None:
    for i, w in enumerate(words):
        if w.lower() == flag and i + 1 < len(words):
            return words[i + 1]
    if positional and words and not words[0].startswith("-"):
        return words[0]
    return None


def _lookup(obj: dict, prop: str):
    for k, v in obj.items():
        if k.lower() == prop.lower():
            return v
    return None


def _vms(host: Host, name: str | None):
    if name is None:
        return list(host.vms.values())
    if name not in host.vms:
        raise HostError(f'Hyper-V was unable to find a virtual machine with name "{name}".')
    return [host.vms[name]]


VM_STATE = {2: "Running", 3: "Off"}


def _get_vm(host: Host, name: str | None) -> list[dict]:
    out = []
    for v in _vms(host, name):
        out.append(
            {
                "__type__": "Microsoft.HyperV.PowerShell.VirtualMachine",
                "Name": v.name,
                "Id": v.id.lower(),
                "VMId": v.id.lower(),
                "VMName": v.name,
                "State": Enum(v.state, VM_STATE[v.state]),
                "Status": "Operating normally",
                "Generation": v.generation,
                "Version": "9.0",
                "ProcessorCount": 2,
                "MemoryStartup": 2147483648,
                "Path": v.config_location,
                "ConfigurationLocation": v.config_location,
                "ComputerName": host.name.upper(),
                "IntegrationServicesState": "Up to date" if v.state == 2 else "",
                "HardDrives": _get_hdd(host, v.name),
            }
        )
    return out


def _get_hdd(host: Host, name: str | None) -> list[dict]:
    out = []
    for v in _vms(host, name):
        for d in v.disks:
            ct = {"ide": Enum(0, "IDE"), "scsi": Enum(1, "SCSI")}[d.controller]
            out.append(
                {
                    "__type__": "Microsoft.HyperV.PowerShell.HardDiskDrive",
                    "VMName": v.name,
                    "VMId": v.id.lower(),
                    "ComputerName": host.name.upper(),
                    "Name": "Hard Drive on "
                    + ("IDE" if d.controller == "ide" else "SCSI")
                    + f" controller number {d.number} at location {d.location}",
                    "ControllerType": ct,
                    "ControllerNumber": d.number,
                    "ControllerLocation": d.location,
                    # a pass-through disk: its number on the host, and a description for a Path
                    "DiskNumber": d.disk_number,
                    "Path": d.top.winpath
                    if d.top is not None
                    else f"Disk {d.disk_number} {d.size / 2**30:.2f} GB Bus 0 Lun {d.location} Target {d.number}",
                    "PoolName": "Primordial",
                    "Id": f"Microsoft:{v.id}\\{d.controller.upper()}{d.number}\\{d.location}\\D",
                }
            )
    return out


OP_STATUS = {2: "OK", 12: "No Contact"}


def _get_is(host: Host, vm: str | None, name: str | None) -> list[dict]:
    out = []
    for v in _vms(host, vm):
        # names in the host's language (a German host: 'Sicherung (Volumeschattenkopie)'); Ids are fixed
        for svc in v.integration_services(host.locale):
            if name is not None and name.lower() != svc["Name"].lower():
                continue
            enabled, status = svc["Enabled"], svc["Status"]
            out.append(
                {
                    "__type__": "Microsoft.HyperV.PowerShell.VMIntegrationComponent",
                    "VMName": v.name,
                    "VMId": v.id.lower(),
                    "Name": svc["Name"],
                    "Id": svc["Id"],
                    "Enabled": enabled,
                    "PrimaryOperationalStatus": Enum(status, OP_STATUS[status]) if status else None,
                    "PrimaryStatusDescription": OP_STATUS.get(status, "") if status else "",
                    "ComputerName": host.name.upper(),
                }
            )
    return out


def _shadow_copies(host: Host) -> list[dict]:
    out = []
    for s in host.shadows.values():
        out.append(
            {
                "__type__": "Microsoft.Management.Infrastructure.CimInstance",
                "Caption": None,
                "Description": None,
                "InstallDate": Date(f"/Date({int(s.created.timestamp() * 1000)})/"),
                "Name": None,
                "Status": None,
                "ClientAccessible": False,
                "Count": sum(1 for o in host.shadows.values() if o.set_id == s.set_id),
                "DeviceObject": f"\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy{s.number}",
                "Differential": True,
                "ExposedLocally": s.exposed_path is not None,
                "ExposedName": s.exposed_path,
                "ExposedPath": s.exposed_path,
                "ExposedRemotely": False,
                "HardwareAssisted": False,
                "ID": s.id,
                "Imported": False,
                "NoAutoRelease": True,
                "NotSurfaced": False,
                "NoWriters": False,
                "OriginatingMachine": host.name.upper(),
                "Persistent": True,
                "Plex": False,
                "ProviderID": "{b5946137-7b9f-4925-af80-51abd60b20d5}",
                "ServiceMachine": host.name.upper(),
                "SetID": s.set_id,
                "State": 12,
                "Transportable": False,
                "VolumeName": f"\\\\?\\Volume{{{host.volume_guids[s.volume]}}}\\",
                "PSComputerName": None,
            }
        )
    return out


# --- output -----------------------------------------------------------------------


def _plain(value, depth: int, level: int = 0):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        if level >= depth:
            return value.get("__type__", "System.Management.Automation.PSCustomObject")
        return {k: _plain(v, depth, level + 1) for k, v in value.items() if k != "__type__"}
    if isinstance(value, (list, tuple)):
        if level >= depth:
            return " ".join(str(_plain(v, 0, 1)) for v in value)
        # an array's elements are at the array's own depth, as in PowerShell
        return [_plain(v, depth, level) for v in value]
    return value


def _to_json(value, depth: int = 2, compress: bool = False) -> str:
    plain = _plain(value, depth)
    if compress:
        text = json.dumps(plain, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(plain, indent=4, separators=(",", ":  "), ensure_ascii=False)
    # Windows PowerShell writes DateTime as "\/Date(ms)\/"
    return re.sub(r'"/Date\((-?\d+)\)/"', r'"\\/Date(\1)\\/"', text)


def _to_text(objs: list[dict]) -> str:
    lines = [""]
    for o in objs:
        items = [(k, v) for k, v in o.items() if k != "__type__"]
        width = max((len(k) for k, _ in items), default=0)
        for k, v in items:
            if isinstance(v, Enum):
                v = v.name
            elif isinstance(v, list):
                v = "{" + ", ".join(x.get("Name", "") if isinstance(x, dict) else str(x) for x in v) + "}"
            elif isinstance(v, bool):
                v = str(v)
            elif v is None:
                v = ""
            lines.append(f"{k.ljust(width)} : {v}")
        lines.append("")
    return "\r\n".join(lines) + "\r\n"


def _ps_error(message: str) -> Outcome:
    clixml = (
        '#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        f'<S S="Error">{escape(message)}_x000D__x000A_</S></Objs>'
    )
    return Outcome(b"", clixml.encode(), 1)
