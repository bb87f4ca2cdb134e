"""Building, starting and stopping the simulator process, and its control endpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LabError, LabInputError

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
        """A context that trusts only the lab's CA (no verification bypass)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def summary(self) -> dict:
        """What ``lab up --json`` prints."""
        return {
            "state": str(self.state),
            "vsphere": {k: self.info["vsphere"][k] for k in ("url", "user", "password", "ca_file")},
            "agents": self.agents,
            "hosts": self.info["hosts"],
            "datacenter": self.info["datacenter"],
            "datastores": self.info["datastores"],
            "mode": self.info["mode"],
            "pid": self.info["pid"],
        }

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

    # Convenience wrappers over the control endpoint.
    def status(self) -> dict:
        return self.call("status")

    def write(self, vm: str, disk: str, offset: int, length: int, seed: int = 1) -> dict:
        return self.call("write", {"vm": vm, "disk": disk, "offset": offset, "length": length, "seed": seed})

    def disk_image(self, vm: str, disk: str, output: str | os.PathLike, snapshot: str | None = None) -> dict:
        body = {"vm": vm, "disk": disk, "output": str(Path(output).resolve())}
        if snapshot:
            body["snapshot"] = snapshot
        return self.call("disk-image", body)

    def set_faults(self, *, vm: str | None = None, host: str | None = None, **faults: Any) -> dict:
        body: dict = {"faults": faults}
        if vm:
            body["vm"] = vm
        if host:
            body["host"] = host
        return self.call("fault", body)

    def drop_sessions(self) -> int:
        return self.call("drop-sessions", {})["dropped"]

    def counters(self) -> dict:
        return self.status()["counters"]

    def reset_counters(self) -> dict:
        return self.call("counters/reset", {})


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return BINARY_NAME.encode() in cmdline


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
    return Lab(state, info)


def lab_up(state: str | os.PathLike, topology: str | os.PathLike | None = None, timeout: float = 60) -> Lab:
    """Start the lab in the background (or return the one already running in STATE)."""
    state = Path(state).resolve()
    try:
        return load_lab(state)
    except LabInputError:
        pass
    if topology is not None and not Path(topology).is_file():
        raise LabInputError(f"topology file {topology} does not exist")
    binary = build_simulator()
    state.mkdir(parents=True, exist_ok=True)
    (state / "lab.json").unlink(missing_ok=True)
    cmd = [str(binary), "--state", str(state)]
    if topology is not None:
        cmd += ["--topology", str(Path(topology).resolve())]
    logf = open(state / "lab.log", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state / "lab.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError("the lab simulator stopped while starting: " + " / ".join(tail))
        if (state / "lab.json").exists():
            try:
                return load_lab(state)
            except (LabError, ValueError):
                pass
        time.sleep(0.05)
    proc.terminate()
    raise LabError(f"the lab simulator did not start within {timeout:.0f} s (see {state / 'lab.log'})")


def lab_down(state: str | os.PathLike, timeout: float = 10) -> bool:
    """Stop the lab in STATE. Returns False if none was running."""
    state = Path(state).resolve()
    path = state / "lab.json"
    try:
        pid = json.loads(path.read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return False
    if not _alive(pid):
        path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True
