//! Leases: a running backup holds `locks/<id>.lease` with an exclusive
//! `flock`. Garbage collection reads the start time of every lease that is
//! still locked and keeps every chunk touched since the oldest of them; a
//! lease whose lock can be taken belongs to a crashed process and is removed.

use crate::error::{Error, Result};
use crate::repository::Repository;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: String,
    pub pid: u32,
    pub started_unix: f64,
}

pub struct Lease {
    path: PathBuf,
    _file: File,
}

fn flock(file: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: valid descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Lease {
    pub fn acquire(repo: &Repository, id: &str, started_unix: f64) -> Result<Lease> {
        let path = repo.locks_dir().join(format!("{id}.lease"));
        let tmp = repo.locks_dir().join(format!(".{id}.lease.tmp"));
        let ctx = || format!("creating lease {}", path.display());
        // Locked and written under a temporary name, then renamed: gc never
        // sees an unlocked lease of a live backup.
        let result = (|| {
            let mut file =
                OpenOptions::new().create_new(true).write(true).open(&tmp).map_err(|e| Error::repo_io(ctx(), e))?;
            flock(&file, libc::LOCK_EX).map_err(|e| Error::repo_io(ctx(), e))?;
            let info = LeaseInfo { id: id.into(), pid: std::process::id(), started_unix };
            file.write_all(&serde_json::to_vec(&info).expect("lease serializes"))
                .map_err(|e| Error::repo_io(ctx(), e))?;
            file.sync_all().map_err(|e| Error::repo_io(ctx(), e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::repo_io(ctx(), e))?;
            crate::repository::sync_dir(&repo.locks_dir())?;
            Ok(file)
        })();
        match result {
            Ok(file) => Ok(Lease { path, _file: file }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Unlink while still holding the lock; the lock goes with the file.
        let _ = fs::remove_file(&self.path);
    }
}

/// Start times of the leases held by live processes; removes stale ones
/// (unless `dry_run`).
pub fn active_leases(repo: &Repository, dry_run: bool) -> Result<(Vec<LeaseInfo>, u64)> {
    let dir = repo.locks_dir();
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
        if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            continue;
        }
        match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => {
                // Nobody holds it: its backup died. Safe to drop.
                stale += 1;
                if !dry_run {
                    let _ = fs::remove_file(&path);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let text = crate::repository::read_bounded(&path, 64 * 1024).unwrap_or_default();
                match serde_json::from_slice::<LeaseInfo>(&text) {
                    Ok(info) => active.push(info),
                    // Held but unreadable: trust the file's own age, the
                    // lease was created when its backup started.
                    Err(_) => {
                        let mtime = file
                            .metadata()
                            .ok()
                            .and_then(|m| m.modified().ok())
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        active.push(LeaseInfo { id: String::new(), pid: 0, started_unix: mtime });
                    }
                }
            }
            Err(e) => return Err(Error::repo_io(format!("locking {}", path.display()), e)),
        }
    }
    Ok((active, stale))
}
