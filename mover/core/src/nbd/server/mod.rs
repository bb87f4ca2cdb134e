//! Serves a disk source (a backup's disk, see `backup_reader`) as an NBD
//! export: the base of mounting a backup and of file-level restore.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`
//! (`base:allocation`, answered from the source's allocation map, so a
//! client skips the backup's zero blocks); `NBD_OPT_EXPORT_NAME` for old
//! clients. Commands READ, BLOCK_STATUS, FLUSH, DISC, and in writable mode
//! WRITE, WRITE_ZEROES and TRIM into a copy-on-write overlay (see
//! `nbd::overlay`). One thread per client; `CAN_MULTI_CONN` is advertised
//! since every connection sees the same data (one shared overlay). Requests
//! are bounded (32 MiB); a client that breaks the protocol is disconnected.
//!
//! The pieces: `listener` (binding, accepting, bounding and ending
//! clients), `export` (what is served and its allocation), `cache` (decoded
//! blocks shared by the connections), `session` (one client's life),
//! `handshake` (option haggling), `transmission` (requests and replies).

mod cache;
mod export;
mod handshake;
mod listener;
mod session;
mod transmission;

pub use listener::{Listen, NbdServer, ServeOptions, HANDSHAKE_TIMEOUT};

use crate::error::Result;
use crate::progress::Cancel;
use crate::source::DiskSource;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest READ or WRITE we accept, and what `NBD_INFO_BLOCK_SIZE` says.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Serves `source` on `listen` until `cancel`; `ready` gets the URI once
/// clients can connect.
pub fn serve(
    source: Arc<dyn DiskSource>,
    listen: &Listen,
    opts: ServeOptions,
    ready: impl FnOnce(&str),
    cancel: &Cancel,
) -> Result<()> {
    let server = NbdServer::bind(source, listen, opts)?;
    ready(&server.uri());
    server.serve(cancel)
}

/// The directory for overlays when none is given.
pub fn default_overlay_dir() -> PathBuf {
    std::env::temp_dir()
}
