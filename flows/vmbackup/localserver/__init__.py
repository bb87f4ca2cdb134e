"""The local Prefect server vmbackup starts for itself (``server``: one per
state directory, found again by the next command) and the records of the
flow runs this machine's commands started (``runs``: a killed command's run
is marked Crashed by the next one). No flows here, and Prefect is imported
only when a record has to be acted on (tests/test_boundaries.py)."""
