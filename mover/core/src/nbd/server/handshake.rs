//! The server's side of the option haggling: `NBD_OPT_GO`, `INFO`, `LIST`,
//! `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT`
//! (`base:allocation`) and `EXPORT_NAME` for old clients. Malformed options
//! get an error reply; a broken framing closes the connection.

use super::export::{Export, ALLOCATION_ID};
use super::session::{bye, ConnState};
use super::MAX_REQUEST;
use crate::nbd::proto::*;
use crate::nbd::Stream;
use std::io::{self, Write};

fn parse_name(p: &mut Payload) -> io::Result<String> {
    p.string()
}

/// Option haggling; `Some` once the client enters the transmission phase.
pub(super) fn negotiate(s: &mut Stream, export: &Export, no_zeroes: bool) -> io::Result<Option<ConnState>> {
    let mut st = ConnState::default();
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return bye("bad option magic");
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return bye("option too long");
        }
        let data = read_vec(s, len, MAX_OPTION_LEN, "option")?;
        let known = |name: &str| name.is_empty() || name == export.name;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !known(&name) {
                    return Ok(None); // the protocol's only answer: close
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(st));
            }
            OPT_ABORT => {
                let _ = write_opt_reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name.as_bytes());
                write_opt_reply(s, opt, REP_SERVER, &d)?;
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                st.structured = true;
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = (|| -> io::Result<(String, Vec<String>)> {
                    let mut p = Payload::new(&data);
                    let name = parse_name(&mut p)?;
                    let n = p.u32()?;
                    let mut q = Vec::new();
                    for _ in 0..n {
                        q.push(p.string()?);
                    }
                    if !p.is_empty() {
                        return Err(invalid("trailing bytes"));
                    }
                    Ok((name, q))
                })();
                let (name, queries) = match parsed {
                    Ok(v) => v,
                    Err(_) => {
                        write_opt_reply(s, opt, REP_ERR_INVALID, b"malformed meta context request")?;
                        continue;
                    }
                };
                if opt == OPT_SET_META_CONTEXT && !st.structured {
                    write_opt_reply(s, opt, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                if !known(&name) {
                    write_opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wanted = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:"))
                };
                if opt == OPT_SET_META_CONTEXT {
                    st.allocation = wanted;
                }
                if wanted {
                    let mut d = ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    write_opt_reply(s, opt, REP_META_CONTEXT, &d)?;
                }
                write_opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| -> io::Result<(String, Vec<u16>)> {
                    let mut p = Payload::new(&data);
                    let name = parse_name(&mut p)?;
                    let n = p.u16()?;
                    let mut reqs = Vec::new();
                    for _ in 0..n {
                        reqs.push(p.u16()?);
                    }
                    if !p.is_empty() {
                        return Err(invalid("trailing bytes"));
                    }
                    Ok((name, reqs))
                })();
                let (name, reqs) = match parsed {
                    Ok(v) => v,
                    Err(_) => {
                        write_opt_reply(s, opt, REP_ERR_INVALID, b"malformed NBD_OPT_GO/INFO")?;
                        continue;
                    }
                };
                if !known(&name) {
                    write_opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&export.flags().to_be_bytes());
                write_opt_reply(s, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                write_opt_reply(s, opt, REP_INFO, &bs)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    write_opt_reply(s, opt, REP_INFO, &d)?;
                }
                write_opt_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(st));
                }
            }
            OPT_STARTTLS => write_opt_reply(s, opt, REP_ERR_UNSUP, b"TLS is not supported")?,
            _ => write_opt_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}
