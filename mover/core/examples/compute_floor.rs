//! The compute floor of a backup, for the benchmark: what the mover's own
//! hashing and compression of a disk's blocks cost on this machine with no
//! I/O at all, on as many threads as a backup uses.
//!
//! Usage: `compute_floor IMAGE [CHUNK_SIZE] [COMPRESSION]` (defaults 1048576
//! and zstd:1, the repository defaults). Reads the allocated blocks into
//! memory first (not timed), then times the workers doing what a backup's
//! workers do between read and write: zero test, the chunk id (keyed BLAKE3,
//! as in a new unencrypted repository), deduplication
//! within the disk, and encoding (zstd) of each new chunk. Prints one JSON
//! object: `seconds` (wall, the floor), `cpu_seconds` (summed over the
//! threads), `threads`, `chunks` (new chunks) and `bytes_stored` (their
//! encoded size, headers included: what a backup into an empty repository
//! stores).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmbackup_mover::chunk::{self, ChunkId, Compression};
use vmbackup_mover::crypto::{IdHash, Secret};
use vmbackup_mover::extents::{block_len, blocks_touched, normalize};
use vmbackup_mover::progress::worker_threads;

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 || args.len() > 4 {
        eprintln!("usage: compute_floor IMAGE [CHUNK_SIZE] [COMPRESSION]");
        std::process::exit(2);
    }
    let bs: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1 << 20);
    let compression = Compression::parse(args.get(3).map(String::as_str).unwrap_or("zstd:1"))?;
    let source = vmbackup_mover::source::open(&args[1])?;
    let size = source.size();
    let alloc = blocks_touched(&normalize(&source.allocated()?, size)?, size, bs);
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for (i, touched) in alloc.iter().enumerate() {
        if *touched {
            let mut buf = vec![0u8; block_len(i as u64, size, bs) as usize];
            source.read_at(&mut buf, i as u64 * bs)?;
            blocks.push(buf);
        }
    }

    let threads = worker_threads();
    let ids = IdHash::Keyed(Secret::random()?);
    let next = AtomicUsize::new(0);
    let seen: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());
    let totals = Mutex::new((0u64, 0u64, 0f64)); // chunks, bytes, cpu seconds
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let cpu0 = thread_cpu_seconds();
                let (mut chunks, mut bytes) = (0u64, 0u64);
                while let Some(data) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if chunk::is_all_zero(data) {
                        continue;
                    }
                    let id = ids.id(data);
                    if !seen.lock().expect("seen").insert(id) {
                        continue;
                    }
                    let encoded = chunk::encode(data, compression).expect("encoding");
                    chunks += 1;
                    bytes += encoded.len() as u64;
                }
                let mut t = totals.lock().expect("totals");
                t.0 += chunks;
                t.1 += bytes;
                t.2 += thread_cpu_seconds() - cpu0;
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    let (chunks, bytes, cpu) = *totals.lock().expect("totals");
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "cpu_seconds": cpu,
            "threads": threads,
            "chunks": chunks,
            "bytes_stored": bytes,
        })
    );
    Ok(())
}
