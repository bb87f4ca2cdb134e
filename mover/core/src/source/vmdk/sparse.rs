//! A hosted sparse extent: header, grain directory, grain tables and grains,
//! plain (monolithicSparse, twoGbMaxExtentSparse) or deflate-compressed
//! behind grain markers (streamOptimized).
//!
//! Every number read from the file is checked against the file's length
//! before it sizes anything: the grain directory must lie inside the file,
//! the grain tables it names must fit in the file all together, and every
//! grain must start inside it. So a hostile header can make us allocate at
//! most about as much as the file is long, and never loop past its tables.

use super::header::{SparseHeader, GD_AT_END, SECTOR};
use crate::error::{Error, Result};
use crate::extents::Extent;
use flate2::{Decompress, FlushDecompress, Status};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The grain directory is read whole; 32 Mi entries describe more than the
/// largest VMDK VMware supports (62 TiB) even with 4 KiB grains.
const MAX_GD_ENTRIES: u64 = 32 << 20;
/// A grain marker: lba (u64) and size (u32) of the compressed bytes after it.
const GRAIN_MARKER_LEN: u64 = 12;
/// Decoded grains kept, so reads smaller than a grain do not inflate it again.
const CACHED_GRAINS: usize = 8;

/// What a grain table entry says about a grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Entry 0: not in this extent (a parent's, or zeros).
    Unallocated,
    /// Entry 1: a grain of zeros, even over a parent's data.
    Zero,
    /// The grain (or its marker, when compressed) starts at this file offset.
    At(u64),
}

pub struct SparseExtent {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: SparseHeader,
    /// Grain tables by directory index; `None` for an absent or empty table.
    tables: Vec<Option<Box<[u32]>>>,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

fn read_exact(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| Error::source_io(format!("reading {}+{} of {}", offset, buf.len(), path.display()), e))
}

/// The file while its header and tables are being checked.
struct Raw<'a> {
    file: &'a File,
    path: &'a Path,
    file_len: u64,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Source(format!("{} is not a valid VMDK sparse extent: {what}", path.display()))
}

impl<'a> Raw<'a> {
    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        corrupt(self.path, what)
    }

    fn read_header(&self) -> Result<SparseHeader> {
        let mut b = [0u8; 512];
        if self.file_len < SECTOR {
            return Err(self.corrupt(format!("the file holds {} bytes, less than a header", self.file_len)));
        }
        read_exact(self.file, self.path, &mut b, 0)?;
        let mut h = SparseHeader::parse(&b).map_err(|e| self.corrupt(e))?;
        h.validate().map_err(|e| self.corrupt(e))?;
        if h.gd_offset == GD_AT_END {
            // streamOptimized written as a stream: the footer, one sector
            // before the end-of-stream marker, holds the real directory.
            if self.file_len < 3 * SECTOR {
                return Err(self.corrupt("the grain directory is at the end, but the file has no footer"));
            }
            read_exact(self.file, self.path, &mut b, self.file_len - 2 * SECTOR)?;
            let footer = SparseHeader::parse(&b).map_err(|e| self.corrupt(format!("footer: {e}")))?;
            footer.validate().map_err(|e| self.corrupt(format!("footer: {e}")))?;
            if footer.gd_offset == GD_AT_END || footer.capacity != h.capacity || footer.grain_size != h.grain_size {
                return Err(self.corrupt("the footer does not match the header"));
            }
            h = footer;
        }
        Ok(h)
    }

    fn load_tables(&self, h: &SparseHeader) -> Result<Vec<Option<Box<[u32]>>>> {
        let n = h.gd_entries();
        if n > MAX_GD_ENTRIES {
            return Err(self.corrupt(format!("a capacity of {} sectors needs {n} grain tables", h.capacity)));
        }
        let gd_start = h.gd_offset.checked_mul(SECTOR);
        let gd_end = gd_start.and_then(|s| s.checked_add(n * 4));
        match (gd_start, gd_end) {
            (Some(s), Some(e)) if s > 0 && e <= self.file_len => {}
            _ => {
                return Err(self.corrupt(format!(
                    "the grain directory ({n} entries at sector {}) is not inside the file ({} bytes)",
                    h.gd_offset, self.file_len
                )))
            }
        }
        let mut gd = vec![0u8; (n * 4) as usize];
        read_exact(self.file, self.path, &mut gd, h.gd_offset * SECTOR)?;
        let gd: Vec<u32> = gd.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let per = h.num_gtes_per_gt as u64;
        let gt_bytes = per * 4;
        let present = gd.iter().filter(|e| **e != 0).count() as u64;
        // Real tables are distinct areas of the file; a directory that names
        // more table bytes than the file holds is lying.
        if present.saturating_mul(gt_bytes) > self.file_len {
            return Err(self.corrupt(format!(
                "the grain directory names {present} tables of {gt_bytes} bytes, more than the file holds ({} bytes)",
                self.file_len
            )));
        }
        let cap_bytes = h.capacity * SECTOR;
        let grain_bytes = h.grain_bytes();
        let mut tables = Vec::with_capacity(n as usize);
        let mut raw = vec![0u8; gt_bytes as usize];
        for (i, sector) in gd.iter().enumerate() {
            if *sector == 0 {
                tables.push(None);
                continue;
            }
            let at = *sector as u64 * SECTOR;
            if at + gt_bytes > self.file_len {
                return Err(self.corrupt(format!(
                    "grain table {i} at sector {sector} reaches past the end of the file ({} bytes)",
                    self.file_len
                )));
            }
            read_exact(self.file, self.path, &mut raw, at)?;
            let gt: Box<[u32]> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            for (j, e) in gt.iter().enumerate() {
                if *e <= 1 {
                    continue;
                }
                let g = i as u64 * per + j as u64;
                let start = g * grain_bytes;
                if start >= cap_bytes {
                    continue; // past the capacity: never read
                }
                let need = if h.compressed() { GRAIN_MARKER_LEN } else { grain_bytes.min(cap_bytes - start) };
                if *e as u64 * SECTOR + need > self.file_len {
                    return Err(self.corrupt(format!(
                        "grain table {i} entry {j} points at sector {e}, past the end of the file ({} bytes)",
                        self.file_len
                    )));
                }
            }
            tables.push(if gt.iter().all(|e| *e == 0) { None } else { Some(gt) });
        }
        Ok(tables)
    }
}

impl SparseExtent {
    /// Opens a sparse extent file: reads and checks its header (or the
    /// footer of a streamOptimized file) and loads its grain tables.
    /// `block_ok`: see `open_file`.
    pub fn open(path: &Path, block_ok: bool) -> Result<SparseExtent> {
        let file = super::open_file(path, block_ok)?;
        let file_len = file.metadata().map_err(|e| Error::source_io(format!("reading {}", path.display()), e))?.len();
        let r = Raw { file: &file, path, file_len };
        let header = r.read_header()?;
        let tables = r.load_tables(&header)?;
        Ok(SparseExtent {
            file,
            path: path.to_path_buf(),
            file_len,
            header,
            tables,
            cache: Mutex::new(VecDeque::with_capacity(CACHED_GRAINS)),
        })
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        corrupt(&self.path, what)
    }

    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the extent describes.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    /// The embedded descriptor text, if the header points at one.
    pub fn embedded_descriptor(&self) -> Result<Option<String>> {
        let h = &self.header;
        if h.descriptor_offset == 0 || h.descriptor_size == 0 {
            return Ok(None);
        }
        let start = h.descriptor_offset.checked_mul(SECTOR);
        let len = h.descriptor_size.checked_mul(SECTOR).filter(|l| *l <= super::descriptor::MAX_DESCRIPTOR_BYTES);
        let (start, len) = match (start, len) {
            (Some(s), Some(l)) if s.checked_add(l).is_some_and(|e| e <= self.file_len) => (s, l),
            _ => return Err(self.corrupt("the embedded descriptor is not inside the file or is too large")),
        };
        let mut b = vec![0u8; len as usize];
        read_exact(&self.file, &self.path, &mut b, start)?;
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        Ok(Some(String::from_utf8_lossy(&b[..end]).into_owned()))
    }

    pub fn grain(&self, index: u64) -> Grain {
        let per = self.header.num_gtes_per_gt as u64;
        let e = match self.tables.get((index / per) as usize) {
            Some(Some(gt)) => gt[(index % per) as usize],
            _ => 0,
        };
        match e {
            0 => Grain::Unallocated,
            1 => Grain::Zero,
            s => Grain::At(s as u64 * SECTOR),
        }
    }

    /// Areas with grains of their own, relative to the extent's start.
    pub fn allocated(&self) -> Vec<Extent> {
        let per = self.header.num_gtes_per_gt as u64;
        let gb = self.header.grain_bytes();
        let cap = self.capacity_bytes();
        let mut out: Vec<Extent> = Vec::new();
        for (i, gt) in self.tables.iter().enumerate() {
            let gt = match gt {
                Some(gt) => gt,
                None => continue,
            };
            for (j, e) in gt.iter().enumerate() {
                let start = (i as u64 * per + j as u64) * gb;
                if *e <= 1 || start >= cap {
                    continue;
                }
                let len = gb.min(cap - start);
                match out.last_mut() {
                    Some(last) if last.end() == start => last.length += len,
                    _ => out.push(Extent::new(start, len)),
                }
            }
        }
        out
    }

    /// Fills `buf` with the extent's bytes at `offset` (relative to the
    /// extent). Areas without a grain of their own are left to `fallback`,
    /// called with the piece and its offset (a parent's bytes, or zeros).
    pub fn read(&self, buf: &mut [u8], offset: u64, fallback: &dyn Fn(&mut [u8], u64) -> Result<()>) -> Result<()> {
        let gb = self.header.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let g = pos / gb;
            let within = pos - g * gb;
            let n = ((gb - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if pos >= self.capacity_bytes() {
                fallback(out, pos)?;
            } else {
                match self.grain(g) {
                    Grain::Unallocated => fallback(out, pos)?,
                    Grain::Zero => out.fill(0),
                    Grain::At(at) if self.header.compressed() => {
                        let data = self.inflate(g, at)?;
                        out.copy_from_slice(&data[within as usize..within as usize + n]);
                    }
                    Grain::At(at) => self.read_plain(out, at + within)?,
                }
            }
            done += n;
        }
        Ok(())
    }

    fn read_plain(&self, out: &mut [u8], at: u64) -> Result<()> {
        match self.file.read_exact_at(out, at) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.corrupt(format!("a grain at {at} reaches past the end of the file ({} bytes)", self.file_len)))
            }
            Err(e) => Err(Error::source_io(format!("reading {}+{} of {}", at, out.len(), self.path.display()), e)),
        }
    }

    /// The decoded bytes of compressed grain `g` whose marker is at `at`.
    fn inflate(&self, g: u64, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((_, d)) = self.cache.lock().expect("grain cache").iter().find(|(k, _)| *k == g) {
            return Ok(d.clone());
        }
        let gb = self.header.grain_bytes();
        let mut m = [0u8; GRAIN_MARKER_LEN as usize];
        read_exact(&self.file, &self.path, &mut m, at)?;
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&m[0..8]);
        let lba = u64::from_le_bytes(lba);
        let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as u64;
        if lba != g * self.header.grain_size {
            return Err(self.corrupt(format!(
                "the grain marker at {at} is for sector {lba}, the grain table says {}",
                g * self.header.grain_size
            )));
        }
        // Deflate never grows data by more than a few bytes per block.
        if size == 0 || size > 2 * gb + 1024 || at + GRAIN_MARKER_LEN + size > self.file_len {
            return Err(self.corrupt(format!("the grain at {at} claims {size} compressed bytes")));
        }
        let mut input = vec![0u8; size as usize];
        read_exact(&self.file, &self.path, &mut input, at + GRAIN_MARKER_LEN)?;
        let mut out = vec![0u8; gb as usize];
        let n = inflate_into(&input, &mut out).map_err(|e| self.corrupt(format!("the grain at {at}: {e}")))?;
        let need = gb.min(self.capacity_bytes() - g * gb) as usize;
        if n < need {
            return Err(self.corrupt(format!("the grain at {at} inflates to {n} bytes, not {need}")));
        }
        let data = Arc::new(out);
        let mut cache = self.cache.lock().expect("grain cache");
        if cache.len() == CACHED_GRAINS {
            cache.pop_front();
        }
        cache.push_back((g, data.clone()));
        Ok(data)
    }
}

/// Inflates a zlib stream (what VMware and qemu write) or, failing the zlib
/// header check, a raw deflate stream into `out`; never writes past it.
pub fn inflate_into(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    let zlib = input.len() >= 2 && input[0] & 0x0f == 8 && (u16::from(input[0]) << 8 | u16::from(input[1])) % 31 == 0;
    let mut d = Decompress::new(zlib);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) => Ok(d.total_out() as usize),
        Ok(_) => Err(format!("does not inflate to at most {} bytes", out.len())),
        Err(e) => Err(format!("does not inflate: {e}")),
    }
}
