//! Read-only result objects returned to Python.

use pyo3::prelude::*;
use vmbackup_mover::gc::GcStats;
use vmbackup_mover::manifest::DiskMeta;
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
    pub zero_blocks: u64,
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
            zero_blocks: s.zero_blocks,
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
