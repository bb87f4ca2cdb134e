//! A chunk file torn at any length is never reused: the writer stores it
//! again. Also a backup over a torn chunk restores to the source's bytes.

use std::fs;
use vmbackup_mover::backup::{BackupSession, DiskRequest};
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::chunk::{self, Compression, CHUNK_HEADER_LEN};
use vmbackup_mover::chunk_store::ChunkStore;
use vmbackup_mover::progress::{Cancel, NoProgress};
use vmbackup_mover::repository::Repository;
use vmbackup_mover::source::{DiskSource, MemSource};

/// Compressible, with enough variety that zstd writes several blocks.
fn sample(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 29) as u8).collect()
}

fn repo(dir: &std::path::Path) -> Repository {
    Repository::init(&dir.join("repo"), 1 << 20, "zstd:1").unwrap()
}

/// Every cut of a stored, a compressed and an old-style compressed chunk:
/// reuse says absent and moves the torn file aside; the whole file is reused.
#[test]
fn torn_chunks_of_any_length_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let store = ChunkStore::new(&repo);
    for (n, (c, legacy)) in [(Compression::None, false), (Compression::Zstd(1), false), (Compression::Zstd(1), true)]
        .into_iter()
        .enumerate()
    {
        let data = sample(1 << 20, n as u32);
        let id = ChunkStore::new(&repo).id_of(&data).unwrap();
        let mut enc = chunk::encode(&data, c).unwrap();
        if legacy {
            enc[5..8].fill(0); // as written before the header recorded the payload length
        }
        let len = enc.len();
        assert!(len > 4 * 1024, "{c:?}: {len}");
        for cut in [0, 5, CHUNK_HEADER_LEN, CHUNK_HEADER_LEN + 1, CHUNK_HEADER_LEN + 9, len / 3, len / 2, len - 1] {
            store.insert(&id, &enc[..cut]).unwrap();
            assert!(!store.reuse(&id).unwrap(), "{c:?} legacy={legacy}: cut at {cut} of {len} was reused");
            assert!(!store.path(&id).exists());
            assert!(store.path(&id).with_file_name(format!("{id}.bad")).exists());
        }
        // Bytes appended after a whole chunk are not a whole chunk either.
        let mut longer = enc.clone();
        longer.extend_from_slice(&[0u8; 7]);
        store.insert(&id, &longer).unwrap();
        assert!(!store.reuse(&id).unwrap(), "{c:?} legacy={legacy}: a chunk with a tail was reused");
        store.insert(&id, &enc).unwrap();
        assert!(store.reuse(&id).unwrap(), "{c:?} legacy={legacy}: the whole chunk was not reused");
        assert_eq!(store.read(&id).unwrap(), data);
    }
}

#[test]
fn a_fifo_or_a_symlink_in_place_of_a_chunk_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let store = ChunkStore::new(&repo);
    let data = sample(1000, 1);
    let id = ChunkStore::new(&repo).id_of(&data).unwrap();
    let outside = dir.path().join("outside");
    fs::write(&outside, chunk::encode(&data, Compression::None).unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, store.path(&id)).unwrap();
    assert!(!store.reuse(&id).unwrap());
    let c = std::ffi::CString::new(store.path(&id).to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(!store.reuse(&id).unwrap(), "a FIFO was reused");
}

/// End to end: the second backup of the same disk finds its chunk torn in
/// the zstd frame, stores it again, and restores the source's bytes.
#[test]
fn a_backup_over_a_torn_chunk_stores_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = sample(1 << 20, 7);
    let src = MemSource(data.clone());
    let backup = |repo: &Repository| {
        let s = BackupSession::begin(repo, "vm", None).unwrap();
        s.add_disk(&src, &DiskRequest { name: "d0".into(), ..Default::default() }, &mut NoProgress, &Cancel::new())
            .unwrap();
        s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap().id
    };
    backup(&repo);
    let store = ChunkStore::new(&repo);
    let path = store.path(&store.id_of(&data).unwrap());
    let whole = fs::read(&path).unwrap();
    fs::write(&path, &whole[..whole.len() - 100]).unwrap();
    let second = backup(&repo);
    assert_eq!(fs::read(&path).unwrap(), whole);
    let reader = BackupReader::open(&repo, &second, None).unwrap();
    let mut out = vec![0u8; data.len()];
    reader.read_at(&mut out, 0).unwrap();
    assert_eq!(out, data);
}
