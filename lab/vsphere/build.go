package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// build creates the topology through the vSphere API, over the lab's own TLS, as any
// client would; then it gives every VM its disk contents.
func (l *Lab) build(ctx context.Context, c *vim25.Client) error {
	hosts := map[string]*object.HostSystem{}
	pools := map[string]*object.ResourcePool{}
	var folders *object.DatacenterFolders
	if l.topo.Mode == "esxi" {
		name := l.topo.StandaloneHosts[0]
		h := simulator.Map.Get(esx.HostSystem.Reference()).(*simulator.HostSystem)
		h.Name = name
		h.Summary.Config.Name = name
		host := object.NewHostSystem(c, h.Self)
		hosts[name] = host
		dc := object.NewDatacenter(c, esx.Datacenter.Reference())
		l.dc = dc.Reference()
		var err error
		if folders, err = dc.Folders(ctx); err != nil {
			return err
		}
		if pools[name], err = host.ResourcePool(ctx); err != nil {
			return err
		}
	} else {
		dc, err := object.NewRootFolder(c).CreateDatacenter(ctx, l.topo.Datacenter)
		if err != nil {
			return err
		}
		l.dc = dc.Reference()
		if folders, err = dc.Folders(ctx); err != nil {
			return err
		}
		for _, cs := range l.topo.Clusters {
			cluster, err := folders.HostFolder.CreateCluster(ctx, cs.Name, types.ClusterConfigSpecEx{})
			if err != nil {
				return err
			}
			pool, err := cluster.ResourcePool(ctx)
			if err != nil {
				return err
			}
			for _, name := range cs.Hosts {
				task, err := cluster.AddHost(ctx, types.HostConnectSpec{HostName: name}, true, nil, nil)
				if err != nil {
					return err
				}
				info, err := task.WaitForResult(ctx, nil)
				if err != nil {
					return err
				}
				hosts[name] = object.NewHostSystem(c, info.Result.(types.ManagedObjectReference))
				pools[name] = pool
			}
		}
		for _, name := range l.topo.StandaloneHosts {
			task, err := folders.HostFolder.AddStandaloneHost(ctx, types.HostConnectSpec{HostName: name}, true, nil, nil)
			if err != nil {
				return err
			}
			info, err := task.WaitForResult(ctx, nil)
			if err != nil {
				return err
			}
			host := object.NewHostSystem(c, info.Result.(types.ManagedObjectReference))
			hosts[name] = host
			if pools[name], err = host.ResourcePool(ctx); err != nil {
				return err
			}
		}
	}
	for _, name := range l.topo.hosts() {
		l.hostRefs[name] = hosts[name].Reference()
		dss, err := hosts[name].ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return err
		}
		for _, ds := range append([]string{localDatastore(name)}, l.topo.SharedDatastores...) {
			// The stock simulator makes a local datastore's moref its path: keep XML's
			// specials out of it (a datastore may be named "nas & co"; a real moref is
			// "datastore-NN").
			dir := filepath.Join(l.state, "datastores", dirName(ds))
			if err := os.MkdirAll(dir, 0755); err != nil {
				return err
			}
			obj, err := dss.CreateLocalDatastore(ctx, ds, dir)
			if err != nil {
				return fmt.Errorf("datastore %s on %s: %v", ds, name, err)
			}
			l.dsDirs[ds] = dir
			l.dsRefs[ds] = obj.Reference()
			// The stock simulator calls a local datastore "OTHER"; an ESXi host's
			// datastores are VMFS, which is what CBT's "*" query needs (cbt.go).
			if x, ok := simulator.Map.Get(obj.Reference()).(*simulator.Datastore); ok {
				x.Summary.Type = string(types.HostFileSystemVolumeFileSystemTypeVMFS)
			}
		}
	}
	// Datastore types (summary.type): vSAN and vVols keep no flat file (sessionGate.flatless).
	for name, kind := range l.topo.DatastoreTypes {
		ds := simulator.Map.Get(l.dsRefs[name]).(*simulator.Datastore)
		ds.Summary.Type = map[string]string{"vsan": "vsan", "vvol": "VVOL", "VMFS": "VMFS", "NFS": "NFS"}[kind]
	}
	types_ := l.topo.DatastoreTypes
	l.sessions.flatless = func(ds string) bool { k := types_[ds]; return k == "vsan" || k == "vvol" }
	// The stock simulator records only the first host's mount of a shared datastore.
	for _, name := range l.topo.SharedDatastores {
		ds := simulator.Map.Get(l.dsRefs[name]).(*simulator.Datastore)
		for _, h := range l.topo.hosts() {
			mounted := false
			for _, m := range ds.Host {
				mounted = mounted || m.Key == l.hostRefs[h]
			}
			if !mounted {
				ds.Host = append(ds.Host, types.DatastoreHostMount{Key: l.hostRefs[h], MountInfo: types.HostMountInfo{
					AccessMode: string(types.HostMountModeReadWrite), Mounted: types.NewBool(true), Accessible: types.NewBool(true)}})
			}
		}
	}
	if err := l.addPortGroups(ctx, hosts); err != nil {
		return err
	}
	vmFolders := map[string]*object.Folder{"": folders.VmFolder}
	for _, spec := range l.topo.VMs {
		folder, err := vmFolder(ctx, vmFolders, spec.Folder)
		if err != nil {
			return fmt.Errorf("VM %s: folder %s: %v", spec.key(), spec.Folder, err)
		}
		if err := l.createVM(ctx, c, folder, pools[spec.Host], hosts[spec.Host], spec, false); err != nil {
			return fmt.Errorf("VM %s: %v", spec.key(), err)
		}
	}
	for _, name := range l.topo.hosts() {
		for i := 0; i < *l.topo.AgentsPerHost; i++ {
			agent := "vmbackup-agent-" + name
			if i > 0 {
				agent = fmt.Sprintf("%s-%d", agent, i+1)
			}
			spec := VMSpec{Name: agent, Host: name, Datastore: localDatastore(name), Power: "on",
				Disks: []DiskSpec{{Bus: "scsi", SizeMiB: l.topo.AgentDiskMiB, Datastore: localDatastore(name)}}}
			if err := l.createVM(ctx, c, folders.VmFolder, pools[name], hosts[name], spec, true); err != nil {
				return fmt.Errorf("agent %s: %v", agent, err)
			}
			l.agents = append(l.agents, AgentInfo{Name: agent, Host: name})
		}
	}
	for _, f := range vmFolders { // the datacenter's VM folder and the topology's folders
		l.installVMFolder(f.Reference())
	}
	l.applyCapacities()
	for name, f := range l.topo.Faults.VMs {
		vm, err := l.findVM(name)
		if err != nil {
			return fmt.Errorf("topology faults: %v", err)
		}
		vm.faults = f
		vm.syncGuest()
	}
	for name, f := range l.topo.Faults.Hosts {
		if _, ok := hosts[name]; !ok {
			return fmt.Errorf("topology faults: no host named %q", name)
		}
		x := f
		l.hostFaults[name] = &x
	}
	return nil
}

var busKeys = map[string]struct{ ctrl, disk int32 }{
	"scsi": {1000, 2000},
	"sata": {15000, 16000},
	"nvme": {31000, 32000},
	"ide":  {200, 3000}, // the simulator's own IDE 0 (every VM has IDE 0 and 1, keys 200 and 201)
}

func newController(bus string) types.BaseVirtualDevice {
	key := busKeys[bus].ctrl
	switch bus {
	case "sata":
		return &types.VirtualAHCIController{VirtualSATAController: types.VirtualSATAController{
			VirtualController: types.VirtualController{VirtualDevice: types.VirtualDevice{Key: key}}}}
	case "nvme":
		return &types.VirtualNVMEController{VirtualController: types.VirtualController{VirtualDevice: types.VirtualDevice{Key: key}}}
	}
	return &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
		VirtualController: types.VirtualController{VirtualDevice: types.VirtualDevice{Key: key}},
		SharedBus:         types.VirtualSCSISharingNoSharing}}
}

func (l *Lab) createVM(ctx context.Context, c *vim25.Client, folder *object.Folder, pool *object.ResourcePool,
	host *object.HostSystem, spec VMSpec, agent bool) error {
	config := types.VirtualMachineConfigSpec{
		Name: spec.Name, GuestId: string(types.VirtualMachineGuestOsIdentifierOtherLinux64Guest),
		NumCPUs: 2, MemoryMB: 2048,
		Files: &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", spec.Datastore)},
	}
	if agent {
		config.ExtraConfig = []types.BaseOptionValue{&types.OptionValue{Key: "vmbackup.agent", Value: "true"}}
	}
	ctrls := map[string]bool{}
	units := map[string]int32{}
	specOf := map[int32]DiskSpec{}
	for i, d := range spec.Disks {
		if !ctrls[d.Bus] && d.Bus != "ide" {
			ctrls[d.Bus] = true
			config.DeviceChange = append(config.DeviceChange, &types.VirtualDeviceConfigSpec{
				Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: newController(d.Bus)})
		}
		unit := units[d.Bus]
		if d.Bus == "scsi" && unit == 7 {
			unit++
		}
		units[d.Bus] = unit + 1
		file := fmt.Sprintf("[%s] %s/%s.vmdk", d.Datastore, spec.Name, spec.Name)
		if i > 0 {
			file = fmt.Sprintf("[%s] %s/%s_%d.vmdk", d.Datastore, spec.Name, spec.Name, i)
		}
		if d.Datastore != spec.Datastore {
			_ = os.MkdirAll(filepath.Join(l.dsDirs[d.Datastore], spec.Name), 0755)
		}
		u := unit
		specOf[busKeys[d.Bus].disk+unit] = d
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key: busKeys[d.Bus].disk + unit, ControllerKey: busKeys[d.Bus].ctrl, UnitNumber: &u,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: file},
					DiskMode:                     string(types.VirtualDiskModePersistent), ThinProvisioned: types.NewBool(true)},
			},
			CapacityInKB: d.SizeMiB * 1024, CapacityInBytes: d.SizeMiB << 20,
		}
		config.DeviceChange = append(config.DeviceChange, &types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd, FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate, Device: disk})
	}
	task, err := folder.CreateVM(ctx, config, pool, host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	ref := info.Result.(types.ManagedObjectReference)
	tools := spec.Tools == nil || *spec.Tools
	vm := l.adoptAs(simulator.Map.Get(ref).(*simulator.VirtualMachine), agent, tools, spec.key())
	// An encrypted VM's disks are encrypted; an encrypted agent's own system disk stays
	// plain (an encrypted VM may have unencrypted disks): only its configuration says
	// that it holds the provider's keys.
	var key *cryptoKey
	if spec.Encrypted || (agent && contains(l.topo.EncryptedAgentHosts, spec.Host)) {
		key = newCryptoKey(spec.Name)
		vm.Config.KeyId = key.id()
	}
	if !agent {
		vm.crypt = key
	}
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		d, err := l.newBaseDisk(vm, disk, b.FileName, vm.Name+"/"+b.FileName)
		if err != nil {
			return err
		}
		if ds, ok := specOf[disk.Key]; ok {
			d.Mode, d.RDM = ds.Mode, ds.RDM == "physical"
		}
	}
	vm.crypt = key
	if err := l.writeNvram(vm); err != nil {
		return err
	}
	if spec.CBT {
		l.setCBT(vm, true)
	}
	l.syncDevices(vm)
	if spec.Power == "on" {
		task, err := object.NewVirtualMachine(c, ref).PowerOn(ctx)
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return err
		}
	}
	vm.syncGuest()
	return nil
}

// adopt replaces the simulator's VirtualMachine by a LabVM with the same reference,
// named by its name in the lab's commands.
func (l *Lab) adopt(obj *simulator.VirtualMachine, agent, tools bool) *LabVM {
	return l.adoptAs(obj, agent, tools, obj.Name)
}

// adoptAs is adopt with the lab's key of the VM ("<folder>/<name>" for a VM in a
// topology folder, so that two VMs of one name are both the lab's).
func (l *Lab) adoptAs(obj *simulator.VirtualMachine, agent, tools bool, key string) *LabVM {
	vm := &LabVM{VirtualMachine: *obj, lab: l, key: key, agent: agent, tools: tools, hot: map[int32]*Attachment{}}
	simulator.Map.Put(vm)
	l.vms[key] = vm
	return vm
}

// vmFolder is the VM folder at path ("a/b") under the datacenter's (known[""]),
// made if missing; known caches every folder made.
func vmFolder(ctx context.Context, known map[string]*object.Folder, path string) (*object.Folder, error) {
	if f, ok := known[path]; ok {
		return f, nil
	}
	parent, name := "", path
	if i := strings.LastIndex(path, "/"); i >= 0 {
		parent, name = path[:i], path[i+1:]
	}
	p, err := vmFolder(ctx, known, parent)
	if err != nil {
		return nil, err
	}
	f, err := p.CreateFolder(ctx, name)
	if err != nil {
		return nil, err
	}
	known[path] = f
	return f, nil
}

// dirName is a datastore's directory name: its name with every character outside
// [A-Za-z0-9._-] replaced by "_".
func dirName(ds string) string {
	return strings.Map(func(r rune) rune {
		if (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, ds)
}
