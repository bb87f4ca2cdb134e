//! TLS for the NBD client (`nbds://`), with rustls.
//!
//! The NBD protocol's "TLS support": right after the fixed newstyle greeting
//! the client sends `NBD_OPT_STARTTLS`; on `NBD_REP_ACK` both sides run a TLS
//! handshake on the same socket, and the option haggling starts afresh
//! inside it (nothing negotiated before counts). A server that requires TLS
//! answers every other option with `NBD_REP_ERR_TLS_REQD`.
//!
//! The server is always verified: against the CA in `DIR/ca-cert.pem`
//! (libnbd's and nbdkit's layout for `tls-certificates=DIR`), for the name
//! from `tls-hostname=` or the URI's host. `DIR/client-cert.pem` and
//! `DIR/client-key.pem`, when both exist, are presented to servers that
//! verify their clients. Error texts name files and causes, never their
//! contents.

use crate::nbd::proto::*;
use crate::nbd::Stream;
use rustls::{Certificate, ClientConfig, ClientConnection, PrivateKey, RootCertStore, ServerName, StreamOwned};
use std::io::{self, BufReader};
use std::path::Path;
use std::sync::Arc;

pub type TlsStream = StreamOwned<ClientConnection, Stream>;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// What every TLS connection to one export needs.
pub struct TlsSetup {
    pub config: Arc<ClientConfig>,
    /// The name the server's certificate must carry.
    pub name: String,
    /// The certificates directory, for messages.
    pub dir: String,
}

/// A PEM file of certificates or a key is a few KiB; a chain of many
/// certificates stays far below this.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_pem(path: &Path) -> Result<Vec<rustls_pemfile::Item>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Regular files only (symlinks to them are fine: certbot keeps its
    // certificates that way), opened without blocking: a FIFO or /dev/zero
    // in the certificates directory must not hang us or fill memory.
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| cannot(&e))?;
    let m = f.metadata().map_err(|e| cannot(&e))?;
    if !m.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    if m.len() > MAX_PEM_BYTES {
        return Err(cannot(&format!("{} bytes, more than a PEM file holds", m.len())));
    }
    let mut text = Vec::new();
    f.take(MAX_PEM_BYTES).read_to_end(&mut text).map_err(|e| cannot(&e))?;
    rustls_pemfile::read_all(&mut BufReader::new(&text[..]))
        .map_err(|_| format!("{} is not a PEM file", path.display()))
}

impl TlsSetup {
    /// Loads the certificates directory. The error is one line for the user.
    pub fn load(dir: &str, name: &str) -> Result<TlsSetup, String> {
        let d = Path::new(dir);
        if !d.is_dir() {
            return Err(format!("the TLS certificates directory {dir} does not exist"));
        }
        let server_name = ServerName::try_from(name).map_err(|_| format!("{name:?} is not a valid TLS server name"))?;
        if let ServerName::IpAddress(_) = server_name {
            // webpki 0.22 verifies DNS names only.
            return Err(format!(
                "the server name {name} is an IP address, which cannot be verified; add ?tls-hostname=NAME (the name in the server's certificate)"
            ));
        }
        let ca = d.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for item in read_pem(&ca)? {
            if let rustls_pemfile::Item::X509Certificate(der) = item {
                roots.add(&Certificate(der)).map_err(|e| format!("{}: bad CA certificate ({e:?})", ca.display()))?;
            }
        }
        if roots.is_empty() {
            return Err(format!("{} holds no certificate", ca.display()));
        }
        let builder = ClientConfig::builder().with_safe_defaults().with_root_certificates(roots);
        let (cert, key) = (d.join(CLIENT_CERT), d.join(CLIENT_KEY));
        let config = if cert.exists() && key.exists() {
            let chain: Vec<Certificate> = read_pem(&cert)?
                .into_iter()
                .filter_map(|i| match i {
                    rustls_pemfile::Item::X509Certificate(der) => Some(Certificate(der)),
                    _ => None,
                })
                .collect();
            if chain.is_empty() {
                return Err(format!("{} holds no certificate", cert.display()));
            }
            let pk = read_pem(&key)?
                .into_iter()
                .find_map(|i| match i {
                    rustls_pemfile::Item::PKCS8Key(k)
                    | rustls_pemfile::Item::RSAKey(k)
                    | rustls_pemfile::Item::ECKey(k) => Some(PrivateKey(k)),
                    _ => None,
                })
                .ok_or_else(|| format!("{} holds no private key", key.display()))?;
            // The error names the kind of problem only, never the key.
            builder.with_single_cert(chain, pk).map_err(|_| {
                format!("{} and {} do not form a usable client certificate", cert.display(), key.display())
            })?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsSetup { config: Arc::new(config), name: name.to_string(), dir: dir.to_string() })
    }

    /// Sends `NBD_OPT_STARTTLS` on a stream that has just finished the
    /// greeting and runs the TLS handshake to its end, so that its failures
    /// show here and not as a garbled first option reply.
    pub fn start(&self, mut s: Stream) -> io::Result<TlsStream> {
        write_option(&mut s, OPT_STARTTLS, &[])?;
        let r = read_opt_reply(&mut s)?;
        if r.option != OPT_STARTTLS {
            return Err(invalid(format!("reply to option {} while waiting for NBD_OPT_STARTTLS", r.option)));
        }
        match r.kind {
            REP_ACK => {}
            REP_ERR_UNSUP | REP_ERR_POLICY => {
                return Err(io::Error::other(
                    "the server does not offer TLS (it refused NBD_OPT_STARTTLS); not continuing without it",
                ))
            }
            k => return Err(invalid(format!("unexpected reply {k:#x} to NBD_OPT_STARTTLS"))),
        }
        let name = ServerName::try_from(self.name.as_str()).map_err(|_| invalid("bad TLS server name"))?;
        let mut conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| io::Error::other(format!("TLS setup failed: {e}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut s).map_err(|e| self.handshake_error(e))?;
        }
        Ok(StreamOwned::new(conn, s))
    }

    /// An error in the first option haggling inside TLS. With TLS 1.3 a
    /// server checks the client's certificate after the client thinks the
    /// handshake is done, so its refusal shows up here, as an alert or a
    /// reset connection.
    pub fn session_error(&self, e: io::Error) -> io::Error {
        let tls_error = e.get_ref().is_some_and(|i| i.is::<rustls::Error>());
        if tls_error
            || matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
            )
        {
            let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(t) => t.to_string(),
                None => e.to_string(),
            };
            return io::Error::other(
                format!(
                    "TLS handshake failed: the server ended the session ({why}; does it want a client certificate, {}/{CLIENT_CERT} and {CLIENT_KEY}?)",
                    self.dir
                ),
            );
        }
        e
    }

    fn handshake_error(&self, e: io::Error) -> io::Error {
        let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificateData(r)) if r.contains("UnknownIssuer") => {
                format!(
                    "certificate verification failed: the server's certificate is not signed by the CA in {}/{CA_CERT}",
                    self.dir
                )
            }
            Some(rustls::Error::InvalidCertificateData(r)) if r.contains("CertNotValidForName") => {
                format!("certificate verification failed: the server's certificate is not valid for the name {} (tls-hostname=)", self.name)
            }
            Some(rustls::Error::InvalidCertificateData(r)) if r.contains("CertExpired") => {
                "certificate verification failed: the server's certificate has expired".to_string()
            }
            Some(
                e @ (rustls::Error::InvalidCertificateData(_)
                | rustls::Error::InvalidCertificateEncoding
                | rustls::Error::InvalidCertificateSignature
                | rustls::Error::InvalidCertificateSignatureType),
            ) => format!("certificate verification failed: {e}"),
            Some(rustls::Error::AlertReceived(a)) => {
                format!("the server ended the handshake ({a:?}; does it want a client certificate in {}?)", self.dir)
            }
            Some(e) => e.to_string(),
            None if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => "timed out".to_string(),
            None if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
            None => e.to_string(),
        };
        io::Error::other(format!("TLS handshake failed: {why}"))
    }
}
