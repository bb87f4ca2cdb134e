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
//!
//! Several disks of one session can be added at once, from several threads:
//! `add_disk` takes `&self`. Only the small shared state is behind locks
//! (the disks collected so far, the set of chunks claimed by this session);
//! each disk's data path runs on its own threads without holding either.
//! `commit` takes the session by value, so it cannot run while a disk is
//! being added; `abort` cancels the disks under way.

use crate::block_map::BlockMap;
use crate::chunk::{self, ChunkId, Compression};
use crate::chunk_store::ChunkStore;
use crate::clock;
use crate::error::{Error, Result};
use crate::extents::{block_count, block_len, intersect, normalize, BlockRanges, Extent};
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
    /// Only these byte ranges hold data (QueryChangedDiskAreas with change
    /// id `*`); every other block is recorded as a zero block without being
    /// read. No parent needed; not together with `changed`.
    pub allocated: Option<Vec<Extent>>,
}

pub struct BackupSession {
    repo: Repository,
    store: ChunkStore,
    id: String,
    vm: String,
    started: f64,
    parent: Option<Manifest>,
    /// The disks in the order their `add_disk` began, done or under way.
    disks: Mutex<Vec<Slot>>,
    /// Chunks this session already stored or found, so workers skip them.
    claims: Claims,
    /// Raised by `abort`: every disk under way stops.
    aborted: Cancel,
    /// The repository's root, opened before any chunk is written, so that
    /// the syncfs at commit sees every writeback error since (see
    /// `Repository::sync_since`).
    root: std::fs::File,
    lease: Lease,
}

/// A disk of the session: its name from the start of its `add_disk`, its
/// metadata and block map once done.
struct Slot {
    name: String,
    done: Option<(DiskMeta, BlockMap)>,
}

/// Removes a disk's slot unless it was filled: a failed, cancelled or
/// panicking `add_disk` leaves nothing behind, so the name can be retried.
struct SlotGuard<'a> {
    disks: &'a Mutex<Vec<Slot>>,
    name: &'a str,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        disks.retain(|d| d.name != self.name || d.done.is_some());
    }
}

/// The chunks this session has stored or found present. A worker that finds
/// an id here takes it as stored, even while another disk's writer is still
/// storing it; should that write fail, the id is released (a later block
/// stores it again) and remembered, so that `commit` can check that no
/// block map names a chunk that was never stored.
#[derive(Default)]
struct Claims {
    claimed: Mutex<HashSet<ChunkId>>,
    released: Mutex<HashSet<ChunkId>>,
}

impl Claims {
    /// True if the caller is the first to claim `id`.
    fn claim(&self, id: ChunkId) -> bool {
        self.claimed.lock().expect("claimed set").insert(id)
    }
    fn contains(&self, id: &ChunkId) -> bool {
        self.claimed.lock().expect("claimed set").contains(id)
    }
    /// Not stored after all: a later block or disk must not take it as present.
    fn release(&self, id: &ChunkId) {
        self.claimed.lock().expect("claimed set").remove(id);
        self.released.lock().expect("released set").insert(*id);
    }
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
        repo.require_key()?;
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
            disks: Mutex::new(Vec::new()),
            claims: Claims::default(),
            aborted: Cancel::new(),
            root,
            lease,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The names of the disks whose `add_disk` is under way.
    pub fn running(&self) -> Vec<String> {
        let disks = self.disks.lock().expect("disk list");
        disks.iter().filter(|d| d.done.is_none()).map(|d| d.name.clone()).collect()
    }

    /// Cancels every `add_disk` under way (they fail with `Cancelled`); the
    /// session is dropped by its owner once they have returned.
    pub fn abort(&self) {
        self.aborted.cancel();
    }

    /// Backs up one disk of the VM. Several disks may be added at once from
    /// several threads; a name already added or under way is refused.
    pub fn add_disk(
        &self,
        source: &dyn DiskSource,
        req: &DiskRequest,
        progress: &mut dyn Progress,
        cancel: &Cancel,
    ) -> Result<DiskMeta> {
        check_name("disk", &req.name)?;
        self.aborted.check()?;
        {
            let mut disks = self.disks.lock().expect("disk list");
            match disks.iter().find(|d| d.name == req.name) {
                Some(d) if d.done.is_some() => {
                    return Err(Error::InvalidInput(format!("disk {} is already in this backup", req.name)))
                }
                Some(_) => {
                    return Err(Error::InvalidInput(format!("disk {} is already being added to this backup", req.name)))
                }
                None => disks.push(Slot { name: req.name.clone(), done: None }),
            }
        }
        let _slot = SlotGuard { disks: &self.disks, name: &req.name };
        let cancel = cancel.or(&self.aborted);
        let (meta, map) = self.back_up(source, req, progress, &cancel)?;
        let mut disks = self.disks.lock().expect("disk list");
        if let Some(slot) = disks.iter_mut().find(|d| d.name == req.name) {
            slot.done = Some((meta.clone(), map));
        }
        Ok(meta)
    }

    fn back_up(
        &self,
        source: &dyn DiskSource,
        req: &DiskRequest,
        progress: &mut dyn Progress,
        cancel: &Cancel,
    ) -> Result<(DiskMeta, BlockMap)> {
        if req.changed.is_some() && req.allocated.is_some() {
            return Err(Error::InvalidInput(
                "give changed extents (with a parent) or allocated extents, not both".into(),
            ));
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
        let mut allocated = normalize(&source.allocated()?, size)
            .map_err(|e| Error::Source(format!("{}: allocation map: {e}", source.describe())))?;
        // The caller's areas narrow the source's own map: a block outside
        // either reads as zeros.
        if let Some(given) = &req.allocated {
            allocated = intersect(&allocated, &normalize(given, size)?);
        }
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
                    let v = reuse_existing(&self.store, &self.claims, &id)?;
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
        } else if req.allocated.is_some() || stats.bytes_skipped > 0 {
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
        Ok((meta, map))
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
                let claims = &self.claims;
                s.spawn(move || {
                    for (i, buf) in job_rx.iter() {
                        let len = buf.len() as u64;
                        let r = if abort.load(Ordering::Relaxed) {
                            Err(Error::Cancelled)
                        } else {
                            process_block(store, compression, claims, &buf)
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
                let claims = &self.claims;
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
                                claims.release(&id);
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
        // Taking `self` by value, commit runs after every add_disk returned:
        // each slot left is a disk done.
        let slots = self.disks.into_inner().unwrap_or_else(|e| e.into_inner());
        let (disks, maps): (Vec<DiskMeta>, Vec<BlockMap>) = slots.into_iter().filter_map(|s| s.done).unzip();
        if disks.is_empty() {
            return Err(Error::InvalidInput("a backup needs at least one disk".into()));
        }
        // A chunk whose write failed may have been taken as stored by another
        // disk running at the same time: the manifest must not name it unless
        // it was stored after all.
        let released = self.claims.released.into_inner().unwrap_or_else(|e| e.into_inner());
        if !released.is_empty() {
            for (d, map) in disks.iter().zip(&maps) {
                for (i, id) in map.stored().filter(|(_, id)| released.contains(id)) {
                    if !self.store.reuse(&id)? {
                        return Err(Error::Repository(format!(
                            "block {i} of disk {} names chunk {id}, whose write failed: back up the disk again",
                            d.name
                        )));
                    }
                }
            }
        }
        let meta = Metadata {
            id: self.id.clone(),
            vm: self.vm.clone(),
            created: clock::rfc3339(self.started),
            created_unix: self.started,
            parent: self.parent.as_ref().map(|p| p.meta.id.clone()),
            repository: self.repo.config.id.clone(),
            chunk_size: self.repo.chunk_size(),
            disks,
            config,
            attributes,
        };
        let manifest = Manifest { meta, maps };
        // Every chunk the manifest names must be durable before the manifest is.
        self.repo.sync_since(&self.root)?;
        // And still present: not if a gc took this backup's lease for stale.
        self.lease.check()?;
        write_atomic(&self.repo.manifest_path(&self.id), &self.repo.encode_manifest(&manifest)?)?;
        Ok(manifest.meta)
    }
}

fn process_block(store: &ChunkStore, compression: Compression, claims: &Claims, data: &[u8]) -> Result<Processed> {
    if chunk::is_all_zero(data) {
        return Ok(Processed::Done(ChunkId::ZERO, Outcome::Zero));
    }
    let id = store.id_of(data)?;
    if id.is_zero() {
        // 2^-128: the block map could not tell this block from a zero block.
        return Err(Error::Repository("a block hashes to the reserved all-zero id".into()));
    }
    if !claims.claim(id) {
        return Ok(Processed::Done(id, Outcome::Reused));
    }
    let encoded = (|| {
        if store.reuse(&id)? {
            return Ok(None);
        }
        store.encode(&id, data, compression).map(Some)
    })();
    match encoded {
        Ok(None) => Ok(Processed::Done(id, Outcome::Reused)),
        Ok(Some(encoded)) => Ok(Processed::Store(id, encoded)),
        Err(e) => {
            claims.release(&id);
            Err(e)
        }
    }
}

/// True if the chunk is present (and now marked as reused for gc); false if
/// it must be stored again.
fn reuse_existing(store: &ChunkStore, claims: &Claims, id: &ChunkId) -> Result<bool> {
    if claims.contains(id) {
        return Ok(true);
    }
    if store.reuse(id)? {
        claims.claim(*id);
        return Ok(true);
    }
    Ok(false)
}
