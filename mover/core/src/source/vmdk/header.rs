//! The hosted sparse extent header (VMware "Virtual Disk Format 1.1", section
//! "Hosted Sparse Extent Header"): 512 little-endian bytes at sector 0 of a
//! monolithicSparse, twoGbMaxExtentSparse or streamOptimized extent, and
//! again as the footer of a streamOptimized extent whose header says
//! `gdOffset = GD_AT_END`. Also the stream markers of streamOptimized files.

/// Every offset and size in the format counts 512-byte sectors.
pub const SECTOR: u64 = 512;
/// `KDMV`, the magic number 0x564d444b stored little-endian.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// gdOffset of a streamOptimized header whose grain directory is at the end.
pub const GD_AT_END: u64 = u64::MAX;
/// Flag bits (the specification's `flags` field).
pub const FLAG_VALID_NEWLINE_TEST: u32 = 1;
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;
/// compressAlgorithm 1: deflate (a zlib stream in practice).
pub const COMPRESS_DEFLATE: u16 = 1;
/// The specification fixes numGTEsPerGT at 512; qemu refuses more. The cap
/// bounds what one grain table costs in memory.
pub const MAX_GTES_PER_GT: u32 = 512;
/// Real grains are 64 KiB (128 sectors), at most 1 MiB on VMFS; 32 MiB is far
/// above any genuine file and bounds the buffer one compressed grain needs.
pub const MAX_GRAIN_SECTORS: u64 = 1 << 16;
/// Stream marker types (the `type` field of a metadata marker).
pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Sectors of the extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub num_gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    pub unclean_shutdown: bool,
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl SparseHeader {
    /// Decodes the fields of a header sector; checks only the magic number.
    pub fn parse(b: &[u8]) -> Result<SparseHeader, String> {
        if b.len() < SECTOR as usize {
            return Err(format!("the sparse header needs 512 bytes, the file has {}", b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err("no sparse extent header (magic KDMV)".into());
        }
        Ok(SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    /// Encodes the header as one sector, with the newline-detection bytes
    /// that let VMware tools notice a file mangled by a text-mode transfer.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean_shutdown as u8;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Checks the numbers that size allocations and loops, so that nothing
    /// later can overflow or allocate more than the file could justify.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=3).contains(&self.version) {
            return Err(format!("sparse header version {} is not 1, 2 or 3", self.version));
        }
        if self.grain_size == 0 || !self.grain_size.is_power_of_two() || self.grain_size > MAX_GRAIN_SECTORS {
            return Err(format!(
                "grain size {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                self.grain_size
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > MAX_GTES_PER_GT {
            return Err(format!(
                "{} entries per grain table is not between 1 and {MAX_GTES_PER_GT}",
                self.num_gtes_per_gt
            ));
        }
        if self.capacity.checked_mul(SECTOR).is_none() {
            return Err(format!("capacity {} sectors overflows 64 bits of bytes", self.capacity));
        }
        if self.compressed() && self.compress_algorithm != COMPRESS_DEFLATE {
            return Err(format!("compression algorithm {} is not deflate (1)", self.compress_algorithm));
        }
        Ok(())
    }

    /// Grains of the extent (the last one may reach past the capacity).
    pub fn grains(&self) -> u64 {
        self.capacity / self.grain_size + (self.capacity % self.grain_size != 0) as u64
    }

    /// Entries of the grain directory.
    pub fn gd_entries(&self) -> u64 {
        let per = self.num_gtes_per_gt as u64;
        self.grains() / per + (self.grains() % per != 0) as u64
    }
}

/// A stream marker: `value` (a sector count or an lba), `size` (bytes of
/// compressed data for a grain marker, 0 for a metadata marker) and `kind`.
pub fn marker(value: u64, size: u32, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&value.to_le_bytes());
    b[8..12].copy_from_slice(&size.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: 3,
            capacity: 204800,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 38,
            overhead: 128,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
        assert!(h.validate().is_ok());
        assert_eq!(h.grains(), 1600);
        assert_eq!(h.gd_entries(), 4);
    }

    #[test]
    fn refuses_absurd_numbers() {
        let mut h = sample();
        h.capacity = u64::MAX;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.grain_size = 0;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.grain_size = 3;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.num_gtes_per_gt = u32::MAX;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.version = 7;
        assert!(h.validate().is_err());
        assert!(SparseHeader::parse(&[0u8; 100]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panic(mut b in prop::collection::vec(any::<u8>(), 0..600)) {
            if b.len() >= 4 { b[0..4].copy_from_slice(MAGIC); }
            if let Ok(h) = SparseHeader::parse(&b) {
                if h.validate().is_ok() {
                    // Valid numbers never overflow the derived counts.
                    let _ = h.gd_entries();
                    prop_assert!(h.capacity.checked_mul(SECTOR).is_some());
                }
            }
        }
    }
}
