package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// Lab holds everything the stock simulator does not know: disk chains, snapshots'
// points in time, change tracking, attachments, faults and counters. One mutex guards
// it; SOAP handlers take it after the simulator's object lock (never the other way).
type Lab struct {
	mu         sync.Mutex
	state      string
	topo       *Topology
	dc         types.ManagedObjectReference
	dsDirs     map[string]string
	dsRefs     map[string]types.ManagedObjectReference
	hostRefs   map[string]types.ManagedObjectReference
	vms        map[string]*LabVM
	agents     []AgentInfo
	snaps      map[types.ManagedObjectReference]*SnapState
	counters   *Counters
	hostFaults map[string]*Faults
	sessions   *sessionGate
}

type AgentInfo struct {
	Name string `json:"name"`
	Host string `json:"host"`
}

// VDisk is one virtual disk of a VM: a device key and a chain of files.
type VDisk struct {
	VM       *LabVM
	Key      int32
	Name     string // as a .vmx names it: scsi0:0, sata0:1, nvme0:0
	Adapter  string
	Capacity int64
	Top      *Extent
	cbt      *cbtState
	Mode     string // backing.diskMode: persistent, independent_persistent, independent_nonpersistent
	RDM      bool   // a physical-compatibility raw device mapping (diskmode.go)
}

// SnapState is the lab's side of a VirtualMachineSnapshot.
type SnapState struct {
	Ref     types.ManagedObjectReference
	VM      *LabVM
	Tree    types.VirtualMachineSnapshotTree
	Disks   map[int32]*SnapDisk
	Files   []string
	Host    string
	DSNames []string
}

type SnapDisk struct {
	Extent   *Extent
	ChangeID string
}

func newLab(state string, topo *Topology) *Lab {
	return &Lab{
		state:      state,
		topo:       topo,
		dsDirs:     map[string]string{},
		dsRefs:     map[string]types.ManagedObjectReference{},
		hostRefs:   map[string]types.ManagedObjectReference{},
		vms:        map[string]*LabVM{},
		snaps:      map[types.ManagedObjectReference]*SnapState{},
		counters:   newCounters(),
		hostFaults: map[string]*Faults{},
		sessions:   newSessionGate(),
	}
}

func (l *Lab) hostFault(name string) *Faults {
	f := l.hostFaults[name]
	if f == nil {
		f = &Faults{}
		l.hostFaults[name] = f
	}
	return f
}

func (l *Lab) findVM(name string) (*LabVM, error) {
	vm := l.vms[name]
	if vm == nil {
		return nil, fmt.Errorf("no VM named %q in the lab", name)
	}
	return vm, nil
}

// findVMDisk resolves a VM by name and one of its disks.
func (l *Lab) findVMDisk(vmName, disk string) (*LabVM, *VDisk, error) {
	vm, err := l.findVM(vmName)
	if err != nil {
		return nil, nil, err
	}
	d, err := vm.findDisk(disk)
	return vm, d, err
}

// findDisk resolves a disk by its .vmx name (scsi0:0) or its device key.
func (vm *LabVM) findDisk(name string) (*VDisk, error) {
	for _, d := range vm.disks {
		if d.Name == name || strconv.Itoa(int(d.Key)) == name {
			return d, nil
		}
	}
	var names []string
	for _, d := range vm.disks {
		names = append(names, fmt.Sprintf("%s (key %d)", d.Name, d.Key))
	}
	return nil, fmt.Errorf("VM %s has no disk %q; it has %s", vm.Name, name, strings.Join(names, ", "))
}

func (vm *LabVM) findSnapshot(name string) (*SnapState, error) {
	for _, s := range vm.snaps {
		if s.Tree.Name == name || s.Ref.Value == name {
			return s, nil
		}
	}
	return nil, fmt.Errorf("VM %s has no snapshot %q", vm.Name, name)
}

func (vm *LabVM) hostName() string {
	if vm.Runtime.Host == nil {
		return ""
	}
	if h, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem); ok {
		return h.Name
	}
	return ""
}

// backingFor describes a chain the way vSphere does: the top file, with the parent
// chain in `parent`, the file's UUID, and the disk's change id (top level only).
func (l *Lab) backingFor(e *Extent, changeID string) *types.VirtualDiskFlatVer2BackingInfo {
	ds := l.dsRefs[e.Datastore]
	b := &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: e.DSPath(), Datastore: &ds},
		DiskMode:                     string(types.VirtualDiskModePersistent),
		ThinProvisioned:              types.NewBool(true),
		EagerlyScrub:                 types.NewBool(false),
		Split:                        types.NewBool(false),
		WriteThrough:                 types.NewBool(false),
		DigestEnabled:                types.NewBool(false),
		Uuid:                         e.UUID,
		ContentId:                    fmt.Sprintf("%08x", e.CID),
		ChangeId:                     changeID,
		KeyId:                        e.crypt.id(),
	}
	if e.Parent != nil {
		b.Parent = l.backingFor(e.Parent, "")
	}
	return b
}

// syncDevices writes the chains of vm's own disks into its config.
func (l *Lab) syncDevices(vm *LabVM) {
	for _, d := range vm.disks {
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == d.Key {
				disk.Backing = l.diskBacking(d, d.Top, d.changeID())
			}
		}
	}
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "config.hardware.device", Val: vm.Config.Hardware.Device}})
	l.refreshLayout(vm)
}

// snapshotConfig copies vm's config for a snapshot, with disk devices of their own.
func (l *Lab) snapshotConfig(vm *LabVM, disks map[int32]*SnapDisk) types.VirtualMachineConfigInfo {
	cfg := *vm.Config
	hw := cfg.Hardware
	hw.Device = nil
	for _, dev := range vm.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok {
			if sd := disks[disk.Key]; sd != nil {
				c := *disk
				c.Backing = l.diskBacking(vm.diskByKey(disk.Key), sd.Extent, sd.ChangeID)
				hw.Device = append(hw.Device, &c)
				continue
			}
		}
		hw.Device = append(hw.Device, dev)
	}
	cfg.Hardware = hw
	return cfg
}

func (l *Lab) nextDeltaName(vm *LabVM, base *Extent) (string, string) {
	dir := filepath.Dir(vmHomeRel(vm))
	stem := strings.TrimSuffix(filepath.Base(rootOf(base).Rel), ".vmdk")
	for n := 1; ; n++ {
		rel := filepath.Join(dir, fmt.Sprintf("%s-%06d.vmdk", stem, n))
		if _, err := os.Stat(filepath.Join(l.dsDirs[vmHomeDS(vm)], rel)); os.IsNotExist(err) {
			return rel, filepath.Join(dir, fmt.Sprintf("%s-%06d-delta.vmdk", stem, n))
		}
	}
}

func rootOf(e *Extent) *Extent {
	for e.Parent != nil {
		e = e.Parent
	}
	return e
}

func vmHomeDS(vm *LabVM) string {
	p := vm.Config.Files.VmPathName
	return strings.TrimSuffix(strings.TrimPrefix(strings.SplitN(p, "]", 2)[0], "["), "]")
}

func vmHomeRel(vm *LabVM) string {
	parts := strings.SplitN(vm.Config.Files.VmPathName, "] ", 2)
	if len(parts) < 2 {
		return vm.Name + "/" + vm.Name + ".vmx"
	}
	return parts[1]
}

// newDelta creates the delta file that becomes the writable top above parent.
func (l *Lab) newDelta(vm *LabVM, d *VDisk, parent *Extent) (*Extent, error) {
	rel, dataRel := l.nextDeltaName(vm, parent)
	ds := vmHomeDS(vm)
	e := &Extent{Datastore: ds, DSDir: l.dsDirs[ds], Rel: rel, DataRel: dataRel, UUID: newUUID(),
		Capacity: parent.Capacity, Parent: parent, Owner: d, crypt: parent.crypt}
	return e, e.create(d.Adapter)
}

// ---- snapshots -------------------------------------------------------------------

func (l *Lab) createSnapshot(vm *LabVM, req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault) {
	l.mu.Lock()
	defer l.mu.Unlock()
	host := vm.hostName()
	if hf := l.hostFaults[host]; hf != nil && hf.RefuseSnapshots {
		return nil, &types.SnapshotDisabled{}
	}
	if vm.faults.SnapshotFail {
		return nil, &types.SnapshotFault{}
	}
	on := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
	quiesced := false
	if req.Quiesce && on {
		if !vm.toolsRunning() {
			return nil, &types.ToolsUnavailable{}
		}
		if vm.faults.QuiesceFail {
			return nil, &types.ApplicationQuiesceFault{}
		}
		quiesced = true
	}
	snap := &simulator.VirtualMachineSnapshot{}
	snap.Vm = vm.Self
	simulator.Map.Put(snap)
	st := &SnapState{Ref: snap.Self, VM: vm, Disks: map[int32]*SnapDisk{}, Host: host}
	state := types.VirtualMachinePowerStatePoweredOff
	if req.Memory && on {
		state = types.VirtualMachinePowerStatePoweredOn
	}
	vm.sid++
	st.Tree = types.VirtualMachineSnapshotTree{
		Snapshot: snap.Self, Vm: vm.Self, Name: req.Name, Description: req.Description,
		Id: vm.sid, CreateTime: time.Now(), State: state, Quiesced: quiesced,
		ReplaySupported: types.NewBool(false),
	}
	dsSet := map[string]bool{vmHomeDS(vm): true}
	var created []*Extent
	for _, d := range vm.disks {
		if d.independent() {
			// Independent disks and physical-mode RDMs are not affected by snapshots:
			// no delta, the guest keeps writing into the live file (diskmode.go).
			continue
		}
		frozen := d.Top
		delta, err := l.newDelta(vm, d, frozen)
		if err != nil {
			for _, e := range created {
				e.remove()
			}
			return nil, &types.FileFault{File: frozen.DSPath()}
		}
		created = append(created, delta)
		if d.cbt != nil {
			d.cbt.seq++
		}
		st.Disks[d.Key] = &SnapDisk{Extent: frozen, ChangeID: d.changeID()}
		frozen.freeze()
		d.Top = delta
		dsSet[frozen.Datastore] = true
	}
	home := filepath.Join(l.dsDirs[vmHomeDS(vm)], filepath.Dir(vmHomeRel(vm)))
	vmsn := filepath.Join(home, fmt.Sprintf("%s-Snapshot%d.vmsn", vm.Name, vm.sid))
	_ = os.WriteFile(vmsn, []byte("snapshot "+req.Name+"\n"), 0644)
	st.Files = append(st.Files, vmsn)
	if state == types.VirtualMachinePowerStatePoweredOn {
		vmem := filepath.Join(home, fmt.Sprintf("%s-Snapshot%d.vmem", vm.Name, vm.sid))
		_ = os.WriteFile(vmem, []byte("memory\n"), 0644)
		st.Files = append(st.Files, vmem)
	}
	for ds := range dsSet {
		st.DSNames = append(st.DSNames, ds)
	}
	sort.Strings(st.DSNames)
	snap.Config = l.snapshotConfig(vm, st.Disks)
	ls := &LabSnapshot{VirtualMachineSnapshot: *snap, lab: l}
	simulator.Map.Put(ls)
	if len(vm.snaps) > 0 {
		prev := simulator.Map.Get(vm.snaps[len(vm.snaps)-1].Ref).(*LabSnapshot)
		prev.ChildSnapshot = append(prev.ChildSnapshot, snap.Self)
	}
	vm.snaps = append(vm.snaps, st)
	l.snaps[snap.Self] = st
	l.counters.snapshotAdded(st)
	l.syncDevices(vm)
	l.syncSnapshotTree(vm)
	return snap.Self, nil
}

// syncSnapshotTree publishes vm.snapshot from the lab's linear list of snapshots.
func (l *Lab) syncSnapshotTree(vm *LabVM) {
	if len(vm.snaps) == 0 {
		vm.Snapshot = nil
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot", Val: nil}})
		return
	}
	var build func(i int) []types.VirtualMachineSnapshotTree
	build = func(i int) []types.VirtualMachineSnapshotTree {
		if i >= len(vm.snaps) {
			return nil
		}
		t := vm.snaps[i].Tree
		t.ChildSnapshotList = build(i + 1)
		return []types.VirtualMachineSnapshotTree{t}
	}
	cur := vm.snaps[len(vm.snaps)-1].Ref
	info := &types.VirtualMachineSnapshotInfo{CurrentSnapshot: &cur, RootSnapshotList: build(0)}
	vm.Snapshot = info
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot", Val: info}})
}

// removeSnapshot deletes a snapshot and, unless told to fail, merges its delta back.
func (l *Lab) removeSnapshot(st *SnapState, children bool) types.BaseMethodFault {
	l.mu.Lock()
	defer l.mu.Unlock()
	vm := st.VM
	idx := -1
	for i, s := range vm.snaps {
		if s == st {
			idx = i
		}
	}
	if idx < 0 {
		return &types.ManagedObjectNotFound{Obj: st.Ref}
	}
	var victims []*SnapState
	if children {
		for i := len(vm.snaps) - 1; i > idx; i-- {
			victims = append(victims, vm.snaps[i])
		}
	}
	victims = append(victims, st)
	for _, v := range victims {
		l.dropSnapshot(v)
	}
	if vm.faults.LeaveConsolidation {
		l.setConsolidationNeeded(vm, true)
	} else {
		l.consolidate(vm)
	}
	l.syncDevices(vm)
	l.syncSnapshotTree(vm)
	return nil
}

func (l *Lab) dropSnapshot(st *SnapState) {
	vm := st.VM
	for i, s := range vm.snaps {
		if s == st {
			vm.snaps = append(vm.snaps[:i], vm.snaps[i+1:]...)
			break
		}
	}
	for _, s := range vm.snaps {
		if obj, ok := simulator.Map.Get(s.Ref).(*LabSnapshot); ok {
			simulator.RemoveReference(&obj.ChildSnapshot, st.Ref)
		}
	}
	for _, f := range st.Files {
		_ = os.Remove(f)
	}
	delete(l.snaps, st.Ref)
	l.counters.snapshotRemoved(st)
	simulator.Map.Remove(st.Ref)
}

func (l *Lab) setConsolidationNeeded(vm *LabVM, v bool) {
	vm.Runtime.ConsolidationNeeded = types.NewBool(v)
	vm.Summary.Runtime.ConsolidationNeeded = types.NewBool(v)
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "runtime.consolidationNeeded", Val: v},
		{Name: "summary.runtime.consolidationNeeded", Val: v},
	})
}

// consolidate merges every delta whose parent no snapshot needs any more into that
// parent, as RemoveSnapshot and ConsolidateVMDisks do. A file that is hot-added to an
// agent is locked, so its merge is skipped and the VM is left needing consolidation.
func (l *Lab) consolidate(vm *LabVM) bool {
	needed := map[*Extent]bool{}
	for _, s := range vm.snaps {
		for _, sd := range s.Disks {
			needed[sd.Extent] = true
		}
	}
	clean := true
	for _, d := range vm.disks {
		var chain []*Extent
		for e := d.Top; e != nil; e = e.Parent {
			chain = append([]*Extent{e}, chain...)
		}
		for i := len(chain) - 2; i >= 0; i-- {
			p, c := chain[i], chain[i+1]
			if needed[p] || p.Owner != d || p.Clones > 0 {
				continue
			}
			if p.Attached > 0 || c.Attached > 0 {
				clean = false
				continue
			}
			if err := c.mergeInto(p); err != nil {
				clean = false
				continue
			}
			// p now holds c's point in time: whatever referred to c refers to p.
			for _, s := range vm.snaps {
				for _, sd := range s.Disks {
					if sd.Extent == c {
						sd.Extent = p
					}
				}
			}
			if i+2 < len(chain) {
				chain[i+2].Parent = p
				_ = chain[i+2].writeDescriptor(d.Adapter)
			}
			if d.Top == c {
				d.Top = p
			}
			wasFrozen := c.Frozen || needed[c]
			c.remove()
			chain = append(chain[:i+1], chain[i+2:]...)
			if wasFrozen {
				p.freeze()
				needed[p] = true
			} else {
				p.unfreeze()
			}
		}
	}
	for _, s := range vm.snaps {
		obj, ok := simulator.Map.Get(s.Ref).(*LabSnapshot)
		if ok {
			obj.Config = l.snapshotConfig(vm, s.Disks)
		}
	}
	l.setConsolidationNeeded(vm, !clean)
	return clean
}

// ---- guest I/O ---------------------------------------------------------------

func (l *Lab) guestWrite(vmName, disk string, off, length int64, seed uint64) (map[string]interface{}, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	vm, d, err := l.findVMDisk(vmName, disk)
	if err != nil {
		return nil, err
	}
	if length <= 0 || off < 0 || off+length > d.Capacity {
		return nil, fmt.Errorf("write %d+%d is outside disk %s of VM %s (%d bytes)", off, length, d.Name, vm.Name, d.Capacity)
	}
	if err := d.Top.writeAt(pattern(seed, off, length), off); err != nil {
		return nil, err
	}
	d.recordWrite(off, length)
	return map[string]interface{}{"vm": vm.Name, "disk": d.Name, "key": d.Key, "offset": off, "length": length,
		"seed": seed, "file": d.Top.DSPath()}, nil
}

func (l *Lab) diskImage(vmName, disk, snapshot, output string) (map[string]interface{}, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	vm, d, err := l.findVMDisk(vmName, disk)
	if err != nil {
		return nil, err
	}
	e := d.Top
	if snapshot != "" {
		s, err := vm.findSnapshot(snapshot)
		if err != nil {
			return nil, err
		}
		if sd := s.Disks[d.Key]; sd != nil {
			e = sd.Extent
		} // else an independent disk: the snapshot does not cover it, it is the live file
	}
	if !filepath.IsAbs(output) {
		return nil, fmt.Errorf("output path must be absolute: %s", output)
	}
	if err := e.materialize(output, 0644); err != nil {
		return nil, fmt.Errorf("writing %s: %v", output, err)
	}
	return map[string]interface{}{"vm": vm.Name, "disk": d.Name, "key": d.Key, "output": output,
		"size": d.Capacity, "file": e.DSPath()}, nil
}
