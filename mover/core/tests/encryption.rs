//! Encrypted and version-1 repositories end to end (docs/format.md §3, §4.1,
//! §5.5, §9): back up, read back, verify with and without the key, a wrong
//! key, and the chunk files an encrypted repository holds.

use std::fs;
use std::path::Path;
use vmbackup_mover::backup::{BackupSession, DiskRequest};
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::chunk::ChunkId;
use vmbackup_mover::chunk_store::ChunkStore;
use vmbackup_mover::crypto::Secret;
use vmbackup_mover::progress::{Cancel, NoProgress};
use vmbackup_mover::repository::{NewKeys, Repository};
use vmbackup_mover::source::{DiskSource, MemSource};
use vmbackup_mover::verify::verify;
use vmbackup_mover::Error;

const BS: usize = 256 * 1024;

fn disk() -> Vec<u8> {
    let text: Vec<u8> = b"a block a guest wrote; find me ".iter().copied().cycle().take(BS).collect();
    let noise: Vec<u8> = (0..BS as u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    [text, noise, vec![0u8; BS]].concat()
}

fn back_up(repo: &Repository, data: &[u8]) -> String {
    let s = BackupSession::begin(repo, "vm", None).unwrap();
    let req = DiskRequest { name: "d0".into(), ..Default::default() };
    s.add_disk(&MemSource(data.to_vec()), &req, &mut NoProgress, &Cancel::new()).unwrap();
    s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap().id
}

fn read_back(repo: &Repository, id: &str, len: usize) -> Vec<u8> {
    let r = BackupReader::open(repo, id, None).unwrap();
    let mut out = vec![0u8; len];
    r.read_at(&mut out, 0).unwrap();
    out
}

fn chunk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in fs::read_dir(root.join("chunks")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[test]
fn an_encrypted_repository_round_trips_and_hides_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let key = [0x5au8; 32];
    let repo = Repository::create(&root, BS as u64, "zstd:1", NewKeys::Encrypted(Secret(key))).unwrap();
    let data = disk();
    let id = back_up(&repo, &data);
    assert_eq!(read_back(&repo, &id, data.len()), data);
    let files = chunk_files(&root);
    assert_eq!(files.len(), 2);
    for f in &files {
        let bytes = fs::read(f).unwrap();
        assert_eq!(&bytes[..4], b"VMBS");
        assert!(!bytes.windows(16).any(|w| w == &data[..16] || w == &data[BS + 100..BS + 116]));
    }
    // Another open in this process holds the key (it was registered).
    let again = Repository::open(&root).unwrap();
    assert!(again.require_key().is_ok());
    assert!(verify(&again, &[], true, &mut NoProgress, &Cancel::new()).unwrap().ok());
    // The wrong key: its own error, and the right key still registered.
    assert!(matches!(Repository::unlock(&root, &[1u8; 32]), Err(Error::WrongKey(_))));
    assert!(Repository::unlock(&root, &key).is_ok());
}

#[test]
fn verify_without_the_key_checks_ciphertext_and_presence() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Repository::create(&root, BS as u64, "zstd:1", NewKeys::Encrypted(Secret([7u8; 32]))).unwrap();
    let data = disk();
    back_up(&repo, &data);
    // As a process without the key sees it.
    let mut locked = Repository::open(&root).unwrap();
    locked.keys = std::sync::Arc::new(vmbackup_mover::repository::Keys { encrypted: true, ids: None, sealer: None });
    assert!(matches!(locked.require_key(), Err(Error::KeyRequired(_))));
    assert!(matches!(BackupSession::begin(&locked, "vm", None), Err(Error::KeyRequired(_))));
    let ok = verify(&locked, &[], true, &mut NoProgress, &Cancel::new()).unwrap();
    assert!(ok.ok() && ok.chunks_checked == 2, "{:?}", ok.problems);
    let files = chunk_files(&root);
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[40] ^= 1;
    fs::write(&files[0], &bytes).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let r = verify(&locked, &[], true, &mut NoProgress, &Cancel::new()).unwrap();
    let mut kinds: Vec<&str> = r.problems.iter().map(|p| p.kind.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["corrupt_chunk", "missing_chunk"]);
}

#[test]
fn a_version_1_repository_keeps_xxh3_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Repository::create(&root, BS as u64, "zstd:1", NewKeys::Legacy).unwrap();
    assert_eq!(repo.config.version, 1);
    let data = disk();
    let id = back_up(&repo, &data);
    assert_eq!(read_back(&repo, &id, data.len()), data);
    let store = ChunkStore::new(&repo);
    assert_eq!(store.id_of(&data[..BS]).unwrap(), ChunkId::of(&data[..BS]));
    assert!(store.path(&ChunkId::of(&data[..BS])).exists());
    // A version-2 repository names the same block otherwise, and differently
    // from another version-2 repository.
    let a = Repository::init(&dir.path().join("a"), BS as u64, "none").unwrap();
    let b = Repository::init(&dir.path().join("b"), BS as u64, "none").unwrap();
    let ia = ChunkStore::new(&a).id_of(&data[..BS]).unwrap();
    assert_ne!(ia, ChunkId::of(&data[..BS]));
    assert_ne!(ia, ChunkStore::new(&b).id_of(&data[..BS]).unwrap());
}
