//! Finding the parent of a differencing VHDX the way Hyper-V does
//! ([MS-VHDX] 2.6.2.6.1): `relative_path` (relative to the child's
//! directory) first, then `volume_path` and `absolute_win32_path`. A Windows
//! path cannot be opened here as it is, so for those we try the file name
//! beside the child (a shadow copy or a copied chain keeps files together).
//! A candidate is the parent only if its DataWriteGuid is the child's
//! `parent_linkage` (or `parent_linkage2`).

use super::guid::Guid;
use super::VhdxSource;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The last component of a Windows or POSIX path.
pub fn file_name(p: &str) -> Option<&str> {
    p.rsplit(['\\', '/']).next().filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// Candidate paths for the parent, in the order Hyper-V tries them.
pub fn candidates(child: &Path, kv: &[(String, String)]) -> Vec<PathBuf> {
    let dir = child.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut out = Vec::new();
    if let Some(rel) = get(kv, "relative_path") {
        let mut p = dir.to_path_buf();
        for part in rel.split(['\\', '/']) {
            match part {
                "" | "." => {}
                ".." => {
                    p.push("..");
                }
                x => p.push(x),
            }
        }
        out.push(p);
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(abs) = get(kv, key) {
            if abs.starts_with('/') {
                out.push(PathBuf::from(abs));
            }
            if let Some(name) = file_name(abs) {
                out.push(dir.join(name));
            }
        }
    }
    out.dedup();
    out
}

pub fn locate(child: &Path, kv: &[(String, String)], seen: &mut Vec<PathBuf>) -> Result<VhdxSource> {
    let linkage: Vec<Guid> =
        ["parent_linkage", "parent_linkage2"].iter().filter_map(|k| get(kv, k)).filter_map(Guid::parse).collect();
    if linkage.is_empty() {
        return Err(Error::Source(format!(
            "{} is a differencing VHDX without a valid parent_linkage",
            child.display()
        )));
    }
    let tried = candidates(child, kv);
    let mut mismatch = None;
    for c in &tried {
        if !c.is_file() {
            continue;
        }
        let p = VhdxSource::open_chain(c, seen)?;
        if linkage.contains(&p.data_write) {
            return Ok(p);
        }
        mismatch.get_or_insert_with(|| {
            format!(
                "{} is not the parent of {}: its DataWriteGuid is {}, the child expects {}",
                c.display(),
                child.display(),
                p.data_write,
                linkage[0]
            )
        });
    }
    Err(Error::Source(mismatch.unwrap_or_else(|| {
        let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        format!(
            "the parent of differencing disk {} was not found (tried: {})",
            child.display(),
            if names.is_empty() { "no locator entries".to_string() } else { names.join(", ") }
        )
    })))
}
