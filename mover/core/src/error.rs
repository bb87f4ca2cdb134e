//! One error type for the whole mover. Every variant maps to exactly one Python
//! exception class in the binding crate; messages name the object, then the cause.
//!
//! Each variant is either permanent (bad input, a corrupt image, an
//! unsupported format: the same call fails the same way again) or transient
//! (a connection reset or timed out, a busy resource: a retry may succeed);
//! [`Error::is_transient`] says which. I/O errors are sorted into a
//! transient or a permanent variant once, where they are wrapped
//! ([`Error::source_io`], [`Error::repo_io`]), by [`io_is_transient`].

use std::io;

/// The mover's error. `Display` is the one line a user sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk source is missing, unreadable or not something we can read.
    #[error("{0}")]
    Source(String),
    /// Reading the disk source failed for good (a truncated image, no such
    /// file, permission denied, a server that breaks the protocol).
    #[error("{context}: {source}")]
    SourceIo { context: String, source: io::Error },
    /// Reading the disk source failed in a way a retry may cure: the
    /// connection was reset, closed or timed out, the server answered EIO,
    /// the resource is busy.
    #[error("{context}: {source}")]
    SourceUnavailable { context: String, source: io::Error },
    /// The repository is missing, malformed or refuses the operation.
    #[error("{0}")]
    Repository(String),
    /// Reading or writing the repository failed (full disk, permissions, ...).
    #[error("{context}: {source}")]
    RepositoryIo { context: String, source: io::Error },
    /// Reading or writing the repository failed in a way a retry may cure
    /// (a timed-out or stale network file system, a busy resource).
    #[error("{context}: {source}")]
    RepositoryUnavailable { context: String, source: io::Error },
    /// The key given does not open this encrypted repository.
    #[error("{0}")]
    WrongKey(String),
    /// The repository is encrypted and no key was given for it.
    #[error("{0}")]
    KeyRequired(String),
    /// A chunk's bytes do not match its id, or cannot be decoded.
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk { id: String, reason: String },
    /// Writing the restore target failed.
    #[error("{context}: {source}")]
    Target { context: String, source: io::Error },
    /// A listening address or socket cannot be bound because something
    /// else holds it (it may be free later).
    #[error("{context}: {source}")]
    AddressInUse { context: String, source: io::Error },
    /// A backup, disk or other named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An argument is out of range or malformed.
    #[error("{0}")]
    InvalidInput(String),
    /// A bug in the mover (a thread panicked): not the input's fault, and
    /// not cured by retrying.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller cancelled the operation.
    #[error("operation cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Whether an I/O error is one a retry may cure: the peer reset, aborted or
/// timed out the connection, the network is (for now) unreachable, the
/// resource is busy, a network file system's handle went stale, or the
/// device reported an I/O error (EIO: a flaky path or a server that failed
/// one request). End of file is not among them: on a file it means a
/// truncated image; a network source reports a peer that hung up as
/// `ConnectionAborted` instead.
pub fn io_is_transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::NotConnected
            | K::BrokenPipe
            | K::TimedOut
            | K::Interrupted
            | K::WouldBlock
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::EIO
                | libc::EBUSY
                | libc::EAGAIN
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ENETRESET
                | libc::EHOSTUNREACH
                | libc::EHOSTDOWN
                | libc::ESTALE
                | libc::ESHUTDOWN
        )
    )
}

impl Error {
    /// A failed read of the source, transient or permanent by its cause.
    pub fn source_io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if io_is_transient(&source) {
            Error::SourceUnavailable { context, source }
        } else {
            Error::SourceIo { context, source }
        }
    }
    /// A failed read of the source that a retry may cure, whatever its kind
    /// (the caller knows more than the error kind says, e.g. an NBD server
    /// answered EIO).
    pub fn source_unavailable(context: impl Into<String>, source: io::Error) -> Self {
        Error::SourceUnavailable { context: context.into(), source }
    }
    /// A failed repository access, transient or permanent by its cause.
    pub fn repo_io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if io_is_transient(&source) {
            Error::RepositoryUnavailable { context, source }
        } else {
            Error::RepositoryIo { context, source }
        }
    }
    pub fn target(context: impl Into<String>, source: io::Error) -> Self {
        Error::Target { context: context.into(), source }
    }
    /// A failure to bind a listener: an address in use is transient, any
    /// other cause (no such address, permission denied) is bad input.
    pub fn listen(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if source.kind() == io::ErrorKind::AddrInUse {
            Error::AddressInUse { context, source }
        } else {
            Error::InvalidInput(format!("{context}: {source}"))
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::SourceUnavailable { .. } | Error::RepositoryUnavailable { .. } | Error::AddressInUse { .. } => true,
            Error::Source(_)
            | Error::SourceIo { .. }
            | Error::Repository(_)
            | Error::RepositoryIo { .. }
            | Error::CorruptChunk { .. }
            | Error::WrongKey(_)
            | Error::KeyRequired(_)
            | Error::Target { .. }
            | Error::NotFound(_)
            | Error::InvalidInput(_)
            | Error::Internal(_)
            | Error::Cancelled => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_sort_into_transient_and_permanent() {
        use io::ErrorKind as K;
        let transient = [
            io::Error::from(K::ConnectionReset),
            io::Error::from(K::TimedOut),
            io::Error::from(K::BrokenPipe),
            io::Error::from(K::ConnectionAborted),
            io::Error::from_raw_os_error(libc::EIO),
            io::Error::from_raw_os_error(libc::EBUSY),
            io::Error::from_raw_os_error(libc::ESTALE),
        ];
        for e in transient {
            let s = format!("{e}");
            assert!(Error::source_io("x", e).is_transient(), "{s}");
        }
        let permanent = [
            io::Error::from(K::UnexpectedEof),
            io::Error::from(K::InvalidData),
            io::Error::from_raw_os_error(libc::ENOENT),
            io::Error::from_raw_os_error(libc::EACCES),
            io::Error::from_raw_os_error(libc::ENOSPC),
        ];
        for e in permanent {
            let s = format!("{e}");
            assert!(!Error::repo_io("x", e).is_transient(), "{s}");
        }
        assert!(Error::listen("l", io::Error::from(K::AddrInUse)).is_transient());
        assert!(matches!(Error::listen("l", io::Error::from(K::AddrNotAvailable)), Error::InvalidInput(_)));
    }
}
