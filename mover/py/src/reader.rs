//! `DiskReader`: a disk read at any offset from Python, either a source the
//! backup reads (a file, a VMDK/VHDX/VHD image, an NBD export) or a disk of a
//! backup point. The CBT audit compares the two block by block.

use crate::errors::to_py;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::Path;
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::repository::Repository;
use vmbackup_mover::source::{self, DiskSource};
use vmbackup_mover::Error;

/// The most bytes one `read` hands back: a bound on the memory of one call.
const MAX_READ: u64 = 64 << 20;

#[pyclass(module = "vmbackup._mover")]
pub struct DiskReader {
    inner: Box<dyn DiskSource>,
}

#[pymethods]
impl DiskReader {
    /// Opens a source as a backup would read it (formats told apart by content).
    #[staticmethod]
    #[pyo3(text_signature = "(spec)")]
    fn source(py: Python, spec: &str) -> PyResult<DiskReader> {
        let inner = py.allow_threads(|| source::open(spec)).map_err(to_py)?;
        source::check_size(inner.as_ref()).map_err(to_py)?;
        Ok(DiskReader { inner })
    }

    /// Opens disk `disk` (or the only disk) of backup `backup_id`.
    #[staticmethod]
    #[args(disk = "None")]
    #[pyo3(text_signature = "(repo, backup_id, disk=None)")]
    fn backup(py: Python, repo: &str, backup_id: &str, disk: Option<&str>) -> PyResult<DiskReader> {
        let r = py.allow_threads(|| -> Result<BackupReader, Error> {
            let repo = Repository::open(Path::new(repo))?;
            repo.require_key()?;
            BackupReader::open(&repo, backup_id, disk)
        });
        Ok(DiskReader { inner: Box::new(r.map_err(to_py)?) })
    }

    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    #[getter]
    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// `length` bytes at `offset` (within the disk, at most 64 MiB).
    #[pyo3(text_signature = "($self, offset, length)")]
    fn read<'py>(&self, py: Python<'py>, offset: u64, length: u64) -> PyResult<&'py PyBytes> {
        if length > MAX_READ {
            return Err(to_py(Error::InvalidInput(format!(
                "a read of {length} bytes is more than the {MAX_READ} one call reads"
            ))));
        }
        let mut buf = vec![0u8; length as usize];
        py.allow_threads(|| self.inner.read_at(&mut buf, offset)).map_err(to_py)?;
        Ok(PyBytes::new(py, &buf))
    }
}
