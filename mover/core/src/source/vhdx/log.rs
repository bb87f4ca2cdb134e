//! Replaying a VHDX log in memory ([MS-VHDX] 2.3).
//!
//! The log is a circular buffer of 4 KiB sectors holding entries; each entry
//! has a header, descriptors (write 4 KiB of data at a file offset, or zero a
//! range) and the data sectors. The active sequence is the run of valid
//! entries with consecutive sequence numbers that ends at the entry with the
//! largest sequence number whose `Tail` leads to it. Replaying it yields an
//! overlay over the file: the file itself is never written.
//!
//! Every loop is bounded by the number of sectors in the log, and nothing is
//! allocated from a length the log states without checking it against the
//! bytes actually there.

use super::crc32c::crc32c_with_zero_field;
use super::format::{le32, le64};
use super::guid::Guid;
use std::collections::{BTreeMap, HashMap};

pub const SECTOR: usize = 4096;
/// Largest log we replay; Hyper-V and qemu make 1 MiB logs.
pub const MAX_LOG: u64 = 64 * 1024 * 1024;

/// What the log changes in the file: whole 4 KiB sectors of data and zeroed ranges.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    data: BTreeMap<u64, Box<[u8]>>,
    /// start -> end, disjoint, not touching any `data` sector.
    zeros: BTreeMap<u64, u64>,
    /// The file's size after replay (LastFileOffset of the head entry).
    pub last_file_offset: u64,
    pub entries: usize,
}

impl Overlay {
    fn write(&mut self, off: u64, sector: Box<[u8]>) {
        self.punch(off, off + SECTOR as u64);
        self.data.insert(off, sector);
    }

    fn zero(&mut self, a: u64, b: u64) {
        let keys: Vec<u64> = self.data.range(a..b).map(|(k, _)| *k).collect();
        for k in keys {
            self.data.remove(&k);
        }
        let (mut s, mut e) = (a, b);
        let touching: Vec<(u64, u64)> =
            self.zeros.range(..=b).rev().take_while(|(_, end)| **end >= a).map(|(k, v)| (*k, *v)).collect();
        for (k, v) in touching {
            self.zeros.remove(&k);
            s = s.min(k);
            e = e.max(v);
        }
        self.zeros.insert(s, e);
    }

    fn punch(&mut self, a: u64, b: u64) {
        let hit: Vec<(u64, u64)> =
            self.zeros.range(..b).rev().take_while(|(_, end)| **end > a).map(|(k, v)| (*k, *v)).collect();
        for (s, e) in hit {
            self.zeros.remove(&s);
            if s < a {
                self.zeros.insert(s, a);
            }
            if e > b {
                self.zeros.insert(b, e);
            }
        }
    }

    /// Applies the overlay to `buf`, which holds the file's bytes at `off`.
    pub fn apply(&self, buf: &mut [u8], off: u64) {
        let end = off + buf.len() as u64;
        for (s, e) in self.zeros.range(..end).rev() {
            if *e <= off {
                break;
            }
            let (a, b) = ((*s).max(off), (*e).min(end));
            buf[(a - off) as usize..(b - off) as usize].fill(0);
        }
        for (s, d) in self.data.range(off.saturating_sub(SECTOR as u64 - 1)..end) {
            let (a, b) = ((*s).max(off), (*s + SECTOR as u64).min(end));
            buf[(a - off) as usize..(b - off) as usize].copy_from_slice(&d[(a - s) as usize..(b - s) as usize]);
        }
    }
}

enum Desc {
    Data { off: u64, sector: Box<[u8]> },
    Zero { off: u64, len: u64 },
}

struct Entry {
    seq: u64,
    tail: u64,
    len: u64,
    last_file_offset: u64,
    flushed_file_offset: u64,
    descs: Vec<Desc>,
}

/// `len` bytes of the circular log starting at `pos`.
fn circular(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut p = pos % n;
    let mut left = len;
    while left > 0 {
        let take = left.min(n - p);
        out.extend_from_slice(&log[p as usize..(p + take) as usize]);
        left -= take;
        p = (p + take) % n;
    }
    out
}

/// The valid entry at `pos`, if there is one.
fn parse_entry(log: &[u8], pos: u64, guid: &Guid, budget: &mut u64) -> Option<Entry> {
    let n = log.len() as u64;
    let head = circular(log, pos, 64);
    if &head[0..4] != b"loge" {
        return None;
    }
    let len = le32(&head, 8) as u64;
    let (tail, seq, count) = (le32(&head, 12) as u64, le64(&head, 16), le32(&head, 24) as u64);
    if len == 0 || len % SECTOR as u64 != 0 || len > n || tail % SECTOR as u64 != 0 || tail >= n {
        return None;
    }
    if Guid::from_bytes(&head[32..48]) != *guid {
        return None;
    }
    let desc_sectors = (64 + 32 * count + SECTOR as u64 - 1) / SECTOR as u64;
    if desc_sectors * SECTOR as u64 > len {
        return None;
    }
    // Every candidate sector may claim a whole log's worth of entry: a
    // budget bounds the bytes copied and checksummed over the whole scan.
    if *budget < len {
        return None;
    }
    *budget -= len;
    let bytes = circular(log, pos, len);
    if le32(&bytes, 4) != crc32c_with_zero_field(&bytes, 4) {
        return None;
    }
    let mut descs = Vec::with_capacity(count as usize);
    let mut data_at = desc_sectors as usize * SECTOR;
    for i in 0..count as usize {
        let d = &bytes[64 + 32 * i..96 + 32 * i];
        let (off, dseq) = (le64(d, 16), le64(d, 24));
        if dseq != seq || off % SECTOR as u64 != 0 {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let zlen = le64(d, 8);
                if zlen % SECTOR as u64 != 0 || off.checked_add(zlen).is_none() {
                    return None;
                }
                descs.push(Desc::Zero { off, len: zlen });
            }
            b"desc" => {
                let s = bytes.get(data_at..data_at + SECTOR)?;
                data_at += SECTOR;
                if &s[0..4] != b"data"
                    || le32(s, 4) as u64 != seq >> 32
                    || le32(s, SECTOR - 4) as u64 != seq & 0xffff_ffff
                {
                    return None;
                }
                off.checked_add(SECTOR as u64)?;
                let mut sector = s.to_vec().into_boxed_slice();
                // The data sector's first 8 and last 4 bytes hold the
                // signature and sequence; the real bytes are in the descriptor.
                sector[0..8].copy_from_slice(&d[8..16]);
                sector[SECTOR - 4..].copy_from_slice(&d[4..8]);
                descs.push(Desc::Data { off, sector });
            }
            _ => return None,
        }
    }
    Some(Entry { seq, tail, len, last_file_offset: le64(&head, 56), flushed_file_offset: le64(&head, 48), descs })
}

/// Finds the active sequence of `log` (the log region's bytes) for `guid` and
/// replays it. `file_len` is the file's size, to check FlushedFileOffset.
pub fn replay(log: &[u8], guid: &Guid, file_len: u64) -> Result<Overlay, String> {
    if log.is_empty() || log.len() % SECTOR != 0 {
        return Err(format!("log length {} is not a positive multiple of 4 KiB", log.len()));
    }
    let n = log.len() as u64;
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    let mut scan_budget = 4 * n;
    for i in 0..n / SECTOR as u64 {
        let pos = i * SECTOR as u64;
        if let Some(e) = parse_entry(log, pos, guid, &mut scan_budget) {
            entries.insert(pos, e);
        }
    }
    // Candidate heads, newest first; a head is good if walking from its tail
    // reaches it through consecutive sequence numbers.
    let mut heads: Vec<(u64, u64)> = entries.iter().map(|(p, e)| (e.seq, *p)).collect();
    heads.sort_unstable_by(|a, b| b.cmp(a));
    let max_steps = (n / SECTOR as u64) as usize;
    let mut budget: u64 = 4 * 1024 * 1024;
    let mut active: Option<Vec<u64>> = None;
    for (_, head) in heads {
        let h = &entries[&head];
        let mut chain = Vec::new();
        let mut pos = h.tail;
        let mut prev_seq: Option<u64> = None;
        let mut ok = false;
        for _ in 0..max_steps {
            if budget == 0 {
                return Err("log is too convoluted to replay".into());
            }
            budget -= 1;
            let e = match entries.get(&pos) {
                Some(e) => e,
                None => break,
            };
            if prev_seq.is_some_and(|s| s.checked_add(1) != Some(e.seq)) {
                break;
            }
            chain.push(pos);
            if pos == head {
                ok = e.seq == h.seq;
                break;
            }
            prev_seq = Some(e.seq);
            pos = (pos + e.len) % n;
        }
        if ok {
            active = Some(chain);
            break;
        }
    }
    let chain = active.ok_or_else(|| "the log's LogGuid is set but no valid log sequence was found".to_string())?;
    let mut ov = Overlay { entries: chain.len(), ..Default::default() };
    let head = &entries[chain.last().expect("non-empty chain")];
    if head.flushed_file_offset > file_len {
        return Err(format!(
            "the file is {file_len} bytes, shorter than the log's flushed size {}",
            head.flushed_file_offset
        ));
    }
    ov.last_file_offset = head.last_file_offset;
    for pos in chain {
        let e = entries.remove(&pos).expect("entry in chain");
        for d in e.descs {
            match d {
                Desc::Data { off, sector } => ov.write(off, sector),
                Desc::Zero { off, len } => {
                    if len > 0 {
                        ov.zero(off, off + len)
                    }
                }
            }
        }
    }
    Ok(ov)
}

/// Builds one log entry: data sectors and zero ranges. `last` is both its
/// FlushedFileOffset and LastFileOffset (the file's size once flushed).
pub fn build_entry(
    guid: &Guid,
    seq: u64,
    tail: u32,
    data: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
    last: u64,
) -> Vec<u8> {
    let count = data.len() + zeros.len();
    let desc_sectors = (64 + 32 * count + SECTOR - 1) / SECTOR;
    let len = (desc_sectors + data.len()) * SECTOR;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    b[32..48].copy_from_slice(&guid.0);
    b[48..56].copy_from_slice(&last.to_le_bytes());
    b[56..64].copy_from_slice(&last.to_le_bytes());
    let mut i = 0;
    for (off, len) in zeros {
        let d = &mut b[64 + 32 * i..96 + 32 * i];
        d[0..4].copy_from_slice(b"zero");
        d[8..16].copy_from_slice(&len.to_le_bytes());
        d[16..24].copy_from_slice(&off.to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
        i += 1;
    }
    for (k, (off, sector)) in data.iter().enumerate() {
        let d = &mut b[64 + 32 * i..96 + 32 * i];
        d[0..4].copy_from_slice(b"desc");
        d[4..8].copy_from_slice(&sector[SECTOR - 4..]);
        d[8..16].copy_from_slice(&sector[0..8]);
        d[16..24].copy_from_slice(&off.to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
        i += 1;
        let s = &mut b[(desc_sectors + k) * SECTOR..(desc_sectors + k + 1) * SECTOR];
        s.copy_from_slice(sector);
        s[0..4].copy_from_slice(b"data");
        s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        s[SECTOR - 4..].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let c = super::crc32c::crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sector(v: u8) -> Vec<u8> {
        (0..SECTOR).map(|i| v.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn replays_the_newest_sequence_in_order() {
        let g = Guid::random();
        let mut log = vec![0u8; 64 * 1024];
        let e1 = build_entry(&g, 10, 0, &[(8192, sector(1))], &[], 1 << 20);
        let p2 = e1.len();
        let e2 = build_entry(&g, 11, 0, &[(8192, sector(2)), (4096, sector(3))], &[(16384, 8192)], 1 << 20);
        log[..e1.len()].copy_from_slice(&e1);
        log[p2..p2 + e2.len()].copy_from_slice(&e2);
        let ov = replay(&log, &g, 1 << 20).unwrap();
        assert_eq!(ov.entries, 2);
        let mut buf = vec![0xAAu8; 6 * SECTOR];
        ov.apply(&mut buf, 0);
        assert_eq!(&buf[..SECTOR], &[0xAA; SECTOR][..]);
        assert_eq!(&buf[SECTOR..2 * SECTOR], &sector(3)[..]);
        assert_eq!(&buf[2 * SECTOR..3 * SECTOR], &sector(2)[..]);
        assert_eq!(&buf[3 * SECTOR..4 * SECTOR], &[0xAA; SECTOR][..]);
        assert!(buf[4 * SECTOR..6 * SECTOR].iter().all(|b| *b == 0));
        // Another GUID: nothing valid.
        assert!(replay(&log, &Guid::random(), 1 << 20).is_err());
    }

    #[test]
    fn entry_wrapping_around_the_end() {
        let g = Guid::random();
        let mut log = vec![0u8; 16 * SECTOR];
        let e = build_entry(&g, 1, 14 * SECTOR as u32, &[(0, sector(9)), (SECTOR as u64, sector(8))], &[], 0);
        assert_eq!(e.len(), 3 * SECTOR);
        log[14 * SECTOR..].copy_from_slice(&e[..2 * SECTOR]);
        log[..SECTOR].copy_from_slice(&e[2 * SECTOR..]);
        let ov = replay(&log, &g, 0).unwrap();
        let mut buf = vec![0u8; 2 * SECTOR];
        ov.apply(&mut buf, 0);
        assert_eq!(&buf[SECTOR..], &sector(8)[..]);
    }

    #[test]
    fn zero_then_data_and_data_then_zero() {
        let mut ov = Overlay::default();
        ov.zero(0, 10 * SECTOR as u64);
        ov.write(4 * SECTOR as u64, vec![7u8; SECTOR].into_boxed_slice());
        ov.write(12 * SECTOR as u64, vec![5u8; SECTOR].into_boxed_slice());
        ov.zero(11 * SECTOR as u64, 13 * SECTOR as u64);
        let mut buf = vec![1u8; 14 * SECTOR];
        ov.apply(&mut buf, 0);
        for (i, c) in buf.chunks(SECTOR).enumerate() {
            let want = match i {
                4 => 7,
                0..=9 | 11 | 12 => 0,
                _ => 1,
            };
            assert!(c.iter().all(|b| *b == want), "sector {i}");
        }
        // Unaligned reads see the same bytes.
        let mut part = vec![1u8; 5000];
        ov.apply(&mut part, 4 * SECTOR as u64 - 100);
        assert_eq!(&part[..], &buf[4 * SECTOR - 100..4 * SECTOR + 4900]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hostile_logs_never_panic(edits in proptest::collection::vec((0usize..32 * SECTOR, any::<u64>()), 0..40),
                                    fix_crc in any::<bool>()) {
            let g = Guid::random();
            let mut log = vec![0u8; 32 * SECTOR];
            let e1 = build_entry(&g, 1, 0, &[(0, sector(1))], &[(8192, 1 << 40)], 1 << 30);
            let e2 = build_entry(&g, 2, 0, &[(4096, sector(2))], &[], 1 << 30);
            log[..e1.len()].copy_from_slice(&e1);
            log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
            for (at, v) in edits {
                let at = at.min(log.len() - 8);
                log[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            if fix_crc {
                // Re-checksum every entry-looking sector so edits reach the deeper checks.
                for p in (0..log.len()).step_by(SECTOR) {
                    if &log[p..p + 4] == b"loge" {
                        let len = le32(&log, p + 8) as usize;
                        if len > 0 && p + len <= log.len() {
                            let c = crc32c_with_zero_field(&log[p..p + len], 4);
                            log[p + 4..p + 8].copy_from_slice(&c.to_le_bytes());
                        }
                    }
                }
            }
            if let Ok(ov) = replay(&log, &g, 1 << 30) {
                let mut buf = vec![0u8; 3 * SECTOR];
                ov.apply(&mut buf, 0);
            }
        }

        #[test]
        fn cyclic_tails_terminate(tails in proptest::collection::vec(0u32..8, 8)) {
            // Eight one-sector entries whose tails point anywhere, sequence
            // numbers wrapping: replay must end, whatever it decides.
            let g = Guid::random();
            let mut log = vec![0u8; 8 * SECTOR];
            for (i, t) in tails.iter().enumerate() {
                let e = build_entry(&g, (i as u64 + 5) % 8, t * SECTOR as u32, &[], &[], 0);
                log[i * SECTOR..(i + 1) * SECTOR].copy_from_slice(&e);
            }
            let _ = replay(&log, &g, 0);
        }
    }
}
