//! vmbackup's data mover: reads virtual disks block by block, deduplicates,
//! compresses and stores them in a repository, and restores and verifies them.
//!
//! # Format
//! A repository is a directory: `config.json` (chunk size, compression),
//! `chunks/xx/<id>` content-addressed chunk files (id = BLAKE3 of the
//! plaintext keyed with a secret of the repository; XXH3-128 in version-1
//! repositories; sealed with AES-256-GCM in encrypted ones, see crypto.rs),
//! `backups/<id>.tib` one manifest per backup point holding the
//! complete block map of each disk, and `locks/` with the leases of running
//! backups. docs/format.md specifies it byte by byte.
//!
//! # Crash safety
//! Chunks are written under temporary names and renamed; a backup calls
//! `syncfs` before it writes its manifest (fsync, rename, fsync of the
//! directory). A crash at any point leaves only unreferenced chunks and
//! temporary files, which gc removes; every earlier manifest stays valid.
//!
//! # Garbage collection and locking
//! No lock is ever held on the data path. A running backup holds a lease
//! (an flock'd file whose mtime a heartbeat thread refreshes, so that hosts
//! sharing the repository over NFS or SMB see it live, see lease.rs); gc
//! keeps every chunk touched since the oldest live lease started (see
//! gc.rs), so it can run while backups do.
//!
//! # Layout
//! One file per concept: `source/` the disk formats a backup reads
//! (`DiskSource`), `chunk_store`, `manifest`, `block_map`, `backup`,
//! `restore` and `target/`, `verify`, `gc`, `lease`. `nbd/` holds all of
//! NBD: the wire protocol, URIs and TLS, the client (`nbd/client/`, a disk
//! source), the server that serves a backup's disk (`nbd/server/`) and its
//! copy-on-write overlay.

pub mod backup;
pub mod backup_reader;
pub mod block_map;
pub mod catalog;
pub mod chunk;
pub mod chunk_store;
pub mod clock;
pub mod crypto;
pub mod error;
pub mod extents;
pub mod gc;
pub mod inflight;
pub mod lease;
pub mod manifest;
pub mod nbd;
pub mod progress;
pub mod repository;
pub mod restore;
pub mod source;
pub mod target;
pub mod verify;

pub use error::{Error, Result};
