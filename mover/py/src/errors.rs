//! One mapping from the mover's errors to vmbackup's Python exceptions
//! (defined in `vmbackup/errors.py`, so Python code can catch them). Each
//! variant has exactly one class; whether it is retryable and the exit code
//! belong to the class.

use pyo3::prelude::*;
use vmbackup_mover::Error;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Source(_) | Error::SourceIo { .. } => "SourceError",
        Error::SourceUnavailable { .. } => "SourceUnavailableError",
        Error::Repository(_) | Error::RepositoryIo { .. } => "RepositoryError",
        Error::RepositoryUnavailable { .. } => "RepositoryUnavailableError",
        Error::CorruptChunk { .. } => "CorruptChunkError",
        Error::WrongKey(_) => "WrongKeyError",
        Error::KeyRequired(_) => "KeyRequiredError",
        Error::Target { .. } => "TargetError",
        Error::AddressInUse { .. } => "AddressInUseError",
        Error::NotFound(_) => "NotFoundError",
        Error::InvalidInput(_) => "InvalidInputError",
        Error::Internal(_) => "InternalError",
        Error::Cancelled => "CancelledError",
    }
}

/// Converts a mover error into the matching `vmbackup.errors` exception.
pub fn to_py(e: Error) -> PyErr {
    Python::with_gil(|py| {
        let class = py.import("vmbackup.errors").and_then(|m| m.getattr(class_name(&e)));
        match class.and_then(|c| c.call1((e.to_string(),))) {
            Ok(exc) => PyErr::from_value(exc),
            Err(import_failure) => import_failure,
        }
    })
}
