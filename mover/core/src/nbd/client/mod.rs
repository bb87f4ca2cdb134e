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
//!
//! The pieces: `options` (what the caller chooses), `handshake` (the
//! greeting and option haggling), `connect` (one socket, its handshake and
//! TLS), `connection` (the multiplexer of one connection), `reply` (reading
//! and checking one reply), `source` (the `DiskSource` over several
//! connections).

mod connect;
mod connection;
mod handshake;
mod options;
mod reply;
mod source;

pub use handshake::{greet, handshake, negotiate, Negotiated, TlsRequired};
pub use options::{NbdOptions, MAX_CONNECTIONS};
pub use source::NbdSource;
