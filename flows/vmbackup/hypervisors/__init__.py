"""What every hypervisor adapter implements, and the one per-VM procedure.

- ``base.py``: the protocol (``Hypervisor`` for a plan's hypervisor:
  connect, select, limit keys, sweep, the steps of one VM; ``VmSteps`` for
  one VM: reconcile, describe, freeze, expose, plan the reads, check the
  freeze still holds, the point's metadata, release) and the small
  dataclasses the steps hand to the procedure.
- ``procedure.py``: ``backup_one(steps, ...)``, reconcile -> freeze ->
  expose -> read -> check -> commit -> release, cleanup on every path. The
  vSphere and Hyper-V adapters supply steps (``vsphere/procedure.py``,
  ``hyperv/procedure.py``), not procedures.

Plain Python: nothing here imports Prefect (tests/test_boundaries.py).
Import the submodules; this package imports nothing at startup.
"""
