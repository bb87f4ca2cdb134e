//! A raw disk image or block device.

use super::DiskSource;
use crate::error::{Error, Result};
use crate::extents::Extent;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

/// Opens a disk image file for reading without blocking (a plain open of a
/// FIFO waits for a writer forever) and checks what it is: a regular file,
/// or a block device where `block_ok` (a disk named on the command line may
/// be one; an extent or a parent named inside an image may not). Returns the
/// file, in blocking mode again, its size, and whether it is a block device.
pub fn open_image(path: &Path, what: &str, block_ok: bool) -> Result<(File, u64, bool)> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| match e
        .kind()
    {
        ErrorKind::NotFound => Error::Source(format!("{what} {} does not exist", path.display())),
        ErrorKind::PermissionDenied => {
            Error::Source(format!("{what} {} is not readable: permission denied", path.display()))
        }
        _ => Error::source_io(format!("opening {what} {}", path.display()), e),
    })?;
    let meta = file.metadata().map_err(|e| Error::source_io(format!("reading {}", path.display()), e))?;
    let ft = meta.file_type();
    let block_device = ft.is_block_device();
    let size = if block_device && block_ok {
        // The size of a block device is where its end is.
        // SAFETY: valid descriptor; lseek has no memory effects.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(Error::source_io(format!("sizing {}", path.display()), std::io::Error::last_os_error()));
        }
        end as u64
    } else if ft.is_file() {
        meta.len()
    } else if block_ok {
        return Err(Error::Source(format!("{what} {} is neither a file nor a block device", path.display())));
    } else {
        return Err(Error::Source(format!("{what} {} is not a regular file", path.display())));
    };
    // SAFETY: valid descriptor; F_SETFL only changes the descriptor's flags.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((file, size, block_device))
}

impl FileSource {
    /// A raw image or block device named by the user.
    pub fn open(path: &Path) -> Result<FileSource> {
        Self::open_as(path, "source", true)
    }

    /// `open_image` as a source.
    pub fn open_as(path: &Path, what: &str, block_ok: bool) -> Result<FileSource> {
        let (file, size, block_device) = open_image(path, what, block_ok)?;
        Ok(FileSource { file, path: path.to_path_buf(), size, block_device })
    }
}

/// Data extents of a file from SEEK_DATA/SEEK_HOLE.
fn data_extents(fd: i32, size: u64) -> std::io::Result<Option<Vec<Extent>>> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        // SAFETY: valid descriptor; lseek has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(Some(out)), // no data after pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = hole.min(size);
        out.push(Extent::new(data as u64, (end - data) as u64));
        pos = end;
    }
    Ok(Some(out))
}

impl DiskSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::source_io(format!("reading extent {}+{} of {}", offset, buf.len(), self.path.display()), e)
        })
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        if self.block_device || self.size == 0 {
            return Ok(if self.size == 0 { vec![] } else { vec![Extent::new(0, self.size)] });
        }
        match data_extents(self.file.as_raw_fd(), self.size) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Ok(vec![Extent::new(0, self.size)]),
            Err(e) => Err(Error::source_io(format!("mapping holes of {}", self.path.display()), e)),
        }
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
