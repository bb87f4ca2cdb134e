//! What chunk ids and sealing cost per byte on this machine, one thread, no
//! I/O: XXH3-128 (version-1 ids), keyed BLAKE3 (version-2 ids), and sealing
//! (AES-256-GCM under a per-chunk key) of already-encoded chunks.
//!
//! Usage: `id_speed [MIB]` (default 512). Prints one JSON object of GB/s.

use std::time::Instant;
use vmbackup_mover::chunk::ChunkId;
use vmbackup_mover::crypto::{derive, IdHash, Secret};

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let keyed = IdHash::Keyed(Secret([3u8; 32]));
    let sealer = derive(&Secret([4u8; 32])).sealer;
    let rate = |f: &dyn Fn(usize)| {
        let t = Instant::now();
        for i in 0..mib {
            f(i);
        }
        (mib << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let sink = std::sync::atomic::AtomicU8::new(0);
    let xxh3 = rate(&|_| {
        sink.fetch_xor(IdHash::Xxh3.id(&block).0[0], std::sync::atomic::Ordering::Relaxed);
    });
    let blake3 = rate(&|_| {
        sink.fetch_xor(keyed.id(&block).0[0], std::sync::atomic::Ordering::Relaxed);
    });
    let seal = rate(&|i| {
        let f = sealer.seal_chunk(&ChunkId([i as u8; 16]), &block).expect("sealing");
        sink.fetch_xor(f[30], std::sync::atomic::Ordering::Relaxed);
    });
    println!(
        "{{\"xxh3_128_gbps\": {xxh3:.2}, \"blake3_keyed_gbps\": {blake3:.2}, \"seal_aes256gcm_gbps\": {seal:.2}}}"
    );
}
