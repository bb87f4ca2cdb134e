//! Reading one reply (a simple reply or one structured chunk) and filing it
//! with its request, checked against what the request asked for: nothing a
//! server sends reaches a buffer or an allocation map unchecked. Shared by
//! plaintext and TLS connections.

use super::connection::Conn;
use crate::nbd::proto::*;
use std::io::{self, Read};

/// Largest non-data chunk payload (block status, error) we accept.
const MAX_META_PAYLOAD: u32 = 1024 * 1024;
/// More extents than this and the rest of the disk counts as allocated:
/// a hostile server cannot make the map grow without bound.
pub(super) const MAX_EXTENTS: usize = 1 << 22;
/// Most data chunks one read reply may be split into.
const MAX_CHUNKS_PER_READ: usize = 4096;

/// Reads one reply (a simple reply or one structured chunk) and files it
/// with its request. Plaintext and TLS connections share it.
pub(super) fn read_one_reply<S: Read>(conn: &Conn, s: &mut S) -> io::Result<()> {
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
