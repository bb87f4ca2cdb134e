//! Verification: every manifest is parsed and checksummed, every chunk it
//! names is checked to exist (and, with `read_data`, re-read, decompressed
//! and re-hashed). Every problem is reported, each naming the backups, VMs
//! and disks it affects; verification never stops at the first. A chunk that
//! fails is quarantined so that no later backup deduplicates against it.

use crate::chunk::{ChunkId, CHUNK_HEADER_LEN};
use crate::chunk_store::ChunkStore;
use crate::error::{Error, Result};
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
    /// `bad_manifest`, `missing_chunk` or `corrupt_chunk`.
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
    // chunk -> the (backup, vm, disk) that use it
    let mut users: BTreeMap<ChunkId, BTreeSet<Affected>> = BTreeMap::new();
    for id in &ids {
        cancel.check()?;
        report.backups_checked += 1;
        match repo.load_manifest(id) {
            Ok(m) => {
                for (d, map) in m.meta.disks.iter().zip(&m.maps) {
                    let who = Affected { backup: id.clone(), vm: m.meta.vm.clone(), disk: d.name.clone() };
                    for c in map.iter().filter(|c| !c.is_zero()) {
                        users.entry(*c).or_default().insert(who.clone());
                    }
                }
            }
            Err(e) => {
                let vm = Manifest::load_metadata(&repo.manifest_path(id)).map(|m| m.vm).unwrap_or_default();
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
    let (tx, rx) = bounded::<(ChunkId, Result<u64>)>(64);
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
                Ok(n) => report.bytes_checked += n,
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
                        affected: users[&id].iter().cloned().collect(),
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

fn check_chunk(store: &ChunkStore, id: &ChunkId, read_data: bool, max_len: usize) -> Result<u64> {
    if read_data {
        let raw = store.read_raw(id)?;
        crate::chunk::decode(id, &raw, max_len)?;
        return Ok(raw.len() as u64);
    }
    match store.stat_len(id)? {
        None => Err(Error::CorruptChunk { id: id.to_hex(), reason: "missing".into() }),
        Some(n) if (n as usize) < CHUNK_HEADER_LEN => {
            Err(Error::CorruptChunk { id: id.to_hex(), reason: format!("file is {n} bytes, shorter than its header") })
        }
        Some(_) => Ok(0),
    }
}
