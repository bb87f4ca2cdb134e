//! Byte extents (`start`, `length`) and their mapping onto fixed-size blocks.
//!
//! vSphere's `QueryChangedDiskAreas` and `SEEK_DATA`/`SEEK_HOLE` both describe a
//! disk as byte ranges; the repository thinks in blocks of `chunk_size` bytes
//! aligned to offset 0. These functions convert between the two.

use crate::error::{Error, Result};

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
}

impl Extent {
    pub fn new(start: u64, length: u64) -> Self {
        Extent { start, length }
    }
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// Sorts, drops empty extents and merges overlapping or touching ones.
/// Fails if an extent overflows 64 bits or reaches past `disk_size`.
pub fn normalize(extents: &[Extent], disk_size: u64) -> Result<Vec<Extent>> {
    let mut v: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        if e.length == 0 {
            continue;
        }
        let end = e
            .start
            .checked_add(e.length)
            .ok_or_else(|| Error::InvalidInput(format!("extent {}+{} overflows", e.start, e.length)))?;
        if end > disk_size {
            return Err(Error::InvalidInput(format!(
                "extent {}+{} reaches past the end of the disk ({} bytes)",
                e.start, e.length, disk_size
            )));
        }
        v.push(*e);
    }
    v.sort();
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if e.start <= last.end() => {
                let end = last.end().max(e.end());
                last.length = end - last.start;
            }
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// The bytes in both `a` and `b` (each normalized), normalized.
pub fn intersect(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end().min(b[j].end());
        if start < end {
            out.push(Extent::new(start, end - start));
        }
        // The one that ends first cannot overlap anything further.
        if a[i].end() <= b[j].end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Number of blocks of `block_size` needed for `disk_size` bytes.
pub fn block_count(disk_size: u64, block_size: u64) -> u64 {
    disk_size / block_size + u64::from(disk_size % block_size != 0)
}

/// Length of block `index` (the last block of a disk may be shorter).
pub fn block_len(index: u64, disk_size: u64, block_size: u64) -> u64 {
    let start = index * block_size;
    (disk_size - start).min(block_size)
}

/// Marks, in a bitmap of `block_count(disk_size)` entries, every block that
/// overlaps one of the (normalized) extents.
pub fn blocks_touched(extents: &[Extent], disk_size: u64, block_size: u64) -> Vec<bool> {
    let n = block_count(disk_size, block_size) as usize;
    let mut touched = vec![false; n];
    for e in extents {
        if e.length == 0 {
            continue;
        }
        let first = (e.start / block_size) as usize;
        let last = ((e.end() - 1) / block_size) as usize;
        for t in touched.iter_mut().take(last.min(n.saturating_sub(1)) + 1).skip(first) {
            *t = true;
        }
    }
    touched
}

/// The blocks that overlap (normalized) extents, as ascending, disjoint,
/// half-open ranges of block indices: memory grows with the number of
/// extents, not with the disk (a bitmap of a 64 TiB disk is 64 MiB).
#[derive(Clone, Debug, Default)]
pub struct BlockRanges {
    ranges: Vec<(u64, u64)>,
    /// Cursor for `contains` with ascending queries.
    at: usize,
}

impl BlockRanges {
    pub fn new(extents: &[Extent], disk_size: u64, block_size: u64) -> BlockRanges {
        let n = block_count(disk_size, block_size);
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for e in extents.iter().filter(|e| e.length > 0) {
            let first = e.start / block_size;
            let end = ((e.end() - 1) / block_size + 1).min(n);
            if first >= end {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if first <= last.1 => last.1 = last.1.max(end),
                _ => ranges.push((first, end)),
            }
        }
        BlockRanges { ranges, at: 0 }
    }

    /// Whether block `i` is in a range; fastest when `i` only grows between calls.
    pub fn contains(&mut self, i: u64) -> bool {
        if self.at > 0 && self.ranges.get(self.at - 1).is_some_and(|r| i < r.1) {
            self.at = 0;
        }
        while self.at < self.ranges.len() && self.ranges[self.at].1 <= i {
            self.at += 1;
        }
        self.ranges.get(self.at).is_some_and(|r| r.0 <= i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_touched(ext: &[Extent], disk: u64, bs: u64) -> Vec<bool> {
        let n = block_count(disk, bs);
        (0..n)
            .map(|i| {
                let (s, e) = (i * bs, i * bs + block_len(i, disk, bs));
                ext.iter().any(|x| x.length > 0 && x.start < e && s < x.end())
            })
            .collect()
    }

    proptest! {
        #[test]
        fn block_ranges_equal_the_bitmap(raw in prop::collection::vec((0u64..5000, 0u64..700), 0..40), bs in 1u64..900) {
            let disk = 6000u64;
            let ext: Vec<Extent> = raw.iter().map(|(s, l)| Extent::new(*s, *l.min(&(disk - s)))).collect();
            let norm = normalize(&ext, disk).unwrap();
            let bitmap = blocks_touched(&norm, disk, bs);
            let mut ranges = BlockRanges::new(&norm, disk, bs);
            for (i, b) in bitmap.iter().enumerate() {
                prop_assert_eq!(ranges.contains(i as u64), *b, "block {}", i);
            }
            prop_assert_eq!(ranges.contains(0), bitmap.first().copied().unwrap_or(false));
        }

        #[test]
        fn normalize_preserves_coverage(raw in prop::collection::vec((0u64..5000, 0u64..700), 0..40)) {
            let disk = 6000u64;
            let ext: Vec<Extent> = raw.iter().map(|(s, l)| Extent::new(*s, *l.min(&(disk - s)))).collect();
            let norm = normalize(&ext, disk).unwrap();
            for w in norm.windows(2) {
                prop_assert!(w[0].end() < w[1].start, "not merged: {:?}", w);
            }
            for b in 0..disk {
                let a = ext.iter().any(|e| e.start <= b && b < e.end());
                let n = norm.iter().any(|e| e.start <= b && b < e.end());
                prop_assert_eq!(a, n, "byte {}", b);
            }
        }

        #[test]
        fn touched_matches_model(raw in prop::collection::vec((0u64..10_000, 0u64..3000), 0..20),
                                 disk in 1u64..10_000, bs in prop::sample::select(vec![512u64, 1000, 4096])) {
            let ext: Vec<Extent> = raw.iter().filter(|(s, _)| *s < disk)
                .map(|(s, l)| Extent::new(*s, (*l).min(disk - s))).collect();
            let norm = normalize(&ext, disk).unwrap();
            prop_assert_eq!(blocks_touched(&norm, disk, bs), model_touched(&ext, disk, bs));
        }

        #[test]
        fn intersect_matches_bytes(ra in prop::collection::vec((0u64..2000, 0u64..300), 0..12),
                                   rb in prop::collection::vec((0u64..2000, 0u64..300), 0..12)) {
            let disk = 2300u64;
            let a = normalize(&ra.iter().map(|(s, l)| Extent::new(*s, *l)).collect::<Vec<_>>(), disk).unwrap();
            let b = normalize(&rb.iter().map(|(s, l)| Extent::new(*s, *l)).collect::<Vec<_>>(), disk).unwrap();
            let both = intersect(&a, &b);
            prop_assert_eq!(normalize(&both, disk).unwrap(), both.clone());
            for x in 0..disk {
                let inside = |v: &[Extent]| v.iter().any(|e| e.start <= x && x < e.end());
                prop_assert_eq!(inside(&both), inside(&a) && inside(&b), "byte {}", x);
            }
        }

        #[test]
        fn block_lengths_sum_to_disk(disk in 1u64..1_000_000, bs in 1u64..70_000) {
            let total: u64 = (0..block_count(disk, bs)).map(|i| block_len(i, disk, bs)).sum();
            prop_assert_eq!(total, disk);
        }
    }

    #[test]
    fn rejects_past_end_and_overflow() {
        assert!(normalize(&[Extent::new(10, 10)], 15).is_err());
        assert!(normalize(&[Extent::new(u64::MAX, 2)], u64::MAX).is_err());
        assert_eq!(normalize(&[Extent::new(5, 0)], 1).unwrap(), vec![]);
    }
}
