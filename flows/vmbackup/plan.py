"""The backup plan: what to back up, from where, to where, and how (docs/plan.md).

A plan is a YAML file validated by pydantic models. Every mistake becomes one
``InvalidInputError`` line that names the field's path, e.g.
``agents[1].transports[0]: 'hotad' is not one of hotadd, direct, nbd, vddk``.
Relative paths in a plan are relative to the plan file's directory.

No Prefect here: a Prefect Secret block is read (lazily) only by
``resolve_password`` when the plan names one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import InvalidInputError

Transport = Literal["hotadd", "direct", "nbd", "vddk"]
# The default order; vddk (VMware's VDDK through nbdkit, installed by the site) only when listed.
TRANSPORTS: tuple[str, ...] = ("hotadd", "direct", "nbd")

# The lab's default: nbdkit's curl plugin over the datastore's HTTPS /folder URL,
# authorised by the session cookie, which its cookie script reads from a file
# (never on a command line). The file is kept current while the read runs (the
# session kept alive, a new one after a drop) and the script re-read every
# {cookie_renew} seconds; a request refused meanwhile is retried (retry-request).
DEFAULT_NBD_COMMAND = [
    "nbdkit",
    "--exit-with-parent",
    "-r",
    "-U",
    "{socket}",
    "-P",
    "{pidfile}",
    "--filter=retry-request",
    "curl",
    "url={url}",
    "cookie-script={cookie_script}",
    "cookie-script-renew={cookie_renew}",
    "cainfo={ca_file}",
    "retry-request-retries=3",
    "retry-request-delay={cookie_renew}",
    "retry-request-open=false",
]
NBD_PLACEHOLDERS = (
    "socket",
    "pidfile",
    "url",
    "cookie",
    "cookie_file",
    "cookie_script",
    "cookie_renew",
    "ca_file",
    "path",
    "vm",
    "disk",
    "snapshot",
)
RETENTION_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _checked_url(v: str, bare: str, schemes: tuple[str, ...], wrong_scheme: str) -> str:
    """``v`` (a URL, or a bare host name completed by ``bare``) with one of
    ``schemes``, a host name and a valid port; ValueError otherwise."""
    v = v.strip()
    if "://" not in v:
        v = bare.format(v)
    parts = urlsplit(v)
    if parts.scheme not in schemes:
        raise ValueError(f"'{v}' {wrong_scheme}")
    if not parts.hostname:
        raise ValueError(f"'{v}' has no host name")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ValueError(f"'{v}' has a bad port") from None
    return v


class Connection(_Model):
    """How to reach vCenter or a standalone ESXi host."""

    url: str
    user: str = Field(min_length=1)
    password_env: str | None = None
    password_secret: str | None = None
    ca_file: Path | None = None
    thumbprint: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _checked_url(
            v, "https://{}/sdk", ("https",), "must use https (the server's certificate is always verified)"
        )

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        hexed = v.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexed):
            raise ValueError("must be a SHA-256 fingerprint: 64 hex digits, with or without colons")
        return hexed

    @model_validator(mode="after")
    def _one_password_and_trust(self) -> Connection:
        if (self.password_env is None) == (self.password_secret is None):
            raise ValueError("give exactly one of password_env and password_secret")
        if self.ca_file is None and self.thumbprint is None:
            raise ValueError("give ca_file or thumbprint: the server's certificate is always verified")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/sdk"


HypervAuth = Literal["ntlm", "basic", "kerberos", "credssp"]


class HypervHost(_Model):
    """How to reach one Hyper-V host over WinRM (docs/hyperv.md)."""

    name: str = Field(min_length=1)
    url: str
    user: str = Field(min_length=1)
    password_env: str | None = None
    password_secret: str | None = None
    auth: HypervAuth = "ntlm"
    ca_file: Path | None = None
    cluster: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", v):
            raise ValueError(f"'{v}' is not a computer name (letters, digits, '-' and '.')")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _checked_url(
            v,
            "https://{}:5986/wsman",
            ("https", "http"),
            "must be https://host:5986/wsman (or http:// with a sealing auth)",
        )

    @model_validator(mode="after")
    def _checks(self) -> HypervHost:
        if (self.password_env is None) == (self.password_secret is None):
            raise ValueError("give exactly one of password_env and password_secret")
        if urlsplit(self.url).scheme == "http" and self.auth == "basic":
            raise ValueError("basic over http would send the password in clear: use https")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


def _windows_key(key: str) -> str | None:
    """A ``windows_paths`` key in canonical form: ``\\\\HOST\\`` or ``D:\\`` (upper case), or None."""
    k = key.strip().replace("/", "\\")
    m = re.fullmatch(r"\\\\([A-Za-z0-9][A-Za-z0-9.-]*)\\?", k)
    if m:
        return f"\\\\{m.group(1).upper()}\\"
    m = re.fullmatch(r"([A-Za-z]):\\?", k)
    if m:
        return f"{m.group(1).upper()}:\\"
    return None


class Vddk(_Model):
    """The ``vddk`` transport: nbdkit's vddk plugin over VMware's VDDK, which the
    site installs (it is not redistributable; docs/vsphere.md)."""

    libdir: Path  # the VDDK distribution directory (vmware-vix-disklib-distrib)
    thumbprint: str | None = None  # the server's SHA-1 fingerprint as VDDK wants it; default: computed
    transports: str = "nbdssl"  # VDDK's modes, e.g. "hotadd:nbdssl"
    config: Path | None = None  # a VDDK configuration file
    nbdkit: str = "nbdkit"

    @field_validator("thumbprint")
    @classmethod
    def _sha1(cls, v: str | None) -> str | None:
        if v is None:
            return None
        hexed = v.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{40}", hexed):
            raise ValueError("must be a SHA-1 fingerprint (VDDK's): 40 hex digits, with or without colons")
        return ":".join(hexed[i : i + 2] for i in range(0, 40, 2)).upper()


class Agent(_Model):
    """A machine that reads disks: an appliance VM (hot-add), a host with datastore mounts, an NBD client."""

    name: str = Field(min_length=1)
    vm: str | None = None
    transports: list[Transport] = Field(default_factory=lambda: list(TRANSPORTS), min_length=1)
    hosts: list[str] = Field(default_factory=list)
    device_dir: Path | None = None
    datastores: dict[str, Path] = Field(default_factory=dict)
    nbd_command: list[str] | None = None
    vddk: Vddk | None = None
    windows_paths: dict[str, Path] = Field(default_factory=dict)
    share_account: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_transports(cls, data: Any) -> Any:
        """Without ``transports``, an agent does what its fields allow:
        hot-add with ``vm`` and ``device_dir``, direct with ``datastores``, NBD always."""
        if isinstance(data, dict) and "transports" not in data:
            can = []
            if data.get("vm") and data.get("device_dir"):
                can.append("hotadd")
            if data.get("datastores"):
                can.append("direct")
            data = {**data, "transports": [*can, "nbd"]}
        return data

    @field_validator("transports")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a transport twice")
        return v

    @field_validator("windows_paths")
    @classmethod
    def _windows_paths(cls, v: dict[str, Path]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for key, local in v.items():
            canon = _windows_key(key)
            if canon is None:
                raise ValueError(f"'{key}' is neither a host's share prefix (\\\\HOST\\) nor a drive (D:\\)")
            if canon in out:
                raise ValueError(f"'{key}' is given twice")
            out[canon] = local
        return out

    def windows_hosts(self) -> list[str]:
        """The Hyper-V hosts whose shares this agent mounts (upper case)."""
        return sorted(k.strip("\\") for k in self.windows_paths if k.startswith("\\\\"))

    def reaches_hyperv(self, host: str) -> bool:
        """Can this agent read the shadow copies of Hyper-V host ``host``?

        Through the host's shares (a ``\\\\HOST\\`` key), or locally when the
        agent runs on that host (drive keys, and ``hosts`` is exactly that host)."""
        if self.hosts and host not in self.hosts:
            return False
        if host.upper() in self.windows_hosts():
            return True
        drives = any(not k.startswith("\\\\") for k in self.windows_paths)
        return drives and self.hosts == [host]

    def map_windows_path(self, winpath: str) -> Path | None:
        """Where a path on a Hyper-V host (``D:\\x``) or on its share
        (``\\\\HV1\\share$\\x``) is on this agent: the longest matching
        ``windows_paths`` prefix, case-insensitive; None when none matches."""
        p = PureWindowsPath(winpath.replace("/", "\\"))
        if p.drive.startswith("\\\\"):
            host = p.drive.lstrip("\\").split("\\")[0].upper()
            base = self.windows_paths.get(f"\\\\{host}\\")
            if base is None:
                return None
            # \\HOST\share\rest -> base/share/rest
            share = p.drive.lstrip("\\").split("\\", 1)[1]
            return base.joinpath(share, *p.parts[1:])
        base = self.windows_paths.get(f"{p.drive.upper()}\\")
        if base is None or not p.drive:
            return None
        return base.joinpath(*p.parts[1:])

    @model_validator(mode="after")
    def _needs(self) -> Agent:
        if "hotadd" in self.transports and (self.vm is None or self.device_dir is None):
            raise ValueError("hotadd needs vm (the agent VM) and device_dir (where attached disks appear)")
        if "direct" in self.transports and not self.datastores:
            raise ValueError("direct needs datastores (datastore name -> local path)")
        if "vddk" in self.transports and self.vddk is None:
            raise ValueError("vddk needs vddk: {libdir: ...} (VMware's VDDK, installed by the site)")
        if self.windows_hosts() and not self.share_account:
            raise ValueError(
                "windows_paths with a share (\\\\HOST\\) needs share_account (the account shares grant read to)"
            )
        drives = [k for k in self.windows_paths if not k.startswith("\\\\")]
        if drives and len(self.hosts) != 1:
            raise ValueError(
                "windows_paths with drives means the agent runs on a Hyper-V host: hosts must name that one host"
            )
        return self


class Selection(_Model):
    """Which VMs: the union of every criterion, minus ``exclude``."""

    vms: list[str] = Field(default_factory=list)
    folders: list[str] = Field(default_factory=list)
    clusters: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    exclude_disks: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something(self) -> Selection:
        if not (self.vms or self.folders or self.clusters or self.hosts or self.tags):
            raise ValueError("selects nothing: give vms, folders, clusters, hosts or tags (vms: ['*'] for all)")
        return self

    @field_validator("exclude_disks")
    @classmethod
    def _disk_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for vm, names in v.items():
            for name in names:
                if not re.fullmatch(r"(scsi|sata|ide|nvme)\d+:\d+", name):
                    raise ValueError(f"{vm}: '{name}' is not a disk name like scsi0:1")
        return v


class Limits(_Model):
    per_agent: int = Field(5, ge=1)
    per_host: int = Field(4, ge=1)
    per_datastore: int = Field(4, ge=1)
    disks_per_vm: int = Field(2, ge=1)


class Timeouts(_Model):
    """How long to wait for vSphere tasks, in seconds (docs/vsphere.md); a task
    that runs longer goes on in vSphere and the next attempt finds it."""

    task: float = Field(600.0, gt=0)  # every task but snapshot removal
    snapshot_remove: float = Field(86400.0, gt=0)  # removal merges the delta: can take hours


class ObjectLock(_Model):
    """Object Lock of every object of the copy (docs/plan.md, docs/operations.md)."""

    mode: Literal["compliance"] = "compliance"
    days: int = Field(ge=1)
    # A lock set or extended runs this much longer than `days`, so that a chunk
    # that every backup reuses has its lock extended once per generation, not
    # at every copy (Veeam's "block generation").
    generation_days: int = Field(10, ge=0)


class CopyTarget(_Model):
    """The offsite copy: S3 object storage with Object Lock (docs/plan.md)."""

    endpoint: str | None = None  # None: AWS (or AWS_ENDPOINT_URL)
    bucket: str
    prefix: str = ""
    region: str | None = None
    access_key_env: str | None = None
    secret_key_env: str | None = None
    credentials_secret: str | None = None
    object_lock: ObjectLock
    workers: int = Field(8, ge=1, le=64)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        return _checked_url(v, "https://{}", ("https", "http"), "must be an http(s) URL")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", v):
            raise ValueError(f"'{v}' is not a bucket name (3-63 lower-case letters, digits, '.' and '-')")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return v.strip("/")

    @model_validator(mode="after")
    def _credentials(self) -> CopyTarget:
        by_env = (self.access_key_env is not None, self.secret_key_env is not None)
        if by_env[0] != by_env[1]:
            raise ValueError("give both access_key_env and secret_key_env")
        if by_env[0] and self.credentials_secret is not None:
            raise ValueError("give access_key_env and secret_key_env, or credentials_secret, not both")
        return self

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# How long each retention rule keeps a backup at most, in days.
RULE_DAYS = {"hourly": 1 / 24, "daily": 1, "weekly": 7, "monthly": 31, "yearly": 366}


class DrillVsphere(_Model):
    """Where a drill restores a vSphere VM: an isolated place (docs/restore.md, "Drills")."""

    network: str = Field(min_length=1)  # every adapter of the drill VM is connected here (an isolated port group)
    folder: str | None = None  # the VM folder of the drill VMs (default: the datacenter's VM folder)
    resource_pool: str | None = None  # (default: the target host's root resource pool)
    host: str | None = None  # ESXi host (default: the point's host)
    datastore: str | None = None  # (default: the point's datastores)


class DrillHyperv(_Model):
    """Where a drill restores a Hyper-V VM."""

    switch: str = Field(min_length=1)  # every adapter is connected to this (private or internal) virtual switch
    path: str | None = None  # the folder on the host the drill VMs go under (default: the point's folder's parent)
    host: str | None = None  # a Hyper-V host of the plan (default: the point's host)

    @field_validator("path")
    @classmethod
    def _windows_path(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"([A-Za-z]:\\|\\\\)", v):
            raise ValueError(f"'{v}' is not an absolute Windows path (D:\\Drills)")
        return v


class Drill(_Model):
    """Restore drills (docs/restore.md, "Drills"): the newest point of a sample
    of VMs restored into an isolated target, powered on, compared with the
    backup, timed, then removed. The schedule is the ``drill`` deployment's."""

    vsphere: DrillVsphere | None = None
    hyperv: DrillHyperv | None = None
    sample: int = Field(2, ge=1)  # VMs per drill run, the least recently drilled first
    vms: list[str] = Field(default_factory=lambda: ["*"])  # which VMs' points are drilled (names or patterns)
    prefix: str = Field("drill-", min_length=1)  # the drill VM's name: <prefix><vm>-<run>

    @model_validator(mode="after")
    def _somewhere(self) -> Drill:
        if self.vsphere is None and self.hyperv is None:
            raise ValueError("give vsphere (network, folder...) or hyperv (switch, path...): where drill VMs go")
        return self


class Plan(_Model):
    connection: Connection | None = None
    hyperv: list[HypervHost] = Field(default_factory=list)
    repository: Path
    # A repository vmbackup creates for the plan (`vmbackup init --plan`) is
    # encrypted unless this says none; an existing repository is what it is.
    encryption: Literal["aes-256-gcm", "none"] = "aes-256-gcm"
    # Where the passphrase of an encrypted repository comes from (never the plan itself).
    passphrase_env: str | None = Field(None, min_length=1)
    passphrase_secret: str | None = Field(None, min_length=1)
    agents: list[Agent] = Field(min_length=1)
    selection: Selection
    limits: Limits = Field(default_factory=Limits)
    quiesce: Literal["required", "preferred", "off"] = "preferred"
    transports: list[Transport] = Field(default_factory=lambda: list(TRANSPORTS), min_length=1)
    nbd_command: list[str] = Field(default_factory=lambda: list(DEFAULT_NBD_COMMAND), min_length=1)
    full_every_days: int | None = Field(None, ge=1)
    # Independent disks and physical-mode RDMs (no snapshot covers them):
    # skip them (the VM is ok, the row lists them) or fail the VM.
    independent_disks: Literal["skip", "fail"] = "skip"
    retention: dict[str, int] | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    # How often the nbd transport's session is kept alive and its cookie file
    # re-read by nbdkit: well under vCenter's 30 min idle timeout (KB 1031039).
    cookie_renew_seconds: int = Field(300, ge=1)
    drill: Drill | None = None
    copy_: CopyTarget | None = Field(None, alias="copy")

    def copy_warnings(self) -> list[str]:
        """What makes the copy's locks shorter than the retention's reach (docs/plan.md)."""
        if self.copy_ is None:
            return []
        days = self.copy_.object_lock.days
        out = []
        rules = self.retention or {}
        reach = max((RULE_DAYS[r] * n for r, n in rules.items() if r in RULE_DAYS), default=0)
        if reach > days:
            out.append(
                f"copy.object_lock.days is {days}, but the retention keeps backups up to {reach:g} days: "
                f"a backup older than {days} days that the copy still holds is unlocked if copies stop "
                f"(give at least {int(-(-reach // 1))})"
            )
        if not rules:
            out.append("the plan has no retention: copy.object_lock.days bounds nothing it keeps")
        return out

    @field_validator("transports")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a transport twice")
        return v

    @field_validator("nbd_command")
    @classmethod
    def _template(cls, v: list[str]) -> list[str]:
        return _check_template(v)

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        for rule, n in v.items():
            if rule not in RETENTION_RULES:
                raise ValueError(f"'{rule}' is not one of {', '.join(RETENTION_RULES)}")
            if n < 0:
                raise ValueError(f"{rule} must not be negative")
        return v

    @model_validator(mode="after")
    def _one_passphrase(self) -> Plan:
        if self.passphrase_env is not None and self.passphrase_secret is not None:
            raise ValueError("give at most one of passphrase_env and passphrase_secret")
        return self

    @model_validator(mode="after")
    def _hypervisors(self) -> Plan:
        if self.connection is None and not self.hyperv:
            raise ValueError("give connection (vCenter or ESXi) or hyperv (Hyper-V hosts), or both")
        names = [h.name.upper() for h in self.hyperv]
        for i, h in enumerate(self.hyperv):
            if names.index(h.name.upper()) != i:
                raise ValueError(f"hyperv[{i}].name: '{h.name}' is used by hyperv[{names.index(h.name.upper())}] too")
        if self.drill is not None:
            if self.drill.vsphere is not None and self.connection is None:
                raise ValueError("drill.vsphere: the plan has no vSphere connection")
            if self.drill.hyperv is not None:
                if not self.hyperv:
                    raise ValueError("drill.hyperv: the plan has no Hyper-V hosts")
                if self.drill.hyperv.host is not None and self.drill.hyperv.host.upper() not in names:
                    raise ValueError(f"drill.hyperv.host: '{self.drill.hyperv.host}' is not a Hyper-V host of the plan")
        return self

    @model_validator(mode="after")
    def _agents(self) -> Plan:
        names = [a.name for a in self.agents]
        for i, a in enumerate(self.agents):
            if names.index(a.name) != i:
                raise ValueError(f"agents[{i}].name: '{a.name}' is used by agents[{names.index(a.name)}] too")
            if a.nbd_command is not None:
                try:
                    _check_template(a.nbd_command)
                except ValueError as e:
                    raise ValueError(f"agents[{i}].nbd_command: {e}") from None
            if self.connection is not None and not set(a.transports) & set(self.transports):
                raise ValueError(f"agents[{i}].transports: none of them is in the plan's transports")
        return self

    def hyperv_host(self, name: str) -> HypervHost:
        for h in self.hyperv:
            if h.name.upper() == name.upper():
                return h
        raise InvalidInputError(f"Hyper-V host '{name}' is not in the plan")

    def agent(self, name: str) -> Agent:
        for a in self.agents:
            if a.name == name:
                return a
        raise InvalidInputError(f"agent '{name}' is not in the plan")


def _check_template(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("must not be empty")
    for arg in v:
        for name in re.findall(r"\{([^{}]*)\}", arg):
            if name not in NBD_PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join(NBD_PLACEHOLDERS)})")
    if not any("{socket}" in arg for arg in v):
        raise ValueError("must contain {socket}: the NBD server listens on that unix socket")
    return v


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return f"{value!r} is not one of {', '.join(choices)}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[0].lower() + msg[1:] if msg else msg


def plan_error(e: ValidationError) -> InvalidInputError:
    """One line for the first mistake (pydantic reports them in the plan's order)."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    where = _path(loc)
    msg = _message(err)
    more = len(e.errors()) - 1
    suffix = f" (and {more} more mistake{'s' if more > 1 else ''})" if more else ""
    return InvalidInputError(f"{where}: {msg}{suffix}" if where else f"{msg}{suffix}")


def _resolve_paths(data: Any, base: Path) -> Any:
    """Makes the plan's relative paths relative to the plan file."""
    if not isinstance(data, dict):
        return data

    def rel(v: Any) -> Any:
        return str(base / v) if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)) else v

    data = dict(data)
    if "repository" in data:
        data["repository"] = rel(data["repository"])
    conn = data.get("connection")
    if isinstance(conn, dict) and "ca_file" in conn:
        data["connection"] = {**conn, "ca_file": rel(conn["ca_file"])}
    hosts = data.get("hyperv")
    if isinstance(hosts, list):
        data["hyperv"] = [
            {**h, "ca_file": rel(h["ca_file"])} if isinstance(h, dict) and "ca_file" in h else h for h in hosts
        ]
    agents = data.get("agents")
    if isinstance(agents, list):
        fixed = []
        for a in agents:
            if isinstance(a, dict):
                a = dict(a)
                if "device_dir" in a:
                    a["device_dir"] = rel(a["device_dir"])
                if isinstance(a.get("datastores"), dict):
                    a["datastores"] = {k: rel(v) for k, v in a["datastores"].items()}
                if isinstance(a.get("windows_paths"), dict):
                    a["windows_paths"] = {k: rel(v) for k, v in a["windows_paths"].items()}
            fixed.append(a)
        data["agents"] = fixed
    return data


def parse_plan(data: Any, base: Path | None = None) -> Plan:
    """Validates a plan already parsed from YAML (a dict)."""
    if not isinstance(data, dict):
        raise InvalidInputError("the plan must be a mapping (connection, repository, agents, selection, ...)")
    if base is not None:
        data = _resolve_paths(data, base)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise plan_error(e) from None
    if plan.connection is not None:
        ca = plan.connection.ca_file
        if ca is not None and not ca.is_file():
            raise InvalidInputError(f"connection.ca_file: {ca} does not exist")
    for i, h in enumerate(plan.hyperv):
        if h.ca_file is not None and not h.ca_file.is_file():
            raise InvalidInputError(f"hyperv[{i}].ca_file: {h.ca_file} does not exist")
    return plan


def load_plan(path: str | os.PathLike) -> Plan:
    """Reads and validates a plan file; ``InvalidInputError`` (one line) on any mistake."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InvalidInputError(f"plan {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"plan {path} cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidInputError(f"plan {path}:{where}: not valid YAML: {problem}") from None
    return parse_plan(data, path.resolve().parent)


def resolve_password(conn: Connection | HypervHost, where: str | None = None) -> SecretStr:
    """The password of vSphere's connection or of a Hyper-V host, from its
    environment variable or Prefect Secret block. ``where`` names the entry
    in messages (default: ``connection`` or ``hyperv[<name>]``)."""
    if where is None:
        where = "connection" if isinstance(conn, Connection) else f"hyperv[{conn.name}]"
    if conn.password_env is not None:
        value = os.environ.get(conn.password_env)
        if not value:
            raise InvalidInputError(f"{where}.password_env: the environment variable {conn.password_env} is not set")
        return SecretStr(value)
    try:
        from prefect.blocks.system import Secret  # only when the plan names a block
    except ImportError:
        raise InvalidInputError(
            f"{where}.password_secret: reading Secret block '{conn.password_secret}' needs Prefect installed"
        ) from None
    try:
        secret = Secret.load(conn.password_secret)
    except ValueError:
        raise InvalidInputError(
            f"{where}.password_secret: there is no Secret block named '{conn.password_secret}'"
        ) from None
    value = secret.get()
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def resolve_copy_credentials(copy: CopyTarget) -> tuple[SecretStr, SecretStr] | None:
    """The copy's access key and secret key, from the environment variables or
    the Secret block the plan names (a JSON object with ``access_key`` and
    ``secret_key``); None when the plan names neither (boto3's own chain:
    AWS_ACCESS_KEY_ID, an instance profile...)."""
    if copy.access_key_env is not None and copy.secret_key_env is not None:
        out = []
        for field_name, env in (("access_key_env", copy.access_key_env), ("secret_key_env", copy.secret_key_env)):
            value = os.environ.get(env)
            if not value:
                raise InvalidInputError(f"copy.{field_name}: the environment variable {env} is not set")
            out.append(SecretStr(value))
        return out[0], out[1]
    if copy.credentials_secret is None:
        return None
    try:
        from prefect.blocks.system import Secret
    except ImportError:
        raise InvalidInputError(
            f"copy.credentials_secret: reading Secret block '{copy.credentials_secret}' needs Prefect installed"
        ) from None
    try:
        value = Secret.load(copy.credentials_secret).get()
    except ValueError:
        raise InvalidInputError(
            f"copy.credentials_secret: there is no Secret block named '{copy.credentials_secret}'"
        ) from None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not value.get("access_key") or not value.get("secret_key"):
        raise InvalidInputError(
            f"copy.credentials_secret: Secret block '{copy.credentials_secret}' must hold "
            '{"access_key": ..., "secret_key": ...}'
        )
    return SecretStr(str(value["access_key"])), SecretStr(str(value["secret_key"]))


PASSPHRASE_ENV = "VMBACKUP_PASSPHRASE"


def _load_secret_block(name: str, where: str) -> SecretStr:
    try:
        from prefect.blocks.system import Secret  # only when the plan names a block
    except ImportError:
        raise InvalidInputError(f"{where}: reading Secret block '{name}' needs Prefect installed") from None
    try:
        secret = Secret.load(name)
    except ValueError:
        raise InvalidInputError(f"{where}: there is no Secret block named '{name}'") from None
    value = secret.get()
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def resolve_passphrase(plan: Plan) -> tuple[SecretStr | None, str]:
    """The passphrase of the plan's repository and where it came from (for
    messages): ``passphrase_env``, ``passphrase_secret``, else
    ``$VMBACKUP_PASSPHRASE``; None when none of them gives one."""
    if plan.passphrase_env is not None:
        value = os.environ.get(plan.passphrase_env)
        if not value:
            raise InvalidInputError(f"passphrase_env: the environment variable {plan.passphrase_env} is not set")
        return SecretStr(value), f"passphrase_env {plan.passphrase_env}"
    if plan.passphrase_secret is not None:
        where = f"passphrase_secret {plan.passphrase_secret}"
        secret = _load_secret_block(plan.passphrase_secret, "passphrase_secret")
        if not secret.get_secret_value():
            raise InvalidInputError(f"{where}: the Secret block is empty")
        return secret, where
    fallback = os.environ.get(PASSPHRASE_ENV)
    return (SecretStr(fallback) if fallback else None), PASSPHRASE_ENV
