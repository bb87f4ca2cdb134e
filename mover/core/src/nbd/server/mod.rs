//! Serves a disk source (a backup's disk, see `backup_reader`) as an NBD
//! export: the base of mounting a backup and of file-level restore.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`
//! (`base:allocation`, answered from the source's allocation map, so a
//! client skips the backup's zero blocks); `NBD_OPT_EXPORT_NAME` for old
//! clients. Commands READ, BLOCK_STATUS, FLUSH, DISC, and in writable mode
//! WRITE, WRITE_ZEROES and TRIM into a copy-on-write overlay (see
//! `nbd_overlay`). One thread per client; `CAN_MULTI_CONN` is advertised
//! since every connection sees the same data (one shared overlay). Requests
//! are bounded (32 MiB); a client that breaks the protocol is disconnected.

use crate::error::{Error, Result};
use crate::extents::{normalize, Extent};
use crate::nbd::overlay::{Overlay, OVERLAY_BLOCK};
use crate::nbd::proto::*;
use crate::nbd::Stream;
use crate::progress::Cancel;
use crate::source::DiskSource;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A slice of a cached block: (block, start, length), sent without copying.
type Piece = (Arc<Vec<u8>>, usize, usize);

/// Largest READ or WRITE we accept, and what `NBD_INFO_BLOCK_SIZE` says.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Most extents in one block status reply.
const MAX_DESCRIPTORS: usize = 16 * 1024;
/// The id of `base:allocation` in our replies.
const ALLOCATION_ID: u32 = 1;
/// Most clients served at once. When all slots are taken, a new client
/// takes the slot of the oldest one still in its handshake (so idle
/// connections cannot lock clients out); if every client is past its
/// handshake, the new one is refused (disconnected at once).
const MAX_CLIENTS: usize = 64;
/// The default for `ServeOptions::handshake_timeout`: qemu-nbd and nbdkit
/// finish their handshake in milliseconds; a connection that has not after
/// this long is idle or hostile.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to listen.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    /// `HOST:PORT`; port 0 picks a free port.
    Tcp(String),
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, SocketAddr),
}

/// A bound, not yet serving, listener: its URI can be announced first.
pub struct NbdServer {
    listener: Listener,
    export: Arc<Export>,
    handshake_timeout: Duration,
}

pub struct ServeOptions {
    /// Accept writes into a temporary copy-on-write overlay in this directory.
    pub overlay_dir: Option<PathBuf>,
    /// The export's name (`""` is accepted too).
    pub name: String,
    /// A client must finish the whole handshake (up to `NBD_OPT_GO`)
    /// within this long, or it is disconnected and its slot freed.
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { overlay_dir: None, name: String::new(), handshake_timeout: HANDSHAKE_TIMEOUT }
    }
}

/// A client being served: a handle to shut its socket down, its thread,
/// and whether and when its handshake finished.
struct Client {
    control: Stream,
    thread: JoinHandle<()>,
    handshaken: Arc<std::sync::atomic::AtomicBool>,
    since: Instant,
}

impl Client {
    fn in_handshake(&self) -> bool {
        !self.handshaken.load(std::sync::atomic::Ordering::Acquire)
    }
}

struct Export {
    base: Arc<dyn DiskSource>,
    /// The same blocks as `base`, for reads sent without a copy.
    cache: Arc<BlockCache>,
    size: u64,
    name: String,
    /// The base's allocation, normalized, computed once.
    allocated: Vec<Extent>,
    overlay: Option<Overlay>,
}

impl Export {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.overlay {
            Some(o) => o.read_at(buf, offset),
            None => self.base.read_at(buf, offset),
        }
    }

    /// Whether the base has data at `pos`, and until where that holds.
    fn base_state(&self, pos: u64) -> (bool, u64) {
        let i = self.allocated.partition_point(|e| e.end() <= pos);
        match self.allocated.get(i) {
            Some(e) if e.start <= pos => (true, e.end()),
            Some(e) => (false, e.start),
            None => (false, self.size),
        }
    }

    /// `base:allocation` descriptors for `[offset, offset+len)`: data is 0,
    /// a hole that reads as zeros is HOLE|ZERO.
    fn status(&self, offset: u64, len: u32, one: bool) -> Vec<(u32, u32)> {
        let overlay = self.overlay.as_ref().filter(|o| !o.is_empty());
        // With an overlay, states are found per overlay block: answer a
        // bounded prefix (the protocol lets a reply cover less than asked).
        let span = if overlay.is_some() { (len as u64).min(64 << 20) } else { len as u64 };
        let end = offset + span;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_DESCRIPTORS {
            let (data, mut until) = match overlay.and_then(|o| o.state_at(pos)) {
                Some(d) => (d, (pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK),
                None => self.base_state(pos),
            };
            if overlay.is_some() {
                // The overlay may change state at any of its blocks.
                until = until.min((pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK);
            }
            let until = until.min(end).max(pos + 1);
            let flags = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            let n = (until - pos) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            pos = until;
            if one && out.len() > 1 {
                break; // REQ_ONE: the first descriptor is complete
            }
        }
        if one {
            out.truncate(1);
        }
        out
    }

    fn flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_DF;
        if self.overlay.is_some() {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        } else {
            f |= TF_READ_ONLY;
        }
        f
    }
}

/// Decoded blocks shared by all connections, each loaded once even when
/// several clients ask for it at the same moment (nbdcopy spreads adjacent
/// requests over its connections; without this every one of them would
/// decompress the same chunk).
struct BlockCache {
    base: Arc<dyn DiskSource>,
    size: u64,
    /// The base's own block size when it hands out shared blocks (a
    /// backup's chunks: no copy at all), else CACHE_BLOCK.
    block: u64,
    entries: Mutex<std::collections::VecDeque<(u64, Arc<CacheEntry>)>>,
}

#[derive(Default)]
struct CacheEntry {
    value: Mutex<Option<std::result::Result<Arc<Vec<u8>>, String>>>,
    ready: std::sync::Condvar,
}

const CACHE_BLOCK: u64 = 1 << 20;
const CACHE_BLOCKS: usize = 32;

impl BlockCache {
    fn block(&self, idx: u64) -> Result<Arc<Vec<u8>>> {
        let (entry, load) = {
            let mut e = self.entries.lock().expect("block cache");
            match e.iter().find(|(i, _)| *i == idx) {
                Some((_, x)) => (x.clone(), false),
                None => {
                    let x = Arc::new(CacheEntry::default());
                    if e.len() == CACHE_BLOCKS {
                        e.pop_front();
                    }
                    e.push_back((idx, x.clone()));
                    (x, true)
                }
            }
        };
        if load {
            // A loader that panics must still wake the threads waiting for
            // this block, or they would wait for ever.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if self.base.shared_block_size().is_some() {
                    self.base.shared_block(idx)
                } else {
                    let start = idx * self.block;
                    let mut buf = vec![0u8; (self.size - start).min(self.block) as usize];
                    self.base.read_at(&mut buf, start).map(|_| Arc::new(buf))
                }
            }))
            .unwrap_or_else(|_| Err(Error::Internal(format!("reading block {idx} panicked"))));
            let r = r.map_err(|e| e.to_string());
            if r.is_err() {
                self.entries.lock().expect("block cache").retain(|(i, _)| *i != idx);
            }
            *entry.value.lock().expect("cache entry") = Some(r);
            entry.ready.notify_all();
        }
        let mut v = entry.value.lock().expect("cache entry");
        while v.is_none() {
            v = entry.ready.wait(v).expect("cache entry");
        }
        match v.as_ref().expect("loaded") {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(Error::Source(e.clone())),
        }
    }
}

impl BlockCache {
    fn new(base: Arc<dyn DiskSource>) -> BlockCache {
        let block = base.shared_block_size().filter(|b| *b > 0).unwrap_or(CACHE_BLOCK);
        BlockCache { size: base.size(), base, block, entries: Mutex::new(Default::default()) }
    }

    /// The blocks covering `[offset, offset+len)`, as (block, start, length)
    /// pieces to send without copying them.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.block;
            let b = self.block(idx)?;
            let at = (pos - idx * self.block) as usize;
            let n = (((idx + 1) * self.block).min(end) - pos) as usize;
            if b.len() < at + n {
                return Err(Error::Source(format!("block {idx} is {} bytes, shorter than needed", b.len())));
            }
            out.push((b, at, n));
            pos += n as u64;
        }
        Ok(out)
    }
}

impl DiskSource for BlockCache {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut at = 0usize;
        for (b, start, n) in self.pieces(offset, buf.len() as u64)? {
            buf[at..at + n].copy_from_slice(&b[start..start + n]);
            at += n;
        }
        Ok(())
    }
    fn allocated(&self) -> Result<Vec<Extent>> {
        self.base.allocated()
    }
    fn format(&self) -> &'static str {
        self.base.format()
    }
    fn describe(&self) -> String {
        self.base.describe()
    }
}

impl NbdServer {
    /// Binds the listener. A unix socket path must not exist yet.
    pub fn bind(source: Arc<dyn DiskSource>, listen: &Listen, opts: ServeOptions) -> Result<NbdServer> {
        let size = source.size();
        let allocated = normalize(&source.allocated()?, size)?;
        let cache = Arc::new(BlockCache::new(source));
        let source: Arc<dyn DiskSource> = cache.clone();
        let overlay = match &opts.overlay_dir {
            Some(d) => Some(Overlay::create(source.clone(), d)?),
            None => None,
        };
        let listener = match listen {
            Listen::Unix(p) => {
                if p.exists() {
                    return Err(Error::InvalidInput(format!(
                        "{} already exists; remove it or pick another socket",
                        p.display()
                    )));
                }
                let l = UnixListener::bind(p).map_err(|e| Error::listen(format!("listening on {}", p.display()), e))?;
                Listener::Unix(l, p.clone())
            }
            Listen::Tcp(addr) => {
                let addrs: Vec<SocketAddr> = addr
                    .to_socket_addrs()
                    .map_err(|e| Error::InvalidInput(format!("{addr} is not a HOST:PORT to listen on: {e}")))?
                    .collect();
                let l = TcpListener::bind(&addrs[..]).map_err(|e| Error::listen(format!("listening on {addr}"), e))?;
                let local = l.local_addr().map_err(|e| Error::target(format!("listening on {addr}"), e))?;
                Listener::Tcp(l, local)
            }
        };
        let export = Export { base: source, cache, size, name: opts.name, allocated, overlay };
        Ok(NbdServer { listener, export: Arc::new(export), handshake_timeout: opts.handshake_timeout })
    }

    /// The URI clients connect to.
    pub fn uri(&self) -> String {
        match &self.listener {
            Listener::Unix(_, p) => format!("nbd+unix:///{}?socket={}", self.export.name, p.display()),
            Listener::Tcp(_, SocketAddr::V6(a)) => format!("nbd://[{}]:{}/{}", a.ip(), a.port(), self.export.name),
            Listener::Tcp(_, a) => format!("nbd://{}:{}/{}", a.ip(), a.port(), self.export.name),
        }
    }

    /// Serves clients until `cancel`; then disconnects them all, waits for
    /// their threads and removes the unix socket.
    pub fn serve(self, cancel: &Cancel) -> Result<()> {
        let set_nb = match &self.listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l, _) => l.set_nonblocking(true),
        };
        set_nb.map_err(|e| Error::target("listening", e))?;
        let mut clients: Vec<Client> = Vec::new();
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            // Forget clients that have gone; disconnect those whose
            // handshake ran out of time (their thread then ends).
            let (done, live): (Vec<_>, Vec<_>) = clients.drain(..).partition(|c| c.thread.is_finished());
            for c in done {
                let _ = c.thread.join();
            }
            clients = live;
            for c in clients.iter().filter(|c| c.in_handshake() && c.since.elapsed() >= self.handshake_timeout) {
                c.control.shutdown();
            }
            let accepted = match &self.listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l, _) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            match accepted {
                Ok(s) => {
                    let ctl = match s.try_clone() {
                        Ok(c) => c,
                        Err(_) => continue,
                    };
                    if clients.len() >= MAX_CLIENTS {
                        // Make room by dropping the oldest client still in
                        // its handshake; with none, refuse the newcomer:
                        // the export keeps serving the others.
                        let oldest =
                            clients.iter().enumerate().filter(|(_, c)| c.in_handshake()).min_by_key(|(_, c)| c.since);
                        match oldest.map(|(i, _)| i) {
                            Some(i) => {
                                let c = clients.swap_remove(i);
                                c.control.shutdown();
                                let _ = c.thread.join();
                            }
                            None => {
                                ctl.shutdown();
                                continue;
                            }
                        }
                    }
                    let export = self.export.clone();
                    let handshaken = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let flag = handshaken.clone();
                    let h = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
                        // The clone kept for cancellation holds the socket
                        // open: shut it down so the client sees the close.
                        let ctl = s.try_clone();
                        let _ = serve_client(s, &export, &flag);
                        if let Ok(c) = ctl {
                            c.shutdown();
                        }
                    });
                    match h {
                        Ok(thread) => clients.push(Client { control: ctl, thread, handshaken, since: Instant::now() }),
                        // Out of threads: this client goes, the others stay.
                        Err(_) => ctl.shutdown(),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => break Err(Error::target("accepting a client", e)),
            }
        };
        for c in clients.drain(..) {
            c.control.shutdown();
            let _ = c.thread.join();
        }
        result
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Why a connection ends early: protocol violations simply close it.
fn bye<T>(msg: &str) -> io::Result<T> {
    Err(invalid(msg.to_string()))
}

/// Serves one client; sets `handshaken` once the handshake is over (until
/// then the accept loop may disconnect it, see `NbdServer::serve`).
fn serve_client(mut s: Stream, export: &Export, handshaken: &std::sync::atomic::AtomicBool) -> io::Result<()> {
    // Writes to a stuck client time out; the whole handshake's deadline is
    // kept by the accept loop.
    s.set_timeouts(Some(HANDSHAKE_TIMEOUT))?;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = read_u32(&mut s)?;
    if cflags & CLIENT_FIXED_NEWSTYLE == 0 || cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return bye("client flags not supported");
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut conn = match negotiate(&mut s, export, no_zeroes)? {
        Some(c) => c,
        None => return Ok(()),
    };
    // Idle clients may stay as long as they like once past the handshake;
    // writes to a stuck client still time out.
    s.set_read_timeout(None)?;
    handshaken.store(true, std::sync::atomic::Ordering::Release);
    transmission(&mut s, export, &mut conn)
}

#[derive(Default)]
struct ConnState {
    structured: bool,
    allocation: bool,
}

fn parse_name(p: &mut Payload) -> io::Result<String> {
    p.string()
}

/// Option haggling; `Some` once the client enters the transmission phase.
fn negotiate(s: &mut Stream, export: &Export, no_zeroes: bool) -> io::Result<Option<ConnState>> {
    let mut st = ConnState::default();
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return bye("bad option magic");
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return bye("option too long");
        }
        let data = read_vec(s, len, MAX_OPTION_LEN, "option")?;
        let known = |name: &str| name.is_empty() || name == export.name;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !known(&name) {
                    return Ok(None); // the protocol's only answer: close
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(st));
            }
            OPT_ABORT => {
                let _ = write_opt_reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name.as_bytes());
                write_opt_reply(s, opt, REP_SERVER, &d)?;
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                st.structured = true;
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = (|| -> io::Result<(String, Vec<String>)> {
                    let mut p = Payload::new(&data);
                    let name = parse_name(&mut p)?;
                    let n = p.u32()?;
                    let mut q = Vec::new();
                    for _ in 0..n {
                        q.push(p.string()?);
                    }
                    if !p.is_empty() {
                        return Err(invalid("trailing bytes"));
                    }
                    Ok((name, q))
                })();
                let (name, queries) = match parsed {
                    Ok(v) => v,
                    Err(_) => {
                        write_opt_reply(s, opt, REP_ERR_INVALID, b"malformed meta context request")?;
                        continue;
                    }
                };
                if opt == OPT_SET_META_CONTEXT && !st.structured {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                if !known(&name) {
                    write_opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wanted = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:"))
                };
                if opt == OPT_SET_META_CONTEXT {
                    st.allocation = wanted;
                }
                if wanted {
                    let mut d = ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    write_opt_reply(s, opt, REP_META_CONTEXT, &d)?;
                }
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| -> io::Result<(String, Vec<u16>)> {
                    let mut p = Payload::new(&data);
                    let name = parse_name(&mut p)?;
                    let n = p.u16()?;
                    let mut reqs = Vec::new();
                    for _ in 0..n {
                        reqs.push(p.u16()?);
                    }
                    if !p.is_empty() {
                        return Err(invalid("trailing bytes"));
                    }
                    Ok((name, reqs))
                })();
                let (name, reqs) = match parsed {
                    Ok(v) => v,
                    Err(_) => {
                        write_opt_reply(s, opt, REP_ERR_INVALID, b"malformed NBD_OPT_GO/INFO")?;
                        continue;
                    }
                };
                if !known(&name) {
                    write_opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&export.flags().to_be_bytes());
                write_opt_reply(s, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                write_opt_reply(s, opt, REP_INFO, &bs)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    write_opt_reply(s, opt, REP_INFO, &d)?;
                }
                write_opt_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(st));
                }
            }
            OPT_STARTTLS => write_opt_reply(s, opt, REP_ERR_UNSUP, b"TLS is not supported")?,
            _ => write_opt_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Sends the reply to a request: data (for READ), or an error.
fn reply(s: &mut Stream, st: &ConnState, req: &Request, r: std::result::Result<Option<&[u8]>, u32>) -> io::Result<()> {
    match (r, st.structured) {
        (Ok(None), false) => s.write_all(&simple_reply(0, req.cookie)),
        (Ok(Some(data)), false) => {
            s.write_all(&simple_reply(0, req.cookie))?;
            s.write_all(data)
        }
        (Err(e), false) => s.write_all(&simple_reply(e, req.cookie)),
        (Ok(None), true) => s.write_all(&chunk_header(REPLY_FLAG_DONE, CHUNK_NONE, req.cookie, 0)),
        (Ok(Some(data)), true) => {
            let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, req.cookie, 8 + data.len() as u32).to_vec();
            h.extend_from_slice(&req.offset.to_be_bytes());
            s.write_all(&h)?;
            s.write_all(data)
        }
        (Err(e), true) => {
            let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, req.cookie, 6).to_vec();
            h.extend_from_slice(&e.to_be_bytes());
            h.extend_from_slice(&0u16.to_be_bytes());
            s.write_all(&h)
        }
    }
}

/// A successful read reply whose data is the concatenation of `slices`.
fn reply_data(s: &mut Stream, st: &ConnState, req: &Request, slices: &[&[u8]]) -> io::Result<()> {
    let total: usize = slices.iter().map(|x| x.len()).sum();
    if st.structured {
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, req.cookie, 8 + total as u32).to_vec();
        h.extend_from_slice(&req.offset.to_be_bytes());
        s.write_all(&h)?;
    } else {
        s.write_all(&simple_reply(0, req.cookie))?;
    }
    for x in slices {
        s.write_all(x)?;
    }
    Ok(())
}

fn transmission(s: &mut Stream, export: &Export, st: &mut ConnState) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&h)?;
        let in_range = req.offset.checked_add(req.length as u64).is_some_and(|e| e <= export.size);
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if req.length > MAX_REQUEST {
                    reply(s, st, &req, Err(EOVERFLOW))?;
                } else if !in_range || req.length == 0 {
                    // (a structured data chunk may not be empty)
                    reply(s, st, &req, Err(EINVAL))?;
                } else if export.overlay.is_none() {
                    // Straight from the shared blocks to the socket.
                    match export.cache.pieces(req.offset, req.length as u64) {
                        Ok(p) => {
                            let slices: Vec<&[u8]> = p.iter().map(|(b, at, n)| &b[*at..*at + *n]).collect();
                            reply_data(s, st, &req, &slices)?
                        }
                        Err(_) => reply(s, st, &req, Err(EIO))?,
                    }
                } else {
                    buf.resize(req.length as usize, 0);
                    match export.read(&mut buf, req.offset) {
                        Ok(()) => reply(s, st, &req, Ok(Some(&buf)))?,
                        Err(_) => reply(s, st, &req, Err(EIO))?,
                    }
                }
            }
            CMD_WRITE => {
                if req.length > MAX_REQUEST {
                    return bye("write larger than the maximum"); // its payload cannot be skipped safely
                }
                if export.overlay.is_none() {
                    // Read-only: skip the payload in small pieces, never
                    // holding a buffer of the size a client asks for.
                    let mut left = req.length as u64;
                    let mut scratch = [0u8; 64 * 1024];
                    while left > 0 {
                        let n = left.min(scratch.len() as u64) as usize;
                        s.read_exact(&mut scratch[..n])?;
                        left -= n as u64;
                    }
                    reply(s, st, &req, Err(EPERM))?;
                    continue;
                }
                buf.resize(req.length as usize, 0);
                s.read_exact(&mut buf)?;
                let r = match &export.overlay {
                    None => Err(EPERM),
                    Some(_) if !in_range => Err(ENOSPC),
                    Some(o) => o.write_at(&buf, req.offset).map(|_| None).map_err(|_| EIO),
                };
                reply(s, st, &req, r)?;
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                let r = match &export.overlay {
                    None => Err(EPERM),
                    Some(_) if !in_range => Err(ENOSPC),
                    Some(o) => o.zero(req.offset, req.length as u64).map(|_| None).map_err(|_| EIO),
                };
                reply(s, st, &req, r)?;
            }
            CMD_FLUSH => reply(s, st, &req, Ok(None))?,
            CMD_BLOCK_STATUS => {
                if !st.structured || !st.allocation || !in_range || req.length == 0 {
                    reply(s, st, &req, Err(EINVAL))?;
                } else {
                    let d = export.status(req.offset, req.length, req.flags & CMD_FLAG_REQ_ONE != 0);
                    let mut b = Vec::with_capacity(20 + 4 + 8 * d.len());
                    b.extend_from_slice(&chunk_header(
                        REPLY_FLAG_DONE,
                        CHUNK_BLOCK_STATUS,
                        req.cookie,
                        4 + 8 * d.len() as u32,
                    ));
                    b.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
                    for (len, flags) in d {
                        b.extend_from_slice(&len.to_be_bytes());
                        b.extend_from_slice(&flags.to_be_bytes());
                    }
                    s.write_all(&b)?;
                }
            }
            _ => reply(s, st, &req, Err(EINVAL))?,
        }
    }
}

/// Serves `source` on `listen` until `cancel`; `ready` gets the URI once
/// clients can connect.
pub fn serve(
    source: Arc<dyn DiskSource>,
    listen: &Listen,
    opts: ServeOptions,
    ready: impl FnOnce(&str),
    cancel: &Cancel,
) -> Result<()> {
    let server = NbdServer::bind(source, listen, opts)?;
    ready(&server.uri());
    server.serve(cancel)
}

/// The directory for overlays when none is given.
pub fn default_overlay_dir() -> PathBuf {
    std::env::temp_dir()
}
