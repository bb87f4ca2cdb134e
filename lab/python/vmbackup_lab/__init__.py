"""The lab: a simulated vSphere datacenter to develop, test and demo against.

The simulator is a Go program (``lab/vsphere``) built on govmomi's vCenter/ESXi
simulator; this package (``vmbackup_lab``, installed from lab/python,
never imported by the product) builds it, starts and stops it, and talks to its control
endpoint. It never imports Prefect. ``vmbackup lab ...`` and ``vmbackup demo`` load
it when run; the demo and its generated disk images (``diskimage``) live here
too. See docs/lab.md.
"""

from .errors import LabError, LabInputError
from .process import Lab, build_simulator, lab_down, lab_up, load_lab

__all__ = ["Lab", "LabError", "LabInputError", "build_simulator", "lab_down", "lab_up", "load_lab"]
