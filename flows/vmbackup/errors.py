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


class WrongKeyError(RepositoryError):
    """The key (or the passphrase that unwraps it) does not open this
    encrypted repository."""

    exit_code = 2


class KeyRequiredError(RepositoryError):
    """The repository is encrypted and no key was given for it."""

    exit_code = 2


class TamperedRepositoryError(RepositoryError):
    """The repository's files contradict one another in a way only an edit
    makes (key slots beside a config that says unencrypted): refused, never
    written into."""

    exit_code = 2


class UntrustedRecord(RepositoryError):
    """A record of the repository (a ledger entry, the drills' record) that
    cannot be authenticated or read as one: never acted upon. Its readers
    skip it with this one line; it never ends a command."""


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


class RestoreInputError(HypervisorError):
    """A restore that must not start: a name in use, an unknown point, a
    point without a configuration, a datastore too small, a network map to
    a network that does not exist. Nothing was created."""

    exit_code = 2
    retryable = False


class RestoreCleanupError(HypervisorError):
    """The VM was restored but what the restore held (an attached disk, a
    session) could not be released: the message names the restored VM."""

    retryable = False


class RestoreVerifyError(HypervisorError):
    """A restored disk differs from its point (a drill fails)."""

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
    """The host refused the snapshot (snapshots disabled, a snapshot fault),
    or a Hyper-V shadow copy vanished during the backup (Windows deletes the
    oldest when the shadow storage is full: that recurs, so not retried)."""

    retryable = False


class SnapshotVanishedError(SnapshotError, TransientError):
    """Our vSphere snapshot was removed by someone else (an administrator's
    "delete all", another site's sweeper) before the commit: nothing was
    committed. Retried: the cause is outside this backup and momentary, and
    the next attempt takes a new snapshot (retries are bounded)."""

    retryable = True


class AdapterSignal(Exception):
    """Not a failure: a signal an adapter raises and catches inside itself
    (deliberately not a ``BackupError``, so that no ``except BackupError``
    on the way swallows it); it never leaves the adapter."""


class TransportImpossible(AdapterSignal):
    """This transport cannot reach these disks: the vSphere procedure tries
    the next one of the plan's order."""


class ChangeIdRejected(AdapterSignal):
    """QueryChangedDiskAreas refused the change id (CBT was reset): take a full."""


class NoTaskUpdates(AdapterSignal):
    """vSphere gave no updates for a task (WaitForUpdatesEx): poll instead."""


class PointMetaError(AdapterSignal, ValueError):
    """A point's attributes cannot be the base of an incremental
    (``pointmeta.py``): the message says why, as the next full's reason."""


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


# --- runs and orchestration ----------------------------------------------------


class VmTimeoutError(BackupError):
    """A VM's backup ran past its deadline and was cancelled."""

    retryable = False


class LimitsUnavailableError(TransientError):
    """The Prefect server refused a request for a VM's concurrency slots
    (a 503 under load, a dropped connection) for longer than the VM's
    deadline, asked again with back-off meanwhile (``limits.hold``): nothing
    was started, so the VM's task is retried."""

    retryable = True


class RunInterruptedError(BackupError):
    """The run was interrupted (Ctrl-C, SIGTERM) before or while this VM ran."""

    retryable = False


class AgentMismatchError(BackupError):
    """A per-agent run landed on a worker of another agent."""


class VmsFailedError(BackupError):
    """Some VMs of a deployment run failed (their rows are in the report)."""


class ServerError(BackupError):
    """The embedded Prefect server could not be started or reached."""


class Interrupted(BackupError):
    """The command stopped on a signal; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int, what: str):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {what}")


class MaintenanceError(BackupError):
    """A maintenance flow did its report but failed; ``report`` is it."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple:  # Prefect may pickle a flow's exception
        return (type(self), (str(self), self.report))


class RepositoryDamagedError(MaintenanceError):
    """verify_repository found problems."""


class CbtMismatchError(MaintenanceError):
    """audit_cbt found areas CBT said had not changed that differ from the
    point (or could not audit a VM); the VMs' chains are marked broken."""


class DrillFailedError(MaintenanceError):
    """A restore drill failed for a VM (not restored, not equal to its point,
    or not removed); the report names each."""


class GcRefusedError(MaintenanceError):
    """apply_retention removed backups, but gc refused to run (a manifest
    it cannot read: the space stays taken until it is repaired or forgotten)."""


class CopyError(BackupError):
    """The offsite copy (S3) refused or failed an operation: a bucket that is
    missing or has no Object Lock, credentials refused, an object that does
    not arrive as it was sent, a copy with no index."""


class CopyUnavailableError(CopyError, TransientError):
    """The object store did not answer or answered busy; the copy resumes
    where it stopped when run again."""
