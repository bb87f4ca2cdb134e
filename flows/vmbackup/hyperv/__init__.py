"""The Hyper-V adapter: PowerShell scripts run over WinRM (pywinrm), no Prefect.

`scripts/*.ps1` are what the adapter runs on a host, readable and runnable by
an administrator; `scripts.py` wraps one with its parameters as data;
`client.py` runs it and parses its JSON answer; `inventory.py` selects VMs,
`shadowset.py` makes one shadow copy set for several VMs,
`procedure.py` backs one up (`backup_vm`), `sweep.py` removes what crashed
runs left. docs/hyperv.md describes the procedure and the exact VSS semantics.
"""
