//! The content-addressed chunk store under `chunks/`.
//!
//! A chunk lives at `chunks/<first two hex digits>/<32 hex digits>`. Writes go
//! to a temporary name in the same directory and are renamed into place, so a
//! reader never sees half a chunk and two writers of the same chunk (same id,
//! same bytes) simply replace one another: inserts are idempotent.
//!
//! Durability is batched: chunk files are not fsynced one by one; the backup
//! calls `Repository::sync_all` (syncfs) once before it writes the manifest
//! that names them.
//!
//! The file's mtime says when a backup last wrote or reused the chunk; garbage
//! collection never removes a chunk whose mtime is newer than its cutoff (see
//! gc.rs).

use crate::chunk::{self, ChunkId};
use crate::error::{Error, Result};
use crate::repository::Repository;
use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Suffix of a chunk file that failed verification: kept for inspection,
/// never used for restore or deduplication again.
pub const QUARANTINE_SUFFIX: &str = ".bad";

#[derive(Clone, Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    max_len: usize,
}

/// Sets a file's mtime to now. Ok(false) if it does not exist.
pub fn touch(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL");
    let times = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` holds two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == ErrorKind::NotFound {
        Ok(false)
    } else {
        Err(Error::repo_io(format!("touching {}", path.display()), err))
    }
}

/// Starts writing a file range to storage without waiting for it, so that the
/// `syncfs` (or fsync) that must come later finds little left to flush and the
/// flush overlaps with the work instead of following it. Advisory: errors
/// are ignored here and surface at the sync that follows.
pub fn start_writeback(file: &fs::File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: valid descriptor; sync_file_range has no memory effects.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl ChunkStore {
    pub fn new(repo: &Repository) -> ChunkStore {
        ChunkStore { dir: repo.root.join("chunks"), max_len: repo.chunk_size() as usize }
    }

    pub fn root(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[0..2]).join(hex)
    }

    /// If the chunk is present and whole, marks it as just used (for gc) and
    /// returns true. A torn file (what a power cut can leave of a chunk whose
    /// writeback had not finished: shorter than its header says, at any
    /// length) or anything else that is not a chunk file is quarantined and
    /// reported absent, so the caller stores the chunk again.
    pub fn reuse(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path(id);
        // Touched before the check, so that gc's re-check after its rename
        // sees the reuse (see gc.rs).
        if !touch(&path)? {
            return Ok(false);
        }
        match self.is_whole(&path) {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.quarantine(id)?;
                Ok(false)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::repo_io(format!("checking chunk {id}"), e)),
        }
    }

    /// Whether the file at `path` is a regular file exactly as long as its
    /// header says: one read of 12 bytes and an fstat. Compressed chunks
    /// written before headers recorded the payload length are read whole
    /// and their zstd frame walked (not decompressed).
    fn is_whole(&self, path: &Path) -> std::io::Result<bool> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
            Err(e) => return Err(e),
        };
        let m = f.metadata()?;
        let max_file = (chunk::CHUNK_HEADER_LEN + self.max_len) as u64;
        if !m.is_file() || m.len() < chunk::CHUNK_HEADER_LEN as u64 || m.len() > max_file {
            return Ok(false);
        }
        let mut header = [0u8; chunk::CHUNK_HEADER_LEN];
        f.read_exact_at(&mut header, 0)?;
        match chunk::whole_file_len(&header, self.max_len) {
            Err(_) => Ok(false),
            Ok(Some(len)) => Ok(len == m.len()),
            Ok(None) => {
                let mut payload = vec![0u8; m.len() as usize - chunk::CHUNK_HEADER_LEN];
                f.read_exact_at(&mut payload, chunk::CHUNK_HEADER_LEN as u64)?;
                Ok(chunk::zstd_frame_is_whole(&payload))
            }
        }
    }

    /// Stores an encoded chunk; returns the number of bytes written.
    pub fn insert(&self, id: &ChunkId, encoded: &[u8]) -> Result<u64> {
        let path = self.path(id);
        let tmp = path.with_file_name(format!(
            ".tmp-{}-{}-{:08x}",
            id.to_hex(),
            std::process::id(),
            crate::clock::random_u32()
        ));
        let result = (|| {
            let mut f = fs::File::create(&tmp).map_err(|e| Error::repo_io(format!("writing chunk {id}"), e))?;
            f.write_all(encoded).map_err(|e| Error::repo_io(format!("writing chunk {id}"), e))?;
            start_writeback(&f, 0, 0);
            drop(f);
            fs::rename(&tmp, &path).map_err(|e| Error::repo_io(format!("writing chunk {id}"), e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|_| encoded.len() as u64)
    }

    /// Reads a chunk file as stored.
    pub fn read_raw(&self, id: &ChunkId) -> Result<Vec<u8>> {
        // A chunk file holds at most its header and the plaintext (a
        // compressed payload is only kept when it is shorter).
        let max = (chunk::CHUNK_HEADER_LEN + self.max_len) as u64;
        crate::repository::read_bounded(&self.path(id), max).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::CorruptChunk { id: id.to_hex(), reason: "missing".into() },
            ErrorKind::InvalidData => Error::CorruptChunk { id: id.to_hex(), reason: e.to_string() },
            _ => Error::repo_io(format!("reading chunk {id}"), e),
        })
    }

    /// Reads, decodes and checks a chunk.
    pub fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let raw = self.read_raw(id)?;
        chunk::decode_owned(id, raw, self.max_len)
    }

    /// Moves a chunk that failed verification aside, so that the next backup
    /// that needs it writes it again instead of trusting it.
    pub fn quarantine(&self, id: &ChunkId) -> Result<()> {
        let path = self.path(id);
        let bad = path.with_file_name(format!("{}{QUARANTINE_SUFFIX}", id.to_hex()));
        match fs::rename(&path, &bad) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::repo_io(format!("quarantining chunk {id}"), e)),
        }
    }

    /// The size of a chunk file, or None if it is absent.
    pub fn stat_len(&self, id: &ChunkId) -> Result<Option<u64>> {
        match fs::metadata(self.path(id)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::repo_io(format!("checking chunk {id}"), e)),
        }
    }
}
