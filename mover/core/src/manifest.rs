//! The `.tib` manifest: one backup point (a VM at a point in time).
//!
//! Layout (all integers little-endian; see docs/format.md):
//!
//! | bytes            | content                                              |
//! |------------------|------------------------------------------------------|
//! | 8                | magic `VMBKTIB\0`                                    |
//! | 4                | format version (2; version 1 is still read)          |
//! | 4                | reserved, zero                                       |
//! | 8                | length M of the metadata                             |
//! | M                | metadata, UTF-8 JSON (`Metadata` below)              |
//! | runs, per disk in metadata order | block map (`block_map.rs`; v1: 16 bytes a block) |
//! | 16               | XXH3-128 (canonical big-endian) of every byte before |
//!
//! Encrypted repositories write version 3 (`encode_sealed`): the metadata
//! sealed with the manifest key, the disks' block counts and block maps in
//! the clear (keyed ids reveal no content; verify without the key needs
//! them), the AEAD's associated data covering every other byte of the file,
//! so that no byte of a sealed manifest can change unnoticed by a key holder.
//! An encrypted repository reads only version 3; others never read it.
//!
//! Every manifest holds the complete block map of every disk: a backup is
//! logically full even when it was made incrementally, so restore never walks
//! a chain and deleting a backup never touches another.

use crate::block_map::BlockMap;
use crate::crypto::Sealer;
use crate::error::{Error, Result};
use crate::extents::block_count;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use xxhash_rust::xxh3::xxh3_128;

pub const MANIFEST_MAGIC: &[u8; 8] = b"VMBKTIB\0";
/// The version this code writes: block maps as runs (`block_map.rs`).
pub const MANIFEST_VERSION: u32 = 2;
/// The first version (dense block maps, 16 bytes a block), still read.
pub const MANIFEST_VERSION_DENSE: u32 = 1;
/// Sealed manifests of encrypted repositories (docs/format.md §5.5).
pub const MANIFEST_VERSION_SEALED: u32 = 3;
const HEADER_LEN: usize = 24;
/// Metadata larger than this is refused as corrupt (a VM config is kilobytes).
const MAX_METADATA: u64 = 64 * 1024 * 1024;
/// A manifest larger than this is refused as corrupt: 4 GiB of block map is
/// 256 million blocks, a 64 TiB disk at the smallest chunk size.
const MAX_MANIFEST: u64 = 4 << 30;

/// What happened to one disk during its backup.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the chunk store (compressed chunk files).
    pub bytes_stored: u64,
    /// Chunks written by this backup.
    pub new_chunks: u64,
    /// Non-zero blocks whose chunk was already in the repository.
    pub reused_chunks: u64,
    /// Blocks that are all zeros (holes included): no chunk stored.
    pub zero_blocks: u64,
    /// Blocks taken from the parent's block map without reading (CBT).
    pub parent_blocks: u64,
    /// Bytes skipped because the source reported them unallocated.
    pub bytes_skipped: u64,
    /// Wall-clock seconds spent on the disk.
    pub seconds: f64,
}

/// One disk of a backup point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskMeta {
    pub name: String,
    pub size: u64,
    pub blocks: u64,
    /// `full` (every block read), `allocated` (holes skipped) or `changed`
    /// (only changed extents read, the rest from the parent).
    pub mode: String,
    pub source: String,
    pub source_format: String,
    #[serde(default)]
    pub change_id: Option<String>,
    #[serde(flatten)]
    pub stats: DiskStats,
}

/// The JSON metadata of a manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub id: String,
    pub vm: String,
    pub created: String,
    pub created_unix: f64,
    #[serde(default)]
    pub parent: Option<String>,
    pub repository: String,
    pub chunk_size: u64,
    pub disks: Vec<DiskMeta>,
    /// The VM's configuration as the hypervisor described it (opaque here).
    #[serde(default)]
    pub config: serde_json::Value,
    /// Anything else the orchestrator records: consistency, transport, ...
    #[serde(default)]
    pub attributes: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub meta: Metadata,
    /// One block map per disk, in `meta.disks` order.
    pub maps: Vec<BlockMap>,
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Repository(format!("manifest {} is corrupt: {why}", path.display()))
}

/// Checks the header; returns the metadata length and the version.
fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<(u64, u32)> {
    if header.len() < HEADER_LEN || &header[0..8] != MANIFEST_MAGIC {
        return Err(bad(path, "bad magic"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != MANIFEST_VERSION && version != MANIFEST_VERSION_DENSE && version != MANIFEST_VERSION_SEALED {
        return Err(bad(path, format!("unsupported version {version}")));
    }
    if header[12..16] != [0; 4] {
        return Err(bad(path, "reserved header bytes are not zero"));
    }
    let meta_len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if meta_len > MAX_METADATA || meta_len + HEADER_LEN as u64 + 16 > file_len {
        return Err(bad(path, format!("metadata length {meta_len} does not fit the file")));
    }
    Ok((meta_len, version))
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(&self.meta).expect("metadata serializes");
        let stored: u64 = self.maps.iter().map(|m| m.stored_count()).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + 16 * stored as usize + 16);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        for map in &self.maps {
            map.encode_into(&mut out);
        }
        let sum = xxh3_128(&out).to_be_bytes();
        out.extend_from_slice(&sum);
        out
    }

    /// Encodes a sealed manifest (version 3, docs/format.md §5.5).
    pub fn encode_sealed(&self, sealer: &Sealer) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta).expect("metadata serializes");
        let mut clear = Vec::new();
        clear.extend_from_slice(&(self.meta.disks.len() as u32).to_le_bytes());
        for d in &self.meta.disks {
            clear.extend_from_slice(&d.blocks.to_le_bytes());
        }
        for map in &self.maps {
            map.encode_into(&mut clear);
        }
        let sealed_len = meta.len() + crate::crypto::TAG_LEN + ring::aead::NONCE_LEN;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MANIFEST_MAGIC);
        header.extend_from_slice(&MANIFEST_VERSION_SEALED.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&(sealed_len as u64).to_le_bytes());
        let mut ad = header.clone();
        ad.extend_from_slice(&clear);
        let sealed = sealer.seal_manifest(&meta, &ad)?;
        let mut out = header;
        out.extend_from_slice(&sealed);
        out.extend_from_slice(&clear);
        let sum = xxh3_128(&out).to_be_bytes();
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses and checks a manifest as a repository reads it: an encrypted
    /// one (`encrypted`) only sealed manifests, opened with `sealer`
    /// (KeyRequired without it); an unencrypted one only versions 1 and 2.
    pub fn decode_for(path: &Path, data: &[u8], encrypted: bool, sealer: Option<&Sealer>) -> Result<Manifest> {
        let (_, version) = parse_header(path, data, data.len() as u64)?;
        match (encrypted, version == MANIFEST_VERSION_SEALED) {
            (true, true) => {
                let sealer = sealer.ok_or_else(|| {
                    Error::KeyRequired(format!("manifest {} is sealed: its repository's key is needed", path.display()))
                })?;
                let (public, sealed) = Manifest::decode_public_parts(path, data)?;
                let ad = {
                    let sealed_end = HEADER_LEN + sealed.len();
                    let mut ad = data[..HEADER_LEN].to_vec();
                    ad.extend_from_slice(&data[sealed_end..data.len() - 16]);
                    ad
                };
                let meta = sealer.open_manifest(sealed, &ad).ok_or_else(|| {
                    bad(path, "it is not authentic (altered, or sealed with another repository's key)")
                })?;
                let meta: Metadata = serde_json::from_slice(&meta).map_err(|e| bad(path, format!("metadata: {e}")))?;
                check_disks(path, &meta)?;
                if meta.disks.len() != public.blocks.len()
                    || meta.disks.iter().zip(&public.blocks).any(|(d, b)| d.blocks != *b)
                {
                    return Err(bad(path, "its block counts differ from its sealed metadata"));
                }
                Ok(Manifest { meta, maps: public.maps })
            }
            (true, false) => Err(bad(path, "it is not sealed, in an encrypted repository")),
            (false, true) => Err(bad(path, "it is sealed, in a repository that is not encrypted")),
            (false, false) => Manifest::decode(path, data),
        }
    }

    /// What can be checked of a sealed manifest without the key: its
    /// header, checksum, block counts and block maps.
    pub fn decode_public(path: &Path, data: &[u8]) -> Result<PublicManifest> {
        Manifest::decode_public_parts(path, data).map(|(p, _)| p)
    }

    fn decode_public_parts<'a>(path: &Path, data: &'a [u8]) -> Result<(PublicManifest, &'a [u8])> {
        let (sealed_len, version) = parse_header(path, data, data.len() as u64)?;
        if version != MANIFEST_VERSION_SEALED {
            return Err(bad(path, "it is not sealed, in an encrypted repository"));
        }
        let body = &data[..data.len() - 16];
        if xxh3_128(body).to_be_bytes() != data[data.len() - 16..] {
            return Err(bad(path, "checksum mismatch"));
        }
        let sealed = &body[HEADER_LEN..HEADER_LEN + sealed_len as usize];
        let mut rest = &body[HEADER_LEN + sealed_len as usize..];
        if rest.len() < 4 {
            return Err(bad(path, "truncated disk count"));
        }
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        rest = &rest[4..];
        if n.checked_mul(8).map(|need| need > rest.len()).unwrap_or(true) {
            return Err(bad(path, format!("{n} disks do not fit the file")));
        }
        let blocks: Vec<u64> = (0..n).map(|k| u64::from_le_bytes(rest[8 * k..8 * k + 8].try_into().unwrap())).collect();
        rest = &rest[8 * n..];
        let mut maps = Vec::with_capacity(n);
        for (k, b) in blocks.iter().enumerate() {
            let (map, used) =
                BlockMap::decode_runs(rest, *b).map_err(|e| bad(path, format!("block map of disk {k}: {e}")))?;
            maps.push(map);
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return Err(bad(path, format!("{} unexpected bytes after the block maps", rest.len())));
        }
        Ok((PublicManifest { blocks, maps }, sealed))
    }

    /// Parses and fully checks a manifest's bytes (versions 1 and 2).
    pub fn decode(path: &Path, data: &[u8]) -> Result<Manifest> {
        let (meta_len, version) = parse_header(path, data, data.len() as u64)?;
        if version == MANIFEST_VERSION_SEALED {
            return Err(bad(path, "it is sealed, in a repository that is not encrypted"));
        }
        let meta_len = meta_len as usize;
        let body = &data[..data.len() - 16];
        if xxh3_128(body).to_be_bytes() != data[data.len() - 16..] {
            return Err(bad(path, "checksum mismatch"));
        }
        let meta: Metadata = serde_json::from_slice(&data[HEADER_LEN..HEADER_LEN + meta_len])
            .map_err(|e| bad(path, format!("metadata: {e}")))?;
        let mut rest = &body[HEADER_LEN + meta_len..];
        let mut maps = Vec::with_capacity(meta.disks.len());
        check_disks(path, &meta)?;
        for d in meta.disks.iter() {
            if version == MANIFEST_VERSION_DENSE {
                let need = d
                    .blocks
                    .checked_mul(16)
                    .filter(|n| *n <= rest.len() as u64)
                    .ok_or_else(|| bad(path, format!("block map of disk {} is truncated", d.name)))?
                    as usize;
                maps.push(BlockMap::decode_dense(&rest[..need]));
                rest = &rest[need..];
            } else {
                let (map, used) = BlockMap::decode_runs(rest, d.blocks)
                    .map_err(|e| bad(path, format!("block map of disk {}: {e}", d.name)))?;
                maps.push(map);
                rest = &rest[used..];
            }
        }
        if !rest.is_empty() {
            return Err(bad(path, format!("{} unexpected bytes after the block maps", rest.len())));
        }
        Ok(Manifest { meta, maps })
    }

    pub fn load(path: &Path) -> Result<Manifest> {
        Manifest::decode(path, &Manifest::read(path)?)
    }

    /// A manifest file's bytes (bounded; no symlinks, no FIFOs).
    pub fn read(path: &Path) -> Result<Vec<u8>> {
        crate::repository::read_bounded(path, MAX_MANIFEST).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => bad(path, e),
            _ => not_found_or_io(path, e),
        })
    }

    /// Reads only the header and metadata (no block maps, no checksum check):
    /// cheap enough to list thousands of backups.
    pub fn load_metadata(path: &Path) -> Result<Metadata> {
        let mut f = crate::repository::open_regular(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => bad(path, e),
            _ => not_found_or_io(path, e),
        })?;
        let len = f.metadata().map_err(|e| Error::repo_io(format!("reading {}", path.display()), e))?.len();
        let mut header = [0u8; HEADER_LEN];
        f.read_exact(&mut header).map_err(|_| bad(path, "truncated header"))?;
        let (meta_len, version) = parse_header(path, &header, len)?;
        if version == MANIFEST_VERSION_SEALED {
            return Err(bad(path, "its metadata is sealed"));
        }
        let mut meta = vec![0u8; meta_len as usize];
        f.read_exact(&mut meta).map_err(|_| bad(path, "truncated metadata"))?;
        serde_json::from_slice(&meta).map_err(|e| bad(path, format!("metadata: {e}")))
    }

    /// Index of the disk called `name`; with `None`, the only disk.
    pub fn disk_index(&self, name: Option<&str>) -> Result<usize> {
        find_disk(&self.meta, name)
    }
}

/// What a sealed manifest shows without its key.
#[derive(Clone, Debug, PartialEq)]
pub struct PublicManifest {
    /// Each disk's number of blocks.
    pub blocks: Vec<u64>,
    pub maps: Vec<BlockMap>,
}

/// Block counts that fit the sizes, and disk names unique.
fn check_disks(path: &Path, meta: &Metadata) -> Result<()> {
    for (k, d) in meta.disks.iter().enumerate() {
        if meta.chunk_size == 0 || d.blocks != block_count(d.size, meta.chunk_size) {
            return Err(bad(path, format!("disk {} has {} blocks for {} bytes", d.name, d.blocks, d.size)));
        }
        if meta.disks[..k].iter().any(|o| o.name == d.name) {
            return Err(bad(path, format!("disk name {:?} appears twice", d.name)));
        }
    }
    Ok(())
}

pub fn find_disk(meta: &Metadata, name: Option<&str>) -> Result<usize> {
    match name {
        Some(n) => meta.disks.iter().position(|d| d.name == n).ok_or_else(|| {
            let names: Vec<&str> = meta.disks.iter().map(|d| d.name.as_str()).collect();
            Error::NotFound(format!("backup {} has no disk {n:?} (disks: {})", meta.id, names.join(", ")))
        }),
        None if meta.disks.len() == 1 => Ok(0),
        None => {
            let names: Vec<&str> = meta.disks.iter().map(|d| d.name.as_str()).collect();
            Err(Error::InvalidInput(format!(
                "backup {} has {} disks ({}); name one with --disk",
                meta.id,
                names.len(),
                names.join(", ")
            )))
        }
    }
}

fn not_found_or_io(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Error::NotFound(format!("no backup {id} in the repository"))
    } else {
        Error::repo_io(format!("reading {}", path.display()), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;
    use proptest::prelude::*;

    fn sample(blocks: &[u64]) -> Manifest {
        let disks = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| DiskMeta {
                name: format!("scsi0:{i}"),
                size: b * 4096,
                blocks: *b,
                mode: "full".into(),
                source: "/dev/null".into(),
                source_format: "raw".into(),
                change_id: None,
                stats: DiskStats::default(),
            })
            .collect();
        let maps = blocks
            .iter()
            .map(|b| BlockMap::from_ids(&(0..*b).map(|j| ChunkId([j as u8; 16])).collect::<Vec<_>>()))
            .collect();
        Manifest {
            meta: Metadata {
                id: "x".into(),
                vm: "vm".into(),
                created: "2026-01-01T00:00:00Z".into(),
                created_unix: 0.0,
                parent: None,
                repository: "r".into(),
                chunk_size: 4096,
                disks,
                config: serde_json::json!({"memory": 1}),
                attributes: serde_json::Value::Null,
            },
            maps,
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let m = sample(&[3, 0, 5]);
        let enc = m.encode();
        let p = Path::new("t.tib");
        assert_eq!(Manifest::decode(p, &enc).unwrap(), m);
        for i in [0usize, 9, 30, enc.len() - 20, enc.len() - 1] {
            let mut e = enc.clone();
            e[i] ^= 0x40;
            assert!(Manifest::decode(p, &e).is_err(), "flip at {i} not caught");
        }
        assert!(Manifest::decode(p, &enc[..enc.len() - 17]).is_err());
    }

    /// The version-1 layout: dense block maps, 16 bytes a block.
    fn encode_v1(m: &Manifest) -> Vec<u8> {
        let meta = serde_json::to_vec(&m.meta).unwrap();
        let mut out = MANIFEST_MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        for map in &m.maps {
            for i in 0..map.len() {
                out.extend_from_slice(&map.get(i).0);
            }
        }
        let sum = xxh3_128(&out).to_be_bytes();
        out.extend_from_slice(&sum);
        out
    }

    fn resum(mut e: Vec<u8>) -> Vec<u8> {
        let n = e.len() - 16;
        let sum = xxh3_128(&e[..n]).to_be_bytes();
        e[n..].copy_from_slice(&sum);
        e
    }

    #[test]
    fn version_1_is_still_read() {
        let mut m = sample(&[3, 0, 5]);
        m.maps[2].set(1, ChunkId::ZERO);
        let v1 = encode_v1(&m);
        assert_eq!(Manifest::decode(Path::new("t.tib"), &v1).unwrap(), m);
        assert!(m.encode().len() < v1.len());
    }

    #[test]
    fn reserved_bytes_and_duplicate_disk_names_are_refused() {
        let p = Path::new("t.tib");
        let mut e = sample(&[2]).encode();
        e[13] = 1;
        let err = Manifest::decode(p, &resum(e)).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        let mut m = sample(&[2, 2]);
        m.meta.disks[1].name = m.meta.disks[0].name.clone();
        let err = Manifest::decode(p, &m.encode()).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        // An unknown mode is informational.
        let mut m = sample(&[2]);
        m.meta.disks[0].mode = "future".into();
        assert_eq!(Manifest::decode(p, &m.encode()).unwrap(), m);
    }

    #[test]
    fn times_read_back_exactly_as_written() {
        // Seen once: 1795627226.4063761 came back as ...406376 without
        // serde_json's float_roundtrip, and the listing disagreed with commit.
        for t in [1795627226.4063761f64, 1795627409.1393921, 0.1, 1e-7, f64::MAX] {
            assert_eq!(serde_json::from_str::<f64>(&serde_json::to_string(&t).unwrap()).unwrap(), t);
        }
    }

    proptest! {
        #[test]
        fn any_time_reads_back_exactly(t in 0f64..4e9) {
            prop_assert_eq!(serde_json::from_str::<f64>(&serde_json::to_string(&t).unwrap()).unwrap(), t);
        }
    }

    #[test]
    fn sealed_manifests_hide_metadata_and_refuse_any_change() {
        let key = crate::crypto::derive(&crate::crypto::Secret([5u8; 32])).sealer;
        let other = crate::crypto::derive(&crate::crypto::Secret([6u8; 32])).sealer;
        let p = Path::new("t.tib");
        let mut m = sample(&[3, 0, 5]);
        m.meta.vm = "secret-vm-name".into();
        let enc = m.encode_sealed(&key).unwrap();
        assert!(!enc.windows(14).any(|w| w == b"secret-vm-name"));
        assert_eq!(Manifest::decode_for(p, &enc, true, Some(&key)).unwrap(), m);
        let public = Manifest::decode_public(p, &enc).unwrap();
        assert_eq!(public.maps, m.maps);
        assert_eq!(public.blocks, vec![3, 0, 5]);
        assert!(matches!(Manifest::decode_for(p, &enc, true, None), Err(Error::KeyRequired(_))));
        assert!(Manifest::decode_for(p, &enc, true, Some(&other)).is_err());
        // An unencrypted repository reads no sealed manifest, an encrypted one no plain manifest.
        assert!(Manifest::decode_for(p, &enc, false, Some(&key)).is_err());
        assert!(Manifest::decode_for(p, &m.encode(), true, Some(&key)).is_err());
        // Any flipped bit: refused, even with the checksum made good again.
        for i in (0..enc.len() - 16).step_by(7) {
            let mut e = enc.clone();
            e[i] ^= 0x08;
            assert!(Manifest::decode_for(p, &e, true, Some(&key)).is_err(), "flip at {i}");
            assert!(Manifest::decode_for(p, &resum(e), true, Some(&key)).is_err(), "flip at {i}, resummed");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut d = data.clone();
            if d.len() >= 8 { d[..8].copy_from_slice(MANIFEST_MAGIC); }
            let _ = Manifest::decode(Path::new("x"), &d);
            let _ = Manifest::decode_public(Path::new("x"), &d);
            let key = crate::crypto::derive(&crate::crypto::Secret([5u8; 32])).sealer;
            let _ = Manifest::decode_for(Path::new("x"), &d, true, Some(&key));
        }
    }
}
