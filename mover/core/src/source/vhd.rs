//! VHD images (Virtual PC / Hyper-V before VHDX): fixed, dynamic and
//! differencing, per Microsoft's "Virtual Hard Disk Image Format
//! Specification" (2006).
//!
//! A fixed VHD is the raw disk followed by a 512-byte footer ("conectix").
//! Dynamic and differencing disks keep a copy of the footer at offset 0, a
//! dynamic header ("cxsparse") with the BAT (big-endian sector numbers,
//! 0xFFFFFFFF = unallocated) and, per block, a sector bitmap (MSB first)
//! before the block's data. A differencing disk names its parent in parent
//! locators (W2ru relative, W2ku absolute UTF-16LE paths) and by the
//! parent's footer UniqueId. All fields are big-endian; both structures are
//! protected by a one's-complement byte-sum checksum.

use super::{DiskSource, FileSource};
use crate::error::{Error, Result};
use crate::extents::{normalize, Extent};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FOOTER_SIZE: usize = 512;
const HEADER_SIZE: usize = 1024;
const UNUSED: u32 = 0xFFFF_FFFF;
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
/// VHD's limit is 2040 GiB; allow up to 2 TiB.
pub const MAX_SIZE: u64 = 2 << 40;
const MAX_CHAIN: usize = 64;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

/// One's complement of the byte sum, with the checksum field taken as zero.
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let sum: u32 = b.iter().enumerate().filter(|(i, _)| !(field..field + 4).contains(i)).map(|(_, v)| *v as u32).sum();
    !sum
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub data_offset: u64,
    pub current_size: u64,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
}

/// Parses a 512-byte footer; `Err` unless cookie and checksum are right.
pub fn parse_footer(b: &[u8]) -> std::result::Result<Footer, String> {
    if b.len() < FOOTER_SIZE || &b[0..8] != b"conectix" {
        return Err("no 'conectix' footer".into());
    }
    let b = &b[..FOOTER_SIZE];
    if be32(b, 64) != checksum(b, 64) {
        return Err("footer checksum does not match".into());
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&b[68..84]);
    let f = Footer { data_offset: be64(b, 16), current_size: be64(b, 48), disk_type: be32(b, 60), unique_id };
    if ![DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING].contains(&f.disk_type) {
        return Err(format!("disk type {} is not fixed, dynamic or differencing", f.disk_type));
    }
    if f.current_size > MAX_SIZE || f.current_size % 512 != 0 {
        return Err(format!("disk size {} is not a multiple of 512 up to 2 TiB", f.current_size));
    }
    Ok(f)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_entries: u32,
    pub block_size: u32,
    pub parent_id: [u8; 16],
    pub parent_name: String,
    /// (platform code, file offset, length in bytes)
    pub locators: Vec<([u8; 4], u64, u32)>,
}

pub fn parse_dyn_header(b: &[u8]) -> std::result::Result<DynHeader, String> {
    if b.len() < HEADER_SIZE || &b[0..8] != b"cxsparse" {
        return Err("no 'cxsparse' dynamic header".into());
    }
    let b = &b[..HEADER_SIZE];
    if be32(b, 36) != checksum(b, 36) {
        return Err("dynamic header checksum does not match".into());
    }
    let block_size = be32(b, 32);
    if !block_size.is_power_of_two() || !(4096..=256 << 20).contains(&block_size) {
        return Err(format!("block size {block_size} is not a power of two between 4 KiB and 256 MiB"));
    }
    let mut parent_id = [0u8; 16];
    parent_id.copy_from_slice(&b[40..56]);
    let units: Vec<u16> =
        b[64..576].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
    let locators = (0..8)
        .map(|i| &b[576 + 24 * i..600 + 24 * i])
        .filter(|e| be32(e, 0) != 0)
        .map(|e| ([e[0], e[1], e[2], e[3]], be64(e, 16), be32(e, 8)))
        .collect();
    Ok(DynHeader {
        table_offset: be64(b, 16),
        max_entries: be32(b, 28),
        block_size,
        parent_id,
        parent_name: String::from_utf16_lossy(&units),
        locators,
    })
}

/// Whether the last 512 bytes of a file are a valid fixed-disk footer for a
/// file of `file_len` bytes (a raw disk is never mistaken for a VHD: the
/// checksum, the type and the size must all agree).
pub fn is_fixed_footer(tail: &[u8], file_len: u64) -> bool {
    matches!(parse_footer(tail), Ok(f) if f.disk_type == DISK_FIXED && f.current_size + FOOTER_SIZE as u64 <= file_len)
}

enum Layout {
    Fixed(FileSource),
    Sparse { file: File, bat: Vec<u32>, block: u64, bitmap: u64, parent: Option<Box<VhdSource>> },
}

pub struct VhdSource {
    path: PathBuf,
    footer: Footer,
    layout: Layout,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Source(format!("{} is not a valid VHD image: {what}", path.display()))
}

fn read(file: &File, path: &Path, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    file.read_exact_at(&mut v, off)
        .map_err(|e| Error::source_io(format!("reading {off}+{len} of {}", path.display()), e))?;
    Ok(v)
}

impl VhdSource {
    pub fn open(path: &Path) -> Result<VhdSource> {
        Self::open_chain(path, &mut Vec::new())
    }

    fn open_chain(path: &Path, seen: &mut Vec<PathBuf>) -> Result<VhdSource> {
        // Sized like a raw source, so an image copied onto a block device
        // works too; a parent (named inside a child) must be a regular file.
        let top = seen.is_empty();
        let what = if top { "source" } else { "VHD parent" };
        let (file, len, _) = super::open_image(path, what, top)?;
        if len < FOOTER_SIZE as u64 {
            return Err(corrupt(path, "shorter than a footer"));
        }
        // The footer at the end is authoritative; dynamic disks keep a copy at 0.
        let tail = read(&file, path, len - FOOTER_SIZE as u64, FOOTER_SIZE)?;
        let footer = match parse_footer(&tail) {
            Ok(f) => f,
            Err(e) => parse_footer(&read(&file, path, 0, FOOTER_SIZE)?)
                .map_err(|e2| corrupt(path, format!("{e}; copy at 0: {e2}")))?,
        };
        if footer.disk_type == DISK_FIXED {
            if footer.current_size + FOOTER_SIZE as u64 > len {
                return Err(corrupt(
                    path,
                    format!("a fixed disk of {} bytes needs a larger file", footer.current_size),
                ));
            }
            let inner = FileSource::open_as(path, what, top)?;
            return Ok(VhdSource { path: path.into(), footer, layout: Layout::Fixed(inner) });
        }
        let hoff = footer.data_offset;
        if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
            return Err(corrupt(path, format!("dynamic header offset {hoff} is past the end of the file")));
        }
        let h = parse_dyn_header(&read(&file, path, hoff, HEADER_SIZE)?).map_err(|e| corrupt(path, e))?;
        let block = h.block_size as u64;
        let blocks = (footer.current_size + block - 1) / block;
        if (h.max_entries as u64) < blocks {
            return Err(corrupt(path, format!("the BAT has {} entries, the disk needs {blocks}", h.max_entries)));
        }
        if h.table_offset.checked_add(4 * blocks).is_none_or(|e| e > len) {
            return Err(corrupt(path, format!("the BAT at {} lies past the end of the file", h.table_offset)));
        }
        let raw = read(&file, path, h.table_offset, 4 * blocks as usize)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        // Bitmap: one bit per 512-byte sector, padded to a sector.
        let bitmap = ((block / 512 + 7) / 8 + 511) / 512 * 512;
        for (i, s) in bat.iter().enumerate() {
            if *s != UNUSED && (*s as u64 * 512 + bitmap + block > len) {
                return Err(corrupt(
                    path,
                    format!("BAT entry {i} points at sector {s}, past the end of the file ({len} bytes)"),
                ));
            }
        }
        let parent = if footer.disk_type == DISK_DIFFERENCING {
            let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            if seen.contains(&canon) || seen.len() >= MAX_CHAIN {
                return Err(corrupt(path, "its chain of parents loops or is too long"));
            }
            seen.push(canon);
            Some(Box::new(Self::locate_parent(path, &file, len, &h, seen)?))
        } else {
            None
        };
        if let Some(p) = &parent {
            if p.footer.current_size != footer.current_size {
                return Err(corrupt(path, format!("its parent {} differs in size", p.path.display())));
            }
        }
        Ok(VhdSource { path: path.into(), footer, layout: Layout::Sparse { file, bat, block, bitmap, parent } })
    }

    fn locate_parent(path: &Path, file: &File, len: u64, h: &DynHeader, seen: &mut Vec<PathBuf>) -> Result<VhdSource> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut tried: Vec<PathBuf> = Vec::new();
        // Relative locators first, as Hyper-V does.
        let mut locs = h.locators.clone();
        locs.sort_by_key(|(code, _, _)| if code == b"W2ru" { 0 } else { 1 });
        for (code, off, n) in locs {
            if (code != *b"W2ru" && code != *b"W2ku") || n == 0 || n > 64 * 1024 || n % 2 != 0 {
                continue;
            }
            if off.checked_add(n as u64).is_none_or(|e| e > len) {
                continue;
            }
            let raw = read(file, path, off, n as usize)?;
            let units: Vec<u16> =
                raw.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
            let text = String::from_utf16_lossy(&units);
            let mut p = if code == *b"W2ru" { dir.to_path_buf() } else { PathBuf::new() };
            if code == *b"W2ru" {
                for part in text.split(['\\', '/']) {
                    match part {
                        "" | "." => {}
                        x => p.push(x),
                    }
                }
                tried.push(p);
            } else {
                if text.starts_with('/') {
                    p.push(&text);
                    tried.push(p);
                }
                if let Some(name) = super::vhdx::file_name_of(&text) {
                    tried.push(dir.join(name));
                }
            }
        }
        if !h.parent_name.is_empty() {
            if let Some(name) = super::vhdx::file_name_of(&h.parent_name) {
                tried.push(dir.join(name));
            }
        }
        tried.dedup();
        for c in &tried {
            if c.is_file() {
                let p = VhdSource::open_chain(c, seen)?;
                if p.footer.unique_id == h.parent_id {
                    return Ok(p);
                }
                return Err(Error::Source(format!(
                    "{} is not the parent of {}: its UniqueId differs from the child's ParentUniqueId",
                    c.display(),
                    path.display()
                )));
            }
        }
        let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        Err(Error::Source(format!(
            "the parent of differencing disk {} was not found (tried: {})",
            path.display(),
            if names.is_empty() { "no locators".into() } else { names.join(", ") }
        )))
    }
}

impl DiskSource for VhdSource {
    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.footer.current_size;
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= size).ok_or_else(|| {
            Error::InvalidInput(format!(
                "read {}+{} is past the end of {} ({size} bytes)",
                offset,
                buf.len(),
                self.path.display()
            ))
        })?;
        let (file, bat, block, bitmap, parent) = match &self.layout {
            Layout::Fixed(f) => return f.read_at(buf, offset),
            Layout::Sparse { file, bat, block, bitmap, parent } => (file, bat, *block, *bitmap, parent),
        };
        let mut pos = offset;
        while pos < end {
            let b = pos / block;
            let within = pos % block;
            let n = (block - within).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            let out = &mut buf[at..at + n];
            let s = bat[b as usize];
            let read_parent = |out: &mut [u8], off: u64| -> Result<()> {
                match parent {
                    Some(p) => p.read_at(out, off),
                    None => {
                        out.fill(0);
                        Ok(())
                    }
                }
            };
            if s == UNUSED {
                read_parent(out, pos)?;
            } else {
                let data = s as u64 * 512 + bitmap;
                let io = |out: &mut [u8], off: u64| {
                    file.read_exact_at(out, off).map_err(|e| {
                        Error::source_io(format!("reading {}+{} of {}", off, out.len(), self.path.display()), e)
                    })
                };
                if parent.is_none() {
                    // A dynamic disk's allocated block holds all its sectors.
                    io(out, data + within)?;
                } else {
                    let first = within / 512;
                    let last = (within + n as u64 - 1) / 512;
                    let bits = read(file, &self.path, s as u64 * 512 + first / 8, (last / 8 - first / 8 + 1) as usize)?;
                    let here = |sec: u64| bits[(sec / 8 - first / 8) as usize] & (0x80 >> (sec % 8)) != 0;
                    let mut p = 0usize;
                    while p < n {
                        let sec = (within + p as u64) / 512;
                        let h = here(sec);
                        let mut q = ((sec + 1) * 512 - within) as usize;
                        while q < n && here((within + q as u64) / 512) == h {
                            q += 512;
                        }
                        let q = q.min(n);
                        if h {
                            io(&mut out[p..q], data + within + p as u64)?;
                        } else {
                            read_parent(&mut out[p..q], pos + p as u64)?;
                        }
                        p = q;
                    }
                }
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        let size = self.footer.current_size;
        match &self.layout {
            Layout::Fixed(f) => {
                let v: Vec<Extent> = f
                    .allocated()?
                    .into_iter()
                    .filter(|e| e.start < size)
                    .map(|e| Extent::new(e.start, e.length.min(size - e.start)))
                    .collect();
                Ok(v)
            }
            Layout::Sparse { bat, block, parent, .. } => {
                let mut out: Vec<Extent> = Vec::new();
                for (b, s) in bat.iter().enumerate() {
                    if *s != UNUSED {
                        let start = b as u64 * block;
                        let len = (*block).min(size - start);
                        match out.last_mut() {
                            Some(l) if l.end() == start => l.length += len,
                            _ => out.push(Extent::new(start, len)),
                        }
                    }
                }
                if let Some(p) = parent {
                    out.extend(p.allocated()?);
                    out = normalize(&out, size)?;
                }
                Ok(out)
            }
        }
    }

    fn format(&self) -> &'static str {
        match self.footer.disk_type {
            DISK_FIXED => "vhd:fixed",
            DISK_DYNAMIC => "vhd:dynamic",
            _ => "vhd:differencing",
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn footer(disk_type: u32, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(b"conectix");
        b[16..24].copy_from_slice(&(if disk_type == DISK_FIXED { u64::MAX } else { 512 }).to_be_bytes());
        b[40..48].copy_from_slice(&size.to_be_bytes());
        b[48..56].copy_from_slice(&size.to_be_bytes());
        b[60..64].copy_from_slice(&disk_type.to_be_bytes());
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn footer_checks() {
        let f = footer(DISK_FIXED, 1 << 20);
        assert_eq!(parse_footer(&f).unwrap().current_size, 1 << 20);
        assert!(is_fixed_footer(&f, (1 << 20) + 512));
        assert!(!is_fixed_footer(&f, 1 << 20));
        let mut bad = f.clone();
        bad[100] = 1;
        assert!(parse_footer(&bad).is_err());
        assert!(parse_footer(&footer(DISK_DYNAMIC, u64::MAX - 511)).is_err());
    }

    proptest! {
        #[test]
        fn footer_and_header_never_panic(b in proptest::collection::vec(any::<u8>(), 0..1100), fix in any::<bool>()) {
            let mut b = b;
            if fix && b.len() >= 1024 {
                b[0..8].copy_from_slice(b"cxsparse");
                let c = checksum(&b[..1024], 36);
                b[36..40].copy_from_slice(&c.to_be_bytes());
                let _ = parse_dyn_header(&b);
                b[0..8].copy_from_slice(b"conectix");
                let c = checksum(&b[..512], 64);
                b[64..68].copy_from_slice(&c.to_be_bytes());
            }
            let _ = parse_footer(&b);
            let _ = parse_dyn_header(&b);
        }

        #[test]
        fn hostile_dynamic_disks_never_panic(size in any::<u64>(), table in any::<u64>(), entries in any::<u32>(),
                                             block_shift in 9u32..30, bat in proptest::collection::vec(any::<u32>(), 0..16),
                                             disk_type in 2u32..5) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("x.vhd");
            let size = size % (1 << 24) / 512 * 512;
            let mut f = footer(disk_type, size);
            let mut img = f.clone();
            let mut h = vec![0u8; 1024];
            h[0..8].copy_from_slice(b"cxsparse");
            h[16..24].copy_from_slice(&(table % 4096).to_be_bytes());
            h[28..32].copy_from_slice(&entries.to_be_bytes());
            h[32..36].copy_from_slice(&(1u32 << block_shift).to_be_bytes());
            let c = checksum(&h, 36);
            h[36..40].copy_from_slice(&c.to_be_bytes());
            img.extend_from_slice(&h);
            for s in &bat {
                img.extend_from_slice(&(s % 64).to_be_bytes());
            }
            img.resize(img.len() + 8192, 0xA5);
            img.append(&mut f);
            std::fs::write(&p, &img).unwrap();
            if let Ok(s) = VhdSource::open(&p) {
                let _ = s.allocated();
                let mut buf = vec![0u8; 4096.min(s.size() as usize)];
                let _ = s.read_at(&mut buf, 0);
            }
        }
    }
}
