package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

func splitDSPath(p string) (string, string, error) {
	var dp object.DatastorePath
	if !dp.FromString(p) || dp.Datastore == "" {
		return "", "", fmt.Errorf("not a datastore path: %q", p)
	}
	return dp.Datastore, dp.Path, nil
}

// diskName names a disk as a .vmx file does: scsi0:0, sata0:1, nvme0:0, ide0:0.
func diskName(devices object.VirtualDeviceList, disk *types.VirtualDisk) (string, string) {
	unit := int32(0)
	if disk.UnitNumber != nil {
		unit = *disk.UnitNumber
	}
	switch c := devices.FindByKey(disk.ControllerKey).(type) {
	case types.BaseVirtualSCSIController:
		adapter := "lsilogic"
		if _, ok := c.(*types.ParaVirtualSCSIController); ok {
			adapter = "pvscsi"
		}
		return fmt.Sprintf("scsi%d:%d", c.GetVirtualSCSIController().BusNumber, unit), adapter
	case types.BaseVirtualSATAController:
		return fmt.Sprintf("sata%d:%d", c.GetVirtualSATAController().BusNumber, unit), "ide"
	case *types.VirtualNVMEController:
		return fmt.Sprintf("nvme%d:%d", c.BusNumber, unit), "nvme"
	case *types.VirtualIDEController:
		return fmt.Sprintf("ide%d:%d", c.BusNumber, unit), "ide"
	}
	return fmt.Sprintf("disk%d", disk.Key), "lsilogic"
}

// newBaseDisk makes a lab disk of a device whose backing names fileName: a descriptor
// and a sparse flat extent, filled with OS-like content when content != "".
func (l *Lab) newBaseDisk(vm *LabVM, disk *types.VirtualDisk, fileName, content string) (*VDisk, error) {
	ds, rel, err := splitDSPath(fileName)
	if err != nil {
		return nil, err
	}
	dir, ok := l.dsDirs[ds]
	if !ok {
		return nil, fmt.Errorf("unknown datastore %s", ds)
	}
	capacity := disk.CapacityInBytes
	if capacity == 0 {
		capacity = disk.CapacityInKB * 1024
	}
	name, adapter := diskName(object.VirtualDeviceList(vm.Config.Hardware.Device), disk)
	d := &VDisk{VM: vm, Key: disk.Key, Name: name, Adapter: adapter, Capacity: capacity}
	e := &Extent{Datastore: ds, DSDir: dir, Rel: rel, DataRel: strings.TrimSuffix(rel, ".vmdk") + "-flat.vmdk",
		UUID: newUUID(), Capacity: capacity, Owner: d, crypt: vm.crypt}
	_ = os.MkdirAll(filepath.Dir(e.dataPath()), 0755)
	if err := e.create(adapter); err != nil {
		return nil, err
	}
	if content != "" {
		if err := fillOSLike(e, content); err != nil {
			return nil, err
		}
	}
	d.Top = e
	disk.CapacityInBytes = capacity
	disk.CapacityInKB = capacity / 1024
	if vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled {
		d.cbt = &cbtState{epoch: newEpoch()}
	}
	vm.disks = append(vm.disks, d)
	return d, nil
}
