//! Garbage collection: mark and sweep with a time cutoff.
//!
//! Mark: read every manifest (gc stops, removing nothing, if one cannot be
//! read: it cannot know what that backup needs). Sweep: remove each chunk
//! that no manifest names and whose mtime is older than the cutoff
//! `min(gc start, start of the oldest running backup - clock skew) - grace`.
//!
//! Why that is safe while backups run: a backup holds a lease from before it
//! looks at any chunk; it touches (sets the mtime of) every chunk it reuses
//! and writes new ones, so every chunk it will name has an mtime at or after
//! its start, which is at or after the cutoff. A chunk is removed by renaming
//! it to a trash name, checking its mtime again, and unlinking: a backup that
//! tries after the rename finds it absent and writes it again. A lease's
//! start time is read from its holder's clock, perhaps on another host, so
//! it counts `lease::CLOCK_SKEW_SECONDS` earlier; the grace period covers
//! the skew between gc's own clock and the file server's (chunk mtimes); a
//! fixed slack of two seconds covers coarse file timestamps. Which leases
//! are live (lock or heartbeat) is told in lease.rs.

use crate::chunk::ChunkId;
use crate::chunk_store::QUARANTINE_SUFFIX;
use crate::clock::now_unix;
use crate::error::{Error, Result};
use crate::lease::{active_leases, CLOCK_SKEW_SECONDS};
use crate::progress::{Cancel, Progress, Ticker};
use crate::repository::Repository;
use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// File timestamps come from the kernel's coarse clock (a few milliseconds
/// behind the clock a process reads) or are whole seconds on some
/// filesystems: a chunk touched just after a backup started can carry an
/// mtime slightly before that start. The cutoff always allows this much more.
pub const TIMESTAMP_SLACK_SECONDS: f64 = 2.0;

#[derive(Clone, Debug, Default)]
pub struct GcStats {
    pub dry_run: bool,
    pub backups: u64,
    pub active_backups: u64,
    pub stale_leases_removed: u64,
    pub referenced_chunks: u64,
    pub chunks_scanned: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Unreferenced chunks kept because they are newer than the cutoff.
    pub chunks_in_grace: u64,
    pub temp_files_removed: u64,
    pub cutoff_unix: f64,
}

fn mtime(meta: &fs::Metadata) -> f64 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn gc(
    repo: &Repository,
    grace_seconds: f64,
    dry_run: bool,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<GcStats> {
    // Only authenticated manifests say what is in use.
    repo.require_key()?;
    let start = now_unix();
    let (leases, stale) = active_leases(repo, dry_run)?;
    // A lease's start comes from its holder's clock, perhaps another host's;
    // chunk mtimes from the file server's: allow for their skew.
    let oldest = leases.iter().map(|l| l.started_unix - CLOCK_SKEW_SECONDS).fold(start, f64::min);
    let cutoff = oldest - grace_seconds.max(0.0) - TIMESTAMP_SLACK_SECONDS;
    let mut stats = GcStats {
        dry_run,
        active_backups: leases.len() as u64,
        stale_leases_removed: if dry_run { 0 } else { stale },
        cutoff_unix: cutoff,
        ..Default::default()
    };

    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for id in repo.backup_ids()? {
        cancel.check()?;
        let m = repo.load_manifest(&id).map_err(|e| {
            Error::Repository(format!("gc stopped before removing anything: {e}; repair or forget backup {id} first"))
        })?;
        stats.backups += 1;
        for map in &m.maps {
            referenced.extend(map.stored().map(|(_, c)| c));
        }
    }
    stats.referenced_chunks = referenced.len() as u64;

    let mut ticker = Ticker::new(progress, cancel, 256);
    let root = repo.root.join("chunks");
    for prefix in 0..256 {
        let dir = root.join(format!("{prefix:02x}"));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::repo_io(format!("listing {}", dir.display()), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::repo_io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => continue,
            };
            if let Some(rest) = name.strip_prefix(".gc-") {
                // Left by a gc that died between its rename and its re-check:
                // the chunk may still be needed, so it goes back.
                if let Some((orig, pid)) = rest.rsplit_once('-') {
                    let alive = pid.parse::<i32>().map(process_alive).unwrap_or(false);
                    if !alive && !dry_run {
                        let back = dir.join(orig);
                        if back.exists() {
                            let _ = fs::remove_file(&path);
                        } else {
                            let _ = fs::rename(&path, &back);
                        }
                    }
                }
                continue;
            }
            if name.starts_with(".tmp-") {
                if mtime(&meta) < cutoff {
                    if !dry_run {
                        let _ = fs::remove_file(&path);
                    }
                    stats.temp_files_removed += 1;
                }
                continue;
            }
            let (hex, quarantined) = match name.strip_suffix(QUARANTINE_SUFFIX) {
                Some(h) => (h, true),
                None => (name.as_str(), false),
            };
            let id = match ChunkId::from_hex(hex) {
                Some(id) => id,
                None => continue,
            };
            if !quarantined {
                stats.chunks_scanned += 1;
            }
            if referenced.contains(&id) {
                continue;
            }
            if mtime(&meta) >= cutoff {
                stats.chunks_in_grace += 1;
                continue;
            }
            if dry_run || remove_if_still_old(&dir, &path, &name, cutoff)? {
                stats.chunks_removed += 1;
                stats.bytes_removed += meta.len();
            }
        }
        ticker.advance(1)?;
    }
    // Temporary manifests and leases of writers that died before renaming them.
    for dir in [repo.backups_dir(), repo.locks_dir()] {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => return Err(Error::repo_io(format!("listing {}", dir.display()), e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let temporary = name.starts_with(".tmp-") || (name.starts_with('.') && name.ends_with(".lease.tmp"));
            if !temporary {
                continue;
            }
            if let Ok(meta) = fs::symlink_metadata(entry.path()) {
                if mtime(&meta) < cutoff {
                    if !dry_run {
                        let _ = fs::remove_file(entry.path());
                    }
                    stats.temp_files_removed += 1;
                }
            }
        }
    }
    ticker.finish()?;
    Ok(stats)
}

/// Whether a process with this id runs on this host.
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process; no memory is involved.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Rename, re-check, unlink (see the module comment). True if removed.
fn remove_if_still_old(dir: &Path, path: &Path, name: &str, cutoff: f64) -> Result<bool> {
    let trash = dir.join(format!(".gc-{name}-{}", std::process::id()));
    match fs::rename(path, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::repo_io(format!("removing {}", path.display()), e)),
    }
    let meta = fs::metadata(&trash).map_err(|e| Error::repo_io(format!("removing {}", path.display()), e))?;
    if mtime(&meta) >= cutoff {
        // A backup reused it between our look and the rename: put it back.
        fs::rename(&trash, path).map_err(|e| Error::repo_io(format!("restoring {}", path.display()), e))?;
        return Ok(false);
    }
    fs::remove_file(&trash).map_err(|e| Error::repo_io(format!("removing {}", path.display()), e))?;
    Ok(true)
}
