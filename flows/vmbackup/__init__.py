"""vmbackup: hypervisor-level backup of virtual machines.

The package imports nothing heavy at start-up: the command line's repository
commands must start fast and never load Prefect.
"""

__version__ = "0.1.0"
