"""The vSphere adapter on pyVmomi: connection, inventory, snapshots, CBT,
transports (hot-add, direct, NBD), the cleanup ledger, the per-VM procedure
and the sweeper. Plain Python: it never imports Prefect (docs/vsphere.md).

Import the submodules (``vmbackup.vsphere.client``...): this package imports
nothing at startup, so ``import vmbackup`` stays free of pyVmomi.
"""
