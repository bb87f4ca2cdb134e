package main

import (
	"crypto/rand"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// cbtBlock is the granularity of changed block tracking. vSphere's depends on the
// disk's size; 64 KiB is what it uses for small disks, and all areas are aligned to it.
const cbtBlock = 64 << 10

// cbtState tracks one disk's changes. Every guest write is logged with a sequence
// number; a change id is "<epoch>/<sequence>" like vSphere's "52 ab ... 9f/17". The
// epoch changes when tracking is switched off and on again, which invalidates every
// change id handed out before.
type cbtState struct {
	epoch string
	seq   int64
	log   []cbtRec
	// blind: tracking was switched on while the VM had snapshots, which VMware does not
	// support (Broadcom KB 320557): the tracker never learnt what the base disks hold, so
	// "*" answers only what was written since, and a full filtered by it misses data.
	blind bool
}

type cbtRec struct {
	seq        int64
	start, end int64 // block indexes, end exclusive
}

func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[0] = 0x52
	var parts []string
	for i, x := range b {
		sep := " "
		if i == 8 {
			sep = "-"
		}
		if i == 0 {
			sep = ""
		}
		parts = append(parts, fmt.Sprintf("%s%02x", sep, x))
	}
	return strings.Join(parts, "")
}

func (d *VDisk) changeID() string {
	if d.cbt == nil {
		return ""
	}
	return fmt.Sprintf("%s/%d", d.cbt.epoch, d.cbt.seq)
}

func (d *VDisk) recordWrite(off, length int64) {
	if d.cbt == nil || d.VM.faults.CBTOmit {
		return // cbt_omit: the tracker loses these writes, as CBT bugs have (KB 2136854)
	}
	d.cbt.seq++
	d.cbt.log = append(d.cbt.log, cbtRec{seq: d.cbt.seq, start: off / cbtBlock, end: (off+length-1)/cbtBlock + 1})
}

func parseChangeID(id string) (string, int64, bool) {
	i := strings.LastIndex(id, "/")
	if i <= 0 {
		return "", 0, false
	}
	n, err := strconv.ParseInt(id[i+1:], 10, 64)
	if err != nil || n < 0 {
		return "", 0, false
	}
	return id[:i], n, true
}

type span struct{ start, end int64 } // bytes, end exclusive

func mergeSpans(in []span) []span {
	sort.Slice(in, func(i, j int) bool { return in[i].start < in[j].start })
	var out []span
	for _, s := range in {
		if n := len(out); n > 0 && s.start <= out[n-1].end {
			if s.end > out[n-1].end {
				out[n-1].end = s.end
			}
			continue
		}
		out = append(out, s)
	}
	return out
}

// changedAreas answers QueryChangedDiskAreas for disk d as of snapshot sd (or now).
func (l *Lab) changedAreas(d *VDisk, top *Extent, asOf string, changeID string, startOffset int64) (*types.DiskChangeInfo, types.BaseMethodFault) {
	if d.cbt == nil {
		return nil, &types.FileFault{File: top.DSPath()}
	}
	if startOffset < 0 || startOffset >= d.Capacity {
		return nil, &types.InvalidArgument{InvalidProperty: "startOffset"}
	}
	snapEpoch, snapSeq, ok := parseChangeID(asOf)
	if !ok || snapEpoch != d.cbt.epoch {
		// The snapshot was taken under an earlier tracking epoch.
		return nil, &types.FileFault{File: top.DSPath()}
	}
	var spans []span
	if changeID == "*" && d.cbt.blind {
		for _, r := range d.cbt.log {
			if r.seq <= snapSeq {
				spans = append(spans, span{r.start * cbtBlock, r.end * cbtBlock})
			}
		}
	} else if changeID == "*" {
		for g := 0; g < len(top.grains); {
			if !top.allocated(g) {
				g++
				continue
			}
			b := int64(g) * grainSize / cbtBlock
			spans = append(spans, span{b * cbtBlock, (b + 1) * cbtBlock})
			g = int((b + 1) * cbtBlock / grainSize)
		}
	} else {
		epoch, since, ok := parseChangeID(changeID)
		if !ok || epoch != d.cbt.epoch {
			// A change id of another tracking epoch (CBT was reset: switched off and
			// on, or its files were recreated) or not a change id at all.
			return nil, &types.InvalidArgument{InvalidProperty: "changeId"}
		}
		if since > snapSeq {
			return nil, &types.FileFault{File: top.DSPath()}
		}
		for _, r := range d.cbt.log {
			if r.seq > since && r.seq <= snapSeq {
				spans = append(spans, span{r.start * cbtBlock, r.end * cbtBlock})
			}
		}
	}
	spans = mergeSpans(spans)
	// Answer at most one page: a window of cbt_page_bytes from startOffset, cut short
	// after cbt_max_areas areas. The caller goes on at startOffset + length.
	end := startOffset + l.topo.CBTPageBytes
	if end > d.Capacity {
		end = d.Capacity
	}
	info := &types.DiskChangeInfo{StartOffset: startOffset}
	for _, s := range spans {
		if s.end > d.Capacity {
			s.end = d.Capacity
		}
		if s.end <= startOffset || s.start >= end {
			continue
		}
		if s.start < startOffset {
			s.start = startOffset
		}
		if s.end > end {
			s.end = end
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: s.start, Length: s.end - s.start})
		if len(info.ChangedArea) == l.topo.CBTMaxAreas {
			end = s.end
			break
		}
	}
	info.Length = end - startOffset
	return info, nil
}

func (l *Lab) setCBT(vm *LabVM, on bool) {
	for _, d := range vm.disks {
		switch {
		case on && d.cbt == nil:
			d.cbt = &cbtState{epoch: newEpoch(), blind: len(vm.snaps) > 0}
		case !on:
			d.cbt = nil
		}
	}
	vm.Config.ChangeTrackingEnabled = types.NewBool(on)
}
