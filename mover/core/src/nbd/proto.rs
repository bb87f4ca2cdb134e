//! The NBD wire protocol: constants and the fixed-size headers, shared by
//! the client (`nbd::client`) and the server (`nbd::server`).
//!
//! Numbers are from the protocol specification of the NetworkBlockDevice
//! project (`doc/proto.md`): the fixed newstyle handshake, option haggling
//! with `NBD_OPT_GO`, and the transmission phase with simple and structured
//! replies. Everything is big-endian on the wire.

use std::io::{self, Read, Write};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also prefixes every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// `NBD_REP_INFO` item types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values (errno numbers as the protocol fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest option payload either side accepts (the specification lets
/// a peer drop options above 4 KiB at the server's discretion; ours is more
/// lenient for long export lists, but bounded).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or string we accept (the specification's limit).
pub const MAX_STRING: u32 = 4096;

pub fn error_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (out of memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (not supported)",
        ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        _ => "unknown error",
    }
}

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads exactly `len` bytes, refusing more than `max`: a length read from
/// the wire never decides an allocation unchecked.
pub fn read_vec(r: &mut impl Read, len: u32, max: u32, what: &str) -> io::Result<Vec<u8>> {
    if len > max {
        return Err(invalid(format!("{what} of {len} bytes is larger than the {max} allowed")));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Discards `len` bytes.
pub fn skip(r: &mut impl Read, len: u64) -> io::Result<()> {
    let n = io::copy(&mut r.take(len), &mut io::sink())?;
    if n < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream"));
    }
    Ok(())
}

/// A cursor over a payload that fails instead of panicking when short.
pub struct Payload<'a> {
    data: &'a [u8],
}

impl<'a> Payload<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Payload { data }
    }
    pub fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(invalid(format!("payload is {} bytes short", n - self.data.len())));
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Ok(a)
    }
    pub fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A u32 length then that many bytes of UTF-8.
    pub fn string(&mut self) -> io::Result<String> {
        let n = self.u32()?;
        if n > MAX_STRING {
            return Err(invalid(format!("string of {n} bytes is too long")));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid("string is not UTF-8"))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// An option reply header and its payload (bounded by `MAX_OPTION_LEN`).
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub fn read_opt_reply(r: &mut impl Read) -> io::Result<OptReply> {
    let magic = read_u64(r)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(invalid(format!("bad option reply magic {magic:#x}")));
    }
    let option = read_u32(r)?;
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    let data = read_vec(r, len, MAX_OPTION_LEN, "option reply")?;
    Ok(OptReply { option, kind, data })
}

pub fn write_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

pub fn write_opt_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// A transmission-phase request (28 bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
    pub fn decode(b: &[u8; 28]) -> io::Result<Request> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(invalid(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2")),
            kind: u16::from_be_bytes(b[6..8].try_into().expect("2")),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4")),
        })
    }
}

/// The header of a reply: simple (error, cookie) or a structured chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, length: u32 },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Reads one reply header: 16 bytes for a simple reply, 20 for a chunk.
pub fn read_reply_header(r: &mut impl Read) -> io::Result<ReplyHeader> {
    let magic = read_u32(r)?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = read_u32(r)?;
            let cookie = read_u64(r)?;
            Ok(ReplyHeader::Simple { error, cookie })
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = read_u16(r)?;
            let kind = read_u16(r)?;
            let cookie = read_u64(r)?;
            let length = read_u32(r)?;
            Ok(ReplyHeader::Chunk { flags, kind, cookie, length })
        }
        m => Err(invalid(format!("bad reply magic {m:#x}"))),
    }
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reply_headers_never_panic(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_reply_header(&mut &data[..]);
            let _ = read_opt_reply(&mut &data[..]);
        }

        #[test]
        fn option_reply_length_is_bounded(kind in any::<u32>(), len in any::<u32>()) {
            // A header claiming a huge payload is refused before allocating.
            let mut b = Vec::new();
            b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            let r = read_opt_reply(&mut &b[..]);
            prop_assert!(r.is_err() || len == 0);
        }

        #[test]
        fn request_round_trips(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                               offset in any::<u64>(), length in any::<u32>()) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn chunk_headers_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), len in any::<u32>()) {
            let b = chunk_header(flags, kind, cookie, len);
            prop_assert_eq!(read_reply_header(&mut &b[..]).unwrap(), ReplyHeader::Chunk { flags, kind, cookie, length: len });
        }

        #[test]
        fn payload_reader_never_panics(data in prop::collection::vec(any::<u8>(), 0..40)) {
            let mut p = Payload::new(&data);
            let _ = p.string().and_then(|_| p.u64()).and_then(|_| p.u16());
        }
    }
}
