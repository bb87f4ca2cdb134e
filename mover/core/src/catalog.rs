//! Listing and forgetting backups.

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Metadata};
use crate::repository::{check_backup_id, sync_dir, Repository};

/// Every backup's metadata, oldest first, and a message per unreadable manifest.
pub fn list_backups(repo: &Repository) -> Result<(Vec<Metadata>, Vec<String>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for id in repo.backup_ids()? {
        match Manifest::load_metadata(&repo.manifest_path(&id)) {
            Ok(m) => good.push(m),
            Err(e) => bad.push(e.to_string()),
        }
    }
    good.sort_by(|a, b| {
        a.created_unix.partial_cmp(&b.created_unix).unwrap_or(std::cmp::Ordering::Equal).then(a.id.cmp(&b.id))
    });
    Ok((good, bad))
}

/// Removes a backup's manifest. Its chunks stay until gc.
pub fn forget(repo: &Repository, id: &str) -> Result<()> {
    check_backup_id(id)?;
    let path = repo.manifest_path(id);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&repo.backups_dir()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::NotFound(format!("no backup {id} in the repository")))
        }
        Err(e) => Err(Error::repo_io(format!("removing {}", path.display()), e)),
    }
}
