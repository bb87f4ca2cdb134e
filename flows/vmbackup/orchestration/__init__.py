"""The Prefect side: flows, the per-VM task, limits, the embedded server and
the ``backup``/``server`` commands (docs/flows.md).

Importing this package imports nothing heavy; ``server`` and ``command``
never import Prefect, ``vmtask``, ``limits`` (when used) and
``backup_vsphere`` do.
"""
