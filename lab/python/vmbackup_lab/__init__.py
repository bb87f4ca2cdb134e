"""The lab: a simulated vSphere datacenter and Hyper-V hosts to develop, test and demo against.

The simulator is a Go program (``lab/vsphere``) built on govmomi's vCenter/ESXi
simulator; the Hyper-V hosts are Python (``hyperv``). This package
(``vmbackup_lab``, installed from lab/python, never imported by the product)
builds the simulator, starts and stops both, and talks to their control
endpoints. It never imports Prefect. ``vmbackup lab ...`` and ``vmbackup demo`` load
it when run; the demo and its generated disk images (``diskimage``) live here
too. See docs/lab.md.
"""

from .errors import LabError, LabInputError
from .hyperv import HypervLab
from .process import Lab, build_simulator, lab_down, lab_up, load_lab

__all__ = ["HypervLab", "Lab", "LabError", "LabInputError", "build_simulator", "lab_down", "lab_up", "load_lab"]
