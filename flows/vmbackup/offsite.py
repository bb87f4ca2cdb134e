"""Reading an offsite copy (``--repo s3://BUCKET/PREFIX``): a local mirror the mover reads.

The mover reads directories, so a copy is read through a cache directory
that holds the repository's layout: its other files (config, keys), every
manifest of the copy's newest index, and the chunks a command needs (for a
restore, those of the backup restored: ``verify`` of the mirror without the
chunks names them). Every object is fetched by the version the index names
(never the newest version, which anyone with write access may have added)
and checked against the index's SHA-256 and size before it is renamed into
place. The endpoint and credentials come from the standard AWS environment.

The cache is ``$VMBACKUP_CACHE_DIR/s3/<bucket>/<prefix>`` (default
``~/.cache/vmbackup``); it is a cache: deleting it costs only a download.
``VMBACKUP_COPY_INDEX`` names an older index to read (``index/...json``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import copy as s3copy
from .errors import CopyError, InvalidInputError

WORKERS = 8


def cache_root() -> Path:
    base = os.environ.get("VMBACKUP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmbackup"
    )
    return Path(base) / "s3"


@dataclass
class Copy:
    """An offsite copy opened for reading: its newest index and a mirror directory."""

    target: s3copy.Target
    index: dict
    mirror: Path

    @property
    def objects(self) -> dict[str, dict]:
        return self.index["objects"]

    def fetch(self, rels: list[str]) -> list[tuple[str, str, str]]:
        """Fetches these objects into the mirror (skipping those already there
        and sound); returns (path, kind, message) for each that could not be
        fetched as the copy wrote it: ``missing_object``, ``unreadable_object``
        (the server fails to return it: a damaged volume answers 500) or
        ``corrupt_object``."""

        def one(rel: str) -> tuple[str, str, str] | None:
            e = self.objects.get(rel)
            if e is None:
                return rel, "missing_object", f"{rel} is not in the copy's index"
            dest = self.mirror / rel
            if dest.is_file() and dest.stat().st_size == e["size"]:
                if hashlib.sha256(dest.read_bytes()).hexdigest() == e["sha256"]:
                    return None  # in the cache already, as the copy wrote it
            key = self.target.key(rel)
            try:
                body = self.target.s3.get_object(Bucket=self.target.bucket, Key=key, VersionId=e["version"])[
                    "Body"
                ].read()
            except Exception as ex:
                code = s3copy.error_code(ex)
                if code in ("NoSuchKey", "NoSuchVersion", "404"):
                    return rel, "missing_object", f"version {e['version']} of {key} is missing"
                err = s3copy.s3_error(ex, f"reading version {e['version']} of {key}")
                if code is None:
                    raise err from None  # no answer at all: the command fails, not the object
                return rel, "unreadable_object", str(err)
            if len(body) != e["size"] or hashlib.sha256(body).hexdigest() != e["sha256"]:
                return rel, "corrupt_object", f"version {e['version']} of {key} is not what the copy wrote (SHA-256)"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
            tmp.write_bytes(body)
            os.replace(tmp, dest)
            return None

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            return [p for p in pool.map(one, rels) if p is not None]

    def chunks_needed(self, ids: list[str] | None) -> list[str]:
        """The chunk objects the mirror lacks for these backups (all: None)."""
        from . import _mover

        r = _mover.verify(str(self.mirror), ids, read_data=False)
        out = []
        for p in r.problems:
            if p.kind == "missing_chunk":
                rel = f"chunks/{p.object[:2]}/{p.object}"
                out.append(rel)
        return out


def open_copy(url: str, *, metadata: bool = True, target: s3copy.Target | None = None) -> Copy:
    """The copy at ``url`` with its mirror holding its other files and manifests
    (``target``: the copy's S3 client, a plan's ``copy:``; default: the AWS environment's)."""
    bucket, prefix = s3copy.parse_url(url)
    target = target or s3copy.Target(s3copy.client(), bucket, prefix)
    pick = os.environ.get("VMBACKUP_COPY_INDEX")
    index = s3copy.read_index(target, target.key(pick) if pick else None)
    if index is None:
        raise CopyError(f"{url} holds no copy (no index: a copy that never completed, or the wrong prefix)")
    mirror = cache_root() / bucket / (prefix or "_")
    marker = mirror / ".index"
    if marker.is_file() and marker.read_text().split("\n")[0] != str(index.get("repository")):
        shutil.rmtree(mirror)  # a cache of another repository under this name
    mirror.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{index.get('repository')}\n{index['key']}\n")
    c = Copy(target, index, mirror)
    if metadata:
        for d in ("chunks", "backups", "locks", *(f"chunks/{i:02x}" for i in range(256))):
            (mirror / d).mkdir(exist_ok=True)
        # manifests no longer in the index (forgotten since) leave the mirror
        for f in (mirror / "backups").glob("*.tib"):
            if f"backups/{f.name}" not in c.objects:
                f.unlink()
        rels = [r for r in c.objects if not r.startswith("chunks/")]
        _raise(url, c.fetch(rels))
    return c


def _raise(url: str, bad: list[tuple[str, str, str]]) -> None:
    if bad:
        raise CopyError(f"{url}: {bad[0][2]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def fetch_backups(c: Copy, url: str, ids: list[str]) -> None:
    """Every chunk these backups need fetched into the mirror (a VM's restore
    from the copy); one line naming what cannot be fetched."""
    missing = [i for i in ids if f"backups/{i}.tib" not in c.objects]
    if missing:
        raise InvalidInputError(f"no backup {missing[0]} in the copy {url}")
    _raise(url, c.fetch(c.chunks_needed(ids)))


def prepare_restore(url: str, backup_id: str) -> str:
    """A mirror of ``url`` holding every chunk backup ``backup_id`` needs; its path."""
    c = open_copy(url)
    if f"backups/{backup_id}.tib" not in c.objects:
        raise InvalidInputError(f"no backup {backup_id} in the copy {url}")
    needed = c.chunks_needed([backup_id])
    _raise(url, c.fetch(needed))
    return str(c.mirror)


def verify_copy(url: str, ids: list[str] | None, read_data: bool) -> tuple[Copy, list[dict[str, Any]]]:
    """The copy's own checks (before the mover verifies the mirror); returns its problems.

    - every object of the index is there in the version the copy wrote
      (``missing_object``);
    - an object someone wrote over (a newer version, or a delete marker, over
      the copy's): ``changed_object``; the copy's locked version is intact
      and is what readers use, but the bucket's credentials were used by
      something other than the copy;
    - an index key with more than one version: ``changed_index``;
    - with ``read_data``, every object of the backups checked is fetched and
      checked against its SHA-256 (``corrupt_object``; ``unreadable_object``
      when the server fails to return it), and the mover then re-reads every
      chunk.
    """
    c = open_copy(url)
    problems: list[dict[str, Any]] = []
    versions, markers = s3copy.list_versions(c.target)
    if c.index.get("index_versions", 1) > 1:
        problems.append(
            {
                "kind": "changed_index",
                "object": c.index["key"],
                "message": f"index {c.index['key']} was written over; its first version is read",
                "affected": [],
            }
        )
    marked = {m["rel"] for m in markers if m["latest"]}
    for rel, e in c.objects.items():
        vs = versions.get(rel, [])
        mine = next((v for v in vs if v["version"] == e["version"]), None)
        if mine is None:
            problems.append(
                {
                    "kind": "missing_object",
                    "object": c.target.key(rel),
                    "message": f"version {e['version']} of {c.target.key(rel)} is missing",
                    "affected": [],
                }
            )
        elif not mine["latest"] or rel in marked:
            problems.append(
                {
                    "kind": "changed_object",
                    "object": c.target.key(rel),
                    "message": f"{c.target.key(rel)} was written over or deleted after the copy; "
                    f"the copy's locked version {e['version']} is intact and is what is read",
                    "affected": [],
                }
            )
    if read_data:
        rels = c.chunks_needed(ids) if ids else [r for r in c.objects if r.startswith("chunks/")]
        for rel, kind, why in c.fetch(rels):
            problems.append({"kind": kind, "object": c.target.key(rel), "message": why, "affected": []})
    return c, problems
