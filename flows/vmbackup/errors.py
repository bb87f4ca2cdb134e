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
