"""Building, starting and stopping the lab's processes, and their control endpoints.

A lab is the vSphere simulator (`vmbackup-labsim`, STATE/lab.json) and, when
its topology asks, Hyper-V hosts (`python -m vmbackup_lab.hyperv`, one
process each, listed in STATE/hyperv-hosts.json, each serving from
STATE/hyperv/<host>/). All run detached from the process that started them;
`lab_down` stops them by the pids recorded there.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import s3server
from .errors import LabError, LabInputError
from .hyperv import MODULE as HYPERV_MODULE
from .hyperv import HypervLab

log = logging.getLogger(__name__)

BINARY_NAME = "vmbackup-labsim"
# Debian's golang-github-vmware-govmomi-dev puts govmomi here; with it Go builds in
# GOPATH mode without any network. Elsewhere the module mode (lab/vsphere/go.mod) is used.
DEBIAN_GOPATH = Path("/usr/share/gocode")


def source_dir() -> Path:
    """The Go sources: $VMBACKUP_LAB_SRC, or lab/vsphere in the work tree."""
    env = os.environ.get("VMBACKUP_LAB_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "vsphere"


def binary_path() -> Path:
    """Where the simulator binary is: $VMBACKUP_LAB_SIM, or lab/vsphere/bin."""
    env = os.environ.get("VMBACKUP_LAB_SIM")
    if env:
        return Path(env)
    return source_dir() / "bin" / BINARY_NAME


def build_simulator(force: bool = False) -> Path:
    """Build the simulator if it is missing or older than its sources; return its path."""
    binary = binary_path()
    src = source_dir()
    sources = list(src.glob("*.go")) if src.is_dir() else []
    if binary.exists() and not force:
        if not sources or binary.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
            return binary
    if not sources:
        raise LabError(f"simulator binary {binary} is missing and there are no Go sources in {src} to build it")
    env = dict(os.environ)
    if (DEBIAN_GOPATH / "src/github.com/vmware/govmomi/simulator").is_dir() and "GOPATH" not in os.environ:
        env.update(GOPATH=str(DEBIAN_GOPATH), GO111MODULE="off")
    if not any(k in env for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(binary.parent / ".gocache")  # go refuses to build without a cache
    binary.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["go", "build", "-o", str(binary), "."], cwd=src, env=env, capture_output=True, text=True, timeout=600
        )
    except FileNotFoundError as e:
        raise LabError(
            "building the lab simulator needs Go (apt-get install golang-go golang-github-vmware-govmomi-dev)"
        ) from e
    if proc.returncode != 0:
        raise LabError(f"building the lab simulator failed:\n{proc.stderr.strip()}")
    return binary


@dataclass
class Lab:
    """A running lab, as described by STATE/lab.json."""

    state: Path
    info: dict
    # the Hyper-V hosts (STATE/hyperv-hosts.json): {host, root, pid, vms}
    hyperv: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.info["vsphere"]["url"]

    @property
    def host(self) -> str:
        return self.info["vsphere"]["host"]

    @property
    def user(self) -> str:
        return self.info["vsphere"]["user"]

    @property
    def password(self) -> str:
        return self.info["vsphere"]["password"]

    @property
    def ca_file(self) -> str:
        return self.info["vsphere"]["ca_file"]

    @property
    def agents(self) -> list[str]:
        return [a["name"] for a in self.info["agents"]]

    def ssl_context(self) -> ssl.SSLContext:
        """A context that trusts only the lab's CA (no verification bypass).

        A lab whose certificate names other hosts on purpose (topology
        ``tls_names`` without 127.0.0.1) is still verified against its own CA,
        which signs nothing else; only the name check is left out, for this
        control client of the lab (never the product's connections).
        """
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if "127.0.0.1" not in self.info["vsphere"].get("tls_names", ["127.0.0.1"]):
            ctx.check_hostname = False
        return ctx

    def summary(self) -> dict:
        """What ``lab up --json`` prints."""
        hosts = [hv.describe() for hv in self.hyperv_hosts()]
        return {
            "state": str(self.state),
            "vsphere": {k: self.info["vsphere"][k] for k in ("url", "user", "password", "ca_file")},
            "agents": self.agents,
            "hosts": self.info["hosts"],
            "datacenter": self.info["datacenter"],
            "datastores": self.info["datastores"],
            "mode": self.info["mode"],
            "pid": self.info["pid"],
            "hyperv": hosts[0] if hosts else None,
            "hyperv_hosts": hosts,
            "s3": s3server.summary(self.state),
        }

    # --- Hyper-V hosts ------------------------------------------------------------

    def hyperv_hosts(self) -> list[HypervLab]:
        """The lab's Hyper-V hosts, attached to their running processes (``process`` None)."""
        return [HypervLab.attach(Path(h["root"])) for h in self.hyperv]

    def hyperv_host(self, name: str) -> HypervLab:
        """The Hyper-V host named ``name`` (ignoring case); LabInputError without one."""
        for h in self.hyperv:
            if h["host"].lower() == name.lower():
                return HypervLab.attach(Path(h["root"]))
        have = ", ".join(h["host"] for h in self.hyperv) or "none"
        raise LabInputError(f"the lab has no Hyper-V host {name!r} (it has {have})")

    def is_hyperv_host(self, name: str | None) -> bool:
        return name is not None and any(h["host"].lower() == name.lower() for h in self.hyperv)

    def hyperv_for_vm(self, name: str, host: str | None = None) -> HypervLab:
        """The Hyper-V host that has VM ``name`` (``host`` picks one when several do)."""
        hv = self._route(name, host)
        if hv is None:
            raise LabInputError(f"no Hyper-V host of the lab has a VM named {name!r}")
        return hv

    def _route(self, vm: str | None, host: str | None) -> HypervLab | None:
        """The Hyper-V host a request for ``vm`` goes to, or None for vSphere."""
        if host is not None and self.is_hyperv_host(host):
            hv = self.hyperv_host(host)
            known = any(vm in h["vms"] for h in self.hyperv if h["host"] == hv.host)
            if vm is not None and not known and vm not in hv.vm_names():
                raise LabInputError(f"Hyper-V host {hv.host} has no VM named {vm!r}")
            return hv
        if vm is None:
            return None
        having = [h for h in self.hyperv if vm in h["vms"]]
        if not having:  # a VM made since `up` (a restored one): ask the hosts
            having = [h for h in self.hyperv if vm in HypervLab.attach(Path(h["root"])).vm_names()]
        if len(having) > 1:
            names = " and ".join(h["host"] for h in having)
            raise LabInputError(f"VM {vm!r} is on Hyper-V hosts {names}: name one with --host")
        return HypervLab.attach(Path(having[0]["root"])) if having else None

    def call(self, op: str, body: dict | None = None, timeout: float = 120) -> Any:
        """Call the control endpoint (POST with a body, GET without)."""
        ctl = self.info["control"]
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            ctl["url"] + op,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Authorization": "Bearer " + ctl["token"], "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as res:
                return json.load(res)
        except urllib.error.HTTPError as e:
            try:
                msg = json.load(e).get("error", str(e))
            except ValueError:
                msg = str(e)
            if e.code == 400:
                raise LabInputError(msg) from None
            raise LabError(f"lab control {op}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise LabError(f"the lab in {self.state} does not answer ({e}); run `vmbackup lab up` again") from None

    # Convenience wrappers over the control endpoints. A request naming a VM of
    # a Hyper-V host (or a Hyper-V host) goes to that host, any other to vSphere.
    def status(self) -> dict:
        """vSphere's status, with ``hyperv_hosts``: each Hyper-V host's (VMs, shadow copies, runs, counters)."""
        st = self.call("status")
        st["hyperv_hosts"] = [hv.status() for hv in self.hyperv_hosts()]
        return st

    def write(self, vm: str, disk: str, offset: int, length: int, seed: int = 1, host: str | None = None) -> dict:
        hv = self._route(vm, host)
        if hv is not None:
            return hv.write(vm, disk, offset, length, seed)
        return self.call("write", {"vm": vm, "disk": disk, "offset": offset, "length": length, "seed": seed})

    def disk_image(
        self,
        vm: str,
        disk: str,
        output: str | os.PathLike,
        snapshot: str | None = None,
        *,
        shadow: str | None = None,
        host: str | None = None,
    ) -> dict:
        """A disk's content as a raw file: a vSphere VM's (``snapshot``) or a Hyper-V VM's (``shadow``)."""
        hv = self._route(vm, host)
        if hv is not None:
            if snapshot:
                raise LabInputError(f"{vm} is a Hyper-V VM: it has shadow copies (--shadow), not snapshots")
            out = hv.disk_image(vm, disk, Path(output), shadow=shadow)
            return {"output": str(out.resolve()), "size": out.stat().st_size, "disk": disk, "host": hv.host}
        if shadow:
            raise LabInputError(f"{vm} is not a Hyper-V VM: it has snapshots (--snapshot), not shadow copies")
        body = {"vm": vm, "disk": disk, "output": str(Path(output).resolve())}
        if snapshot:
            body["snapshot"] = snapshot
        return self.call("disk-image", body)

    def set_faults(self, *, vm: str | None = None, host: str | None = None, **faults: Any) -> dict:
        """Replace a VM's or a host's faults (a Hyper-V host's with ``host`` and no ``vm``)."""
        if faults.keys() == {"none"}:  # `--set none` clears them all, as no `--set` does
            faults = {}
        hv = self._route(vm, host)
        if hv is not None:
            return hv.set_faults(vm, **faults)
        body: dict = {"faults": faults}
        if vm:
            body["vm"] = vm
        if host:
            body["host"] = host
        return self.call("fault", body)

    def drop_sessions(self) -> int:
        """Drop every vSphere session and every Hyper-V host's WinRM shells and
        connections; returns the number of vSphere sessions and WinRM shells dropped."""
        return sum(self.drop_all_sessions().values())

    def drop_sessions_after(self, folder_requests: int) -> None:
        """Drop every vSphere session once ``folder_requests`` more datastore
        (/folder) requests have been served: a drop in the middle of a read."""
        self.call("drop-sessions", {"after_folder_requests": folder_requests})

    def expire_idle_sessions(self, seconds: float) -> int:
        """Drop the vSphere sessions idle for ``seconds`` or more (vCenter's idle timeout)."""
        return self.call("drop-sessions", {"idle_seconds": seconds})["dropped"]

    def drop_all_sessions(self) -> dict[str, int]:
        """What `drop_sessions` dropped, per endpoint: ``vsphere`` and each Hyper-V host's name."""
        out = {"vsphere": self.call("drop-sessions", {})["dropped"]}
        for hv in self.hyperv_hosts():
            out[hv.host] = hv.drop_sessions()
        return out

    def counters(self) -> dict:
        return self.call("status")["counters"]

    def reset_counters(self) -> dict:
        """Every peak becomes what exists now, in vSphere and on every Hyper-V host
        (the Hyper-V answers under ``hyperv``, by host)."""
        res = self.call("counters/reset", {})
        hosts = {hv.host: hv.reset_counters() for hv in self.hyperv_hosts()}
        if hosts:
            res = dict(res, hyperv=hosts)
        return res


HYPERV_HOSTS = "hyperv-hosts.json"
# Starting a Hyper-V host makes its VMs' disks with qemu-img and qemu-io.
HYPERV_START_TIMEOUT = 180.0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    return BINARY_NAME.encode() in _cmdline(pid)


def _hyperv_alive(pid: int, state: Path) -> bool:
    """Is `pid` the Hyper-V host process of this state directory (not a reused pid)?"""
    argv = _cmdline(pid).split(b"\0")
    return HYPERV_MODULE.encode() in argv and str(state).encode() in argv


def _hyperv_record(state: Path) -> dict:
    try:
        return json.loads((state / HYPERV_HOSTS).read_text())
    except FileNotFoundError:
        return {"ready": True, "hosts": []}
    except ValueError as e:
        raise LabError(f"{state / HYPERV_HOSTS} is damaged: {e}") from None


def hyperv_topologies(topology: str | os.PathLike | None) -> list[dict]:
    """The Hyper-V hosts a lab topology asks for, each checked and complete.

    The built-in topology (None) has one, ``hv1`` (hyperv/topology.py's
    default); a topology file has those of its ``hyperv`` list, none without
    it. Every host takes the first one's user (all hosts of a lab share one
    user and password). Bad input raises LabInputError with one line.
    """
    from .hyperv.topology import DEFAULT, TopologyError, check

    if topology is None:
        # hv1 as in hyperv/topology.py, but legacy01 (Backup service off) on E:
        # rather than next to win01 on D:, so that win01 can be quiesced (a
        # running VM without a working Backup service on the same volume would
        # make every backup of that volume crash-consistent: docs/hyperv.md)
        vms = json.loads(json.dumps(DEFAULT["vms"]))
        for vm in vms:
            if vm["name"] == "legacy01":
                vm["volume"] = "E"
        given: Any = [{"host": DEFAULT["host"], "vms": vms}]
        where, vsphere_hosts = "the built-in topology", set()
    else:
        where = f"topology {topology}"
        try:
            data = json.loads(Path(topology).read_text())
        except (OSError, ValueError) as e:
            raise LabInputError(f"{where}: {e}") from None
        if not isinstance(data, dict):
            raise LabInputError(f"{where}: not a JSON object")
        if "hyperv" not in data:
            return []
        given = data["hyperv"]
        clusters = data.get("clusters") or []
        vsphere_hosts = {
            str(h).lower()
            for c in (clusters if isinstance(clusters, list) else [])
            if isinstance(c, dict)
            for h in c.get("hosts") or []
        } | {str(h).lower() for h in data.get("standalone_hosts") or []}
    if not isinstance(given, list):
        raise LabInputError(f"{where}: hyperv: a list of Hyper-V host topologies")
    out: list[dict] = []
    for i, g in enumerate(given):
        if not isinstance(g, dict) or "host" not in g:
            raise LabInputError(f'{where}: hyperv[{i}]: an object with at least the host\'s name ("host")')
        if out:
            g = {"user": out[0]["user"], **g}
        try:
            t = check(g, where=f"hyperv[{i}].")
        except TopologyError as e:
            raise LabInputError(f"{where}: {e}") from None
        if out and t["user"] != out[0]["user"]:
            raise LabInputError(
                f"{where}: hyperv[{i}].user: all Hyper-V hosts of a lab share one user ({out[0]['user']!r})"
            )
        if any(t["host"].lower() == o["host"].lower() for o in out):
            raise LabInputError(f"{where}: hyperv[{i}].host: {t['host']!r} is repeated")
        if t["host"].lower() in vsphere_hosts:
            raise LabInputError(f"{where}: hyperv[{i}].host: {t['host']!r} is the name of a vSphere host too")
        out.append(t)
    return out


def load_lab(state: str | os.PathLike) -> Lab:
    """The running lab in STATE; LabInputError if there is none."""
    state = Path(state).resolve()
    path = state / "lab.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabInputError(
            f"no lab is running in {state} (start one with `vmbackup lab up --state {state}`)"
        ) from None
    except ValueError as e:
        raise LabError(f"{path} is damaged: {e}") from None
    if not _alive(info.get("pid", -1)):
        raise LabInputError(f"the lab in {state} is not running any more (start it with `vmbackup lab up`)")
    record = _hyperv_record(state)
    if not record.get("ready"):
        raise LabInputError(f"the lab in {state} is still starting its Hyper-V hosts")
    for h in record["hosts"]:
        if not _hyperv_alive(h["pid"], state) or not (Path(h["root"]) / "hyperv.json").exists():
            raise LabInputError(
                f"the lab's Hyper-V host {h['host']} in {state} is not running any more "
                "(start the lab again with `vmbackup lab up`)"
            )
    return Lab(state, info, record["hosts"])


def _stop(pid: int, alive: Any, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps it if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid, wait=True)


def _reap(pid: int, wait: bool = False) -> None:
    """Collects the exit status of a process this process started (else it stays a zombie)."""
    try:
        os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:  # not our child: its parent (or init) reaps it
        pass


def _last_line(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    line = lines[-1] if lines else "no output"
    return line[len("error: ") :] if line.startswith("error: ") else line


def _start_hyperv(state: Path, topologies: list[dict]) -> list[tuple[dict, subprocess.Popen]]:
    """Spawn every Hyper-V host at once (they start in parallel) and record them."""
    password = os.environ.get("VMBACKUP_LAB_PASSWORD") or secrets.token_urlsafe(18)
    started: list[tuple[dict, subprocess.Popen]] = []
    record: dict = {"ready": False, "hosts": []}
    try:
        for t in topologies:
            root = state / "hyperv" / t["host"]
            root.mkdir(parents=True, exist_ok=True)
            (root / "stderr.log").unlink(missing_ok=True)
            tfile = root / "topology.json"
            tfile.write_text(json.dumps(t, indent=1))
            proc = HypervLab.spawn(state, tfile, root, password)
            entry = {"host": t["host"], "root": str(root), "pid": proc.pid, "vms": [vm["name"] for vm in t["vms"]]}
            started.append((entry, proc))
            record["hosts"].append(entry)
            _write_json(state / HYPERV_HOSTS, record)
    except OSError as e:
        for _entry, proc in started:
            _stop(proc.pid, lambda p: _hyperv_alive(p, state), 5)
        (state / HYPERV_HOSTS).unlink(missing_ok=True)
        raise LabError(f"starting the lab's Hyper-V hosts failed: {e}") from None
    return started


def _wait_hyperv(state: Path, started: list[tuple[dict, subprocess.Popen]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(started)
    while waiting:
        for entry, proc in list(waiting):
            root = Path(entry["root"])
            if proc.poll() is not None:
                raise LabError(f"the lab Hyper-V host {entry['host']} did not start: {_last_line(root / 'stderr.log')}")
            try:
                if json.loads((root / "hyperv.json").read_text()).get("pid") == proc.pid:
                    waiting.remove((entry, proc))
            except (OSError, ValueError):
                pass  # not yet written (or being written)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(e["host"] for e, _ in waiting)
            raise LabError(
                f"the lab Hyper-V host(s) {names} did not start within {timeout:.0f} s "
                f"(see {state / 'hyperv' / waiting[0][0]['host'] / 'stderr.log'})"
            )
        if waiting:
            time.sleep(0.05)
    _write_json(state / HYPERV_HOSTS, {"ready": True, "hosts": [e for e, _ in started]})


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def lab_up(
    state: str | os.PathLike,
    topology: str | os.PathLike | None = None,
    timeout: float = 60,
    hyperv_timeout: float = HYPERV_START_TIMEOUT,
) -> Lab:
    """Start the lab in the background (or return the one already running in STATE).

    The vSphere simulator and the topology's Hyper-V hosts start detached (they
    outlive this process) and in parallel. If any of them fails to start,
    everything started is stopped and LabError says which one and why.
    """
    state = Path(state).resolve()
    try:
        return load_lab(state)
    except LabInputError:
        pass
    if topology is not None and not Path(topology).is_file():
        raise LabInputError(f"topology file {topology} does not exist")
    hv_topologies = hyperv_topologies(topology)
    binary = build_simulator()
    lab_down(state)  # what is left of a lab that half stopped
    state.mkdir(parents=True, exist_ok=True)
    (state / "lab.json").unlink(missing_ok=True)
    started = _start_hyperv(state, hv_topologies) if hv_topologies else []
    proc = None
    s3 = None
    try:
        if s3server.wanted(topology):  # SeaweedFS starts beside the simulator (about a second)
            s3 = s3server.spawn(state)
        cmd = [str(binary), "--state", str(state)]
        if topology is not None:
            cmd += ["--topology", str(Path(topology).resolve())]
        with open(state / "lab.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        _wait_vsphere(state, proc, timeout)
        if s3 is not None:
            s3server.wait_ready(state, *s3, timeout)
        _wait_hyperv(state, started, hyperv_timeout)
        return load_lab(state)
    except BaseException:
        # nothing of a lab that failed to start stays running
        if proc is not None:
            _stop(proc.pid, lambda p: proc.poll() is None, 5)
        if s3 is not None:
            _stop(s3[0].pid, lambda p: s3[0].poll() is None, 5)
            (state / s3server.RECORD).unlink(missing_ok=True)
        for _entry, hv in started:
            _stop(hv.pid, lambda p, hv=hv: hv.poll() is None, 5)
        (state / HYPERV_HOSTS).unlink(missing_ok=True)
        (state / "lab.json").unlink(missing_ok=True)
        raise


def _wait_vsphere(state: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state / "lab.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError("the lab simulator stopped while starting: " + " / ".join(tail))
        try:
            if _alive(json.loads((state / "lab.json").read_text())["pid"]):
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.05)
    raise LabError(f"the lab simulator did not start within {timeout:.0f} s (see {state / 'lab.log'})")


def lab_down(state: str | os.PathLike, timeout: float = 10) -> bool:
    """Stop the lab in STATE (the simulator and every Hyper-V host). Returns False if none was running."""
    state = Path(state).resolve()
    stopped = False
    path = state / "lab.json"
    try:
        pid = json.loads(path.read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        pid = None
    if pid is not None and _alive(pid):
        _stop(pid, _alive, timeout)
        stopped = True
    path.unlink(missing_ok=True)
    try:
        hosts = _hyperv_record(state)["hosts"]
    except LabError:
        hosts = []
    for h in hosts:
        if _hyperv_alive(h["pid"], state):
            _stop(h["pid"], lambda p: _hyperv_alive(p, state), timeout)
            stopped = True
        (Path(h["root"]) / "hyperv.json").unlink(missing_ok=True)
    (state / HYPERV_HOSTS).unlink(missing_ok=True)
    if s3server.stop(state, timeout):
        stopped = True
    return stopped
