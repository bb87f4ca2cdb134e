"""The offsite copy: a repository copied to S3 object storage under Object Lock.

No Prefect here (the flow ``copy_repository`` in ``orchestration/copy.py``
runs this). S3 goes through boto3; nothing signs a request by hand.

What a copy is (docs/format.md §8): every file of the repository as an
object ``PREFIX/<path in the repository>`` (``config.json``, ``keys/...``,
``chunks/xx/<id>``, ``backups/<id>.tib``; never ``locks/`` or temporaries),
each a version locked in COMPLIANCE mode, and one index object
``PREFIX/index/<time>-<random>.json`` per completed copy, written last, that
names the version, size, SHA-256 and lock of every object the copy holds.
Readers use the newest index (for an encrypted repository: the newest
authentic one, below) and read exactly the versions it names, so an object
written over later (an attacker with the copy's credentials can add a
version, never remove a locked one) changes nothing a restore reads.

The copy does not read what the files hold (an encrypted repository is
copied as its ciphertext; its key only authenticates the index): every
chunk the repository holds is in the copy, and every object of the newest
index stays locked at least ``days`` after that copy (a chunk that a newer
backup reuses is still in the repository, so its lock is extended:
PutObjectRetention), so no backup of the newest index depends on an object
that can be deleted within ``days``.

Order: the repository's other files (config, keys), then the chunks, then
the manifests, then the index, uploads in parallel. Resumable: objects the
newest index holds are not sent again (chunks by name, since a chunk's name
is its content; other files by their SHA-256), and an object a killed copy
sent is found by listing the versions (same size, ETag = MD5 of the file)
and adopted, not sent twice. Each PUT carries Content-MD5 and
x-amz-checksum-sha256, so the server refuses an object that does not arrive
as sent.

Authenticated index (docs/format.md §8): for an encrypted repository the
index (version 2; an unencrypted repository's is version 1) carries ``mac``, HMAC-SHA256 under a key derived from the master key
(HKDF-SHA256, its own context), so the copy needs the repository's key;
readers given the key skip an index whose MAC fails (whoever holds the
bucket's credentials can write a newer index, never a valid MAC) and use the
newest authentic one. So does the next copy, before it reuses anything the
previous index names. An unencrypted repository's index has no MAC: anyone
with the bucket's credentials can read its id key and forge an index.

Clean-up (the copy's retention and gc, after the index): a version that the
new index does not name (a backup forgotten by the repository's retention
and its chunks, an older index, a version someone wrote over ours, a delete
marker) is deleted once its lock has expired; until then it is reported as
waiting, with the date. A locked version is never a failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CopyError, CopyUnavailableError, InvalidInputError, KeyRequiredError

log = logging.getLogger(__name__)

INDEX_FORMAT = "vmbackup-copy-index"
# Index versions (docs/format.md §8, §10): 1 without ``mac`` (an unencrypted
# repository's copy; copies written before version 2 may carry ``mac`` in a
# version 1), 2 with it. A reader of version 1 only refuses a version 2, rather
# than reading it without its authentication.
INDEX_VERSION_PLAIN = 1
INDEX_VERSION = 2
INDEX_VERSIONS = (INDEX_VERSION_PLAIN, INDEX_VERSION)
INDEX_DIR = "index"
# HKDF-SHA256's info for the index MAC key (docs/format.md §8, §9): a key of
# its own, so a MAC of the copy says nothing about the mover's keys.
INDEX_KEY_CONTEXT = b"vmbackup 2026-12 copy index key"
# Fields read_index adds to an index it returns: not in the object, not in its MAC.
READER_FIELDS = ("key", "index_version", "index_versions")
DAY = 86400
# Names under chunks/xx/ that are chunks: hex ids (XXH3-128 today, keyed ids of
# other lengths tomorrow); *.bad, .tmp-*, .gc-* are not.
CHUNK_NAME = re.compile(r"[0-9a-f]{32,128}")
BACKUP_NAME = re.compile(r"[^.].*\.tib")


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at its ends)."""
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", url.strip())
    if not m or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", m.group(1)):
        raise InvalidInputError(f"{url!r} is not s3://BUCKET/PREFIX (a bucket name of 3-63 lower-case letters)")
    return m.group(1), m.group(2).strip("/")


def is_url(repo: str | None) -> bool:
    return bool(repo) and str(repo).startswith("s3://")


def client(
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    workers: int = 8,
) -> Any:
    """A boto3 S3 client; what is None comes from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION;
    AWS_MAX_ATTEMPTS, default 5, bounds the tries of each request)."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        max_pool_connections=max(10, workers * 2),
        retries={"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 5), "mode": "standard"},
        # We send Content-MD5 and SHA-256 ourselves; boto3's default CRC trailer
        # (aws-chunked encoding) is not understood by every S3 server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=cfg,
    )


def s3_error(e: BaseException, what: str) -> CopyError:
    """One line naming the object, then the cause; never a credential."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code, status = err.get("Code", "?"), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = f"{what}: {code} ({err.get('Message') or status})"
        if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout") or (status or 0) >= 500:
            return CopyUnavailableError(msg)
        return CopyError(msg)
    if isinstance(e, NoCredentialsError):
        return CopyError(f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(e, EndpointConnectionError):
        return CopyUnavailableError(f"{what}: the S3 endpoint does not answer")
    return CopyUnavailableError(f"{what}: {type(e).__name__}: {e}")


def error_code(e: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    return e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None


@dataclass(frozen=True)
class Target:
    """Where a copy lives: a bucket and a prefix through one client."""

    s3: Any
    bucket: str
    prefix: str

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# --- the repository's files --------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    rel: str  # path in the repository, '/'-separated
    kind: str  # "meta" (config, keys, ...), "chunk", "backup"
    size: int


def repository_files(repo: Path) -> list[LocalFile]:
    """Every file of the repository's layout a copy holds, in upload order:
    the other files (config.json, keys/...), the chunks, then the manifests.

    Manifests are listed before the chunks: a backup committed meanwhile has
    its chunks on disk before its manifest appears, so every listed manifest's
    chunks are in the chunk listing (docs/format.md §7 rule 3)."""
    if not (repo / "config.json").is_file():
        raise InvalidInputError(f"{repo} is not a repository (no config.json)")
    backups = []
    bdir = repo / "backups"
    if bdir.is_dir():
        for e in sorted(os.scandir(bdir), key=lambda e: e.name):
            if BACKUP_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                backups.append(LocalFile(f"backups/{e.name}", "backup", e.stat().st_size))
    chunks = []
    cdir = repo / "chunks"
    if cdir.is_dir():
        for sub in sorted(os.scandir(cdir), key=lambda e: e.name):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                if CHUNK_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                    chunks.append(LocalFile(f"chunks/{sub.name}/{e.name}", "chunk", e.stat().st_size))
    meta = []
    for root, dirs, files in os.walk(repo):
        rel_root = os.path.relpath(root, repo)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in ("chunks", "backups", "locks") and not d.startswith(".")]
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name.endswith((".tmp", ".bad")):
                continue
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                continue
            rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
            meta.append(LocalFile(rel, "meta", path.stat().st_size))
    meta.sort(key=lambda f: (f.rel != "config.json", f.rel))
    return meta + sorted(chunks, key=lambda f: f.rel) + backups


def digests(path: Path) -> tuple[bytes, str, str]:
    """The file's bytes, MD5 and SHA-256 (hex)."""
    data = path.read_bytes()
    return data, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


# --- the index ----------------------------------------------------------------------


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dt(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def index_keys(t: Target) -> list[str]:
    """The index objects' keys, oldest first (their names sort by time). Listed by
    version, so that a delete marker put over the newest cannot hide it."""
    out = set()
    try:
        pages = t.s3.get_paginator("list_object_versions").paginate(Bucket=t.bucket, Prefix=t.key(INDEX_DIR + "/"))
        for page in pages:
            out |= {v["Key"] for v in page.get("Versions", []) if v["Key"].endswith(".json")}
    except Exception as e:
        raise s3_error(e, f"reading the index of {t.url}") from None
    return sorted(out)


def read_index(t: Target, key: str | None = None) -> dict | None:
    """The newest index (or the one at ``key``), checked; None if the copy has none."""
    try:
        if key is None:
            keys = index_keys(t)
            if not keys:
                return None
            key = keys[-1]
        # the first version written under the key: an overwrite only adds a version
        vs = [
            v
            for page in t.s3.get_paginator("list_object_versions").paginate(Bucket=t.bucket, Prefix=key)
            for v in page.get("Versions", [])
            if v["Key"] == key
        ]
        if not vs:
            raise CopyError(f"index {key} of {t.url} has no version")
        first = min(vs, key=lambda v: (v["LastModified"], v["VersionId"]))
        body = t.s3.get_object(Bucket=t.bucket, Key=key, VersionId=first["VersionId"])["Body"].read()
    except CopyError:
        raise
    except Exception as e:
        raise s3_error(e, f"reading the index of {t.url}") from None
    try:
        idx = json.loads(body)
    except ValueError as e:
        raise CopyError(f"index {key} of {t.url} is not JSON: {e}") from None
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT:
        raise CopyError(f"index {key} of {t.url} is not a vmbackup copy index")
    if idx.get("version") not in INDEX_VERSIONS:
        raise CopyError(
            f"index {key} of {t.url} is version {idx.get('version')}; this vmbackup reads "
            + " and ".join(map(str, INDEX_VERSIONS))
        )
    idx["key"] = key
    idx["index_version"] = first["VersionId"]
    idx["index_versions"] = len(vs)
    return idx


def index_key(master_key: bytes) -> bytes:
    """The key of the index's MAC: HKDF-SHA256 (RFC 5869) of the repository's
    master key, no salt, info ``INDEX_KEY_CONTEXT``, 32 bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INDEX_KEY_CONTEXT).derive(master_key)


def index_mac(key: bytes, rel: str, index: dict) -> str:
    """HMAC-SHA256 (hex) of the index object's path in the copy (``index/...json``),
    a line feed, and the index without ``mac`` as canonical JSON (sorted keys,
    no spaces, ASCII): the name is in it so an old index cannot be replayed as
    a newer one."""
    doc = {k: v for k, v in index.items() if k != "mac" and k not in READER_FIELDS}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, rel.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def index_authentic(t: Target, index: dict, key: bytes) -> bool:
    """Whether ``index`` (as read_index returns it) carries a valid MAC under ``key``."""
    mac = index.get("mac")
    if not isinstance(mac, str):
        return False
    return hmac.compare_digest(mac, index_mac(key, t.rel(index["key"]), index))


def read_authentic_index(
    t: Target, key: bytes, warn: Callable[[str], None] | None = None, names: list[str] | None = None
) -> dict | None:
    """The newest index of ``t`` whose MAC holds under ``key`` (among ``names``,
    default: every index key); ``warn`` is told of each newer one skipped. None
    when the copy has no index at all; CopyError when it has some but none authentic."""
    keys = list(reversed(names if names is not None else index_keys(t)))
    if not keys:
        return None
    for k in keys:
        try:
            idx = read_index(t, k)
        except CopyError as e:
            if warn is not None:
                warn(f"index {k} of {t.url} skipped: {e}")
            continue
        if idx is not None and index_authentic(t, idx, key):
            return idx
        if warn is not None:
            warn(
                f"index {k} of {t.url} is not authentic (its MAC does not hold under the repository's key): "
                "skipped; something other than vmbackup's copy wrote it with the bucket's credentials"
            )
    raise CopyError(
        f"no index of {t.url} is authentic under the repository's key ({len(keys)} skipped): "
        "every index was written by something else, or the copy is of another repository"
    )


def list_versions(t: Target) -> tuple[dict[str, list[dict]], list[dict]]:
    """Every version under the prefix, by path (index objects included), and the delete markers."""
    versions: dict[str, list[dict]] = {}
    markers: list[dict] = []
    prefix = t.key("")
    try:
        for page in t.s3.get_paginator("list_object_versions").paginate(Bucket=t.bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                versions.setdefault(t.rel(v["Key"]), []).append(
                    {
                        "version": v["VersionId"],
                        "size": v["Size"],
                        "etag": v["ETag"].strip('"'),
                        "latest": v.get("IsLatest", False),
                    }
                )
            for m in page.get("DeleteMarkers", []):
                markers.append({"rel": t.rel(m["Key"]), "version": m["VersionId"], "latest": m.get("IsLatest", False)})
    except Exception as e:
        raise s3_error(e, f"listing {t.url}") from None
    return versions, markers


# --- the copy ----------------------------------------------------------------------


@dataclass
class CopyResult:
    """What one copy did (the JSON of ``vmbackup copy --json`` and the flow's artifact)."""

    url: str
    index: str = ""
    backups: int = 0
    objects: int = 0
    bytes: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0
    adopted: int = 0
    extended: int = 0
    lock_mode: str = "COMPLIANCE"
    lock_days: int = 0
    locked_until: str = ""
    deleted: int = 0
    waiting: int = 0
    waiting_until: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 3)
        d["mib_per_second"] = round(self.bytes_uploaded / (1 << 20) / self.seconds, 1) if self.seconds else None
        return d


class _Counter:
    def __init__(self, total: int, progress: Callable[[int, int], None] | None):
        self.done, self.total, self.progress = 0, total, progress
        self.lock = threading.Lock()
        self.last = 0.0

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if self.progress is not None and (now - self.last > 1 or self.done >= self.total):
                self.last = now
                self.progress(self.done, self.total)


def check_bucket(t: Target) -> None:
    """The bucket exists, is reachable with these credentials and has Object Lock on."""
    try:
        cfg = t.s3.get_object_lock_configuration(Bucket=t.bucket)
    except Exception as e:
        code = error_code(e)
        if code == "ObjectLockConfigurationNotFoundError":
            raise CopyError(f"bucket {t.bucket} has no Object Lock: create it with Object Lock enabled") from None
        raise s3_error(e, f"bucket {t.bucket}") from None
    if cfg.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
        raise CopyError(f"bucket {t.bucket} has no Object Lock: create it with Object Lock enabled")


def copy_repository(
    repo: str | os.PathLike,
    t: Target,
    *,
    days: int,
    generation_days: int = 10,
    mode: str = "COMPLIANCE",
    workers: int = 8,
    progress: Callable[[int, int], None] | None = None,
    on_put: Callable[[str], None] | None = None,
    master_key: bytes | None = None,
) -> CopyResult:
    """Copy the repository at ``repo`` to ``t`` (see the module's doc); returns what it did.

    Every object the new index names is locked until at least now + ``days``;
    a new lock, or one extended, runs ``generation_days`` longer, so that a
    chunk many backups reuse has its lock extended once every
    ``generation_days``, not at every copy (Veeam's "block generation").

    An encrypted repository needs its ``master_key`` (KeyRequiredError
    without): the index is authenticated with a key derived from it, and the
    previous index is trusted only if its MAC holds.
    """
    start = time.monotonic()
    repo = Path(repo)
    mode = mode.upper()
    if days < 1:
        raise InvalidInputError("object_lock.days must be at least 1")
    files = repository_files(repo)
    try:
        config = json.loads((repo / "config.json").read_text())
        repository_id = config.get("id")
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidInputError(f"{repo}/config.json cannot be read: {e}") from None
    mac_key = None
    if config.get("encryption", "none") != "none":
        if master_key is None:
            raise KeyRequiredError(
                f"repository {repo} is encrypted: its copy's index is authenticated with the repository's key; "
                "give its passphrase (the plan's passphrase_env or passphrase_secret, or VMBACKUP_PASSPHRASE)"
            )
        mac_key = index_key(master_key)
    check_bucket(t)
    skipped: list[str] = []
    if mac_key is None:
        prev = read_index(t)
    else:
        try:
            prev = read_authentic_index(t, mac_key, skipped.append)
        except CopyError as e:  # none authentic: nothing the copy holds is reused unchecked
            skipped.append(f"{e}; copying as if the copy were empty")
            prev = None
        for w in skipped:
            log.warning("%s", w)
    if prev is not None and prev.get("repository") not in (None, repository_id):
        raise CopyError(
            f"{t.url} holds a copy of repository {prev.get('repository')}, not of {repository_id}: use another prefix"
        )
    versions, markers = list_versions(t)
    prev_objects: dict[str, dict] = (prev or {}).get("objects", {})
    now = time.time()
    need_until = int(now) + days * DAY
    lock_until = need_until + generation_days * DAY
    res = CopyResult(url=t.url, lock_mode=mode, lock_days=days, locked_until=_iso(lock_until), warnings=skipped)
    new_objects: dict[str, dict] = {}
    meta_lock = threading.Lock()
    counter = _Counter(sum(f.size for f in files), progress)

    def listed(rel: str, version: str) -> dict | None:
        return next((v for v in versions.get(rel, []) if v["version"] == version), None)

    def head_until(rel: str, version: str) -> int:
        try:
            h = t.s3.head_object(Bucket=t.bucket, Key=t.key(rel), VersionId=version)
        except Exception as e:
            raise s3_error(e, f"reading the lock of {t.key(rel)}") from None
        d = h.get("ObjectLockRetainUntilDate")
        return int(d.timestamp()) if d is not None and h.get("ObjectLockMode") == mode else 0

    def put(rel: str, data: bytes, md5: str, sha: str) -> dict:
        key = t.key(rel)
        if on_put is not None:
            on_put(key)
        try:
            r = t.s3.put_object(
                Bucket=t.bucket,
                Key=key,
                Body=data,
                ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha)).decode(),
                ObjectLockMode=mode,
                ObjectLockRetainUntilDate=_dt(lock_until),
            )
        except Exception as e:
            raise s3_error(e, f"uploading {key}") from None
        if r.get("ETag", "").strip('"') != md5 or not r.get("VersionId"):
            raise CopyError(f"uploading {key}: the server's ETag or version does not match what was sent")
        return {"version": r["VersionId"], "retain_until": lock_until}

    def one(f: LocalFile) -> None:
        old = prev_objects.get(f.rel)
        if f.kind == "chunk" and old and old.get("size") == f.size and listed(f.rel, old["version"]):
            with meta_lock:
                new_objects[f.rel] = dict(old)
            counter.add(f.size)
            return
        try:
            data, md5, sha = digests(repo / f.rel)
        except FileNotFoundError:
            if f.kind == "meta":
                raise CopyError(f"{repo / f.rel} vanished while it was being copied") from None
            return  # forgotten (manifest) or collected (an unreferenced chunk) meanwhile
        entry = {"size": len(data), "sha256": sha, "md5": md5}
        if old and old.get("sha256") == sha and listed(f.rel, old["version"]):
            entry |= {"version": old["version"], "retain_until": old.get("retain_until", 0)}
        else:
            found = next(
                (v for v in versions.get(f.rel, []) if v["size"] == len(data) and v["etag"] == md5),
                None,
            )
            if found is not None:  # sent by a copy that did not finish
                entry |= {"version": found["version"], "retain_until": head_until(f.rel, found["version"])}
                with meta_lock:
                    res.adopted += 1
            else:
                entry |= put(f.rel, data, md5, sha)
                with meta_lock:
                    res.uploaded += 1
                    res.bytes_uploaded += len(data)
        with meta_lock:
            new_objects[f.rel] = entry
        counter.add(f.size)

    def extend(rel: str) -> None:
        e = new_objects[rel]
        if e.get("retain_until", 0) >= need_until:
            return
        try:
            t.s3.put_object_retention(
                Bucket=t.bucket,
                Key=t.key(rel),
                VersionId=e["version"],
                Retention={"Mode": mode, "RetainUntilDate": _dt(lock_until)},
            )
        except Exception as ex:
            raise s3_error(ex, f"extending the lock of {t.key(rel)}") from None
        e["retain_until"] = lock_until
        with meta_lock:
            res.extended += 1

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for kind in ("meta", "chunk", "backup"):
            group = [f for f in files if f.kind == kind]
            list(pool.map(one, group))
            # locks of this group extended before the next group goes up:
            # a manifest is in the copy only once its chunks are locked
            list(pool.map(extend, [f.rel for f in group if f.rel in new_objects]))

    res.objects = len(new_objects)
    res.bytes = sum(e["size"] for e in new_objects.values())
    backups = sorted(rel[len("backups/") : -len(".tib")] for rel in new_objects if rel.startswith("backups/"))
    res.backups = len(backups)

    # The copy's retention and gc: what the new index does not name goes once unlocked.
    keep = {(rel, e["version"]) for rel, e in new_objects.items()}
    known_until = {(rel, e["version"]): e.get("retain_until", 0) for rel, e in prev_objects.items()}
    known_until |= {(w["rel"], w["version"]): w["retain_until"] for w in (prev or {}).get("waiting", [])}
    if prev is not None and prev.get("index_version"):
        known_until[(t.rel(prev["key"]), prev["index_version"])] = prev.get("index_retain_until", 0)
    garbage = [(rel, v["version"]) for rel, vs in versions.items() for v in vs if (rel, v["version"]) not in keep]

    def until_of(item: tuple[str, str]) -> tuple[tuple[str, str], int]:
        if item in known_until:
            return item, known_until[item]
        return item, head_until(*item)  # a version no index named: sent by a killed copy, or by someone else

    with ThreadPoolExecutor(max_workers=workers) as pool:
        dated = dict(pool.map(until_of, garbage))
    created = time.time()
    waiting = [{"rel": r, "version": v, "retain_until": u} for (r, v), u in dated.items() if u > created]
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y%m%dT%H%M%S.%fZ")  # names sort by time
    index_rel = f"{INDEX_DIR}/{stamp}-{secrets.token_hex(4)}.json"
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION if mac_key is not None else INDEX_VERSION_PLAIN,
        "created": _iso(created),
        "created_unix": round(created, 3),
        "repository": repository_id,
        "lock": {"mode": mode, "days": days, "generation_days": generation_days, "until_unix": need_until},
        "index_retain_until": lock_until,
        "backups": backups,
        "objects": dict(sorted(new_objects.items())),
        "waiting": sorted(waiting, key=lambda w: (w["rel"], w["version"])),
    }
    if mac_key is not None:
        index["mac"] = index_mac(mac_key, index_rel, index)
    body = json.dumps(index, separators=(",", ":")).encode()
    put(index_rel, body, hashlib.md5(body).hexdigest(), hashlib.sha256(body).hexdigest())
    res.index = t.key(index_rel)

    def collect(item: tuple[str, str]) -> int:
        rel, version = item
        try:
            t.s3.delete_object(Bucket=t.bucket, Key=t.key(rel), VersionId=version)
            return 1
        except Exception as e:
            if error_code(e) in ("AccessDenied", "InvalidRequest", "ObjectLocked"):
                return 0  # still locked after all: the next copy tries again
            raise s3_error(e, f"deleting {t.key(rel)} version {version}") from None

    expired = [item for item, u in dated.items() if u <= created]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        res.deleted = sum(pool.map(collect, expired + [(m["rel"], m["version"]) for m in markers]))
    res.waiting = len(waiting)
    if waiting:
        res.waiting_until = _iso(max(w["retain_until"] for w in waiting))
        log.info(
            "%d object version(s) of %s that no backup needs wait for their lock to expire (the last on %s)",
            len(waiting),
            t.url,
            res.waiting_until,
        )
    res.seconds = time.monotonic() - start
    return res


def plan_target(plan: Any) -> Target:
    """The copy target of a plan's ``copy:`` (credentials resolved now, never logged)."""
    from .plan import resolve_copy_credentials

    c = plan.copy_
    if c is None:
        raise InvalidInputError("the plan has no copy: section (endpoint, bucket, prefix, object_lock)")
    creds = resolve_copy_credentials(c)
    s3 = client(
        c.endpoint,
        creds[0].get_secret_value() if creds else None,
        creds[1].get_secret_value() if creds else None,
        c.region,
        workers=c.workers,
    )
    return Target(s3, c.bucket, c.prefix)


def copy_plan(plan: Any, progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy a plan's repository to its ``copy:`` target. An encrypted
    repository is unlocked first (once per process, as the backup flows do):
    its key authenticates the copy's index."""
    from . import keys

    c = plan.copy_
    keys.unlock_plan_repository(plan)
    t = plan_target(plan)
    res = copy_repository(
        plan.repository,
        t,
        days=c.object_lock.days,
        generation_days=c.object_lock.generation_days,
        mode=c.object_lock.mode,
        workers=c.workers,
        progress=progress,
        master_key=keys.unlocked_key(plan.repository),
    )
    res.warnings = plan.copy_warnings() + res.warnings
    return res
