//! Writing a disk as a VMDK: streamOptimized (`vmdk`, the shape vSphere
//! imports, e.g. inside an OVF) or monolithicSparse (`vmdk-sparse`, what
//! VMware Workstation and qemu use). Only allocated areas of the source are
//! read, and grains of zeros are not written: they stay unallocated.
//!
//! streamOptimized follows the specification's stream layout: header
//! (`gdOffset = GD_AT_END`), embedded descriptor, then each grain as a
//! marker (lba, size) and its zlib-compressed bytes, each grain table after
//! its grains behind a GT marker, the grain directory behind a GD marker,
//! the footer (the header again, with the real gdOffset) behind a footer
//! marker, and an end-of-stream marker.
//!
//! monolithicSparse: header, descriptor (20 sectors, room to edit it), the
//! redundant and the primary grain directory each followed by all their
//! grain tables (preallocated, as VMware does), then the grains.

use crate::error::{Error, Result};
use crate::extents::{normalize, Extent};
use crate::progress::{Cancel, Progress, Ticker};
use crate::source::vmdk::header::*;
use crate::source::DiskSource;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// 64 KiB grains and 512-entry tables: VMware's defaults.
const GRAIN_SECTORS: u64 = 128;
const GTES: u32 = 512;
const GT_SECTORS: u64 = GTES as u64 * 4 / SECTOR;
/// Sectors left for the descriptor of a monolithicSparse file.
const SPARSE_DESCRIPTOR_SECTORS: u64 = 20;
/// Grains read from the source at once.
const BATCH_GRAINS: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    StreamOptimized,
    MonolithicSparse,
}

impl Shape {
    fn create_type(self) -> &'static str {
        match self {
            Shape::StreamOptimized => "streamOptimized",
            Shape::MonolithicSparse => "monolithicSparse",
        }
    }
}

fn sectors_for(bytes: u64) -> u64 {
    (bytes + SECTOR - 1) / SECTOR
}

/// The name the image will have: restore writes to `.NAME.partial-XXXXXXXX`
/// and renames, and the descriptor's extent line should name the final file.
fn final_name(output: &Path) -> String {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_prefix('.').and_then(|n| n.rsplit_once(".partial-")) {
        Some((base, tag)) if tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()) => base.to_string(),
        _ => name,
    }
}

fn descriptor_text(shape: Shape, capacity: u64, file: &str) -> String {
    let cylinders = (capacity / (16 * 63)).clamp(1, 16383);
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={:08x}\nparentCID=ffffffff\ncreateType=\"{}\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\n",
        crate::clock::random_u32() | 1,
        shape.create_type(),
        file.replace('"', "_"),
    )
}

/// Writes `src` to `output` (a new file) as a VMDK of `shape`; returns the
/// bytes of the image file.
pub fn write_vmdk(
    shape: Shape,
    src: &dyn DiskSource,
    output: &Path,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<u64> {
    let size = src.size();
    if size % 512 != 0 {
        // A VMDK counts whole sectors: rounding up would hand back a bigger disk.
        return Err(Error::InvalidInput(format!(
            "a VMDK disk must be a multiple of 512 bytes; this one has {size} bytes (restore it as raw)"
        )));
    }
    let capacity = sectors_for(size);
    let grain_bytes = GRAIN_SECTORS * SECTOR;
    let mut h = SparseHeader {
        version: 1,
        flags: FLAG_VALID_NEWLINE_TEST,
        capacity,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: 0,
        num_gtes_per_gt: GTES,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: 0,
    };
    let gd_entries = h.gd_entries();
    let gd_sectors = sectors_for(gd_entries * 4);
    let desc = descriptor_text(shape, capacity, &final_name(output));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(output)
        .map_err(|e| Error::target(format!("creating {}", output.display()), e))?;
    let mut out = Out { file: &file, path: output, buf: Vec::with_capacity(2 << 20), pos: 0 };
    let mut gd = vec![0u32; gd_entries as usize];
    let mut gt = vec![0u32; GTES as usize];
    let mut gt_index: Option<u64> = None;
    let runs = grain_runs(&normalize(&src.allocated()?, size)?, grain_bytes, size);
    let total: u64 = runs.iter().map(|(a, b)| (b * grain_bytes).min(size) - a * grain_bytes).sum();
    let mut ticker = Ticker::new(progress, cancel, total);

    match shape {
        Shape::StreamOptimized => {
            h.version = 3;
            h.flags |= FLAG_COMPRESSED | FLAG_MARKERS;
            h.compress_algorithm = COMPRESS_DEFLATE;
            h.descriptor_size = sectors_for(desc.len() as u64).max(1);
            h.gd_offset = GD_AT_END;
            h.overhead = 1 + h.descriptor_size;
            out.put(&h.to_bytes())?;
            out.put(desc.as_bytes())?;
            out.pad()?;
            let mut enc_buf = Vec::with_capacity(grain_bytes as usize + 1024);
            for_each_grain(src, &runs, grain_bytes, &mut ticker, &mut |g, data| {
                let t = g / GTES as u64;
                if gt_index != Some(t) {
                    if let Some(prev) = gt_index {
                        gd[prev as usize] = write_stream_gt(&mut out, &gt)?;
                        gt.fill(0);
                    }
                    gt_index = Some(t);
                }
                enc_buf.clear();
                let mut enc = ZlibEncoder::new(std::mem::take(&mut enc_buf), Compression::fast());
                enc.write_all(data).map_err(|e| Error::target("compressing a grain", e))?;
                enc_buf = enc.finish().map_err(|e| Error::target("compressing a grain", e))?;
                gt[(g % GTES as u64) as usize] = out.sector()?;
                out.put(&(g * GRAIN_SECTORS).to_le_bytes())?;
                out.put(&(enc_buf.len() as u32).to_le_bytes())?;
                out.put(&enc_buf)?;
                out.pad()
            })?;
            if let Some(prev) = gt_index {
                gd[prev as usize] = write_stream_gt(&mut out, &gt)?;
            }
            out.put(&marker(gd_sectors, 0, MARKER_GD))?;
            let gd_at = out.sector()?;
            out.put(&table_bytes(&gd))?;
            out.pad()?;
            let mut footer = h.clone();
            footer.gd_offset = gd_at as u64;
            out.put(&marker(1, 0, MARKER_FOOTER))?;
            out.put(&footer.to_bytes())?;
            out.put(&marker(0, 0, MARKER_EOS))?;
            out.flush()?;
        }
        Shape::MonolithicSparse => {
            h.flags |= FLAG_REDUNDANT_GT;
            h.descriptor_size = SPARSE_DESCRIPTOR_SECTORS;
            if desc.len() as u64 > SPARSE_DESCRIPTOR_SECTORS * SECTOR {
                return Err(Error::InvalidInput(format!("the descriptor for {} is too long", output.display())));
            }
            let all_gts = gd_entries * GT_SECTORS;
            h.rgd_offset = 1 + SPARSE_DESCRIPTOR_SECTORS;
            let rgt_start = h.rgd_offset + gd_sectors;
            h.gd_offset = rgt_start + all_gts;
            let gt_start = h.gd_offset + gd_sectors;
            h.overhead = (gt_start + all_gts + GRAIN_SECTORS - 1) / GRAIN_SECTORS * GRAIN_SECTORS;
            if gt_start + all_gts > u32::MAX as u64 {
                return Err(Error::InvalidInput(format!(
                    "a disk of {size} bytes is too large for a monolithicSparse VMDK"
                )));
            }
            out.put(&h.to_bytes())?;
            out.put(desc.as_bytes())?;
            let dirs = |start: u64| (0..gd_entries).map(|i| (start + i * GT_SECTORS) as u32).collect::<Vec<u32>>();
            out.write_at(&table_bytes(&dirs(rgt_start)), h.rgd_offset * SECTOR)?;
            out.write_at(&table_bytes(&dirs(gt_start)), h.gd_offset * SECTOR)?;
            out.flush()?;
            out.pos = h.overhead * SECTOR;
            let flush_gt = |out: &Out, t: u64, gt: &[u32]| -> Result<()> {
                let bytes = table_bytes(gt);
                out.write_at(&bytes, (rgt_start + t * GT_SECTORS) * SECTOR)?;
                out.write_at(&bytes, (gt_start + t * GT_SECTORS) * SECTOR)
            };
            for_each_grain(src, &runs, grain_bytes, &mut ticker, &mut |g, data| {
                let t = g / GTES as u64;
                if gt_index != Some(t) {
                    if let Some(prev) = gt_index {
                        flush_gt(&out, prev, &gt)?;
                        gt.fill(0);
                    }
                    gt_index = Some(t);
                }
                gt[(g % GTES as u64) as usize] = out.sector()?;
                out.put(data)
            })?;
            if let Some(prev) = gt_index {
                flush_gt(&out, prev, &gt)?;
            }
            out.flush()?;
            let end = out.pos.max(h.overhead * SECTOR);
            file.set_len(end).map_err(|e| Error::target(format!("sizing {}", output.display()), e))?;
        }
    }
    ticker.finish()?;
    file.sync_all().map_err(|e| Error::target(format!("syncing {}", output.display()), e))?;
    file.metadata().map(|m| m.len()).map_err(|e| Error::target(format!("reading {}", output.display()), e))
}

fn table_bytes(t: &[u32]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Writes a grain table behind its marker; returns its sector.
fn write_stream_gt(out: &mut Out, gt: &[u32]) -> Result<u32> {
    out.put(&marker(GT_SECTORS, 0, MARKER_GT))?;
    let at = out.sector()?;
    out.put(&table_bytes(gt))?;
    out.pad()?;
    Ok(at)
}

/// Ranges `[first, end)` of grains that hold allocated bytes.
fn grain_runs(allocated: &[Extent], grain_bytes: u64, size: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in allocated {
        let first = e.start / grain_bytes;
        let end = (e.end().min(size) + grain_bytes - 1) / grain_bytes;
        match runs.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ if first < end => runs.push((first, end)),
            _ => {}
        }
    }
    runs
}

/// Calls `f` with each grain of the runs that is not all zeros, in disk
/// order; the last grain is padded with zeros.
fn for_each_grain(
    src: &dyn DiskSource,
    runs: &[(u64, u64)],
    grain_bytes: u64,
    ticker: &mut Ticker,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let size = src.size();
    let mut buf = vec![0u8; (BATCH_GRAINS * grain_bytes) as usize];
    for &(first, end) in runs {
        let mut g = first;
        while g < end {
            let n = (end - g).min(BATCH_GRAINS);
            let start = g * grain_bytes;
            let len = (n * grain_bytes).min(size - start) as usize;
            src.read_at(&mut buf[..len], start)?;
            buf[len..(n * grain_bytes) as usize].fill(0);
            for k in 0..n {
                let data = &buf[(k * grain_bytes) as usize..((k + 1) * grain_bytes) as usize];
                if data.iter().any(|b| *b != 0) {
                    f(g + k, data)?;
                }
            }
            ticker.advance(len as u64)?;
            g += n;
        }
    }
    Ok(())
}

/// Sequential output, buffered; `pos` is where `buf` starts in the file.
struct Out<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    pos: u64,
}

impl<'a> Out<'a> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    /// Pads to the next sector boundary.
    fn pad(&mut self) -> Result<()> {
        let r = (self.pos + self.buf.len() as u64) % SECTOR;
        if r != 0 {
            self.buf.resize(self.buf.len() + (SECTOR - r) as usize, 0);
        }
        Ok(())
    }

    /// The sector where the next byte goes (a table entry: 32 bits).
    fn sector(&self) -> Result<u32> {
        let s = (self.pos + self.buf.len() as u64) / SECTOR;
        u32::try_from(s).map_err(|_| {
            Error::InvalidInput(format!("{} would grow past 2 TiB of sectors a VMDK can address", self.path.display()))
        })
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.pos).map_err(|e| {
                Error::target(format!("writing {}+{} of {}", self.pos, self.buf.len(), self.path.display()), e)
            })?;
            self.pos += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes at a fixed place (tables), apart from the sequential stream.
    fn write_at(&self, b: &[u8], at: u64) -> Result<()> {
        self.file
            .write_all_at(b, at)
            .map_err(|e| Error::target(format!("writing {}+{} of {}", at, b.len(), self.path.display()), e))
    }
}
