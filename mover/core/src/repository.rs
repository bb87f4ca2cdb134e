//! A repository on a directory: `config.json`, `chunks/`, `backups/`, `locks/`.
//! See docs/format.md for the specification.

use crate::chunk::Compression;
use crate::crypto::{self, IdHash, Sealer, Secret};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Identifies a repository's config file.
pub const FORMAT_NAME: &str = "vmbackup-repository";
/// Version of the on-disk format this code writes: keyed chunk ids, and
/// sealed chunks and manifests when encrypted (docs/format.md §9).
pub const FORMAT_VERSION: u32 = 2;
/// The first version (XXH3-128 chunk ids, never encrypted), still read and
/// written into.
pub const FORMAT_VERSION_XXH3: u32 = 1;
pub const MIN_CHUNK_SIZE: u64 = 256 * 1024;
pub const MAX_CHUNK_SIZE: u64 = 8 * 1024 * 1024;
pub const DEFAULT_CHUNK_SIZE: u64 = 1024 * 1024;
/// `config.json` is a few hundred bytes; anything larger is not one.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// The contents of `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u64,
    pub compression: String,
    pub created: String,
    /// Version 2: `blake3-keyed` (absent in version 1: XXH3-128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_hash: Option<String>,
    /// Version 2: `none` or the AEAD (`aes-256-gcm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// Version 2, unencrypted: the id key, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    /// Version 2, encrypted: the key check value, 32 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
    /// Version 2, encrypted: keyed BLAKE3 of the fields readers act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_mac: Option<String>,
}

impl Config {
    pub fn encrypted(&self) -> bool {
        self.encryption.as_deref().map(|e| e != "none").unwrap_or(false)
    }
    pub fn id_hash_name(&self) -> &str {
        self.id_hash.as_deref().unwrap_or(crypto::ID_HASH_XXH3)
    }
    pub fn encryption_name(&self) -> &str {
        self.encryption.as_deref().unwrap_or("none")
    }
    /// The fields the config MAC covers, in order (docs/format.md §2).
    fn mac_fields(&self) -> Vec<String> {
        vec![
            self.format.clone(),
            self.version.to_string(),
            self.id.clone(),
            self.chunk_size.to_string(),
            self.compression.clone(),
            self.id_hash_name().to_string(),
            self.encryption_name().to_string(),
            self.key_check.clone().unwrap_or_default(),
        ]
    }
    fn mac(&self, config_key: &Secret) -> String {
        let fields = self.mac_fields();
        crypto::config_mac(config_key, &fields.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    }
}

/// The keys an open repository holds. An encrypted repository opened
/// without its master key has none: only `verify` works on it then.
#[derive(Clone, Debug)]
pub struct Keys {
    pub encrypted: bool,
    pub ids: Option<IdHash>,
    pub sealer: Option<Sealer>,
}

/// An open repository.
#[derive(Clone, Debug)]
pub struct Repository {
    pub root: PathBuf,
    pub config: Config,
    pub compression: Compression,
    pub keys: std::sync::Arc<Keys>,
}

/// How `Repository::create` makes a repository.
pub enum NewKeys {
    /// Format version 2, unencrypted: a random id key in config.json.
    Unencrypted,
    /// Format version 2, encrypted under this master key.
    Encrypted(Secret),
    /// Format version 1 (XXH3-128 ids), for tests of old repositories.
    Legacy,
}

fn check_chunk_size(chunk_size: u64) -> Result<()> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return Err(Error::InvalidInput(format!(
            "chunk size {chunk_size} is not a power of two between 256 KiB and 8 MiB"
        )));
    }
    Ok(())
}

/// Writes `data` to `path` atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".tmp-{name}-{}-{:08x}", std::process::id(), crate::clock::random_u32()));
    let ctx = |what: &str| format!("{what} {}", path.display());
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::repo_io(ctx("creating"), e))?;
        f.write_all(data).map_err(|e| Error::repo_io(ctx("writing"), e))?;
        f.sync_all().map_err(|e| Error::repo_io(ctx("syncing"), e))?;
        fs::rename(&tmp, path).map_err(|e| Error::repo_io(ctx("renaming into place"), e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens a repository file that must be a regular file, without following
/// symlinks or blocking (a FIFO in its place would hang a plain open).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "a symbolic link, not a regular file")
                } else {
                    e
                }
            },
        )?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    Ok(f)
}

/// Reads a repository file that must be a regular file of at most `max`
/// bytes. Symlinks are not followed and opening never blocks, so a hostile
/// repository (a link to /dev/zero, a FIFO) cannot hang or exhaust memory.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let m = f.metadata()?;
    if m.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {max} it can hold", m.len()),
        ));
    }
    let mut out = Vec::with_capacity(m.len() as usize);
    Read::by_ref(&mut f).take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "grew while being read"));
    }
    Ok(out)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::repo_io(format!("opening {}", dir.display()), e))?;
    d.sync_all().map_err(|e| Error::repo_io(format!("syncing {}", dir.display()), e))
}

impl Repository {
    /// Creates an unencrypted repository (format version 2) in `root`,
    /// which must not exist or be empty.
    pub fn init(root: &Path, chunk_size: u64, compression: &str) -> Result<Repository> {
        Repository::create(root, chunk_size, compression, NewKeys::Unencrypted)
    }

    /// Creates a repository in `root`, which must not exist or be empty. An
    /// encrypted one's master key is registered for this process.
    pub fn create(root: &Path, chunk_size: u64, compression: &str, keys: NewKeys) -> Result<Repository> {
        check_chunk_size(chunk_size)?;
        let comp = Compression::parse(compression)?;
        if root.exists() {
            let mut entries = fs::read_dir(root)
                .map_err(|e| Error::Repository(format!("cannot use {} as a repository: {e}", root.display())))?;
            if entries.next().is_some() {
                return Err(Error::InvalidInput(format!(
                    "{} is not empty; a repository needs an empty or new directory",
                    root.display()
                )));
            }
        }
        let mut id = [0u8; 8];
        crypto::random_fill(&mut id)?;
        let now = crate::clock::now_unix();
        let mut config = Config {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            id: crypto::to_hex(&id),
            chunk_size,
            compression: comp.name(),
            created: crate::clock::rfc3339(now),
            id_hash: Some(crypto::ID_HASH_KEYED.into()),
            encryption: Some("none".into()),
            id_key: None,
            key_check: None,
            config_mac: None,
        };
        let mut master = None;
        match keys {
            NewKeys::Unencrypted => config.id_key = Some(crypto::to_hex(&Secret::random()?.0)),
            NewKeys::Encrypted(key) => {
                let d = crypto::derive(&key);
                config.encryption = Some(crypto::AEAD_NAME.into());
                config.key_check = Some(crypto::to_hex(&d.check));
                config.config_mac = Some(config.mac(&d.config));
                master = Some(key);
            }
            NewKeys::Legacy => {
                config.version = FORMAT_VERSION_XXH3;
                config.id_hash = None;
                config.encryption = None;
            }
        }
        let mk = |p: &Path| fs::create_dir_all(p).map_err(|e| Error::repo_io(format!("creating {}", p.display()), e));
        mk(root)?;
        for sub in ["backups", "locks"] {
            mk(&root.join(sub))?;
        }
        for i in 0..256 {
            mk(&root.join("chunks").join(format!("{i:02x}")))?;
        }
        let text = serde_json::to_vec_pretty(&config).expect("config serializes");
        // config.json is written last: a directory without it is not a repository,
        // so an interrupted init leaves nothing that looks usable.
        write_atomic(&root.join("config.json"), &text)?;
        sync_dir(root)?;
        if let Some(key) = master {
            crypto::register(root, &config.id, key);
        }
        Repository::open(root)
    }

    /// Opens an encrypted repository with its master key, checks the key
    /// (WrongKey) and the config's MAC, and registers the key for this
    /// process, so that every later `open` of the repository holds it.
    pub fn unlock(root: &Path, key: &[u8]) -> Result<Repository> {
        let key = Secret::from_slice(key)?;
        let repo = Repository::open(root)?;
        if !repo.config.encrypted() {
            return Err(Error::InvalidInput(format!(
                "repository {} is not encrypted: it takes no key",
                root.display()
            )));
        }
        let keys = Repository::keys_with(root, &repo.config, &key)?;
        crypto::register(root, &repo.config.id, key);
        Ok(Repository { keys: std::sync::Arc::new(keys), ..repo })
    }

    fn keys_with(root: &Path, config: &Config, master: &Secret) -> Result<Keys> {
        let d = crypto::derive(master);
        if config.key_check.as_deref() != Some(crypto::to_hex(&d.check).as_str()) {
            return Err(Error::WrongKey(format!("the key does not open repository {}", root.display())));
        }
        if config.config_mac.as_deref() != Some(config.mac(&d.config).as_str()) {
            return Err(Error::Repository(format!(
                "{} has been altered: its MAC does not match its fields",
                root.join("config.json").display()
            )));
        }
        Ok(Keys { encrypted: true, ids: Some(IdHash::Keyed(d.id)), sealer: Some(d.sealer) })
    }

    /// Opens an existing repository and checks its config. An encrypted
    /// repository gets the master key registered for it in this process, if
    /// any (`unlock`); without one, only `verify` can use it.
    pub fn open(root: &Path) -> Result<Repository> {
        let path = root.join("config.json");
        let text = read_bounded(&path, MAX_CONFIG_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("{} is not a vmbackup repository (no config.json)", root.display()))
            }
            std::io::ErrorKind::InvalidData => Error::Repository(format!("{} is corrupt: {e}", path.display())),
            _ => Error::repo_io(format!("reading {}", path.display()), e),
        })?;
        let config: Config = serde_json::from_slice(&text)
            .map_err(|e| Error::Repository(format!("{} is corrupt: {e}", path.display())))?;
        if config.format != FORMAT_NAME {
            return Err(Error::Repository(format!("{} is not a vmbackup repository config", path.display())));
        }
        if config.version != FORMAT_VERSION && config.version != FORMAT_VERSION_XXH3 {
            return Err(Error::Repository(format!(
                "repository format version {} is not supported (this build reads {FORMAT_VERSION_XXH3} and {FORMAT_VERSION})",
                config.version
            )));
        }
        check_chunk_size(config.chunk_size)
            .map_err(|e| Error::Repository(format!("{} is corrupt: {e}", path.display())))?;
        let compression = Compression::parse(&config.compression)
            .map_err(|e| Error::Repository(format!("{} is corrupt: {e}", path.display())))?;
        let corrupt = |why: &str| Error::Repository(format!("{} is corrupt: {why}", path.display()));
        let keys = if config.version == FORMAT_VERSION_XXH3 {
            if config.id_hash.is_some() || config.encryption.is_some() {
                return Err(corrupt("a version-1 repository has neither id_hash nor encryption"));
            }
            Keys { encrypted: false, ids: Some(IdHash::Xxh3), sealer: None }
        } else {
            if config.id_hash.as_deref() != Some(crypto::ID_HASH_KEYED) {
                return Err(corrupt(&format!("id_hash {:?} is not {}", config.id_hash, crypto::ID_HASH_KEYED)));
            }
            match config.encryption.as_deref() {
                Some("none") => {
                    let key = config
                        .id_key
                        .as_deref()
                        .and_then(crypto::from_hex)
                        .and_then(|k| Secret::from_slice(&k).ok())
                        .ok_or_else(|| corrupt("id_key is not 64 hex digits"))?;
                    Keys { encrypted: false, ids: Some(IdHash::Keyed(key)), sealer: None }
                }
                Some(crypto::AEAD_NAME) => match crypto::lookup(root, &config.id) {
                    Some(master) => Repository::keys_with(root, &config, &master)?,
                    None => Keys { encrypted: true, ids: None, sealer: None },
                },
                other => return Err(corrupt(&format!("unknown encryption {other:?}"))),
            }
        };
        // Real directories only: a symlink could lead readers and gc out of
        // the repository (docs/format.md §7, rule 6).
        let subs = ["chunks", "backups", "locks"].map(String::from).into_iter();
        for sub in subs.chain((0..256).map(|i| format!("chunks/{i:02x}"))) {
            match fs::symlink_metadata(root.join(&sub)) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::Repository(format!(
                        "repository {}: {sub}/ is a symbolic link, not a directory",
                        root.display()
                    )));
                }
                _ => {
                    return Err(Error::Repository(format!("repository {} lacks its {sub}/ directory", root.display())))
                }
            }
        }
        Ok(Repository { root: root.to_path_buf(), config, compression, keys: std::sync::Arc::new(keys) })
    }

    /// KeyRequired if the repository is encrypted and this process has no
    /// key for it.
    pub fn require_key(&self) -> Result<()> {
        if self.keys.encrypted && self.keys.sealer.is_none() {
            return Err(Error::KeyRequired(format!(
                "repository {} is encrypted: give its passphrase (VMBACKUP_PASSPHRASE or --passphrase-file)",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// The key of this repository's sealed records (ledger entries, the
    /// drills' record): None when unencrypted (they are plain JSON there),
    /// KeyRequired when encrypted and this process has no key for it.
    pub fn record_key(&self) -> Result<Option<crypto::RecordKey>> {
        self.require_key()?;
        Ok(self.keys.sealer.as_ref().map(|s| s.records()))
    }

    /// How this repository names chunks (KeyRequired without the key).
    pub fn id_hash(&self) -> Result<&IdHash> {
        self.require_key()?;
        Ok(self.keys.ids.as_ref().expect("an unlocked repository has an id hash"))
    }

    /// A manifest's bytes as this repository writes them: sealed when encrypted.
    pub fn encode_manifest(&self, m: &crate::manifest::Manifest) -> Result<Vec<u8>> {
        self.require_key()?;
        match &self.keys.sealer {
            Some(s) => m.encode_sealed(s),
            None => Ok(m.encode()),
        }
    }

    /// A backup's metadata only (cheap for unencrypted repositories; a
    /// sealed manifest is read and authenticated whole).
    pub fn load_metadata(&self, id: &str) -> Result<crate::manifest::Metadata> {
        if self.keys.encrypted {
            let path = self.manifest_path(id);
            let data = crate::manifest::Manifest::read(&path)?;
            return crate::manifest::Manifest::decode_for(&path, &data, true, self.keys.sealer.as_ref())
                .map(|m| m.meta);
        }
        crate::manifest::Manifest::load_metadata(&self.manifest_path(id))
    }

    pub fn chunk_size(&self) -> u64 {
        self.config.chunk_size
    }
    pub fn backups_dir(&self) -> PathBuf {
        self.root.join("backups")
    }
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }
    pub fn manifest_path(&self, id: &str) -> PathBuf {
        self.backups_dir().join(format!("{id}.tib"))
    }

    /// Opens the repository's root directory, for `sync_since`.
    pub fn open_root(&self) -> Result<File> {
        File::open(&self.root).map_err(|e| Error::repo_io(format!("opening {}", self.root.display()), e))
    }

    /// Makes everything written to the repository's filesystem durable: one
    /// `syncfs` instead of an fsync per chunk file. `root` must have been
    /// opened (`open_root`) before the writes it vouches for: the kernel
    /// reports a writeback error through syncfs only to descriptors that were
    /// open when it happened.
    pub fn sync_since(&self, root: &File) -> Result<()> {
        // SAFETY: the descriptor is valid for the lifetime of `root`.
        let rc = unsafe { libc::syncfs(root.as_raw_fd()) };
        if rc != 0 {
            return Err(Error::repo_io("syncing the repository", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Loads and checks a backup's manifest (see `check_manifest`).
    pub fn load_manifest(&self, id: &str) -> Result<crate::manifest::Manifest> {
        let path = self.manifest_path(id);
        let data = crate::manifest::Manifest::read(&path)?;
        let m = crate::manifest::Manifest::decode_for(&path, &data, self.keys.encrypted, self.keys.sealer.as_ref())?;
        self.check_manifest(id, &m.meta)?;
        Ok(m)
    }

    /// A manifest belongs here only if its id is its file name (a copy under
    /// another name, or one that lies about its id, would let retention count
    /// one backup twice), its repository id is this repository's (a foreign
    /// manifest names chunks that are not ours), and it uses this repository's
    /// chunk size (its numbers must not size any allocation).
    pub fn check_manifest(&self, id: &str, meta: &crate::manifest::Metadata) -> Result<()> {
        let path = self.manifest_path(id);
        let corrupt = |why: String| Err(Error::Repository(format!("manifest {} is corrupt: {why}", path.display())));
        if meta.id != id {
            return corrupt(format!("it says it is backup {:?}, not {id}", meta.id));
        }
        if meta.repository != self.config.id {
            return corrupt(format!(
                "it belongs to repository {:?}, not this one ({})",
                meta.repository, self.config.id
            ));
        }
        if meta.chunk_size != self.chunk_size() {
            return corrupt(format!("chunk size {} where the repository uses {}", meta.chunk_size, self.chunk_size()));
        }
        Ok(())
    }

    /// Ids of every backup in the repository, sorted (ids sort by time).
    pub fn backup_ids(&self) -> Result<Vec<String>> {
        let dir = self.backups_dir();
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::repo_io(format!("listing {}", dir.display()), e))? {
            let entry = entry.map_err(|e| Error::repo_io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".tib") {
                if !name.starts_with('.') {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Checks that a backup id is well formed, so that it cannot name a path
/// outside `backups/`.
pub fn check_backup_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!("{id:?} is not a backup id")))
    }
}
