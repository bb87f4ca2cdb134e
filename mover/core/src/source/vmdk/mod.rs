//! VMDK disks as vSphere datastores and VMware Workstation hold them
//! (VMware "Virtual Disk Format 1.1"): a descriptor, standalone text or
//! embedded in a sparse extent, lists extents that are laid end to end:
//!
//! - FLAT / VMFS: a raw file (monolithicFlat, twoGbMaxExtentFlat, vmfs),
//!   at a sector offset;
//! - SPARSE: a hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse,
//!   streamOptimized), see sparse.rs;
//! - ZERO: zeros, no file.
//!
//! A delta disk (parentCID set) reads through its parent chain: what its
//! grain tables do not hold comes from the parent. Only files named by the
//! descriptors are opened, read-only.

pub mod descriptor;
pub mod header;
pub mod sparse;

use super::{DiskSource, FileSource};
use crate::error::{Error, Result};
use crate::extents::{normalize, Extent};
use descriptor::{Access, Descriptor};
use header::SECTOR;
use sparse::SparseExtent;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Longest parent chain we follow; vSphere allows 32 snapshots per chain.
const MAX_CHAIN: usize = 64;

const TRANSPORT_HINT: &str = "back up this disk through the hot-add or NBD transport instead";

/// Whether the first bytes of a file are a VMDK's (sparse extent, vmfsSparse
/// delta or descriptor text).
pub fn sniff(head: &[u8]) -> bool {
    head.starts_with(header::MAGIC) || head.starts_with(b"COWD") || head.starts_with(descriptor::SIGNATURE.as_bytes())
}

/// Opens a file of a VMDK: the disk named by the user may be a block device
/// holding an image (`block_ok`); descriptors, extents and parents named
/// inside an image must be regular files.
pub(super) fn open_file(path: &Path, block_ok: bool) -> Result<File> {
    Ok(super::open_image(path, "VMDK file", block_ok)?.0)
}

enum Backing {
    /// A raw file; the extent starts at this byte of it.
    Flat {
        file: FileSource,
        offset: u64,
    },
    Zero,
    Sparse(SparseExtent),
}

/// One extent, placed at `start` of the virtual disk.
struct Piece {
    start: u64,
    len: u64,
    backing: Backing,
}

pub struct VmdkSource {
    path: PathBuf,
    size: u64,
    pieces: Vec<Piece>,
    parent: Option<Box<VmdkSource>>,
    format: &'static str,
    cid: Option<String>,
}

fn format_name(create_type: &str) -> &'static str {
    const KNOWN: &[(&str, &str)] = &[
        ("monolithicSparse", "vmdk:monolithicSparse"),
        ("monolithicFlat", "vmdk:monolithicFlat"),
        ("twoGbMaxExtentSparse", "vmdk:twoGbMaxExtentSparse"),
        ("twoGbMaxExtentFlat", "vmdk:twoGbMaxExtentFlat"),
        ("streamOptimized", "vmdk:streamOptimized"),
        ("vmfs", "vmdk:vmfs"),
        ("vmfsThin", "vmdk:vmfsThin"),
        ("vmfsEagerZeroedThick", "vmdk:vmfsEagerZeroedThick"),
        ("vmfsPreallocated", "vmdk:vmfsPreallocated"),
        ("sparse", "vmdk:sparse"),
    ];
    KNOWN.iter().find(|(k, _)| k.eq_ignore_ascii_case(create_type)).map(|(_, v)| *v).unwrap_or("vmdk")
}

impl VmdkSource {
    /// Opens a VMDK by its descriptor or its (monolithic) sparse file, and
    /// its parents if it is a delta disk.
    pub fn open(path: &Path) -> Result<VmdkSource> {
        let mut seen = Vec::new();
        Self::open_chain(path, &mut seen)
    }

    fn open_chain(path: &Path, seen: &mut Vec<PathBuf>) -> Result<VmdkSource> {
        // The disk named by the user, not a parent named by a descriptor.
        let top = seen.is_empty();
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if seen.contains(&canon) {
            return Err(Error::Source(format!("{} is its own ancestor in a VMDK parent chain", path.display())));
        }
        if seen.len() >= MAX_CHAIN {
            return Err(Error::Source(format!(
                "{}: the VMDK parent chain is longer than {MAX_CHAIN} disks",
                path.display()
            )));
        }
        seen.push(canon);
        let file = open_file(path, top)?;
        let mut head = [0u8; 32];
        let n = read_head(&file, &mut head).map_err(|e| Error::source_io(format!("reading {}", path.display()), e))?;
        let head = &head[..n];
        let (desc, pieces, create_type) = if head.starts_with(header::MAGIC) {
            let ext = SparseExtent::open(path, top)?;
            let desc = match ext.embedded_descriptor()? {
                Some(text) => Some(descriptor::parse(&text).map_err(|e| {
                    Error::Source(format!("{}: the embedded VMDK descriptor is malformed: {e}", path.display()))
                })?),
                None => None,
            };
            let ct = match &desc {
                Some(d) if !d.create_type.is_empty() => d.create_type.clone(),
                _ if ext.header().compressed() => "streamOptimized".to_string(),
                _ => "sparse".to_string(),
            };
            let len = ext.capacity_bytes();
            (desc, vec![Piece { start: 0, len, backing: Backing::Sparse(ext) }], ct)
        } else if head.starts_with(b"COWD") {
            return Err(Error::Source(format!(
                "{} is a vmfsSparse (COWD) snapshot extent, which this version does not read; {TRANSPORT_HINT}",
                path.display()
            )));
        } else if head.starts_with(descriptor::SIGNATURE.as_bytes()) {
            let text = read_descriptor_file(&file, path)?;
            let d = descriptor::parse(&text)
                .map_err(|e| Error::Source(format!("{}: the VMDK descriptor is malformed: {e}", path.display())))?;
            let pieces = open_extents(path, &d)?;
            let ct = d.create_type.clone();
            (Some(d), pieces, ct)
        } else {
            return Err(Error::Source(format!("{} is not a VMDK (no sparse header, no descriptor)", path.display())));
        };
        let size = pieces.last().map_or(0, |p| p.start + p.len);
        let mut src = VmdkSource {
            path: path.to_path_buf(),
            size,
            pieces,
            parent: None,
            format: format_name(&create_type),
            cid: desc.as_ref().and_then(|d| d.cid.clone()),
        };
        if let Some(d) = desc.as_ref().filter(|d| d.has_parent()) {
            src.parent = Some(Box::new(open_parent(path, d, seen)?));
        }
        Ok(src)
    }

    /// The disk's parent, if it is a delta disk.
    pub fn parent(&self) -> Option<&VmdkSource> {
        self.parent.as_deref()
    }

    /// Reads the parent's bytes (zeros past its end, or without a parent).
    fn fallback(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) if offset < p.size => {
                let n = ((p.size - offset) as usize).min(buf.len());
                p.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

fn read_head(file: &File, head: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_descriptor_file(file: &File, path: &Path) -> Result<String> {
    let len = file.metadata().map_err(|e| Error::source_io(format!("reading {}", path.display()), e))?.len();
    if len > descriptor::MAX_DESCRIPTOR_BYTES {
        return Err(Error::Source(format!(
            "{} starts like a VMDK descriptor but holds {len} bytes, more than a descriptor can",
            path.display()
        )));
    }
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, 0).map_err(|e| Error::source_io(format!("reading {}", path.display()), e))?;
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

fn open_extents(path: &Path, d: &Descriptor) -> Result<Vec<Piece>> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut pieces = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    // VMware never lists one file twice; a hostile descriptor that does
    // would make us load the same grain directory again and again.
    let mut seen = std::collections::HashSet::new();
    for (i, e) in d.extents.iter().enumerate() {
        // Descriptor parsing checked that the sum fits in 64 bits of bytes.
        let len = e.sectors * SECTOR;
        let name = || e.file.clone().unwrap_or_default();
        if e.access == Access::NoAccess {
            return Err(Error::Source(format!("{}: extent {} ({}) is NOACCESS", path.display(), i + 1, name())));
        }
        let fpath = dir.join(name());
        if e.file.is_some() {
            // VMware keeps a disk's extents next to its descriptor; a name
            // leading elsewhere is not one of the image's own files.
            let p = Path::new(e.file.as_deref().unwrap_or_default());
            if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(Error::Source(format!(
                    "{}: extent file {} is outside the descriptor's directory",
                    path.display(),
                    name()
                )));
            }
            if !seen.insert(fpath.clone()) {
                return Err(Error::Source(format!("{}: extent file {} is listed twice", path.display(), name())));
            }
            if !fpath.exists() {
                return Err(Error::Source(format!(
                    "{}: extent file {} does not exist",
                    path.display(),
                    fpath.display()
                )));
            }
            // A symbolic link that leads out of the folder is refused like `../`.
            let inside = match (std::fs::canonicalize(&fpath), std::fs::canonicalize(dir)) {
                (Ok(f), Ok(d)) => f.starts_with(d),
                _ => false,
            };
            if !inside {
                return Err(Error::Source(format!(
                    "{}: extent file {} leads outside the descriptor's directory",
                    path.display(),
                    name()
                )));
            }
        }
        let backing = match e.kind.as_str() {
            "FLAT" | "VMFS" => {
                let file = FileSource::open_as(&fpath, "VMDK extent", false)?;
                let offset =
                    e.offset.checked_mul(SECTOR).filter(|o| o.checked_add(len).is_some_and(|end| end <= file.size()));
                let offset = offset.ok_or_else(|| {
                    Error::Source(format!(
                        "{}: extent file {} holds {} bytes, the descriptor needs {} from sector {}",
                        path.display(),
                        fpath.display(),
                        file.size(),
                        len,
                        e.offset
                    ))
                })?;
                Backing::Flat { file, offset }
            }
            "ZERO" => Backing::Zero,
            "SPARSE" => Backing::Sparse(SparseExtent::open(&fpath, false)?),
            "VMFSSPARSE" | "SESPARSE" => {
                return Err(Error::Source(format!(
                    "{}: extent {} is a {} snapshot extent, which this version does not read; {TRANSPORT_HINT}",
                    path.display(),
                    name(),
                    e.kind
                )))
            }
            "VMFSRDM" | "VMFSRAW" => {
                return Err(Error::Source(format!(
                    "{}: extent {} maps a raw device (RDM); {TRANSPORT_HINT}",
                    path.display(),
                    name()
                )))
            }
            other => {
                return Err(Error::Source(format!("{}: extent type {other} is not supported", path.display())));
            }
        };
        if len > 0 {
            pieces.push(Piece { start, len, backing });
        }
        start += len;
    }
    if start == 0 {
        return Err(Error::Source(format!("{}: the VMDK descriptor describes an empty disk", path.display())));
    }
    Ok(pieces)
}

fn open_parent(path: &Path, d: &Descriptor, seen: &mut Vec<PathBuf>) -> Result<VmdkSource> {
    let hint = d.parent_hint.as_deref().filter(|h| !h.is_empty()).ok_or_else(|| {
        Error::Source(format!("{} is a delta disk that does not name its parent; {TRANSPORT_HINT}", path.display()))
    })?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let ppath = dir.join(hint);
    if !ppath.exists() {
        return Err(Error::Source(format!(
            "{} is a delta disk whose parent {} is not here; {TRANSPORT_HINT}, which read the whole chain",
            path.display(),
            ppath.display()
        )));
    }
    let parent = VmdkSource::open_chain(&ppath, seen)?;
    let want = d.parent_cid.as_deref().unwrap_or_default();
    match parent.cid.as_deref() {
        Some(cid) if cid.eq_ignore_ascii_case(want) => Ok(parent),
        found => Err(Error::Source(format!(
            "{}: its parent {} has changed since the delta was made (CID {}, the delta expects {want})",
            path.display(),
            ppath.display(),
            found.unwrap_or("missing")
        ))),
    }
}

impl DiskSource for VmdkSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.size).ok_or_else(|| {
            Error::InvalidInput(format!(
                "read {}+{} is past the end of {} ({} bytes)",
                offset,
                buf.len(),
                self.describe(),
                self.size
            ))
        })?;
        let mut i = self.pieces.partition_point(|p| p.start + p.len <= offset);
        let mut pos = offset;
        while pos < end {
            let p = &self.pieces[i];
            let local = pos - p.start;
            let n = (p.len - local).min(end - pos) as usize;
            let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            match &p.backing {
                Backing::Flat { file, offset } => file.read_at(out, offset + local)?,
                Backing::Zero => out.fill(0),
                Backing::Sparse(ext) => ext.read(out, local, &|b, o| self.fallback(b, p.start + o))?,
            }
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        let mut v = Vec::new();
        for p in &self.pieces {
            match &p.backing {
                Backing::Flat { file, offset } => {
                    for e in file.allocated()? {
                        let s = e.start.max(*offset);
                        let t = e.end().min(offset + p.len);
                        if s < t {
                            v.push(Extent::new(p.start + s - offset, t - s));
                        }
                    }
                }
                Backing::Zero => {}
                Backing::Sparse(ext) => {
                    for e in ext.allocated() {
                        if e.start < p.len {
                            v.push(Extent::new(p.start + e.start, e.length.min(p.len - e.start)));
                        }
                    }
                }
            }
        }
        if let Some(parent) = &self.parent {
            for e in parent.allocated()? {
                if e.start < self.size {
                    v.push(Extent::new(e.start, e.length.min(self.size - e.start)));
                }
            }
        }
        normalize(&v, self.size)
    }

    fn format(&self) -> &'static str {
        self.format
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
