//! VHDX reader tests on images made by our own writer, then damaged.
use super::*;
use crate::progress::{Cancel, NoProgress};
use proptest::prelude::*;

use crate::source::MemSource as Mem;

/// A 5 MiB disk with data in blocks 0 and 3 (1 MiB blocks).
fn disk() -> Vec<u8> {
    let mut d = vec![0u8; 5 * MIB as usize];
    for (i, b) in d[..MIB as usize].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    for (i, b) in d[3 * MIB as usize + 777..3 * MIB as usize + 9000].iter_mut().enumerate() {
        *b = (i % 13) as u8 + 1;
    }
    d
}

fn write(dir: &Path, name: &str, d: &[u8]) -> PathBuf {
    let p = dir.join(name);
    crate::target::vhdx::write_vhdx(&Mem(d.to_vec()), &p, MIB as u32, &mut NoProgress, &Cancel::new()).unwrap();
    p
}

fn read_all(s: &dyn DiskSource) -> Vec<u8> {
    let mut v = vec![0u8; s.size() as usize];
    s.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn writer_output_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    let p = write(dir.path(), "a.vhdx", &d);
    let s = VhdxSource::open(&p).unwrap();
    assert_eq!(s.format(), "vhdx:dynamic");
    assert_eq!(read_all(&s), d);
    assert_eq!(s.allocated().unwrap(), vec![Extent::new(0, MIB), Extent::new(3 * MIB, MIB)]);
    // Unaligned reads across block boundaries.
    let mut b = vec![0u8; 3 * MIB as usize];
    s.read_at(&mut b, MIB - 5).unwrap();
    assert_eq!(&b[..], &d[MIB as usize - 5..4 * MIB as usize - 5]);
}

/// Patches a field of the file at `at`.
fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn rewrite_header(p: &Path, which: usize, f: impl Fn(&mut Header)) {
    let bytes = std::fs::read(p).unwrap();
    let off = HEADER_OFFSETS[which] as usize;
    let mut h = parse_header(&bytes[off..off + HEADER_SIZE]).unwrap();
    f(&mut h);
    patch(p, off as u64, &build_header(&h));
}

#[test]
fn both_headers_bad_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "a.vhdx", &disk());
    patch(&p, HEADER_OFFSETS[0] + 200, &[1]);
    assert!(VhdxSource::open(&p).is_ok(), "one valid header is enough");
    patch(&p, HEADER_OFFSETS[1] + 200, &[1]);
    let e = VhdxSource::open(&p).err().unwrap().to_string();
    assert!(e.contains("neither header is valid"), "{e}");
}

#[test]
fn log_replay_changes_content_in_memory_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    let p = write(dir.path(), "a.vhdx", &d);
    let before = std::fs::read(&p).unwrap();
    let s = VhdxSource::open(&p).unwrap();
    // Find where block 0 lives, then log a write to its second sector.
    let block0 = (s.bat[0] >> 20) * MIB;
    let g = Guid::random();
    let sector: Vec<u8> = (0..4096).map(|i| (i % 7) as u8 + 100).collect();
    let entry =
        log::build_entry(&g, 42, 0, &[(block0 + 4096, sector.clone())], &[(block0 + 65536, 8192)], before.len() as u64);
    let h = parse_header(&before[HEADER_OFFSETS[1] as usize..][..HEADER_SIZE]).unwrap();
    patch(&p, h.log_offset, &entry);
    rewrite_header(&p, 1, |h| {
        h.log_guid = g;
        h.sequence += 10;
    });
    let s = VhdxSource::open(&p).unwrap();
    assert_eq!(s.log_entries_replayed(), 1);
    let mut want = d.clone();
    want[4096..8192].copy_from_slice(&sector);
    want[65536..65536 + 8192].fill(0);
    assert_eq!(read_all(&s), want);
}

#[test]
fn differencing_chain_with_partial_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let base = disk();
    let bp = write(dir.path(), "base.vhdx", &base);
    let parent_guid = VhdxSource::open(&bp).unwrap().data_write;
    let mut child_data = vec![0u8; base.len()];
    child_data[2 * MIB as usize..2 * MIB as usize + 512].fill(9);
    let cp = crate::target::vhdx::write_differencing(
        &Mem(child_data.clone()),
        &dir.path().join("child.avhdx"),
        MIB as u32,
        &[(2 * MIB, 512), (3 * MIB + 1024, 512)],
        &[
            ("parent_linkage".into(), parent_guid.to_string()),
            ("relative_path".into(), ".\\base.vhdx".into()),
            ("absolute_win32_path".into(), "C:\\VMs\\base.vhdx".into()),
        ],
    )
    .unwrap();
    let s = VhdxSource::open(&cp).unwrap();
    assert_eq!(s.format(), "vhdx:differencing");
    let mut want = base.clone();
    want[2 * MIB as usize..2 * MIB as usize + 512].fill(9);
    want[3 * MIB as usize + 1024..3 * MIB as usize + 1536].fill(0);
    assert_eq!(read_all(&s), want);
    // Wrong linkage: a clear error.
    std::fs::rename(&bp, dir.path().join("elsewhere.vhdx")).unwrap();
    let e = VhdxSource::open(&cp).err().unwrap().to_string();
    assert!(e.contains("was not found"), "{e}");
}

#[test]
fn self_parent_loop_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cp = crate::target::vhdx::write_differencing(
        &Mem(disk()),
        &dir.path().join("loop.vhdx"),
        MIB as u32,
        &[],
        &[("parent_linkage".into(), Guid::random().to_string()), ("relative_path".into(), "loop.vhdx".into())],
    )
    .unwrap();
    let e = VhdxSource::open(&cp).err().unwrap().to_string();
    assert!(e.contains("loop"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random 8-byte overwrites of the metadata and BAT regions (not covered
    /// by any checksum) and of headers/region tables with fixed-up CRCs:
    /// open and read either work or fail cleanly.
    #[test]
    fn hostile_images_never_panic(edits in proptest::collection::vec((0u64..(4 * 1024 * 1024), any::<u64>()), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "h.vhdx", &disk());
        for (at, v) in &edits {
            // Aim at the interesting parts: headers, region tables, metadata, BAT.
            let at = match at % 4 {
                0 => HEADER_OFFSETS[(at / 4 % 2) as usize] + (at / 8) % 96,
                1 => REGION_OFFSETS[0] + (at / 4) % 96,
                2 => 2 * MIB + (at / 4) % (64 * 1024 + 256),
                _ => 3 * MIB + (at / 4) % 64,
            } / 8 * 8;
            patch(&p, at, &v.to_le_bytes());
        }
        // Fix the checksums so the edits reach past them.
        let bytes = std::fs::read(&p).unwrap();
        for off in HEADER_OFFSETS {
            let mut h = bytes[off as usize..off as usize + HEADER_SIZE].to_vec();
            h[0..4].copy_from_slice(b"head");
            let c = crc32c::crc32c_with_zero_field(&h, 4);
            patch(&p, off + 4, &c.to_le_bytes());
            patch(&p, off, b"head");
        }
        let mut r = bytes[REGION_OFFSETS[0] as usize..][..REGION_TABLE_SIZE].to_vec();
        r[0..4].copy_from_slice(b"regi");
        let c = crc32c::crc32c_with_zero_field(&r, 4);
        patch(&p, REGION_OFFSETS[0] + 4, &c.to_le_bytes());
        if let Ok(s) = VhdxSource::open(&p) {
            let _ = s.allocated();
            let n = (s.size().min(2 * MIB)) as usize;
            let mut buf = vec![0u8; n];
            let _ = s.read_at(&mut buf, 0);
        }
    }
}
