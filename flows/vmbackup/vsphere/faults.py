"""One map from vSphere faults to ``vmbackup.errors`` classes.

Messages name the object, then the cause, and never carry a credential.
"""

from __future__ import annotations

from pyVmomi import vim, vmodl

from ..errors import (
    AuthenticationError,
    BackupError,
    HypervisorBusyError,
    HypervisorError,
    SessionLostError,
    SnapshotError,
    VmNotFoundError,
)

# Faults after which the same call can succeed later.
_BUSY = (
    vim.fault.TaskInProgress,
    vim.fault.ResourceInUse,
    vim.fault.Timedout,
    vmodl.fault.HostCommunication,
)


def describe(fault: BaseException) -> str:
    """The fault's class name and its message, if it has one."""
    name = type(fault).__name__.rsplit(".", 1)[-1]
    msg = getattr(fault, "msg", None) or ""
    if not msg:
        for lm in getattr(fault, "faultMessage", None) or []:
            msg = getattr(lm, "message", "") or msg
    return f"{name}: {msg}" if msg else name


def hypervisor_error(what: str, fault: BaseException) -> BackupError:
    """The ``vmbackup.errors`` exception for ``fault`` raised while doing ``what``."""
    if isinstance(fault, BackupError):
        return fault
    text = f"{what} failed: {describe(fault)}"
    if isinstance(fault, vim.fault.InvalidLogin):
        return AuthenticationError(f"{what} failed: wrong user name or password")
    if isinstance(fault, vim.fault.NotAuthenticated):
        return SessionLostError(text)
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        return VmNotFoundError(f"{what} failed: the object is gone ({describe(fault)})")
    if isinstance(fault, (vim.fault.SnapshotFault, vim.fault.SnapshotDisabled)):
        return SnapshotError(text)
    if isinstance(fault, _BUSY):
        return HypervisorBusyError(text)
    return HypervisorError(text)
