//! The listener: binds a unix socket or a TCP address, accepts clients and
//! gives each its own thread, keeps the number of clients bounded (a client
//! stuck in its handshake makes room for a new one), and on cancel
//! disconnects them all and removes the socket.

use super::cache::BlockCache;
use super::export::Export;
use super::session::serve_client;
use crate::error::{Error, Result};
use crate::extents::normalize;
use crate::nbd::overlay::Overlay;
use crate::nbd::Stream;
use crate::progress::Cancel;
use crate::source::DiskSource;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
