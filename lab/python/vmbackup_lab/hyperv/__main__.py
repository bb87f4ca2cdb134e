"""`python -m vmbackup_lab.hyperv --state DIR [--topology FILE]`: run a lab
Hyper-V host in the foreground; print its connection as one JSON line when it
serves; stop on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from .host import Host
from .server import LabWinRM, user_file
from .tlscert import make_server_context
from .topology import TopologyError, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmbackup_lab.hyperv", description=__doc__)
    ap.add_argument("--state", required=True, type=Path, help="the lab's state directory")
    ap.add_argument("--topology", type=Path, help="JSON topology (default: the built-in one)")
    args = ap.parse_args(argv)
    try:
        topo = load(args.topology)
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = args.state.resolve() / "hyperv" / topo["host"]
    root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=root / "hyperv.log", level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    password = os.environ.get("VMBACKUP_LAB_PASSWORD") or secrets.token_urlsafe(18)
    token = secrets.token_urlsafe(24)
    users = root / "ntlm-users"
    user_file(users, topo["user"], password)
    # pyspnego's NTLM acceptor reads its users from this file
    os.environ["NTLM_USER_FILE"] = str(users)
    ca_file = root / "ca.pem"
    ctx, der = make_server_context(ca_file, topo["host"])
    host = Host(root, topo)
    lab = LabWinRM(host, topo["user"], password, token, ctx, der)
    lab.start()
    info = {
        "url": f"https://127.0.0.1:{lab.https.server_address[1]}/wsman",
        "http_url": f"http://127.0.0.1:{lab.http.server_address[1]}/wsman",
        "user": topo["user"],
        "password": password,
        "ca_file": str(ca_file),
        "transport": "ntlm",
        "host": topo["host"],
        "root": str(root),
        "share_root": str(root / "shares"),
        "pid": os.getpid(),
    }
    state_file = root / "hyperv.json"
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(info, control={"url": info["url"].replace("/wsman", "/lab"), "token": token}), f)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps(info), flush=True)
    logging.getLogger(__name__).info("serving %s and %s", info["url"], info["http_url"])
    stop.wait()
    lab.stop()
    state_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, RuntimeError) as e:  # a missing tool, an unwritable state directory
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
