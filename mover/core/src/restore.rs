//! Restoring a disk of a backup to a raw file or a block device.
//!
//! Worker threads take blocks in turn, read and decompress their chunk,
//! check its id (wrong bytes are never written silently) and write it at its
//! offset. Zero blocks become holes in a file; on a block device they are
//! written as zeros. A file is written under a temporary name and renamed
//! when complete, so a failed restore never leaves a plausible-looking image.

use crate::chunk::ChunkId;
use crate::chunk_store::ChunkStore;
use crate::error::{Error, Result};
use crate::extents::block_len;
use crate::progress::{worker_threads, Cancel, Progress, Ticker};
use crate::repository::{check_backup_id, Repository};
use crate::source::DiskSource;
use crossbeam_channel::bounded;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    pub backup: String,
    pub disk: String,
    pub disk_size: u64,
    /// Bytes of data written (zero blocks of a file are holes, not written).
    pub bytes_written: u64,
    pub zero_blocks: u64,
    pub seconds: f64,
}

enum Target {
    /// A new file written at `tmp`, renamed to `path` at the end.
    File {
        tmp: PathBuf,
        path: PathBuf,
    },
    Device,
}

fn open_target(output: &Path, size: u64, overwrite: bool) -> Result<(File, Target)> {
    let ctx = |what: &str| format!("{what} {}", output.display());
    match fs::metadata(output) {
        Ok(m) if m.file_type().is_block_device() => {
            let f = OpenOptions::new().write(true).open(output).map_err(|e| Error::target(ctx("opening"), e))?;
            let dev = crate::source::FileSource::open(output)
                .map(|s| crate::source::DiskSource::size(&s))
                .map_err(|e| Error::InvalidInput(format!("cannot size the target device: {e}")))?;
            if dev < size {
                return Err(Error::InvalidInput(format!(
                    "{} holds {dev} bytes, the disk needs {size}",
                    output.display()
                )));
            }
            Ok((f, Target::Device))
        }
        Ok(m) if m.is_file() && m.len() > 0 && !overwrite => {
            Err(Error::InvalidInput(format!("{} exists and is not empty; refusing to overwrite it", output.display())))
        }
        Ok(m) if !m.is_file() => {
            Err(Error::InvalidInput(format!("{} is neither a regular file nor a block device", output.display())))
        }
        _ => {
            let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let tmp = dir.join(format!(".{name}.partial-{:08x}", crate::clock::random_u32()));
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Error::target(ctx("creating"), e))?;
            f.set_len(size).map_err(|e| Error::target(ctx("sizing"), e))?;
            Ok((f, Target::File { tmp, path: output.to_path_buf() }))
        }
    }
}

/// Restores disk `disk` (or the only disk) of backup `id` to `output` as an
/// image of `format` (`raw`, or one of `target::FORMATS`). The image is
/// written under a temporary name and renamed when complete.
#[allow(clippy::too_many_arguments)]
pub fn restore_disk_as(
    repo: &Repository,
    id: &str,
    disk: Option<&str>,
    output: &Path,
    format: &str,
    overwrite: bool,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreStats> {
    if format == "raw" {
        return restore_disk(repo, id, disk, output, overwrite, progress, cancel);
    }
    let t0 = Instant::now();
    let reader = crate::backup_reader::BackupReader::open(repo, id, disk)?;
    if fs::symlink_metadata(output).map(|m| !m.is_file() || (m.len() > 0 && !overwrite)).unwrap_or(false) {
        return Err(Error::InvalidInput(format!(
            "{} exists and is not an empty file; refusing to overwrite it",
            output.display()
        )));
    }
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial-{:08x}", crate::clock::random_u32()));
    let written = crate::target::write_image(format, &reader, &tmp, progress, cancel).and_then(|n| {
        fs::rename(&tmp, output).map_err(|e| Error::target(format!("renaming into {}", output.display()), e))?;
        Ok(n)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let disk_name = reader.describe();
    Ok(RestoreStats {
        backup: id.into(),
        disk: disk_name.rsplit(" disk ").next().unwrap_or_default().to_string(),
        disk_size: crate::source::DiskSource::size(&reader),
        bytes_written: written?,
        zero_blocks: reader.block_map().zero_count(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Restores disk `disk` (or the only disk) of backup `id` to `output`.
pub fn restore_disk(
    repo: &Repository,
    id: &str,
    disk: Option<&str>,
    output: &Path,
    overwrite: bool,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreStats> {
    check_backup_id(id)?;
    let t0 = Instant::now();
    let manifest = repo.load_manifest(id)?;
    let di = manifest.disk_index(disk)?;
    let dmeta = &manifest.meta.disks[di];
    let map = &manifest.maps[di];
    let bs = manifest.meta.chunk_size;
    let size = dmeta.size;
    let (file, target) = open_target(output, size, overwrite)?;
    let is_device = matches!(target, Target::Device);
    // A file gets only the stored blocks (zero blocks stay holes); a device every block.
    let work: Vec<(u64, ChunkId)> =
        if is_device { (0..map.len()).map(|i| (i, map.get(i))).collect() } else { map.stored().collect() };
    let total: u64 = work.iter().map(|(i, _)| block_len(*i, size, bs)).sum();
    let mut ticker = Ticker::new(progress, cancel, total);
    let store = ChunkStore::new(repo);
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (tx, rx) = bounded::<Result<(u64, bool)>>(64);
    let mut first_error = None;
    let mut stats = RestoreStats {
        backup: id.into(),
        disk: dmeta.name.clone(),
        disk_size: size,
        zero_blocks: map.zero_count(),
        ..Default::default()
    };
    let zeros = vec![0u8; bs as usize];

    std::thread::scope(|s| {
        for _ in 0..worker_threads() {
            let tx = tx.clone();
            let (work, next, abort, store, file, zeros) = (&work, &next, &abort, &store, &file, &zeros);
            s.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= work.len() || abort.load(Ordering::Relaxed) {
                    break;
                }
                let (i, id) = work[k];
                let off = i * bs;
                let len = block_len(i, size, bs) as usize;
                let r = write_block(store, &id, file, off, len, zeros);
                if tx.send(r.map(|_| (len as u64, id.is_zero()))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for r in rx.iter() {
            if first_error.is_some() {
                continue;
            }
            let step = r.and_then(|(len, zero)| {
                if !zero {
                    stats.bytes_written += len;
                }
                ticker.advance(len)
            });
            if let Err(e) = step {
                abort.store(true, Ordering::SeqCst);
                first_error = Some(e);
            }
        }
    });
    let result = match first_error {
        Some(e) => Err(e),
        None => cancel
            .check()
            .and_then(|_| ticker.finish())
            .and_then(|_| file.sync_all().map_err(|e| Error::target(format!("syncing {}", output.display()), e))),
    };
    match (&target, result) {
        (Target::File { tmp, path }, Ok(())) => {
            if let Err(e) = fs::rename(tmp, path) {
                let _ = fs::remove_file(tmp);
                return Err(Error::target(format!("renaming into {}", path.display()), e));
            }
        }
        (Target::File { tmp, .. }, Err(e)) => {
            let _ = fs::remove_file(tmp);
            return Err(e);
        }
        (Target::Device, r) => r?,
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

fn write_block(store: &ChunkStore, id: &ChunkId, file: &File, off: u64, len: usize, zeros: &[u8]) -> Result<()> {
    let data;
    let bytes: &[u8] = if id.is_zero() {
        &zeros[..len]
    } else {
        data = store.read(id)?;
        if data.len() != len {
            return Err(Error::CorruptChunk {
                id: id.to_hex(),
                reason: format!("{} bytes where the block map needs {len}", data.len()),
            });
        }
        &data
    };
    file.write_all_at(bytes, off).map_err(|e| Error::target(format!("writing extent {off}+{len}"), e))?;
    crate::chunk_store::start_writeback(file, off, len as u64);
    Ok(())
}
