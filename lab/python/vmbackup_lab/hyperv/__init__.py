"""The lab's Hyper-V host: WS-Management (WinRM) in front of a model of a host.

`HypervLab.start(state_dir)` runs `python -m vmbackup_lab.hyperv` as a child
process and returns once it serves; `vmbackup lab up` starts hosts detached
(`spawn`) and finds them again (`attach`); the methods drive the model
through the control endpoint. See docs/lab.md ("The Hyper-V host").
"""

from __future__ import annotations

import json
import os
import select
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from ..errors import LabError, LabInputError

MODULE = "vmbackup_lab.hyperv"


class HypervLabError(LabError):
    """The lab host refused a control request or did not start (one line)."""


class HypervLabInputError(HypervLabError, LabInputError):
    """The lab host refused a control request as bad input (an unknown VM, disk or fault)."""


@dataclass
class HypervLab:
    url: str
    http_url: str
    user: str
    password: str
    ca_file: str
    transport: str
    host: str
    root: Path
    share_root: Path
    pid: int
    control_url: str
    token: str
    process: subprocess.Popen | None = None

    @staticmethod
    def _command(state: Path, topology: Path | None) -> tuple[list[str], dict]:
        cmd = [sys.executable, "-m", MODULE, "--state", str(state)]
        if topology is not None:
            cmd += ["--topology", str(topology)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[2])] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        return cmd, env

    @classmethod
    def spawn(cls, state: Path, topology: Path, root: Path, password: str) -> subprocess.Popen:
        """Start a host detached from this process (it outlives it, as `vmbackup lab up` needs).

        `root` is the host's directory (STATE/hyperv/<host>): its `hyperv.json`
        appears when it serves (`attach` reads it); its stderr goes to
        `root/stderr.log` and its stdout (the connection line, password
        included) nowhere. `password` is the host's (shared by the hosts of a lab).
        """
        cmd, env = cls._command(state, topology)
        env["VMBACKUP_LAB_PASSWORD"] = password
        root.mkdir(parents=True, exist_ok=True)
        (root / "hyperv.json").unlink(missing_ok=True)
        with open(root / "stderr.log", "ab") as err:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
            )

    @classmethod
    def attach(cls, root: Path) -> HypervLab:
        """The host serving from `root` (its hyperv.json), without a child process to stop."""
        try:
            info = json.loads((Path(root) / "hyperv.json").read_text())
        except FileNotFoundError:
            raise HypervLabError(f"the lab Hyper-V host in {root} is not running") from None
        except ValueError as e:
            raise HypervLabError(f"{Path(root) / 'hyperv.json'} is damaged: {e}") from None
        return cls._from_info(info, info["control"], None)

    @classmethod
    def _from_info(cls, info: dict, ctl: dict, proc: subprocess.Popen | None) -> HypervLab:
        return cls(
            url=info["url"],
            http_url=info["http_url"],
            user=info["user"],
            password=info["password"],
            ca_file=info["ca_file"],
            transport=info["transport"],
            host=info["host"],
            root=Path(info["root"]),
            share_root=Path(info["share_root"]),
            pid=info["pid"],
            control_url=ctl["url"],
            token=ctl["token"],
            process=proc,
        )

    @classmethod
    def start(cls, state: Path, topology: Path | None = None, timeout: float = 120) -> HypervLab:
        """Start a host in a child process; return when it serves."""
        cmd, env = cls._command(state, topology)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        # the child prints one line when it serves; a bound on waiting for it
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            err = proc.stderr.read().strip().splitlines()
            raise HypervLabError(f"the lab Hyper-V host did not start: {err[-1] if err else 'no output'}")
        info = json.loads(line)
        state_file = Path(info["root"]) / "hyperv.json"
        ctl = json.loads(state_file.read_text())["control"]
        return cls._from_info(info, ctl, proc)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            for s in (self.process.stdout, self.process.stderr):
                if s:
                    s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def describe(self) -> dict:
        """What `vmbackup lab up --json` shows under `hyperv`."""
        return {
            "url": self.url,
            "http_url": self.http_url,
            "user": self.user,
            "password": self.password,
            "ca_file": self.ca_file,
            "transport": self.transport,
            "host": self.host,
            "share_root": str(self.share_root),
        }

    # --- control ----------------------------------------------------------------

    def _post(self, path: str, body: dict | None = None) -> dict:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        req = urllib.request.Request(
            self.control_url + path,
            data=json.dumps(body or {}).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=120) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", str(e))
            except ValueError:
                msg = str(e)
            if e.code == 400:
                raise HypervLabInputError(msg) from None
            raise HypervLabError(f"lab Hyper-V host {self.host}{path}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise HypervLabError(
                f"the lab Hyper-V host {self.host} does not answer ({getattr(e, 'reason', e)}); "
                "run `vmbackup lab up` again"
            ) from None

    def status(self) -> dict:
        return self._post("/status")

    def write(self, vm: str, disk: str, offset: int, length: int, seed: int = 1) -> dict:
        """A guest write of the lab's pattern (docs/lab.md) into the disk's top file;
        returns `{vm, disk, file, host}` (`file`: the top file's Windows path)."""
        return self._post("/write", {"vm": vm, "disk": disk, "offset": offset, "length": length, "seed": seed})

    def disk_image(self, vm: str, disk: str, output: Path, shadow: str | None = None) -> Path:
        """The guest's view of a disk, now or as of shadow copy `shadow`, as a raw file."""
        self._post("/disk-image", {"vm": vm, "disk": disk, "output": str(Path(output).resolve()), "shadow": shadow})
        return Path(output)

    def set_faults(self, vm: str | None = None, **faults) -> dict:
        """Replace the host's faults (vm None) or a VM's; returns `{faults, host}`."""
        return self._post("/fault", {"vm": vm, "faults": faults})

    def drop_sessions(self) -> int:
        """Forget every WinRM shell and connection; returns how many shells there were."""
        return self._post("/drop-sessions")["dropped"]

    def reset_counters(self) -> dict:
        """Every peak (`peak_shadow_copies`, `peak_shadow_copies_per_volume`) becomes what is open now."""
        return self._post("/counters/reset")

    def vm_names(self) -> list[str]:
        return [v["name"] for v in self.status()["vms"]]

    def local_path(self, winpath: str) -> Path:
        """Where a path on the host (`D:\\x`) or a share of it (`\\\\HV1\\share\\x`) is on this machine."""
        p = PureWindowsPath(winpath)
        if p.drive.startswith("\\\\"):
            share = p.drive.split("\\")[-1]
            return self.share_root.joinpath(share, *p.parts[1:])
        return self.root.joinpath("volumes", p.drive.rstrip(":").upper(), *p.parts[1:])
