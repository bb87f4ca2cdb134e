//! An NBD export as a disk source (VMware's LAN transport through nbdkit's
//! vddk plugin, qemu-nbd, or any NBD server).
//!
//! Fixed newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` with `base:allocation` (so holes are not read),
//! `NBD_OPT_GO` with the block size constraints (falling back to
//! `NBD_OPT_EXPORT_NAME` for old servers). Several connections when the
//! server says `NBD_FLAG_CAN_MULTI_CONN`, requests pipelined on each: a
//! reader thread per connection demultiplexes replies by cookie, so any
//! number of `read_at` calls can be in flight at once.
//!
//! Every reply is checked: its cookie must belong to an outstanding request,
//! chunk types must fit the command, data must lie inside what was asked.
//! Any violation kills the connection and fails every request on it; a
//! request without a reply within the timeout does the same.
//!
//! TLS (`nbds://`, or `nbd://...?tls-certificates=DIR` to a server that
//! answers `NBD_REP_ERR_TLS_REQD`; see `nbd::tls`): a rustls session cannot
//! be read by one thread while another writes, so a TLS connection has no
//! reader thread. A caller holds the session for its requests and their
//! whole replies, parsed by the same code as on plaintext connections; the
//! socket's timeouts bound every read and write. Parallelism then comes
//! from several connections only. When TLS was asked for, nothing falls back
//! to plaintext.

use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::nbd::proto::*;
use crate::nbd::tls::{TlsSetup, TlsStream};
use crate::nbd::uri::{Address, NbdUri};
use crate::nbd::Stream;
use crate::source::DiskSource;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Without `NBD_INFO_BLOCK_SIZE`, the specification says a client should not
/// send requests larger than 32 MiB.
const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest non-data chunk payload (block status, error) we accept.
const MAX_META_PAYLOAD: u32 = 1024 * 1024;
/// Block status is asked for in pieces of at most this many bytes.
const STATUS_PIECE: u64 = 1 << 30;
/// More extents than this and the rest of the disk counts as allocated:
/// a hostile server cannot make the map grow without bound.
const MAX_EXTENTS: usize = 1 << 22;
/// Most data chunks one read reply may be split into.
const MAX_CHUNKS_PER_READ: usize = 4096;

/// How to talk to the server. The caller decides (the command line reads
/// them from its flags or the environment); nothing here reads the
/// environment.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Connect, handshake, and wait for each reply at most this long.
    pub timeout: Duration,
    /// Most connections to open when the server allows several.
    pub max_connections: usize,
}

/// The range `NbdOptions::max_connections` must lie in.
pub const MAX_CONNECTIONS: usize = 16;

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions { timeout: Duration::from_secs(60), max_connections: 4 }
    }
}

impl NbdOptions {
    /// Options from optional values, each refused (not clamped) when out
    /// of range: a timeout in seconds above 0 (at most a day), 1 to 16
    /// connections.
    pub fn new(timeout_seconds: Option<f64>, max_connections: Option<usize>) -> Result<NbdOptions> {
        let mut o = NbdOptions::default();
        if let Some(t) = timeout_seconds {
            if !(t > 0.0 && t <= 86400.0) {
                return Err(Error::InvalidInput(format!(
                    "the NBD timeout must be above 0 and at most 86400 seconds, not {t}"
                )));
            }
            o.timeout = Duration::from_secs_f64(t);
        }
        if let Some(n) = max_connections {
            if !(1..=MAX_CONNECTIONS).contains(&n) {
                return Err(Error::InvalidInput(format!(
                    "the number of NBD connections must be from 1 to {MAX_CONNECTIONS}, not {n}"
                )));
            }
            o.max_connections = n;
        }
        Ok(o)
    }
}

/// What the handshake settled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// The context id of `base:allocation`, if the server has it.
    pub allocation_id: Option<u32>,
    pub min_block: u32,
    pub max_request: u32,
}

fn opt_error(export: &str, what: &str, kind: u32, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let why = match kind {
        REP_ERR_TLS_REQD => "the server requires TLS".to_string(),
        REP_ERR_UNKNOWN => format!("the server has no export {export:?}"),
        REP_ERR_POLICY => "refused by the server's policy".to_string(),
        REP_ERR_UNSUP => "not supported by the server".to_string(),
        REP_ERR_INVALID => "the server calls the request invalid".to_string(),
        k => format!("error {k:#x}"),
    };
    let msg = if msg.is_empty() { why } else { format!("{why} ({msg})") };
    io::Error::other(format!("{what}: {msg}"))
}

/// Most option replies one option may get (each is bounded in size).
const MAX_REPLIES_PER_OPTION: usize = 1024;

/// `NBD_REP_ERR_TLS_REQD` to an option, told apart from other failures so
/// that a client holding certificates can reconnect with TLS.
#[derive(Debug)]
pub struct TlsRequired;

impl std::fmt::Display for TlsRequired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server requires TLS")
    }
}

impl std::error::Error for TlsRequired {}

fn is_tls_required(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<TlsRequired>())
}

/// The fixed newstyle handshake on any byte stream, up to the transmission
/// phase. Generic so that it can be fed arbitrary bytes in tests.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Negotiated> {
    let no_zeroes = greet(s)?;
    negotiate(s, export, no_zeroes)
}

/// The server's greeting and our client flags; returns whether the server
/// omits the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub fn greet<S: Read + Write>(s: &mut S) -> io::Result<bool> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(invalid(format!("not an NBD server (greeting {magic:#x})")));
    }
    let style = read_u64(s)?;
    if style == 0x0000_4202_8186_1253 {
        return Err(invalid("the server speaks the oldstyle protocol, which is not supported"));
    }
    if style != IHAVEOPT {
        return Err(invalid(format!("bad handshake magic {style:#x}")));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid("the server does not speak fixed newstyle"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;
    Ok(no_zeroes)
}

/// The option haggling after the greeting (and after `NBD_OPT_STARTTLS`,
/// inside TLS): structured replies, `base:allocation`, `NBD_OPT_GO`.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str, no_zeroes: bool) -> io::Result<Negotiated> {
    let mut n = Negotiated { min_block: 1, max_request: DEFAULT_MAX_REQUEST, ..Default::default() };

    write_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let r = expect_reply(s, OPT_STRUCTURED_REPLY)?;
    n.structured = r.kind == REP_ACK;

    if n.structured {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        write_option(s, OPT_SET_META_CONTEXT, &d)?;
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let r = expect_reply(s, OPT_SET_META_CONTEXT)?;
            match r.kind {
                REP_META_CONTEXT => {
                    let mut p = Payload::new(&r.data);
                    let id = p.u32()?;
                    if p.rest() == BASE_ALLOCATION.as_bytes() {
                        n.allocation_id = Some(id);
                    }
                }
                REP_ACK => break,
                k if k & (1 << 31) != 0 => break, // no block status; everything counts as allocated
                k => return Err(invalid(format!("unexpected reply {k:#x} to NBD_OPT_SET_META_CONTEXT"))),
            }
        }
    }

    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    write_option(s, OPT_GO, &d)?;
    let mut have_export = false;
    for i in 0..=MAX_REPLIES_PER_OPTION {
        if i == MAX_REPLIES_PER_OPTION {
            return Err(invalid("too many replies to NBD_OPT_GO"));
        }
        let r = expect_reply(s, OPT_GO)?;
        match r.kind {
            REP_INFO => {
                let mut p = Payload::new(&r.data);
                match p.u16()? {
                    INFO_EXPORT => {
                        n.size = p.u64()?;
                        n.flags = p.u16()?;
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE => {
                        let (min, _pref, max) = (p.u32()?, p.u32()?, p.u32()?);
                        if !min.is_power_of_two() || min > 64 * 1024 || max < min {
                            return Err(invalid(format!("nonsensical block sizes min {min} max {max}")));
                        }
                        n.min_block = min;
                        // Keep requests a multiple of the minimum block size.
                        n.max_request = max.min(DEFAULT_MAX_REQUEST) / min * min;
                    }
                    _ => {} // names, descriptions: ignored
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                // An old server: NBD_OPT_EXPORT_NAME has no reply on error, just a close.
                write_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
                n.size = read_u64(s)?;
                n.flags = read_u16(s)?;
                if !no_zeroes {
                    skip(s, 124)?;
                }
                have_export = true;
                break;
            }
            k if k & (1 << 31) != 0 => return Err(opt_error(export, "opening the export", k, &r.data)),
            k => return Err(invalid(format!("unexpected reply {k:#x} to NBD_OPT_GO"))),
        }
    }
    if !have_export {
        return Err(invalid("the server accepted NBD_OPT_GO without saying the export's size"));
    }
    if n.size > i64::MAX as u64 {
        return Err(invalid(format!("export size {} is out of range", n.size)));
    }
    Ok(n)
}

fn expect_reply<S: Read>(s: &mut S, option: u32) -> io::Result<OptReply> {
    let r = read_opt_reply(s)?;
    if r.option != option {
        return Err(invalid(format!("reply to option {} while waiting for option {option}", r.option)));
    }
    if r.kind == REP_ERR_TLS_REQD {
        return Err(io::Error::other(TlsRequired));
    }
    Ok(r)
}

/// One outstanding request.
struct Slot {
    kind: u16,
    offset: u64,
    length: u32,
    buf: Vec<u8>,
    /// Byte ranges (relative to `offset`) that data or hole chunks filled.
    covered: Vec<(u64, u64)>,
    extents: Vec<(u32, u32)>,
    /// The server's error answer: its NBD error value and the message.
    error: Option<(u32, String)>,
    done: bool,
    sent: Instant,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
    /// Why the connection ended: the kind says whether a retry may cure it
    /// (a reset, a hang-up or a timeout) or not (a protocol violation).
    dead: Option<(io::ErrorKind, String)>,
}

/// How requests reach the server and replies come back.
enum Transport {
    /// Writers share one handle of the socket; a reader thread reads
    /// replies from another and hands them to the waiting requests.
    Plain { writer: Mutex<Stream>, reader: Mutex<Option<JoinHandle<()>>> },
    /// One TLS session: a caller sends its requests and reads their replies
    /// while holding it (see the module doc).
    Tls(Box<Mutex<TlsStream>>),
}

struct Conn {
    state: Mutex<State>,
    cond: Condvar,
    transport: Transport,
    /// A handle to shut the socket down, which wakes the reader thread.
    control: Stream,
    cookie: AtomicU64,
    neg: Negotiated,
    /// Read buffers for reuse: a fresh large allocation per request costs
    /// page faults that show in the throughput.
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Conn {
    fn kill(&self, kind: io::ErrorKind, why: String) {
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

    fn recycle(&self, b: Vec<u8>) {
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
    fn call(&self, reqs: &[(u16, u64, u32)], timeout: Duration) -> io::Result<Vec<io::Result<Slot>>> {
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
fn reader_loop(conn: Arc<Conn>, mut s: Stream) {
    loop {
        if let Err(e) = read_one_reply(&conn, &mut s) {
            let (kind, why) = reply_failure(&e, Duration::ZERO);
            conn.kill(kind, why);
            return;
        }
    }
}

/// Reads one reply (a simple reply or one structured chunk) and files it
/// with its request. Plaintext and TLS connections share it.
fn read_one_reply<S: Read>(conn: &Conn, s: &mut S) -> io::Result<()> {
    let h = read_reply_header(s)?;
    let cookie = h.cookie();
    // Look up the request; take its buffer out so the payload is read
    // without holding the lock (other threads keep submitting meanwhile).
    let (kind, offset, length, mut buf) = {
        let mut st = conn.state.lock().expect("nbd state");
        let slot = st
            .slots
            .get_mut(&cookie)
            .ok_or_else(|| invalid(format!("reply for cookie {cookie:#x}, which no request is waiting for")))?;
        if slot.done {
            return Err(invalid(format!("another reply for finished request {cookie:#x}")));
        }
        (slot.kind, slot.offset, slot.length, std::mem::take(&mut slot.buf))
    };
    let mut covered: Option<(u64, u64)> = None;
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut error: Option<(u32, String)> = None;
    let done;
    match h {
        ReplyHeader::Simple { error: e, .. } => {
            done = true;
            if e != 0 {
                error = Some((e, format!("the server answered {}", error_name(e))));
            } else if kind == CMD_READ {
                if conn.neg.structured {
                    return Err(invalid("simple reply with data to a read after structured replies were agreed"));
                }
                s.read_exact(&mut buf)?;
                covered = Some((0, length as u64));
            } else if kind == CMD_BLOCK_STATUS {
                return Err(invalid("simple reply to a block status request"));
            }
        }
        ReplyHeader::Chunk { flags, kind: ck, length: clen, .. } => {
            if !conn.neg.structured {
                return Err(invalid("structured reply chunk that was never agreed"));
            }
            done = flags & REPLY_FLAG_DONE != 0;
            match ck {
                CHUNK_NONE => {
                    if clen != 0 || !done {
                        return Err(invalid("NBD_REPLY_TYPE_NONE with a payload or without the done flag"));
                    }
                }
                CHUNK_OFFSET_DATA if kind == CMD_READ => {
                    if clen < 8 {
                        return Err(invalid("data chunk shorter than its offset"));
                    }
                    let at = read_u64(s)?;
                    let n = (clen - 8) as u64;
                    let rel = check_range(at, n, offset, length)?;
                    s.read_exact(&mut buf[rel as usize..(rel + n) as usize])?;
                    covered = Some((rel, n));
                }
                CHUNK_OFFSET_HOLE if kind == CMD_READ => {
                    if clen != 12 {
                        return Err(invalid(format!("hole chunk of {clen} bytes (12 expected)")));
                    }
                    let at = read_u64(s)?;
                    let n = read_u32(s)? as u64;
                    let rel = check_range(at, n, offset, length)?;
                    buf[rel as usize..(rel + n) as usize].fill(0);
                    covered = Some((rel, n));
                }
                CHUNK_BLOCK_STATUS if kind == CMD_BLOCK_STATUS => {
                    if clen < 12 || (clen - 4) % 8 != 0 {
                        return Err(invalid(format!("block status chunk of {clen} bytes")));
                    }
                    let data = read_vec(s, clen, MAX_META_PAYLOAD, "block status chunk")?;
                    let mut p = Payload::new(&data);
                    let id = p.u32()?;
                    if Some(id) != conn.neg.allocation_id {
                        return Err(invalid(format!("block status for context {id}, which was not asked for")));
                    }
                    while !p.is_empty() {
                        extents.push((p.u32()?, p.u32()?));
                    }
                }
                k if k & 0x8000 != 0 => {
                    if clen < 6 {
                        return Err(invalid(format!("error chunk of {clen} bytes")));
                    }
                    let data = read_vec(s, clen, MAX_META_PAYLOAD, "error chunk")?;
                    let mut p = Payload::new(&data);
                    let e = p.u32()?;
                    let mlen = p.u16()? as usize;
                    let msg = String::from_utf8_lossy(p.take(mlen)?).into_owned();
                    let at = if k == CHUNK_ERROR_OFFSET { format!(" at offset {}", p.u64()?) } else { String::new() };
                    if e == 0 {
                        return Err(invalid("error chunk with error 0"));
                    }
                    error = Some((
                        e,
                        format!(
                            "the server answered {}{at}{}",
                            error_name(e),
                            if msg.is_empty() { String::new() } else { format!(": {msg}") }
                        ),
                    ));
                }
                k => return Err(invalid(format!("chunk type {k} does not fit command {kind}"))),
            }
        }
    }
    let mut st = conn.state.lock().expect("nbd state");
    let slot = match st.slots.get_mut(&cookie) {
        Some(s) => s,
        None => return Ok(()), // the waiter gave up meanwhile
    };
    slot.buf = buf;
    if let Some((a, n)) = covered {
        if n > 0 {
            if slot.covered.len() >= MAX_CHUNKS_PER_READ {
                return Err(invalid("a read reply split into too many chunks"));
            }
            if slot.covered.iter().any(|&(b, m)| a < b + m && b < a + n) {
                return Err(invalid("overlapping data chunks in a read reply"));
            }
            slot.covered.push((a, n));
        }
    }
    if slot.extents.len() + extents.len() > MAX_EXTENTS {
        return Err(invalid("too many block status extents"));
    }
    slot.extents.extend(extents);
    if slot.error.is_none() {
        slot.error = error;
    }
    if done {
        if slot.error.is_none() && slot.kind == CMD_READ {
            let got: u64 = slot.covered.iter().map(|c| c.1).sum();
            if got != slot.length as u64 {
                return Err(invalid(format!("read reply covers {got} of {} bytes", slot.length)));
            }
        }
        if slot.error.is_none() && slot.kind == CMD_BLOCK_STATUS && slot.extents.is_empty() {
            return Err(invalid("block status reply without extents"));
        }
        slot.done = true;
        drop(st);
        conn.cond.notify_all();
    }
    Ok(())
}

/// Checks that `at+n` lies within the request `offset+length`; returns `at - offset`.
fn check_range(at: u64, n: u64, offset: u64, length: u32) -> io::Result<u64> {
    let end = at.checked_add(n).ok_or_else(|| invalid("chunk offset overflows"))?;
    if at < offset || end > offset + length as u64 {
        return Err(invalid(format!("chunk {at}+{n} lies outside the request {offset}+{length}")));
    }
    Ok(at - offset)
}

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

/// Connects and negotiates within `timeout`; a TLS connection then waits
/// at most `reply_timeout` for each read of a reply.
fn open_conn(
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

impl Conn {
    /// Says goodbye (`NBD_CMD_DISC` has no reply) and waits for the reader.
    fn close(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads from a fixed byte string, swallows writes.
    struct Scripted<'a>(&'a [u8]);
    impl Read for Scripted<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Scripted<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&NBDMAGIC.to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        b
    }

    fn rep(b: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]) {
        write_opt_reply(b, opt, kind, data).unwrap();
    }

    #[test]
    fn a_well_behaved_server_negotiates() {
        let mut b = greeting();
        rep(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut mc = 7u32.to_be_bytes().to_vec();
        mc.extend_from_slice(BASE_ALLOCATION.as_bytes());
        rep(&mut b, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &mc);
        rep(&mut b, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&12345u64.to_be_bytes());
        info.extend_from_slice(&(TF_HAS_FLAGS | TF_CAN_MULTI_CONN).to_be_bytes());
        rep(&mut b, OPT_GO, REP_INFO, &info);
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        rep(&mut b, OPT_GO, REP_INFO, &bs);
        rep(&mut b, OPT_GO, REP_ACK, &[]);
        let n = handshake(&mut Scripted(&b), "").unwrap();
        assert_eq!(n.size, 12345);
        assert_eq!(n.allocation_id, Some(7));
        assert!(n.structured);
        assert_eq!((n.min_block, n.max_request), (512, 1 << 20));
    }

    #[test]
    fn tls_required_is_a_clear_error() {
        let mut b = greeting();
        rep(&mut b, OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &[]);
        rep(&mut b, OPT_GO, REP_ERR_TLS_REQD, &[]);
        let e = handshake(&mut Scripted(&b), "x").unwrap_err();
        assert!(e.to_string().contains("requires TLS"), "{e}");
    }

    proptest! {
        #[test]
        fn handshake_never_panics_on_garbage(tail in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut b = greeting();
            b.extend_from_slice(&tail);
            let _ = handshake(&mut Scripted(&b), "e");
            let _ = handshake(&mut Scripted(&tail), "e");
        }

        #[test]
        fn handshake_survives_mutated_replies(pos in 0usize..200, byte in any::<u8>()) {
            let mut b = greeting();
            rep(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
            rep(&mut b, OPT_SET_META_CONTEXT, REP_ACK, &[]);
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&99u64.to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            rep(&mut b, OPT_GO, REP_INFO, &info);
            rep(&mut b, OPT_GO, REP_ACK, &[]);
            if pos < b.len() { b[pos] = byte; }
            let _ = handshake(&mut Scripted(&b), "e");
        }
    }
}
