//! Backing up disks into the repository.
//!
//! A `BackupSession` is one backup point: it takes a lease, backs up one or
//! more disks, and on `commit` makes every chunk durable before it writes the
//! manifest atomically. Dropped without commit, it leaves only chunks behind,
//! which a later backup reuses or gc removes.
//!
//! The data path per disk: reader threads (one, or as many as the source
//! asks for) read the blocks to read, in ascending order, into a fixed pool
//! of buffers (memory stays bounded whatever the disk size); worker threads
//! (one per core) detect zero blocks, hash, skip chunks the repository
//! already has and compress the rest; two writer threads store the new
//! chunks, starting their writeback at once, so that computing, writing and
//! the flush to storage overlap and the `syncfs` at commit finds little
//! left to do; the calling thread collects block ids into the block map and
//! reports progress.

use crate::block_map::BlockMap;
use crate::chunk::{self, ChunkId, Compression};
use crate::chunk_store::ChunkStore;
use crate::clock;
use crate::error::{Error, Result};
use crate::extents::{block_count, block_len, normalize, BlockRanges, Extent};
use crate::lease::Lease;
use crate::manifest::{DiskMeta, DiskStats, Manifest, Metadata};
use crate::progress::{worker_threads, Cancel, Progress, Ticker};
use crate::repository::{check_backup_id, write_atomic, Repository};
use crate::source::DiskSource;
use crossbeam_channel::bounded;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What to read of a disk.
#[derive(Clone, Debug, Default)]
pub struct DiskRequest {
    /// The disk's name in the backup (`scsi0:0`, `disk0`, ...).
    pub name: String,
    /// Only these byte ranges changed since the parent (QueryChangedDiskAreas);
    /// every other block comes from the parent's block map.
    pub changed: Option<Vec<Extent>>,
    /// The hypervisor's change id for this disk as of this backup (CBT).
    pub change_id: Option<String>,
}

pub struct BackupSession {
    repo: Repository,
    store: ChunkStore,
    id: String,
    vm: String,
    started: f64,
    parent: Option<Manifest>,
    disks: Vec<DiskMeta>,
    maps: Vec<BlockMap>,
    /// Chunks this session already stored or found, so workers skip them.
    claimed: Mutex<HashSet<ChunkId>>,
    /// The repository's root, opened before any chunk is written, so that
    /// the syncfs at commit sees every writeback error since (see
    /// `Repository::sync_since`).
    root: std::fs::File,
    lease: Lease,
}

enum Outcome {
    Zero,
    Reused,
    New(u64),
}

/// What a worker made of a block: its final outcome, or an encoded chunk
/// for the writers to store.
enum Processed {
    Done(ChunkId, Outcome),
    Store(ChunkId, Vec<u8>),
}

/// Threads that write new chunks. They mostly wait on the filesystem, so
/// they cost little CPU; two keep a create or a throttled write in one from
/// holding up the other.
const WRITER_THREADS: usize = 2;

fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidInput(format!("{kind} name {name:?} must be 1-255 printable characters")));
    }
    Ok(())
}

impl BackupSession {
    /// Starts a backup point of `vm`, optionally incremental to `parent`.
    pub fn begin(repo: &Repository, vm: &str, parent: Option<&str>) -> Result<BackupSession> {
        check_name("VM", vm)?;
        let parent = match parent {
            Some(pid) => {
                check_backup_id(pid)?;
                let m = repo.load_manifest(pid)?;
                if m.meta.vm != vm {
                    return Err(Error::InvalidInput(format!(
                        "parent {pid} is a backup of VM {:?}, not {vm:?}",
                        m.meta.vm
                    )));
                }
                Some(m)
            }
            None => None,
        };
        let started = clock::now_unix();
        let id = format!("{}-{:08x}", clock::compact(started), clock::random_u32());
        let root = repo.open_root()?;
        let lease = Lease::acquire(repo, &id, started)?;
        Ok(BackupSession {
            repo: repo.clone(),
            store: ChunkStore::new(repo),
            id,
            vm: vm.to_string(),
            started,
            parent,
            disks: Vec::new(),
            maps: Vec::new(),
            claimed: Mutex::new(HashSet::new()),
            root,
            lease,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Backs up one disk of the VM.
    pub fn add_disk(
        &mut self,
        source: &dyn DiskSource,
        req: &DiskRequest,
        progress: &mut dyn Progress,
        cancel: &Cancel,
    ) -> Result<DiskMeta> {
        check_name("disk", &req.name)?;
        if self.disks.iter().any(|d| d.name == req.name) {
            return Err(Error::InvalidInput(format!("disk {} is already in this backup", req.name)));
        }
        let t0 = Instant::now();
        // Before the size sizes anything (the block map below).
        crate::source::check_size(source)?;
        let size = source.size();
        let bs = self.repo.chunk_size();
        let n = block_count(size, bs);
        // The block map and the plan grow with the data, not with the disk:
        // a 64 TiB disk with little data costs little memory.
        let mut map = BlockMap::zeros(n);
        let mut stats = DiskStats::default();
        let allocated = normalize(&source.allocated()?, size)
            .map_err(|e| Error::Source(format!("{}: allocation map: {e}", source.describe())))?;
        let mut alloc = BlockRanges::new(&allocated, size, bs);

        // From the parent, a block can be taken as is only if it has the same
        // length there (a grown or shrunk disk re-reads its boundary block).
        let parent_map: Option<(&BlockMap, u64)> = match (&req.changed, &self.parent) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::InvalidInput("changed extents need a parent backup".into()));
            }
            (Some(_), Some(p)) => {
                let i = p.meta.disks.iter().position(|d| d.name == req.name).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "parent {} has no disk {:?}: back up the whole disk instead",
                        p.meta.id, req.name
                    ))
                })?;
                Some((&p.maps[i], p.meta.disks[i].size))
            }
        };
        let mut changed = match &req.changed {
            Some(c) => Some(BlockRanges::new(&normalize(c, size)?, size, bs)),
            None => None,
        };

        let mut plan: Vec<u64> = Vec::new();
        // Non-zero blocks taken from the parent.
        let mut from_parent: Vec<(u64, ChunkId)> = Vec::new();
        let mut parent_ids = parent_map.map(|(m, _)| m.stored().peekable());
        for i in 0..n {
            let len = block_len(i, size, bs);
            if let (Some(changed), Some((pmap, psize)), Some(pids)) = (&mut changed, &parent_map, &mut parent_ids) {
                while pids.peek().is_some_and(|e| e.0 < i) {
                    pids.next();
                }
                let same_len = i < pmap.len() && block_len(i, *psize, bs) == len;
                if !changed.contains(i) && same_len {
                    stats.parent_blocks += 1;
                    if let Some(&(_, id)) = pids.peek().filter(|e| e.0 == i) {
                        map.set(i, id);
                        from_parent.push((i, id));
                    }
                    continue;
                }
            }
            if alloc.contains(i) {
                plan.push(i);
            } else {
                stats.zero_blocks += 1;
                stats.bytes_skipped += len;
            }
        }
        // Chunks taken from the parent are reused like any other: touched
        // under this backup's lease, so gc keeps them even if the parent is
        // forgotten before this backup commits. One that is gone (or was
        // quarantined) is read from the source instead.
        let mut present: HashMap<ChunkId, bool> = HashMap::new();
        let mut reread = false;
        for &(i, id) in &from_parent {
            let ok = match present.get(&id) {
                Some(v) => *v,
                None => {
                    let v = reuse_existing(&self.store, &self.claimed, &id)?;
                    present.insert(id, v);
                    v
                }
            };
            if !ok {
                map.set(i, ChunkId::ZERO);
                stats.parent_blocks -= 1;
                reread = true;
                if alloc.contains(i) {
                    plan.push(i);
                } else {
                    stats.zero_blocks += 1;
                    stats.bytes_skipped += block_len(i, size, bs);
                }
            }
        }
        if reread {
            plan.sort_unstable();
        }
        let mode = if changed.is_some() {
            "changed"
        } else if stats.bytes_skipped > 0 {
            "allocated"
        } else {
            "full"
        };

        self.run_pipeline(source, &plan, &mut map, &mut stats, progress, cancel)?;
        stats.seconds = t0.elapsed().as_secs_f64();
        let meta = DiskMeta {
            name: req.name.clone(),
            size,
            blocks: n,
            mode: mode.into(),
            source: source.describe(),
            source_format: source.format().into(),
            change_id: req.change_id.clone(),
            stats,
        };
        self.disks.push(meta.clone());
        self.maps.push(map);
        Ok(meta)
    }

    fn run_pipeline(
        &self,
        source: &dyn DiskSource,
        plan: &[u64],
        map: &mut BlockMap,
        stats: &mut DiskStats,
        progress: &mut dyn Progress,
        cancel: &Cancel,
    ) -> Result<()> {
        let bs = self.repo.chunk_size();
        let size = source.size();
        let total: u64 = plan.iter().map(|i| block_len(*i, size, bs)).sum();
        let mut ticker = Ticker::new(progress, cancel, total);
        let threads = worker_threads();
        // A network source asks for several reads in flight; each reader
        // holds one buffer, so the pool grows with them (memory stays bounded).
        let readers = source.parallel_reads().clamp(1, 16);
        let inflight = threads * 2 + 2 + readers - 1;
        let (job_tx, job_rx) = bounded::<(u64, Vec<u8>)>(inflight);
        let (res_tx, res_rx) = bounded::<Result<(u64, u64, ChunkId, Outcome)>>(inflight);
        let (buf_tx, buf_rx) = bounded::<Vec<u8>>(inflight);
        for _ in 0..inflight {
            buf_tx.send(Vec::with_capacity(bs as usize)).expect("pool has room");
        }
        // New chunks go from the workers to writer threads through a short
        // queue: a worker never waits on the filesystem (a create, a write
        // throttled by dirty-page limits, writeback started on a full device
        // queue), so hashing and compressing overlap with the writes instead
        // of alternating with them. The writers hold at most `threads * 2`
        // queued chunks plus one each in hand: memory stays bounded.
        let writers = WRITER_THREADS;
        let (store_tx, store_rx) = bounded::<(u64, u64, ChunkId, Vec<u8>)>(threads * 2);
        let abort = AtomicBool::new(false);
        let next = AtomicUsize::new(0);
        let compression = self.repo.compression;
        let mut first_error: Option<Error> = None;

        std::thread::scope(|s| {
            let (abort, buf_rx, next) = (&abort, &buf_rx, &next);
            // Readers take block indices from a shared counter: each block is
            // read exactly once, in roughly ascending order.
            for _ in 0..readers {
                let (res_tx_reader, job_tx) = (res_tx.clone(), job_tx.clone());
                s.spawn(move || loop {
                    if abort.load(Ordering::Relaxed) || cancel.is_cancelled() {
                        break;
                    }
                    let mut buf = match buf_rx.recv() {
                        Ok(b) => b,
                        Err(_) => break,
                    };
                    let i = match plan.get(next.fetch_add(1, Ordering::Relaxed)) {
                        Some(&i) => i,
                        None => break,
                    };
                    let len = block_len(i, size, bs) as usize;
                    buf.resize(len, 0);
                    if let Err(e) = source.read_at(&mut buf, i * bs) {
                        let _ = res_tx_reader.send(Err(e));
                        break;
                    }
                    if job_tx.send((i, buf)).is_err() {
                        break;
                    }
                    // job_tx dropped at the end: workers finish what is queued and stop.
                });
            }
            drop(job_tx);
            for _ in 0..threads {
                let (job_rx, res_tx, buf_tx, store_tx) =
                    (job_rx.clone(), res_tx.clone(), buf_tx.clone(), store_tx.clone());
                let store = &self.store;
                let claimed = &self.claimed;
                s.spawn(move || {
                    for (i, buf) in job_rx.iter() {
                        let len = buf.len() as u64;
                        let r = if abort.load(Ordering::Relaxed) {
                            Err(Error::Cancelled)
                        } else {
                            process_block(store, compression, claimed, &buf)
                        };
                        let _ = buf_tx.send(buf);
                        let sent = match r {
                            Ok(Processed::Done(id, o)) => res_tx.send(Ok((i, len, id, o))).is_ok(),
                            Ok(Processed::Store(id, encoded)) => store_tx.send((i, len, id, encoded)).is_ok(),
                            Err(e) => res_tx.send(Err(e)).is_ok(),
                        };
                        if !sent {
                            break;
                        }
                    }
                });
            }
            drop(store_tx);
            for _ in 0..writers {
                let (store_rx, res_tx) = (store_rx.clone(), res_tx.clone());
                let store = &self.store;
                let claimed = &self.claimed;
                s.spawn(move || {
                    for (i, len, id, encoded) in store_rx.iter() {
                        let r = if abort.load(Ordering::Relaxed) {
                            Err(Error::Cancelled)
                        } else {
                            store.insert(&id, &encoded)
                        };
                        let r = match r {
                            Ok(n) => Ok((i, len, id, Outcome::New(n))),
                            Err(e) => {
                                // Not stored after all: a later disk or retry must not take it as present.
                                claimed.lock().expect("claimed set").remove(&id);
                                Err(e)
                            }
                        };
                        if res_tx.send(r).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(store_rx);
            drop(res_tx);
            drop(job_rx);
            for r in res_rx.iter() {
                if first_error.is_some() {
                    continue; // drain so that no thread blocks
                }
                let step = r.and_then(|(i, len, id, outcome)| {
                    map.set(i, id);
                    stats.bytes_read += len;
                    match outcome {
                        Outcome::Zero => stats.zero_blocks += 1,
                        Outcome::Reused => stats.reused_chunks += 1,
                        Outcome::New(n) => {
                            stats.new_chunks += 1;
                            stats.bytes_stored += n;
                        }
                    }
                    ticker.advance(len)
                });
                if let Err(e) = step {
                    abort.store(true, Ordering::SeqCst);
                    first_error = Some(e);
                }
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        cancel.check()?;
        ticker.finish()
    }

    /// Makes the backup point durable and visible; returns its metadata.
    pub fn commit(self, config: serde_json::Value, attributes: serde_json::Value) -> Result<Metadata> {
        if self.disks.is_empty() {
            return Err(Error::InvalidInput("a backup needs at least one disk".into()));
        }
        let meta = Metadata {
            id: self.id.clone(),
            vm: self.vm.clone(),
            created: clock::rfc3339(self.started),
            created_unix: self.started,
            parent: self.parent.as_ref().map(|p| p.meta.id.clone()),
            repository: self.repo.config.id.clone(),
            chunk_size: self.repo.chunk_size(),
            disks: self.disks,
            config,
            attributes,
        };
        let manifest = Manifest { meta, maps: self.maps };
        // Every chunk the manifest names must be durable before the manifest is.
        self.repo.sync_since(&self.root)?;
        // And still present: not if a gc took this backup's lease for stale.
        self.lease.check()?;
        write_atomic(&self.repo.manifest_path(&self.id), &manifest.encode())?;
        Ok(manifest.meta)
    }
}

fn process_block(
    store: &ChunkStore,
    compression: Compression,
    claimed: &Mutex<HashSet<ChunkId>>,
    data: &[u8],
) -> Result<Processed> {
    if chunk::is_all_zero(data) {
        return Ok(Processed::Done(ChunkId::ZERO, Outcome::Zero));
    }
    let id = ChunkId::of(data);
    if id.is_zero() {
        // 2^-128: the block map could not tell this block from a zero block.
        return Err(Error::Repository("a block hashes to the reserved all-zero id".into()));
    }
    if !claimed.lock().expect("claimed set").insert(id) {
        return Ok(Processed::Done(id, Outcome::Reused));
    }
    let encoded = (|| {
        if store.reuse(&id)? {
            return Ok(None);
        }
        chunk::encode(data, compression).map(Some)
    })();
    match encoded {
        Ok(None) => Ok(Processed::Done(id, Outcome::Reused)),
        Ok(Some(encoded)) => Ok(Processed::Store(id, encoded)),
        Err(e) => {
            // Not stored after all: a later disk or retry must not take it as present.
            claimed.lock().expect("claimed set").remove(&id);
            Err(e)
        }
    }
}

/// True if the chunk is present (and now marked as reused for gc); false if
/// it must be stored again.
fn reuse_existing(store: &ChunkStore, claimed: &Mutex<HashSet<ChunkId>>, id: &ChunkId) -> Result<bool> {
    if claimed.lock().expect("claimed set").contains(id) {
        return Ok(true);
    }
    if store.reuse(id)? {
        claimed.lock().expect("claimed set").insert(*id);
        return Ok(true);
    }
    Ok(false)
}
