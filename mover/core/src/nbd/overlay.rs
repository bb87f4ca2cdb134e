//! A copy-on-write view of a disk source: reads come from the source until
//! a block is written, zeroed or trimmed; then from a temporary file or as
//! zeros. The temporary file is unlinked as soon as it is created, so
//! nothing is left behind however the process ends. The base is never
//! written: serving a backup writable leaves the backup untouched.

use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::source::DiskSource;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Granularity of the overlay (a typical guest filesystem block).
pub const OVERLAY_BLOCK: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Data,
    Zero,
}

pub struct Overlay {
    base: Arc<dyn DiskSource>,
    size: u64,
    file: File,
    blocks: RwLock<HashMap<u64, Block>>,
}

/// Where a run of a read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Base,
    File,
    Zero,
}

impl Overlay {
    /// Creates the overlay file in `dir` and unlinks it at once.
    pub fn create(base: Arc<dyn DiskSource>, dir: &Path) -> Result<Overlay> {
        let name = dir.join(format!(".vmbackup-overlay-{}-{:08x}", std::process::id(), crate::clock::random_u32()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
            .map_err(|e| Error::target(format!("creating overlay {}", name.display()), e))?;
        std::fs::remove_file(&name).map_err(|e| Error::target(format!("unlinking overlay {}", name.display()), e))?;
        let size = base.size();
        Ok(Overlay { base, size, file, blocks: RwLock::new(HashMap::new()) })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * OVERLAY_BLOCK).min(OVERLAY_BLOCK)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::InvalidInput(format!("{offset}+{len} is past the end of the disk ({} bytes)", self.size))),
        }
    }

    fn read_locked(&self, blocks: &HashMap<u64, Block>, buf: &mut [u8], offset: u64) -> Result<()> {
        if blocks.is_empty() {
            return self.base.read_at(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // Coalesce runs of blocks that come from the same place.
        while pos < end {
            let b = pos / OVERLAY_BLOCK;
            let from = match blocks.get(&b) {
                None => From::Base,
                Some(Block::Data) => From::File,
                Some(Block::Zero) => From::Zero,
            };
            let mut run_end = ((b + 1) * OVERLAY_BLOCK).min(end);
            while run_end < end {
                let nb = run_end / OVERLAY_BLOCK;
                let f = match blocks.get(&nb) {
                    None => From::Base,
                    Some(Block::Data) => From::File,
                    Some(Block::Zero) => From::Zero,
                };
                if f != from {
                    break;
                }
                run_end = ((nb + 1) * OVERLAY_BLOCK).min(end);
            }
            let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match from {
                From::Base => self.base.read_at(out, pos)?,
                From::Zero => out.fill(0),
                From::File => self
                    .file
                    .read_exact_at(out, pos)
                    .map_err(|e| Error::target(format!("reading overlay at {pos}"), e))?,
            }
            pos = run_end;
        }
        Ok(())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let blocks = self.blocks.read().expect("overlay map");
        self.read_locked(&blocks, buf, offset)
    }

    /// Writes `data` at `offset`, or zeros over `len` bytes if `data` is None.
    fn apply(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let mut blocks = self.blocks.write().expect("overlay map");
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = pos / OVERLAY_BLOCK;
            let bstart = b * OVERLAY_BLOCK;
            let blen = self.block_len(b);
            let n = (bstart + blen).min(end) - pos;
            let whole = pos == bstart && n == blen;
            match data {
                None if whole => {
                    blocks.insert(b, Block::Zero);
                }
                _ => {
                    if !whole && blocks.get(&b) != Some(&Block::Data) {
                        // Copy the block's current contents up before a partial write.
                        let mut cur = vec![0u8; blen as usize];
                        self.read_locked(&blocks, &mut cur, bstart)?;
                        self.file.write_all_at(&cur, bstart).map_err(|e| Error::target("writing overlay", e))?;
                    }
                    let piece: Vec<u8>;
                    let src = match data {
                        Some(d) => &d[(pos - offset) as usize..(pos - offset + n) as usize],
                        None => {
                            piece = vec![0u8; n as usize];
                            &piece
                        }
                    };
                    self.file.write_all_at(src, pos).map_err(|e| Error::target("writing overlay", e))?;
                    blocks.insert(b, Block::Data);
                }
            }
            pos += n;
        }
        Ok(())
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.apply(Some(data), offset, data.len() as u64)
    }

    /// Zeroes (also used for trim, so that trimmed areas read back as zeros).
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.apply(None, offset, len)
    }

    /// Whether the area `[offset, offset+len)` starting at `offset` is data
    /// (`Some(true)`), zeros (`Some(false)`), or as in the base (`None`),
    /// for the overlay block that holds `offset`.
    pub fn state_at(&self, offset: u64) -> Option<bool> {
        self.blocks.read().expect("overlay map").get(&(offset / OVERLAY_BLOCK)).map(|b| *b == Block::Data)
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.read().expect("overlay map").is_empty()
    }

    /// The base's allocation merged with the overlay's, for block status.
    pub fn base_allocated(&self) -> Result<Vec<Extent>> {
        self.base.allocated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::source::MemSource as Mem;

    proptest! {
        #[test]
        fn reads_back_like_a_plain_buffer(ops in prop::collection::vec((0u64..20_000, 0u64..9000, any::<u8>(), 0u8..3), 1..12)) {
            let size = 20_000u64 + 123;
            let base: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let dir = tempfile::tempdir().unwrap();
            let ov = Overlay::create(Arc::new(Mem(base.clone())), dir.path()).unwrap();
            let mut model = base.clone();
            for (off, len, byte, kind) in ops {
                let len = len.min(size - off);
                if kind == 0 {
                    let data = vec![byte; len as usize];
                    ov.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                } else {
                    ov.zero(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
            let mut got = vec![0u8; size as usize];
            ov.read_at(&mut got, 0).unwrap();
            prop_assert!(got == model);
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
