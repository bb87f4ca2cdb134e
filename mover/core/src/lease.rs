//! Leases: a running backup holds `locks/<id>.lease`. Garbage collection
//! keeps every chunk touched since the oldest live lease's start (see gc.rs)
//! and removes stale leases.
//!
//! Whether a lease is live is told two ways, because the repository may be
//! shared over NFS or SMB by agents on several hosts, where an `flock` taken
//! on one host may not be seen on another:
//! - the holder keeps an exclusive `flock` on the file (seen on one host, and
//!   across hosts where the filesystem forwards locks);
//! - a heartbeat: a thread of the holder sets the file's mtime to now every
//!   `HEARTBEAT_SECONDS` (as restic refreshes its lock files). A lease whose
//!   mtime is younger than `STALE_AFTER_SECONDS` is live whether or not its
//!   lock can be taken.
//!
//! A lease is stale when its lock is free and either its heartbeat is older
//! than `STALE_AFTER_SECONDS` or it names this host and a process that no
//! longer runs here (a backup that crashed on this host is not waited for).

use crate::error::{Error, Result};
use crate::repository::Repository;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// How often a holder refreshes its lease's mtime.
pub const HEARTBEAT_SECONDS: u64 = 60;
/// A lease whose lock is free and whose mtime is older than this is stale.
/// Fifteen heartbeats: a holder stalled for minutes (a suspended VM, an NFS
/// server failing over) is not taken for dead.
pub const STALE_AFTER_SECONDS: f64 = 900.0;
/// How far the clocks of hosts sharing a repository may disagree. A lease's
/// start time comes from its holder's clock, chunk mtimes from the file
/// server's: gc moves its cutoff this much earlier for every live lease.
pub const CLOCK_SKEW_SECONDS: f64 = 300.0;

#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: String,
    pub pid: u32,
    pub started_unix: f64,
    /// The holder's host name (absent in leases of older versions).
    #[serde(default)]
    pub host: String,
}

/// The heartbeat thread's shared state.
#[derive(Default)]
struct Beat {
    /// Heartbeats done, for `wait_for_beats`.
    count: Mutex<u64>,
    done: Condvar,
    /// The lease file was gone at a heartbeat: gc took it for stale.
    lost: AtomicBool,
}

pub struct Lease {
    path: PathBuf,
    _file: File,
    beat: Arc<Beat>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn flock(file: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: valid descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// This host's name, as leases record it.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length given.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Sets the lease's mtime to now; false if the file is gone.
fn refresh(path: &Path) -> Result<bool> {
    crate::chunk_store::touch(path)
}

impl Lease {
    /// Takes a lease for backup `id` and starts its heartbeat.
    pub fn acquire(repo: &Repository, id: &str, started_unix: f64) -> Result<Lease> {
        Self::acquire_with_heartbeat(repo, id, started_unix, Duration::from_secs(HEARTBEAT_SECONDS))
    }

    /// `acquire` with another heartbeat interval (tests).
    pub fn acquire_with_heartbeat(repo: &Repository, id: &str, started_unix: f64, every: Duration) -> Result<Lease> {
        let path = repo.locks_dir().join(format!("{id}.lease"));
        let tmp = repo.locks_dir().join(format!(".{id}.lease.tmp"));
        let ctx = || format!("creating lease {}", path.display());
        // Locked and written under a temporary name, then renamed: gc never
        // sees an unlocked lease of a live backup on this host.
        let result = (|| {
            let mut file =
                OpenOptions::new().create_new(true).write(true).open(&tmp).map_err(|e| Error::repo_io(ctx(), e))?;
            flock(&file, libc::LOCK_EX).map_err(|e| Error::repo_io(ctx(), e))?;
            let info = LeaseInfo { id: id.into(), pid: std::process::id(), started_unix, host: host_name() };
            file.write_all(&serde_json::to_vec(&info).expect("lease serializes"))
                .map_err(|e| Error::repo_io(ctx(), e))?;
            file.sync_all().map_err(|e| Error::repo_io(ctx(), e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::repo_io(ctx(), e))?;
            crate::repository::sync_dir(&repo.locks_dir())?;
            Ok(file)
        })();
        let file = match result {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let beat = Arc::new(Beat::default());
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let (p, b) = (path.clone(), beat.clone());
        let thread = std::thread::Builder::new()
            .name("lease-heartbeat".into())
            .spawn(move || {
                // Wakes every `every` until the lease is dropped (the sender
                // goes away, or sends).
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    match refresh(&p) {
                        Ok(true) => {}
                        Ok(false) => b.lost.store(true, Ordering::SeqCst),
                        // A transient error (an NFS server failing over):
                        // the next heartbeat tries again.
                        Err(_) => {}
                    }
                    *b.count.lock().expect("heartbeat count") += 1;
                    b.done.notify_all();
                }
            })
            .map_err(|e| Error::repo_io(format!("starting the heartbeat of lease {}", path.display()), e))?;
        Ok(Lease { path, _file: file, beat, stop: Some(stop), thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks until the heartbeat has run `n` times in all.
    pub fn wait_for_beats(&self, n: u64) {
        let mut count = self.beat.count.lock().expect("heartbeat count");
        while *count < n {
            count = self.beat.done.wait(count).expect("heartbeat count");
        }
    }

    /// Refreshes the lease now and fails if it was lost: removed by a gc
    /// that took it for stale, which may then have removed chunks this
    /// backup reused. A backup calls it before it writes its manifest.
    pub fn check(&self) -> Result<()> {
        if self.beat.lost.load(Ordering::SeqCst) || !refresh(&self.path)? {
            return Err(Error::Repository(format!(
                "lease {} was removed while the backup ran (taken for stale by garbage collection), so chunks \
                 it relies on may be gone; the backup is not committed, run it again",
                self.path.display()
            )));
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Unlink while still holding the lock; the lock goes with the file.
        let _ = fs::remove_file(&self.path);
    }
}

fn mtime_unix(m: &fs::Metadata) -> f64 {
    m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The leases of running backups (see the module comment); removes stale
/// ones (unless `dry_run`) and counts them. A live lease whose contents
/// cannot be read has an unknown start, reported as 0 (keep everything).
pub fn active_leases(repo: &Repository, dry_run: bool) -> Result<(Vec<LeaseInfo>, u64)> {
    let dir = repo.locks_dir();
    let now = crate::clock::now_unix();
    let here = host_name();
    let mut active = Vec::new();
    let mut stale = 0;
    let entries = fs::read_dir(&dir).map_err(|e| Error::repo_io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::repo_io(format!("listing {}", dir.display()), e))?;
        let path = entry.path();
        if path.extension().map(|e| e != "lease").unwrap_or(true) {
            continue;
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // A symlink or something else that is not a lease: not ours to judge.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => continue,
            Err(e) => return Err(Error::repo_io(format!("opening {}", path.display()), e)),
        };
        let meta = match file.metadata() {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        let held = match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => true,
            Err(e) => return Err(Error::repo_io(format!("locking {}", path.display()), e)),
        };
        let text = crate::repository::read_bounded(&path, 64 * 1024).unwrap_or_default();
        let info = serde_json::from_slice::<LeaseInfo>(&text).ok();
        let live = held || {
            let dead_here = info
                .as_ref()
                .is_some_and(|i| !i.host.is_empty() && i.host == here && !crate::gc::process_alive(i.pid as i32));
            !dead_here && now - mtime_unix(&meta) <= STALE_AFTER_SECONDS
        };
        if !live {
            stale += 1;
            if !dry_run {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        active.push(info.unwrap_or(LeaseInfo { id: String::new(), pid: 0, started_unix: 0.0, host: String::new() }));
    }
    Ok((active, stale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backdate(path: &Path, seconds_ago: f64) {
        let t = std::time::SystemTime::now() - Duration::from_secs_f64(seconds_ago);
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(t).unwrap();
    }

    #[test]
    fn the_heartbeat_keeps_the_lease_fresh_and_check_sees_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("r"), 1 << 20, "none").unwrap();
        let lease = Lease::acquire_with_heartbeat(&repo, "b1", 1.0, Duration::from_millis(1)).unwrap();
        backdate(lease.path(), 3600.0);
        let age = |p: &Path| crate::clock::now_unix() - mtime_unix(&fs::metadata(p).unwrap());
        assert!(age(lease.path()) > 3000.0);
        // Two beats: the second surely began after the back-dating.
        lease.wait_for_beats(2);
        assert!(age(lease.path()) < 60.0, "the heartbeat did not refresh the lease");
        lease.check().unwrap();
        fs::remove_file(lease.path()).unwrap();
        assert!(lease.check().is_err());
        let n = *lease.beat.count.lock().unwrap();
        lease.wait_for_beats(n + 1);
        assert!(lease.beat.lost.load(Ordering::SeqCst));
        assert!(!lease.path().exists(), "a lost lease is not recreated behind gc's back");
    }
}
