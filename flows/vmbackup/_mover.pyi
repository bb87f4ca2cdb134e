"""Typed contract of the Rust data mover (``vmbackup._mover``).

Every long call releases the GIL, calls ``progress(done, total)`` about once a
second (bytes for backup and restore, chunks for verify, chunk directories for
gc), and stops with ``CancelledError`` soon after ``cancel.cancel()`` or a
Ctrl-C. An exception raised by ``progress`` stops the operation and is
re-raised. Errors are the classes of ``vmbackup.errors``, one per kind of
failure; ``retryable`` on the class says whether a retry may cure it (e.g.
``SourceUnavailableError``: the NBD connection was reset or timed out).
Results are the frozen classes below, never JSON text.
"""

from typing import Any, Callable, Optional, Sequence, final

__all__ = [
    "CancelToken",
    "BackupSession",
    "DiskResult",
    "RestoreResult",
    "VerifyProblem",
    "VerifyResult",
    "GcResult",
    "RepositoryConfig",
    "UntrustedManifest",
    "BackupInfo",
    "DiskReader",
    "RecordSealer",
    "init_repository",
    "init_legacy_repository",
    "open_repository",
    "unlock_repository",
    "repository_chunk_id",
    "record_sealer",
    "restore_disk",
    "list_backups",
    "verify",
    "forget",
    "gc",
    "chunk_id",
    "serve",
]

_Progress = Callable[[int, int], object]

@final
class CancelToken:
    """Cancels a running operation from any thread."""

    def __new__(cls) -> CancelToken: ...
    def cancel(self) -> None:
        """Asks the operation to stop."""
    @property
    def cancelled(self) -> bool: ...

@final
class DiskResult:
    """What one disk's backup did, or a disk of a backup (frozen)."""

    @property
    def name(self) -> str: ...
    @property
    def disk_size(self) -> int: ...
    @property
    def mode(self) -> str:
        """``full``, ``allocated`` (holes skipped) or ``changed`` (CBT)."""
    @property
    def source(self) -> str: ...
    @property
    def source_format(self) -> str:
        """``raw``, ``vmdk:<createType>``, ``vhdx:dynamic``, ``vhd:fixed``, ... (docs/formats.md)."""
    @property
    def change_id(self) -> Optional[str]:
        """The hypervisor's CBT change id recorded for the disk."""
    @property
    def blocks(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_stored(self) -> int: ...
    @property
    def bytes_skipped(self) -> int: ...
    @property
    def new_chunks(self) -> int: ...
    @property
    def reused_chunks(self) -> int: ...
    @property
    def zero_blocks(self) -> int: ...
    @property
    def parent_blocks(self) -> int: ...
    @property
    def seconds(self) -> float: ...

@final
class RepositoryConfig:
    """A repository's configuration (frozen)."""

    @property
    def format(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def id(self) -> str: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def compression(self) -> str: ...
    @property
    def created(self) -> str: ...
    @property
    def encrypted(self) -> bool:
        """Whether chunks and manifests are sealed (a master key opens them)."""
    @property
    def id_hash(self) -> str:
        """How chunks are named: ``blake3-keyed`` (repositories of format
        version 2: BLAKE3 keyed with the repository's secret id key) or
        ``xxh3-128`` (version 1, the plain XXH3-128 of the data)."""
    @property
    def encryption(self) -> str:
        """``none`` or the AEAD that seals chunks and manifests (``aes-256-gcm``)."""
    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (the shape of ``config.json``, without key material)."""

@final
class UntrustedManifest:
    """A manifest that cannot be trusted (frozen): damaged, unreadable, or not
    what its file name says. Never counted as a kept backup."""

    @property
    def file_id(self) -> str:
        """The id its file name gives (``backups/<file_id>.tib``)."""
    @property
    def problem(self) -> str: ...
    @property
    def info(self) -> Optional[BackupInfo]:
        """Its metadata, if the header and metadata could be read at all."""

@final
class BackupInfo:
    """A backup point's metadata (frozen): what ``commit`` wrote and
    ``list_backups`` reads."""

    @property
    def id(self) -> str: ...
    @property
    def vm(self) -> str: ...
    @property
    def created(self) -> str:
        """UTC, ``YYYY-MM-DDTHH:MM:SSZ``."""
    @property
    def created_unix(self) -> float: ...
    @property
    def parent(self) -> Optional[str]: ...
    @property
    def repository(self) -> str:
        """The id of the repository it was written to."""
    @property
    def chunk_size(self) -> int: ...
    @property
    def disks(self) -> list[DiskResult]: ...
    @property
    def config(self) -> Any:
        """The VM's configuration given to ``commit`` (a fresh copy each time)."""
    @property
    def attributes(self) -> Any:
        """The attributes given to ``commit`` (a fresh copy each time)."""
    @property
    def size(self) -> int:
        """The sum of the disks' sizes."""
    @property
    def bytes_stored(self) -> int:
        """The sum of the bytes the disks' backups stored."""

@final
class DiskReader:
    """A disk read at any offset: a source as a backup reads it, or a disk of a backup point.

    The CBT audit reads the same blocks through both and compares them.
    """

    @staticmethod
    def source(spec: str) -> DiskReader:
        """Opens a raw file or block device, a VMDK/VHDX/VHD image (told apart by
        content) or an NBD URI, as ``BackupSession.add_disk`` would.

        Raises:
            SourceError: missing, corrupt or unsupported.
            SourceUnavailableError: the NBD export cannot be reached (retryable).
        """
    @staticmethod
    def backup(repo: str, backup_id: str, disk: Optional[str] = None) -> DiskReader:
        """Opens disk ``disk`` (or the only disk) of a backup point; every chunk
        read is checked against its id.

        Raises:
            NotFoundError: no such backup or disk.
        """
    @property
    def size(self) -> int:
        """The disk's size in bytes."""
    @property
    def describe(self) -> str:
        """What the disk is, for messages."""
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes (at most 64 MiB) at ``offset``; the GIL is released while reading.

        Raises:
            InvalidInputError: past the end of the disk, or more than 64 MiB.
            CorruptChunkError: a backup's chunk does not match its id.
        """

@final
class RestoreResult:
    """What one disk's restore did (frozen)."""

    @property
    def backup(self) -> str: ...
    @property
    def disk(self) -> str: ...
    @property
    def disk_size(self) -> int: ...
    @property
    def bytes_written(self) -> int:
        """Bytes actually written: data, and zeros where they were written as
        zeros (a block device; a file that cannot punch holes). Holes left or
        punched are not counted. An image format: the bytes written into the
        image file (VMDK: its size)."""
    @property
    def bytes_punched(self) -> int:
        """Bytes of zero blocks deallocated in an existing file (a hole
        punched, ``existing=True``) instead of written. ``bytes_written +
        bytes_punched`` is what an in-place restore changed."""
    @property
    def zero_blocks(self) -> int:
        """Blocks of the point that are all zeros."""
    @property
    def blocks_written(self) -> int:
        """Blocks of the disk written (or punched)."""
    @property
    def blocks_compared(self) -> int:
        """Blocks of the target read and compared with the point (``compare``)."""
    @property
    def blocks_skipped(self) -> int:
        """Blocks left as the target had them: holes of a new file, zero blocks
        of a ``blank`` target, blocks outside ``extents``, blocks that compared
        equal."""
    @property
    def seconds(self) -> float: ...

@final
class VerifyProblem:
    @property
    def kind(self) -> str:
        """``bad_manifest``, ``missing_chunk`` or ``corrupt_chunk``."""
    @property
    def object(self) -> str:
        """The backup id or chunk id at fault."""
    @property
    def message(self) -> str: ...
    @property
    def affected(self) -> list[tuple[str, str, str]]:
        """(backup id, VM, disk) of every disk the problem affects."""

@final
class VerifyResult:
    @property
    def ok(self) -> bool: ...
    @property
    def backups_checked(self) -> int: ...
    @property
    def chunks_checked(self) -> int: ...
    @property
    def bytes_checked(self) -> int: ...
    @property
    def problems(self) -> list[VerifyProblem]: ...

@final
class GcResult:
    @property
    def dry_run(self) -> bool: ...
    @property
    def backups(self) -> int: ...
    @property
    def active_backups(self) -> int: ...
    @property
    def stale_leases_removed(self) -> int: ...
    @property
    def referenced_chunks(self) -> int: ...
    @property
    def chunks_scanned(self) -> int: ...
    @property
    def chunks_removed(self) -> int: ...
    @property
    def bytes_removed(self) -> int: ...
    @property
    def chunks_in_grace(self) -> int: ...
    @property
    def temp_files_removed(self) -> int: ...
    @property
    def cutoff_unix(self) -> float: ...

def init_repository(
    path: str, chunk_size: int = 1048576, compression: str = "zstd:1", key: Optional[bytes] = None
) -> RepositoryConfig:
    """Creates a repository (format version 2) in an empty or new directory.

    Chunks are named by BLAKE3 keyed with a 32-byte id key of this repository,
    never by the plain XXH3-128 of their data (docs/format.md §3).

    Args:
        path: the directory.
        chunk_size: a power of two from 256 KiB to 8 MiB.
        compression: ``none`` or ``zstd:LEVEL`` (-7..-1, 1..19).
        key: the 32-byte master key (random; the caller keeps it, wrapped in
            key slots). Given: an encrypted repository, whose id key, sealing
            key and manifest key are derived from it, and whose config holds a
            key check value; the key is registered for this process as
            ``unlock_repository`` would. Without it: unencrypted, a random id
            key stored in ``config.json``.

    Returns:
        The repository's config.

    Raises:
        InvalidInputError: a key that is not 32 bytes, a bad chunk size or
            compression, a directory that is not empty.
    """

def init_legacy_repository(path: str, chunk_size: int = 1048576, compression: str = "zstd:1") -> RepositoryConfig:
    """For tests: creates a repository of format version 1 (chunks named by the
    plain XXH3-128 of their data, unencrypted), as vmbackup wrote before
    keyed ids; this build still reads, verifies, restores and backs up into them."""

def open_repository(path: str) -> RepositoryConfig:
    """Checks a repository and returns its config (no key needed)."""

def unlock_repository(path: str, key: bytes) -> RepositoryConfig:
    """Registers the master key of an encrypted repository for this process.

    Every later call on the repository (``BackupSession``, ``restore_disk``,
    ``list_backups``, ``verify``, ``forget``, ``gc``, ``serve``,
    ``DiskReader.backup``), found by its canonical path and repository id,
    uses the key. Calling it again replaces the key.

    Raises:
        WrongKeyError: the key does not match the repository's key check value.
        InvalidInputError: the key is not 32 bytes, or the repository is not
            encrypted.
        KeyRequiredError: never; an encrypted repository used without
            unlocking raises it (except ``verify``, see there).
    """

def repository_chunk_id(path: str, data: bytes) -> str:
    """The id the repository at ``path`` gives a chunk holding ``data`` (32 hex
    digits): keyed BLAKE3 (format version 2, needs the key of an encrypted
    repository) or XXH3-128 (version 1). For tests and tools: ids of the same
    data differ between repositories of version 2."""

@final
class RecordSealer:
    """The record key of an unlocked encrypted repository (``record_sealer``):
    seals and opens its small records, the cleanup ledger's entries and the
    drills' record (docs/format.md §1.1), with AES-256-GCM under a key derived
    once from the master key. Never printed (its repr shows no key)."""

    def seal(self, name: str, data: bytes) -> bytes:
        """``data`` sealed for the record at ``name`` (its path in the
        repository, e.g. ``ledger/web01--run.json``): a random 96-bit nonce,
        the ciphertext, the 16-byte tag; ``name`` is associated data."""
    def open(self, name: str, sealed: bytes) -> Optional[bytes]:
        """What ``seal`` sealed for ``name``, or None if ``sealed`` is not
        authentic: altered, sealed for another name, or under another key."""

def record_sealer(path: str) -> Optional[RecordSealer]:
    """The record key of the repository at ``path``, or None when it is
    unencrypted (its records are plain JSON).

    Raises:
        KeyRequiredError: the repository is encrypted and this process has
            not unlocked it (``unlock_repository``).
        NotFoundError: ``path`` is not a repository (no ``config.json``).
        RepositoryError: its config is corrupt or has been altered.
    """

@final
class BackupSession:
    """One backup point of a VM: add its disks, then commit.

    Holds a lease in the repository until committed or dropped, so garbage
    collection never removes a chunk this backup may still name.

    Several threads may call ``add_disk`` on one session at once (each disk's
    data moves without the GIL and without a lock on the session); ``commit``
    refuses while one runs, ``abort`` cancels those under way.
    """

    def __new__(cls, repo: str, vm: str, parent: Optional[str] = None) -> BackupSession:
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
        progress: Optional[_Progress] = None,
        cancel: Optional[CancelToken] = None,
        nbd_timeout: Optional[float] = None,
        nbd_connections: Optional[int] = None,
        allocated_extents: Optional[Sequence[tuple[int, int]]] = None,
    ) -> DiskResult:
        """Backs up one disk; callable from several threads at once.

        Args:
            source: a raw image file or block device (holes are not read), or
                a VHD or VHDX image (told apart by content; only allocated areas
                are read; a differencing disk is read through its parents).
            name: the disk's name in the backup, e.g. ``scsi0:0``.
            changed_extents: (start, length) byte ranges changed since the
                parent (QueryChangedDiskAreas); other blocks come from the
                parent's disk of the same name without being read.
            change_id: the hypervisor's CBT change id, recorded for the next run.
            nbd_timeout: for an NBD source, the most seconds to connect,
                handshake and wait for each reply (above 0, at most 86400;
                default 60).
            nbd_connections: for an NBD source that allows several, the most
                connections to open (1 to 16; default 4).
            allocated_extents: (start, length) byte ranges that hold data
                (QueryChangedDiskAreas with change id ``*``), for a backup
                without a parent: only blocks touching them are read, every
                other block is recorded as zeros (mode ``allocated``). Sorted,
                merged like ``changed_extents``; not together with it.

        Raises:
            InvalidInputError: an option out of range (refused, not clamped);
                extents past the end of the disk; changed and allocated
                extents together; a disk of this name already added or
                being added.
            CancelledError: ``cancel`` or ``abort`` stopped it.
            SourceError: the source is missing, corrupt or unsupported.
            SourceUnavailableError: the source's connection was reset, closed
                or timed out, or it answered EIO (retryable).
        """
    def commit(self, config: Optional[str] = None, attributes: Optional[str] = None) -> BackupInfo:
        """Makes every chunk durable, writes the manifest atomically.

        The disks are recorded in the order their ``add_disk`` began.

        Args:
            config: the VM's configuration, JSON.
            attributes: anything else to record (consistency, transport...), JSON.

        Returns:
            The backup's metadata.

        Raises:
            InvalidInputError: an ``add_disk`` is still running (the session
                stays open: commit again once it has returned), or no disk.
        """
    def abort(self) -> None:
        """Abandons the backup; its chunks stay for reuse or gc.

        An ``add_disk`` still running is cancelled and raises
        ``CancelledError``; the lease is released when the last has returned.
        """

def restore_disk(
    repo: str,
    backup_id: str,
    output: str,
    disk: Optional[str] = None,
    format: str = "raw",
    overwrite: bool = False,
    progress: Optional[_Progress] = None,
    cancel: Optional[CancelToken] = None,
    existing: bool = False,
    blank: bool = False,
    extents: Optional[Sequence[tuple[int, int]]] = None,
    compare: bool = False,
) -> RestoreResult:
    """Restores a disk to a raw file (sparse) or an existing block device,
    or (``format``) to an image file of another format: ``vhdx`` (dynamic,
    32 MiB blocks, payload blocks only for blocks holding data: what Hyper-V
    takes), ``vmdk`` (streamOptimized, what vSphere imports) or
    ``vmdk-sparse`` (monolithicSparse); docs/formats.md describes them.

    A new file is written under a temporary name and renamed when complete.
    Every chunk is checked against its id before it is written. Chunks are
    read and decompressed with several in flight (16) and the GIL is
    released, so several disks restore at once from Python threads. The
    target is synced before the call returns.

    Args:
        existing: write into ``output`` in place: an existing file or block
            device at least the disk's size (a VM's new disk hot-added to the
            agent, a disk rolled back). No temporary file, no rename, no
            truncation. Without ``blank``, ``extents`` or ``compare`` every
            block is written; zero blocks are punched out of a file and
            written as zeros on a device. Raw, or an existing VHDX (below).
        blank: with ``existing``: the target reads as zeros (a new thin
            disk), so only the point's non-zero blocks are written and thin
            stays thin.
        extents: with ``existing``: ``(offset, length)`` areas (the areas CBT
            says changed since the point); only the blocks touching them are
            written, zero blocks included.
        compare: with ``existing`` (and ``extents``, if given): each target
            block is read and named with the repository's chunk id function;
            only blocks that differ from the point's are written.

    With ``existing`` and ``format="vhdx"``, ``output`` is an existing
    dynamic or fixed VHDX (a Hyper-V VM's disk rolled back in place) and the
    disk inside it is written as above: present payload blocks in place, new
    ones appended (1 MiB aligned) with their BAT entries updated through the
    VHDX log, zeros written into present blocks (punched in a dynamic disk's
    file where it can), the headers updated (new FileWriteGuid and
    DataWriteGuid) before the first write; ``bytes_written`` counts data
    only, not these structures. A restore that finds nothing different
    leaves the file untouched.

    Raises:
        InvalidInputError: ``output`` exists and is not empty (without
            ``overwrite`` or ``existing``); with ``existing``: it does not
            exist, is not a file or block device, or is smaller than the
            disk; ``blank``, ``extents`` or ``compare`` without ``existing``;
            ``blank`` with ``extents`` or ``compare``; ``existing`` with a
            format other than raw or vhdx; extents past the disk's end. With
            ``existing`` and ``vhdx``, before anything is written: the file
            is not a valid VHDX, is a differencing disk, its log is not empty
            (LogGuid set), or its virtual size is not the disk's (the caller
            can fall back to writing the disk whole into a new file).
    """

def list_backups(repo: str) -> tuple[list[BackupInfo], list[UntrustedManifest]]:
    """Every trusted backup (oldest by ``created_unix`` first), and every untrusted manifest.

    A manifest is trusted if it loads whole (checksum, block maps), its id is its file name, its
    repository id is this repository's and its chunk size the repository's.
    """

def verify(
    repo: str,
    ids: Optional[Sequence[str]] = None,
    read_data: bool = False,
    progress: Optional[_Progress] = None,
    cancel: Optional[CancelToken] = None,
) -> VerifyResult:
    """Checks manifests and chunk presence; with ``read_data`` re-reads and re-hashes every chunk.

    Corrupt chunks are quarantined (renamed ``*.bad``) so no later backup reuses them.

    An encrypted repository needs no key here. Without its key (no
    ``unlock_repository``), verify checks what it can without decrypting:
    each manifest's checksum and block maps (not its sealed metadata, so
    problems name no VM), that every chunk they name is present, and with
    ``read_data`` each chunk file's header and XXH3 checksum over its
    ciphertext. With the key it checks everything: manifests authenticated,
    chunks decrypted, decompressed and re-hashed.
    """

def forget(repo: str, backup_id: str) -> None:
    """Removes one backup's manifest; its chunks go at the next gc."""

def gc(
    repo: str,
    grace_seconds: float = 900.0,
    dry_run: bool = False,
    progress: Optional[_Progress] = None,
    cancel: Optional[CancelToken] = None,
) -> GcResult:
    """Removes chunks no backup names and no running backup may still name."""

def chunk_id(data: bytes) -> str:
    """The XXH3-128 of ``data`` as 32 hex digits: a chunk's id in a repository
    of format version 1 (which anyone can compute from the data alone), and
    the checksum ``xxh128sum`` prints."""

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
    handshake_timeout: Optional[float] = None,
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
        handshake_timeout: seconds a client has for its whole handshake
            before it is disconnected (default 10; above 0, at most 3600).
            When all 64 client slots are taken, a new client takes the slot
            of the oldest one still in its handshake, so idle connections
            never lock clients out.

    Raises:
        NotFoundError: no such backup or disk.
        InvalidInputError: neither or both of ``socket`` and ``listen``, the
            socket exists, or the address cannot be listened on.
        AddressInUseError: the address is in use (retryable).
    """
