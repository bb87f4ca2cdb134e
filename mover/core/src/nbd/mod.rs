//! Everything NBD in the mover, in one place: the wire protocol apart from
//! sockets and threads (`proto`), NBD URIs (`uri`), the socket both sides
//! use (`stream`), the client that reads an export as a disk source
//! (`client`, with TLS in `tls`), the server that serves a backup's disk
//! (`server`) and the copy-on-write overlay that makes it writable
//! (`overlay`). The rest of the crate sees the client as one disk source
//! among others (`source::NbdSource`, `source::nbd`); the bindings start
//! the server through `nbd::server`.

pub mod client;
pub mod overlay;
pub mod proto;
pub mod server;
mod stream;
pub mod tls;
pub mod uri;

pub use stream::Stream;
