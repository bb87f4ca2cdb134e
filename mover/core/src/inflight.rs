//! Several blocks in flight, results in order: the worker pool of restore.
//!
//! Reading a chunk is a file read (a network round trip on NFS) and a
//! decompression; one at a time, a restore waits on each in turn. Proxmox
//! Backup Server keeps 16 chunk reads in flight for the same reason. Workers
//! here claim items in order and may run at most `window` items ahead of
//! the oldest one not yet handed on, so memory stays bounded (`window`
//! results) however slow one item is, and the consumer sees the results in
//! item order: a writer that must write sequentially (a VHDX, a stream)
//! can use the pool as well as one that writes at offsets.

use crate::error::Result;
use crossbeam_channel::{bounded, unbounded};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Chunk reads a restore keeps in flight (Proxmox Backup Server's figure).
pub const RESTORE_IN_FLIGHT: usize = 16;

/// Runs `work` on every item on up to `threads` worker threads, at most
/// `window` items ahead of the consumer, and hands each result to `sink` in
/// item order on the calling thread. Stops at the first error of `work` or
/// `sink` (items under way finish, none is started after it) and returns it.
pub fn ordered_map<T, R, W, S>(items: &[T], threads: usize, window: usize, work: W, mut sink: S) -> Result<()>
where
    T: Sync,
    R: Send,
    W: Fn(&T) -> Result<R> + Sync,
    S: FnMut(usize, R) -> Result<()>,
{
    if items.is_empty() {
        return Ok(());
    }
    let window = window.max(1);
    let threads = threads.clamp(1, window).min(items.len());
    // A permit per item that may be under way or waiting to be consumed.
    let (permit_tx, permit_rx) = bounded::<()>(window);
    for _ in 0..window {
        permit_tx.send(()).expect("the receiver is alive");
    }
    let (result_tx, result_rx) = unbounded::<(usize, Result<R>)>();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut outcome = Ok(());
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (result_tx, permit_rx) = (result_tx.clone(), permit_rx.clone());
            let (next, stop, work) = (&next, &stop, &work);
            s.spawn(move || {
                while permit_rx.recv().is_ok() && !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= items.len() || result_tx.send((k, work(&items[k]))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(result_tx);
        let mut waiting: BTreeMap<usize, Result<R>> = BTreeMap::new();
        let mut want = 0;
        while want < items.len() {
            let r = match waiting.remove(&want) {
                Some(r) => r,
                None => match result_rx.recv() {
                    Ok((k, r)) if k == want => r,
                    Ok((k, r)) => {
                        waiting.insert(k, r);
                        continue;
                    }
                    Err(_) => break, // every worker is gone: one panicked (scope re-raises it)
                },
            };
            if let Err(e) = r.and_then(|v| sink(want, v)) {
                outcome = Err(e);
                break;
            }
            want += 1;
            let _ = permit_tx.send(());
        }
        stop.store(true, Ordering::SeqCst);
        // Workers waiting for a permit see the channel closed and leave.
        drop(permit_tx);
    });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn results_come_in_order_whatever_order_they_finish_in() {
        let items: Vec<u64> = (0..200).collect();
        let mut seen = Vec::new();
        ordered_map(
            &items,
            8,
            16,
            |&i| {
                // Later items often finish first.
                std::thread::sleep(Duration::from_micros((200 - i) % 7 * 50));
                Ok(i * 3)
            },
            |k, v| {
                seen.push((k, v));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, items.iter().map(|&i| (i as usize, i * 3)).collect::<Vec<_>>());
    }

    #[test]
    fn never_more_than_the_window_ahead_of_the_consumer() {
        let items: Vec<usize> = (0..300).collect();
        let started = Mutex::new(0usize);
        let max_ahead = Mutex::new(0usize);
        let consumed = AtomicUsize::new(0);
        ordered_map(
            &items,
            6,
            10,
            |&i| {
                *started.lock().unwrap() += 1;
                let ahead = i + 1 - consumed.load(Ordering::SeqCst);
                let mut m = max_ahead.lock().unwrap();
                *m = (*m).max(ahead);
                Ok(i)
            },
            |_, _| {
                consumed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(*started.lock().unwrap(), 300);
        assert!(*max_ahead.lock().unwrap() <= 10, "{}", max_ahead.lock().unwrap());
    }

    #[test]
    fn the_first_error_stops_the_pool() {
        let items: Vec<usize> = (0..10_000).collect();
        let done = AtomicUsize::new(0);
        let r = ordered_map(
            &items,
            4,
            8,
            |&i| {
                done.fetch_add(1, Ordering::SeqCst);
                if i == 50 {
                    Err(Error::InvalidInput("item 50".into()))
                } else {
                    Ok(i)
                }
            },
            |_, _| Ok(()),
        );
        assert!(matches!(r, Err(Error::InvalidInput(m)) if m == "item 50"));
        assert!(done.load(Ordering::SeqCst) <= 50 + 8 + 1);
        // An error of the consumer stops it as well.
        let r = ordered_map(&items, 4, 8, |&i| Ok(i), |k, _| if k == 7 { Err(Error::Cancelled) } else { Ok(()) });
        assert!(matches!(r, Err(Error::Cancelled)));
    }
}
