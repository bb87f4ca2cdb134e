//! Writing a disk (any `DiskSource`, usually a `BackupReader`) as a virtual
//! disk image of another format. Raw restore has its own parallel path in
//! restore.rs; the formats here are written by one thread, in disk order.

pub mod vhdx;

use crate::error::{Error, Result};
use crate::progress::{Cancel, Progress};
use crate::source::DiskSource;
use std::path::Path;

/// Image formats a disk can be restored to besides raw.
pub const FORMATS: &[&str] = &["raw", "vhdx"];

/// Writes `src` to `output` as `format`; returns the bytes of the image file.
pub fn write_image(
    format: &str,
    src: &dyn DiskSource,
    output: &Path,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<u64> {
    if format == "vhdx" {
        return vhdx::write_vhdx(src, output, vhdx::DEFAULT_BLOCK_SIZE, progress, cancel);
    }
    Err(Error::InvalidInput(format!(
        "restoring to {format} is not supported by this version; formats: {}",
        FORMATS.join(", ")
    )))
}
