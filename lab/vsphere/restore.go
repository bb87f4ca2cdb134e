package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// What a whole-VM restore needs from the lab (docs/vsphere.md, "Restore"; docs/lab.md):
//
//   - CreateVM_Task on the datacenter's VM folder, or on any folder made under it
//     (CreateFolder), makes a LabVM whose new disks
//     (fileOperation "create") are lab disks that keep their content, so that
//     `vmbackup lab disk-image` reads a restored VM as it reads the lab's own;
//   - a writable hot-add (diskMode persistent or independent_persistent) of such a
//     disk, or of a powered-off VM's own disk, to an agent: the agent's device file is
//     writable, and on detach what differs from the disk is written into it (grain by
//     grain, so that zeros over unallocated grains stay holes: thin stays thin);
//   - a /folder PUT of a disk's "-flat.vmdk" stores the bytes into the disk model
//     (non-zero grains only over unallocated ones);
//   - the host fault slow_ms delays CreateVM_Task and ReconfigVM_Task as it delays
//     snapshot tasks.

// LabFolder is the datacenter's VM folder with the lab's CreateVM_Task.
type LabFolder struct {
	simulator.Folder
	lab *Lab
}

// installVMFolder replaces the datacenter's VM folder by a LabFolder (after build, which
// makes the lab's own VMs through the stock CreateVM_Task and adopts them itself).
func (l *Lab) installVMFolder(ref types.ManagedObjectReference) {
	f, ok := simulator.Map.Get(ref).(*simulator.Folder)
	if !ok {
		return
	}
	simulator.Map.Put(&LabFolder{Folder: *f, lab: l})
}

// CreateFolder makes a child folder that is a LabFolder too, so that a VM created in
// any VM folder (a drill's, a site's "restored" folder) keeps its disks' content.
func (f *LabFolder) CreateFolder(ctx *simulator.Context, c *types.CreateFolder) soap.HasFault {
	res := f.Folder.CreateFolder(ctx, c)
	if body, ok := res.(*methods.CreateFolderBody); ok && body.Res != nil {
		f.lab.installVMFolder(body.Res.Returnval)
	}
	return res
}

// DestroyTask destroys the folder's children, then the folder, as the stock
// Folder.DestroyTask does; that one takes its parent for a stock Folder, which a
// LabFolder made by CreateFolder is not.
func (f *LabFolder) DestroyTask(ctx *simulator.Context, req *types.Destroy_Task) soap.HasFault {
	type destroyer interface {
		mo.Reference
		DestroyTask(*types.Destroy_Task) soap.HasFault
	}
	task := simulator.CreateTask(f, "destroy", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		for _, c := range append([]types.ManagedObjectReference(nil), f.ChildEntity...) {
			obj, ok := simulator.Map.Get(c).(destroyer)
			if !ok {
				continue
			}
			var fault types.BaseMethodFault
			simulator.Map.WithLock(obj, func() {
				id := obj.DestroyTask(&types.Destroy_Task{This: c}).(*methods.Destroy_TaskBody).Res.Returnval
				if t, ok := simulator.Map.Get(id).(*simulator.Task); ok && t.Info.Error != nil {
					fault = t.Info.Error.Fault // a powered-on VM
				}
			})
			if fault != nil {
				return nil, fault
			}
		}
		if f.Parent == nil {
			return nil, &types.InvalidArgument{InvalidProperty: "this"}
		}
		parent, ok := simFolder(simulator.Map.Get(*f.Parent))
		if !ok {
			return nil, &types.InvalidArgument{InvalidProperty: "parent"}
		}
		simulator.Map.Remove(f.Self)
		simulator.Map.RemoveReference(parent, &parent.ChildEntity, f.Self) // takes the parent's lock
		return nil, nil
	})
	return &methods.Destroy_TaskBody{Res: &types.Destroy_TaskResponse{Returnval: task.Run()}}
}

// simFolder is the stock Folder of a folder object, LabFolder or not.
func simFolder(obj mo.Reference) (*simulator.Folder, bool) {
	switch f := obj.(type) {
	case *simulator.Folder:
		return f, true
	case *LabFolder:
		return &f.Folder, true
	}
	return nil, false
}

func (l *Lab) hostNameOf(ref *types.ManagedObjectReference) string {
	if ref == nil {
		return ""
	}
	if h, ok := simulator.Map.Get(*ref).(*simulator.HostSystem); ok {
		return h.Name
	}
	return ""
}

// slowFor is the slow_ms fault that applies to a task on a VM (vm may be nil) on host.
func (l *Lab) slowFor(vm *LabVM, host string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	slow := 0
	if vm != nil {
		slow = vm.faults.SlowMs
	}
	if hf := l.hostFaults[host]; hf != nil && hf.SlowMs > slow {
		slow = hf.SlowMs
	}
	return slow
}

// runLater runs a task at once, or with slow_ms in the background after that delay
// holding obj's lock, as runTask does for a VM's tasks.
func runLater(slow int, obj mo.Reference, task *simulator.Task) types.ManagedObjectReference {
	if slow <= 0 {
		return task.Run()
	}
	go func() {
		time.Sleep(time.Duration(slow) * time.Millisecond)
		simulator.Map.WithLock(obj, func() { task.Run() })
	}()
	return task.Self
}

// CreateVMTask creates a VM whose disks keep their content. vSphere refuses a name
// already used in the folder (DuplicateName, CreateVM_Task's documented faults).
func (f *LabFolder) CreateVMTask(ctx *simulator.Context, req *types.CreateVM_Task) soap.HasFault {
	l := f.lab
	task := simulator.CreateTask(f, "createVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return l.createVM2(ctx, f, req)
	})
	slow := l.slowFor(nil, l.hostNameOf(req.Host))
	return &methods.CreateVM_TaskBody{Res: &types.CreateVM_TaskResponse{Returnval: runLater(slow, f, task)}}
}

func (l *Lab) createVM2(ctx *simulator.Context, f *LabFolder, req *types.CreateVM_Task) (types.AnyType, types.BaseMethodFault) {
	l.mu.Lock()
	taken := l.vms[req.Config.Name] != nil
	l.mu.Unlock()
	if taken {
		return nil, &types.DuplicateName{Name: req.Config.Name}
	}
	res := f.Folder.CreateVMTask(ctx, req)
	t, ok := simulator.Map.Get(res.(*methods.CreateVM_TaskBody).Res.Returnval).(*simulator.Task)
	if !ok {
		return nil, &types.RuntimeFault{}
	}
	if t.Info.Error != nil {
		return nil, t.Info.Error.Fault
	}
	ref := t.Info.Result.(types.ManagedObjectReference)
	l.mu.Lock()
	defer l.mu.Unlock()
	vm := l.adopt(simulator.Map.Get(ref).(*simulator.VirtualMachine), false, false)
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		if _, err := l.newBaseDisk(vm, disk, b.FileName, ""); err != nil {
			return nil, &types.FileFault{File: b.FileName}
		}
	}
	if vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled {
		l.setCBT(vm, true)
	}
	l.syncDevices(vm)
	return ref, nil
}

// writable says whether a hot-add opens the disk for writing: persistent modes do;
// independent_nonpersistent (what a backup asks for) discards writes on detach.
func writable(mode string) bool {
	return mode == string(types.VirtualDiskModePersistent) || mode == string(types.VirtualDiskModeIndependent_persistent)
}

// persist writes into e what differs between the agent's device file and e's content,
// grain by grain (an unallocated grain that the device holds as zeros stays a hole);
// returns the bytes written into the disk model.
func persist(path string, e *Extent) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	const step = 256 * grainSize
	dev := make([]byte, step)
	cur := make([]byte, step)
	zero := make([]byte, grainSize)
	var off0 int64
	var written int64
	// Differing grains next to each other are written as one run: one open
	// and one write of the disk model per run, not per grain.
	flush := func(start, end int64) error {
		if end <= start {
			return nil
		}
		if err := e.writeAt(dev[start:end], off0+start); err != nil {
			return err
		}
		if e.Owner != nil {
			e.Owner.recordWrite(off0+start, end-start)
		}
		written += end - start
		return nil
	}
	for off := int64(0); off < e.Capacity; off += step {
		off0 = off
		n := int64(step)
		if off+n > e.Capacity {
			n = e.Capacity - off
		}
		if _, err := f.ReadAt(dev[:n], off); err != nil && err != io.EOF {
			return written, err
		}
		if err := e.readAt(cur[:n], off); err != nil {
			return written, err
		}
		run := int64(-1)
		for g := int64(0); g < n; g += grainSize {
			end := g + grainSize
			if end > n {
				end = n
			}
			a, b := dev[g:end], cur[g:end]
			same := bytes.Equal(a, b) || (!e.allocated(int((off+g)/grainSize)) && bytes.Equal(a, zero[:end-g]))
			if same {
				if run >= 0 {
					if err := flush(run, g); err != nil {
						return written, err
					}
					run = -1
				}
				continue
			}
			if run < 0 {
				run = g
			}
		}
		if run >= 0 {
			if err := flush(run, n); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

// folderPut stores a /folder PUT of a lab disk's "-flat.vmdk" into the disk model;
// every other PUT and every GET goes to the stock handler (which keeps the bytes in
// the datastore directory). A disk that is attached, frozen or whose VM runs is
// locked (409), as vSphere locks an open disk file.
func (l *Lab) folderPut(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut || !strings.HasPrefix(r.URL.Path, "/folder/") || !strings.HasSuffix(r.URL.Path, "-flat.vmdk") {
			next.ServeHTTP(w, r)
			return
		}
		rel := strings.TrimPrefix(r.URL.Path, "/folder/")
		ds := r.URL.Query().Get("dsName")
		l.mu.Lock()
		var e *Extent
		for _, vm := range l.vms {
			for _, d := range vm.disks {
				if d.Top.Datastore == ds && filepath.Clean(d.Top.DataRel) == filepath.Clean(rel) {
					e = d.Top
				}
			}
		}
		if e == nil {
			l.mu.Unlock()
			next.ServeHTTP(w, r)
			return
		}
		if e.Frozen || e.Attached > 0 || (e.Owner != nil && e.Owner.VM.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff) {
			l.mu.Unlock()
			http.Error(w, fmt.Sprintf("%s is locked", e.DSPath()), http.StatusConflict)
			return
		}
		if hf := l.hostFaults[e.Owner.VM.hostName()]; hf != nil && hf.UploadFail {
			l.mu.Unlock()
			http.Error(w, "upload_fail: the host refuses the upload", http.StatusInternalServerError)
			return
		}
		e.Attached++ // locked while the upload runs
		l.mu.Unlock()
		err := l.storeUpload(r.Body, e)
		l.mu.Lock()
		e.Attached--
		l.mu.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusCreated)
	})
}

func (l *Lab) storeUpload(body io.Reader, e *Extent) error {
	buf := make([]byte, 256*grainSize)
	zero := make([]byte, grainSize)
	var off int64
	for {
		n, err := io.ReadFull(body, buf)
		if n > 0 {
			if off+int64(n) > e.Capacity {
				return fmt.Errorf("upload is larger than %s (%d bytes)", e.DSPath(), e.Capacity)
			}
			l.mu.Lock()
			for g := 0; g < n; g += grainSize {
				end := g + grainSize
				if end > n {
					end = n
				}
				chunk := buf[g:end]
				if bytes.Equal(chunk, zero[:end-g]) && !e.allocated(int((off+int64(g))/grainSize)) {
					continue
				}
				if werr := e.writeAt(chunk, off+int64(g)); werr != nil {
					l.mu.Unlock()
					return werr
				}
				if e.Owner != nil {
					e.Owner.recordWrite(off+int64(g), int64(end-g))
				}
			}
			l.mu.Unlock()
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
