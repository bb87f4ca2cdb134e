"""The incremental contract (vmbackup.pointmeta): version 1 written and read
back, version 0 (points written before it was versioned) read by its own
parser, and an unknown version or unreadable attributes refused with the
reason the next full gives."""

from __future__ import annotations

import pytest
from vmbackup.errors import PointMetaError
from vmbackup.pointmeta import VERSION, PointMeta

V0_VSPHERE = {
    "tool": "vmbackup vsphere", "run_id": "r1", "vm_moref": "vm-42", "host": "esx1", "agent": "a1",
    "mode": "incremental", "full_reason": None, "transport": "hotadd", "consistency": "application",
    "consistency_note": None, "snapshot_unix": 1_700_000_100.5, "last_full_unix": 1_700_000_000.0,
    "excluded_disks": [], "vmx": None,
    "disks": [{"name": "scsi0:0", "key": 2000, "uuid": "u0", "file": "[ds] a.vmdk", "capacity": 8 << 20,
               "change_id": "52 aa/7"}],
}  # fmt: skip
V0_HYPERV = {
    "tool": "vmbackup hyperv", "hypervisor": "hyperv", "run_id": "r2", "shadow_run_id": "s", "vm_id": "GUID-1",
    "host": "hv1", "agent": "a1", "mode": "full", "full_reason": "RCT is not used yet", "transport": "local",
    "consistency": "crash", "snapshot_unix": 1_700_000_200.0, "last_full_unix": 1_700_000_200.0,
    "disks": [{"name": "scsi0:0", "file": "D:\\v.vhdx", "chain": [], "volume": "D:\\", "capacity": 1, "change_id": None}],
}  # fmt: skip


def test_version_0_points_are_read_by_their_own_parser():
    m = PointMeta.from_attributes(V0_VSPHERE, vm="web01", created_unix=1.0)
    assert (m.version, m.hypervisor, m.vm, m.vm_id, m.vm_moref) == (0, "vsphere", "web01", None, "vm-42")
    assert (m.mode, m.last_full_unix, m.snapshot_unix) == ("incremental", 1_700_000_000.0, 1_700_000_100.5)
    assert m.change_ids() == {"scsi0:0": "52 aa/7"} and m.extra["transport"] == "hotadd"
    h = PointMeta.from_attributes(V0_HYPERV, vm="win01")
    assert (h.version, h.hypervisor, h.vm_id, h.mode) == (0, "hyperv", "GUID-1", "full")
    # A version 0 point without last_full_unix: its own point in time, else its creation.
    old = {k: v for k, v in V0_VSPHERE.items() if k not in ("last_full_unix", "snapshot_unix")}
    assert PointMeta.from_attributes(old, vm="web01", created_unix=5.0).last_full_unix == 5.0


def test_version_1_round_trips_and_stays_flat():
    m = PointMeta.from_attributes(V0_VSPHERE, vm="web01")
    m.vm_id, m.version = "uuid-9", VERSION
    attrs = m.to_attributes()
    assert attrs["meta_version"] == VERSION == 1 and attrs["consistency"] == "application"  # flat, as before
    back = PointMeta.from_attributes(attrs)
    assert back == m


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"meta_version": 2}, "is version 2, newer than this vmbackup reads (1)"),
        ({"meta_version": "1"}, "invalid version ('1')"),
        ({"meta_version": 1, "disks": "scsi0:0"}, "disks is str, not a list"),
        ({"meta_version": 1, "last_full_unix": "yesterday"}, "last_full_unix is 'yesterday'"),
        ({"meta_version": 1, "mode": "differential"}, "mode is 'differential'"),
        ({"meta_version": 1, "hypervisor": None}, "hypervisor is None"),
        ({"tool": "someone else"}, "version 0 metadata written by 'someone else'"),
        ({"disks": [{"change_id": "x"}]}, "a disk entry has no name"),
    ],
)
def test_unknown_versions_and_unreadable_attributes_say_why(change, words):
    if "meta_version" in change:  # a version 1 point with one thing wrong
        m = PointMeta.from_attributes(V0_VSPHERE, vm="web01")
        m.version = VERSION
        attrs = {**m.to_attributes(), **change}
    else:  # a version 0 point with one thing wrong
        attrs = {**V0_VSPHERE, **change}
    with pytest.raises(PointMetaError) as e:
        PointMeta.from_attributes(attrs, vm="web01")
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PointMetaError, match="not a JSON object"):
        PointMeta.from_attributes(["x"])
