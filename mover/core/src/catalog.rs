//! Listing and forgetting backups.

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Metadata};
use crate::repository::{check_backup_id, sync_dir, Repository};

/// A manifest that cannot be trusted: unreadable, damaged, or not what its
/// file name says. Retention never counts it as a kept backup.
#[derive(Clone, Debug)]
pub struct Untrusted {
    /// The id its file name gives (`backups/<file_id>.tib`).
    pub file_id: String,
    /// Its metadata, if the header and metadata could be read at all.
    pub meta: Option<Metadata>,
    pub problem: String,
}

fn by_time(a: &Metadata, b: &Metadata) -> std::cmp::Ordering {
    a.created_unix.partial_cmp(&b.created_unix).unwrap_or(std::cmp::Ordering::Equal).then(a.id.cmp(&b.id))
}

/// Every trusted backup's metadata, oldest first (by `created_unix`, then
/// id), and every manifest that cannot be trusted. A manifest is trusted
/// only if it loads whole (checksum, block maps) and passes
/// `Repository::check_manifest`.
pub fn list_backups(repo: &Repository) -> Result<(Vec<Metadata>, Vec<Untrusted>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for id in repo.backup_ids()? {
        match repo.load_manifest(&id) {
            Ok(m) => good.push(m.meta),
            // Forgotten since the directory was listed.
            Err(Error::NotFound(_)) => {}
            // A failing disk or filesystem is not a verdict on the backup.
            Err(e @ Error::RepositoryIo { .. }) => return Err(e),
            // No key: no verdict on any backup.
            Err(e @ Error::KeyRequired(_)) => return Err(e),
            Err(e) => {
                // A sealed manifest that fails shows no metadata (none of it is trusted).
                let meta =
                    if repo.keys.encrypted { None } else { Manifest::load_metadata(&repo.manifest_path(&id)).ok() };
                bad.push(Untrusted { file_id: id, meta, problem: e.to_string() });
            }
        }
    }
    good.sort_by(by_time);
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
