//! The backup pipeline's write stage: a chunk whose write fails is not
//! counted as stored, so the same session stores it when it meets it again.

use vmbackup_mover::backup::{BackupSession, DiskRequest};
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::chunk_store::ChunkStore;
use vmbackup_mover::progress::{Cancel, NoProgress};
use vmbackup_mover::repository::Repository;
use vmbackup_mover::source::{DiskSource, MemSource};

const BS: usize = 256 * 1024;

#[test]
fn a_failed_chunk_write_is_stored_again_by_the_same_session() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), BS as u64, "zstd:1").unwrap();
    // Eight distinct blocks; the chunk directory of the first one's id is
    // replaced by a file, so creating that chunk fails (ENOTDIR) even as root.
    let data: Vec<u8> = (0..8 * BS).map(|i| ((i / BS) as u8).wrapping_mul(37).wrapping_add(i as u8 % 5 + 1)).collect();
    let first = ChunkStore::new(&repo).id_of(&data[..BS]).unwrap();
    let store = ChunkStore::new(&repo);
    let sub = store.path(&first).parent().unwrap().to_path_buf();
    std::fs::remove_dir(&sub).unwrap();
    std::fs::write(&sub, b"not a directory").unwrap();

    let src = MemSource(data.clone());
    let s = BackupSession::begin(&repo, "vm", None).unwrap();
    let a = DiskRequest { name: "a".into(), ..Default::default() };
    assert!(s.add_disk(&src, &a, &mut NoProgress, &Cancel::new()).is_err());
    assert!(store.stat_len(&first).is_err() || store.stat_len(&first).unwrap().is_none());

    std::fs::remove_file(&sub).unwrap();
    std::fs::create_dir(&sub).unwrap();
    let b = DiskRequest { name: "b".into(), ..Default::default() };
    let meta = s.add_disk(&src, &b, &mut NoProgress, &Cancel::new()).unwrap();
    assert!(meta.stats.new_chunks >= 1, "the failed chunk was stored: {:?}", meta.stats);
    assert!(store.stat_len(&first).unwrap().is_some());
    let m = s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap();
    let r = BackupReader::open(&repo, &m.id, Some("b")).unwrap();
    let mut back = vec![0u8; data.len()];
    r.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
}
