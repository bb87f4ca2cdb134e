//! Read-only result objects returned to Python (typed; never JSON text).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use vmbackup_mover::gc::GcStats;
use vmbackup_mover::manifest::{DiskMeta, Metadata};
use vmbackup_mover::repository::Config;
use vmbackup_mover::restore::RestoreStats;
use vmbackup_mover::verify::{Problem, VerifyReport};

#[pyclass(frozen, module = "vmbackup._mover")]
pub struct DiskResult {
    #[pyo3(get)]
    pub name: String,
    #[pyo3(get)]
    pub disk_size: u64,
    #[pyo3(get)]
    pub mode: String,
    #[pyo3(get)]
    pub source: String,
    #[pyo3(get)]
    pub source_format: String,
    #[pyo3(get)]
    pub change_id: Option<String>,
    #[pyo3(get)]
    pub blocks: u64,
    #[pyo3(get)]
    pub bytes_read: u64,
    #[pyo3(get)]
    pub bytes_stored: u64,
    #[pyo3(get)]
    pub bytes_skipped: u64,
    #[pyo3(get)]
    pub new_chunks: u64,
    #[pyo3(get)]
    pub reused_chunks: u64,
    #[pyo3(get)]
    pub zero_blocks: u64,
    #[pyo3(get)]
    pub parent_blocks: u64,
    #[pyo3(get)]
    pub seconds: f64,
}

impl From<DiskMeta> for DiskResult {
    fn from(d: DiskMeta) -> Self {
        DiskResult {
            name: d.name,
            disk_size: d.size,
            mode: d.mode,
            source: d.source,
            source_format: d.source_format,
            change_id: d.change_id,
            blocks: d.blocks,
            bytes_read: d.stats.bytes_read,
            bytes_stored: d.stats.bytes_stored,
            bytes_skipped: d.stats.bytes_skipped,
            new_chunks: d.stats.new_chunks,
            reused_chunks: d.stats.reused_chunks,
            zero_blocks: d.stats.zero_blocks,
            parent_blocks: d.stats.parent_blocks,
            seconds: d.stats.seconds,
        }
    }
}

#[pyclass(frozen, module = "vmbackup._mover")]
pub struct RestoreResult {
    #[pyo3(get)]
    pub backup: String,
    #[pyo3(get)]
    pub disk: String,
    #[pyo3(get)]
    pub disk_size: u64,
    #[pyo3(get)]
    pub bytes_written: u64,
    #[pyo3(get)]
    pub bytes_punched: u64,
    #[pyo3(get)]
    pub zero_blocks: u64,
    #[pyo3(get)]
    pub blocks_written: u64,
    #[pyo3(get)]
    pub blocks_compared: u64,
    #[pyo3(get)]
    pub blocks_skipped: u64,
    #[pyo3(get)]
    pub seconds: f64,
}

impl From<RestoreStats> for RestoreResult {
    fn from(s: RestoreStats) -> Self {
        RestoreResult {
            backup: s.backup,
            disk: s.disk,
            disk_size: s.disk_size,
            bytes_written: s.bytes_written,
            bytes_punched: s.bytes_punched,
            zero_blocks: s.zero_blocks,
            blocks_written: s.blocks_written,
            blocks_compared: s.blocks_compared,
            blocks_skipped: s.blocks_skipped,
            seconds: s.seconds,
        }
    }
}

#[pyclass(frozen, module = "vmbackup._mover")]
pub struct VerifyProblem {
    #[pyo3(get)]
    pub kind: String,
    #[pyo3(get)]
    pub object: String,
    #[pyo3(get)]
    pub message: String,
    /// (backup id, VM, disk) triples.
    #[pyo3(get)]
    pub affected: Vec<(String, String, String)>,
}

impl From<Problem> for VerifyProblem {
    fn from(p: Problem) -> Self {
        VerifyProblem {
            kind: p.kind,
            object: p.object,
            message: p.message,
            affected: p.affected.into_iter().map(|a| (a.backup, a.vm, a.disk)).collect(),
        }
    }
}

#[pyclass(frozen, module = "vmbackup._mover")]
pub struct VerifyResult {
    #[pyo3(get)]
    pub ok: bool,
    #[pyo3(get)]
    pub backups_checked: u64,
    #[pyo3(get)]
    pub chunks_checked: u64,
    #[pyo3(get)]
    pub bytes_checked: u64,
    #[pyo3(get)]
    pub problems: Vec<Py<VerifyProblem>>,
}

impl VerifyResult {
    pub fn new(py: Python, r: VerifyReport) -> PyResult<Self> {
        let problems =
            r.problems.iter().cloned().map(|p| Py::new(py, VerifyProblem::from(p))).collect::<PyResult<_>>()?;
        Ok(VerifyResult {
            ok: r.ok(),
            backups_checked: r.backups_checked,
            chunks_checked: r.chunks_checked,
            bytes_checked: r.bytes_checked,
            problems,
        })
    }
}

#[pyclass(frozen, module = "vmbackup._mover")]
pub struct GcResult {
    #[pyo3(get)]
    pub dry_run: bool,
    #[pyo3(get)]
    pub backups: u64,
    #[pyo3(get)]
    pub active_backups: u64,
    #[pyo3(get)]
    pub stale_leases_removed: u64,
    #[pyo3(get)]
    pub referenced_chunks: u64,
    #[pyo3(get)]
    pub chunks_scanned: u64,
    #[pyo3(get)]
    pub chunks_removed: u64,
    #[pyo3(get)]
    pub bytes_removed: u64,
    #[pyo3(get)]
    pub chunks_in_grace: u64,
    #[pyo3(get)]
    pub temp_files_removed: u64,
    #[pyo3(get)]
    pub cutoff_unix: f64,
}

impl From<GcStats> for GcResult {
    fn from(s: GcStats) -> Self {
        GcResult {
            dry_run: s.dry_run,
            backups: s.backups,
            active_backups: s.active_backups,
            stale_leases_removed: s.stale_leases_removed,
            referenced_chunks: s.referenced_chunks,
            chunks_scanned: s.chunks_scanned,
            chunks_removed: s.chunks_removed,
            bytes_removed: s.bytes_removed,
            chunks_in_grace: s.chunks_in_grace,
            temp_files_removed: s.temp_files_removed,
            cutoff_unix: s.cutoff_unix,
        }
    }
}

/// JSON from a manifest (a VM's configuration, attributes) as plain Python
/// objects: dict, list, str, int, float, bool, None.
fn json_to_py(py: Python, v: &serde_json::Value) -> PyObject {
    use serde_json::Value;
    match v {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_py(py),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_py(py),
            (None, Some(u)) => u.into_py(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_py(py),
        },
        Value::String(s) => s.into_py(py),
        Value::Array(a) => PyList::new(py, a.iter().map(|x| json_to_py(py, x))).into_py(py),
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)).expect("str keys");
            }
            d.into_py(py)
        }
    }
}

/// A repository's configuration (`config.json`).
#[pyclass(frozen, module = "vmbackup._mover")]
pub struct RepositoryConfig {
    #[pyo3(get)]
    pub format: String,
    #[pyo3(get)]
    pub version: u32,
    #[pyo3(get)]
    pub id: String,
    #[pyo3(get)]
    pub chunk_size: u64,
    #[pyo3(get)]
    pub compression: String,
    #[pyo3(get)]
    pub created: String,
    #[pyo3(get)]
    pub encrypted: bool,
    #[pyo3(get)]
    pub id_hash: String,
    #[pyo3(get)]
    pub encryption: String,
}

impl From<Config> for RepositoryConfig {
    fn from(c: Config) -> Self {
        RepositoryConfig {
            encrypted: c.encrypted(),
            id_hash: c.id_hash_name().to_string(),
            encryption: c.encryption_name().to_string(),
            format: c.format,
            version: c.version,
            id: c.id,
            chunk_size: c.chunk_size,
            compression: c.compression,
            created: c.created,
        }
    }
}

#[pymethods]
impl RepositoryConfig {
    /// The fields as a dict (the JSON shape of `config.json`).
    fn to_dict<'p>(&self, py: Python<'p>) -> PyResult<&'p PyDict> {
        let d = PyDict::new(py);
        d.set_item("format", &self.format)?;
        d.set_item("version", self.version)?;
        d.set_item("id", &self.id)?;
        d.set_item("chunk_size", self.chunk_size)?;
        d.set_item("compression", &self.compression)?;
        d.set_item("created", &self.created)?;
        d.set_item("encrypted", self.encrypted)?;
        d.set_item("id_hash", &self.id_hash)?;
        d.set_item("encryption", &self.encryption)?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "RepositoryConfig(id={:?}, chunk_size={}, compression={:?}, id_hash={:?}, encryption={:?})",
            self.id, self.chunk_size, self.compression, self.id_hash, self.encryption
        )
    }
}

/// A backup point's metadata: what `commit` wrote and `list_backups` reads.
#[pyclass(frozen, module = "vmbackup._mover")]
pub struct BackupInfo {
    #[pyo3(get)]
    pub id: String,
    #[pyo3(get)]
    pub vm: String,
    #[pyo3(get)]
    pub created: String,
    #[pyo3(get)]
    pub created_unix: f64,
    #[pyo3(get)]
    pub parent: Option<String>,
    #[pyo3(get)]
    pub repository: String,
    #[pyo3(get)]
    pub chunk_size: u64,
    #[pyo3(get)]
    pub disks: Vec<Py<DiskResult>>,
    config: serde_json::Value,
    attributes: serde_json::Value,
    size: u64,
    bytes_stored: u64,
}

impl BackupInfo {
    pub fn new(py: Python, m: Metadata) -> PyResult<Self> {
        let size = m.disks.iter().map(|d| d.size).sum();
        let bytes_stored = m.disks.iter().map(|d| d.stats.bytes_stored).sum();
        let disks = m.disks.into_iter().map(|d| Py::new(py, DiskResult::from(d))).collect::<PyResult<_>>()?;
        Ok(BackupInfo {
            id: m.id,
            vm: m.vm,
            created: m.created,
            created_unix: m.created_unix,
            parent: m.parent,
            repository: m.repository,
            chunk_size: m.chunk_size,
            disks,
            config: m.config,
            attributes: m.attributes,
            size,
            bytes_stored,
        })
    }
}

#[pymethods]
impl BackupInfo {
    /// The VM's configuration recorded at commit (a fresh copy each time).
    #[getter]
    fn config(&self, py: Python) -> PyObject {
        json_to_py(py, &self.config)
    }
    /// The attributes recorded at commit (a fresh copy each time).
    #[getter]
    fn attributes(&self, py: Python) -> PyObject {
        json_to_py(py, &self.attributes)
    }
    /// The sum of the disks' sizes.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }
    /// The sum of the bytes the disks' backups stored.
    #[getter]
    fn bytes_stored(&self) -> u64 {
        self.bytes_stored
    }
    fn __repr__(&self) -> String {
        format!("BackupInfo(id={:?}, vm={:?}, created={:?})", self.id, self.vm, self.created)
    }
}

/// A manifest that cannot be trusted: damaged, unreadable, or not what its file
/// name says. Never counted as a kept backup, never removed by retention.
#[pyclass(frozen, module = "vmbackup._mover")]
pub struct UntrustedManifest {
    /// The id its file name gives (`backups/<file_id>.tib`).
    #[pyo3(get)]
    pub file_id: String,
    #[pyo3(get)]
    pub problem: String,
    /// Its metadata, if the header and metadata could be read at all.
    #[pyo3(get)]
    pub info: Option<Py<BackupInfo>>,
}

impl UntrustedManifest {
    pub fn new(py: Python, u: vmbackup_mover::catalog::Untrusted) -> PyResult<Self> {
        let info = match u.meta {
            Some(m) => Some(Py::new(py, BackupInfo::new(py, m)?)?),
            None => None,
        };
        Ok(UntrustedManifest { file_id: u.file_id, problem: u.problem, info })
    }
}

#[pymethods]
impl UntrustedManifest {
    fn __repr__(&self) -> String {
        format!("UntrustedManifest(file_id={:?}, problem={:?})", self.file_id, self.problem)
    }
}
