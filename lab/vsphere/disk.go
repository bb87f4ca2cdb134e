package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// grainSize is the copy-on-write unit of delta disks: a guest write that touches part
// of a grain first copies the whole grain from the parent chain, as vmfsSparse/SEsparse do.
const grainSize = 4096

// Extent is one disk file of a chain: a base disk (VMDK descriptor + sparse "-flat" extent)
// or a snapshot delta (descriptor + sparse "-delta" extent holding only the grains written
// since the snapshot). Which grains a file holds is kept in grains; the data file is a
// sparse raw file of the full capacity, so an offset in it is the disk offset.
type Extent struct {
	Datastore string // datastore name
	DSDir     string // datastore directory on this machine
	Rel       string // descriptor path inside the datastore, e.g. "web01/web01.vmdk"
	DataRel   string // extent path inside the datastore
	UUID      string
	CID       uint32
	Capacity  int64
	Parent    *Extent
	Owner     *VDisk     // the virtual disk whose chain created this file
	Frozen    bool       // read-only: a snapshot's point in time or a linked clone's parent
	Clones    int        // linked clones whose chain starts here
	Attached  int        // hot-added to agents right now
	crypt     *cryptoKey // encrypted VM disk: the files hold ciphertext (crypt.go)
	grains    []bool
}

func (e *Extent) DSPath() string   { return fmt.Sprintf("[%s] %s", e.Datastore, e.Rel) }
func (e *Extent) dataPath() string { return filepath.Join(e.DSDir, e.DataRel) }
func (e *Extent) descPath() string { return filepath.Join(e.DSDir, e.Rel) }
func (e *Extent) isDelta() bool    { return e.Parent != nil }

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// ddbUUID formats a UUID the way VMDK descriptors write ddb.uuid.
func ddbUUID(u string) string {
	h := strings.ReplaceAll(u, "-", "")
	var parts []string
	for i := 0; i+2 <= len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

func randCID() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// create writes the descriptor and a sparse extent of the full capacity.
func (e *Extent) create(adapter string) error {
	if err := os.MkdirAll(filepath.Dir(e.dataPath()), 0755); err != nil {
		return err
	}
	f, err := os.OpenFile(e.dataPath(), os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0644)
	if err != nil {
		return err
	}
	if err := f.Truncate(e.Capacity); err != nil {
		f.Close()
		return err
	}
	f.Close()
	e.grains = make([]bool, (e.Capacity+grainSize-1)/grainSize)
	if e.CID == 0 {
		e.CID = randCID()
	}
	return e.writeDescriptor(adapter)
}

func (e *Extent) writeDescriptor(adapter string) error {
	sectors := e.Capacity / 512
	var b strings.Builder
	b.WriteString("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n")
	fmt.Fprintf(&b, "CID=%08x\n", e.CID)
	if e.Parent == nil {
		b.WriteString("parentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\n")
		fmt.Fprintf(&b, "RW %d VMFS \"%s\"\n\n", sectors, filepath.Base(e.DataRel))
	} else {
		fmt.Fprintf(&b, "parentCID=%08x\ncreateType=\"vmfsSparse\"\n", e.Parent.CID)
		fmt.Fprintf(&b, "parentFileNameHint=\"%s\"\n\n# Extent description\n", e.parentHint())
		fmt.Fprintf(&b, "RW %d VMFSSPARSE \"%s\"\n\n", sectors, filepath.Base(e.DataRel))
	}
	b.WriteString("# The Disk Data Base\n#DDB\n\n")
	fmt.Fprintf(&b, "ddb.adapterType = \"%s\"\n", adapter)
	fmt.Fprintf(&b, "ddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n", sectors/(255*63))
	if e.Parent == nil {
		b.WriteString("ddb.thinProvisioned = \"1\"\n")
	}
	fmt.Fprintf(&b, "ddb.uuid = \"%s\"\nddb.virtualHWVersion = \"13\"\n", ddbUUID(e.UUID))
	return os.WriteFile(e.descPath(), []byte(b.String()), 0644)
}

func (e *Extent) parentHint() string {
	if e.Parent.Datastore == e.Datastore && filepath.Dir(e.Parent.Rel) == filepath.Dir(e.Rel) {
		return filepath.Base(e.Parent.Rel)
	}
	return filepath.Join(e.Parent.DSDir, e.Parent.Rel)
}

func (e *Extent) remove() {
	_ = os.Chmod(e.dataPath(), 0644)
	_ = os.Remove(e.dataPath())
	_ = os.Remove(e.descPath())
}

// freeze makes the extent read-only, on disk as well, so that nothing can change a
// snapshot's point in time behind the lab's back.
func (e *Extent) freeze() {
	e.Frozen = true
	_ = os.Chmod(e.dataPath(), 0444)
}

func (e *Extent) unfreeze() {
	e.Frozen = false
	_ = os.Chmod(e.dataPath(), 0644)
}

// owner returns the chain element that holds grain g as seen from e, or nil.
func (e *Extent) owner(g int) *Extent {
	for x := e; x != nil; x = x.Parent {
		if x.grains[g] {
			return x
		}
	}
	return nil
}

// readAt reads the composed content of the chain ending at e.
func (e *Extent) readAt(buf []byte, off int64) error {
	files := map[*Extent]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for done := 0; done < len(buf); {
		pos := off + int64(done)
		g := int(pos / grainSize)
		n := int(grainSize - pos%grainSize)
		if n > len(buf)-done {
			n = len(buf) - done
		}
		chunk := buf[done : done+n]
		src := e.owner(g)
		if src == nil {
			for i := range chunk {
				chunk[i] = 0
			}
		} else {
			f := files[src]
			if f == nil {
				var err error
				if f, err = os.Open(src.dataPath()); err != nil {
					return err
				}
				files[src] = f
			}
			if _, err := f.ReadAt(chunk, pos); err != nil {
				return err
			}
			src.crypt.apply(chunk, pos)
		}
		done += n
	}
	return nil
}

// writeAt is a guest write into e (which must be the running, writable top).
func (e *Extent) writeAt(data []byte, off int64) error {
	if e.Frozen {
		return fmt.Errorf("%s is frozen", e.DSPath())
	}
	if off < 0 || off+int64(len(data)) > e.Capacity {
		return fmt.Errorf("write %d+%d outside disk of %d bytes", off, len(data), e.Capacity)
	}
	f, err := os.OpenFile(e.dataPath(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if e.Parent != nil {
		// Copy on write: bring whole grains into the delta before a partial write.
		first, last := off/grainSize, (off+int64(len(data))-1)/grainSize
		for g := first; g <= last; g++ {
			if e.grains[g] {
				continue
			}
			gs := g * grainSize
			covered := gs >= off && gs+grainSize <= off+int64(len(data))
			if !covered {
				grain := make([]byte, grainSize)
				if err := e.Parent.readAt(grain, gs); err != nil {
					return err
				}
				e.crypt.apply(grain, gs)
				if _, err := f.WriteAt(grain, gs); err != nil {
					return err
				}
			}
		}
	}
	if e.crypt != nil {
		data = append([]byte(nil), data...)
		e.crypt.apply(data, off)
	}
	if _, err := f.WriteAt(data, off); err != nil {
		return err
	}
	e.markGrains(off, int64(len(data)))
	return nil
}

func (e *Extent) markGrains(off, length int64) {
	if length <= 0 {
		return
	}
	for g := off / grainSize; g <= (off+length-1)/grainSize; g++ {
		e.grains[g] = true
	}
}

// mergeInto copies every grain that e holds into parent p (snapshot consolidation).
func (e *Extent) mergeInto(p *Extent) error {
	src, err := os.Open(e.dataPath())
	if err != nil {
		return err
	}
	defer src.Close()
	_ = os.Chmod(p.dataPath(), 0644)
	dst, err := os.OpenFile(p.dataPath(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer dst.Close()
	buf := make([]byte, grainSize)
	for g, has := range e.grains {
		if !has {
			continue
		}
		if _, err := src.ReadAt(buf, int64(g)*grainSize); err != nil {
			return err
		}
		if _, err := dst.WriteAt(buf, int64(g)*grainSize); err != nil {
			return err
		}
		p.grains[g] = true
	}
	return dst.Sync()
}

// allocated reports whether any file of the chain ending at e holds grain g.
func (e *Extent) allocated(g int) bool { return e.owner(g) != nil }

// materialize writes the composed content of the chain as a sparse raw image.
func (e *Extent) materialize(path string, mode os.FileMode) error {
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0644)
	if err != nil {
		return err
	}
	if err := f.Truncate(e.Capacity); err != nil {
		f.Close()
		return err
	}
	buf := make([]byte, 0, 64*grainSize)
	start := int64(-1)
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		if err := e.readAt(buf, start); err != nil {
			return err
		}
		_, err := f.WriteAt(buf, start)
		buf = buf[:0]
		return err
	}
	for g := range e.grains {
		if !e.allocated(g) {
			if err := flush(); err != nil {
				f.Close()
				return err
			}
			continue
		}
		if len(buf) == 0 {
			start = int64(g) * grainSize
		}
		n := grainSize
		if rem := e.Capacity - int64(g)*grainSize; rem < int64(n) {
			n = int(rem)
		}
		buf = buf[:len(buf)+n]
		if len(buf) == cap(buf) {
			if err := flush(); err != nil {
				f.Close()
				return err
			}
		}
	}
	if err := flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// splitmix64 is the lab's pattern generator (documented in docs/lab.md so that tests in
// any language can compute the bytes a guest write puts on disk).
func splitmix64(x uint64) uint64 {
	x += 0x9E3779B97F4A7C15
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
	x = (x ^ (x >> 27)) * 0x94D049BB133111EB
	return x ^ (x >> 31)
}

// pattern returns the bytes a guest write with this seed puts at [off, off+length):
// the little-endian 64-bit word at absolute disk offset w (w a multiple of 8) is
// splitmix64(seed * 0x9E3779B97F4A7C15 ^ (w / 8)).
func pattern(seed uint64, off, length int64) []byte {
	out := make([]byte, length)
	var word [8]byte
	for i := int64(0); i < length; {
		pos := off + i
		w := pos &^ 7
		binary.LittleEndian.PutUint64(word[:], splitmix64(seed*0x9E3779B97F4A7C15^uint64(w/8)))
		n := copy(out[i:], word[pos-w:])
		i += int64(n)
	}
	return out
}

// fillOSLike writes deterministic content that looks like an installed OS disk:
// an MBR with one partition, a superblock-like header, scattered file data (text and
// binary) with holes between them, and some all-zero blocks inside allocated areas.
func fillOSLike(e *Extent, name string) error {
	sum := sha256.Sum256([]byte(name))
	seed := binary.LittleEndian.Uint64(sum[:8])
	f, err := os.OpenFile(e.dataPath(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	put := func(data []byte, off int64) error {
		if off+int64(len(data)) > e.Capacity {
			data = data[:e.Capacity-off]
		}
		if e.crypt != nil {
			data = append([]byte(nil), data...)
			e.crypt.apply(data, off)
		}
		if _, err := f.WriteAt(data, off); err != nil {
			return err
		}
		e.markGrains(off, int64(len(data)))
		return nil
	}
	// MBR: boot code, partition 1 (Linux, LBA 2048 to the end), signature.
	mbr := pattern(seed, 0, 512)
	for i := 440; i < 510; i++ {
		mbr[i] = 0
	}
	binary.LittleEndian.PutUint32(mbr[440:], uint32(seed))
	p := mbr[446:462]
	p[0] = 0x80
	p[4] = 0x83
	binary.LittleEndian.PutUint32(p[8:], 2048)
	binary.LittleEndian.PutUint32(p[12:], uint32(e.Capacity/512-2048))
	mbr[510], mbr[511] = 0x55, 0xAA
	if err := put(mbr, 0); err != nil {
		return err
	}
	const part = 1 << 20
	if e.Capacity <= 2*part {
		return nil
	}
	super := []byte(fmt.Sprintf("LABFS1\x00 volume=%s blocks=%d\n", name, (e.Capacity-part)/4096))
	if err := put(append(super, pattern(seed^1, part+int64(len(super)), 64<<10-int64(len(super)))...), part); err != nil {
		return err
	}
	// File data: about a fifth of the disk, in runs of 64 KiB to 512 KiB.
	rnd := seed
	next := func() uint64 { rnd = splitmix64(rnd); return rnd }
	usable := e.Capacity - part - 128<<10
	target := e.Capacity / 5
	for written := int64(0); written < target; {
		off := part + 128<<10 + int64(next()%uint64(usable))&^(64<<10-1)
		length := int64(1+next()%8) * 64 << 10
		if off+length > e.Capacity {
			length = e.Capacity - off
		}
		var data []byte
		switch next() % 4 {
		case 0: // text, like configuration and logs
			var b strings.Builder
			for int64(b.Len()) < length {
				fmt.Fprintf(&b, "/usr/share/lab/%s/file-%d.conf: key%d = value%d\n", name, next()%10000, next()%100, next())
			}
			data = []byte(b.String()[:length])
		case 1: // a zero block inside an allocated area (freed file data)
			data = make([]byte, length)
			copy(data, pattern(next(), off, 4096))
		default: // binaries: incompressible
			data = pattern(next(), off, length)
		}
		if err := put(data, off); err != nil {
			return err
		}
		written += length
	}
	return nil
}
