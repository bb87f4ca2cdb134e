//! Disk sources: something with a size that can be read at an offset and can
//! say which areas are allocated. The backup pipeline sees only this trait.

mod file;
mod mem;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

/// The NBD client lives in `crate::nbd::client`; `source::nbd` is kept as
/// the name the rest of the crate and the bindings know it by.
pub use crate::nbd::client as nbd;
pub use file::{open_image, FileSource};
pub use mem::MemSource;
pub use nbd::NbdSource;
pub use vhd::VhdSource;
pub use vhdx::VhdxSource;
pub use vmdk::VmdkSource;

use crate::error::{Error, Result};
use crate::extents::Extent;

pub trait DiskSource: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the disk's bytes at `offset` (past the end: error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Areas that may hold data; everything else reads as zeros.
    fn allocated(&self) -> Result<Vec<Extent>>;
    /// The format name recorded in the manifest (`raw`, ...).
    fn format(&self) -> &'static str;
    /// What to call the source in messages and in the manifest.
    fn describe(&self) -> String;
    /// How many `read_at` calls the pipeline should keep in flight at once
    /// (a network source hides its round trips this way).
    fn parallel_reads(&self) -> usize {
        1
    }
    /// The size of the blocks the source keeps its data in, if it can hand
    /// them out whole without copying (a backup: its decoded chunks).
    fn shared_block_size(&self) -> Option<u64> {
        None
    }
    /// Block `index` of `shared_block_size()` bytes (the last may be
    /// shorter), shared rather than copied: an NBD server sends it as is.
    fn shared_block(&self, _index: u64) -> Result<std::sync::Arc<Vec<u8>>> {
        Err(Error::InvalidInput("this source has no shared blocks".into()))
    }
}

/// The largest virtual disk vmbackup backs up: 64 TiB, the largest VHDX
/// (vSphere's VMDKs stop at 62 TB). A source may claim any size up to 2^64
/// (an image's header, an NBD server's handshake); a larger one is refused
/// before anything is sized by it: the block map alone of a 2^64-byte disk
/// would not fit in memory.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Refuses a source larger than `MAX_DISK_SIZE`, in one line.
pub fn check_size(source: &dyn DiskSource) -> Result<()> {
    if source.size() > MAX_DISK_SIZE {
        return Err(Error::Source(format!(
            "{} claims a disk of {} bytes, more than the 64 TiB ({MAX_DISK_SIZE} bytes) vmbackup backs up",
            source.describe(),
            source.size()
        )));
    }
    Ok(())
}

/// Formats we recognise by content but cannot read yet.
fn sniff_unsupported(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else {
        None
    }
}

/// Opens a source named by a path (file or block device) or an NBD URI.
/// Formats are told apart by content, not by name.
pub fn open(spec: &str) -> Result<Box<dyn DiskSource>> {
    open_with(spec, &nbd::NbdOptions::default())
}

/// [`open`] with the options for an NBD export.
pub fn open_with(spec: &str, nbd: &nbd::NbdOptions) -> Result<Box<dyn DiskSource>> {
    if crate::nbd::uri::NbdUri::is_nbd(spec) {
        return Ok(Box::new(NbdSource::open_with(spec, nbd)?));
    }
    let path = std::path::Path::new(spec);
    let src = FileSource::open(path)?;
    let mut head = [0u8; 32];
    let n = head.len().min(src.size() as usize);
    if n > 0 {
        src.read_at(&mut head[..n], 0)?;
        if head[..n].starts_with(vhdx::FILE_SIGNATURE) {
            return Ok(Box::new(VhdxSource::open(path)?));
        }
        // Dynamic and differencing VHDs keep a copy of their footer at 0; a
        // fixed VHD is a raw disk with a footer after it, accepted only if
        // its checksum, type and size agree (see vhd::is_fixed_footer).
        if head[..n].starts_with(b"conectix") {
            return Ok(Box::new(VhdSource::open(path)?));
        }
        if src.size() >= vhd::FOOTER_SIZE as u64 {
            let mut tail = [0u8; vhd::FOOTER_SIZE];
            src.read_at(&mut tail, src.size() - vhd::FOOTER_SIZE as u64)?;
            if vhd::is_fixed_footer(&tail, src.size()) {
                return Ok(Box::new(VhdSource::open(path)?));
            }
        }
        if vmdk::sniff(&head[..n]) {
            return Ok(Box::new(VmdkSource::open(path)?));
        }
        if let Some(kind) = sniff_unsupported(&head[..n]) {
            return Err(Error::Source(format!(
                "{spec} is a {kind} image; vmbackup reads raw, VMDK, VHD and VHDX images, block devices and NBD exports"
            )));
        }
    }
    Ok(Box::new(src))
}
