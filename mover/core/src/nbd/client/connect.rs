//! Opening one connection: the socket (TCP or unix), the handshake within
//! the timeout, TLS when asked for, and on plaintext the reader thread.

use super::connection::{reader_loop, Conn, State, Transport};
use super::handshake::{greet, negotiate};
use crate::error::{Error, Result};
use crate::nbd::tls::TlsSetup;
use crate::nbd::uri::{Address, NbdUri};
use crate::nbd::Stream;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

fn connect(uri: &NbdUri, timeout: Duration) -> io::Result<Stream> {
    match &uri.address {
        Address::Unix(path) => {
            let s = UnixStream::connect(path)?;
            Ok(Stream::Unix(s))
        }
        Address::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Connects and negotiates within `timeout`; a TLS connection then waits
/// at most `reply_timeout` for each read of a reply.
pub(super) fn open_conn(
    uri: &NbdUri,
    tls: Option<&TlsSetup>,
    label: &str,
    timeout: Duration,
    reply_timeout: Duration,
) -> Result<Arc<Conn>> {
    let io_err = |e| Error::source_io(format!("connecting to {label}"), e);
    let hs_err = |e: io::Error| {
        let e = if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")
        } else {
            e
        };
        Error::source_io(format!("handshake with {label}"), e)
    };
    let mut s = connect(uri, timeout).map_err(io_err)?;
    s.set_timeouts(Some(timeout)).map_err(io_err)?;
    let no_zeroes = greet(&mut s).map_err(hs_err)?;
    let control = s.try_clone().map_err(io_err)?;
    let new_conn = |neg, transport| {
        Arc::new(Conn {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            transport,
            control,
            cookie: AtomicU64::new(1),
            neg,
            pool: Mutex::new(Vec::new()),
        })
    };
    if let Some(tls) = tls {
        let mut session = tls.start(s).map_err(hs_err)?;
        let neg = negotiate(&mut session, &uri.export, no_zeroes).map_err(|e| hs_err(tls.session_error(e)))?;
        // With no reader thread, the socket's timeouts are what bounds the
        // wait for a reply.
        session.sock.set_timeouts(Some(reply_timeout)).map_err(hs_err)?;
        return Ok(new_conn(neg, Transport::Tls(Box::new(Mutex::new(session)))));
    }
    let neg = negotiate(&mut s, &uri.export, no_zeroes).map_err(hs_err)?;
    // Replies are waited for with their own deadline; the reader blocks.
    s.set_read_timeout(None).map_err(hs_err)?;
    let reader = s.try_clone().map_err(io_err)?;
    let conn = new_conn(neg, Transport::Plain { writer: Mutex::new(s), reader: Mutex::new(None) });
    let c2 = conn.clone();
    let h =
        std::thread::Builder::new().name("nbd-reader".into()).spawn(move || reader_loop(c2, reader)).map_err(io_err)?;
    if let Transport::Plain { reader, .. } = &conn.transport {
        *reader.lock().expect("reader") = Some(h);
    }
    Ok(conn)
}
