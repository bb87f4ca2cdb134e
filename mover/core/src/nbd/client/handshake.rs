//! The client's side of the fixed newstyle handshake, up to the
//! transmission phase: the greeting, then the option haggling (structured
//! replies, `base:allocation`, `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME` for old
//! servers). Generic over the byte stream, so the same code runs on a
//! socket, inside a TLS session, and on scripted bytes in tests.

use crate::nbd::proto::*;
use std::io::{self, Read, Write};

/// Without `NBD_INFO_BLOCK_SIZE`, the specification says a client should not
/// send requests larger than 32 MiB.
const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;

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

pub(super) fn is_tls_required(e: &io::Error) -> bool {
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
