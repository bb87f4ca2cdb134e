//! The VMDK descriptor: a small text file (or the text embedded in a sparse
//! extent) naming the disk's type, its parent and its extents, e.g.
//!
//! ```text
//! # Disk DescriptorFile
//! CID=7dbc71c
//! parentCID=ffffffff
//! createType="twoGbMaxExtentFlat"
//! RW 4192256 FLAT "disk-f001.vmdk" 0
//! RW 1000 ZERO
//! ```

/// Descriptors are a few hundred bytes; even a 62 TiB twoGbMaxExtent disk's
/// (31,000 extent lines) stays far below this.
pub const MAX_DESCRIPTOR_BYTES: u64 = 4 << 20;
/// The first line of every descriptor VMware and qemu write.
pub const SIGNATURE: &str = "# Disk DescriptorFile";
/// parentCID of a disk without a parent.
pub const NO_PARENT: &str = "ffffffff";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    /// Sectors of the virtual disk the extent covers.
    pub sectors: u64,
    /// FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, VMFSRDM, VMFSRAW, SESPARSE, ...
    pub kind: String,
    /// File name, relative to the descriptor's directory (none for ZERO).
    pub file: Option<String>,
    /// Sector of the extent file where the extent starts (FLAT only).
    pub offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub cid: Option<String>,
    pub parent_cid: Option<String>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// Whether the disk is a delta of a parent.
    pub fn has_parent(&self) -> bool {
        matches!(&self.parent_cid, Some(p) if !p.eq_ignore_ascii_case(NO_PARENT))
    }

    /// Sectors of all extents, if that fits in 64 bits of bytes.
    pub fn total_sectors(&self) -> Option<u64> {
        let mut t: u64 = 0;
        for e in &self.extents {
            t = t.checked_add(e.sectors)?;
        }
        t.checked_mul(512).map(|_| t)
    }
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// Parses descriptor text. Unknown keys (the disk database `ddb.*`, ...)
/// are ignored; a malformed extent line is an error naming the line.
pub fn parse(text: &str) -> Result<Descriptor, String> {
    let mut d = Descriptor::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let access = match first {
            "RW" => Some(Access::ReadWrite),
            "RDONLY" => Some(Access::ReadOnly),
            "NOACCESS" => Some(Access::NoAccess),
            _ => None,
        };
        if let Some(access) = access {
            let e = parse_extent(access, line[first.len()..].trim_start())
                .map_err(|e| format!("line {}: {e}: {}", n + 1, truncate(line)))?;
            d.extents.push(e);
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = unquote(v).to_string();
            match k.trim() {
                "createType" => d.create_type = v,
                "CID" => d.cid = Some(v),
                "parentCID" => d.parent_cid = Some(v),
                "parentFileNameHint" => d.parent_hint = Some(v),
                _ => {}
            }
        }
    }
    if d.extents.is_empty() {
        return Err("no extent lines".into());
    }
    if d.total_sectors().is_none() {
        return Err("the extents add up to more than 2^64 bytes".into());
    }
    Ok(d)
}

fn truncate(line: &str) -> String {
    line.chars().take(120).collect()
}

fn parse_extent(access: Access, rest: &str) -> Result<ExtentLine, String> {
    let mut it = rest.splitn(2, char::is_whitespace);
    let sectors = it.next().unwrap_or("");
    let sectors: u64 = sectors.parse().map_err(|_| format!("{sectors:?} is not a sector count"))?;
    let rest = it.next().unwrap_or("").trim_start();
    let mut it = rest.splitn(2, char::is_whitespace);
    let kind = it.next().unwrap_or("").to_ascii_uppercase();
    if kind.is_empty() {
        return Err("no extent type".into());
    }
    let rest = it.next().unwrap_or("").trim();
    let (file, rest) = if let Some(q) = rest.strip_prefix('"') {
        let end = q.find('"').ok_or("the file name's quote is not closed")?;
        (Some(q[..end].to_string()), q[end + 1..].trim())
    } else if rest.is_empty() {
        (None, "")
    } else {
        return Err("the file name is not quoted".into());
    };
    if kind != "ZERO" && file.as_deref().is_none_or(str::is_empty) {
        return Err(format!("a {kind} extent needs a file name"));
    }
    let offset = match rest.split_whitespace().next() {
        None => 0,
        Some(o) => o.parse().map_err(|_| format!("{o:?} is not a sector offset"))?,
    };
    Ok(ExtentLine { access, sectors, kind, file, offset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_qemu_descriptor() {
        let d = parse(
            "# Disk DescriptorFile\nversion=1\nCID=9d6fddfa\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n\
             # Extent description\nRW 4194240 FLAT \"a b-f001.vmdk\" 0\nRW 10 FLAT \"x-f002.vmdk\" 7\nRW 8 ZERO\n\
             ddb.adapterType = \"ide\"\n",
        )
        .unwrap();
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert!(!d.has_parent());
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("a b-f001.vmdk"));
        assert_eq!(d.extents[1].offset, 7);
        assert_eq!(d.extents[2].kind, "ZERO");
        assert_eq!(d.total_sectors(), Some(4194258));
    }

    #[test]
    fn parent_is_seen() {
        let d = parse("CID=1\nparentCID=abcd\nparentFileNameHint=\"base.vmdk\"\nRW 8 SPARSE \"d.vmdk\"\n").unwrap();
        assert!(d.has_parent());
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
    }

    #[test]
    fn refuses_bad_lines() {
        assert!(parse("RW x FLAT \"a\" 0").is_err());
        assert!(parse("RW 8 FLAT a").is_err());
        assert!(parse("RW 8 FLAT \"a").is_err());
        assert!(parse("RW 8 FLAT").is_err());
        assert!(parse("RW 8 FLAT \"a\" zz").is_err());
        assert!(parse("createType=\"x\"").is_err());
        assert!(parse("RW 18446744073709551615 ZERO").is_err());
        assert!(parse("RW 18446744073709551615 ZERO\nRW 1 ZERO").is_err());
    }

    proptest! {
        #[test]
        fn any_text_parses_or_fails_without_panic(s in "\\PC{0,300}") {
            let _ = parse(&s);
        }

        #[test]
        fn extent_like_lines_never_panic(acc in "(RW|RDONLY|NOACCESS)", n in any::<u64>(),
                                         kind in "[A-Z]{0,10}", name in "[ -~]{0,20}", rest in "[ -~]{0,20}") {
            let _ = parse(&format!("{acc} {n} {kind} \"{name}\" {rest}\n"));
        }
    }
}
