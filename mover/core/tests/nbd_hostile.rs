//! The NBD client against hostile servers: every misbehaviour is a clean
//! error within a bounded time, never a panic, a hang or a huge allocation.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmbackup_mover::nbd::client::{NbdOptions, NbdSource};
use vmbackup_mover::nbd::proto::*;
use vmbackup_mover::source::DiskSource;
use vmbackup_mover::Error;

const SIZE: u64 = 1 << 20;

/// Negotiates like a plain server (structured replies, no block status,
/// no multi-conn), then lets `behave` answer requests.
fn hostile(behave: impl FnOnce(&mut UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).unwrap();
        read_u32(&mut s).unwrap();
        loop {
            assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
            let opt = read_u32(&mut s).unwrap();
            let len = read_u32(&mut s).unwrap();
            read_vec(&mut s, len, 65536, "option").unwrap();
            match opt {
                OPT_STRUCTURED_REPLY => write_opt_reply(&mut s, opt, REP_ACK, &[]).unwrap(),
                OPT_GO => {
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&SIZE.to_be_bytes());
                    info.extend_from_slice(&(TF_HAS_FLAGS | TF_READ_ONLY).to_be_bytes());
                    write_opt_reply(&mut s, opt, REP_INFO, &info).unwrap();
                    write_opt_reply(&mut s, opt, REP_ACK, &[]).unwrap();
                    break;
                }
                _ => write_opt_reply(&mut s, opt, REP_ERR_UNSUP, &[]).unwrap(),
            }
        }
        behave(&mut s);
        // Keep the socket open a while so that EOF is not what the client sees.
        std::thread::sleep(Duration::from_secs(5));
    });
    (dir, path)
}

fn next_request(s: &mut UnixStream) -> Request {
    let mut b = [0u8; 28];
    s.read_exact(&mut b).unwrap();
    Request::decode(&b).unwrap()
}

fn open(path: &std::path::Path) -> NbdSource {
    let uri = format!("nbd+unix:///?socket={}", path.display());
    NbdSource::open_with(&uri, &NbdOptions { timeout: Duration::from_millis(700), max_connections: 4 }).unwrap()
}

/// Reads 64 KiB at 4096 and returns the error, checking it came quickly and
/// is permanent (a protocol violation: retrying will not help).
fn read_error(behave: impl FnOnce(&mut UnixStream) + Send + 'static) -> String {
    let e = read_failure(behave);
    assert!(matches!(e, Error::SourceIo { .. }) && !e.is_transient(), "{e:?}");
    e.to_string()
}

/// Like `read_error`, for failures a retry may cure (the connection broke,
/// timed out, or the server answered EIO).
fn transient_read_error(behave: impl FnOnce(&mut UnixStream) + Send + 'static) -> String {
    let e = read_failure(behave);
    assert!(matches!(e, Error::SourceUnavailable { .. }) && e.is_transient(), "{e:?}");
    e.to_string()
}

fn read_failure(behave: impl FnOnce(&mut UnixStream) + Send + 'static) -> Error {
    let (_dir, path) = hostile(behave);
    let src = open(&path);
    assert_eq!(src.size(), SIZE);
    let t = Instant::now();
    let mut buf = vec![0u8; 65536];
    let e = src.read_at(&mut buf, 4096).expect_err("the read must fail");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    let msg = e.to_string();
    assert!(msg.contains("reading extent 4096+65536 of NBD export nbd+unix:///?socket="), "{msg}");
    e
}

#[test]
fn wrong_cookie() {
    let msg = read_error(|s| {
        let r = next_request(s);
        s.write_all(&simple_reply(0, r.cookie ^ 0xdead)).unwrap();
    });
    assert!(msg.contains("no request is waiting for"), "{msg}");
}

#[test]
fn oversize_data_chunk() {
    let msg = read_error(|s| {
        let r = next_request(s);
        // Claims 4 GiB of data: refused from the header, nothing allocated.
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, r.cookie, u32::MAX).to_vec();
        h.extend_from_slice(&r.offset.to_be_bytes());
        s.write_all(&h).unwrap();
    });
    assert!(msg.contains("outside the request"), "{msg}");
}

#[test]
fn huge_block_status_or_error_chunk_is_bounded() {
    let msg = read_error(|s| {
        let r = next_request(s);
        s.write_all(&chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, r.cookie, u32::MAX)).unwrap();
    });
    assert!(msg.contains("larger than"), "{msg}");
}

#[test]
fn data_outside_the_request() {
    let msg = read_error(|s| {
        let r = next_request(s);
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, r.cookie, 8 + 16).to_vec();
        h.extend_from_slice(&(r.offset + r.length as u64 - 8).to_be_bytes());
        h.extend_from_slice(&[1u8; 16]);
        s.write_all(&h).unwrap();
    });
    assert!(msg.contains("outside the request"), "{msg}");
}

#[test]
fn short_read_reply() {
    let msg = read_error(|s| {
        let r = next_request(s);
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, r.cookie, 8 + 16).to_vec();
        h.extend_from_slice(&r.offset.to_be_bytes());
        h.extend_from_slice(&[1u8; 16]);
        s.write_all(&h).unwrap();
    });
    assert!(msg.contains("covers 16 of 65536"), "{msg}");
}

#[test]
fn eof_mid_reply() {
    let msg = transient_read_error(|s| {
        let r = next_request(s);
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, r.cookie, 8 + r.length).to_vec();
        h.extend_from_slice(&r.offset.to_be_bytes());
        h.extend_from_slice(&[7u8; 1000]);
        s.write_all(&h).unwrap();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    });
    assert!(msg.contains("closed the connection"), "{msg}");
}

#[test]
fn silence_times_out() {
    let msg = transient_read_error(|s| {
        next_request(s);
    });
    assert!(msg.contains("no reply from the server within"), "{msg}");
}

#[test]
fn garbage_reply_magic() {
    let msg = read_error(|s| {
        next_request(s);
        s.write_all(&[0x55; 64]).unwrap();
    });
    assert!(msg.contains("bad reply magic"), "{msg}");
}

#[test]
fn server_error_is_reported_with_its_name() {
    let msg = transient_read_error(|s| {
        let r = next_request(s);
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, r.cookie, 6 + 4).to_vec();
        h.extend_from_slice(&EIO.to_be_bytes());
        h.extend_from_slice(&4u16.to_be_bytes());
        h.extend_from_slice(b"oops");
        s.write_all(&h).unwrap();
    });
    assert!(msg.contains("EIO") && msg.contains("oops"), "{msg}");
}

#[test]
fn server_einval_is_permanent() {
    let msg = read_error(|s| {
        let r = next_request(s);
        let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, r.cookie, 6).to_vec();
        h.extend_from_slice(&EINVAL.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&h).unwrap();
    });
    assert!(msg.contains("EINVAL"), "{msg}");
}

#[test]
fn silent_handshake_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let _l = UnixListener::bind(&path).unwrap(); // accepts (backlog) but never speaks
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let t = Instant::now();
    let e = NbdSource::open_with(&uri, &NbdOptions { timeout: Duration::from_millis(500), max_connections: 1 })
        .err()
        .expect("must fail");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.to_string().contains("handshake"), "{e}");
    assert!(e.is_transient(), "a server that does not answer may later: {e:?}");
}

#[test]
fn good_replies_after_pipelining_out_of_order() {
    let (_dir, path) = hostile(|s| {
        // Three requests in flight, answered in reverse order; one as a hole.
        let reqs: Vec<Request> = (0..3).map(|_| next_request(s)).collect();
        for (i, r) in reqs.iter().enumerate().rev() {
            if i == 1 {
                let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_HOLE, r.cookie, 12).to_vec();
                h.extend_from_slice(&r.offset.to_be_bytes());
                h.extend_from_slice(&r.length.to_be_bytes());
                s.write_all(&h).unwrap();
            } else {
                let mut h = chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, r.cookie, 8 + r.length).to_vec();
                h.extend_from_slice(&r.offset.to_be_bytes());
                h.extend(std::iter::repeat_n(i as u8 + 1, r.length as usize));
                s.write_all(&h).unwrap();
            }
        }
    });
    let src = std::sync::Arc::new(open(&path));
    let handles: Vec<_> = (0..3u64)
        .map(|i| {
            let src = src.clone();
            std::thread::spawn(move || {
                let mut b = vec![9u8; 1000];
                src.read_at(&mut b, i * 1000).map(|_| b)
            })
        })
        .collect();
    let mut got: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    got.sort();
    // Which thread got which cookie is up to scheduling; the contents are not.
    assert_eq!(got, vec![vec![0u8; 1000], vec![1u8; 1000], vec![3u8; 1000]]);
    assert_eq!(src.allocated().unwrap(), vec![vmbackup_mover::extents::Extent::new(0, SIZE)]);
}
