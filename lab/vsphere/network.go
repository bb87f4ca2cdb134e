package main

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// StockPortGroup is the simulator's one network: a standard port group of every
// host's vSwitch0.
const StockPortGroup = "VM Network"

// DefaultIsolatedPortGroup is the port group the topology gives every host when it
// names none (port_groups): where the lab's restore drills put their VMs.
const DefaultIsolatedPortGroup = "Isolated"

// addPortGroups gives every host of the topology its port groups (topology
// port_groups) on vSwitch0, after "VM Network". On vSphere a standard port group
// is made on each host alone (HostNetworkSystem.AddPortGroup), and vCenter shows
// the hosts' port groups of one name as one network, listed in each host's, its
// compute resource's and the datacenter's network. The stock simulator makes that
// network with the first host's port group and refuses the name on another host
// (DuplicateName): the others' port groups are added to their network systems
// here, and the network to every host.
func (l *Lab) addPortGroups(ctx context.Context, hosts map[string]*object.HostSystem) error {
	names := l.topo.hosts()
	for _, pg := range l.topo.PortGroups {
		for i, name := range names {
			ns, err := hosts[name].ConfigManager().NetworkSystem(ctx)
			if err != nil {
				return err
			}
			spec := types.HostPortGroupSpec{Name: pg, VswitchName: "vSwitch0", Policy: types.HostNetworkPolicy{}}
			if i == 0 {
				if err := ns.AddPortGroup(ctx, spec); err != nil {
					return fmt.Errorf("port group %s on %s: %v", pg, name, err)
				}
				continue
			}
			sys := simulator.Map.Get(ns.Reference()).(*simulator.HostNetworkSystem)
			for j := range sys.NetworkInfo.Vswitch {
				if sw := &sys.NetworkInfo.Vswitch[j]; sw.Name == spec.VswitchName {
					sw.Portgroup = append(append([]string(nil), sw.Portgroup...), pg)
				}
			}
			sys.NetworkInfo.Portgroup = append(append([]types.HostPortGroup(nil), sys.NetworkInfo.Portgroup...),
				types.HostPortGroup{Key: "key-vim.host.PortGroup-" + pg, Spec: spec})
		}
		net := l.network(pg)
		if net == nil {
			return fmt.Errorf("port group %s: no network of that name in the datacenter", pg)
		}
		for _, name := range names {
			h := simulator.Map.Get(l.hostRefs[name]).(*simulator.HostSystem)
			// Copies: the simulator's hosts share their first network slice with their compute resource's.
			h.Network = appendRef(h.Network, net.Self)
			net.Host = appendRef(net.Host, h.Self)
			switch cr := simulator.Map.Get(*h.Parent).(type) {
			case *simulator.ClusterComputeResource:
				cr.Network = appendRef(cr.Network, net.Self)
			case *mo.ComputeResource:
				cr.Network = appendRef(cr.Network, net.Self)
			}
		}
	}
	return nil
}

// network is the datacenter's network named name (nil if none).
func (l *Lab) network(name string) *mo.Network {
	dc := simulator.Map.Get(l.dc).(*simulator.Datacenter)
	for _, ref := range dc.Network {
		if n, ok := simulator.Map.Get(ref).(*mo.Network); ok && n.Name == name {
			return n
		}
	}
	return nil
}

// appendRef is refs (a new slice) with ref at its end, unless refs has it.
func appendRef(refs []types.ManagedObjectReference, ref types.ManagedObjectReference) []types.ManagedObjectReference {
	for _, r := range refs {
		if r == ref {
			return refs
		}
	}
	return append(append([]types.ManagedObjectReference(nil), refs...), ref)
}
