//! One error type for the whole mover. Every variant maps to exactly one Python
//! exception class in the binding crate; messages name the object, then the cause.

use std::io;

/// The mover's error. `Display` is the one line a user sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk source is missing, unreadable or not something we can read.
    #[error("{0}")]
    Source(String),
    /// Reading the disk source failed.
    #[error("{context}: {source}")]
    SourceIo { context: String, source: io::Error },
    /// The repository is missing, malformed or refuses the operation.
    #[error("{0}")]
    Repository(String),
    /// Reading or writing the repository failed (full disk, permissions, ...).
    #[error("{context}: {source}")]
    RepositoryIo { context: String, source: io::Error },
    /// A chunk's bytes do not match its id, or cannot be decoded.
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk { id: String, reason: String },
    /// Writing the restore target failed.
    #[error("{context}: {source}")]
    Target { context: String, source: io::Error },
    /// A backup, disk or other named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An argument is out of range or malformed.
    #[error("{0}")]
    InvalidInput(String),
    /// The caller cancelled the operation.
    #[error("operation cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn source_io(context: impl Into<String>, source: io::Error) -> Self {
        Error::SourceIo { context: context.into(), source }
    }
    pub fn repo_io(context: impl Into<String>, source: io::Error) -> Self {
        Error::RepositoryIo { context: context.into(), source }
    }
    pub fn target(context: impl Into<String>, source: io::Error) -> Self {
        Error::Target { context: context.into(), source }
    }
}
