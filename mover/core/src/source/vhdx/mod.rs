//! VHDX images (Hyper-V): fixed, dynamic and differencing, 512- and
//! 4096-byte logical sectors, any block size, read natively per [MS-VHDX].
//!
//! Opening picks the current header (valid CRC-32C, larger sequence number),
//! replays a non-empty log in memory (the file is opened read-only and never
//! written), reads the region table, the metadata and the BAT through that
//! overlay, and, for a differencing disk, opens the parent the way Hyper-V
//! finds it. Every length and offset read from the file is checked against
//! the file's size before it is used to allocate or to read.

pub mod crc32c;
mod format;
pub mod guid;
mod log;
mod parent;

pub use format::{
    bat_entries, build_header, build_metadata, build_region_table, chunk_ratio, current_header, parse_header,
    payload_index, HEADER_OFFSETS, HEADER_SIZE,
};
pub use format::{
    guid as known_guid, Header, Metadata, Region, BAT_GUID, FILE_SIGNATURE, METADATA_GUID, MIB, PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT, PAYLOAD_ZERO,
};
pub use log::build_entry as build_log_entry;
pub use parent::file_name as file_name_of;

use super::DiskSource;
use crate::error::{Error, Result};
use crate::extents::{normalize, Extent};
use format::*;
use guid::Guid;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Longest chain of differencing disks we follow.
pub const MAX_CHAIN: usize = 64;
/// Largest BAT or metadata region we read into memory.
const MAX_TABLE: u64 = 1 << 30;

/// The file, seen through the replayed log.
struct Image {
    file: File,
    path: PathBuf,
    /// Size of the file on disk.
    file_len: u64,
    /// Size after replay: reads between `file_len` and this are zeros.
    len: u64,
    overlay: Option<log::Overlay>,
}

impl Image {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let end = off.checked_add(buf.len() as u64).filter(|e| *e <= self.len).ok_or_else(|| {
            Error::Source(format!("{}: read {}+{} past the end of the file", self.path.display(), off, buf.len()))
        })?;
        let phys = end.min(self.file_len).saturating_sub(off) as usize;
        if phys > 0 {
            self.file
                .read_exact_at(&mut buf[..phys], off)
                .map_err(|e| Error::source_io(format!("reading {}+{} of {}", off, phys, self.path.display()), e))?;
        }
        buf[phys..].fill(0);
        if let Some(ov) = &self.overlay {
            ov.apply(buf, off);
        }
        Ok(())
    }

    fn read_vec(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.read(&mut v, off)?;
        Ok(v)
    }
}

pub struct VhdxSource {
    img: Image,
    meta: Metadata,
    bat: Vec<u64>,
    ratio: u64,
    parent: Option<Box<VhdxSource>>,
    data_write: Guid,
    kind: &'static str,
    /// The current header, and the BAT region's offset in the file.
    header: Header,
    bat_offset: u64,
}

/// What an in-place writer (`target/vhdx_in_place.rs`) needs of an open file.
pub struct Layout {
    pub header: Header,
    pub meta: Metadata,
    pub bat: Vec<u64>,
    pub bat_offset: u64,
    pub ratio: u64,
    pub file_len: u64,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Source(format!("{} is not a valid VHDX image: {what}", path.display()))
}

impl VhdxSource {
    /// Opens a VHDX file and, for a differencing disk, its chain of parents.
    pub fn open(path: &Path) -> Result<VhdxSource> {
        let mut seen = Vec::new();
        Self::open_chain(path, &mut seen)
    }

    fn open_chain(path: &Path, seen: &mut Vec<PathBuf>) -> Result<VhdxSource> {
        // A parent (named inside a child) must be a regular file; the disk
        // named by the user may be an image copied onto a block device.
        let mut src = Self::open_one(path, seen.is_empty())?;
        if src.meta.has_parent {
            let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            if seen.contains(&canon) {
                return Err(corrupt(path, "its chain of parents loops back to itself"));
            }
            seen.push(canon);
            if seen.len() > MAX_CHAIN {
                return Err(corrupt(path, format!("the chain of parents is longer than {MAX_CHAIN}")));
            }
            let parent = parent::locate(path, &src.meta.parent_locator, seen)?;
            if parent.meta.virtual_size != src.meta.virtual_size {
                return Err(corrupt(
                    path,
                    format!(
                        "its parent {} has {} bytes where the child has {}",
                        parent.img.path.display(),
                        parent.meta.virtual_size,
                        src.meta.virtual_size
                    ),
                ));
            }
            src.parent = Some(Box::new(parent));
        }
        Ok(src)
    }

    /// Opens one file of a chain, without its parent.
    fn open_one(path: &Path, block_ok: bool) -> Result<VhdxSource> {
        // Sized like a raw source, so an image copied onto a block device works too.
        let what = if block_ok { "source" } else { "VHDX parent" };
        let (file, file_len, _) = crate::source::open_image(path, what, block_ok)?;
        let mut img = Image { file, path: path.to_path_buf(), file_len, len: file_len, overlay: None };
        if file_len < 1024 * 1024 {
            return Err(corrupt(path, format!("{file_len} bytes is too small")));
        }
        let sig = img.read_vec(0, 8)?;
        if sig != FILE_SIGNATURE {
            return Err(corrupt(path, "no 'vhdxfile' signature"));
        }
        let h1 = img.read_vec(HEADER_OFFSETS[0], HEADER_SIZE as u64)?;
        let h2 = img.read_vec(HEADER_OFFSETS[1], HEADER_SIZE as u64)?;
        let header = current_header(parse_header(&h1), parse_header(&h2)).map_err(|e| corrupt(path, e))?;
        if header.version != 1 {
            return Err(corrupt(path, format!("header version {} (this reader knows 1)", header.version)));
        }
        if !header.log_guid.is_zero() {
            let (lo, ll) = (header.log_offset, header.log_length as u64);
            if ll > log::MAX_LOG || lo < MIB || lo.checked_add(ll).is_none_or(|e| e > file_len) {
                return Err(corrupt(path, format!("log {lo}+{ll} lies outside the file or is too large")));
            }
            let bytes = img.read_vec(lo, ll)?;
            let ov = log::replay(&bytes, &header.log_guid, file_len).map_err(|e| corrupt(path, e))?;
            // The log can extend the file, but by no more than it carries.
            img.len = file_len.max(ov.last_file_offset.min(file_len.saturating_add(ll)));
            img.overlay = Some(ov);
        }
        // Region tables are not logged either; use whichever is valid.
        let r1 = img.read_vec(REGION_OFFSETS[0], REGION_TABLE_SIZE as u64)?;
        let regions = match parse_region_table(&r1) {
            Ok(r) => r,
            Err(e1) => parse_region_table(&img.read_vec(REGION_OFFSETS[1], REGION_TABLE_SIZE as u64)?)
                .map_err(|e2| corrupt(path, format!("neither region table is valid ({e1}; {e2})")))?,
        };
        let (bat_guid, meta_guid) = (guid(BAT_GUID), guid(METADATA_GUID));
        if let Some(r) = regions.iter().find(|r| r.required && r.guid != bat_guid && r.guid != meta_guid) {
            return Err(corrupt(path, format!("required region {} is unknown to this reader", r.guid)));
        }
        let region = |g: Guid, name: &str| -> Result<Region> {
            let r = regions.iter().find(|r| r.guid == g).ok_or_else(|| corrupt(path, format!("no {name} region")))?;
            let ok = r.offset >= MIB
                && r.offset % MIB == 0
                && (r.length as u64) <= MAX_TABLE
                && r.offset.checked_add(r.length as u64).is_some_and(|e| e <= file_len);
            if !ok {
                return Err(corrupt(path, format!("{name} region {}+{} lies outside the file", r.offset, r.length)));
            }
            Ok(r.clone())
        };
        let mr = region(meta_guid, "metadata")?;
        let meta = parse_metadata(&img.read_vec(mr.offset, mr.length as u64)?).map_err(|e| corrupt(path, e))?;
        let ratio = chunk_ratio(meta.logical_sector, meta.block_size);
        let n = bat_entries(meta.virtual_size, meta.block_size, ratio, meta.has_parent);
        let br = region(bat_guid, "BAT")?;
        if n * 8 > br.length as u64 {
            return Err(corrupt(path, format!("the BAT region holds {} entries, the disk needs {n}", br.length / 8)));
        }
        let raw = img.read_vec(br.offset, n * 8)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let bs = meta.block_size as u64;
        for (i, e) in bat.iter().enumerate() {
            let (state, off) = (e & 7, (e >> 20) * MIB);
            let is_bitmap = i as u64 % (ratio + 1) == ratio;
            let len = if is_bitmap { MIB } else { bs };
            let present = if is_bitmap {
                state == SB_PRESENT
            } else {
                match state {
                    PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => false,
                    PAYLOAD_FULLY_PRESENT => true,
                    PAYLOAD_PARTIALLY_PRESENT if meta.has_parent => true,
                    s => return Err(corrupt(path, format!("BAT entry {i} has invalid state {s}"))),
                }
            };
            if present && (off < MIB || off.checked_add(len).is_none_or(|end| end > img.len)) {
                return Err(corrupt(
                    path,
                    format!("BAT entry {i} points at {off}+{len}, past the end of the file ({} bytes)", img.len),
                ));
            }
        }
        let kind = if meta.has_parent {
            "vhdx:differencing"
        } else if meta.leave_blocks_allocated {
            "vhdx:fixed"
        } else {
            "vhdx:dynamic"
        };
        let data_write = header.data_write;
        Ok(VhdxSource { img, meta, bat, ratio, parent: None, data_write, kind, header, bat_offset: br.offset })
    }

    /// Opens one file without following a parent (an in-place writer refuses
    /// differencing disks), returning its layout besides.
    pub fn open_single(path: &Path) -> Result<(VhdxSource, Layout)> {
        let src = Self::open_one(path, true)?;
        let layout = Layout {
            header: src.header.clone(),
            meta: src.meta.clone(),
            bat: src.bat.clone(),
            bat_offset: src.bat_offset,
            ratio: src.ratio,
            file_len: src.img.file_len,
        };
        Ok((src, layout))
    }

    /// How many log entries were replayed in memory when the file was opened.
    pub fn log_entries_replayed(&self) -> usize {
        self.img.overlay.as_ref().map_or(0, |o| o.entries)
    }

    pub fn logical_sector_size(&self) -> u32 {
        self.meta.logical_sector
    }

    fn read_parent(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.parent {
            Some(p) => p.read_at(buf, off),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads within one payload block.
    fn read_block(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let bs = self.meta.block_size as u64;
        let b = off / bs;
        let within = off % bs;
        let e = self.bat[payload_index(b, self.ratio) as usize];
        let file_off = (e >> 20) * MIB;
        match e & 7 {
            PAYLOAD_FULLY_PRESENT => self.img.read(buf, file_off + within),
            PAYLOAD_PARTIALLY_PRESENT => self.read_partial(buf, off, file_off + within),
            PAYLOAD_ZERO => {
                buf.fill(0);
                Ok(())
            }
            _ => self.read_parent(buf, off),
        }
    }

    /// A partially present block of a differencing disk: sectors whose bit
    /// is set in the sector bitmap are here, the others in the parent.
    fn read_partial(&self, buf: &mut [u8], off: u64, file_off: u64) -> Result<()> {
        let ss = self.meta.logical_sector as u64;
        let bs = self.meta.block_size as u64;
        let b = off / bs;
        let chunk = b / self.ratio;
        let sb = self.bat[(chunk * (self.ratio + 1) + self.ratio) as usize];
        if sb & 7 != SB_PRESENT {
            return Err(corrupt(&self.img.path, format!("block {b} is partially present but has no sector bitmap")));
        }
        // Sector number within the chunk; the bitmap holds one bit per sector, LSB first.
        let first = ((b % self.ratio) * bs + off % bs) / ss;
        let last = ((b % self.ratio) * bs + (off % bs) + buf.len() as u64 - 1) / ss;
        let bits = self.img.read_vec((sb >> 20) * MIB + first / 8, last / 8 - first / 8 + 1)?;
        let present = |s: u64| bits[((s / 8) - first / 8) as usize] >> (s % 8) & 1 == 1;
        let mut pos = 0usize;
        while pos < buf.len() {
            let s = first + (off % ss + pos as u64) / ss;
            let here = present(s);
            // Extend the run while sectors agree.
            let mut end = ((s - first + 1) * ss - off % ss) as usize;
            while end < buf.len() && present(first + (off % ss + end as u64) / ss) == here {
                end += ss as usize;
            }
            let end = end.min(buf.len());
            if here {
                self.img.read(&mut buf[pos..end], file_off + pos as u64)?;
            } else {
                self.read_parent(&mut buf[pos..end], off + pos as u64)?;
            }
            pos = end;
        }
        Ok(())
    }
}

impl DiskSource for VhdxSource {
    fn size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.meta.virtual_size).ok_or_else(|| {
            Error::InvalidInput(format!(
                "read {}+{} is past the end of {} ({} bytes)",
                offset,
                buf.len(),
                self.describe(),
                self.meta.virtual_size
            ))
        })?;
        let bs = self.meta.block_size as u64;
        let mut pos = offset;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            self.read_block(&mut buf[at..at + n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        let bs = self.meta.block_size as u64;
        let size = self.meta.virtual_size;
        let blocks = (size + bs - 1) / bs;
        let mut out: Vec<Extent> = Vec::new();
        for b in 0..blocks {
            let state = self.bat[payload_index(b, self.ratio) as usize] & 7;
            if state == PAYLOAD_FULLY_PRESENT || state == PAYLOAD_PARTIALLY_PRESENT {
                let start = b * bs;
                let len = bs.min(size - start);
                match out.last_mut() {
                    Some(l) if l.end() == start => l.length += len,
                    _ => out.push(Extent::new(start, len)),
                }
            }
        }
        if let Some(p) = &self.parent {
            out.extend(p.allocated()?);
            out = normalize(&out, size)?;
        }
        Ok(out)
    }

    fn format(&self) -> &'static str {
        self.kind
    }

    fn describe(&self) -> String {
        self.img.path.display().to_string()
    }
}

#[cfg(test)]
mod tests;
