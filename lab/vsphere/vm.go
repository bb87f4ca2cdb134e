package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// LabVM extends the simulator's VirtualMachine (embedded by value, so that the
// property collector still finds the managed object) with disk chains, snapshots
// that freeze and merge, CBT, hot-add and linked clones.
type LabVM struct {
	simulator.VirtualMachine

	lab    *Lab
	key    string // how the lab's commands name it (VMSpec.key): l.vms's key
	disks  []*VDisk
	snaps  []*SnapState
	sid    int32
	agent  bool
	tools  bool
	faults Faults
	hot    map[int32]*Attachment
	crypt  *cryptoKey // an encrypted VM: config.keyId, its disks' files hold ciphertext
	// removing counts snapshot removals still running (slow_ms): vSphere runs one
	// task at a time on a VM, so a consolidation started meanwhile is refused.
	removing int
}

// LabSnapshot extends VirtualMachineSnapshot: removal merges the delta back.
type LabSnapshot struct {
	simulator.VirtualMachineSnapshot
	lab *Lab
}

// Attachment is a disk file hot-added to an agent VM.
type Attachment struct {
	Agent     string `json:"agent"`
	Host      string `json:"host"`
	Key       int32  `json:"key"`
	File      string `json:"file"`
	UUID      string `json:"uuid"`
	Device    string `json:"device"`
	Datastore string `json:"datastore"`
	Writable  bool   `json:"writable,omitempty"` // persistent hot-add: written into the disk on detach (restore.go)
	extent    *Extent
}

func (vm *LabVM) toolsRunning() bool {
	return vm.tools && !vm.faults.ToolsNotRunning && vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
}

func (vm *LabVM) syncGuest() {
	status := types.VirtualMachineToolsRunningStatusGuestToolsNotRunning
	tools := types.VirtualMachineToolsStatusToolsNotRunning
	if vm.toolsRunning() {
		status = types.VirtualMachineToolsRunningStatusGuestToolsRunning
		tools = types.VirtualMachineToolsStatusToolsOk
	}
	if !vm.tools {
		tools = types.VirtualMachineToolsStatusToolsNotInstalled
	}
	vm.Guest.ToolsRunningStatus = string(status)
	vm.Guest.ToolsStatus = tools
	vm.Guest.ToolsVersion = "12352"
	vm.Summary.Guest.ToolsRunningStatus = string(status)
	vm.Summary.Guest.ToolsStatus = tools
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "guest", Val: vm.Guest}})
}

// runTask runs a lab task at once, or, with a slow fault, later in the background as
// vCenter does, holding the VM's lock while it runs.
func (l *Lab) runTask(vm *LabVM, task *simulator.Task) types.ManagedObjectReference {
	l.mu.Lock()
	slow := vm.faults.SlowMs
	if hf := l.hostFaults[vm.hostName()]; hf != nil && hf.SlowMs > slow {
		slow = hf.SlowMs
	}
	l.mu.Unlock()
	if slow <= 0 {
		return task.Run()
	}
	go func() {
		time.Sleep(time.Duration(slow) * time.Millisecond)
		simulator.Map.WithLock(vm, func() { task.Run() })
	}()
	return task.Self
}

func (vm *LabVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return vm.lab.createSnapshot(vm, req)
	})
	return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: vm.lab.runTask(vm, task)}}
}

func (vm *LabVM) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "removeAllSnapshots", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if len(vm.snaps) == 0 {
			return nil, nil
		}
		return nil, vm.lab.removeSnapshot(vm.snaps[0], true)
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: vm.lab.runTask(vm, task)}}
}

func (vm *LabVM) ConsolidateVMDisksTask(ctx *simulator.Context, req *types.ConsolidateVMDisks_Task) soap.HasFault {
	vm.lab.mu.Lock()
	busy := vm.removing > 0
	vm.lab.mu.Unlock()
	if busy {
		// Consolidating while a snapshot removal still merges its delta: the VM is busy.
		return &methods.ConsolidateVMDisks_TaskBody{Fault_: simulator.Fault(
			fmt.Sprintf("VM %s: a snapshot removal is in progress", vm.Name), &types.TaskInProgress{})}
	}
	task := simulator.CreateTask(vm, "consolidateVMDisks", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		l := vm.lab
		l.mu.Lock()
		defer l.mu.Unlock()
		ok := l.consolidate(vm)
		l.syncDevices(vm)
		if !ok {
			return nil, &types.FileLocked{}
		}
		return nil, nil
	})
	return &methods.ConsolidateVMDisks_TaskBody{Res: &types.ConsolidateVMDisks_TaskResponse{Returnval: vm.lab.runTask(vm, task)}}
}

func (vm *LabVM) RevertToCurrentSnapshotTask(req *types.RevertToCurrentSnapshot_Task) soap.HasFault {
	return &methods.RevertToCurrentSnapshot_TaskBody{Fault_: simulator.Fault("revert is not simulated by the lab", &types.NotSupported{})}
}

func (s *LabSnapshot) RevertToSnapshotTask(req *types.RevertToSnapshot_Task) soap.HasFault {
	return &methods.RevertToSnapshot_TaskBody{Fault_: simulator.Fault("revert is not simulated by the lab", &types.NotSupported{})}
}

func (s *LabSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	l := s.lab
	l.mu.Lock()
	st := l.snaps[s.Self]
	l.mu.Unlock()
	if st == nil {
		return &methods.RemoveSnapshot_TaskBody{Fault_: simulator.Fault("", &types.ManagedObjectNotFound{Obj: s.Self})}
	}
	vm := st.VM
	// The task's entity is the VM, as in vSphere (a snapshot is not a ManagedEntity).
	task := simulator.CreateTask(vm, "removeSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		var fault types.BaseMethodFault
		simulator.Map.WithLock(vm, func() { fault = l.removeSnapshot(st, req.RemoveChildren) })
		return nil, fault
	})
	l.mu.Lock()
	slow := vm.faults.SlowMs
	if hf := l.hostFaults[vm.hostName()]; hf != nil && hf.SlowMs > slow {
		slow = hf.SlowMs
	}
	l.mu.Unlock()
	ref := task.Self
	if slow > 0 {
		l.mu.Lock()
		vm.removing++
		l.mu.Unlock()
		go func() {
			time.Sleep(time.Duration(slow) * time.Millisecond)
			task.Run()
			l.mu.Lock()
			vm.removing--
			l.mu.Unlock()
		}()
	} else {
		ref = task.Run()
	}
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: ref}}
}

func (vm *LabVM) PowerOnVMTask(ctx *simulator.Context, req *types.PowerOnVM_Task) soap.HasFault {
	res := vm.VirtualMachine.PowerOnVMTask(ctx, req)
	vm.syncGuest()
	return res
}

func (vm *LabVM) PowerOffVMTask(ctx *simulator.Context, req *types.PowerOffVM_Task) soap.HasFault {
	res := vm.VirtualMachine.PowerOffVMTask(ctx, req)
	vm.syncGuest()
	return res
}

func (vm *LabVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	l := vm.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	body := &methods.QueryChangedDiskAreasBody{}
	var d *VDisk
	for _, x := range vm.disks {
		if x.Key == req.DeviceKey {
			d = x
		}
	}
	if d == nil {
		body.Fault_ = simulator.Fault(fmt.Sprintf("VM %s has no disk with key %d", vm.Name, req.DeviceKey), &types.InvalidArgument{InvalidProperty: "deviceKey"})
		return body
	}
	top, asOf := d.Top, d.changeID()
	if req.Snapshot != nil {
		st := l.snaps[*req.Snapshot]
		if st == nil || st.VM != vm {
			body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: *req.Snapshot})
			return body
		}
		sd := st.Disks[d.Key]
		if sd == nil { // an independent disk: the snapshot does not cover it
			body.Fault_ = simulator.Fault(fmt.Sprintf("disk %d of VM %s is not part of snapshot %s", d.Key, vm.Name, st.Tree.Name),
				&types.FileFault{File: d.Top.DSPath()})
			return body
		}
		top, asOf = sd.Extent, sd.ChangeID
	}
	info, fault := l.changedAreas(d, top, asOf, req.ChangeId, req.StartOffset)
	if fault != nil {
		msg := fmt.Sprintf("QueryChangedDiskAreas on disk %d of VM %s: change id %q is not valid", d.Key, vm.Name, req.ChangeId)
		if d.cbt == nil {
			msg = fmt.Sprintf("changed block tracking is not enabled on VM %s", vm.Name)
		}
		body.Fault_ = simulator.Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

// ReconfigVMTask adds hot-add/detach of existing disk files and CBT switching to the
// stock reconfiguration, which handles everything else.
func (vm *LabVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "reconfigVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, vm.reconfigure(ctx, req)
	})
	// slow_ms delays reconfigurations (hot-add and detach included) as it delays snapshot tasks.
	return &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: vm.lab.runTask(vm, task)}}
}

func (vm *LabVM) reconfigure(ctx *simulator.Context, req *types.ReconfigVM_Task) types.BaseMethodFault {
	l := vm.lab
	spec := req.Spec
	var rest []types.BaseVirtualDeviceConfigSpec
	var attach, detach []*types.VirtualDeviceConfigSpec
	grow := map[*VDisk]int64{}
	modes := map[*VDisk]string{}
	l.mu.Lock()
	for _, c := range spec.DeviceChange {
		dc := c.GetVirtualDeviceConfigSpec()
		disk, isDisk := dc.Device.(*types.VirtualDisk)
		if !isDisk {
			rest = append(rest, c)
			continue
		}
		switch dc.Operation {
		case types.VirtualDeviceConfigSpecOperationAdd:
			if dc.FileOperation == "" {
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && l.extentByPath(b.FileName) != nil {
					if strings.HasPrefix(l.extentByPath(b.FileName).Owner.Name, "ide") {
						// HotAdd is a SCSI feature: an IDE disk is not hot-added to a backup
						// proxy (VDDK Programming Guide, "Best Practices for HotAdd Transport").
						// Refused before anything of the request is applied.
						l.mu.Unlock()
						return &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "backing.fileName"}}
					}
					attach = append(attach, dc)
					continue
				}
			}
		case types.VirtualDeviceConfigSpecOperationEdit:
			if d := vm.diskByKey(disk.Key); d != nil {
				mode, fault := vm.modeChange(d, disk)
				if fault != nil {
					l.mu.Unlock()
					return fault
				}
				if mode != "" {
					modes[d] = mode
				}
			}
			// Extending a disk: vSphere refuses it while snapshots exist.
			if d := vm.diskByKey(disk.Key); d != nil && disk.CapacityInBytes > d.Capacity {
				if len(vm.snaps) > 0 || d.Top.Parent != nil {
					l.mu.Unlock()
					return &types.InvalidState{}
				}
				grow[d] = disk.CapacityInBytes
				continue
			}
		case types.VirtualDeviceConfigSpecOperationRemove:
			if vm.hot[disk.Key] != nil {
				if dc.FileOperation == types.VirtualDeviceConfigSpecFileOperationDestroy {
					l.mu.Unlock()
					return &types.FileLocked{FileFault: types.FileFault{File: vm.hot[disk.Key].File}}
				}
				detach = append(detach, dc)
				continue
			}
			for _, d := range vm.disks {
				if d.Key == disk.Key && len(vm.snaps) > 0 {
					l.mu.Unlock()
					return &types.InvalidState{}
				}
			}
		}
		rest = append(rest, c)
	}
	l.mu.Unlock()

	cbtBefore := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	if len(rest) > 0 || !isDeviceOnly(spec) {
		stock := spec
		stock.DeviceChange = rest
		res := vm.VirtualMachine.ReconfigVMTask(ctx, &types.ReconfigVM_Task{This: vm.Self, Spec: stock})
		ref := res.(*methods.ReconfigVM_TaskBody).Res.Returnval
		if t, ok := simulator.Map.Get(ref).(*simulator.Task); ok && t.Info.Error != nil {
			return t.Info.Error.Fault
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if spec.ChangeTrackingEnabled != nil && *spec.ChangeTrackingEnabled != cbtBefore {
		l.setCBT(vm, *spec.ChangeTrackingEnabled)
	}
	l.adoptNewDisks(vm)
	for d, mode := range modes {
		d.Mode = mode
	}
	for d, capacity := range grow {
		if err := d.grow(capacity); err != nil {
			return &types.FileFault{File: d.Top.DSPath()}
		}
	}
	for _, dc := range detach {
		l.detach(vm, dc.Device.GetVirtualDevice().Key)
	}
	for _, dc := range attach {
		if fault := l.attach(vm, dc); fault != nil {
			l.syncDevices(vm)
			return fault
		}
	}
	l.syncDevices(vm)
	return nil
}

func (vm *LabVM) diskByKey(key int32) *VDisk {
	for _, d := range vm.disks {
		if d.Key == key {
			return d
		}
	}
	return nil
}

// grow extends a base disk (no snapshot) to capacity bytes; the new area reads zeros.
func (d *VDisk) grow(capacity int64) error {
	e := d.Top
	if err := os.Truncate(e.dataPath(), capacity); err != nil {
		return err
	}
	e.grains = append(e.grains, make([]bool, int((capacity+grainSize-1)/grainSize)-len(e.grains))...)
	e.Capacity, d.Capacity = capacity, capacity
	for _, dev := range d.VM.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == d.Key {
			disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
		}
	}
	return e.writeDescriptor(d.Adapter)
}

func isDeviceOnly(spec types.VirtualMachineConfigSpec) bool {
	spec.DeviceChange = nil
	spec.ChangeTrackingEnabled = nil
	return fmt.Sprintf("%+v", spec) == fmt.Sprintf("%+v", types.VirtualMachineConfigSpec{})
}

func (l *Lab) extentByPath(dsPath string) *Extent {
	for _, vm := range l.vms {
		for _, d := range vm.disks {
			for e := d.Top; e != nil; e = e.Parent {
				if e.DSPath() == dsPath {
					return e
				}
			}
		}
	}
	return nil
}

// attach hot-adds an existing disk file to vm. The agent sees it as a read-only raw
// image at STATE/agents/<vm>/devices/<uuid>, named after the backing's uuid that
// its own configuration shows.
func (l *Lab) attach(vm *LabVM, dc *types.VirtualDeviceConfigSpec) types.BaseMethodFault {
	disk := dc.Device.(*types.VirtualDisk)
	b := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	e := l.extentByPath(b.FileName)
	if owner := e.Owner.VM; !e.Frozen && owner != vm && owner.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		return &types.FileLocked{FileFault: types.FileFault{File: b.FileName}}
	}
	if !vm.canDecrypt(e.crypt) {
		// An unencrypted VM cannot have encrypted disks (vSphere VM Encryption).
		return &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "backing.keyId"}}
	}
	for _, a := range vm.hot {
		if a.extent == e {
			return &types.FileLocked{FileFault: types.FileFault{File: b.FileName}}
		}
	}
	rw := writable(b.DiskMode)
	if rw && (e.Frozen || e.Owner.Top != e || e.Attached > 0) {
		// A snapshot's frozen file, a chain's parent or a disk another agent holds is
		// not opened for writing.
		return &types.FileLocked{FileFault: types.FileFault{File: b.FileName}}
	}
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	ctrl, _ := devices.FindByKey(disk.ControllerKey).(types.BaseVirtualController)
	if ctrl == nil {
		c, err := devices.FindDiskController("scsi")
		if err != nil {
			return &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "controllerKey"}}
		}
		ctrl = c
	}
	unit := disk.UnitNumber
	if unit == nil || unitTaken(devices, ctrl, *unit) {
		if unit != nil {
			return &types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: "unitNumber"}}
		}
		for u := int32(0); u < 64; u++ {
			if u == 7 && isSCSI(ctrl) {
				continue
			}
			if !unitTaken(devices, ctrl, u) {
				unit = &u
				break
			}
		}
	}
	key := devices.NewKey()
	if key < 0 {
		key = -key
	}
	for devices.FindByKey(key) != nil {
		key++
	}
	dev := &types.VirtualDisk{
		VirtualDevice: types.VirtualDevice{
			Key: key, ControllerKey: ctrl.GetVirtualController().Key, UnitNumber: unit,
			Backing:    l.backingFor(e, ""),
			DeviceInfo: &types.Description{Label: fmt.Sprintf("Hard disk %d", len(vm.hot)+len(vm.disks)+1), Summary: fmt.Sprintf("%d KB", e.Capacity/1024)},
		},
		CapacityInKB:    e.Capacity / 1024,
		CapacityInBytes: e.Capacity,
	}
	if b.DiskMode != "" {
		dev.Backing.(*types.VirtualDiskFlatVer2BackingInfo).DiskMode = b.DiskMode
	}
	dir := filepath.Join(l.state, "agents", vm.Name, "devices")
	if err := os.MkdirAll(dir, 0755); err != nil {
		return &types.FileFault{File: dir}
	}
	path := filepath.Join(dir, e.UUID)
	mode := os.FileMode(0444)
	if rw {
		mode = 0644
	}
	if err := e.materialize(path, mode); err != nil {
		return &types.FileFault{File: path}
	}
	ctrl.GetVirtualController().Device = append(ctrl.GetVirtualController().Device, key)
	vm.Config.Hardware.Device = append(vm.Config.Hardware.Device, dev)
	e.Attached++
	a := &Attachment{Agent: vm.Name, Host: vm.hostName(), Key: key, File: e.DSPath(), UUID: e.UUID, Device: path, Datastore: e.Datastore, Writable: rw, extent: e}
	vm.hot[key] = a
	l.counters.attach(a.Agent, a.Host, a.Datastore, 1)
	return nil
}

// detach removes a hot-added disk without touching the file.
func (l *Lab) detach(vm *LabVM, key int32) {
	a := vm.hot[key]
	delete(vm.hot, key)
	a.extent.Attached--
	if a.Writable {
		// What the agent wrote reaches the disk when it lets go of it.
		if _, err := persist(a.Device, a.extent); err != nil {
			fmt.Fprintf(os.Stderr, "lab: writing %s back into %s: %v\n", a.Device, a.File, err)
		}
		if hf := l.hostFaults[a.Host]; hf != nil && hf.CorruptRestore {
			corrupt(a.extent)
		}
	}
	_ = os.Remove(a.Device)
	var kept []types.BaseVirtualDevice
	for _, d := range vm.Config.Hardware.Device {
		if d.GetVirtualDevice().Key == key {
			continue
		}
		if c, ok := d.(types.BaseVirtualController); ok {
			removeKey(&c.GetVirtualController().Device, key)
		}
		kept = append(kept, d)
	}
	vm.Config.Hardware.Device = kept
	l.counters.attach(a.Agent, a.Host, a.Datastore, -1)
}

// corrupt flips the first byte of the disk's second grain (the fault corrupt_restore:
// a restore drill must notice a restored disk that differs from its backup).
func corrupt(e *Extent) {
	if e.Capacity <= grainSize {
		return
	}
	b := make([]byte, 1)
	if e.readAt(b, grainSize) == nil {
		b[0] ^= 0xff
		_ = e.writeAt(b, grainSize)
	}
}

func removeKey(keys *[]int32, key int32) {
	var kept []int32
	for _, k := range *keys {
		if k != key {
			kept = append(kept, k)
		}
	}
	*keys = kept
}

func unitTaken(devices object.VirtualDeviceList, ctrl types.BaseVirtualController, unit int32) bool {
	for _, d := range devices {
		v := d.GetVirtualDevice()
		if v.ControllerKey == ctrl.GetVirtualController().Key && v.UnitNumber != nil && *v.UnitNumber == unit {
			return true
		}
	}
	return false
}

func isSCSI(c types.BaseVirtualController) bool {
	_, ok := c.(types.BaseVirtualSCSIController)
	return ok
}

// adoptNewDisks gives lab extents to disks the stock code created (fileOperation create).
func (l *Lab) adoptNewDisks(vm *LabVM) {
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	known := map[int32]bool{}
	for _, d := range vm.disks {
		known[d.Key] = true
	}
	for k := range vm.hot {
		known[k] = true
	}
	var kept []*VDisk
	for _, d := range vm.disks {
		if devices.FindByKey(d.Key) != nil {
			kept = append(kept, d)
		}
	}
	vm.disks = kept
	for _, dev := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		disk := dev.(*types.VirtualDisk)
		if known[disk.Key] {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		if _, err := l.newBaseDisk(vm, disk, b.FileName, ""); err != nil {
			fmt.Fprintf(os.Stderr, "lab: adopting disk %d of %s: %v\n", disk.Key, vm.Name, err)
		}
	}
}
