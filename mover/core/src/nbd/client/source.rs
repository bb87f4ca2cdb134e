//! `NbdSource`: an NBD export as a `DiskSource`. Opens the first
//! connection (upgrading to TLS when the server requires it and
//! certificates were given), adds more in the background when the server
//! allows several, spreads reads over them, and maps the export's
//! allocation from block status. Errors name the export and the extent.

use super::connect::open_conn;
use super::connection::Conn;
use super::handshake::{is_tls_required, Negotiated};
use super::options::NbdOptions;
use super::reply::MAX_EXTENTS;
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::nbd::proto::*;
use crate::nbd::tls::TlsSetup;
use crate::nbd::uri::NbdUri;
use crate::source::DiskSource;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Block status is asked for in pieces of at most this many bytes.
const STATUS_PIECE: u64 = 1 << 30;

/// An NBD export read as a disk, over one or more connections.
pub struct NbdSource {
    label: String,
    neg: Negotiated,
    /// Connections in use; more are added in the background when the
    /// server allows several (`CAN_MULTI_CONN`).
    conns: Arc<std::sync::RwLock<Vec<Arc<Conn>>>>,
    next: AtomicUsize,
    timeout: Duration,
    wanted: usize,
    /// Set when the connections use TLS.
    tls: Option<Arc<TlsSetup>>,
}

/// Extra connections get this long for their handshake: a server at its
/// client limit (qemu-nbd's default is one) leaves them waiting in its
/// backlog, and they are only a bonus.
const EXTRA_CONN_TIMEOUT: Duration = Duration::from_secs(2);

impl NbdSource {
    pub fn open(spec: &str) -> Result<NbdSource> {
        NbdSource::open_with(spec, &NbdOptions::default())
    }

    pub fn open_with(spec: &str, opts: &NbdOptions) -> Result<NbdSource> {
        let uri = NbdUri::parse(spec).map_err(|e| Error::Source(e.to_string()))?;
        let load_tls = || -> Result<Arc<TlsSetup>> {
            let dir = uri.tls_certificates.as_deref().ok_or_else(|| {
                Error::Source(format!(
                    "{spec}: TLS needs ?tls-certificates=DIR, a directory with {} (the CA that signed the server's certificate)",
                    crate::nbd::tls::CA_CERT
                ))
            })?;
            TlsSetup::load(dir, uri.tls_server_name()).map(Arc::new).map_err(|e| Error::Source(format!("{spec}: {e}")))
        };
        let mut tls = if uri.tls { Some(load_tls()?) } else { None };
        let label = format!("NBD export {spec}");
        let first = match open_conn(&uri, tls.as_deref(), &label, opts.timeout, opts.timeout) {
            Err(Error::SourceIo { source, .. } | Error::SourceUnavailable { source, .. })
                if tls.is_none() && is_tls_required(&source) =>
            {
                if uri.tls_certificates.is_none() {
                    return Err(Error::Source(format!(
                        "{label}: the server requires TLS; use nbds:// with ?tls-certificates=DIR (a directory with {})",
                        crate::nbd::tls::CA_CERT
                    )));
                }
                // Upgrade on a fresh connection: TLS from the first option
                // on, so nothing haggled in plaintext carries over.
                tls = Some(load_tls()?);
                open_conn(&uri, tls.as_deref(), &label, opts.timeout, opts.timeout)?
            }
            r => r?,
        };
        let neg = first.neg.clone();
        let conns = Arc::new(std::sync::RwLock::new(vec![first]));
        let wanted = if neg.flags & TF_CAN_MULTI_CONN != 0 { opts.max_connections.max(1) } else { 1 };
        if wanted > 1 {
            let weak = Arc::downgrade(&conns);
            let (label, size, reply_timeout) = (label.clone(), neg.size, opts.timeout);
            let timeout = reply_timeout.min(EXTRA_CONN_TIMEOUT);
            let tls = tls.clone();
            let _ = std::thread::Builder::new().name("nbd-connect".into()).spawn(move || {
                for _ in 1..wanted {
                    let c = match open_conn(&uri, tls.as_deref(), &label, timeout, reply_timeout) {
                        Ok(c) if c.neg.size == size => c,
                        Ok(c) => {
                            c.close();
                            break;
                        }
                        Err(_) => break,
                    };
                    match weak.upgrade() {
                        Some(v) => v.write().expect("nbd conns").push(c),
                        None => {
                            c.close(); // the source is gone already
                            break;
                        }
                    }
                }
            });
        }
        Ok(NbdSource { label, neg, conns, next: AtomicUsize::new(0), timeout: opts.timeout, wanted, tls })
    }

    /// Whether the connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn connections(&self) -> usize {
        self.conns.read().expect("nbd conns").len()
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    fn conn(&self) -> Arc<Conn> {
        let v = self.conns.read().expect("nbd conns");
        v[self.next.fetch_add(1, Ordering::Relaxed) % v.len()].clone()
    }

    fn fail(&self, what: String, e: io::Error) -> Error {
        Error::source_io(format!("{what} of {}", self.label), e)
    }

    /// The server answered a request with an error. EIO (its own read
    /// failed, e.g. nbdkit's curl plugin lost its HTTP connection), ENOMEM
    /// and ESHUTDOWN (it is going away) may pass; the others (EINVAL,
    /// EPERM, ENOTSUP, ...) will not.
    fn server_failed(&self, what: String, errno: u32, msg: String) -> Error {
        let ctx = format!("{what} of {}", self.label);
        match errno {
            EIO | ENOMEM | ESHUTDOWN => Error::source_unavailable(ctx, io::Error::other(msg)),
            _ => Error::SourceIo { context: ctx, source: io::Error::other(msg) },
        }
    }

    fn block_status(&self, offset: u64, length: u32) -> Result<Vec<(u32, u32)>> {
        let conn = self.conn();
        let what = || format!("block status of extent {offset}+{length}");
        let reply = conn
            .call(&[(CMD_BLOCK_STATUS, offset, length)], self.timeout)
            .and_then(|mut r| r.pop().expect("one reply"));
        let slot = reply.map_err(|e| self.fail(what(), e))?;
        match slot.error {
            Some((errno, msg)) => Err(self.server_failed(what(), errno, msg)),
            None => Ok(slot.extents),
        }
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        for c in self.conns.write().expect("nbd conns").drain(..) {
            c.close();
        }
    }
}

impl DiskSource for NbdSource {
    fn size(&self) -> u64 {
        self.neg.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let what = || format!("reading extent {offset}+{len}");
        if offset.checked_add(len).is_none_or(|e| e > self.neg.size) {
            return Err(Error::InvalidInput(format!(
                "{} is past the end of {} ({} bytes)",
                what(),
                self.label,
                self.neg.size
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let max = self.neg.max_request as u64;
        let pieces: Vec<(u16, u64, u32)> =
            (0..(len + max - 1) / max).map(|i| (CMD_READ, offset + i * max, (len - i * max).min(max) as u32)).collect();
        let conn = self.conn();
        let replies = conn.call(&pieces, self.timeout).map_err(|e| self.fail(what(), e))?;
        let mut first_err = None;
        for (reply, (_, off, n)) in replies.into_iter().zip(&pieces) {
            match reply {
                Ok(slot) => match slot.error {
                    None => {
                        let at = (off - offset) as usize;
                        buf[at..at + *n as usize].copy_from_slice(&slot.buf);
                        conn.recycle(slot.buf);
                    }
                    Some((errno, msg)) => {
                        first_err.get_or_insert_with(|| self.server_failed(what(), errno, msg));
                    }
                },
                Err(e) => {
                    first_err.get_or_insert_with(|| self.fail(what(), e));
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        let size = self.neg.size;
        if self.neg.allocation_id.is_none() || size == 0 {
            return Ok(if size == 0 { vec![] } else { vec![Extent::new(0, size)] });
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0u64;
        let align = self.neg.min_block as u64;
        while pos < size {
            if out.len() >= MAX_EXTENTS {
                out.push(Extent::new(pos, size - pos));
                break;
            }
            let n = (size - pos).min(STATUS_PIECE / align * align) as u32;
            let ext = self.block_status(pos, n)?;
            let start = pos;
            for (len, flags) in ext {
                let len = (len as u64).min(size - pos);
                if len == 0 {
                    break;
                }
                // Only "reads as zeros" may be skipped: a hole without the
                // zero flag may show a backing file's data.
                if flags & STATE_ZERO == 0 {
                    match out.last_mut() {
                        Some(l) if l.end() == pos => l.length += len,
                        _ => out.push(Extent::new(pos, len)),
                    }
                }
                pos += len;
                if pos >= size {
                    break;
                }
            }
            if pos == start {
                return Err(Error::Source(format!(
                    "{}: block status of extent {pos}+{n} made no progress",
                    self.label
                )));
            }
        }
        Ok(out)
    }

    fn format(&self) -> &'static str {
        "nbd"
    }

    fn describe(&self) -> String {
        self.label.trim_start_matches("NBD export ").to_string()
    }

    fn parallel_reads(&self) -> usize {
        // Several requests in flight per connection hide the round trip.
        (self.wanted * 2).clamp(2, 16)
    }
}
