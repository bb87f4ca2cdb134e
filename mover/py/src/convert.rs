//! Progress callbacks and cancellation tokens across the language boundary.

use pyo3::prelude::*;
use vmbackup_mover::progress::{Cancel, Progress};
use vmbackup_mover::Error;

/// A token that cancels a running operation from any thread.
#[pyclass(module = "vmbackup._mover", text_signature = "()")]
#[derive(Clone, Default)]
pub struct CancelToken {
    pub inner: Cancel,
}

#[pymethods]
impl CancelToken {
    #[new]
    fn new() -> Self {
        CancelToken::default()
    }
    /// Asks the operation to stop; it raises `CancelledError` soon after.
    #[pyo3(text_signature = "($self)")]
    fn cancel(&self) {
        self.inner.cancel()
    }
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

pub fn cancel_of(token: Option<CancelToken>) -> Cancel {
    token.map(|t| t.inner).unwrap_or_default()
}

/// Calls a Python `callback(done, total)` (about once a second), and turns a
/// pending signal (Ctrl-C) or an exception from the callback into an abort.
pub struct PyProgress {
    callback: Option<PyObject>,
    /// The Python exception that stopped the operation, re-raised at the end.
    pub pending: Option<PyErr>,
}

impl PyProgress {
    pub fn new(callback: Option<PyObject>) -> Self {
        PyProgress { callback, pending: None }
    }

    /// The error to raise: the callback's or signal's exception if there was one.
    pub fn finish<T>(self, r: Result<T, Error>) -> PyResult<T> {
        match (r, self.pending) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(pyerr)) => Err(pyerr),
            (Err(e), None) => Err(crate::errors::to_py(e)),
        }
    }
}

impl Progress for PyProgress {
    fn report(&mut self, done: u64, total: u64) -> Result<(), Error> {
        Python::with_gil(|py| {
            let r = py.check_signals().and_then(|_| match &self.callback {
                Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                None => Ok(()),
            });
            r.map_err(|e| {
                self.pending = Some(e);
                Error::Cancelled
            })
        })
    }
}
