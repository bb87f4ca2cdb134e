//! Writing into an existing dynamic or fixed VHDX in place ([MS-VHDX]): the
//! in-place rollback of a Hyper-V VM's disk, where only the blocks that
//! differ from the backup point are written (restore.rs decides which).
//!
//! What is refused before anything is written, so the caller can fall back
//! to writing the disk whole into a new file: a differencing VHDX (its
//! blocks live partly in the parent), a file whose log is not empty
//! (LogGuid non-zero: Hyper-V has not replayed it, so what the file says
//! and what the disk reads may differ), a virtual size other than the
//! point's disk, a file that is not a valid VHDX.
//!
//! How the file is changed:
//! - The headers are updated before the first modification (2.2.2.1): a
//!   new FileWriteGuid and DataWriteGuid (2.2.2: the guest-visible data
//!   changes), the sequence number one up, the CRC-32C recomputed, written
//!   over the non-current header and flushed, then a second time so both
//!   headers are current. A restore that finds nothing different leaves the
//!   file untouched.
//! - Data of a payload block that is present (PAYLOAD_BLOCK_FULLY_PRESENT)
//!   is written where it is. Payload data is never logged (2.3).
//! - A payload block in any other state (not present, zero, unmapped,
//!   undefined: they read as zeros here, as in Hyper-V and qemu) that must
//!   hold data gets a new block at the end of the file, 1 MiB aligned
//!   (2.1), its BAT entry set to FULLY_PRESENT with that offset (2.5.1);
//!   the rest of the new block is a hole of the host file and reads as zeros.
//! - Zeros that must replace data in a present block are written there
//!   (punched out of the host file where it can, for a dynamic disk), the
//!   block stays FULLY_PRESENT: a fixed disk's blocks stay allocated
//!   (2.6.2.1 LeaveBlockAllocated) and PAYLOAD_BLOCK_ZERO (2.5.1.1) would
//!   need the whole payload block zero and leave its space unused.
//! - The BAT changes go through the log (2.3: every metadata update but the
//!   headers): the data is flushed, a new LogGuid put in the headers, the
//!   changed 4 KiB BAT sectors written as one log entry and flushed, then
//!   to the BAT and flushed, then LogGuid set back to zero (the log is
//!   empty). A crash in between leaves a log Hyper-V (and our reader)
//!   replays.

use crate::error::{Error, Result};
use crate::source::vhdx::guid::Guid;
use crate::source::vhdx::{
    build_header, build_log_entry, current_header, parse_header, payload_index, Header, Layout, VhdxSource,
    HEADER_OFFSETS, HEADER_SIZE, MIB, PAYLOAD_FULLY_PRESENT,
};
use crate::source::DiskSource;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const SECTOR: u64 = 4096;
const LOG_NOT_EMPTY: &str = "its log is not empty (LogGuid is set); let Hyper-V open the disk once to replay it";

/// What the single writer changes as it goes.
struct State {
    header: Header,
    /// Which of the two header slots holds `header`.
    slot: usize,
    /// The headers were updated for this session (first modification).
    begun: bool,
    bat: Vec<u64>,
    /// BAT sectors (4 KiB, index within the BAT region) changed in memory.
    dirty: BTreeSet<u64>,
    /// Where the next new payload block goes (1 MiB aligned end of file).
    next: u64,
}

/// An existing dynamic or fixed VHDX opened for writing in place.
pub struct VhdxInPlace {
    /// Reads the disk as it was when opened (the BAT read then): each block
    /// is read once, before it is written, so later writes never mislead it.
    src: VhdxSource,
    file: File,
    path: PathBuf,
    block_size: u64,
    ratio: u64,
    fixed: bool,
    bat_offset: u64,
    state: Mutex<State>,
}

fn refuse(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{} cannot be written in place as a VHDX: {why}", path.display()))
}

impl VhdxInPlace {
    /// Opens `path` for writing in place, or refuses (InvalidInput, nothing
    /// written) a file that is not a valid dynamic or fixed VHDX of `size`
    /// bytes with an empty log.
    pub fn open(path: &Path, size: u64) -> Result<VhdxInPlace> {
        let m = std::fs::metadata(path).map_err(|e| refuse(path, std::io::Error::from(e.kind())))?;
        if !m.is_file() {
            return Err(refuse(path, "it is not a regular file"));
        }
        // The log first: opening replays it in memory, and a log that does
        // not replay would hide the reason for refusing.
        if let Ok(f) = File::open(path) {
            let read = |off: u64| {
                let mut b = vec![0u8; HEADER_SIZE];
                f.read_exact_at(&mut b, off).map_err(|e| e.to_string()).and_then(|_| parse_header(&b))
            };
            if let Ok(h) = current_header(read(HEADER_OFFSETS[0]), read(HEADER_OFFSETS[1])) {
                if !h.log_guid.is_zero() {
                    return Err(refuse(path, LOG_NOT_EMPTY));
                }
            }
        }
        let (src, layout) = VhdxSource::open_single(path).map_err(|e| match e {
            Error::Source(m) => refuse(path, m),
            e => e,
        })?;
        let Layout { header, meta, bat, bat_offset, ratio, file_len } = layout;
        if meta.has_parent {
            return Err(refuse(path, "it is a differencing disk (its blocks are partly in its parent)"));
        }
        if !header.log_guid.is_zero() {
            return Err(refuse(path, LOG_NOT_EMPTY));
        }
        if meta.virtual_size != size {
            return Err(refuse(path, format!("it holds {} bytes, the point's disk {size}", meta.virtual_size)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::target(format!("opening {}", path.display()), e))?;
        // Which slot holds the current header (the source picked the same one).
        let read = |off: u64| -> Result<Vec<u8>> {
            let mut b = vec![0u8; HEADER_SIZE];
            file.read_exact_at(&mut b, off).map_err(|e| Error::target(format!("reading {}", path.display()), e))?;
            Ok(b)
        };
        let (h1, h2) = (parse_header(&read(HEADER_OFFSETS[0])?), parse_header(&read(HEADER_OFFSETS[1])?));
        let slot = match (&h1, &h2) {
            (Ok(a), Ok(b)) if b.sequence > a.sequence => 1,
            (Ok(_), _) => 0,
            _ => 1,
        };
        let current = current_header(h1, h2).map_err(|e| refuse(path, e))?;
        if current != header {
            return Err(refuse(path, "its headers changed while it was being opened"));
        }
        let next = (file_len + MIB - 1) / MIB * MIB;
        Ok(VhdxInPlace {
            src,
            file,
            path: path.to_path_buf(),
            block_size: meta.block_size as u64,
            ratio,
            fixed: meta.leave_blocks_allocated,
            bat_offset,
            state: Mutex::new(State { header, slot, begun: false, bat, dirty: BTreeSet::new(), next }),
        })
    }

    pub fn size(&self) -> u64 {
        self.src.size()
    }

    /// A fixed VHDX (LeaveBlockAllocated): zeros are written, never punched.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Reads the disk as it was when opened.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.src.read_at(buf, off)
    }

    fn err(&self, what: &str, e: std::io::Error) -> Error {
        Error::target(format!("{what} {}", self.path.display()), e)
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.err("syncing", e))
    }

    /// One header update (2.2.2.1): `change`, sequence + 1, over the
    /// non-current slot, flushed; then the same again so both slots agree.
    fn update_headers(&self, st: &mut State, change: impl Fn(&mut Header)) -> Result<()> {
        for _ in 0..2 {
            let mut h = st.header.clone();
            change(&mut h);
            h.sequence = st.header.sequence + 1;
            let slot = 1 - st.slot;
            self.file
                .write_all_at(&build_header(&h), HEADER_OFFSETS[slot])
                .map_err(|e| self.err("writing the header of", e))?;
            self.sync()?;
            st.header = h;
            st.slot = slot;
        }
        Ok(())
    }

    /// Before the first modification: new FileWriteGuid and DataWriteGuid.
    fn begin(&self, st: &mut State) -> Result<()> {
        if !st.begun {
            let (fw, dw) = (Guid::random(), Guid::random());
            self.update_headers(st, |h| {
                h.file_write = fw;
                h.data_write = dw;
            })?;
            st.begun = true;
        }
        Ok(())
    }

    /// The file offset of virtual offset `off`'s payload block, allocating
    /// a new block at the end of the file if `alloc` and it has none.
    fn block_at(&self, st: &mut State, off: u64, alloc: bool) -> Option<u64> {
        let i = payload_index(off / self.block_size, self.ratio) as usize;
        let e = st.bat[i];
        if e & 7 == PAYLOAD_FULLY_PRESENT {
            return Some((e >> 20) * MIB);
        }
        if !alloc {
            return None;
        }
        let at = st.next;
        st.next += self.block_size;
        st.bat[i] = PAYLOAD_FULLY_PRESENT | ((at / MIB) << 20);
        st.dirty.insert(i as u64 * 8 / SECTOR);
        Some(at)
    }

    /// Writes `data` at virtual offset `off`; returns the bytes written
    /// (zeros bound for a block without data are not: it reads as zeros).
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<u64> {
        let mut st = self.state.lock().expect("in-place VHDX state");
        let mut pos = 0usize;
        let mut written = 0u64;
        while pos < data.len() {
            let v = off + pos as u64;
            let n = ((self.block_size - v % self.block_size) as usize).min(data.len() - pos);
            let piece = &data[pos..pos + n];
            if self.block_at(&mut st, v, false).is_none() && crate::chunk::is_all_zero(piece) {
                pos += n;
                continue;
            }
            self.begin(&mut st)?;
            let at = self.block_at(&mut st, v, true).expect("allocated") + v % self.block_size;
            self.file.write_all_at(&data[pos..pos + n], at).map_err(|e| self.err(&format!("writing {v}+{n} of"), e))?;
            crate::chunk_store::start_writeback(&self.file, at, n as u64);
            pos += n;
            written += n as u64;
        }
        Ok(written)
    }

    /// Makes `off..off+len` read as zeros; returns (bytes written, bytes
    /// punched). Blocks without data read as zeros already.
    pub fn zero(&self, off: u64, len: u64) -> Result<(u64, u64)> {
        let mut st = self.state.lock().expect("in-place VHDX state");
        let (mut written, mut punched) = (0, 0);
        let mut v = off;
        while v < off + len {
            let n = (self.block_size - v % self.block_size).min(off + len - v);
            if let Some(base) = self.block_at(&mut st, v, false) {
                self.begin(&mut st)?;
                let at = base + v % self.block_size;
                if !self.fixed && crate::restore::punch_hole(&self.file, at, n) {
                    punched += n;
                } else {
                    self.file
                        .write_all_at(&vec![0u8; n as usize], at)
                        .map_err(|e| self.err(&format!("writing zeros at {v}+{n} of"), e))?;
                    written += n;
                }
            }
            v += n;
        }
        Ok((written, punched))
    }

    /// Makes the writes durable and the BAT current (through the log), and
    /// leaves the log empty. Nothing to do if nothing was written.
    pub fn finish(&self) -> Result<()> {
        let mut st = self.state.lock().expect("in-place VHDX state");
        if !st.begun {
            return Ok(());
        }
        let len = self.file.metadata().map_err(|e| self.err("sizing", e))?.len();
        if st.next > len {
            // New blocks end in holes; the file holds each block whole.
            self.file.set_len(st.next).map_err(|e| self.err("extending", e))?;
        }
        self.sync()?;
        if !st.dirty.is_empty() {
            self.write_bat(&mut st)?;
        }
        self.file.sync_all().map_err(|e| self.err("syncing", e))
    }

    /// The changed BAT sectors, through the log (2.3), in as many entries
    /// as the log needs.
    fn write_bat(&self, st: &mut State) -> Result<()> {
        let (log_off, log_len) = (st.header.log_offset, st.header.log_length as u64);
        // Sectors per entry: descriptor sectors (64-byte header, 32 bytes
        // per descriptor) plus one data sector per BAT sector.
        let mut per_entry = 0u64;
        while ((64 + 32 * (per_entry + 1) + SECTOR - 1) / SECTOR + per_entry + 1) * SECTOR <= log_len {
            per_entry += 1;
        }
        if per_entry == 0 {
            return Err(Error::Internal(format!("{}: a log of {log_len} bytes holds no entry", self.path.display())));
        }
        let guid = Guid::random();
        self.update_headers(st, |h| h.log_guid = guid)?;
        let dirty: Vec<u64> = st.dirty.iter().copied().collect();
        let file_len = st.next.max(self.file.metadata().map_err(|e| self.err("sizing", e))?.len());
        for (k, batch) in dirty.chunks(per_entry as usize).enumerate() {
            let mut sectors = Vec::with_capacity(batch.len());
            for &s in batch {
                let at = self.bat_offset + s * SECTOR;
                let mut b = vec![0u8; SECTOR as usize];
                self.file.read_exact_at(&mut b, at).map_err(|e| self.err("reading the BAT of", e))?;
                for (j, e) in b.chunks_exact_mut(8).enumerate() {
                    if let Some(v) = st.bat.get((s * SECTOR / 8) as usize + j) {
                        e.copy_from_slice(&v.to_le_bytes());
                    }
                }
                sectors.push((at, b));
            }
            // Each entry starts the log afresh (tail = its own offset, 0):
            // the entries before it are applied and flushed already.
            let entry = build_log_entry(&guid, k as u64 + 1, 0, &sectors, &[], file_len);
            self.file.write_all_at(&entry, log_off).map_err(|e| self.err("writing the log of", e))?;
            self.sync()?;
            #[cfg(test)]
            if tests::CRASH_AFTER_LOG.with(|c| c.get()) {
                return Err(Error::Internal("crashed after the log write (test)".into()));
            }
            for (at, b) in &sectors {
                self.file.write_all_at(b, *at).map_err(|e| self.err("writing the BAT of", e))?;
            }
            self.sync()?;
        }
        st.dirty.clear();
        self.update_headers(st, |h| h.log_guid = Guid::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupSession, DiskRequest};
    use crate::progress::{Cancel, NoProgress};
    use crate::repository::Repository;
    use crate::restore::{restore, RestoreOptions, RestoreStats};
    use crate::source::MemSource;
    use std::process::Command;

    /// A 24 MiB disk: data in most MiBs, zeros in a few.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 24 * MIB as usize];
        for (i, m) in d.chunks_mut(MIB as usize).enumerate() {
            if i % 5 != 2 {
                m.iter_mut().enumerate().for_each(|(k, b)| *b = (i as u8 + 1) ^ (k % 253) as u8);
            }
        }
        d
    }

    fn point(dir: &Path, chunk: u64, d: &[u8]) -> (Repository, String) {
        let repo = Repository::init(&dir.join("repo"), chunk, "zstd:1").unwrap();
        let session = BackupSession::begin(&repo, "vm", None).unwrap();
        let req = DiskRequest { name: "scsi0:0".into(), ..Default::default() };
        session.add_disk(&MemSource(d.to_vec()), &req, &mut NoProgress, &Cancel::new()).unwrap();
        let id = session.commit(serde_json::Value::Null, serde_json::Value::Null).unwrap().id;
        (repo, id)
    }

    fn qemu(args: &[&str]) -> String {
        let out = Command::new(args[0]).args(&args[1..]).output().expect("qemu-utils installed");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    }

    /// `raw` made into a VHDX by qemu-img (`subformat` dynamic or fixed, 1 MiB blocks).
    fn vhdx_of(dir: &Path, name: &str, raw: &[u8], subformat: &str) -> PathBuf {
        let r = dir.join(format!("{name}.raw"));
        std::fs::write(&r, raw).unwrap();
        let v = dir.join(format!("{name}.vhdx"));
        let o = format!("subformat={subformat},block_size=1M");
        qemu(&["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", &o, r.to_str().unwrap(), v.to_str().unwrap()]);
        v
    }

    fn roll_back(repo: &Repository, id: &str, target: &Path) -> Result<RestoreStats> {
        let opts = RestoreOptions { format: "vhdx".into(), existing: true, compare: true, ..Default::default() };
        restore(repo, id, None, target, &opts, &mut NoProgress, &Cancel::new())
    }

    /// The VHDX is sound for qemu and reads as `raw` (qemu's reader and ours).
    fn assert_equals(dir: &Path, v: &Path, raw: &[u8]) {
        qemu(&["qemu-img", "check", "-f", "vhdx", v.to_str().unwrap()]);
        let r = dir.join("expected.raw");
        std::fs::write(&r, raw).unwrap();
        let out = qemu(&["qemu-img", "compare", "-f", "vhdx", "-F", "raw", v.to_str().unwrap(), r.to_str().unwrap()]);
        assert!(out.contains("identical"), "{out}");
        let s = VhdxSource::open(v).unwrap();
        let mut back = vec![0u8; raw.len()];
        s.read_at(&mut back, 0).unwrap();
        assert!(back == raw, "our reader disagrees");
    }

    fn header_of(v: &Path) -> Header {
        let f = File::open(v).unwrap();
        let read = |off| {
            let mut b = vec![0u8; HEADER_SIZE];
            f.read_exact_at(&mut b, off).unwrap();
            parse_header(&b)
        };
        let (a, b) = (read(HEADER_OFFSETS[0]).unwrap(), read(HEADER_OFFSETS[1]).unwrap());
        assert_eq!(a.sequence.abs_diff(b.sequence), 1, "both headers valid, one apart");
        current_header(Ok(a), Ok(b)).unwrap()
    }

    /// The live disk after the point: a few bytes changed inside data, one
    /// data MiB gone (zeros: the block is not in the live file), data
    /// written where the point has zeros.
    fn changed(d: &[u8]) -> Vec<u8> {
        let mut live = d.to_vec();
        live[3 * MIB as usize + 100..3 * MIB as usize + 4196].fill(0xEE);
        live[9 * MIB as usize..10 * MIB as usize].fill(0);
        live[12 * MIB as usize + 5000..12 * MIB as usize + 9000].fill(0x42);
        live
    }

    fn rolls_back_only_what_differs(subformat: &str, chunk: u64) {
        let dir = tempfile::tempdir().unwrap();
        let d = disk();
        let (repo, id) = point(dir.path(), chunk, &d);
        let v = vhdx_of(dir.path(), "live", &changed(&d), subformat);
        let before = header_of(&v);
        let len = std::fs::metadata(&v).unwrap().len();
        let s = roll_back(&repo, &id, &v).unwrap();
        assert_equals(dir.path(), &v, &d);
        // The blocks that differ: one rewritten, the MiB gone (allocated
        // anew in a dynamic disk; present in a fixed one), one made zeros
        // again (with 2 MiB chunks, a chunk that holds data as well).
        let blocks = d.len() as u64 / chunk;
        let differ = 2 + (MIB / chunk).max(1);
        assert_eq!(s.blocks_compared, blocks);
        assert_eq!(s.blocks_written, differ, "{s:?}");
        assert_eq!(s.blocks_skipped, blocks - differ);
        // Zeros bound for a block the file does not hold are not written.
        let skipped_zeros = if chunk > MIB { MIB } else { 0 };
        assert_eq!(s.bytes_written + s.bytes_punched, differ * chunk - skipped_zeros, "{s:?}");
        assert!(s.bytes_written >= (differ - 1) * chunk - skipped_zeros, "{s:?}");
        let grown = std::fs::metadata(&v).unwrap().len() - len;
        if subformat == "fixed" {
            assert_eq!(s.bytes_punched, 0, "a fixed disk's blocks stay allocated");
            // qemu-img convert leaves the MiB gone PAYLOAD_BLOCK_ZERO even in
            // a fixed VHDX (Hyper-V's fixed disks have every block present).
            assert!(grown <= MIB, "grew {grown}");
        } else {
            assert_eq!(grown, MIB, "one new 1 MiB block for the MiB gone");
        }
        let after = header_of(&v);
        assert!(after.sequence > before.sequence);
        assert_ne!(after.file_write, before.file_write);
        assert_ne!(after.data_write, before.data_write);
        assert!(after.log_guid.is_zero(), "the log is left empty");
        // Again: nothing differs, nothing is written, the file is untouched.
        let bytes = std::fs::read(&v).unwrap();
        let s = roll_back(&repo, &id, &v).unwrap();
        assert_eq!((s.bytes_written, s.bytes_punched, s.blocks_written), (0, 0, 0));
        assert!(std::fs::read(&v).unwrap() == bytes, "a restore that finds nothing different changes nothing");
    }

    #[test]
    fn a_dynamic_vhdx_gets_only_the_differing_blocks() {
        rolls_back_only_what_differs("dynamic", 256 * 1024);
    }

    #[test]
    fn chunks_larger_than_the_vhdx_block_span_several_blocks() {
        rolls_back_only_what_differs("dynamic", 2 * MIB);
    }

    #[test]
    fn a_fixed_vhdx_is_written_in_place_without_allocating() {
        rolls_back_only_what_differs("fixed", 256 * 1024);
    }

    #[test]
    fn blocks_absent_from_the_target_are_allocated_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk();
        let (repo, id) = point(dir.path(), 256 * 1024, &d);
        // An empty live disk: every data block of the point is new to it.
        let v = vhdx_of(dir.path(), "empty", &vec![0u8; d.len()], "dynamic");
        let len = std::fs::metadata(&v).unwrap().len();
        let s = roll_back(&repo, &id, &v).unwrap();
        assert_equals(dir.path(), &v, &d);
        let data_mibs = d.chunks(MIB as usize).filter(|m| !crate::chunk::is_all_zero(m)).count() as u64;
        assert_eq!(s.bytes_written, data_mibs * MIB);
        assert_eq!(s.bytes_punched, 0);
        let grown = std::fs::metadata(&v).unwrap().len() - len;
        assert!(grown >= data_mibs * MIB && grown % MIB == 0, "grew {grown}");
    }

    thread_local! {
        /// Stop after the log entry is flushed, before the BAT is written.
        pub static CRASH_AFTER_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn a_crash_after_the_log_write_is_replayed_by_qemu_and_by_our_reader() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk();
        let (repo, id) = point(dir.path(), 256 * 1024, &d);
        let v = vhdx_of(dir.path(), "empty", &vec![0u8; d.len()], "dynamic");
        CRASH_AFTER_LOG.with(|c| c.set(true));
        let e = roll_back(&repo, &id, &v).unwrap_err();
        CRASH_AFTER_LOG.with(|c| c.set(false));
        assert!(e.to_string().contains("crashed"), "{e}");
        assert!(!header_of(&v).log_guid.is_zero(), "the log holds the BAT update");
        // Our reader replays it in memory; an in-place restore refuses it.
        let s = VhdxSource::open(&v).unwrap();
        assert_eq!(s.log_entries_replayed(), 1);
        let mut back = vec![0u8; d.len()];
        s.read_at(&mut back, 0).unwrap();
        assert!(back == d, "the replayed log gives the point");
        assert!(roll_back(&repo, &id, &v).unwrap_err().to_string().contains("log is not empty"));
        // qemu replays it into the file (as Hyper-V would on open).
        qemu(&["qemu-img", "check", "-r", "all", "-f", "vhdx", v.to_str().unwrap()]);
        assert_equals(dir.path(), &v, &d);
    }

    #[test]
    fn a_vhdx_whose_log_is_not_empty_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk();
        let (repo, id) = point(dir.path(), 256 * 1024, &d);
        let v = vhdx_of(dir.path(), "dirty", &changed(&d), "dynamic");
        let mut h = header_of(&v);
        h.log_guid = Guid::random();
        h.sequence += 1;
        // No entry with that guid in the log (a crash between a header
        // update and the first log write): still "not empty" here.
        let f = OpenOptions::new().write(true).open(&v).unwrap();
        f.write_all_at(&build_header(&h), HEADER_OFFSETS[0]).unwrap();
        h.sequence += 1;
        f.write_all_at(&build_header(&h), HEADER_OFFSETS[1]).unwrap();
        let bytes = std::fs::read(&v).unwrap();
        let e = roll_back(&repo, &id, &v).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
        assert!(e.to_string().contains("log is not empty"), "{e}");
        assert!(std::fs::read(&v).unwrap() == bytes);
    }

    #[test]
    fn a_differencing_vhdx_or_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk();
        let (repo, id) = point(dir.path(), 256 * 1024, &d);
        let child = dir.path().join("child.vhdx");
        crate::target::vhdx::write_differencing(&MemSource(d.clone()), &child, MIB as u32, &[(0, 4096)], &[]).unwrap();
        let e = roll_back(&repo, &id, &child).unwrap_err();
        assert!(e.to_string().contains("differencing"), "{e}");
        let small = vhdx_of(dir.path(), "small", &d[..8 * MIB as usize], "dynamic");
        let e = roll_back(&repo, &id, &small).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("bytes"), "{e}");
        let raw = dir.path().join("not.vhdx");
        std::fs::write(&raw, &d).unwrap();
        let e = roll_back(&repo, &id, &raw).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    }
}
