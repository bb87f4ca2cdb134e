package main

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// A VM's NVRAM file (its firmware's variables: UEFI boot entries, Secure Boot keys)
// lives in its home directory beside the .vmx, and vSphere lists it in
// layoutEx.file with type "nvram" (VirtualMachineFileLayoutExFileType: "Non-volatile
// RAM (nvram) file"), named by a full datastore path ("[ds] vm/vm.nvram"). The stock
// simulator creates an empty one and lists the files of the home directory by their
// bare name ("[ds] vm.nvram"); the lab writes distinct content into each VM's and
// lists the files by their datastore path.

const nvramSize = 8684 // the size of a .nvram is a few KiB

// nvramBytes is the content of vm's .nvram: the magic of VMware NVRAM files ("MRVN",
// as file(1)'s magic database knows them), then bytes derived from the VM's name:
// distinct per VM, and not UTF-8, so that a copy that went through text shows.
func nvramBytes(name string) []byte {
	out := []byte("MRVN")
	sum := sha256.Sum256([]byte("vmbackup lab nvram " + name))
	for len(out) < nvramSize {
		out = append(out, sum[:]...)
		sum = sha256.Sum256(sum[:])
	}
	return out[:nvramSize]
}

// writeNvram gives vm's .nvram its content (the file the simulator created, or a new one).
func (l *Lab) writeNvram(vm *LabVM) error {
	home := filepath.Join(l.dsDirs[vmHomeDS(vm)], filepath.Dir(vmHomeRel(vm)))
	return os.WriteFile(filepath.Join(home, vm.Name+".nvram"), nvramBytes(vm.Name), 0644)
}

// refreshLayout is the stock RefreshStorageInfo, then the files it listed by their bare
// name are named by their datastore path in the VM's home directory (with their current
// size); a bare name that names no file there, or one already listed, is dropped.
func (l *Lab) refreshLayout(vm *LabVM) {
	func() {
		defer func() { _ = recover() }() // the stock refresh of a VM not fully created
		vm.VirtualMachine.RefreshStorageInfo(nil, nil)
	}()
	if vm.LayoutEx == nil {
		return
	}
	homeDir := filepath.Dir(vmHomeRel(vm))
	seen := map[string]bool{}
	for _, f := range vm.LayoutEx.File {
		seen[f.Name] = true
	}
	var files []types.VirtualMachineFileLayoutExFileInfo
	for _, f := range vm.LayoutEx.File {
		var p object.DatastorePath
		if p.FromString(f.Name) && !strings.Contains(p.Path, "/") && homeDir != "." {
			dir, ok := l.dsDirs[p.Datastore]
			if !ok {
				continue
			}
			st, err := os.Stat(filepath.Join(dir, homeDir, p.Path))
			name := fmt.Sprintf("[%s] %s/%s", p.Datastore, homeDir, p.Path)
			if err != nil || seen[name] {
				continue
			}
			seen[name] = true
			f.Name, f.Size, f.UniqueSize = name, st.Size(), st.Size()
		}
		files = append(files, f)
	}
	vm.LayoutEx.File = files
}

// RefreshStorageInfo refreshes layoutEx as the lab names its files (refreshLayout).
func (vm *LabVM) RefreshStorageInfo(ctx *simulator.Context, req *types.RefreshStorageInfo) soap.HasFault {
	vm.lab.refreshLayout(vm)
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "layoutEx", Val: vm.LayoutEx}})
	return &methods.RefreshStorageInfoBody{Res: new(types.RefreshStorageInfoResponse)}
}
