//! One backup session shared by several threads, and backups from given
//! allocated areas.

use std::sync::Barrier;
use vmbackup_mover::backup::{BackupSession, DiskRequest};
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::extents::Extent;
use vmbackup_mover::progress::{Cancel, NoProgress, Progress};
use vmbackup_mover::repository::Repository;
use vmbackup_mover::source::{DiskSource, MemSource};
use vmbackup_mover::Error;

const BS: usize = 256 * 1024;

fn sample(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i / BS) as u8) | 1).collect()
}

fn restored(repo: &Repository, id: &str, disk: &str, len: usize) -> Vec<u8> {
    let r = BackupReader::open(repo, id, Some(disk)).unwrap();
    let mut back = vec![0u8; len];
    r.read_at(&mut back, 0).unwrap();
    back
}

/// Waits at the barrier on its first report: both disks are then provably
/// in their data path at the same time.
struct Meet<'a>(&'a Barrier, bool);
impl Progress for Meet<'_> {
    fn report(&mut self, _done: u64, _total: u64) -> vmbackup_mover::Result<()> {
        if !self.1 {
            self.1 = true;
            self.0.wait();
        }
        Ok(())
    }
}

#[test]
fn two_threads_add_two_disks_to_one_session_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), BS as u64, "zstd:1").unwrap();
    let (a, b) = (sample(9 * BS + 100, 1), sample(5 * BS, 2));
    let s = BackupSession::begin(&repo, "vm", None).unwrap();
    let meet = Barrier::new(2);
    std::thread::scope(|t| {
        for (name, data) in [("a", &a), ("b", &b)] {
            let (s, meet) = (&s, &meet);
            t.spawn(move || {
                let req = DiskRequest { name: name.into(), ..Default::default() };
                s.add_disk(&MemSource(data.clone()), &req, &mut Meet(meet, false), &Cancel::new()).unwrap()
            });
        }
    });
    let m = s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap();
    assert_eq!(m.disks.len(), 2);
    assert_eq!(restored(&repo, &m.id, "a", a.len()), a);
    assert_eq!(restored(&repo, &m.id, "b", b.len()), b);
}

/// Reports once, then waits until the test has tried the same name again.
struct Hold<'a>(&'a Barrier);
impl Progress for Hold<'_> {
    fn report(&mut self, done: u64, _total: u64) -> vmbackup_mover::Result<()> {
        if done > 0 && done < 4 * BS as u64 {
            self.0.wait();
            self.0.wait();
        }
        Ok(())
    }
}

#[test]
fn a_name_under_way_is_refused_and_abort_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), BS as u64, "zstd:1").unwrap();
    let data = sample(8 * BS, 3);
    let s = BackupSession::begin(&repo, "vm", None).unwrap();
    let hold = Barrier::new(2);
    std::thread::scope(|t| {
        let (s, hold, data) = (&s, &hold, &data);
        let h = t.spawn(move || {
            let req = DiskRequest { name: "a".into(), ..Default::default() };
            s.add_disk(&MemSource(data.clone()), &req, &mut Hold(hold), &Cancel::new())
        });
        hold.wait(); // "a" is in its data path
        assert_eq!(s.running(), vec!["a".to_string()]);
        let again = DiskRequest { name: "a".into(), ..Default::default() };
        let e = s.add_disk(&MemSource(data.clone()), &again, &mut NoProgress, &Cancel::new()).unwrap_err();
        assert!(matches!(&e, Error::InvalidInput(m) if m.contains("already being added")), "{e}");
        s.abort();
        hold.wait();
        assert!(matches!(h.join().unwrap(), Err(Error::Cancelled)));
    });
    assert!(s.running().is_empty());
}

#[test]
fn allocated_extents_read_only_those_blocks_and_zero_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), BS as u64, "zstd:1").unwrap();
    let data = sample(10 * BS, 4);
    let s = BackupSession::begin(&repo, "vm", None).unwrap();
    // Unsorted and overlapping, touching blocks 1, 2 and 6: normalized.
    let given =
        vec![Extent::new(6 * BS as u64 + 10, 5), Extent::new(BS as u64, BS as u64 + 1), Extent::new(BS as u64 + 7, 3)];
    let req = DiskRequest { name: "d".into(), allocated: Some(given), ..Default::default() };
    let meta = s.add_disk(&MemSource(data.clone()), &req, &mut NoProgress, &Cancel::new()).unwrap();
    assert_eq!(meta.mode, "allocated");
    assert_eq!(meta.stats.bytes_read, 3 * BS as u64);
    assert_eq!(meta.stats.bytes_skipped, 7 * BS as u64);
    let m = s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap();
    let back = restored(&repo, &m.id, "d", data.len());
    for i in 0..10 {
        let block = &back[i * BS..(i + 1) * BS];
        if [1, 2, 6].contains(&i) {
            assert_eq!(block, &data[i * BS..(i + 1) * BS], "block {i}");
        } else {
            assert!(block.iter().all(|b| *b == 0), "block {i} is not zeros");
        }
    }
}

#[test]
fn allocated_extents_past_the_end_or_with_changed_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), BS as u64, "zstd:1").unwrap();
    let src = MemSource(sample(2 * BS, 5));
    let s = BackupSession::begin(&repo, "vm", None).unwrap();
    let past = DiskRequest {
        name: "d".into(),
        allocated: Some(vec![Extent::new(BS as u64, BS as u64 + 1)]),
        ..Default::default()
    };
    let e = s.add_disk(&src, &past, &mut NoProgress, &Cancel::new()).unwrap_err();
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("past the end")), "{e}");
    let both = DiskRequest { name: "d".into(), allocated: Some(vec![]), changed: Some(vec![]), ..Default::default() };
    let e = s.add_disk(&src, &both, &mut NoProgress, &Cancel::new()).unwrap_err();
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("not both")), "{e}");
    // Refused disks leave no trace: the name can still be added.
    let ok = DiskRequest { name: "d".into(), allocated: Some(vec![]), ..Default::default() };
    let meta = s.add_disk(&src, &ok, &mut NoProgress, &Cancel::new()).unwrap();
    assert_eq!(meta.stats.bytes_read, 0);
}
