"""Remove what crashed backups left on a Hyper-V host (the sweeper's part).

Only runs in vmbackup's ledger on the host and older than the threshold are
removed (and restores no longer running: `restore.sweep_restores`) (`Remove-VmbackupShadowCopies.ps1`): a backup still running keeps its
shadow copy, and copies that another product made are never touched.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..errors import InvalidInputError
from .client import HypervClient

log = logging.getLogger(__name__)


def sweep_host(
    client: HypervClient, *, older_than_seconds: float, repository: str | None = None, host: str | None = None
) -> list[dict[str, Any]]:
    """Remove this system's runs older than ``older_than_seconds`` from the host,
    and the restores that are no longer running (`restore.sweep_restores`:
    judged by ``repository``'s restore ledger for the plan's host ``host``,
    else by age).

    Returns one ``{"RunId", "Created", "Deleted": [shadow ids]}`` per run removed
    (a restore's has ``"Kind": "restore"``).
    """
    if older_than_seconds < 0:
        raise InvalidInputError(f"older_than_seconds {older_than_seconds} is negative")
    answer = client.run_script(
        "Remove-VmbackupShadowCopies.ps1", {"OlderThanSeconds": int(math.ceil(older_than_seconds))}
    )
    removed = (answer or {}).get("Removed") or []
    removed = removed if isinstance(removed, list) else [removed]
    for r in removed:
        r["Deleted"] = r.get("Deleted") or []
        if not isinstance(r["Deleted"], list):
            r["Deleted"] = [r["Deleted"]]
        log.info("host %s: removed run %s (since %s)", client.host, r.get("RunId"), r.get("Created"))
    from .restore import sweep_restores

    removed += sweep_restores(client, repository, host or client.host, older_than_seconds=older_than_seconds)
    return removed
