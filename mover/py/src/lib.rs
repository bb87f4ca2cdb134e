//! `vmbackup._mover`: the Python face of the data mover. Only wiring here;
//! the contract with docstrings is `flows/vmbackup/_mover.pyi`.

mod api;
mod convert;
mod errors;
mod reader;
mod results;

use pyo3::prelude::*;

#[pymodule]
fn _mover(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_class::<convert::CancelToken>()?;
    m.add_class::<api::BackupSession>()?;
    m.add_class::<results::DiskResult>()?;
    m.add_class::<results::RestoreResult>()?;
    m.add_class::<results::VerifyProblem>()?;
    m.add_class::<results::VerifyResult>()?;
    m.add_class::<results::GcResult>()?;
    m.add_class::<results::RepositoryConfig>()?;
    m.add_class::<results::BackupInfo>()?;
    m.add_class::<results::UntrustedManifest>()?;
    m.add_class::<reader::DiskReader>()?;
    m.add_class::<api::RecordSealer>()?;
    m.add_function(wrap_pyfunction!(api::init_repository, m)?)?;
    m.add_function(wrap_pyfunction!(api::init_legacy_repository, m)?)?;
    m.add_function(wrap_pyfunction!(api::open_repository, m)?)?;
    m.add_function(wrap_pyfunction!(api::unlock_repository, m)?)?;
    m.add_function(wrap_pyfunction!(api::repository_chunk_id, m)?)?;
    m.add_function(wrap_pyfunction!(api::record_sealer, m)?)?;
    m.add_function(wrap_pyfunction!(api::restore_disk, m)?)?;
    m.add_function(wrap_pyfunction!(api::list_backups, m)?)?;
    m.add_function(wrap_pyfunction!(api::verify, m)?)?;
    m.add_function(wrap_pyfunction!(api::forget, m)?)?;
    m.add_function(wrap_pyfunction!(api::gc, m)?)?;
    m.add_function(wrap_pyfunction!(api::chunk_id, m)?)?;
    m.add_function(wrap_pyfunction!(api::serve, m)?)?;
    Ok(())
}
