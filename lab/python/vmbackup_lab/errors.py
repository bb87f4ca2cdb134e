"""Errors of the lab. The command line maps LabInputError to exit 2, LabError to 1."""


class LabError(Exception):
    """The lab could not do what was asked (it failed to start, a request failed)."""


class LabInputError(LabError):
    """Bad input: no lab in the state directory, an unknown VM, disk or snapshot."""
