package main

import (
	"io/fs"
	"path/filepath"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

// A datastore's size. vSphere reports it in the datastore's summary: capacity, the
// volume's size, and freeSpace, what is left of it (vSphere Web Services API,
// DatastoreSummary: "freeSpace: Available space of this datastore, in bytes"); a thin
// disk takes from it only the blocks it has allocated (vSphere Storage guide, "About
// Virtual Disk Provisioning Policies": thin "uses only as much datastore space as the
// disk initially needs"). The stock simulator reports the free space of the file
// system holding the lab's state, so a datastore never fills. A topology's
// datastore_capacity_mib gives a datastore a size of its own: freeSpace is that less
// the bytes its files allocate (sparse extents count their allocated blocks), as of the
// lab's start; from then on the stock simulator's accounting applies (a disk created on
// it takes its provisioned size off). RefreshDatastore would reset both to the stock
// figures: nothing of vmbackup calls it.

// applyCapacities sets the sized datastores' summary.capacity and freeSpace (after build).
func (l *Lab) applyCapacities() {
	for name, mib := range l.topo.DatastoreCapacityMiB {
		ds, ok := simulator.Map.Get(l.dsRefs[name]).(*simulator.Datastore)
		if !ok {
			continue
		}
		capacity := mib << 20
		free := capacity - allocated(l.dsDirs[name])
		if free < 0 {
			free = 0
		}
		ds.Summary.Capacity, ds.Summary.FreeSpace = capacity, free
		info := ds.Info.GetDatastoreInfo()
		info.FreeSpace, info.MaxFileSize, info.MaxMemoryFileSize = free, free, free
	}
}

// allocated is the bytes the files under dir allocate (st_blocks: a sparse file's holes take none).
func allocated(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}
