//! VMDK writer and reader agree, and hostile images are errors: never a
//! panic, a hang or an allocation the file's length does not justify.

use proptest::prelude::*;
use std::path::Path;
use vmbackup_mover::error::Result;
use vmbackup_mover::progress::{Cancel, NoProgress};
use vmbackup_mover::source::vmdk::header::{SparseHeader, GD_AT_END};
use vmbackup_mover::source::{DiskSource, VmdkSource};
use vmbackup_mover::target::vmdk::{write_vmdk, Shape};

use vmbackup_mover::source::MemSource as Mem;

fn disk(len: usize, writes: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for &(at, n, v) in writes {
        let at = at % len;
        let end = (at + n).min(len);
        for (i, b) in d[at..end].iter_mut().enumerate() {
            *b = v.wrapping_add((i % 251) as u8);
        }
    }
    d
}

fn write(shape: Shape, data: &[u8], path: &Path) {
    write_vmdk(shape, &Mem(data.to_vec()), path, &mut NoProgress, &Cancel::new()).unwrap();
}

fn read_all(src: &VmdkSource) -> Result<Vec<u8>> {
    let mut out = vec![0u8; src.size() as usize];
    for (i, c) in out.chunks_mut(100_000).enumerate() {
        src.read_at(c, i as u64 * 100_000)?;
    }
    Ok(out)
}

const SHAPES: [Shape; 2] = [Shape::StreamOptimized, Shape::MonolithicSparse];

proptest! {
    // PROPTEST_CASES=N runs more cases (a longer hunt for panics).
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)))]

    #[test]
    fn written_images_read_back(sectors in 1usize..6000, shape in 0usize..2,
                                writes in prop::collection::vec((any::<usize>(), 1usize..300_000, 1u8..255), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vmdk");
        let len = sectors * 512; // a VMDK counts whole sectors
        let data = disk(len, &writes);
        write(SHAPES[shape], &data, &path);
        let src = VmdkSource::open(&path).unwrap();
        prop_assert_eq!(src.size(), len as u64);
        let back = read_all(&src).unwrap();
        prop_assert_eq!(&back[..], &data[..]);
        // A disk that is not a whole number of sectors is refused, not padded.
        let odd = disk(len + 100, &writes);
        prop_assert!(write_vmdk(SHAPES[shape], &Mem(odd), &dir.path().join("odd.vmdk"), &mut NoProgress, &Cancel::new()).is_err());
        // Only grains holding data are allocated.
        let alloc: u64 = src.allocated().unwrap().iter().map(|e| e.length).sum();
        let nonzero_grains = data.chunks(65536).filter(|g| g.iter().any(|b| *b != 0)).count() as u64;
        prop_assert!(alloc <= nonzero_grains * 65536);
    }

    #[test]
    fn mutated_images_fail_cleanly(shape in 0usize..2,
                                   flips in prop::collection::vec((0.0f64..1.0, any::<u8>()), 1..24),
                                   head_bias in any::<bool>(), cut in prop::option::of(0.0f64..1.0)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vmdk");
        write(SHAPES[shape], &disk(1_500_160, &[(0, 200_000, 7), (900_000, 300_000, 9)]), &path);
        let mut bytes = std::fs::read(&path).unwrap();
        // Half the cases aim at the metadata: header, descriptor, tables.
        let span = if head_bias { bytes.len().min(64 * 1024) } else { bytes.len() };
        for (at, v) in flips {
            let i = ((at * span as f64) as usize).min(bytes.len() - 1);
            bytes[i] = v;
        }
        if let Some(c) = cut {
            bytes.truncate((c * bytes.len() as f64) as usize);
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(src) = VmdkSource::open(&path) {
            let _ = src.allocated();
            if src.size() <= 64 << 20 {
                let _ = read_all(&src);
            } else {
                let mut b = vec![0u8; 4096];
                let _ = src.read_at(&mut b, 0);
                let _ = src.read_at(&mut b, src.size() - 4096);
            }
        }
    }

    #[test]
    fn hostile_header_numbers_are_refused_or_bounded(capacity in any::<u64>(), grain in any::<u64>(),
                                                     gtes in any::<u32>(), gd in any::<u64>(), rgd in any::<u64>(),
                                                     desc_off in any::<u64>(), desc_len in any::<u64>(),
                                                     flags in any::<u32>(), version in 0u32..5, file_len in 512usize..16384,
                                                     fill in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.vmdk");
        let h = SparseHeader {
            version, flags, capacity, grain_size: grain, descriptor_offset: desc_off, descriptor_size: desc_len,
            num_gtes_per_gt: gtes, rgd_offset: rgd, gd_offset: gd, overhead: 1, unclean_shutdown: false,
            compress_algorithm: 1,
        };
        let mut bytes = vec![fill; file_len];
        bytes[..512].copy_from_slice(&h.to_bytes());
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(src) = VmdkSource::open(&path) {
            let _ = src.allocated();
            let mut b = vec![0u8; 4096.min(src.size() as usize)];
            let _ = src.read_at(&mut b, 0);
        }
    }
}

#[test]
fn stream_footer_is_used_when_the_header_defers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.vmdk");
    write(Shape::StreamOptimized, &disk(1 << 20, &[(5000, 70_000, 3)]), &path);
    let bytes = std::fs::read(&path).unwrap();
    let head = SparseHeader::parse(&bytes[..512]).unwrap();
    assert_eq!(head.gd_offset, GD_AT_END);
    let foot = SparseHeader::parse(&bytes[bytes.len() - 1024..]).unwrap();
    assert_ne!(foot.gd_offset, GD_AT_END);
    assert_eq!(VmdkSource::open(&path).unwrap().format(), "vmdk:streamOptimized");
}

#[test]
fn descriptor_chain_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a-flat.vmdk");
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    let a = dir.path().join("a.vmdk");
    std::fs::write(
        &a,
        "# Disk DescriptorFile\nCID=12345678\nparentCID=12345678\nparentFileNameHint=\"a.vmdk\"\ncreateType=\"vmfs\"\nRW 8 VMFS \"a-flat.vmdk\"\n",
    )
    .unwrap();
    let e = VmdkSource::open(&a).err().expect("a cycle").to_string();
    assert!(e.contains("own ancestor"), "{e}");
}
