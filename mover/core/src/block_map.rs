//! A disk's block map: the chunk id of every block, kept compact.
//!
//! Only non-zero blocks take memory (an index and a chunk id each), so a
//! 64 TiB disk with a few MiB of data costs a few entries, not the gigabyte a
//! dense array of ids would. On disk (manifest version 2, docs/format.md
//! §5.2) a map is a sequence of runs: a run of zero blocks is 9 bytes however
//! long, a run of stored blocks is 9 bytes plus 16 per block.

use crate::chunk::ChunkId;

/// Run tags of the on-disk encoding.
pub const RUN_ZERO: u8 = 0;
pub const RUN_IDS: u8 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    blocks: u64,
    /// Non-zero blocks, ascending by index.
    entries: Vec<(u64, ChunkId)>,
}

impl BlockMap {
    /// A map of `blocks` zero blocks.
    pub fn zeros(blocks: u64) -> BlockMap {
        BlockMap { blocks, entries: Vec::new() }
    }

    /// A map from one id per block.
    pub fn from_ids(ids: &[ChunkId]) -> BlockMap {
        let entries = ids.iter().enumerate().filter(|(_, c)| !c.is_zero()).map(|(i, c)| (i as u64, *c)).collect();
        BlockMap { blocks: ids.len() as u64, entries }
    }

    /// Number of blocks (zero blocks included).
    pub fn len(&self) -> u64 {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// The chunk id of block `i` (the all-zero id for a zero block or past the end).
    pub fn get(&self, i: u64) -> ChunkId {
        match self.entries.binary_search_by_key(&i, |e| e.0) {
            Ok(k) => self.entries[k].1,
            Err(_) => ChunkId::ZERO,
        }
    }

    /// Sets block `i` (which must be below `len()`). Cheap when blocks are set
    /// in roughly ascending order, as the backup pipeline does.
    pub fn set(&mut self, i: u64, id: ChunkId) {
        assert!(i < self.blocks, "block {i} past the end of a map of {}", self.blocks);
        if self.entries.last().is_none_or(|e| e.0 < i) {
            if !id.is_zero() {
                self.entries.push((i, id));
            }
            return;
        }
        match (self.entries.binary_search_by_key(&i, |e| e.0), id.is_zero()) {
            (Ok(k), true) => {
                self.entries.remove(k);
            }
            (Ok(k), false) => self.entries[k].1 = id,
            (Err(_), true) => {}
            (Err(k), false) => self.entries.insert(k, (i, id)),
        }
    }

    /// The non-zero blocks, ascending: (block index, chunk id).
    pub fn stored(&self) -> impl Iterator<Item = (u64, ChunkId)> + '_ {
        self.entries.iter().copied()
    }

    /// Number of non-zero blocks.
    pub fn stored_count(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn zero_count(&self) -> u64 {
        self.blocks - self.stored_count()
    }

    /// Appends the version-2 encoding (runs) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut pos = 0u64;
        let mut k = 0;
        while pos < self.blocks {
            match self.entries.get(k) {
                Some(&(i, _)) if i == pos => {
                    let mut end = k;
                    while end < self.entries.len() && self.entries[end].0 == pos + (end - k) as u64 {
                        end += 1;
                    }
                    out.push(RUN_IDS);
                    out.extend_from_slice(&((end - k) as u64).to_le_bytes());
                    for e in &self.entries[k..end] {
                        out.extend_from_slice(&e.1 .0);
                    }
                    pos += (end - k) as u64;
                    k = end;
                }
                next => {
                    let upto = next.map_or(self.blocks, |e| e.0);
                    out.push(RUN_ZERO);
                    out.extend_from_slice(&(upto - pos).to_le_bytes());
                    pos = upto;
                }
            }
        }
    }

    /// Decodes `blocks` blocks of runs from the start of `data`; returns the
    /// map and the number of bytes used. Rejects an empty run, an all-zero id
    /// in a run of stored blocks, an unknown tag, and runs that do not add up
    /// to exactly `blocks`.
    pub fn decode_runs(data: &[u8], blocks: u64) -> std::result::Result<(BlockMap, usize), String> {
        let mut map = BlockMap::zeros(blocks);
        let mut pos = 0u64;
        let mut at = 0usize;
        while pos < blocks {
            let head = data.get(at..at + 9).ok_or("truncated run")?;
            let n = u64::from_le_bytes(head[1..9].try_into().unwrap());
            at += 9;
            if n == 0 || n > blocks - pos {
                return Err(format!("run of {n} blocks at block {pos} does not fit the disk's {blocks}"));
            }
            match head[0] {
                RUN_ZERO => {}
                RUN_IDS => {
                    let len = usize::try_from(n).ok().and_then(|n| n.checked_mul(16)).ok_or("run too long")?;
                    let end = at.checked_add(len).ok_or("run too long")?;
                    let ids = data.get(at..end).ok_or("truncated run of chunk ids")?;
                    for (j, c) in ids.chunks_exact(16).enumerate() {
                        let id = ChunkId(c.try_into().unwrap());
                        if id.is_zero() {
                            return Err(format!("block {} in a run of stored blocks has the zero id", pos + j as u64));
                        }
                        map.entries.push((pos + j as u64, id));
                    }
                    at += len;
                }
                t => return Err(format!("unknown run tag {t}")),
            }
            pos += n;
        }
        Ok((map, at))
    }

    /// Decodes a version-1 dense map: `blocks` ids of 16 bytes.
    pub fn decode_dense(data: &[u8]) -> BlockMap {
        let mut map = BlockMap::zeros((data.len() / 16) as u64);
        for (i, c) in data.chunks_exact(16).enumerate() {
            let id = ChunkId(c.try_into().unwrap());
            if !id.is_zero() {
                map.entries.push((i as u64, id));
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dense(ids: &[u8]) -> Vec<ChunkId> {
        ids.iter().map(|b| if *b == 0 { ChunkId::ZERO } else { ChunkId([*b; 16]) }).collect()
    }

    #[test]
    fn zero_runs_cost_nine_bytes() {
        let mut m = BlockMap::zeros(64 << 20);
        m.set(5, ChunkId([1; 16]));
        m.set(40 << 20, ChunkId([2; 16]));
        let mut out = Vec::new();
        m.encode_into(&mut out);
        // zero run, one id, zero run, one id, zero run
        assert_eq!(out.len(), 9 * 5 + 32);
        assert_eq!(BlockMap::decode_runs(&out, 64 << 20).unwrap(), (m, out.len()));
    }

    #[test]
    fn decode_rejects_bad_runs() {
        let mut ok = Vec::new();
        BlockMap::from_ids(&dense(&[0, 1, 1, 0])).encode_into(&mut ok);
        assert!(BlockMap::decode_runs(&ok, 5).is_err(), "runs short of the disk");
        // Fewer blocks: the last run is left over (the manifest then refuses the bytes).
        assert_ne!(BlockMap::decode_runs(&ok, 3).map(|r| r.1), Ok(ok.len()), "runs past the disk");
        let mut long = vec![RUN_ZERO];
        long.extend_from_slice(&5u64.to_le_bytes());
        assert!(BlockMap::decode_runs(&long, 4).is_err(), "one run past the disk");
        let mut empty = vec![RUN_ZERO];
        empty.extend_from_slice(&0u64.to_le_bytes());
        assert!(BlockMap::decode_runs(&empty, 1).is_err(), "empty run");
        let mut zero_id = vec![RUN_IDS];
        zero_id.extend_from_slice(&1u64.to_le_bytes());
        zero_id.extend_from_slice(&[0; 16]);
        assert!(BlockMap::decode_runs(&zero_id, 1).is_err(), "zero id in a run of ids");
        let mut tag = vec![7];
        tag.extend_from_slice(&1u64.to_le_bytes());
        assert!(BlockMap::decode_runs(&tag, 1).is_err(), "unknown tag");
    }

    proptest! {
        #[test]
        fn set_get_and_encoding_agree_with_a_dense_array(
            n in 0u64..200,
            writes in prop::collection::vec((0u64..200, 0u8..4), 0..300),
        ) {
            let mut m = BlockMap::zeros(n);
            let mut d = vec![ChunkId::ZERO; n as usize];
            for (i, b) in writes {
                if i < n {
                    let id = dense(&[b])[0];
                    m.set(i, id);
                    d[i as usize] = id;
                }
            }
            prop_assert_eq!(&m, &BlockMap::from_ids(&d));
            for (i, id) in d.iter().enumerate() {
                prop_assert_eq!(m.get(i as u64), *id);
            }
            let mut out = Vec::new();
            m.encode_into(&mut out);
            prop_assert_eq!(BlockMap::decode_runs(&out, n).unwrap(), (m, out.len()));
        }

        #[test]
        fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..200), n in 0u64..1000) {
            let _ = BlockMap::decode_runs(&data, n);
        }
    }
}
