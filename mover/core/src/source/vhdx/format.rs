//! The fixed structures of a VHDX file ([MS-VHDX] 2.2, 2.5, 2.6): file type
//! identifier, headers, region table, metadata table and items, BAT entries.
//! Parsers take bytes and return typed values or an error message; they never
//! trust a count or a length further than the bytes they were given.

use super::crc32c::{crc32c, crc32c_with_zero_field};
use super::guid::Guid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// `vhdxfile` at offset 0 (2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The two headers, 4 KiB each, at 64 KiB and 128 KiB (2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
/// The two region tables, 64 KiB each, at 192 KiB and 256 KiB (2.2.3).
pub const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
const REGION_MAX_ENTRIES: u32 = 2047;
const METADATA_MAX_ENTRIES: u16 = 2047;

/// Region GUIDs (2.2.3.2).
pub const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
pub const METADATA_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
/// Metadata item GUIDs (2.6.2).
pub const FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
pub const VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
pub const VIRTUAL_DISK_ID: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
pub const LOGICAL_SECTOR_SIZE: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
pub const PHYSICAL_SECTOR_SIZE: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
pub const PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";
/// The only parent locator type defined (2.6.2.6): a VHDX parent.
pub const VHDX_PARENT_LOCATOR_TYPE: &str = "B04AEFB7-D19E-4A81-B789-25B8E9445913";

/// Largest virtual disk the format allows (2.6.2.2: 64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;

/// Payload BAT entry states (2.5.1.1) and the sector bitmap one (2.5.1.2).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub const SB_PRESENT: u64 = 6;

pub fn guid(text: &str) -> Guid {
    Guid::parse(text).expect("constant GUID")
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// One of the two headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write: Guid,
    pub data_write: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

/// Parses a 4 KiB header; `Err` if its signature or checksum is wrong.
pub fn parse_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER_SIZE {
        return Err("header is truncated".into());
    }
    let b = &b[..HEADER_SIZE];
    if &b[0..4] != b"head" {
        return Err("header signature is not 'head'".into());
    }
    if le32(b, 4) != crc32c_with_zero_field(b, 4) {
        return Err("header checksum (CRC-32C) does not match".into());
    }
    Ok(Header {
        sequence: le64(b, 8),
        file_write: Guid::from_bytes(&b[16..32]),
        data_write: Guid::from_bytes(&b[32..48]),
        log_guid: Guid::from_bytes(&b[48..64]),
        log_version: le16(b, 64),
        version: le16(b, 66),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// The current header of two candidates: valid, with the larger sequence number.
pub fn current_header(a: Result<Header, String>, b: Result<Header, String>) -> Result<Header, String> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence { b } else { a }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(e1), Err(e2)) => Err(format!("neither header is valid (first: {e1}; second: {e2})")),
    }
}

pub fn build_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SIZE];
    b[0..4].copy_from_slice(b"head");
    b[8..16].copy_from_slice(&h.sequence.to_le_bytes());
    b[16..32].copy_from_slice(&h.file_write.0);
    b[32..48].copy_from_slice(&h.data_write.0);
    b[48..64].copy_from_slice(&h.log_guid.0);
    b[64..66].copy_from_slice(&h.log_version.to_le_bytes());
    b[66..68].copy_from_slice(&h.version.to_le_bytes());
    b[68..72].copy_from_slice(&h.log_length.to_le_bytes());
    b[72..80].copy_from_slice(&h.log_offset.to_le_bytes());
    let c = crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a 64 KiB region table.
pub fn parse_region_table(b: &[u8]) -> Result<Vec<Region>, String> {
    if b.len() < REGION_TABLE_SIZE {
        return Err("region table is truncated".into());
    }
    let b = &b[..REGION_TABLE_SIZE];
    if &b[0..4] != b"regi" {
        return Err("region table signature is not 'regi'".into());
    }
    if le32(b, 4) != crc32c_with_zero_field(b, 4) {
        return Err("region table checksum (CRC-32C) does not match".into());
    }
    let n = le32(b, 8);
    if n > REGION_MAX_ENTRIES {
        return Err(format!("region table has {n} entries (at most {REGION_MAX_ENTRIES})"));
    }
    Ok((0..n as usize)
        .map(|i| {
            let e = &b[16 + 32 * i..16 + 32 * (i + 1)];
            Region {
                guid: Guid::from_bytes(&e[0..16]),
                offset: le64(e, 16),
                length: le32(e, 24),
                required: le32(e, 28) & 1 != 0,
            }
        })
        .collect())
}

pub fn build_region_table(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let e = &mut b[16 + 32 * i..16 + 32 * (i + 1)];
        e[0..16].copy_from_slice(&r.guid.0);
        e[16..24].copy_from_slice(&r.offset.to_le_bytes());
        e[24..28].copy_from_slice(&r.length.to_le_bytes());
        e[28..32].copy_from_slice(&(r.required as u32).to_le_bytes());
    }
    let c = crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

/// What the metadata region says about the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub disk_id: Guid,
    /// Key/value pairs of a VHDX parent locator (differencing disks only).
    pub parent_locator: Vec<(String, String)>,
}

/// Parses the metadata region (`b` holds the whole region).
pub fn parse_metadata(b: &[u8]) -> Result<Metadata, String> {
    if b.len() < 32 || &b[0..8] != b"metadata" {
        return Err("metadata table signature is not 'metadata'".into());
    }
    let n = le16(b, 10);
    if n > METADATA_MAX_ENTRIES || 32 + 32 * n as usize > b.len().min(64 * 1024) {
        return Err(format!("metadata table has {n} entries, too many for its 64 KiB"));
    }
    let mut items: Vec<(Guid, &[u8], bool)> = Vec::new();
    for i in 0..n as usize {
        let e = &b[32 + 32 * i..64 + 32 * i];
        let id = Guid::from_bytes(&e[0..16]);
        let (off, len, flags) = (le32(e, 16) as usize, le32(e, 20) as usize, le32(e, 24));
        if items.iter().any(|(g, _, _)| *g == id) {
            return Err(format!("metadata item {id} appears twice"));
        }
        let data: &[u8] = if len == 0 {
            &[]
        } else {
            if off < 64 * 1024 {
                return Err(format!("metadata item {id} overlaps the metadata table"));
            }
            off.checked_add(len).and_then(|end| b.get(off..end)).ok_or_else(|| {
                format!("metadata item {id} ({off}+{len}) lies outside the metadata region ({} bytes)", b.len())
            })?
        };
        items.push((id, data, flags & 4 != 0));
    }
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        VIRTUAL_DISK_ID,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ]
    .iter()
    .map(|g| guid(g))
    .collect::<Vec<_>>();
    if let Some((id, _, _)) = items.iter().find(|(g, _, req)| *req && !known.contains(g)) {
        return Err(format!("metadata item {id} is required but unknown to this reader"));
    }
    let item = |g: &str, min: usize| -> Result<&[u8], String> {
        let g = guid(g);
        match items.iter().find(|(id, _, _)| *id == g) {
            Some((_, d, _)) if d.len() >= min => Ok(d),
            Some(_) => Err(format!("metadata item {g} is too short")),
            None => Err(format!("metadata item {g} is missing")),
        }
    };
    let fp = item(FILE_PARAMETERS, 8)?;
    let block_size = le32(fp, 0);
    let flags = le32(fp, 4);
    if !(MIB..=256 * MIB).contains(&(block_size as u64)) || !block_size.is_power_of_two() {
        return Err(format!("block size {block_size} is not a power of two between 1 MiB and 256 MiB"));
    }
    let virtual_size = le64(item(VIRTUAL_DISK_SIZE, 8)?, 0);
    let logical_sector = le32(item(LOGICAL_SECTOR_SIZE, 4)?, 0);
    let physical_sector = le32(item(PHYSICAL_SECTOR_SIZE, 4)?, 0);
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(format!("logical sector size {logical_sector} is neither 512 nor 4096"));
    }
    if physical_sector != 512 && physical_sector != 4096 {
        return Err(format!("physical sector size {physical_sector} is neither 512 nor 4096"));
    }
    if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % logical_sector as u64 != 0 {
        return Err(format!(
            "virtual disk size {virtual_size} is not a multiple of the {logical_sector}-byte sector up to 64 TiB"
        ));
    }
    let disk_id = item(VIRTUAL_DISK_ID, 16).map(Guid::from_bytes).unwrap_or_default();
    let has_parent = flags & 2 != 0;
    let parent_locator = if has_parent { parse_parent_locator(item(PARENT_LOCATOR, 20)?)? } else { Vec::new() };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector,
        physical_sector,
        disk_id,
        parent_locator,
    })
}

fn utf16le(b: &[u8]) -> Option<String> {
    if b.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = b.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    String::from_utf16(&units).ok()
}

/// Parses a parent locator item (2.6.2.6): a type GUID, then key/value
/// entries pointing at UTF-16LE strings inside the item.
pub fn parse_parent_locator(b: &[u8]) -> Result<Vec<(String, String)>, String> {
    if Guid::from_bytes(&b[0..16]) != guid(VHDX_PARENT_LOCATOR_TYPE) {
        return Err(format!("parent locator type {} is not the VHDX one", Guid::from_bytes(&b[0..16])));
    }
    let n = le16(b, 18) as usize;
    if 20 + 12 * n > b.len() {
        return Err(format!("parent locator claims {n} entries, more than it holds"));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = &b[20 + 12 * i..32 + 12 * i];
        let (ko, vo, kl, vl) = (le32(e, 0) as usize, le32(e, 4) as usize, le16(e, 8) as usize, le16(e, 10) as usize);
        let get = |o: usize, l: usize| o.checked_add(l).and_then(|end| b.get(o..end)).and_then(utf16le);
        match (get(ko, kl), get(vo, vl)) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => return Err(format!("parent locator entry {i} is outside the item or not UTF-16")),
        }
    }
    Ok(out)
}

/// Payload blocks per sector bitmap block (2.5: 2^23 sectors per bitmap).
pub fn chunk_ratio(logical_sector: u32, block_size: u32) -> u64 {
    ((1u64 << 23) * logical_sector as u64) / block_size as u64
}

/// BAT index of payload block `b`: every `ratio` payload entries are followed
/// by one sector bitmap entry.
pub fn payload_index(b: u64, ratio: u64) -> u64 {
    b + b / ratio
}

/// Number of BAT entries a disk needs (2.5.1).
pub fn bat_entries(virtual_size: u64, block_size: u32, ratio: u64, differencing: bool) -> u64 {
    let blocks = (virtual_size + block_size as u64 - 1) / block_size as u64;
    let chunks = (blocks + ratio - 1) / ratio;
    if differencing {
        chunks * (ratio + 1)
    } else if blocks == 0 {
        0
    } else {
        blocks + (blocks - 1) / ratio
    }
}

/// Metadata region bytes for the writer (1 MiB: table, then items at 64 KiB).
pub fn build_metadata(m: &Metadata) -> Vec<u8> {
    let mut b = vec![0u8; MIB as usize];
    b[0..8].copy_from_slice(b"metadata");
    let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (
            guid(FILE_PARAMETERS),
            {
                let mut v = m.block_size.to_le_bytes().to_vec();
                v.extend_from_slice(&((m.leave_blocks_allocated as u32) | ((m.has_parent as u32) << 1)).to_le_bytes());
                v
            },
            4,
        ),
        (guid(VIRTUAL_DISK_SIZE), m.virtual_size.to_le_bytes().to_vec(), 2 | 4),
        (guid(VIRTUAL_DISK_ID), m.disk_id.0.to_vec(), 2 | 4),
        (guid(LOGICAL_SECTOR_SIZE), m.logical_sector.to_le_bytes().to_vec(), 2 | 4),
        (guid(PHYSICAL_SECTOR_SIZE), m.physical_sector.to_le_bytes().to_vec(), 2 | 4),
    ];
    if m.has_parent {
        items.push((guid(PARENT_LOCATOR), build_parent_locator(&m.parent_locator), 4));
    }
    b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut off = 64 * 1024usize;
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let e = &mut b[32 + 32 * i..64 + 32 * i];
        e[0..16].copy_from_slice(&id.0);
        e[16..20].copy_from_slice(&(off as u32).to_le_bytes());
        e[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        e[24..28].copy_from_slice(&flags.to_le_bytes());
        b[off..off + data.len()].copy_from_slice(data);
        off += (data.len() + 7) / 8 * 8;
    }
    b
}

pub fn build_parent_locator(kv: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * kv.len()];
    b[0..16].copy_from_slice(&guid(VHDX_PARENT_LOCATOR_TYPE).0);
    b[18..20].copy_from_slice(&(kv.len() as u16).to_le_bytes());
    let enc = |s: &str| s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect::<Vec<u8>>();
    for (i, (k, v)) in kv.iter().enumerate() {
        let (k, v) = (enc(k), enc(v));
        let ko = b.len();
        b.extend_from_slice(&k);
        let vo = b.len();
        b.extend_from_slice(&v);
        let e = &mut b[20 + 12 * i..32 + 12 * i];
        e[0..4].copy_from_slice(&(ko as u32).to_le_bytes());
        e[4..8].copy_from_slice(&(vo as u32).to_le_bytes());
        e[8..10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        e[10..12].copy_from_slice(&(v.len() as u16).to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Metadata {
        Metadata {
            block_size: 32 * MIB as u32,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 10 * 1024 * MIB,
            logical_sector: 512,
            physical_sector: 4096,
            disk_id: Guid::random(),
            parent_locator: vec![
                ("parent_linkage".into(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}".into()),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
        }
    }

    #[test]
    fn metadata_roundtrip() {
        let m = sample();
        assert_eq!(parse_metadata(&build_metadata(&m)), Ok(m));
    }

    #[test]
    fn header_pick_by_sequence() {
        let mut h = Header {
            sequence: 5,
            file_write: Guid::random(),
            data_write: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let a = build_header(&h);
        h.sequence = 6;
        let b = build_header(&h);
        assert_eq!(current_header(parse_header(&a), parse_header(&b)).unwrap().sequence, 6);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(current_header(parse_header(&a), parse_header(&bad)).unwrap().sequence, 5);
        assert!(current_header(parse_header(&bad), parse_header(&bad)).is_err());
    }

    #[test]
    fn bat_geometry() {
        // 512-byte sectors, 32 MiB blocks: 128 payload blocks per bitmap.
        assert_eq!(chunk_ratio(512, 32 << 20), 128);
        assert_eq!(chunk_ratio(4096, 1 << 20), 32768);
        assert_eq!(payload_index(128, 128), 129);
        assert_eq!(bat_entries(129 * (32 << 20), 32 << 20, 128, false), 130);
        assert_eq!(bat_entries(128 * (32 << 20), 32 << 20, 128, false), 128);
        assert_eq!(bat_entries(1, 32 << 20, 128, true), 129);
    }

    proptest! {
        #[test]
        fn header_parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..4200), fix in any::<bool>()) {
            let mut b = b;
            if fix && b.len() >= HEADER_SIZE {
                b[0..4].copy_from_slice(b"head");
                let c = crc32c_with_zero_field(&b[..HEADER_SIZE], 4);
                b[4..8].copy_from_slice(&c.to_le_bytes());
                prop_assert!(parse_header(&b).is_ok());
            }
            let _ = parse_header(&b);
        }

        #[test]
        fn region_table_never_panics(count in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            b[0..4].copy_from_slice(b"regi");
            b[8..12].copy_from_slice(&count.to_le_bytes());
            b[16..16 + body.len()].copy_from_slice(&body);
            let c = crc32c_with_zero_field(&b, 4);
            b[4..8].copy_from_slice(&c.to_le_bytes());
            let r = parse_region_table(&b);
            prop_assert_eq!(r.is_ok(), count <= REGION_MAX_ENTRIES);
        }

        #[test]
        fn metadata_never_panics(edits in proptest::collection::vec((0usize..(64 * 1024 + 400), any::<u32>()), 1..20)) {
            let mut b = build_metadata(&sample());
            for (at, v) in edits {
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            if let Ok(m) = parse_metadata(&b) {
                prop_assert!(m.virtual_size <= MAX_VIRTUAL_SIZE);
                prop_assert!(m.block_size.is_power_of_two());
            }
        }

        #[test]
        fn parent_locator_never_panics(b in proptest::collection::vec(any::<u8>(), 20..600), n in any::<u16>()) {
            let mut b = b;
            b[0..16].copy_from_slice(&guid(VHDX_PARENT_LOCATOR_TYPE).0);
            b[18..20].copy_from_slice(&n.to_le_bytes());
            let _ = parse_parent_locator(&b);
        }
    }
}
