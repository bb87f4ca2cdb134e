//! The functions and the backup session class exported to Python. Each one
//! releases the GIL while data moves.

use crate::convert::{cancel_of, CancelToken, PyProgress};
use crate::errors::to_py;
use crate::results::{
    BackupInfo, DiskResult, GcResult, RepositoryConfig, RestoreResult, UntrustedManifest, VerifyResult,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::Path;
use std::sync::{Arc, Mutex};
use vmbackup_mover::backup::{BackupSession as CoreSession, DiskRequest};
use vmbackup_mover::crypto::{RecordKey, Secret};
use vmbackup_mover::extents::Extent;
use vmbackup_mover::nbd::client::NbdOptions;
use vmbackup_mover::repository::{NewKeys, Repository};
use vmbackup_mover::{catalog, gc as core_gc, restore, source, verify as core_verify, Error};

/// Opens a repository with the key this process registered for it, if any.
fn open_any(repo: &str) -> PyResult<Repository> {
    Repository::open(Path::new(repo)).map_err(to_py)
}

/// Opens a repository that must be readable: an encrypted one needs its key
/// (KeyRequiredError otherwise).
fn open(repo: &str) -> PyResult<Repository> {
    let r = open_any(repo)?;
    r.require_key().map_err(to_py)?;
    Ok(r)
}

fn parse_json(what: &str, text: Option<&str>) -> PyResult<serde_json::Value> {
    match text {
        None => Ok(serde_json::Value::Null),
        Some(t) => {
            serde_json::from_str(t).map_err(|e| to_py(Error::InvalidInput(format!("{what} is not valid JSON: {e}"))))
        }
    }
}

#[pyfunction(chunk_size = "1048576", compression = "\"zstd:1\"", key = "None")]
#[pyo3(text_signature = "(path, chunk_size=1048576, compression='zstd:1', key=None)")]
pub fn init_repository(
    path: &str,
    chunk_size: u64,
    compression: &str,
    key: Option<&[u8]>,
) -> PyResult<RepositoryConfig> {
    let keys = match key {
        Some(k) => NewKeys::Encrypted(Secret::from_slice(k).map_err(to_py)?),
        None => NewKeys::Unencrypted,
    };
    let repo = Repository::create(Path::new(path), chunk_size, compression, keys).map_err(to_py)?;
    Ok(repo.config.into())
}

#[pyfunction(chunk_size = "1048576", compression = "\"zstd:1\"")]
#[pyo3(text_signature = "(path, chunk_size=1048576, compression='zstd:1')")]
pub fn init_legacy_repository(path: &str, chunk_size: u64, compression: &str) -> PyResult<RepositoryConfig> {
    let repo = Repository::create(Path::new(path), chunk_size, compression, NewKeys::Legacy).map_err(to_py)?;
    Ok(repo.config.into())
}

#[pyfunction]
#[pyo3(text_signature = "(path)")]
pub fn open_repository(path: &str) -> PyResult<RepositoryConfig> {
    Ok(open_any(path)?.config.into())
}

#[pyfunction]
#[pyo3(text_signature = "(path, key)")]
pub fn unlock_repository(py: Python, path: &str, key: &[u8]) -> PyResult<RepositoryConfig> {
    let key = key.to_vec();
    let repo = py.allow_threads(|| Repository::unlock(Path::new(path), &key)).map_err(to_py)?;
    Ok(repo.config.into())
}

#[pyfunction]
#[pyo3(text_signature = "(path, data)")]
pub fn repository_chunk_id(path: &str, data: &[u8]) -> PyResult<String> {
    let repo = open(path)?;
    Ok(repo.id_hash().map_err(to_py)?.id(data).to_hex())
}

/// The key of an encrypted repository's sealed records (`record_sealer`).
#[pyclass(module = "vmbackup._mover")]
pub struct RecordSealer {
    key: RecordKey,
}

#[pymethods]
impl RecordSealer {
    #[pyo3(text_signature = "($self, name, data)")]
    fn seal<'py>(&self, py: Python<'py>, name: &str, data: &[u8]) -> PyResult<&'py PyBytes> {
        Ok(PyBytes::new(py, &self.key.seal(name, data).map_err(to_py)?))
    }

    #[pyo3(text_signature = "($self, name, sealed)")]
    fn open<'py>(&self, py: Python<'py>, name: &str, sealed: &[u8]) -> Option<&'py PyBytes> {
        self.key.open(name, sealed).map(|plain| PyBytes::new(py, &plain))
    }

    fn __repr__(&self) -> &'static str {
        "RecordSealer(..)"
    }
}

#[pyfunction]
#[pyo3(text_signature = "(path)")]
pub fn record_sealer(path: &str) -> PyResult<Option<RecordSealer>> {
    let repo = open_any(path)?;
    Ok(repo.record_key().map_err(to_py)?.map(|key| RecordSealer { key }))
}

/// Every method takes `&self`, so that several Python threads can add disks
/// to one session at once (pyo3 refuses a second `&mut` borrow with "Already
/// borrowed"). Each `add_disk` holds a clone of the `Arc` while it runs:
/// `commit` takes the session only when it holds the last one.
#[pyclass(module = "vmbackup._mover", text_signature = "(repo, vm, parent=None)")]
pub struct BackupSession {
    inner: Mutex<Option<Arc<CoreSession>>>,
}

fn closed() -> PyErr {
    to_py(Error::InvalidInput("this backup session is already closed".into()))
}

impl BackupSession {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<CoreSession>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn session(&self) -> PyResult<Arc<CoreSession>> {
        self.slot().clone().ok_or_else(closed)
    }
}

#[pymethods]
impl BackupSession {
    #[new]
    #[args(parent = "None")]
    fn new(repo: &str, vm: &str, parent: Option<&str>) -> PyResult<Self> {
        let repo = open(repo)?;
        let session = CoreSession::begin(&repo, vm, parent).map_err(to_py)?;
        Ok(BackupSession { inner: Mutex::new(Some(Arc::new(session))) })
    }

    #[getter]
    fn id(&self) -> PyResult<String> {
        Ok(self.session()?.id().to_string())
    }

    #[pyo3(
        text_signature = "($self, source, name, changed_extents=None, change_id=None, progress=None, cancel=None, nbd_timeout=None, nbd_connections=None, allocated_extents=None)"
    )]
    #[args(
        changed_extents = "None",
        change_id = "None",
        progress = "None",
        cancel = "None",
        nbd_timeout = "None",
        nbd_connections = "None",
        allocated_extents = "None"
    )]
    #[allow(clippy::too_many_arguments)]
    fn add_disk(
        &self,
        py: Python,
        source: &str,
        name: &str,
        changed_extents: Option<Vec<(u64, u64)>>,
        change_id: Option<String>,
        progress: Option<PyObject>,
        cancel: Option<CancelToken>,
        nbd_timeout: Option<f64>,
        nbd_connections: Option<usize>,
        allocated_extents: Option<Vec<(u64, u64)>>,
    ) -> PyResult<DiskResult> {
        let nbd = NbdOptions::new(nbd_timeout, nbd_connections).map_err(to_py)?;
        let session = self.session()?;
        let extents = |v: Vec<(u64, u64)>| v.into_iter().map(|(s, l)| Extent::new(s, l)).collect();
        let req = DiskRequest {
            name: name.to_string(),
            changed: changed_extents.map(extents),
            change_id,
            allocated: allocated_extents.map(extents),
        };
        let cancel = cancel_of(cancel);
        let mut prog = PyProgress::new(progress);
        let src_spec = source.to_string();
        let r = py.allow_threads(|| {
            let src = source::open_with(&src_spec, &nbd)?;
            session.add_disk(src.as_ref(), &req, &mut prog, &cancel)
        });
        prog.finish(r).map(DiskResult::from)
    }

    /// Writes the manifest; returns its metadata.
    #[pyo3(text_signature = "($self, config=None, attributes=None)")]
    #[args(config = "None", attributes = "None")]
    fn commit(&self, py: Python, config: Option<&str>, attributes: Option<&str>) -> PyResult<BackupInfo> {
        let config = parse_json("config", config)?;
        let attributes = parse_json("attributes", attributes)?;
        let session = {
            let mut slot = self.slot();
            let arc = slot.take().ok_or_else(closed)?;
            // Clones are made only under this lock: holding the last one here,
            // no add_disk runs and none can start.
            match Arc::try_unwrap(arc) {
                Ok(s) => s,
                Err(arc) => {
                    let running = arc.running();
                    *slot = Some(arc);
                    let which = if running.is_empty() { "a disk".to_string() } else { running.join(", ") };
                    return Err(to_py(Error::InvalidInput(format!(
                        "{which} is still being added to this backup: commit after every add_disk has returned"
                    ))));
                }
            }
        };
        let meta = py.allow_threads(|| session.commit(config, attributes)).map_err(to_py)?;
        BackupInfo::new(py, meta)
    }

    /// Abandons the backup; its chunks stay for reuse or gc. An add_disk
    /// under way is cancelled (it raises CancelledError); the lease goes
    /// when the last of them has returned.
    #[pyo3(text_signature = "($self)")]
    fn abort(&self) {
        if let Some(arc) = self.slot().take() {
            arc.abort();
        }
    }
}

#[pyfunction(
    disk = "None",
    format = "\"raw\"",
    overwrite = "false",
    progress = "None",
    cancel = "None",
    existing = "false",
    blank = "false",
    extents = "None",
    compare = "false"
)]
#[pyo3(
    text_signature = "(repo, backup_id, output, disk=None, format='raw', overwrite=False, progress=None, cancel=None, existing=False, blank=False, extents=None, compare=False)"
)]
#[allow(clippy::too_many_arguments)]
pub fn restore_disk(
    py: Python,
    repo: &str,
    backup_id: &str,
    output: &str,
    disk: Option<&str>,
    format: &str,
    overwrite: bool,
    progress: Option<PyObject>,
    cancel: Option<CancelToken>,
    existing: bool,
    blank: bool,
    extents: Option<Vec<(u64, u64)>>,
    compare: bool,
) -> PyResult<RestoreResult> {
    let repo = open(repo)?;
    let cancel = cancel_of(cancel);
    let mut prog = PyProgress::new(progress);
    let opts = restore::RestoreOptions {
        format: format.to_string(),
        overwrite,
        existing,
        blank,
        extents: extents.map(|v| v.into_iter().map(|(s, l)| Extent::new(s, l)).collect()),
        compare,
        ..Default::default()
    };
    let r = py.allow_threads(|| restore::restore(&repo, backup_id, disk, Path::new(output), &opts, &mut prog, &cancel));
    prog.finish(r).map(RestoreResult::from)
}

/// What `list_backups` returns: trusted backups, untrusted manifests.
type Listing = (Vec<Py<BackupInfo>>, Vec<Py<UntrustedManifest>>);

/// Returns (the metadata of every trusted backup, oldest first; every
/// untrusted manifest with its problem and whatever metadata could be read).
#[pyfunction]
#[pyo3(text_signature = "(repo)")]
pub fn list_backups(py: Python, repo: &str) -> PyResult<Listing> {
    let repo = open(repo)?;
    let (good, bad) = py.allow_threads(|| catalog::list_backups(&repo)).map_err(to_py)?;
    let good = good.into_iter().map(|m| Py::new(py, BackupInfo::new(py, m)?)).collect::<PyResult<_>>()?;
    let bad = bad.into_iter().map(|u| Py::new(py, UntrustedManifest::new(py, u)?)).collect::<PyResult<_>>()?;
    Ok((good, bad))
}

#[pyfunction(ids = "None", read_data = "false", progress = "None", cancel = "None")]
#[pyo3(text_signature = "(repo, ids=None, read_data=False, progress=None, cancel=None)")]
pub fn verify(
    py: Python,
    repo: &str,
    ids: Option<Vec<String>>,
    read_data: bool,
    progress: Option<PyObject>,
    cancel: Option<CancelToken>,
) -> PyResult<VerifyResult> {
    // Without the key, verify checks what needs none (see _mover.pyi).
    let repo = open_any(repo)?;
    let cancel = cancel_of(cancel);
    let mut prog = PyProgress::new(progress);
    let ids = ids.unwrap_or_default();
    let r = py.allow_threads(|| core_verify::verify(&repo, &ids, read_data, &mut prog, &cancel));
    let report = prog.finish(r)?;
    VerifyResult::new(py, report)
}

#[pyfunction]
#[pyo3(text_signature = "(repo, backup_id)")]
pub fn forget(py: Python, repo: &str, backup_id: &str) -> PyResult<()> {
    let repo = open(repo)?;
    py.allow_threads(|| catalog::forget(&repo, backup_id)).map_err(to_py)
}

#[pyfunction(grace_seconds = "900.0", dry_run = "false", progress = "None", cancel = "None")]
#[pyo3(text_signature = "(repo, grace_seconds=900.0, dry_run=False, progress=None, cancel=None)")]
pub fn gc(
    py: Python,
    repo: &str,
    grace_seconds: f64,
    dry_run: bool,
    progress: Option<PyObject>,
    cancel: Option<CancelToken>,
) -> PyResult<GcResult> {
    let repo = open(repo)?;
    let cancel = cancel_of(cancel);
    let mut prog = PyProgress::new(progress);
    let r = py.allow_threads(|| core_gc::gc(&repo, grace_seconds, dry_run, &mut prog, &cancel));
    prog.finish(r).map(GcResult::from)
}

/// The XXH3-128 chunk id of `data`, as 32 hex digits (for tests and tools).
#[pyfunction]
#[pyo3(text_signature = "(data)")]
pub fn chunk_id(data: &[u8]) -> String {
    vmbackup_mover::chunk::ChunkId::of(data).to_hex()
}

/// Serves a backup's disk over NBD until cancelled or interrupted.
#[pyfunction(
    disk = "None",
    socket = "None",
    listen = "None",
    writable = "false",
    ready = "None",
    cancel = "None",
    overlay_dir = "None",
    handshake_timeout = "None"
)]
#[pyo3(
    text_signature = "(repo, backup_id, disk=None, socket=None, listen=None, writable=False, ready=None, cancel=None, overlay_dir=None, handshake_timeout=None)"
)]
#[allow(clippy::too_many_arguments)]
pub fn serve(
    py: Python,
    repo: &str,
    backup_id: &str,
    disk: Option<&str>,
    socket: Option<&str>,
    listen: Option<&str>,
    writable: bool,
    ready: Option<PyObject>,
    cancel: Option<CancelToken>,
    overlay_dir: Option<&str>,
    handshake_timeout: Option<f64>,
) -> PyResult<()> {
    use vmbackup_mover::backup_reader::BackupReader;
    use vmbackup_mover::nbd::server::{default_overlay_dir, Listen, NbdServer, ServeOptions};

    let where_ = match (socket, listen) {
        (Some(s), None) => Listen::Unix(s.into()),
        (None, Some(l)) => Listen::Tcp(l.into()),
        _ => return Err(to_py(Error::InvalidInput("give exactly one of socket or listen".into()))),
    };
    let repo = open(repo)?;
    let opts = ServeOptions {
        overlay_dir: if writable {
            Some(overlay_dir.map(Into::into).unwrap_or_else(default_overlay_dir))
        } else {
            None
        },
        name: String::new(),
        handshake_timeout: match handshake_timeout {
            None => vmbackup_mover::nbd::server::HANDSHAKE_TIMEOUT,
            Some(t) if t > 0.0 && t <= 3600.0 => std::time::Duration::from_secs_f64(t),
            Some(t) => {
                return Err(to_py(Error::InvalidInput(format!(
                    "the handshake timeout must be above 0 and at most 3600 seconds, not {t}"
                ))))
            }
        },
    };
    let server = py
        .allow_threads(|| -> Result<NbdServer, Error> {
            let reader = BackupReader::open(&repo, backup_id, disk)?;
            NbdServer::bind(Arc::new(reader), &where_, opts)
        })
        .map_err(to_py)?;
    let uri = server.uri();
    let cancel = cancel_of(cancel);
    let stop = cancel.clone();
    let handle = std::thread::spawn(move || server.serve(&stop));
    let mut pending: Option<PyErr> = None;
    if let Some(cb) = ready {
        if let Err(e) = cb.call1(py, (uri,)) {
            pending = Some(e);
        }
    }
    // Wake up a few times a second to let Python run signal handlers (Ctrl-C).
    while pending.is_none() {
        let finished = py.allow_threads(|| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            handle.is_finished()
        });
        if finished {
            break;
        }
        if let Err(e) = py.check_signals() {
            pending = Some(e);
        }
    }
    cancel.cancel();
    let r = py.allow_threads(|| handle.join());
    if let Some(e) = pending {
        return Err(e);
    }
    match r {
        Ok(r) => r.map_err(to_py),
        Err(_) => Err(to_py(Error::Internal("the NBD server thread panicked".into()))),
    }
}
