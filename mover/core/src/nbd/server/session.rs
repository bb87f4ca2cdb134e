//! One client from greeting to disconnect: the server's greeting and the
//! client's flags, the option haggling (`handshake`), then the requests
//! (`transmission`). What the handshake agreed is the `ConnState`.

use super::export::Export;
use super::handshake::negotiate;
use super::listener::HANDSHAKE_TIMEOUT;
use super::transmission::transmission;
use crate::nbd::proto::*;
use crate::nbd::Stream;
use std::io::{self, Write};

/// Why a connection ends early: protocol violations simply close it.
pub(super) fn bye<T>(msg: &str) -> io::Result<T> {
    Err(invalid(msg.to_string()))
}

/// Serves one client; sets `handshaken` once the handshake is over (until
/// then the accept loop may disconnect it, see `NbdServer::serve`).
pub(super) fn serve_client(
    mut s: Stream,
    export: &Export,
    handshaken: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
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
pub(super) struct ConnState {
    pub(super) structured: bool,
    pub(super) allocation: bool,
}
