package main

import (
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// Disk modes and raw device mappings. vSphere's VirtualDiskMode: "independent_persistent:
// Same as persistent, but not affected by snapshots" (and independent_nonpersistent
// likewise); a physical-compatibility RDM "cannot use disk modes, and commands are
// passed straight through to the LUN" (VirtualDiskCompatibilityMode), so snapshots do
// not cover it either. In the lab such a disk keeps its live file when a snapshot is
// taken: no delta, nothing frozen, guest writes during a backup land in it.

func validDiskMode(m string) bool {
	switch types.VirtualDiskMode(m) {
	case types.VirtualDiskModePersistent, types.VirtualDiskModeIndependent_persistent,
		types.VirtualDiskModeIndependent_nonpersistent:
		return true
	}
	return false
}

// independent reports whether snapshots leave this disk alone.
func (d *VDisk) independent() bool {
	return d.RDM || strings.HasPrefix(d.Mode, "independent")
}

func (d *VDisk) diskMode() string {
	if d == nil || d.Mode == "" {
		return string(types.VirtualDiskModePersistent)
	}
	return d.Mode
}

// diskBacking is the backing of one of a VM's own disks: its chain as backingFor
// describes it, in the disk's mode; a physical-mode RDM is a mapping file that points
// at a LUN (VirtualDiskRawDiskMappingVer1BackingInfo, compatibilityMode physicalMode).
func (l *Lab) diskBacking(d *VDisk, e *Extent, changeID string) types.BaseVirtualDeviceBackingInfo {
	b := l.backingFor(e, changeID)
	b.DiskMode = d.diskMode()
	if d == nil || !d.RDM {
		return b
	}
	lun := strings.ReplaceAll(e.UUID, "-", "")
	return &types.VirtualDiskRawDiskMappingVer1BackingInfo{
		VirtualDeviceFileBackingInfo: b.VirtualDeviceFileBackingInfo,
		LunUuid:                      "0200000000" + lun,
		DeviceName:                   "/vmfs/devices/disks/naa.6" + lun[:31],
		CompatibilityMode:            string(types.VirtualDiskCompatibilityModePhysicalMode),
		DiskMode:                     string(types.VirtualDiskModeIndependent_persistent),
		Uuid:                         e.UUID,
	}
}

// modeChange checks an edit of a disk's backing.diskMode. vSphere refuses it while the
// VM has snapshots (DisallowedDiskModeChange: "This property cannot be changed as long
// as a virtual machine has an existing snapshot"); the vSphere Client offers the change
// only on a powered-off VM, and the lab refuses it on a running one with
// InvalidPowerState. It returns the new mode ("" when the edit leaves the mode alone).
func (vm *LabVM) modeChange(d *VDisk, disk *types.VirtualDisk) (string, types.BaseMethodFault) {
	b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok || b.DiskMode == "" || b.DiskMode == d.diskMode() {
		return "", nil
	}
	if d.RDM || !validDiskMode(b.DiskMode) {
		return "", &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "backing.diskMode"}}
	}
	if len(vm.snaps) > 0 {
		return "", &types.DisallowedDiskModeChange{InvalidDeviceSpec: types.InvalidDeviceSpec{
			InvalidVmConfig: types.InvalidVmConfig{Property: "backing.diskMode"}}}
	}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		return "", &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff,
			ExistingState: vm.Runtime.PowerState}
	}
	return b.DiskMode, nil
}
