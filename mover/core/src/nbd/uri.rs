//! NBD URIs as the NBD URI specification (NetworkBlockDevice `doc/uri.md`)
//! defines them: `nbd://host[:port][/export]`, `nbds://...` (TLS),
//! `nbd+unix:///export?socket=PATH` and `nbds+unix://...`. The export name is
//! the path without its first `/`, percent-decoded; the default port is 10809.
//!
//! Of the TLS query parameters the specification lists, `tls-certificates`
//! (a directory in libnbd's and nbdkit's layout: `ca-cert.pem`, optionally
//! `client-cert.pem` and `client-key.pem`) and `tls-hostname` are used;
//! `tls-verify-peer=false` and pre-shared keys (`tls-psk-file`,
//! `tls-username`) are refused rather than ignored, since ignoring them would
//! silently change what the connection trusts.

use crate::error::{Error, Result};

pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// `nbds://` or `nbds+unix://`: TLS is required.
    pub tls: bool,
    /// `?tls-certificates=DIR`, percent-decoded.
    pub tls_certificates: Option<String>,
    /// `?tls-hostname=NAME`: the name the server's certificate must carry.
    pub tls_hostname: Option<String>,
}

fn bad(uri: &str, why: &str) -> Error {
    Error::InvalidInput(format!("{uri} is not a usable NBD URI: {why}"))
}

fn percent_decode(s: &str, uri: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(|| bad(uri, "truncated percent escape"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad(uri, "bad percent escape"))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| bad(uri, "bad percent escape"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "export name is not UTF-8"))
}

impl NbdUri {
    pub fn is_nbd(spec: &str) -> bool {
        ["nbd:", "nbds:", "nbd+", "nbds+"].iter().any(|p| spec.starts_with(p))
    }

    pub fn parse(uri: &str) -> Result<NbdUri> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad(uri, "no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            "nbd+vsock" | "nbds+vsock" => return Err(bad(uri, "vsock transport is not supported")),
            _ => return Err(bad(uri, "scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path), uri)?;
        if export.len() > 4096 {
            return Err(bad(uri, "export name longer than 4096 bytes"));
        }
        let mut socket = None;
        let (mut tls_certificates, mut tls_hostname) = (None, None);
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" => socket = Some(percent_decode(v, uri)?),
                "tls-certificates" => tls_certificates = Some(percent_decode(v, uri)?).filter(|d| !d.is_empty()),
                "tls-hostname" => tls_hostname = Some(percent_decode(v, uri)?).filter(|h| !h.is_empty()),
                "tls-verify-peer" => match v {
                    "true" | "1" | "yes" | "on" => {}
                    _ => return Err(bad(uri, "tls-verify-peer=false is not supported: the server is always verified")),
                },
                "tls-username" | "tls-psk-file" => {
                    return Err(bad(uri, "TLS with pre-shared keys is not supported; use tls-certificates=DIR"))
                }
                _ => {}
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(uri, "a unix socket URI has no host (nbd+unix:///export?socket=PATH)"));
            }
            match socket {
                Some(s) if !s.is_empty() => Address::Unix(s),
                _ => return Err(bad(uri, "missing ?socket=PATH")),
            }
        } else {
            if socket.is_some() {
                return Err(bad(uri, "?socket= belongs to nbd+unix:// URIs"));
            }
            let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                // [IPv6]:port
                let (h, after) = h.split_once(']').ok_or_else(|| bad(uri, "unterminated [IPv6 address]"))?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad(uri, "bad port"))?,
            };
            let host = if host.is_empty() { "localhost".to_string() } else { percent_decode(&host, uri)? };
            Address::Tcp { host, port }
        };
        Ok(NbdUri { address, export, tls, tls_certificates, tls_hostname })
    }

    /// The name the server's certificate must carry: `tls-hostname`, else
    /// the URI's host, else (unix sockets) `localhost`.
    pub fn tls_server_name(&self) -> &str {
        match (&self.tls_hostname, &self.address) {
            (Some(h), _) => h,
            (None, Address::Tcp { host, .. }) => host,
            (None, Address::Unix(_)) => "localhost",
        }
    }
}

impl std::fmt::Display for NbdUri {
    /// The URI back, as a user would write it (export name not re-encoded).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "nbd{s}://[{host}]:{port}/{}", self.export),
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd{s}+unix:///{}?socket={p}", self.export),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(h: &str, p: u16) -> Address {
        Address::Tcp { host: h.into(), port: p }
    }

    #[test]
    fn examples_from_the_specification() {
        let cases = [
            ("nbd://example.com", tcp("example.com", 10809), "", false),
            ("nbd://example.com/", tcp("example.com", 10809), "", false),
            ("nbd://example.com:10809/disk", tcp("example.com", 10809), "disk", false),
            ("nbd://127.0.0.1:1234/my%20disk", tcp("127.0.0.1", 1234), "my disk", false),
            ("nbd://[::1]:777/x", tcp("::1", 777), "x", false),
            ("nbds://h/e", tcp("h", 10809), "e", true),
            ("nbd+unix:///?socket=/tmp/s", Address::Unix("/tmp/s".into()), "", false),
            ("nbd+unix:///disk?socket=/tmp/a%20b", Address::Unix("/tmp/a b".into()), "disk", false),
            ("nbd://h//abs", tcp("h", 10809), "/abs", false),
        ];
        for (uri, addr, export, tls) in cases {
            let u = NbdUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!((u.address, u.export.as_str(), u.tls), (addr, export, tls), "{uri}");
        }
    }

    #[test]
    fn tls_query_parameters() {
        let u =
            NbdUri::parse("nbds://localhost:1234/e?tls-certificates=/etc/pki/my%20certs&tls-verify-peer=true").unwrap();
        assert_eq!(u.tls_certificates.as_deref(), Some("/etc/pki/my certs"));
        assert_eq!((u.tls_hostname.as_deref(), u.tls_server_name()), (None, "localhost"));
        let u = NbdUri::parse("nbds+unix:///?socket=/s&tls-certificates=/c&tls-hostname=nbd.example.com").unwrap();
        assert_eq!((&u.address, u.tls), (&Address::Unix("/s".into()), true));
        assert_eq!((u.tls_certificates.as_deref(), u.tls_server_name()), (Some("/c"), "nbd.example.com"));
        let u = NbdUri::parse("nbds+unix:///?socket=/s&tls-certificates=/c").unwrap();
        assert_eq!(u.tls_server_name(), "localhost");
        let u = NbdUri::parse("nbds://[::1]/?tls-hostname=").unwrap();
        assert_eq!((u.tls_certificates.as_deref(), u.tls_server_name()), (None, "::1"));
        // Certificates on a plain URI: TLS only if the server requires it.
        let u = NbdUri::parse("nbd://h/?tls-certificates=/c").unwrap();
        assert_eq!((u.tls, u.tls_certificates.as_deref()), (false, Some("/c")));
        for uri in [
            "nbds://h/?tls-verify-peer=false",
            "nbds://h/?tls-psk-file=/k",
            "nbds://h/?tls-username=u",
            "nbds://h/?tls-certificates=%zz",
        ] {
            assert!(NbdUri::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for uri in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h:0/",
            "nbd://h:99999/",
            "nbd://h:x/",
            "http://h/",
            "nbd+vsock:///",
            "nbd:/x",
            "nbd://h/%zz",
            "nbd://h?socket=/s",
        ] {
            assert!(NbdUri::parse(uri).is_err(), "{uri}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = NbdUri::parse(&s);
            let _ = NbdUri::parse(&format!("nbd://{s}"));
            let _ = NbdUri::parse(&format!("nbd+unix:///{s}"));
        }

        #[test]
        fn display_round_trips(host in "[a-z][a-z0-9.-]{0,20}", port in 1u16.., export in "[a-zA-Z0-9_.-]{0,20}") {
            let u = NbdUri { address: Address::Tcp { host, port }, export, tls: false, tls_certificates: None, tls_hostname: None };
            prop_assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
