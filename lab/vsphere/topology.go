package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Topology is the lab's inventory, read from a small JSON file (see docs/lab.md).
type Topology struct {
	Mode             string        `json:"mode"` // "vcenter" (default) or "esxi"
	Datacenter       string        `json:"datacenter"`
	Clusters         []ClusterSpec `json:"clusters"`
	StandaloneHosts  []string      `json:"standalone_hosts"`
	SharedDatastores []string      `json:"shared_datastores"`
	// DatastoreTypes: a datastore's summary.type other than VMFS. "vsan" (or "vvol")
	// has no flat file: /folder serves no *-flat.vmdk of it, as on vSAN and vVols.
	DatastoreTypes map[string]string `json:"datastore_types"`
	// DatastoreCapacityMiB: a datastore's summary.capacity in MiB; its freeSpace is
	// that less what its files allocate (capacity.go). Others: the stock simulator's
	// (the free space of the file system holding the lab's state).
	DatastoreCapacityMiB map[string]int64 `json:"datastore_capacity_mib"`
	AgentsPerHost        *int             `json:"agents_per_host"`
	AgentDiskMiB         int64            `json:"agent_disk_mib"`
	VMs                  []VMSpec         `json:"vms"`
	User                 string           `json:"user"`
	CBTPageBytes         int64            `json:"cbt_page_bytes"`
	CBTMaxAreas          int              `json:"cbt_max_areas"`
	Faults               FaultsSpec       `json:"faults"`
	// Hosts whose agent VMs are encrypted (they hold the lab key provider's keys, so
	// they can hot-add an encrypted VM's disks and read plaintext; crypt.go).
	EncryptedAgentHosts []string `json:"encrypted_agent_hosts"`
	// TLSNames: the names (DNS names or IP addresses) the server certificate carries.
	// Default: 127.0.0.1, ::1, localhost and vcenter.lab.local. Names that leave out
	// 127.0.0.1 make a certificate that does not name the address clients connect
	// to, as an ESXi host's self-signed one reached by its IP address.
	TLSNames []string `json:"tls_names"`
	// PortGroups: the standard port groups every host has on its standard switch
	// vSwitch0 besides the simulator's "VM Network" (network.go). Absent: one,
	// "Isolated" (a network with no uplink, where restore drills go); [] for none.
	PortGroups []string `json:"port_groups"`
}

type ClusterSpec struct {
	Name  string   `json:"name"`
	Hosts []string `json:"hosts"`
}

type VMSpec struct {
	Name      string     `json:"name"`
	Host      string     `json:"host"`
	Datastore string     `json:"datastore"`
	Power     string     `json:"power"` // "on" (default) or "off"
	Tools     *bool      `json:"tools"` // VMware Tools running (default true when powered on)
	CBT       bool       `json:"cbt"`
	Encrypted bool       `json:"encrypted"` // VM Encryption: config.keyId, each disk's backing.keyId
	Disks     []DiskSpec `json:"disks"`
	// Folder: the VM folder under the datacenter's ("prod" or "prod/web"; made if
	// missing). vSphere keeps a VM's name unique only within its folder, so two VMs
	// of one name may be in two folders; the lab's commands then name such a VM
	// "<folder>/<name>" (its key), any other VM by its name.
	Folder string `json:"folder"`
}

// key is how the lab's commands name the VM: its name, or "<folder>/<name>" when
// it is in a folder of the topology's.
func (vm *VMSpec) key() string {
	if vm.Folder == "" {
		return vm.Name
	}
	return vm.Folder + "/" + vm.Name
}

type DiskSpec struct {
	Bus       string `json:"bus"` // scsi (default), sata, nvme, ide (IDE 0: two disks at most)
	SizeMiB   int64  `json:"size_mib"`
	Datastore string `json:"datastore"`
	Mode      string `json:"mode"` // persistent (default), independent_persistent, independent_nonpersistent
	RDM       string `json:"rdm"`  // "physical": a physical-compatibility raw device mapping
}

type FaultsSpec struct {
	VMs   map[string]Faults `json:"vms"`
	Hosts map[string]Faults `json:"hosts"`
}

func (t *Topology) hosts() []string {
	var out []string
	for _, c := range t.Clusters {
		out = append(out, c.Hosts...)
	}
	return append(out, t.StandaloneHosts...)
}

func localDatastore(host string) string { return host + "-local" }

func defaultTopology() *Topology {
	return &Topology{
		Mode:             "vcenter",
		Datacenter:       "dc1",
		Clusters:         []ClusterSpec{{Name: "cluster1", Hosts: []string{"esx1", "esx2"}}},
		SharedDatastores: []string{"shared1"},
		VMs: []VMSpec{
			{Name: "web01", Host: "esx1", Datastore: "esx1-local", Disks: []DiskSpec{{Bus: "scsi", SizeMiB: 64}, {Bus: "scsi", SizeMiB: 32}}},
			{Name: "db01", Host: "esx2", Datastore: "shared1", Disks: []DiskSpec{{Bus: "sata", SizeMiB: 64}}},
			{Name: "app01", Host: "esx2", Datastore: "esx2-local", Disks: []DiskSpec{{Bus: "nvme", SizeMiB: 32}}},
		},
	}
}

func loadTopology(path string) (*Topology, error) {
	t := defaultTopology()
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("reading topology %s: %v", path, err)
		}
		t = &Topology{}
		if err := json.Unmarshal(data, t); err != nil {
			return nil, fmt.Errorf("parsing topology %s: %v", path, err)
		}
	}
	return t, t.normalize()
}

func (t *Topology) normalize() error {
	if t.Mode == "" {
		t.Mode = "vcenter"
	}
	if t.Mode != "vcenter" && t.Mode != "esxi" {
		return fmt.Errorf("topology: mode must be vcenter or esxi, not %q", t.Mode)
	}
	if t.Datacenter == "" {
		t.Datacenter = "dc1"
	}
	if t.User == "" {
		if t.Mode == "esxi" {
			t.User = "root"
		} else {
			t.User = "administrator@vsphere.local"
		}
	}
	if t.AgentsPerHost == nil {
		one := 1
		t.AgentsPerHost = &one
	}
	if t.AgentDiskMiB == 0 {
		t.AgentDiskMiB = 16
	}
	if t.CBTPageBytes == 0 {
		t.CBTPageBytes = 16 << 20
	}
	if t.CBTMaxAreas == 0 {
		t.CBTMaxAreas = 256
	}
	for _, n := range t.TLSNames {
		if n == "" {
			return fmt.Errorf("topology: tls_names has an empty name")
		}
	}
	if t.PortGroups == nil {
		t.PortGroups = []string{DefaultIsolatedPortGroup}
	}
	pgs := map[string]bool{StockPortGroup: true}
	for _, pg := range t.PortGroups {
		if pg == "" || pgs[pg] {
			return fmt.Errorf("topology: port_groups: %q is empty, repeated or the stock %q", pg, StockPortGroup)
		}
		pgs[pg] = true
	}
	hosts := t.hosts()
	if t.Mode == "esxi" {
		if len(hosts) == 0 {
			t.StandaloneHosts = []string{"esx1"}
			hosts = t.StandaloneHosts
		}
		if len(hosts) != 1 || len(t.Clusters) != 0 {
			return fmt.Errorf("topology: esxi mode has exactly one standalone host and no cluster")
		}
		t.SharedDatastores = nil
	}
	if len(hosts) == 0 {
		return fmt.Errorf("topology: no hosts")
	}
	known := map[string]bool{}
	for _, h := range hosts {
		if known[h] {
			return fmt.Errorf("topology: host %s listed twice", h)
		}
		known[h] = true
	}
	dss := map[string]bool{}
	for _, h := range hosts {
		dss[localDatastore(h)] = true
	}
	for _, d := range t.SharedDatastores {
		dss[d] = true
	}
	for _, h := range t.EncryptedAgentHosts {
		if !known[h] {
			return fmt.Errorf("topology: encrypted_agent_hosts names unknown host %s", h)
		}
	}
	for d, kind := range t.DatastoreTypes {
		if !dss[d] {
			return fmt.Errorf("topology: datastore_types names unknown datastore %s", d)
		}
		if kind != "vsan" && kind != "vvol" && kind != "VMFS" && kind != "NFS" {
			return fmt.Errorf("topology: datastore %s has type %q, not one of VMFS, NFS, vsan, vvol", d, kind)
		}
	}
	for d, mib := range t.DatastoreCapacityMiB {
		if !dss[d] {
			return fmt.Errorf("topology: datastore_capacity_mib names unknown datastore %s", d)
		}
		if mib <= 0 {
			return fmt.Errorf("topology: datastore %s has capacity %d MiB, not a positive number", d, mib)
		}
	}
	names := map[string]bool{}
	homes := map[string]string{} // "<datastore>/<name>" (a VM's directory) -> the VM's key
	for i := range t.VMs {
		vm := &t.VMs[i]
		vm.Folder = strings.Trim(vm.Folder, "/")
		if vm.Name == "" || names[vm.key()] {
			return fmt.Errorf("topology: VM name %q empty or repeated in one folder", vm.key())
		}
		names[vm.key()] = true
		if vm.Host == "" {
			vm.Host = hosts[i%len(hosts)]
		}
		if !known[vm.Host] {
			return fmt.Errorf("topology: VM %s on unknown host %s", vm.Name, vm.Host)
		}
		if vm.Datastore == "" {
			vm.Datastore = localDatastore(vm.Host)
		}
		if vm.Power == "" {
			vm.Power = "on"
		}
		if len(vm.Disks) == 0 {
			vm.Disks = []DiskSpec{{}}
		}
		ide := 0
		for j := range vm.Disks {
			d := &vm.Disks[j]
			if d.Bus == "" {
				d.Bus = "scsi"
			}
			if d.Bus != "scsi" && d.Bus != "sata" && d.Bus != "nvme" && d.Bus != "ide" {
				return fmt.Errorf("topology: VM %s disk %d: bus must be scsi, sata, nvme or ide", vm.Name, j)
			}
			if d.Bus == "ide" {
				if ide++; ide > 2 {
					return fmt.Errorf("topology: VM %s disk %d: an IDE controller takes two disks", vm.Name, j)
				}
			}
			if d.SizeMiB == 0 {
				d.SizeMiB = 64
			}
			if d.Mode != "" && !validDiskMode(d.Mode) {
				return fmt.Errorf("topology: VM %s disk %d: mode must be persistent, independent_persistent or independent_nonpersistent", vm.Name, j)
			}
			if d.RDM != "" && (d.RDM != "physical" || d.Mode != "") {
				return fmt.Errorf("topology: VM %s disk %d: rdm must be \"physical\" (and then no mode)", vm.Name, j)
			}
			if d.Datastore == "" {
				d.Datastore = vm.Datastore
			}
			for _, ds := range []string{vm.Datastore, d.Datastore} {
				// A VM's files are in "<datastore>/<name>/": two VMs of one name
				// (in two folders) must not share that directory.
				if other, ok := homes[ds+"/"+vm.Name]; ok && other != vm.key() {
					return fmt.Errorf("topology: VMs %s and %s both have files on datastore %s", other, vm.key(), ds)
				}
				homes[ds+"/"+vm.Name] = vm.key()
				if !dss[ds] {
					return fmt.Errorf("topology: VM %s uses unknown datastore %s", vm.Name, ds)
				}
				if ds != localDatastore(vm.Host) && !contains(t.SharedDatastores, ds) {
					return fmt.Errorf("topology: VM %s on %s cannot use %s (local to another host)", vm.Name, vm.Host, ds)
				}
			}
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
