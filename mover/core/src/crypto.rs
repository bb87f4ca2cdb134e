//! Key material, keyed chunk ids and sealing (docs/format.md §3, §4.1, §5.5, §9).
//!
//! A repository of format version 2 names chunks by BLAKE3 keyed with a
//! 32-byte *id key* (the first 16 bytes of the keyed hash), so that no one
//! without the key can predict a block's id or craft two blocks with one id:
//! with plain XXH3 ids a guest could plant a block under the id of another
//! VM's block in a shared repository, and that VM would restore the guest's
//! block. An unencrypted repository keeps its random id key in `config.json`
//! (it protects against guests, who never read the repository, not against
//! whoever can). An encrypted one derives every key from a 32-byte master key
//! that the caller keeps (wrapped in key slots by passphrases): the id key, the
//! chunk sealing key, the manifest key, the config key, the record key (the
//! cleanup ledger's entries and the drills' record, docs/format.md §1) and a
//! key check value, each with `blake3::derive_key` under its own context string.
//!
//! A sealed chunk is AES-256-GCM under a key of its own, derived from the
//! sealing key and the chunk's id, with a random 96-bit nonce and the id as
//! associated data. Two sealings under one such key are of the same id, so of
//! the same plaintext (unless two plaintexts collide on a 128-bit keyed id):
//! a repeated nonce can then only repeat a ciphertext, never leak a
//! keystream across different data, whatever the number of concurrent
//! writers. Each sealed file ends with an XXH3-128 over everything before
//! it, so damage is found without the key.
//!
//! The process keeps the master keys it was given (`register`) by the
//! repository's canonical path and id; `Repository::open` looks them up.

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use xxhash_rust::xxh3::xxh3_128;

pub const KEY_LEN: usize = 32;
/// The AEAD of encrypted repositories, as `config.json` names it.
pub const AEAD_NAME: &str = "aes-256-gcm";
/// `config.json`'s `id_hash` of version-2 repositories and of version 1.
pub const ID_HASH_KEYED: &str = "blake3-keyed";
pub const ID_HASH_XXH3: &str = "xxh3-128";

const CTX_ID: &str = "vmbackup 2026-12 repository chunk id key";
const CTX_SEAL: &str = "vmbackup 2026-12 repository chunk sealing key";
const CTX_MANIFEST: &str = "vmbackup 2026-12 repository manifest key";
const CTX_CONFIG: &str = "vmbackup 2026-12 repository config key";
const CTX_RECORD: &str = "vmbackup 2026-12 repository record key";
const CTX_CHECK: &str = "vmbackup 2026-12 repository key check";

/// Magic of a sealed chunk file (a plain one starts `VMBC`).
pub const SEALED_MAGIC: &[u8; 4] = b"VMBS";
/// The sealed chunk layout's version (byte 4); readers refuse others.
pub const SEALED_VERSION: u8 = 1;
/// Byte 5: the AEAD. 1 = AES-256-GCM.
pub const SEALED_AEAD_AES256GCM: u8 = 1;
/// Magic, version, AEAD, two reserved bytes, ciphertext length (u32), nonce.
pub const SEALED_HEADER_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
pub const CHECKSUM_LEN: usize = 16;
/// What sealing adds to a chunk file: header, tag, checksum.
pub const SEALED_OVERHEAD: usize = SEALED_HEADER_LEN + TAG_LEN + CHECKSUM_LEN;

/// A 32-byte secret, zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; KEY_LEN]);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned reference into our own array; a
            // volatile write keeps the compiler from eliding the zeroing.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn from_slice(key: &[u8]) -> Result<Secret> {
        let k: [u8; KEY_LEN] = key
            .try_into()
            .map_err(|_| Error::InvalidInput(format!("a repository key is {KEY_LEN} bytes, not {}", key.len())))?;
        Ok(Secret(k))
    }
    pub fn random() -> Result<Secret> {
        let mut k = [0u8; KEY_LEN];
        random_fill(&mut k)?;
        Ok(Secret(k))
    }
}

/// Fills `buf` from the system's random number generator.
pub fn random_fill(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new().fill(buf).map_err(|_| Error::Internal("the system random number generator failed".into()))
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// How a repository names chunks.
#[derive(Clone, Debug)]
pub enum IdHash {
    /// Format version 1: XXH3-128 of the plaintext, computable by anyone.
    Xxh3,
    /// Format version 2: BLAKE3 keyed with the repository's id key, first 16 bytes.
    Keyed(Secret),
}

impl IdHash {
    pub fn id(&self, data: &[u8]) -> ChunkId {
        match self {
            IdHash::Xxh3 => ChunkId::of(data),
            IdHash::Keyed(k) => {
                let h = blake3::keyed_hash(&k.0, data);
                let mut id = [0u8; 16];
                id.copy_from_slice(&h.as_bytes()[..16]);
                ChunkId(id)
            }
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            IdHash::Xxh3 => ID_HASH_XXH3,
            IdHash::Keyed(_) => ID_HASH_KEYED,
        }
    }
}

/// The keys an encrypted repository's master key gives.
#[derive(Clone, Debug)]
pub struct Sealer {
    seal: Secret,
    manifest: Secret,
    record: Secret,
}

/// The key that seals an encrypted repository's small records: the cleanup
/// ledger's entries and the drills' record (docs/format.md §1.1). Derived
/// once when the repository is unlocked; sealing one costs an AES-GCM pass
/// over a few hundred bytes.
#[derive(Clone, Debug)]
pub struct RecordKey(Secret);

/// What a record's associated data starts with; its path in the repository
/// follows, so that a sealed record moved to another name is refused.
const RECORD_AD: &[u8] = b"vmbackup record\0";

/// Everything derived from a master key.
#[derive(Clone, Debug)]
pub struct DerivedKeys {
    pub id: Secret,
    pub sealer: Sealer,
    pub config: Secret,
    pub check: [u8; 16],
}

pub fn derive(master: &Secret) -> DerivedKeys {
    let check_full = blake3::derive_key(CTX_CHECK, &master.0);
    let mut check = [0u8; 16];
    check.copy_from_slice(&check_full[..16]);
    DerivedKeys {
        id: Secret(blake3::derive_key(CTX_ID, &master.0)),
        sealer: Sealer {
            seal: Secret(blake3::derive_key(CTX_SEAL, &master.0)),
            manifest: Secret(blake3::derive_key(CTX_MANIFEST, &master.0)),
            record: Secret(blake3::derive_key(CTX_RECORD, &master.0)),
        },
        config: Secret(blake3::derive_key(CTX_CONFIG, &master.0)),
        check,
    }
}

/// The config's MAC: keyed BLAKE3 over its fields that readers act on, one
/// per line (docs/format.md §2).
pub fn config_mac(config_key: &Secret, fields: &[&str]) -> String {
    let mut h = blake3::Hasher::new_keyed(&config_key.0);
    for f in fields {
        h.update(f.as_bytes());
        h.update(b"\n");
    }
    to_hex(h.finalize().as_bytes())
}

fn aead_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

/// The key that seals one chunk: keyed BLAKE3 of its id under the sealing key.
fn chunk_key(seal: &Secret, id: &ChunkId) -> LessSafeKey {
    let mut input = [0u8; 22];
    input[..6].copy_from_slice(b"chunk\0");
    input[6..].copy_from_slice(&id.0);
    let k = Secret(*blake3::keyed_hash(&seal.0, &input).as_bytes());
    aead_key(&k.0)
}

fn chunk_aad(id: &ChunkId, header: &[u8]) -> [u8; 28] {
    let mut ad = [0u8; 28];
    ad[..16].copy_from_slice(&id.0);
    ad[16..].copy_from_slice(&header[..12]);
    ad
}

/// The whole length of a sealed chunk file from its first 12 bytes, or why
/// they cannot start one whose sealed content is at most `max_inner` bytes.
pub fn sealed_file_len(header: &[u8], max_inner: usize) -> std::result::Result<u64, String> {
    if header.len() < 12 {
        return Err(format!("{} bytes, shorter than a sealed chunk header", header.len()));
    }
    if &header[0..4] != SEALED_MAGIC {
        return Err("not a sealed chunk (bad magic)".into());
    }
    if header[4] != SEALED_VERSION {
        return Err(format!("sealed chunk layout version {} is not supported (this build reads 1)", header[4]));
    }
    if header[5] != SEALED_AEAD_AES256GCM {
        return Err(format!("unknown AEAD {}", header[5]));
    }
    if header[6..8] != [0, 0] {
        return Err("reserved bytes of a sealed chunk are not zero".into());
    }
    let c = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
    if c < TAG_LEN || c > max_inner + TAG_LEN {
        return Err(format!("ciphertext length {c} is out of range"));
    }
    Ok((SEALED_HEADER_LEN + c + CHECKSUM_LEN) as u64)
}

/// Checks a sealed chunk file without the key: header, length, and the
/// XXH3-128 over everything before it (the ciphertext included).
pub fn check_sealed(file: &[u8], max_inner: usize) -> std::result::Result<(), String> {
    let len = sealed_file_len(file, max_inner)?;
    if file.len() as u64 != len {
        return Err(format!("sealed chunk file is {} bytes, its header says {len}", file.len()));
    }
    let n = file.len() - CHECKSUM_LEN;
    if xxh3_128(&file[..n]).to_be_bytes() != file[n..] {
        return Err("checksum over the ciphertext does not match".into());
    }
    Ok(())
}

impl Sealer {
    /// Seals an encoded chunk (`chunk::encode`'s output) into a chunk file.
    pub fn seal_chunk(&self, id: &ChunkId, inner: &[u8]) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(inner.len() + SEALED_OVERHEAD);
        buf.resize(SEALED_HEADER_LEN, 0);
        buf.extend_from_slice(inner);
        self.seal_chunk_in_place(id, &mut buf)?;
        Ok(buf)
    }

    /// Seals in place: `buf` holds `SEALED_HEADER_LEN` bytes of room, then
    /// the encoded chunk; it becomes the sealed chunk file.
    pub fn seal_chunk_in_place(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<()> {
        let inner_len = buf.len() - SEALED_HEADER_LEN;
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce)?;
        buf[0..4].copy_from_slice(SEALED_MAGIC);
        buf[4..8].copy_from_slice(&[SEALED_VERSION, SEALED_AEAD_AES256GCM, 0, 0]);
        buf[8..12].copy_from_slice(&((inner_len + TAG_LEN) as u32).to_le_bytes());
        buf[12..24].copy_from_slice(&nonce);
        let ad = chunk_aad(id, &buf[..12]);
        let tag = chunk_key(&self.seal, id)
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&ad[..]), &mut buf[24..])
            .map_err(|_| Error::Internal(format!("sealing chunk {id} failed")))?;
        buf.extend_from_slice(tag.as_ref());
        let sum = xxh3_128(buf).to_be_bytes();
        buf.extend_from_slice(&sum);
        Ok(())
    }

    /// Checks and opens a sealed chunk file; returns the encoded chunk inside.
    pub fn open_chunk(
        &self,
        id: &ChunkId,
        mut file: Vec<u8>,
        max_inner: usize,
    ) -> std::result::Result<Vec<u8>, String> {
        check_sealed(&file, max_inner)?;
        let c = file.len() - SEALED_HEADER_LEN - CHECKSUM_LEN;
        let nonce: [u8; NONCE_LEN] = file[12..24].try_into().unwrap();
        let ad = chunk_aad(id, &file[..12]);
        let plain_len = chunk_key(&self.seal, id)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&ad[..]), &mut file[24..24 + c])
            .map_err(|_| "authentication failed: the chunk was altered, or is another chunk under this id".to_string())?
            .len();
        file.truncate(SEALED_HEADER_LEN + plain_len);
        file.drain(..SEALED_HEADER_LEN);
        Ok(file)
    }

    /// Seals a manifest's metadata: nonce, then ciphertext and tag; `ad`
    /// binds the rest of the file (docs/format.md §5.5).
    pub fn seal_manifest(&self, plain: &[u8], ad: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = aead_key(&self.manifest.0)
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut out[NONCE_LEN..])
            .map_err(|_| Error::Internal("sealing a manifest failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens what `seal_manifest` made; None if it is not authentic.
    pub fn open_manifest(&self, sealed: &[u8], ad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
        let mut buf = sealed[NONCE_LEN..].to_vec();
        let n = aead_key(&self.manifest.0)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ad), &mut buf)
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }
}

impl Sealer {
    /// The key of the repository's records (ledger entries, drills' record).
    pub fn records(&self) -> RecordKey {
        RecordKey(self.record.clone())
    }
}

impl RecordKey {
    fn ad(name: &str) -> Vec<u8> {
        let mut ad = RECORD_AD.to_vec();
        ad.extend_from_slice(name.as_bytes());
        ad
    }

    /// Seals a record stored at `name` (its path in the repository, e.g.
    /// `ledger/web01--run.json`): a random 96-bit nonce, then the ciphertext
    /// and the tag, with `name` in the associated data.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let ad = RecordKey::ad(name);
        let tag = aead_key(&self.0 .0)
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&ad[..]), &mut out[NONCE_LEN..])
            .map_err(|_| Error::Internal(format!("sealing record {name} failed")))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens what `seal` made for `name`; None if it is not authentic (altered,
    /// sealed for another name, or under another repository's key).
    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
        let mut buf = sealed[NONCE_LEN..].to_vec();
        let ad = RecordKey::ad(name);
        let n = aead_key(&self.0 .0)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&ad[..]), &mut buf)
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }
}

/// The master keys this process was given, by repository.
static KEYRING: Mutex<Vec<(PathBuf, String, Secret)>> = Mutex::new(Vec::new());

fn canonical(root: &Path) -> PathBuf {
    std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf())
}

/// Remembers `master` for the repository at `root` with id `repo_id`
/// (replacing an earlier key for it).
pub fn register(root: &Path, repo_id: &str, master: Secret) {
    let path = canonical(root);
    let mut ring = KEYRING.lock().unwrap_or_else(|e| e.into_inner());
    ring.retain(|(p, id, _)| !(p == &path && id == repo_id));
    ring.push((path, repo_id.to_string(), master));
}

/// The master key registered for the repository at `root` with id `repo_id`.
pub fn lookup(root: &Path, repo_id: &str) -> Option<Secret> {
    let path = canonical(root);
    let ring = KEYRING.lock().unwrap_or_else(|e| e.into_inner());
    ring.iter().find(|(p, id, _)| p == &path && id == repo_id).map(|(_, _, k)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        derive(&Secret([7u8; 32])).sealer
    }

    #[test]
    fn keyed_ids_depend_on_the_key_and_differ_from_xxh3() {
        let data = vec![42u8; 4096];
        let a = IdHash::Keyed(Secret([1u8; 32])).id(&data);
        let b = IdHash::Keyed(Secret([2u8; 32])).id(&data);
        assert_ne!(a, b);
        assert_ne!(a, IdHash::Xxh3.id(&data));
        assert_eq!(a, IdHash::Keyed(Secret([1u8; 32])).id(&data));
    }

    #[test]
    fn derived_keys_are_distinct() {
        let d = derive(&Secret([9u8; 32]));
        let all = [&d.id.0, &d.sealer.seal.0, &d.sealer.manifest.0, &d.config.0, &d.sealer.record.0];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
        assert_ne!(derive(&Secret([8u8; 32])).check, d.check);
    }

    #[test]
    fn sealed_chunks_open_and_refuse_any_change() {
        let s = sealer();
        let id = ChunkId([3u8; 16]);
        let inner = b"VMBC\0\0\0\0\x05\0\0\0hello".to_vec();
        let file = s.seal_chunk(&id, &inner).unwrap();
        assert_eq!(file.len(), inner.len() + SEALED_OVERHEAD);
        assert!(!file.windows(5).any(|w| w == b"hello"));
        assert_eq!(s.open_chunk(&id, file.clone(), 100).unwrap(), inner);
        // Sealed twice: different nonces, different files.
        assert_ne!(s.seal_chunk(&id, &inner).unwrap(), file);
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            assert!(s.open_chunk(&id, bad.clone(), 100).is_err(), "flip at {i}");
            assert!(check_sealed(&bad, 100).is_err(), "flip at {i} not seen without the key");
        }
        // Under another id (a swapped chunk), or with another key: refused,
        // even with a checksum made good again.
        let err = s.open_chunk(&ChunkId([4u8; 16]), file.clone(), 100).unwrap_err();
        assert!(err.contains("authentication"), "{err}");
        assert!(derive(&Secret([6u8; 32])).sealer.open_chunk(&id, file.clone(), 100).is_err());
        assert!(s.open_chunk(&id, file[..file.len() - 1].to_vec(), 100).is_err());
        assert!(sealed_file_len(&file, 2).is_err());
    }

    #[test]
    fn sealed_manifests_bind_their_associated_data() {
        let s = sealer();
        let sealed = s.seal_manifest(b"{\"vm\":\"web01\"}", b"rest").unwrap();
        assert_eq!(s.open_manifest(&sealed, b"rest").unwrap(), b"{\"vm\":\"web01\"}");
        assert!(s.open_manifest(&sealed, b"resT").is_none());
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(s.open_manifest(&bad, b"rest").is_none());
    }

    #[test]
    fn sealed_records_open_under_their_name_only() {
        let r = sealer().records();
        let sealed = r.seal("ledger/web01--r1.json", b"{\"vm\":\"web01\"}").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"web01"));
        assert_eq!(r.open("ledger/web01--r1.json", &sealed).unwrap(), b"{\"vm\":\"web01\"}");
        assert!(r.open("ledger/db01--r1.json", &sealed).is_none(), "moved to another name");
        assert!(derive(&Secret([6u8; 32])).sealer.records().open("ledger/web01--r1.json", &sealed).is_none());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(r.open("ledger/web01--r1.json", &bad).is_none(), "flip at {i}");
        }
        assert!(r.open("ledger/web01--r1.json", &sealed[..NONCE_LEN + TAG_LEN - 1]).is_none());
    }

    #[test]
    fn hex_roundtrip() {
        assert_eq!(from_hex(&to_hex(&[0, 1, 254, 255])).unwrap(), vec![0, 1, 254, 255]);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
