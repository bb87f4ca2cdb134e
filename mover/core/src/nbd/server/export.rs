//! What every connection serves: the disk (through the block cache, or an
//! overlay when writable), its size, name and flags, and the
//! `base:allocation` answer computed from the source's allocation map and
//! the overlay's blocks.

use super::cache::BlockCache;
use crate::error::Result;
use crate::extents::Extent;
use crate::nbd::overlay::{Overlay, OVERLAY_BLOCK};
use crate::nbd::proto::*;
use crate::source::DiskSource;
use std::sync::Arc;

/// Most extents in one block status reply.
const MAX_DESCRIPTORS: usize = 16 * 1024;
/// The id of `base:allocation` in our replies.
pub(super) const ALLOCATION_ID: u32 = 1;

pub(super) struct Export {
    pub(super) base: Arc<dyn DiskSource>,
    /// The same blocks as `base`, for reads sent without a copy.
    pub(super) cache: Arc<BlockCache>,
    pub(super) size: u64,
    pub(super) name: String,
    /// The base's allocation, normalized, computed once.
    pub(super) allocated: Vec<Extent>,
    pub(super) overlay: Option<Overlay>,
}

impl Export {
    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.overlay {
            Some(o) => o.read_at(buf, offset),
            None => self.base.read_at(buf, offset),
        }
    }

    /// Whether the base has data at `pos`, and until where that holds.
    fn base_state(&self, pos: u64) -> (bool, u64) {
        let i = self.allocated.partition_point(|e| e.end() <= pos);
        match self.allocated.get(i) {
            Some(e) if e.start <= pos => (true, e.end()),
            Some(e) => (false, e.start),
            None => (false, self.size),
        }
    }

    /// `base:allocation` descriptors for `[offset, offset+len)`: data is 0,
    /// a hole that reads as zeros is HOLE|ZERO.
    pub(super) fn status(&self, offset: u64, len: u32, one: bool) -> Vec<(u32, u32)> {
        let overlay = self.overlay.as_ref().filter(|o| !o.is_empty());
        // With an overlay, states are found per overlay block: answer a
        // bounded prefix (the protocol lets a reply cover less than asked).
        let span = if overlay.is_some() { (len as u64).min(64 << 20) } else { len as u64 };
        let end = offset + span;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_DESCRIPTORS {
            let (data, mut until) = match overlay.and_then(|o| o.state_at(pos)) {
                Some(d) => (d, (pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK),
                None => self.base_state(pos),
            };
            if overlay.is_some() {
                // The overlay may change state at any of its blocks.
                until = until.min((pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK);
            }
            let until = until.min(end).max(pos + 1);
            let flags = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            let n = (until - pos) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            pos = until;
            if one && out.len() > 1 {
                break; // REQ_ONE: the first descriptor is complete
            }
        }
        if one {
            out.truncate(1);
        }
        out
    }

    pub(super) fn flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_DF;
        if self.overlay.is_some() {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        } else {
            f |= TF_READ_ONLY;
        }
        f
    }
}
