//! A disk of a backup, readable at any offset: the base of restore into
//! other formats and of serving a backup over NBD. Every chunk is checked
//! against its id when read; a few recently read chunks are kept decoded, so
//! small sequential reads do not decompress the same chunk again and again.

use crate::block_map::BlockMap;
use crate::chunk::ChunkId;
use crate::chunk_store::ChunkStore;
use crate::error::{Error, Result};
use crate::extents::{block_len, Extent};
use crate::repository::{check_backup_id, Repository};
use crate::source::DiskSource;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

const CACHED_CHUNKS: usize = 32;

pub struct BackupReader {
    store: ChunkStore,
    map: BlockMap,
    size: u64,
    block: u64,
    label: String,
    cache: Mutex<VecDeque<(ChunkId, Arc<Vec<u8>>)>>,
    /// One all-zero block, shared by every zero block handed out.
    zeros: Arc<Vec<u8>>,
}

impl BackupReader {
    /// Opens disk `disk` (or the only disk) of backup `id`.
    pub fn open(repo: &Repository, id: &str, disk: Option<&str>) -> Result<BackupReader> {
        check_backup_id(id)?;
        let m = repo.load_manifest(id)?;
        let i = m.disk_index(disk)?;
        let d = &m.meta.disks[i];
        Ok(BackupReader {
            store: ChunkStore::new(repo),
            size: d.size,
            block: m.meta.chunk_size,
            label: format!("backup {id} disk {}", d.name),
            zeros: Arc::new(vec![0u8; m.meta.chunk_size as usize]),
            map: m.maps.into_iter().nth(i).expect("disk index is valid"),
            cache: Mutex::new(VecDeque::with_capacity(CACHED_CHUNKS)),
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// The chunk ids of the disk's blocks (all-zero id: a zero block).
    pub fn block_map(&self) -> &BlockMap {
        &self.map
    }

    fn chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some((_, data)) = self.cache.lock().expect("cache").iter().find(|(c, _)| c == id) {
            return Ok(data.clone());
        }
        let data = Arc::new(self.store.read(id)?);
        let mut cache = self.cache.lock().expect("cache");
        if cache.len() == CACHED_CHUNKS {
            cache.pop_front();
        }
        cache.push_back((*id, data.clone()));
        Ok(data)
    }
}

impl DiskSource for BackupReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.size).ok_or_else(|| {
            Error::InvalidInput(format!(
                "read {}+{} is past the end of {} ({} bytes)",
                offset,
                buf.len(),
                self.label,
                self.size
            ))
        })?;
        let mut pos = offset;
        while pos < end {
            let i = pos / self.block;
            let in_block = pos - i * self.block;
            let n = (block_len(i, self.size, self.block) - in_block).min(end - pos) as usize;
            let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            let id = self.map.get(i);
            if id.is_zero() {
                out.fill(0);
            } else {
                let data = self.chunk(&id)?;
                let want = block_len(i, self.size, self.block);
                if data.len() as u64 != want {
                    return Err(Error::CorruptChunk {
                        id: id.to_hex(),
                        reason: format!("{} bytes where block {i} of {} needs {want}", data.len(), self.label),
                    });
                }
                out.copy_from_slice(&data[in_block as usize..in_block as usize + n]);
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, _) in self.map.stored() {
            let start = i * self.block;
            let len = block_len(i, self.size, self.block);
            match out.last_mut() {
                Some(last) if last.end() == start => last.length += len,
                _ => out.push(Extent::new(start, len)),
            }
        }
        Ok(out)
    }

    fn format(&self) -> &'static str {
        "backup"
    }

    fn shared_block_size(&self) -> Option<u64> {
        Some(self.block)
    }

    fn shared_block(&self, index: u64) -> Result<Arc<Vec<u8>>> {
        if index >= self.map.len() {
            return Err(Error::InvalidInput(format!("block {index} is past the end of {}", self.label)));
        }
        let id = &self.map.get(index);
        if id.is_zero() {
            return Ok(self.zeros.clone());
        }
        let data = Arc::new(self.store.read(id)?);
        if data.len() as u64 != block_len(index, self.size, self.block) {
            return Err(Error::CorruptChunk {
                id: id.to_hex(),
                reason: format!(
                    "{} bytes where block {index} of {} needs {}",
                    data.len(),
                    self.label,
                    block_len(index, self.size, self.block)
                ),
            });
        }
        Ok(data)
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}
