"""Where a disk goes when a VM crosses hypervisors (docs/vsphere.md and
docs/hyperv.md, "Across hypervisors"): its own name where the target has
the place, else a free one, never two disks on one place. The lab runs the
common shapes end to end (tests/e2e/test_cross_restore.py); this table
holds the rest."""

from __future__ import annotations

import pytest
from vmbackup.hyperv.restore import places as hyperv_places
from vmbackup.hypervisors.base import DiskSpec, VmDescription
from vmbackup.vsphere.crossrestore import _places as vsphere_places


def _vm(firmware: str, *names: str) -> VmDescription:
    return VmDescription("vm", "vsphere", firmware=firmware, disks=[DiskSpec(n, 1 << 20) for n in names])


@pytest.mark.parametrize(
    ("firmware", "names", "want"),
    [
        # generation 2: SCSI only; SATA, NVMe and IDE to the next free SCSI 0 location
        ("efi", ["nvme0:0"], ["scsi0:0"]),
        ("efi", ["sata0:0", "scsi0:0"], ["scsi0:1", "scsi0:0"]),
        ("efi", ["ide0:0", "scsi0:1"], ["scsi0:0", "scsi0:1"]),
        ("efi", ["scsi3:63", "scsi4:0"], ["scsi3:63", "scsi0:0"]),  # Hyper-V has SCSI 0-3, locations 0-63
        # generation 1 boots from IDE: a SATA/NVMe disk takes IDE 0:0 when no disk is there
        ("bios", ["sata0:0"], ["ide0:0"]),
        ("bios", ["sata0:0", "sata0:1"], ["ide0:0", "scsi0:0"]),
        ("bios", ["ide0:0", "sata0:0"], ["ide0:0", "scsi0:0"]),
        ("bios", ["scsi0:0", "scsi0:1"], ["scsi0:0", "scsi0:1"]),  # names kept (a warning says IDE boots)
        ("bios", ["ide1:1", "nvme0:0"], ["ide1:1", "ide0:0"]),
    ],
)
def test_a_vsphere_vms_disks_on_hyperv(firmware, names, want):
    got = hyperv_places(_vm(firmware, *names))
    assert [got[n] for n in names] == want
    assert len(set(got.values())) == len(names)


@pytest.mark.parametrize(
    ("names", "want"),
    [
        (["scsi0:0", "scsi0:1", "ide0:0", "ide1:1"], ["scsi0:0", "scsi0:1", "ide0:0", "ide1:1"]),
        # unit 7 is the controller's on vSphere; LSI Logic SAS has units 0-15
        (["scsi0:7", "scsi0:0"], ["scsi0:1", "scsi0:0"]),
        (["scsi0:20", "scsi1:0"], ["scsi0:0", "scsi1:0"]),
        (["scsi0:0", "scsi0:20"], ["scsi0:0", "scsi0:1"]),
        (["ide0:2"], ["scsi0:0"]),
    ],
)
def test_a_hyperv_vms_disks_on_vsphere(names, want):
    got = vsphere_places([DiskSpec(n, 1 << 20) for n in names])
    assert [f"{b}{n}:{u}" for b, n, u in (got[x] for x in names)] == want


def test_more_disks_than_vsphere_holds_is_refused():
    from vmbackup.errors import RestoreInputError

    disks = [DiskSpec(f"scsi{c}:{u}", 1) for c in range(4) for u in range(17)]
    with pytest.raises(RestoreInputError, match="more disks than vSphere's SCSI controllers hold"):
        vsphere_places(disks)
