"""One exception hierarchy for the whole project, and one error map.

The Rust extension raises these classes too (it imports them from here, one
class per variant of the mover's ``Error``), so callers catch the same types
whichever side failed. Every class says two things, and nothing else decides
them:

- ``retryable``: whether the same call may succeed if tried again (a
  connection reset or timed out, a busy resource). Flows retry exactly these
  (``is_retryable``); every other error is permanent.
- ``exit_code``: what the command line exits with (``exit_code_of``): 2 for
  bad usage or bad input (the same command will fail again), 1 for a failed
  operation (including every retryable error).

docs/operations.md has the table.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base of every vmbackup error: a failed operation, permanent unless a
    subclass says otherwise."""

    exit_code: int = 1
    retryable: bool = False


class TransientError(BackupError):
    """Mixin for failures a retry may cure; always exit code 1."""

    exit_code = 1
    retryable = True


class InvalidInputError(BackupError):
    """An argument is malformed or out of range."""

    exit_code = 2


class OutputError(BackupError):
    """Writing the command's output (stdout) failed."""


class HypervisorError(BackupError):
    """The hypervisor refused or failed an operation."""


class MoverError(BackupError):
    """The data mover failed."""


class InternalError(MoverError):
    """A bug in the mover (a thread panicked); retrying will not help."""


class SourceError(MoverError):
    """The disk source is missing, unreadable or of an unsupported kind, or
    a corrupt image: bad input."""

    exit_code = 2


class SourceUnavailableError(SourceError, TransientError):
    """Reading the source failed in a way a retry may cure: the NBD server
    reset or closed the connection or stopped answering, answered EIO, or
    the device was busy."""

    exit_code = 1
    retryable = True


class RepositoryError(MoverError):
    """The repository is missing, malformed, full or unwritable."""


class RepositoryUnavailableError(RepositoryError, TransientError):
    """The repository's storage failed in a way a retry may cure (a timed
    out or stale network file system, a busy resource)."""

    exit_code = 1
    retryable = True


class NotFoundError(RepositoryError):
    """A repository, backup or disk does not exist."""

    exit_code = 2


class CorruptChunkError(RepositoryError):
    """A chunk's bytes do not match its id."""


class TargetError(MoverError):
    """Writing the restore target failed."""


class AddressInUseError(MoverError, TransientError):
    """The address or socket to serve on is held by something else."""

    exit_code = 1
    retryable = True


class CancelledError(MoverError):
    """The operation was cancelled."""


class NothingSelectedError(BackupError):
    """A backup run's selection matched no VM on any hypervisor it reached:
    a run that protects nothing is a failed run, never a success."""

    retryable = False


def is_retryable(exc: BaseException) -> bool:
    """Whether a retry of the call that raised ``exc`` may succeed.

    Only vmbackup errors that say so are retried; anything else (a bug, a
    KeyboardInterrupt) is not.
    """
    return isinstance(exc, BackupError) and exc.retryable


def exit_code_of(exc: BaseException) -> int:
    """The command line's exit code for an exception that ended a command:
    the class's ``exit_code`` for vmbackup errors, 130 for an interrupt, 1
    for anything else (a failed write to stdout, a bug)."""
    if isinstance(exc, BackupError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


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


class SessionLostError(HypervisorError, TransientError):
    """The session was dropped and logging in again failed."""

    retryable = True


class HypervisorBusyError(HypervisorError, TransientError):
    """The hypervisor is busy (a task conflicts, the host is in maintenance...)."""

    retryable = True


class TaskTimeoutError(HypervisorError, TransientError):
    """A vSphere task did not finish within its time."""

    retryable = True


class SnapshotError(HypervisorError):
    """The host refused the snapshot (snapshots disabled, a snapshot fault)."""

    retryable = False


# --- WinRM (the Hyper-V adapter's transport) ---------------------------------
# `retryable` says whether the same call may succeed if repeated later.


class WinRMError(HypervisorError):
    """A WinRM call to a Hyper-V host failed."""

    retryable = False


class WinRMAuthenticationError(WinRMError, AuthenticationError):
    """The Hyper-V host refused the credentials."""

    retryable = False


class WinRMCertificateError(WinRMError, CertificateError):
    """The Hyper-V host's certificate is not trusted or does not match its name."""

    retryable = False


class WinRMUnreachableError(WinRMError, TransientError):
    """Nothing answers WinRM at the host's address (refused, timed out, no route)."""

    retryable = True


class WinRMSessionLostError(WinRMError, SessionLostError):
    """The WinRM shell or the authenticated connection went away mid-call."""

    retryable = True


class HypervScriptError(HypervisorError):
    """An adapter script ran and reported a failure (`code` names which)."""

    retryable = False

    def __init__(self, message: str, code: str = "ScriptFailed"):
        super().__init__(message)
        self.code = code


class HypervVmNotFoundError(HypervScriptError, VmNotFoundError):
    """The Hyper-V host has no VM of that name."""

    exit_code = 2


class HypervQuiesceError(HypervScriptError, QuiesceError):
    """Application consistency was required but the Hyper-V writer or the guest could not give it."""
