//! The transmission phase: reads each request, checks it against the
//! export's bounds, and answers it (simple or structured replies): READ
//! straight from the shared blocks, BLOCK_STATUS from the allocation map,
//! writes into the overlay, FLUSH, DISC.

use super::export::{Export, ALLOCATION_ID};
use super::session::{bye, ConnState};
use super::MAX_REQUEST;
use crate::nbd::proto::*;
use crate::nbd::Stream;
use std::io::{self, Read, Write};

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

pub(super) fn transmission(s: &mut Stream, export: &Export, st: &mut ConnState) -> io::Result<()> {
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
