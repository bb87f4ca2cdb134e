package main

import (
	"fmt"
	"os"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// CloneVMTask clones with disk contents: a linked clone (a snapshot and
// diskMoveType createNewChildDiskBacking) gets a delta on top of the snapshot's frozen
// disk; a full clone gets a copy of the source's content.
func (vm *LabVM) CloneVMTask(ctx *simulator.Context, req *types.CloneVM_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "cloneVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return vm.lab.clone(ctx, vm, req)
	})
	return &methods.CloneVM_TaskBody{Res: &types.CloneVM_TaskResponse{Returnval: task.Run()}}
}

func (l *Lab) clone(ctx *simulator.Context, src *LabVM, req *types.CloneVM_Task) (types.AnyType, types.BaseMethodFault) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.vms[req.Name] != nil {
		return nil, &types.DuplicateName{Name: req.Name}
	}
	linked := req.Spec.Location.DiskMoveType == string(types.VirtualMachineRelocateDiskMoveOptionsCreateNewChildDiskBacking)
	source := map[int32]*Extent{}
	if req.Spec.Snapshot != nil {
		st := l.snaps[*req.Spec.Snapshot]
		if st == nil || st.VM != src {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.snapshot"}
		}
		for k, sd := range st.Disks {
			source[k] = sd.Extent
		}
	} else {
		if linked {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.snapshot"}
		}
		for _, d := range src.disks {
			source[d.Key] = d.Top
		}
	}
	ds := vmHomeDS(src)
	if req.Spec.Location.Datastore != nil {
		if obj, ok := simulator.Map.Get(*req.Spec.Location.Datastore).(*simulator.Datastore); ok {
			ds = obj.Name
		}
	}
	host := src.Runtime.Host
	if req.Spec.Location.Host != nil {
		host = req.Spec.Location.Host
	}
	pool := src.ResourcePool
	if req.Spec.Location.Pool != nil {
		pool = req.Spec.Location.Pool
	}
	folder, ok := simFolder(simulator.Map.Get(req.Folder))
	if !ok || pool == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "folder"}
	}
	spec := types.VirtualMachineConfigSpec{
		Name: req.Name, GuestId: src.Config.GuestId, NumCPUs: src.Config.Hardware.NumCPU,
		MemoryMB: int64(src.Config.Hardware.MemoryMB),
		Files:    &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", ds)},
	}
	devices := object.VirtualDeviceList(src.Config.Hardware.Device)
	var disks []*types.VirtualDisk
	idx := 0
	for _, dev := range devices {
		switch x := dev.(type) {
		case types.BaseVirtualSCSIController, types.BaseVirtualSATAController, *types.VirtualNVMEController:
			spec.DeviceChange = append(spec.DeviceChange, &types.VirtualDeviceConfigSpec{
				Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: copyController(x)})
		case *types.VirtualDisk:
			if source[x.Key] == nil {
				continue // a hot-added disk is not part of the clone
			}
			name := fmt.Sprintf("[%s] %s/%s.vmdk", ds, req.Name, req.Name)
			if idx > 0 {
				name = fmt.Sprintf("[%s] %s/%s_%d.vmdk", ds, req.Name, req.Name, idx)
			}
			idx++
			unit := *x.UnitNumber
			nd := &types.VirtualDisk{
				VirtualDevice: types.VirtualDevice{Key: x.Key, ControllerKey: x.ControllerKey, UnitNumber: &unit,
					Backing: &types.VirtualDiskFlatVer2BackingInfo{
						VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: name},
						DiskMode:                     string(types.VirtualDiskModePersistent), ThinProvisioned: types.NewBool(true)}},
				CapacityInKB: x.CapacityInKB, CapacityInBytes: x.CapacityInBytes,
			}
			disks = append(disks, nd)
			spec.DeviceChange = append(spec.DeviceChange, &types.VirtualDeviceConfigSpec{
				Operation: types.VirtualDeviceConfigSpecOperationAdd, FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate, Device: nd})
		}
	}
	res := folder.CreateVMTask(ctx, &types.CreateVM_Task{This: folder.Self, Config: spec, Pool: *pool, Host: host})
	t := simulator.Map.Get(res.(*methods.CreateVM_TaskBody).Res.Returnval).(*simulator.Task)
	if t.Info.Error != nil {
		return nil, t.Info.Error.Fault
	}
	ref := t.Info.Result.(types.ManagedObjectReference)
	clone := l.adopt(simulator.Map.Get(ref).(*simulator.VirtualMachine), false, src.tools)
	for _, dev := range disks {
		cur := findDisk(clone, dev.Key)
		b := cur.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		from := source[dev.Key]
		if linked {
			d := &VDisk{VM: clone, Key: cur.Key, Capacity: from.Capacity}
			d.Name, d.Adapter = diskName(object.VirtualDeviceList(clone.Config.Hardware.Device), cur)
			// The stock code made empty files for the disk; a linked clone has a delta instead.
			for _, p := range []string{b.FileName} {
				if dsName, rel, err := splitDSPath(p); err == nil {
					_ = os.Remove(l.dsDirs[dsName] + "/" + rel)
					_ = os.Remove(l.dsDirs[dsName] + "/" + rel[:len(rel)-5] + "-flat.vmdk")
				}
			}
			delta, err := l.newDelta(clone, d, from)
			if err != nil {
				return nil, &types.FileFault{File: from.DSPath()}
			}
			from.Clones++
			d.Top = delta
			clone.disks = append(clone.disks, d)
			continue
		}
		d, err := l.newBaseDisk(clone, cur, b.FileName, "")
		if err != nil {
			return nil, &types.FileFault{File: b.FileName}
		}
		if err := copyContent(from, d.Top); err != nil {
			return nil, &types.FileFault{File: b.FileName}
		}
	}
	l.syncDevices(clone)
	if req.Spec.PowerOn {
		clone.PowerOnVMTask(ctx, &types.PowerOnVM_Task{This: clone.Self})
	}
	return ref, nil
}

func findDisk(vm *LabVM, key int32) *types.VirtualDisk {
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == key {
			return disk
		}
	}
	return nil
}

func copyController(dev types.BaseVirtualDevice) types.BaseVirtualDevice {
	switch c := dev.(type) {
	case *types.ParaVirtualSCSIController:
		x := *c
		x.Device = nil
		return &x
	case *types.VirtualLsiLogicController:
		x := *c
		x.Device = nil
		return &x
	case *types.VirtualLsiLogicSASController:
		x := *c
		x.Device = nil
		return &x
	case *types.VirtualAHCIController:
		x := *c
		x.Device = nil
		return &x
	case *types.VirtualNVMEController:
		x := *c
		x.Device = nil
		return &x
	}
	return dev
}

// copyContent copies the composed content of a chain into a new base disk.
func copyContent(src, dst *Extent) error {
	f, err := os.OpenFile(dst.dataPath(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, grainSize)
	for g := range src.grains {
		if !src.allocated(g) {
			continue
		}
		if err := src.readAt(buf, int64(g)*grainSize); err != nil {
			return err
		}
		if _, err := f.WriteAt(buf, int64(g)*grainSize); err != nil {
			return err
		}
		dst.grains[g] = true
	}
	return nil
}

// DestroyTask deletes a VM with the files of its own disks. A disk file hot-added to
// an agent is FileLocked (as vSphere locks it); a VM with snapshots is refused
// (InvalidState: not simulated). A linked clone's parent files stay with their owner,
// which may then merge them again.
func (vm *LabVM) DestroyTask(ctx *simulator.Context, req *types.Destroy_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "destroy", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, vm.lab.destroy(ctx, vm, req)
	})
	return &methods.Destroy_TaskBody{Res: &types.Destroy_TaskResponse{Returnval: task.Run()}}
}

func (l *Lab) destroy(ctx *simulator.Context, vm *LabVM, req *types.Destroy_Task) types.BaseMethodFault {
	l.mu.Lock()
	if len(vm.snaps) > 0 || len(vm.hot) > 0 {
		l.mu.Unlock()
		return &types.InvalidState{}
	}
	for _, d := range vm.disks {
		for e := d.Top; e != nil && e.Owner == d; e = e.Parent {
			if e.Attached > 0 {
				l.mu.Unlock()
				return &types.FileLocked{FileFault: types.FileFault{File: e.DSPath()}}
			}
		}
	}
	l.mu.Unlock()
	res := vm.VirtualMachine.DestroyTask(ctx, req)
	ref := res.(*methods.Destroy_TaskBody).Res.Returnval
	if t, ok := simulator.Map.Get(ref).(*simulator.Task); ok {
		for t.Info.State == types.TaskInfoStateQueued || t.Info.State == types.TaskInfoStateRunning {
			time.Sleep(time.Millisecond)
		}
		if t.Info.Error != nil {
			return t.Info.Error.Fault
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, d := range vm.disks {
		e := d.Top
		for ; e != nil && e.Owner == d; e = e.Parent {
			e.remove()
		}
		if e != nil && e.Clones > 0 {
			e.Clones--
		}
	}
	vm.disks = nil
	delete(l.vms, vm.key)
	return nil
}
