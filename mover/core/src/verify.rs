//! Verification: every manifest is parsed and checksummed, every chunk it
//! names is checked to exist (and, with `read_data`, re-read, decompressed
//! and re-hashed). Every problem is reported, each naming the backups, VMs
//! and disks it affects; verification never stops at the first. A chunk that
//! fails is quarantined so that no later backup deduplicates against it.
//!
//! An encrypted repository is verified without its key as far as the key is
//! not needed: each manifest's checksum and block maps (its metadata is
//! sealed, so problems name no VM and disks go by number), the presence of
//! every chunk they name, and with `read_data` each chunk file's checksum
//! over its ciphertext. With the key, everything, as for any repository;
//! sealed chunks' plaintext lengths are then checked only with `read_data`
//! (they are inside the ciphertext).

use crate::chunk::{ChunkId, CHUNK_HEADER_LEN};
use crate::chunk_store::ChunkStore;
use crate::error::{Error, Result};
use crate::extents::block_len;
use crate::manifest::Manifest;
use crate::progress::{worker_threads, Cancel, Progress, Ticker};
use crate::repository::{check_backup_id, Repository};
use crossbeam_channel::bounded;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A backup and disk that a problem touches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Affected {
    pub backup: String,
    pub vm: String,
    pub disk: String,
}

#[derive(Clone, Debug)]
pub struct Problem {
    /// `bad_manifest`, `missing_chunk`, `corrupt_chunk`, or `length_mismatch`
    /// (a block whose length differs from its chunk's plaintext length).
    pub kind: String,
    /// The backup id or chunk id at fault.
    pub object: String,
    pub message: String,
    pub affected: Vec<Affected>,
}

#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub backups_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the named backups (all of them if `ids` is empty).
pub fn verify(
    repo: &Repository,
    ids: &[String],
    read_data: bool,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<VerifyReport> {
    let ids: Vec<String> = if ids.is_empty() {
        repo.backup_ids()?
    } else {
        for id in ids {
            check_backup_id(id)?;
            if !repo.manifest_path(id).exists() {
                return Err(Error::NotFound(format!("no backup {id} in the repository")));
            }
        }
        ids.to_vec()
    };
    let mut report = VerifyReport::default();
    // chunk -> the (backup, vm, disk) that use it, with the length each needs
    // (UNKNOWN_LEN: a sealed manifest read without the key)
    let mut users: BTreeMap<ChunkId, BTreeSet<(Affected, u64)>> = BTreeMap::new();
    let keyless = repo.require_key().is_err();
    for id in &ids {
        cancel.check()?;
        report.backups_checked += 1;
        if keyless {
            let path = repo.manifest_path(id);
            match Manifest::read(&path).and_then(|data| Manifest::decode_public(&path, &data)) {
                Ok(p) => {
                    for (k, map) in p.maps.iter().enumerate() {
                        let who = Affected { backup: id.clone(), vm: String::new(), disk: format!("disk {k}") };
                        for (_, c) in map.stored() {
                            users.entry(c).or_default().insert((who.clone(), UNKNOWN_LEN));
                        }
                    }
                }
                Err(e) => report.problems.push(Problem {
                    kind: "bad_manifest".into(),
                    object: id.clone(),
                    message: e.to_string(),
                    affected: vec![Affected { backup: id.clone(), vm: String::new(), disk: String::new() }],
                }),
            }
            continue;
        }
        match repo.load_manifest(id) {
            Ok(m) => {
                for (d, map) in m.meta.disks.iter().zip(&m.maps) {
                    let who = Affected { backup: id.clone(), vm: m.meta.vm.clone(), disk: d.name.clone() };
                    for (i, c) in map.stored() {
                        let len = block_len(i, d.size, m.meta.chunk_size);
                        users.entry(c).or_default().insert((who.clone(), len));
                    }
                }
            }
            Err(e) => {
                // A sealed manifest that fails names no VM: its metadata is not trusted.
                let vm = if repo.keys.encrypted {
                    String::new()
                } else {
                    Manifest::load_metadata(&repo.manifest_path(id)).map(|m| m.vm).unwrap_or_default()
                };
                report.problems.push(Problem {
                    kind: "bad_manifest".into(),
                    object: id.clone(),
                    message: e.to_string(),
                    affected: vec![Affected { backup: id.clone(), vm, disk: String::new() }],
                });
            }
        }
    }
    let chunks: Vec<ChunkId> = users.keys().copied().collect();
    let store = ChunkStore::new(repo);
    let max_len = repo.chunk_size() as usize;
    let mut ticker = Ticker::new(progress, cancel, chunks.len() as u64);
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (tx, rx) = bounded::<(ChunkId, Result<(u64, Option<u64>)>)>(64);
    let mut fatal = None;
    std::thread::scope(|s| {
        let threads = if read_data { worker_threads() } else { 1 };
        for _ in 0..threads {
            let tx = tx.clone();
            let (chunks, next, store, abort) = (&chunks, &next, &store, &abort);
            s.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= chunks.len() || cancel.is_cancelled() || abort.load(Ordering::Relaxed) {
                    break;
                }
                let id = chunks[k];
                let r = check_chunk(store, &id, read_data, max_len);
                if tx.send((id, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (id, r) in rx.iter() {
            report.chunks_checked += 1;
            match r {
                Ok((n, plain_len)) => {
                    report.bytes_checked += n;
                    // Restore refuses a chunk whose plaintext is not exactly its block.
                    let differs = |len: &u64| plain_len.map(|p| *len != p && *len != UNKNOWN_LEN).unwrap_or(false);
                    let plain_len = plain_len.unwrap_or(0);
                    let wrong: BTreeSet<&Affected> =
                        users[&id].iter().filter(|(_, len)| differs(len)).map(|(a, _)| a).collect();
                    if !wrong.is_empty() {
                        let lens: BTreeSet<u64> = users[&id].iter().map(|(_, l)| *l).filter(|l| differs(l)).collect();
                        let lens: Vec<String> = lens.iter().map(|l| l.to_string()).collect();
                        report.problems.push(Problem {
                            kind: "length_mismatch".into(),
                            object: id.to_hex(),
                            message: format!(
                                "chunk {id} holds {plain_len} bytes where blocks of {} bytes name it",
                                lens.join(" and ")
                            ),
                            affected: wrong.into_iter().cloned().collect(),
                        });
                    }
                }
                Err(Error::CorruptChunk { reason, .. }) => {
                    let missing = reason == "missing";
                    let mut message = format!(
                        "chunk {id} is {}",
                        if missing { "missing".to_string() } else { format!("corrupt: {reason}") }
                    );
                    if missing
                        && store
                            .path(&id)
                            .with_file_name(format!("{}{}", id.to_hex(), crate::chunk_store::QUARANTINE_SUFFIX))
                            .exists()
                    {
                        message.push_str(
                            " (its corrupt copy was quarantined earlier; the next backup of this data stores it again)",
                        );
                    }
                    if !missing {
                        match store.quarantine(&id) {
                            Ok(()) => message.push_str(" (quarantined; the next backup of this data stores it again)"),
                            Err(e) => message.push_str(&format!(" (could not quarantine it: {e})")),
                        }
                    }
                    report.problems.push(Problem {
                        kind: if missing { "missing_chunk" } else { "corrupt_chunk" }.into(),
                        object: id.to_hex(),
                        message,
                        affected: users[&id]
                            .iter()
                            .map(|(a, _)| a.clone())
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                    });
                }
                Err(e) => {
                    if fatal.is_none() {
                        fatal = Some(e);
                        abort.store(true, Ordering::SeqCst);
                    }
                }
            }
            if fatal.is_none() {
                if let Err(e) = ticker.advance(1) {
                    fatal = Some(e);
                    abort.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }
    // Cancelled part-way: some chunks were never checked, so no verdict.
    cancel.check()?;
    ticker.finish()?;
    Ok(report)
}

/// The length a block of a sealed manifest read without the key needs: unknown.
const UNKNOWN_LEN: u64 = u64::MAX;

/// Checks one chunk; returns the bytes re-read and its plaintext length
/// (None: sealed, and not opened).
fn check_chunk(store: &ChunkStore, id: &ChunkId, read_data: bool, max_len: usize) -> Result<(u64, Option<u64>)> {
    if read_data {
        return store.check(id);
    }
    let corrupt = |reason: String| Error::CorruptChunk { id: id.to_hex(), reason };
    let (file_len, header) = match read_header(&store.path(id)) {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(corrupt("missing".into())),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(corrupt(e.to_string())),
        Err(e) => return Err(Error::repo_io(format!("checking chunk {id}"), e)),
    };
    if (file_len as usize) < CHUNK_HEADER_LEN {
        return Err(corrupt(format!("file is {file_len} bytes, shorter than its header")));
    }
    if store.sealed() {
        let whole = store.whole_file_len(&header).map_err(corrupt)?.unwrap_or(file_len);
        if whole != file_len {
            return Err(corrupt(format!("sealed chunk file is {file_len} bytes, its header says {whole}")));
        }
        return Ok((0, None));
    }
    let plain_len = crate::chunk::check_header(&header, max_len).map_err(corrupt)?;
    if header[4] == crate::chunk::ENC_STORED && file_len != (CHUNK_HEADER_LEN + plain_len) as u64 {
        return Err(corrupt(format!("stored chunk file is {file_len} bytes for {plain_len} of plaintext")));
    }
    Ok((0, Some(plain_len as u64)))
}

/// The length and first `CHUNK_HEADER_LEN` bytes of a chunk file, which
/// must be a regular file (a symlink or a directory is InvalidData).
fn read_header(path: &std::path::Path) -> std::io::Result<(u64, [u8; CHUNK_HEADER_LEN])> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "a symbolic link, not a regular file")
                } else {
                    e
                }
            },
        )?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    let mut header = [0u8; CHUNK_HEADER_LEN];
    let mut got = 0;
    while got < CHUNK_HEADER_LEN {
        match f.read(&mut header[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok((if got < CHUNK_HEADER_LEN { got as u64 } else { m.len() }, header))
}
