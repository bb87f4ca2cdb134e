//! Writing a dynamic VHDX ([MS-VHDX]) from any disk source.
//!
//! The source is read in pieces (a backup's chunks) by a pool that keeps
//! several in flight (`inflight.rs`); one thread assembles each payload
//! block and writes it, in disk order.
//!
//! Layout (all 1 MiB aligned, as Hyper-V lays files out): file type
//! identifier, two headers and two region tables in the first 1 MiB; an
//! empty 1 MiB log at 1 MiB; the metadata region at 2 MiB; the BAT at 3 MiB;
//! then payload blocks in disk order. Only blocks that the source reports
//! allocated and that hold a non-zero byte are stored (the others are
//! PAYLOAD_BLOCK_ZERO in the BAT); within a stored block,
//! all-zero MiBs are left as holes of a sparse file. The headers are written
//! last, so an interrupted write never looks like a valid image.

use crate::chunk::is_all_zero;
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::inflight::{ordered_map, RESTORE_IN_FLIGHT};
use crate::progress::{Cancel, Progress, Ticker};
use crate::source::vhdx::guid::Guid;
use crate::source::vhdx::{
    bat_entries, build_header, build_metadata, build_region_table, chunk_ratio, known_guid, payload_index, Header,
    Metadata, Region, BAT_GUID, METADATA_GUID, MIB, PAYLOAD_FULLY_PRESENT, PAYLOAD_ZERO,
};
use crate::source::DiskSource;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Hyper-V's default block size for dynamic disks.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u32 = MIB as u32;
const METADATA_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const SB_PRESENT: u64 = 6;

struct Writer {
    file: File,
    label: String,
    next: u64,
    /// Bytes handed to write calls.
    written: Cell<u64>,
}

impl Writer {
    fn create(path: &Path) -> Result<Writer> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::target(format!("creating {}", path.display()), e))?;
        Ok(Writer { file, label: path.display().to_string(), next: 0, written: Cell::new(0) })
    }

    fn put(&self, data: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(data, off)
            .map_err(|e| Error::target(format!("writing {off}+{} of {}", data.len(), self.label), e))?;
        self.written.set(self.written.get() + data.len() as u64);
        Ok(())
    }

    /// Writes `data` at `off`, leaving all-zero MiBs as holes.
    fn put_sparse(&self, data: &[u8], off: u64) -> Result<()> {
        for (i, piece) in data.chunks(MIB as usize).enumerate() {
            if !crate::chunk::is_all_zero(piece) {
                self.put(piece, off + i as u64 * MIB)?;
            }
        }
        Ok(())
    }

    /// Writes the fixed structures and syncs; returns the file's size.
    fn finish(&self, meta: &Metadata, bat: &[u64]) -> Result<u64> {
        let bat_bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        let bat_len = ((bat_bytes.len() as u64 + MIB - 1) / MIB).max(1) * MIB;
        self.put(&bat_bytes, BAT_OFFSET)?;
        self.put(&build_metadata(meta), METADATA_OFFSET)?;
        let regions = [
            Region { guid: known_guid(BAT_GUID), offset: BAT_OFFSET, length: bat_len as u32, required: true },
            Region { guid: known_guid(METADATA_GUID), offset: METADATA_OFFSET, length: MIB as u32, required: true },
        ];
        let table = build_region_table(&regions);
        self.put(&table, 192 * 1024)?;
        self.put(&table, 256 * 1024)?;
        self.file.set_len(self.next).map_err(|e| Error::target(format!("sizing {}", self.label), e))?;
        self.file.sync_data().map_err(|e| Error::target(format!("syncing {}", self.label), e))?;
        let mut ident = vec![0u8; 64 * 1024];
        ident[0..8].copy_from_slice(b"vhdxfile");
        for (i, u) in "vmbackup".encode_utf16().enumerate() {
            ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        self.put(&ident, 0)?;
        let mut h = Header {
            sequence: 1,
            file_write: Guid::random(),
            data_write: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH,
            log_offset: LOG_OFFSET,
        };
        self.put(&build_header(&h), 64 * 1024)?;
        h.sequence = 2;
        self.put(&build_header(&h), 128 * 1024)?;
        self.file.sync_all().map_err(|e| Error::target(format!("syncing {}", self.label), e))?;
        Ok(self.next)
    }
}

fn intersects(ext: &[Extent], start: u64, end: u64) -> bool {
    let i = ext.partition_point(|e| e.end() <= start);
    ext.get(i).is_some_and(|e| e.start < end)
}

fn check_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
        return Err(Error::InvalidInput(format!(
            "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    Ok(())
}

fn metadata(size: u64, block_size: u32, locator: Vec<(String, String)>) -> Result<Metadata> {
    if size % 512 != 0 || size > 64 << 40 {
        return Err(Error::InvalidInput(format!(
            "a VHDX disk must be a multiple of 512 bytes up to 64 TiB; this one has {size} bytes"
        )));
    }
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: false,
        has_parent: !locator.is_empty(),
        virtual_size: size,
        logical_sector: 512,
        physical_sector: 4096,
        disk_id: Guid::random(),
        parent_locator: locator,
    })
}

/// Writes `src` as a new dynamic VHDX at `path`; returns the bytes written.
pub fn write_vhdx(
    src: &dyn DiskSource,
    path: &Path,
    block_size: u32,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<u64> {
    write_vhdx_with(src, path, block_size, RESTORE_IN_FLIGHT, progress, cancel)
}

/// [`write_vhdx`] reading `in_flight` pieces of the source at once (a
/// backup: its chunks, each read and decompressed on a worker) while one
/// thread writes the payload blocks in disk order.
pub fn write_vhdx_with(
    src: &dyn DiskSource,
    path: &Path,
    block_size: u32,
    in_flight: usize,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<u64> {
    check_block_size(block_size)?;
    let size = src.size();
    let meta = metadata(size, block_size, Vec::new())?;
    let ratio = chunk_ratio(512, block_size);
    let mut bat = vec![0u64; bat_entries(size, block_size, ratio, false) as usize];
    let bs = block_size as u64;
    let alloc = crate::extents::normalize(&src.allocated()?, size)?;
    // The pieces a payload block is read in: the source's own blocks where
    // they divide the payload block (handed out whole, not copied), else MiBs.
    let shared = src.shared_block_size().filter(|p| *p > 0 && bs % *p == 0);
    let piece = shared.unwrap_or(MIB);
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for b in 0..(size + bs - 1) / bs {
        let (start, end) = (b * bs, (b * bs + bs).min(size));
        if intersects(&alloc, start, end) {
            pieces.extend((start..end).step_by(piece as usize).map(|p| (p, piece.min(end - p))));
        }
    }
    let mut w = Writer::create(path)?;
    w.next = BAT_OFFSET + ((bat.len() as u64 * 8 + MIB - 1) / MIB).max(1) * MIB;
    let mut ticker = Ticker::new(progress, cancel, pieces.iter().map(|p| p.1).sum());
    let mut buf = vec![0u8; bs.min(size) as usize];
    // The payload block being assembled, and whether it holds a non-zero byte.
    let mut current: Option<(u64, bool)> = None;
    let mut flush = |w: &mut Writer, buf: &mut [u8], b: u64, data: bool| -> Result<()> {
        let len = bs.min(size - b * bs) as usize;
        if data {
            w.put_sparse(&buf[..len], w.next)?;
            bat[payload_index(b, ratio) as usize] = PAYLOAD_FULLY_PRESENT | ((w.next / MIB) << 20);
            w.next += bs; // a whole block, even the last, partial one
        }
        buf[..len].fill(0);
        Ok(())
    };
    let read = |&(off, len): &(u64, u64)| -> Result<Arc<Vec<u8>>> {
        cancel.check()?;
        match shared {
            Some(p) => src.shared_block(off / p),
            None => {
                let mut v = vec![0u8; len as usize];
                src.read_at(&mut v, off)?;
                Ok(Arc::new(v))
            }
        }
    };
    let in_flight = in_flight.max(1);
    ordered_map(&pieces, in_flight, 2 * in_flight, read, |k, data| {
        let (off, len) = pieces[k];
        if data.len() as u64 != len {
            return Err(Error::Internal(format!("{} bytes read for {off}+{len}", data.len())));
        }
        let b = off / bs;
        match current {
            Some((c, d)) if c != b => {
                flush(&mut w, &mut buf, c, d)?;
                current = Some((b, false));
            }
            None => current = Some((b, false)),
            _ => {}
        }
        if !is_all_zero(&data) {
            buf[(off - b * bs) as usize..][..len as usize].copy_from_slice(&data);
            current = current.map(|(c, _)| (c, true));
        }
        ticker.advance(len)
    })?;
    if let Some((c, d)) = current {
        flush(&mut w, &mut buf, c, d)?;
    }
    // Every other payload block reads as zeros. PAYLOAD_BLOCK_NOT_PRESENT
    // would leave its contents undefined ([MS-VHDX] 2.5.1.1: a reader may
    // return arbitrary data); PAYLOAD_BLOCK_ZERO defines them as zeros. Its
    // FileOffsetMB is reserved, so 0 (Hyper-V refuses anything else, as
    // qemu found: commit cdf9634b, "force FileOffsetMB field to '0'").
    for b in 0..(size + bs - 1) / bs {
        let e = &mut bat[payload_index(b, ratio) as usize];
        if *e == 0 {
            *e = PAYLOAD_ZERO;
        }
    }
    w.finish(&meta, &bat)?;
    ticker.finish()?;
    Ok(w.written.get())
}

/// Writes a differencing VHDX whose `present` byte ranges (512-byte aligned)
/// come from `src` and everything else from the parent named by `locator`.
/// Used by tests to build chains that qemu-img cannot make.
pub fn write_differencing(
    src: &dyn DiskSource,
    path: &Path,
    block_size: u32,
    present: &[(u64, u64)],
    locator: &[(String, String)],
) -> Result<std::path::PathBuf> {
    check_block_size(block_size)?;
    let size = src.size();
    let mut locator = locator.to_vec();
    if locator.is_empty() {
        locator.push(("parent_linkage".into(), Guid::ZERO.to_string()));
    }
    let meta = metadata(size, block_size, locator)?;
    let ratio = chunk_ratio(512, block_size);
    let mut bat = vec![0u64; bat_entries(size, block_size, ratio, true) as usize];
    let bs = block_size as u64;
    let mut w = Writer::create(path)?;
    w.next = BAT_OFFSET + ((bat.len() as u64 * 8 + MIB - 1) / MIB).max(1) * MIB;
    let mut bitmaps: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    for &(off, len) in present {
        if off % 512 != 0 || len % 512 != 0 || off + len > size {
            return Err(Error::InvalidInput(format!(
                "present range {off}+{len} is not sector-aligned inside the disk"
            )));
        }
        let mut data = vec![0u8; len as usize];
        src.read_at(&mut data, off)?;
        for s in off / 512..(off + len) / 512 {
            let b = s * 512 / bs;
            let i = payload_index(b, ratio) as usize;
            if bat[i] == 0 {
                bat[i] = PAYLOAD_PARTIALLY_PRESENT | ((w.next / MIB) << 20);
                w.next += bs;
            }
            let at = (bat[i] >> 20) * MIB + s * 512 % bs;
            w.put(&data[(s * 512 - off) as usize..][..512], at)?;
            let chunk = b / ratio;
            let bits = bitmaps.entry(chunk).or_insert_with(|| vec![0u8; MIB as usize]);
            let bit = s % (ratio * bs / 512);
            bits[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    for (chunk, bits) in bitmaps {
        w.put(&bits, w.next)?;
        bat[(chunk * (ratio + 1) + ratio) as usize] = SB_PRESENT | ((w.next / MIB) << 20);
        w.next += MIB;
    }
    w.finish(&meta, &bat)?;
    Ok(path.to_path_buf())
}
