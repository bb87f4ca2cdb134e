"""Typed contract of the Rust data mover (``vmbackup._mover``).

Every long call releases the GIL, calls ``progress(done, total)`` about once a
second (bytes for backup and restore, chunks for verify, chunk directories for
gc), and stops with ``CancelledError`` soon after ``cancel.cancel()`` or a
Ctrl-C. An exception raised by ``progress`` stops the operation and is
re-raised. Errors are the classes of ``vmbackup.errors``.
"""

from typing import Callable, Optional, Sequence

Progress = Callable[[int, int], object]

class CancelToken:
    """Cancels a running operation from any thread."""

    def __init__(self) -> None: ...
    def cancel(self) -> None:
        """Asks the operation to stop."""
    @property
    def cancelled(self) -> bool: ...

class DiskResult:
    """What one disk's backup did (frozen)."""

    name: str
    disk_size: int
    mode: str  # "full", "allocated" (holes skipped) or "changed" (CBT)
    source: str
    source_format: str  # "raw", "vmdk:<createType>", "vhdx:dynamic", "vhd:fixed", ... (docs/formats.md)
    bytes_read: int
    bytes_stored: int
    bytes_skipped: int
    new_chunks: int
    reused_chunks: int
    zero_blocks: int
    parent_blocks: int
    seconds: float

class RestoreResult:
    backup: str
    disk: str
    disk_size: int
    bytes_written: int
    zero_blocks: int
    seconds: float

class VerifyProblem:
    kind: str  # "bad_manifest", "missing_chunk" or "corrupt_chunk"
    object: str  # the backup id or chunk id at fault
    message: str
    affected: list[tuple[str, str, str]]  # (backup id, VM, disk)

class VerifyResult:
    ok: bool
    backups_checked: int
    chunks_checked: int
    bytes_checked: int
    problems: list[VerifyProblem]

class GcResult:
    dry_run: bool
    backups: int
    active_backups: int
    stale_leases_removed: int
    referenced_chunks: int
    chunks_scanned: int
    chunks_removed: int
    bytes_removed: int
    chunks_in_grace: int
    temp_files_removed: int
    cutoff_unix: float

def init_repository(path: str, chunk_size: int = 1048576, compression: str = "zstd:1") -> str:
    """Creates a repository in an empty or new directory.

    Args:
        path: the directory.
        chunk_size: a power of two from 256 KiB to 8 MiB.
        compression: ``none`` or ``zstd:LEVEL`` (-7..-1, 1..19).

    Returns:
        The repository's config as JSON.
    """

def open_repository(path: str) -> str:
    """Checks a repository and returns its config as JSON."""

class BackupSession:
    """One backup point of a VM: add its disks, then commit.

    Holds a lease in the repository until committed or dropped, so garbage
    collection never removes a chunk this backup may still name.
    """

    def __init__(self, repo: str, vm: str, parent: Optional[str] = None) -> None:
        """Starts a backup of ``vm``, incremental to backup ``parent`` if given."""
    @property
    def id(self) -> str:
        """The id the backup will have."""
    def add_disk(
        self,
        source: str,
        name: str,
        changed_extents: Optional[Sequence[tuple[int, int]]] = None,
        change_id: Optional[str] = None,
        progress: Optional[Progress] = None,
        cancel: Optional[CancelToken] = None,
    ) -> DiskResult:
        """Backs up one disk.

        Args:
            source: a raw image file or block device (holes are not read), or
                a VHD or VHDX image (told apart by content; only allocated areas
                are read; a differencing disk is read through its parents).
            name: the disk's name in the backup, e.g. ``scsi0:0``.
            changed_extents: (start, length) byte ranges changed since the
                parent (QueryChangedDiskAreas); other blocks come from the
                parent's disk of the same name without being read.
            change_id: the hypervisor's CBT change id, recorded for the next run.
        """
    def commit(self, config: Optional[str] = None, attributes: Optional[str] = None) -> str:
        """Makes every chunk durable, writes the manifest atomically.

        Args:
            config: the VM's configuration, JSON.
            attributes: anything else to record (consistency, transport...), JSON.

        Returns:
            The backup's metadata as JSON.
        """
    def abort(self) -> None:
        """Abandons the backup; its chunks stay for reuse or gc."""

def restore_disk(
    repo: str,
    backup_id: str,
    output: str,
    disk: Optional[str] = None,
    format: str = "raw",
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelToken] = None,
) -> RestoreResult:
    """Restores a disk to a raw file (sparse) or an existing block device,
    or (``format``) to an image file of another format: ``vmdk``
    (streamOptimized, what vSphere imports) or ``vmdk-sparse``
    (monolithicSparse); docs/formats.md describes them.

    A file is written under a temporary name and renamed when complete.
    Every chunk is checked against its id before it is written.
    """

def list_backups(repo: str) -> tuple[list[str], list[str]]:
    """Every trusted backup's metadata as JSON (oldest by ``created_unix`` first), and every untrusted manifest.

    A manifest is trusted if it loads whole (checksum, block maps), its id is its file name, its
    repository id is this repository's and its chunk size the repository's. Each untrusted one is a
    JSON object ``{"file_id": str, "problem": str, "metadata": dict | None}``.
    """

def verify(
    repo: str,
    ids: Optional[Sequence[str]] = None,
    read_data: bool = False,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelToken] = None,
) -> VerifyResult:
    """Checks manifests and chunk presence; with ``read_data`` re-reads and re-hashes every chunk.

    Corrupt chunks are quarantined (renamed ``*.bad``) so no later backup reuses them.
    """

def forget(repo: str, backup_id: str) -> None:
    """Removes one backup's manifest; its chunks go at the next gc."""

def gc(
    repo: str,
    grace_seconds: float = 900.0,
    dry_run: bool = False,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelToken] = None,
) -> GcResult:
    """Removes chunks no backup names and no running backup may still name."""

def chunk_id(data: bytes) -> str:
    """The XXH3-128 id of ``data`` as 32 hex digits."""

def serve(
    repo: str,
    backup_id: str,
    disk: Optional[str] = None,
    socket: Optional[str] = None,
    listen: Optional[str] = None,
    writable: bool = False,
    ready: Optional[Callable[[str], object]] = None,
    cancel: Optional[CancelToken] = None,
    overlay_dir: Optional[str] = None,
) -> None:
    """Serves a backup's disk as an NBD export until cancelled or interrupted.

    Fixed newstyle NBD with ``NBD_OPT_GO``, structured replies and
    ``base:allocation`` block status (the backup's zero blocks are holes);
    any number of clients at once (``NBD_FLAG_CAN_MULTI_CONN``).

    Args:
        repo: the repository.
        backup_id: the backup to serve.
        disk: its disk name (needed when the backup has several).
        socket: a unix socket path to create (must not exist); removed on return.
        listen: ``HOST:PORT`` to listen on instead (port 0 picks a free one).
        writable: accept writes into a copy-on-write overlay, a temporary
            file unlinked at once, so the backup itself never changes and
            the writes vanish when serving stops.
        ready: called with the export's URI (``nbd+unix:///?socket=...`` or
            ``nbd://HOST:PORT/``) once clients can connect.
        cancel: stops serving; so does a signal whose handler raises
            (Ctrl-C), whose exception is then re-raised.
        overlay_dir: where the overlay goes (default: the temporary directory).

    Raises:
        NotFoundError: no such backup or disk.
        InvalidInputError: neither or both of ``socket`` and ``listen``, or the socket exists.
    """
