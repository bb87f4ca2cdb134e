//! Writing a disk (any `DiskSource`, usually a `BackupReader`) as a virtual
//! disk image of another format. Raw restore has its own path in
//! restore.rs; the formats here are written by one thread, in disk order
//! (a VHDX from pieces read by a pool, several in flight).

pub mod vhdx;
pub mod vhdx_in_place;

use crate::error::{Error, Result};
use crate::progress::{Cancel, Progress};
use crate::source::DiskSource;
use std::path::Path;

pub mod vmdk;

/// Image formats a disk can be restored to besides raw.
/// `vmdk` is streamOptimized (what vSphere imports), `vmdk-sparse` is
/// monolithicSparse (VMware Workstation, qemu), `vhdx` is a dynamic VHDX.
pub const FORMATS: &[&str] = &["raw", "vmdk", "vmdk-sparse", "vhdx"];

/// Writes `src` to `output` as `format`, reading with up to `in_flight`
/// reads at once where the format's writer can; returns the bytes written
/// (VMDK: the size of the image file, which it writes whole).
pub fn write_image(
    format: &str,
    src: &dyn DiskSource,
    output: &Path,
    in_flight: usize,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<u64> {
    match format {
        "vmdk" => return vmdk::write_vmdk(vmdk::Shape::StreamOptimized, src, output, progress, cancel),
        "vmdk-sparse" => return vmdk::write_vmdk(vmdk::Shape::MonolithicSparse, src, output, progress, cancel),
        "vhdx" => return vhdx::write_vhdx_with(src, output, vhdx::DEFAULT_BLOCK_SIZE, in_flight, progress, cancel),
        _ => {}
    }
    Err(Error::InvalidInput(format!(
        "restoring to {format} is not supported by this version; formats: {}",
        FORMATS.join(", ")
    )))
}
