//! A disk held in memory: for tests, and for tools that build a small image
//! before writing it out in another format.

use super::DiskSource;
use crate::error::{Error, Result};
use crate::extents::Extent;

/// A disk whose bytes are a `Vec<u8>`; everything counts as allocated.
pub struct MemSource(pub Vec<u8>);

impl DiskSource for MemSource {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src =
            usize::try_from(offset).ok().and_then(|o| self.0.get(o..o.checked_add(buf.len())?)).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "read {}+{} is past the end of a {}-byte disk",
                    offset,
                    buf.len(),
                    self.0.len()
                ))
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Extent>> {
        Ok(if self.0.is_empty() { vec![] } else { vec![Extent::new(0, self.size())] })
    }

    fn format(&self) -> &'static str {
        "mem"
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
