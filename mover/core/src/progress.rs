//! Progress reporting and cancellation shared by every long operation.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cancellation flag that another thread can raise; optionally linked to
/// a second flag (`or`) that cancels it too.
#[derive(Clone, Debug, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    linked: Option<Arc<AtomicBool>>,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }
    /// A token that is cancelled when `self` or `other` is; cancelling it
    /// cancels `self` (a backup session links each disk's token to its own,
    /// so that aborting the session stops the disks under way).
    pub fn or(&self, other: &Cancel) -> Cancel {
        Cancel { flag: self.flag.clone(), linked: Some(other.flag.clone()) }
    }
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.linked.as_ref().is_some_and(|l| l.load(Ordering::Relaxed))
    }
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Receives (done, total) in bytes. Returning an error aborts the operation.
pub trait Progress {
    fn report(&mut self, done: u64, total: u64) -> Result<()>;
}

/// Discards progress.
pub struct NoProgress;
impl Progress for NoProgress {
    fn report(&mut self, _done: u64, _total: u64) -> Result<()> {
        Ok(())
    }
}

/// Calls a `Progress` at most once per interval and checks cancellation.
pub struct Ticker<'a> {
    sink: &'a mut dyn Progress,
    cancel: &'a Cancel,
    interval: Duration,
    last: Instant,
    pub total: u64,
    pub done: u64,
}

impl<'a> Ticker<'a> {
    pub fn new(sink: &'a mut dyn Progress, cancel: &'a Cancel, total: u64) -> Ticker<'a> {
        let interval = Duration::from_millis(1000);
        // The first advance reports at once (so a caller sees the operation
        // under way, e.g. to cancel it mid-way), later ones once per interval.
        let last = Instant::now().checked_sub(interval).unwrap_or_else(Instant::now);
        Ticker { sink, cancel, interval, last, total, done: 0 }
    }

    /// Adds `n` bytes of progress; reports if the interval has passed.
    pub fn advance(&mut self, n: u64) -> Result<()> {
        self.done += n;
        self.cancel.check()?;
        if self.last.elapsed() >= self.interval {
            self.last = Instant::now();
            self.sink.report(self.done, self.total)?;
        }
        Ok(())
    }

    /// Reports the final state once.
    pub fn finish(&mut self) -> Result<()> {
        self.sink.report(self.done, self.total)
    }
}

/// Number of worker threads for the data path.
pub fn worker_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 16)
}
