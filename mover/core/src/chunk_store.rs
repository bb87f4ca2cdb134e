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
//! In an encrypted repository every chunk file is sealed (`crypto.rs`): the
//! encoded chunk (header and compressed payload) under AES-256-GCM with the
//! chunk id as associated data, then a checksum over the ciphertext. The
//! store seals on `encode` and opens on `read`; a plain chunk file in an
//! encrypted repository, or a sealed one in a plain repository, is corrupt.
//!
//! The file's mtime says when a backup last wrote or reused the chunk; garbage
//! collection never removes a chunk whose mtime is newer than its cutoff (see
//! gc.rs).

use crate::chunk::{self, ChunkId, Compression};
use crate::crypto;
use crate::error::{Error, Result};
use crate::repository::{Keys, Repository};
use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Suffix of a chunk file that failed verification: kept for inspection,
/// never used for restore or deduplication again.
pub const QUARANTINE_SUFFIX: &str = ".bad";

#[derive(Clone, Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    max_len: usize,
    keys: Arc<Keys>,
    repo: PathBuf,
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
        ChunkStore {
            dir: repo.root.join("chunks"),
            max_len: repo.chunk_size() as usize,
            keys: repo.keys.clone(),
            repo: repo.root.clone(),
        }
    }

    fn key_required(&self) -> Error {
        Error::KeyRequired(format!(
            "repository {} is encrypted: give its passphrase (VMBACKUP_PASSPHRASE or --passphrase-file)",
            self.repo.display()
        ))
    }

    /// Whether chunk files are sealed.
    pub fn sealed(&self) -> bool {
        self.keys.encrypted
    }

    /// The id this repository gives a chunk holding `data`.
    pub fn id_of(&self, data: &[u8]) -> Result<ChunkId> {
        Ok(self.keys.ids.as_ref().ok_or_else(|| self.key_required())?.id(data))
    }

    /// The chunk file for `data` (whose id is `id`): encoded (compressed),
    /// and sealed in an encrypted repository.
    pub fn encode(&self, id: &ChunkId, data: &[u8], compression: Compression) -> Result<Vec<u8>> {
        if !self.keys.encrypted {
            return chunk::encode(data, compression);
        }
        let sealer = self.keys.sealer.as_ref().ok_or_else(|| self.key_required())?;
        // Encoded straight behind room for the sealed header: sealed in place.
        let mut buf = Vec::with_capacity(crypto::SEALED_OVERHEAD + chunk::CHUNK_HEADER_LEN + data.len() / 2);
        buf.resize(crypto::SEALED_HEADER_LEN, 0);
        chunk::encode_into(&mut buf, data, compression)?;
        sealer.seal_chunk_in_place(id, &mut buf)?;
        Ok(buf)
    }

    /// The largest a chunk file can be: header and plaintext, and what
    /// sealing adds.
    pub fn max_file_len(&self) -> u64 {
        let plain = (chunk::CHUNK_HEADER_LEN + self.max_len) as u64;
        if self.keys.encrypted {
            plain + crypto::SEALED_OVERHEAD as u64
        } else {
            plain
        }
    }

    /// The whole length of a chunk file from its first 12 bytes: `Ok(None)`
    /// for a compressed plain chunk written before the payload length was
    /// recorded; `Err` if they cannot start a chunk of this repository.
    pub fn whole_file_len(&self, header: &[u8]) -> std::result::Result<Option<u64>, String> {
        if self.keys.encrypted {
            crypto::sealed_file_len(header, chunk::CHUNK_HEADER_LEN + self.max_len).map(Some)
        } else {
            chunk::whole_file_len(header, self.max_len)
        }
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
        if !m.is_file() || m.len() < chunk::CHUNK_HEADER_LEN as u64 || m.len() > self.max_file_len() {
            return Ok(false);
        }
        let mut header = [0u8; chunk::CHUNK_HEADER_LEN];
        f.read_exact_at(&mut header, 0)?;
        match self.whole_file_len(&header) {
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
        // compressed payload is only kept when it is shorter), and sealed,
        // what sealing adds.
        crate::repository::read_bounded(&self.path(id), self.max_file_len()).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::CorruptChunk { id: id.to_hex(), reason: "missing".into() },
            ErrorKind::InvalidData => Error::CorruptChunk { id: id.to_hex(), reason: e.to_string() },
            _ => Error::repo_io(format!("reading chunk {id}"), e),
        })
    }

    /// Reads, opens (if sealed), decodes and checks a chunk.
    pub fn read(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let ids = self.keys.ids.as_ref().ok_or_else(|| self.key_required())?;
        let raw = self.read_raw(id)?;
        let inner = self.open(id, raw)?;
        chunk::decode_owned(id, inner, self.max_len, ids)
    }

    /// A chunk file's encoded chunk: itself, or opened if sealed.
    fn open(&self, id: &ChunkId, raw: Vec<u8>) -> Result<Vec<u8>> {
        if !self.keys.encrypted {
            return Ok(raw);
        }
        let sealer = self.keys.sealer.as_ref().ok_or_else(|| self.key_required())?;
        sealer
            .open_chunk(id, raw, chunk::CHUNK_HEADER_LEN + self.max_len)
            .map_err(|reason| Error::CorruptChunk { id: id.to_hex(), reason })
    }

    /// Checks a chunk file as far as this process can: with the key (or
    /// unencrypted) opened, decoded and re-hashed, returning the plaintext
    /// length; without the key its header and checksum over the ciphertext
    /// (`None`: the plaintext length is sealed). Also returns the bytes read.
    pub fn check(&self, id: &ChunkId) -> Result<(u64, Option<u64>)> {
        let raw = self.read_raw(id)?;
        let n = raw.len() as u64;
        if self.keys.encrypted && self.keys.sealer.is_none() {
            crypto::check_sealed(&raw, chunk::CHUNK_HEADER_LEN + self.max_len)
                .map_err(|reason| Error::CorruptChunk { id: id.to_hex(), reason })?;
            return Ok((n, None));
        }
        let ids = self.keys.ids.as_ref().ok_or_else(|| self.key_required())?;
        let inner = self.open(id, raw)?;
        let plain = chunk::decode_owned(id, inner, self.max_len, ids)?;
        Ok((n, Some(plain.len() as u64)))
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
