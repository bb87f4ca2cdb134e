"""One exception hierarchy for the whole project.

The Rust extension raises these classes too (it imports them from here), so
callers catch the same types whichever side failed. ``exit_code`` is what the
command line exits with: 2 for bad usage or bad input, 1 for a failed
operation.
"""


class BackupError(Exception):
    """Base of every vmbackup error."""

    exit_code = 1


class InvalidInputError(BackupError):
    """An argument is malformed or out of range."""

    exit_code = 2


class HypervisorError(BackupError):
    """The hypervisor refused or failed an operation."""


class MoverError(BackupError):
    """The data mover failed."""


class SourceError(MoverError):
    """The disk source is missing, unreadable or of an unsupported kind."""

    exit_code = 2


class RepositoryError(MoverError):
    """The repository is missing, malformed, full or unwritable."""


class NotFoundError(RepositoryError):
    """A repository, backup or disk does not exist."""

    exit_code = 2


class CorruptChunkError(RepositoryError):
    """A chunk's bytes do not match its id."""


class TargetError(MoverError):
    """Writing the restore target failed."""


class CancelledError(MoverError):
    """The operation was cancelled."""


# vSphere adapter errors (flows/vmbackup/vsphere). ``retryable`` tells the flow
# whether trying the same VM again later can succeed.


class VmNotFoundError(HypervisorError):
    """A VM named in the plan does not exist (or is not visible to the user)."""

    exit_code = 2
    retryable = False


class AuthenticationError(HypervisorError):
    """The hypervisor refused the user name or password."""

    retryable = False


class CertificateError(HypervisorError):
    """The server's TLS certificate is not trusted (CA file or pinned thumbprint)."""

    retryable = False


class QuiesceError(HypervisorError):
    """The guest could not be quiesced and the plan requires it."""

    retryable = False


class SessionLostError(HypervisorError):
    """The session was dropped and logging in again failed."""

    retryable = True


class HypervisorBusyError(HypervisorError):
    """The hypervisor is busy (a task conflicts, the host is in maintenance...)."""

    retryable = True


class TaskTimeoutError(HypervisorError):
    """A vSphere task did not finish within its time."""

    retryable = True


class SnapshotError(HypervisorError):
    """The host refused the snapshot (snapshots disabled, a snapshot fault)."""

    retryable = False
