//! A backup read back at arbitrary offsets equals the source.

use proptest::prelude::*;
use std::io::Write;
use vmbackup_mover::backup::{BackupSession, DiskRequest};
use vmbackup_mover::backup_reader::BackupReader;
use vmbackup_mover::progress::{Cancel, NoProgress};
use vmbackup_mover::repository::Repository;
use vmbackup_mover::source::{DiskSource, FileSource};

fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            if (i / 300_000) % 3 == 1 {
                return 0; // zero stretches, some spanning whole blocks
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 7) as u8
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn reads_at_any_offset_match(len in 1usize..2_000_000, seed in any::<u64>(),
                                 reads in prop::collection::vec((0.0f64..1.0, 0usize..700_000), 1..20)) {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(len, seed);
        let img = dir.path().join("img");
        std::fs::File::create(&img).unwrap().write_all(&data).unwrap();
        let repo = Repository::init(&dir.path().join("repo"), 256 * 1024, "zstd:1").unwrap();
        let s = BackupSession::begin(&repo, "vm", None).unwrap();
        let src = FileSource::open(&img).unwrap();
        let req = DiskRequest { name: "d".into(), ..Default::default() };
        s.add_disk(&src, &req, &mut NoProgress, &Cancel::new()).unwrap();
        let meta = s.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap();
        let r = BackupReader::open(&repo, &meta.id, None).unwrap();
        prop_assert_eq!(r.size(), len as u64);
        for (frac, n) in reads {
            let off = ((len as f64) * frac) as usize;
            let n = n.min(len - off);
            let mut buf = vec![1u8; n];
            r.read_at(&mut buf, off as u64).unwrap();
            prop_assert_eq!(&buf[..], &data[off..off + n]);
        }
        let mut past = [0u8; 2];
        prop_assert!(r.read_at(&mut past, len as u64 - 1).is_err());
        // Allocated extents cover every non-zero byte.
        let alloc = r.allocated().unwrap();
        for (i, b) in data.iter().enumerate() {
            if *b != 0 {
                prop_assert!(alloc.iter().any(|e| e.start <= i as u64 && (i as u64) < e.end()));
            }
        }
    }
}
