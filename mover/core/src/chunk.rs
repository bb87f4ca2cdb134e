//! Chunk ids and the chunk blob format.
//!
//! A chunk id names a chunk by its plaintext: in repositories of format
//! version 2 the first 16 bytes of BLAKE3 keyed with the repository's id key
//! (`crypto::IdHash`), in version 1 the XXH3-128 hash, written as the 16-byte
//! big-endian canonical form that `xxhsum -H2` prints (`ChunkId::of`; anyone
//! can compute it, which is why version 2 replaced it). The id with all bits zero is reserved:
//! in a block map it means "this block is all zeros, no chunk stored".
//!
//! A chunk file is a 12-byte header followed by the payload:
//! `"VMBC"`, one byte encoding (0 = stored, 1 = zstd frame), the payload
//! length of a compressed chunk as a 24-bit little-endian number (0 in
//! stored chunks, whose payload is as long as the plaintext, and in
//! compressed chunks written before it was recorded), the plaintext length
//! as u32 little-endian. A chunk that does
//! not shrink under compression is stored as is.
//!
//! The payload length lets a writer tell a whole chunk file from one that a
//! power cut tore, by its header and its size alone (`whole_file_len`),
//! before it reuses the chunk instead of storing it again.

use crate::crypto::IdHash;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::fmt;
use xxhash_rust::xxh3::xxh3_128;

/// Magic at the start of every chunk file.
pub const CHUNK_MAGIC: &[u8; 4] = b"VMBC";
pub const CHUNK_HEADER_LEN: usize = 12;
/// The largest payload length bytes 5..8 of the header can record; every
/// payload fits (chunks are at most 8 MiB, see repository::MAX_CHUNK_SIZE).
const MAX_RECORDED_PAYLOAD: usize = (1 << 24) - 1;
pub const ENC_STORED: u8 = 0;
pub const ENC_ZSTD: u8 = 1;

/// The content address of a chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 16]);

impl ChunkId {
    /// Marks an all-zero block in a block map.
    pub const ZERO: ChunkId = ChunkId([0u8; 16]);

    /// The XXH3-128 of `data`: the id of format version 1 (see `IdHash`).
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(xxh3_128(data).to_be_bytes())
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 16]
    }
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push_str(&format!("{:02x}", b));
        }
        s
    }
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkId(out))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True if every byte of `data` is zero (word at a time).
pub fn is_all_zero(data: &[u8]) -> bool {
    let (head, body, tail) = unsafe {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets.
        data.align_to::<u64>()
    };
    head.iter().all(|b| *b == 0) && body.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// How chunks are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd(i32),
}

impl Compression {
    /// Parses `none` or `zstd:LEVEL` (`zstd` alone means level 3).
    pub fn parse(s: &str) -> Result<Compression> {
        let s = s.trim().to_ascii_lowercase();
        if s == "none" {
            return Ok(Compression::None);
        }
        if s == "zstd" {
            return Ok(Compression::Zstd(3));
        }
        if let Some(level) = s.strip_prefix("zstd:") {
            let level: i32 = level.parse().map_err(|_| Error::InvalidInput(format!("bad zstd level in {s:?}")))?;
            if !(-7..=19).contains(&level) || level == 0 {
                return Err(Error::InvalidInput(format!("zstd level {level} is out of range (-7..-1 or 1..19)")));
            }
            return Ok(Compression::Zstd(level));
        }
        Err(Error::InvalidInput(format!(
            "unsupported compression {s:?}: use none or zstd:LEVEL (e.g. zstd:3, or zstd:-1 for the fastest)"
        )))
    }
    pub fn name(&self) -> String {
        match self {
            Compression::None => "none".into(),
            Compression::Zstd(l) => format!("zstd:{l}"),
        }
    }
}

thread_local! {
    // One zstd context per thread, reused: a context per chunk costs an
    // allocation and a table initialisation each time.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `data` straight into `out`'s spare capacity, behind what it
/// holds; returns the compressed length, or an error if it did not fit.
fn zstd_compress_into(data: &[u8], level: i32, out: &mut Vec<u8>) -> std::io::Result<usize> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l != level).unwrap_or(true) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let mut cursor = std::io::Cursor::new(out);
        let at = cursor.get_ref().len() as u64;
        cursor.set_position(at);
        slot.as_mut().expect("just set").1.compress_to_buffer(data, &mut cursor)
    })
}

fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("just set").decompress(data, capacity)
    })
}

/// Encodes a chunk's plaintext into the chunk file format.
pub fn encode(data: &[u8], compression: Compression) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + data.len() / 2);
    encode_into(&mut out, data, compression)?;
    Ok(out)
}

/// Appends the encoded chunk to `out` (a sealed chunk's buffer holds its
/// own header first, so sealing needs no copy).
pub fn encode_into(out: &mut Vec<u8>, data: &[u8], compression: Compression) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&[ENC_STORED, 0, 0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    if let Compression::Zstd(level) = compression {
        // Compressed straight behind the header (room for zstd's bound, its
        // one-shot path); a payload that does not shrink is dropped and the
        // chunk stored as is.
        let payload = out.len();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        match zstd_compress_into(data, level, out) {
            Ok(n) if n < data.len() && out.len() == payload + n => {
                out[start + 4] = ENC_ZSTD;
                record_payload_len(&mut out[start..]);
                return Ok(());
            }
            _ => out.truncate(payload),
        }
    }
    out.extend_from_slice(data);
    Ok(())
}

/// Writes a compressed payload's length into header bytes 5..8 (left 0 if
/// it could not fit, which no chunk of a valid repository reaches). A stored
/// chunk leaves them 0: its payload is as long as its plaintext.
fn record_payload_len(file: &mut [u8]) {
    let n = file.len() - CHUNK_HEADER_LEN;
    if n <= MAX_RECORDED_PAYLOAD {
        file[5..8].copy_from_slice(&(n as u32).to_le_bytes()[..3]);
    }
}

/// The payload length a header records (0: not recorded).
fn recorded_payload_len(header: &[u8]) -> usize {
    u32::from_le_bytes([header[5], header[6], header[7], 0]) as usize
}

/// The length a whole chunk file with this header has, from the header
/// alone: `Ok(Some(len))`; `Ok(None)` for a compressed chunk written before
/// the payload length was recorded (its length shows only by walking its
/// zstd frame, see `zstd_frame_is_whole`); `Err(reason)` if the header
/// cannot start a chunk of at most `max_len` bytes of plaintext.
pub fn whole_file_len(header: &[u8], max_len: usize) -> std::result::Result<Option<u64>, String> {
    if header.len() < CHUNK_HEADER_LEN {
        return Err(format!("{} bytes, shorter than a chunk header", header.len()));
    }
    if &header[0..4] != CHUNK_MAGIC {
        return Err("bad magic".into());
    }
    let plain_len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
    if plain_len > max_len {
        return Err(format!("plaintext length {plain_len} exceeds {max_len}"));
    }
    let recorded = recorded_payload_len(header);
    let payload = match header[4] {
        ENC_STORED if recorded != 0 => {
            return Err(format!("stored payload of {recorded} bytes, plaintext of {plain_len}"));
        }
        ENC_STORED => plain_len,
        // A compressed payload is kept only when shorter than its plaintext.
        ENC_ZSTD if recorded >= plain_len => {
            return Err(format!("compressed payload of {recorded} bytes, plaintext of {plain_len}"));
        }
        ENC_ZSTD if recorded == 0 => return Ok(None),
        ENC_ZSTD => recorded,
        other => return Err(format!("unknown encoding {other}")),
    };
    Ok(Some((CHUNK_HEADER_LEN + payload) as u64))
}

/// Whether `payload` is exactly one complete zstd frame (walks the frame's
/// block headers; decompresses nothing).
pub fn zstd_frame_is_whole(payload: &[u8]) -> bool {
    matches!(zstd::zstd_safe::find_frame_compressed_size(payload), Ok(n) if n == payload.len())
}

/// Like `decode`, but takes the file's bytes by value: a stored chunk then
/// becomes its plaintext in place, without a second allocation and copy.
pub fn decode_owned(id: &ChunkId, mut file: Vec<u8>, max_len: usize, ids: &IdHash) -> Result<Vec<u8>> {
    if file.len() >= CHUNK_HEADER_LEN && &file[0..4] == CHUNK_MAGIC && file[4..8] == [ENC_STORED, 0, 0, 0] {
        let plain_len = u32::from_le_bytes(file[8..12].try_into().unwrap()) as usize;
        let corrupt = |reason: String| Error::CorruptChunk { id: id.to_hex(), reason };
        if plain_len > max_len {
            return Err(corrupt(format!("plaintext length {plain_len} exceeds {max_len}")));
        }
        file.drain(..CHUNK_HEADER_LEN);
        if file.len() != plain_len {
            return Err(corrupt(format!("{} bytes of plaintext, header says {plain_len}", file.len())));
        }
        let actual = ids.id(&file);
        if actual != *id {
            return Err(corrupt(format!("content hashes to {actual}")));
        }
        return Ok(file);
    }
    decode(id, &file, max_len, ids)
}

/// Checks a chunk file's 12-byte header (docs/format.md §4): magic, a known
/// encoding, bytes 5..8 zero for a stored chunk and zero or a payload length
/// shorter than the plaintext for a compressed one, a plaintext length of at
/// most `max_len`. Returns the plaintext length.
pub fn check_header(header: &[u8], max_len: usize) -> std::result::Result<usize, String> {
    if header.len() < CHUNK_HEADER_LEN {
        return Err(format!("file is {} bytes, shorter than its header", header.len()));
    }
    if &header[0..4] != CHUNK_MAGIC {
        return Err("bad magic".into());
    }
    if header[4] != ENC_STORED && header[4] != ENC_ZSTD {
        return Err(format!("unknown encoding {}", header[4]));
    }
    let plain_len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
    let recorded = recorded_payload_len(header);
    if header[4] == ENC_STORED && recorded != 0 {
        return Err("header bytes 5..8 of a stored chunk are not zero".into());
    }
    if header[4] == ENC_ZSTD && recorded != 0 && recorded >= plain_len {
        return Err(format!("compressed payload of {recorded} bytes, plaintext of {plain_len}"));
    }
    if plain_len > max_len {
        return Err(format!("plaintext length {plain_len} exceeds {max_len}"));
    }
    Ok(plain_len)
}

/// A zstd payload must be exactly one frame that declares its content size,
/// equal to the header's plaintext length, with nothing after it.
fn check_zstd_frame(payload: &[u8], plain_len: usize) -> std::result::Result<(), String> {
    let frame = zstd::zstd_safe::find_frame_compressed_size(payload).map_err(|_| "not a zstd frame".to_string())?;
    if frame != payload.len() {
        return Err(format!("{} bytes after the zstd frame", payload.len() - frame.min(payload.len())));
    }
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n == plain_len as u64 => Ok(()),
        Ok(Some(n)) => Err(format!("zstd frame declares {n} bytes, header says {plain_len}")),
        _ => Err("zstd frame does not declare its content size".into()),
    }
}

/// Decodes a chunk file and checks that its plaintext hashes to `id` under
/// `ids`. `max_len` bounds the plaintext size, so a hostile header cannot
/// make us allocate without limit.
pub fn decode(id: &ChunkId, file: &[u8], max_len: usize, ids: &IdHash) -> Result<Vec<u8>> {
    let corrupt = |reason: String| Error::CorruptChunk { id: id.to_hex(), reason };
    let plain_len = check_header(file, max_len).map_err(corrupt)?;
    let payload = &file[CHUNK_HEADER_LEN..];
    let recorded = recorded_payload_len(file);
    if recorded != 0 && recorded != payload.len() {
        return Err(corrupt(format!("payload of {} bytes, header says {recorded}", payload.len())));
    }
    let data = match file[4] {
        ENC_STORED => payload.to_vec(),
        ENC_ZSTD => {
            check_zstd_frame(payload, plain_len).map_err(|e| corrupt(format!("zstd: {e}")))?;
            zstd_decompress(payload, plain_len).map_err(|e| corrupt(format!("zstd: {e}")))?
        }
        other => return Err(corrupt(format!("unknown encoding {other}"))),
    };
    if data.len() != plain_len {
        return Err(corrupt(format!("{} bytes of plaintext, header says {plain_len}", data.len())));
    }
    let actual = ids.id(&data);
    if actual != *id {
        return Err(corrupt(format!("content hashes to {actual}")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static X: &IdHash = &IdHash::Xxh3;

    proptest! {
        #[test]
        fn roundtrip(data in prop::collection::vec(any::<u8>(), 0..5000), level in prop::sample::select(vec![0i32, 1, 3])) {
            let c = if level == 0 { Compression::None } else { Compression::Zstd(level) };
            let id = ChunkId::of(&data);
            let enc = encode(&data, c).unwrap();
            prop_assert!(enc.len() <= data.len() + CHUNK_HEADER_LEN);
            prop_assert_eq!(decode(&id, &enc, 1 << 20, X).unwrap(), data);
        }

        #[test]
        fn decode_never_panics(file in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&ChunkId::ZERO, &file, 1 << 20, X);
        }

        #[test]
        fn hex_roundtrip(bytes in any::<[u8; 16]>()) {
            let id = ChunkId(bytes);
            prop_assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        }
    }

    #[test]
    fn readers_hold_to_the_header_and_frame_rules() {
        let data = vec![7u8; 4096];
        let id = ChunkId::of(&data);
        let file = encode(&data, Compression::Zstd(3)).unwrap();
        assert_eq!(file[4], ENC_ZSTD);
        assert_eq!(decode(&id, &file, 4096, X).unwrap(), data);
        let refused = |f: &[u8], what: &str| {
            let e = decode(&id, f, 4096, X).expect_err(what).to_string();
            assert!(decode_owned(&id, f.to_vec(), 4096, X).is_err(), "{what}");
            e
        };
        // Bytes 5..8 of a compressed chunk record its payload length.
        let mut wrong = file.clone();
        wrong[6] = 1;
        assert!(refused(&wrong, "wrong payload length").contains("header says"));
        let mut stored = encode(&data, Compression::None).unwrap();
        stored[7] = 1;
        refused(&stored, "reserved byte of a stored chunk");
        let mut trailing = file.clone();
        trailing.push(0);
        refused(&trailing, "trailing byte");
        // Without a recorded length (chunks of older writers) the frame rule catches it.
        trailing[5..8].copy_from_slice(&[0; 3]);
        assert!(refused(&trailing, "trailing byte, old header").contains("after the zstd frame"));
        let frame = &file[CHUNK_HEADER_LEN..];
        let mut two = file[..8].to_vec();
        two.extend_from_slice(&2048u32.to_le_bytes());
        let half = zstd::bulk::compress(&data[..2048], 3).unwrap();
        two.extend_from_slice(&half);
        two.extend_from_slice(&half);
        refused(&two, "two frames");
        // A frame without its content size (streaming) is refused.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let streamed = enc.finish().unwrap();
        let mut nosize = file[..CHUNK_HEADER_LEN].to_vec();
        nosize.extend_from_slice(&streamed);
        record_payload_len(&mut nosize);
        assert!(refused(&nosize, "no content size").contains("content size"));
        assert!(!frame.is_empty());
    }

    #[test]
    fn decode_owned_matches_decode() {
        for data in [vec![9u8; 3000], (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<u8>>()] {
            for c in [Compression::None, Compression::Zstd(1)] {
                let id = ChunkId::of(&data);
                let enc = encode(&data, c).unwrap();
                assert_eq!(decode_owned(&id, enc.clone(), 1 << 20, X).unwrap(), data);
                let mut bad = enc.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(decode_owned(&id, bad, 1 << 20, X).is_err());
                assert!(decode_owned(&id, enc, 10, X).is_err());
            }
        }
    }

    #[test]
    fn flipped_byte_is_caught() {
        let data = vec![7u8; 4096];
        let id = ChunkId::of(&data);
        let mut enc = encode(&data, Compression::None).unwrap();
        enc[100] ^= 1;
        assert!(matches!(decode(&id, &enc, 1 << 20, X), Err(Error::CorruptChunk { .. })));
    }

    /// Compressible but not trivially: several zstd blocks.
    fn sample(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 29) as u8).collect()
    }

    #[test]
    fn header_records_the_payload_length() {
        for c in [Compression::None, Compression::Zstd(1)] {
            for data in [Vec::new(), sample(1 << 20)] {
                let enc = encode(&data, c).unwrap();
                assert_eq!(whole_file_len(&enc, 1 << 20).unwrap(), Some(enc.len() as u64));
                // Only a compressed payload's length is recorded.
                assert_eq!(enc[5..8] != [0; 3], enc[4] == ENC_ZSTD);
                for cut in [CHUNK_HEADER_LEN, enc.len() / 2, enc.len().saturating_sub(1)] {
                    if cut < enc.len() && cut >= CHUNK_HEADER_LEN {
                        assert!(decode(&ChunkId::of(&data), &enc[..cut], 1 << 20, X).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_without_a_recorded_length_still_read() {
        // As written before bytes 5..8 held the payload length.
        for c in [Compression::None, Compression::Zstd(1)] {
            let data = sample(300_000);
            let mut enc = encode(&data, c).unwrap();
            enc[5..8].fill(0);
            let id = ChunkId::of(&data);
            assert_eq!(decode(&id, &enc, 1 << 20, X).unwrap(), data);
            assert_eq!(decode_owned(&id, enc.clone(), 1 << 20, X).unwrap(), data);
            match c {
                Compression::None => assert_eq!(whole_file_len(&enc, 1 << 20).unwrap(), Some(enc.len() as u64)),
                Compression::Zstd(_) => {
                    assert_eq!(whole_file_len(&enc, 1 << 20).unwrap(), None);
                    assert!(zstd_frame_is_whole(&enc[CHUNK_HEADER_LEN..]));
                    for cut in [CHUNK_HEADER_LEN, CHUNK_HEADER_LEN + 20, enc.len() / 2, enc.len() - 1] {
                        assert!(!zstd_frame_is_whole(&enc[CHUNK_HEADER_LEN..cut]), "cut at {cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_recorded_length_that_disagrees_is_corrupt() {
        let data = sample(100_000);
        let mut enc = encode(&data, Compression::Zstd(1)).unwrap();
        enc[5] ^= 1;
        assert!(decode(&ChunkId::of(&data), &enc, 1 << 20, X).is_err());
        let mut stored = encode(&data, Compression::None).unwrap();
        stored[6] ^= 1;
        assert!(whole_file_len(&stored, 1 << 20).is_err());
        assert!(decode_owned(&ChunkId::of(&data), stored, 1 << 20, X).is_err());
    }

    #[test]
    fn hostile_length_is_refused() {
        let mut enc = encode(b"abc", Compression::None).unwrap();
        enc[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&ChunkId::of(b"abc"), &enc, 1 << 20, X).is_err());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 10_001];
        assert!(is_all_zero(&v[1..]));
        v[10_000] = 1;
        assert!(!is_all_zero(&v[3..]));
    }

    #[test]
    fn compression_parsing() {
        assert_eq!(Compression::parse("zstd:3").unwrap(), Compression::Zstd(3));
        assert_eq!(Compression::parse("none").unwrap(), Compression::None);
        assert!(Compression::parse("lz4").is_err());
        assert!(Compression::parse("zstd:99").is_err());
    }
}
