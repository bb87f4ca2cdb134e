//! The block cache shared by all connections: decoded blocks kept whole and
//! sent to the socket without a copy, each loaded once even when several
//! connections ask for it at the same moment.

use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::source::DiskSource;
use std::sync::{Arc, Mutex};

/// A slice of a cached block: (block, start, length), sent without copying.
type Piece = (Arc<Vec<u8>>, usize, usize);

/// Decoded blocks shared by all connections, each loaded once even when
/// several clients ask for it at the same moment (nbdcopy spreads adjacent
/// requests over its connections; without this every one of them would
/// decompress the same chunk).
pub(super) struct BlockCache {
    base: Arc<dyn DiskSource>,
    size: u64,
    /// The base's own block size when it hands out shared blocks (a
    /// backup's chunks: no copy at all), else CACHE_BLOCK.
    block: u64,
    entries: Mutex<std::collections::VecDeque<(u64, Arc<CacheEntry>)>>,
}

#[derive(Default)]
struct CacheEntry {
    value: Mutex<Option<std::result::Result<Arc<Vec<u8>>, String>>>,
    ready: std::sync::Condvar,
}

const CACHE_BLOCK: u64 = 1 << 20;
const CACHE_BLOCKS: usize = 32;

impl BlockCache {
    fn block(&self, idx: u64) -> Result<Arc<Vec<u8>>> {
        let (entry, load) = {
            let mut e = self.entries.lock().expect("block cache");
            match e.iter().find(|(i, _)| *i == idx) {
                Some((_, x)) => (x.clone(), false),
                None => {
                    let x = Arc::new(CacheEntry::default());
                    if e.len() == CACHE_BLOCKS {
                        e.pop_front();
                    }
                    e.push_back((idx, x.clone()));
                    (x, true)
                }
            }
        };
        if load {
            // A loader that panics must still wake the threads waiting for
            // this block, or they would wait for ever.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if self.base.shared_block_size().is_some() {
                    self.base.shared_block(idx)
                } else {
                    let start = idx * self.block;
                    let mut buf = vec![0u8; (self.size - start).min(self.block) as usize];
                    self.base.read_at(&mut buf, start).map(|_| Arc::new(buf))
                }
            }))
            .unwrap_or_else(|_| Err(Error::Internal(format!("reading block {idx} panicked"))));
            let r = r.map_err(|e| e.to_string());
            if r.is_err() {
                self.entries.lock().expect("block cache").retain(|(i, _)| *i != idx);
            }
            *entry.value.lock().expect("cache entry") = Some(r);
            entry.ready.notify_all();
        }
        let mut v = entry.value.lock().expect("cache entry");
        while v.is_none() {
            v = entry.ready.wait(v).expect("cache entry");
        }
        match v.as_ref().expect("loaded") {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(Error::Source(e.clone())),
        }
    }
}

impl BlockCache {
    pub(super) fn new(base: Arc<dyn DiskSource>) -> BlockCache {
        let block = base.shared_block_size().filter(|b| *b > 0).unwrap_or(CACHE_BLOCK);
        BlockCache { size: base.size(), base, block, entries: Mutex::new(Default::default()) }
    }

    /// The blocks covering `[offset, offset+len)`, as (block, start, length)
    /// pieces to send without copying them.
    pub(super) fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.block;
            let b = self.block(idx)?;
            let at = (pos - idx * self.block) as usize;
            let n = (((idx + 1) * self.block).min(end) - pos) as usize;
            if b.len() < at + n {
                return Err(Error::Source(format!("block {idx} is {} bytes, shorter than needed", b.len())));
            }
            out.push((b, at, n));
            pos += n as u64;
        }
        Ok(out)
    }
}

impl DiskSource for BlockCache {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut at = 0usize;
        for (b, start, n) in self.pieces(offset, buf.len() as u64)? {
            buf[at..at + n].copy_from_slice(&b[start..start + n]);
            at += n;
        }
        Ok(())
    }
    fn allocated(&self) -> Result<Vec<Extent>> {
        self.base.allocated()
    }
    fn format(&self) -> &'static str {
        self.base.format()
    }
    fn describe(&self) -> String {
        self.base.describe()
    }
}
