"""Reading an offsite copy (``--repo s3://BUCKET/PREFIX``): a local mirror the mover reads.

The mover reads directories, so a copy is read through a cache directory
that holds the repository's layout: its other files (config, keys), every
manifest of the copy's newest index, and the chunks a command needs (for a
restore, those of the backup restored: ``verify`` of the mirror without the
chunks names them). Every object is fetched by the version the index names
(never the newest version, which anyone with write access may have added)
and checked against the index's SHA-256 and size before it is renamed into
place. The endpoint and credentials come from the standard AWS environment.

Which index: given the repository's key (a passphrase or recovery key, as
for a local repository), the newest index whose MAC holds under it
(docs/format.md §8); a newer one that fails is skipped with a warning, and
none authentic is an error. Without a key, the newest index, unchecked (a
warning says so when it carries a MAC). Given a key, an index without a MAC
(an unencrypted repository's, or one forged to look like it) is never
authentic: a key says the repository is encrypted, and the copy of an
encrypted repository cannot be downgraded to a forged plaintext one.

The cache is ``$VMBACKUP_CACHE_DIR/s3/<bucket>/<prefix>`` (default
``~/.cache/vmbackup``); it is a cache: deleting it costs only a download.
``VMBACKUP_COPY_INDEX`` names an older index to read (``index/...json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import copy as s3copy
from . import keys
from .errors import CopyError, InvalidInputError, RepositoryError, WrongKeyError

log = logging.getLogger(__name__)

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


def safe_name(rel: str) -> bool:
    """Whether ``rel`` (an object's path in an index) names a file inside the
    mirror: relative, no ``.`` or ``..`` part (an index is read before it is
    authenticated, and without a key never is)."""
    parts = rel.split("/")
    return bool(rel) and all(p and p not in (".", "..") and "\0" not in p for p in parts)


def _object(target: s3copy.Target, index: dict, rel: str) -> bytes:
    """One object of ``index`` in the version it names, checked against its SHA-256."""
    e = index["objects"][rel]
    try:
        body = target.s3.get_object(Bucket=target.bucket, Key=target.key(rel), VersionId=e["version"])["Body"].read()
    except Exception as ex:
        raise s3copy.s3_error(ex, f"reading version {e['version']} of {target.key(rel)}") from None
    if len(body) != e["size"] or hashlib.sha256(body).hexdigest() != e["sha256"]:
        raise CopyError(f"version {e['version']} of {target.key(rel)} is not what the index says (SHA-256)")
    return body


def _master_key(
    target: s3copy.Target, index: dict, source: keys.KeySource, tried: dict[tuple, bytes | None]
) -> bytes | None:
    """The master key ``source`` unwraps from the key slots ``index`` names;
    None when the index names no slot, ``WrongKeyError`` when none opens (the
    slots are the index's: trusted for what they open, a key that then has
    to make the index's MAC hold). ``tried`` remembers the answer for the
    same config and slots (by SHA-256): many indexes naming the same slots
    cost one unwrap (a KDF run each), not one each."""
    objects = index.get("objects", {})
    rels = [r for r in objects if r == "config.json" or r.startswith(f"{keys.KEYS_DIR}/")]
    if "config.json" not in rels or len(rels) < 2 or not all(safe_name(r) for r in rels):
        return None
    sig = tuple(sorted((r, str(objects[r].get("sha256"))) for r in rels))
    if sig in tried:
        if tried[sig] is None:
            raise WrongKeyError("the key opens none of these slots")
        return tried[sig]
    with tempfile.TemporaryDirectory(prefix="vmbackup-index-") as tmp:
        for rel in rels:
            dest = Path(tmp, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_object(target, index, rel))
        try:
            rid = json.loads(Path(tmp, "config.json").read_bytes()).get("id")
            key, _slot = keys.unwrap(tmp, source, repository_id=str(rid))
        except (ValueError, AttributeError):
            return None
        except WrongKeyError:
            tried[sig] = None
            raise
        except (RepositoryError, InvalidInputError):
            return None
    tried[sig] = key
    return key


def choose_index(target: s3copy.Target, source: keys.KeySource | None) -> tuple[dict | None, bytes | None]:
    """The index a reader uses, and the master key that authenticated it
    (None without a key); see the module's doc."""
    pick = os.environ.get("VMBACKUP_COPY_INDEX")
    names = [target.key(pick)] if pick else s3copy.index_keys(target)
    if source is None or source.empty:
        index = s3copy.read_index(target, names[-1]) if names else None
        if index is not None and (index.get("mac") or index.get("version") == s3copy.INDEX_VERSION):
            log.warning(
                "index %s of %s is not authenticated: the repository is encrypted and no key was given",
                index["key"],
                target.url,
            )
        return index, None
    found: dict[str, bytes] = {}
    tried: dict[tuple, bytes | None] = {}
    wrong = 0  # indexes whose slots the key did not open

    def authentic(index: dict) -> bool:
        nonlocal wrong
        try:
            master = _master_key(target, index, source, tried)
        except WrongKeyError:
            wrong += 1
            return False
        except CopyError:  # an object it names is missing or not as it says: not the copy's
            return False
        if master is None or not s3copy.index_authentic(target, index, s3copy.index_key(master)):
            return False
        found[index["key"]] = master
        return True

    # read_authentic_index checks with one key; here each index may name its own slots.
    skipped: list[str] = []
    for name in reversed(names):
        try:
            index = s3copy.read_index(target, name)
        except CopyError as e:
            skipped.append(f"index {name} of {target.url} skipped: {e}")
            continue
        if index is not None and authentic(index):
            for w in skipped:
                log.warning("%s", w)
            return index, found[index["key"]]
        skipped.append(
            f"index {name} of {target.url} is not authentic under the key from {source.where}: skipped (it has "
            "no MAC, or one that does not hold: something other than vmbackup's copy wrote it with the bucket's "
            "credentials)"
        )
    if not names:
        return None, None
    if wrong == len(names):  # no index's slots open: the key is wrong, one line
        raise WrongKeyError(f"the key from {source.where} opens no key slot of the copy {target.url}")
    for w in skipped:
        log.warning("%s", w)
    raise CopyError(
        f"no index of {target.url} is authentic under the key from {source.where} ({len(names)} skipped): "
        "the copy is of an unencrypted repository (read it without a key) or was written by something else"
    )


def open_copy(
    url: str, *, metadata: bool = True, key: keys.KeySource | None = None, target: s3copy.Target | None = None
) -> Copy:
    """The copy at ``url`` with its mirror holding its other files and manifests;
    with ``key``, its newest authentic index, and the mirror unlocked with it
    (``target``: the copy's S3 client, a plan's ``copy:``; default: the AWS environment's)."""
    bucket, prefix = s3copy.parse_url(url)
    target = target or s3copy.Target(s3copy.client(), bucket, prefix)
    index, master = choose_index(target, key)
    if index is None:
        raise CopyError(f"{url} holds no copy (no index: a copy that never completed, or the wrong prefix)")
    bad = next((r for r in index.get("objects", {}) if not safe_name(r)), None)
    if bad is not None:
        raise CopyError(f"index {index['key']} of {url} names an object outside a repository ({bad!r}): not a copy's")
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
        # key slots of another index, older or newer, leave the mirror: only this index's open it
        kdir = mirror / keys.KEYS_DIR
        if kdir.is_dir():
            for f in kdir.iterdir():
                if f.is_file() and f"{keys.KEYS_DIR}/{f.name}" not in c.objects:
                    f.unlink()
        if master is not None:
            keys.register(str(mirror), master)  # the command finds the mirror unlocked: no second unwrap
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


def prepare_restore(url: str, backup_id: str, key: keys.KeySource | None = None) -> str:
    """A mirror of ``url`` holding every chunk backup ``backup_id`` needs; its path."""
    c = open_copy(url, key=key)
    if f"backups/{backup_id}.tib" not in c.objects:
        raise InvalidInputError(f"no backup {backup_id} in the copy {url}")
    needed = c.chunks_needed([backup_id])
    _raise(url, c.fetch(needed))
    return str(c.mirror)


def verify_copy(
    url: str, ids: list[str] | None, read_data: bool, key: keys.KeySource | None = None
) -> tuple[Copy, list[dict[str, Any]]]:
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
    c = open_copy(url, key=key)
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
