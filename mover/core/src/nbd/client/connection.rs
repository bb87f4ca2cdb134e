//! One connection's multiplexer: a slot per outstanding request, matched to
//! its reply by cookie, so that any number of requests can be in flight on
//! one socket. Plaintext connections have a reader thread that files every
//! reply; a TLS connection has none (a rustls session cannot be read by one
//! thread while another writes), and a caller holds the session for its
//! requests and their whole replies instead. A connection that fails or
//! times out fails every request on it, with an error kind that says
//! whether a retry may cure it.

use super::handshake::Negotiated;
use super::reply::read_one_reply;
use crate::nbd::proto::*;
use crate::nbd::tls::TlsStream;
use crate::nbd::Stream;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One outstanding request.
pub(super) struct Slot {
    pub(super) kind: u16,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) buf: Vec<u8>,
    /// Byte ranges (relative to `offset`) that data or hole chunks filled.
    pub(super) covered: Vec<(u64, u64)>,
    pub(super) extents: Vec<(u32, u32)>,
    /// The server's error answer: its NBD error value and the message.
    pub(super) error: Option<(u32, String)>,
    pub(super) done: bool,
    pub(super) sent: Instant,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) slots: HashMap<u64, Slot>,
    /// Why the connection ended: the kind says whether a retry may cure it
    /// (a reset, a hang-up or a timeout) or not (a protocol violation).
    pub(super) dead: Option<(io::ErrorKind, String)>,
}

/// How requests reach the server and replies come back.
pub(super) enum Transport {
    /// Writers share one handle of the socket; a reader thread reads
    /// replies from another and hands them to the waiting requests.
    Plain { writer: Mutex<Stream>, reader: Mutex<Option<JoinHandle<()>>> },
    /// One TLS session: a caller sends its requests and reads their replies
    /// while holding it (see the module doc).
    Tls(Box<Mutex<TlsStream>>),
}

pub(super) struct Conn {
    pub(super) state: Mutex<State>,
    pub(super) cond: Condvar,
    pub(super) transport: Transport,
    /// A handle to shut the socket down, which wakes the reader thread.
    pub(super) control: Stream,
    pub(super) cookie: AtomicU64,
    pub(super) neg: Negotiated,
    /// Read buffers for reuse: a fresh large allocation per request costs
    /// page faults that show in the throughput.
    pub(super) pool: Mutex<Vec<Vec<u8>>>,
}

impl Conn {
    pub(super) fn kill(&self, kind: io::ErrorKind, why: String) {
        let mut st = self.state.lock().expect("nbd state");
        if st.dead.is_none() {
            st.dead = Some((kind, why));
        }
        drop(st);
        self.control.shutdown();
        self.cond.notify_all();
    }

    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self.pool.lock().expect("nbd pool").pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    pub(super) fn recycle(&self, b: Vec<u8>) {
        let mut p = self.pool.lock().expect("nbd pool");
        if p.len() < 32 {
            p.push(b);
        }
    }

    /// Makes slots for the requests; returns their cookies and their bytes
    /// on the wire.
    fn register(&self, reqs: &[(u16, u64, u32)]) -> io::Result<(Vec<u64>, Vec<u8>)> {
        let mut cookies = Vec::with_capacity(reqs.len());
        let mut wire = Vec::with_capacity(28 * reqs.len());
        {
            let mut st = self.state.lock().expect("nbd state");
            if let Some((kind, why)) = &st.dead {
                return Err(io::Error::new(*kind, why.clone()));
            }
            for &(kind, offset, length) in reqs {
                let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
                let buf = if kind == CMD_READ { self.buffer(length as usize) } else { Vec::new() };
                st.slots.insert(
                    cookie,
                    Slot {
                        kind,
                        offset,
                        length,
                        buf,
                        covered: Vec::new(),
                        extents: Vec::new(),
                        error: None,
                        done: false,
                        sent: Instant::now(),
                    },
                );
                let flags = 0;
                wire.extend_from_slice(&Request { flags, kind, cookie, offset, length }.encode());
                cookies.push(cookie);
            }
        }
        Ok((cookies, wire))
    }

    /// Sends the requests and waits for their replies; one result per
    /// request, in order.
    pub(super) fn call(&self, reqs: &[(u16, u64, u32)], timeout: Duration) -> io::Result<Vec<io::Result<Slot>>> {
        match &self.transport {
            Transport::Plain { writer, .. } => {
                let (cookies, wire) = self.register(reqs)?;
                let r = writer.lock().expect("nbd writer").write_all(&wire);
                if let Err(e) = r {
                    self.kill(e.kind(), format!("sending a request failed: {e}"));
                    return Err(e);
                }
                Ok(cookies.iter().map(|c| self.wait(*c, timeout)).collect())
            }
            Transport::Tls(session) => {
                let mut s = session.lock().expect("nbd tls session");
                let (cookies, wire) = self.register(reqs)?;
                if let Err(e) = s.write_all(&wire).and_then(|_| s.flush()) {
                    self.kill(e.kind(), format!("sending a request failed: {e}"));
                    return Err(e);
                }
                let all_done = || {
                    let st = self.state.lock().expect("nbd state");
                    cookies.iter().all(|c| st.slots.get(c).is_none_or(|s| s.done))
                };
                while !all_done() {
                    if let Err(e) = read_one_reply(self, &mut *s) {
                        let (kind, why) = reply_failure(&e, timeout);
                        self.kill(kind, why);
                        break;
                    }
                }
                drop(s);
                // Finished slots come back at once; after a failure, each
                // request gets the connection's error.
                Ok(cookies.iter().map(|c| self.wait(*c, timeout)).collect())
            }
        }
    }

    fn wait(&self, cookie: u64, timeout: Duration) -> io::Result<Slot> {
        let mut st = self.state.lock().expect("nbd state");
        loop {
            let sent = match st.slots.get(&cookie) {
                Some(s) if s.done => return Ok(st.slots.remove(&cookie).expect("present")),
                Some(s) => s.sent,
                None => return Err(io::Error::other("request vanished")),
            };
            if let Some((kind, why)) = &st.dead {
                let e = io::Error::new(*kind, why.clone());
                st.slots.remove(&cookie);
                return Err(e);
            }
            let left = match timeout.checked_sub(sent.elapsed()) {
                Some(l) if !l.is_zero() => l,
                _ => {
                    st.slots.remove(&cookie);
                    drop(st);
                    let why = format!("no reply from the server within {} s", timeout.as_secs_f64());
                    self.kill(io::ErrorKind::TimedOut, why.clone());
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
            };
            st = self.cond.wait_timeout(st, left).expect("nbd state").0;
        }
    }

    /// Says goodbye (`NBD_CMD_DISC` has no reply) and waits for the reader.
    pub(super) fn close(&self) {
        let disc = Request { flags: 0, kind: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode();
        match &self.transport {
            Transport::Plain { writer, .. } => {
                let _ = writer.lock().map(|mut w| w.write_all(&disc));
            }
            Transport::Tls(session) => {
                if let Ok(mut s) = session.lock() {
                    let _ = s.write_all(&disc);
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
            }
        }
        self.kill(io::ErrorKind::ConnectionAborted, "the connection was closed".into());
        if let Transport::Plain { reader, .. } = &self.transport {
            if let Some(h) = reader.lock().expect("reader").take() {
                let _ = h.join();
            }
        }
    }
}

/// Why a connection ends when reading a reply failed, and the kind of
/// error its requests get. A server that hangs up mid-reply is reported as
/// `ConnectionAborted`, not as end of file: for a network source it is a
/// failure a retry may cure, not a truncated image.
fn reply_failure(e: &io::Error, timeout: Duration) -> (io::ErrorKind, String) {
    use io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof => (K::ConnectionAborted, "the server closed the connection".to_string()),
        // Only TLS connections read with a socket timeout.
        K::WouldBlock | K::TimedOut => {
            (K::TimedOut, format!("no reply from the server within {} s", timeout.as_secs_f64()))
        }
        K::InvalidData => (K::InvalidData, format!("bad reply from the server: {e}")),
        k => (k, format!("the connection failed: {e}")),
    }
}

/// Reads replies and hands them to the waiting requests until the
/// connection ends or breaks.
pub(super) fn reader_loop(conn: Arc<Conn>, mut s: Stream) {
    loop {
        if let Err(e) = read_one_reply(&conn, &mut s) {
            let (kind, why) = reply_failure(&e, Duration::ZERO);
            conn.kill(kind, why);
            return;
        }
    }
}
