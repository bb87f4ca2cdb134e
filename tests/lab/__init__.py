"""Tests of the lab (the simulated vSphere datacenter)."""
