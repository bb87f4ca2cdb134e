"""The lab: a simulated vSphere datacenter to develop, test and demo against.

The simulator is a Go program (``lab/vsphere``) built on govmomi's vCenter/ESXi
simulator; this package builds it, starts and stops it, and talks to its control
endpoint. It never imports Prefect. See docs/lab.md.
"""

from .errors import LabError, LabInputError
from .process import Lab, build_simulator, lab_down, lab_up, load_lab

__all__ = ["Lab", "LabError", "LabInputError", "build_simulator", "lab_down", "lab_up", "load_lab"]
