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


# --- WinRM (the Hyper-V adapter's transport) ---------------------------------
# `retryable` says whether the same call may succeed if repeated later.


class WinRMError(HypervisorError):
    """A WinRM call to a Hyper-V host failed."""

    retryable = False


class WinRMAuthenticationError(WinRMError):
    """The Hyper-V host refused the credentials."""

    retryable = False


class WinRMCertificateError(WinRMError):
    """The Hyper-V host's certificate is not trusted or does not match its name."""

    retryable = False


class WinRMUnreachableError(WinRMError):
    """Nothing answers WinRM at the host's address (refused, timed out, no route)."""

    retryable = True


class WinRMSessionLostError(WinRMError):
    """The WinRM shell or the authenticated connection went away mid-call."""

    retryable = True


class HypervScriptError(HypervisorError):
    """An adapter script ran and reported a failure (`code` names which)."""

    retryable = False

    def __init__(self, message: str, code: str = "ScriptFailed"):
        super().__init__(message)
        self.code = code


class HypervVmNotFoundError(HypervScriptError):
    """The Hyper-V host has no VM of that name."""

    exit_code = 2


class HypervQuiesceError(HypervScriptError):
    """Application consistency was required but the Hyper-V writer or the guest could not give it."""
