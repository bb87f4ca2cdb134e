//! GUIDs as VHDX stores them: Data1 (u32), Data2 (u16), Data3 (u16)
//! little-endian, then Data4 as 8 bytes; written as
//! `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` in parent locators.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// From the on-disk 16 bytes.
    pub fn from_bytes(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    /// From its text form (braces optional, any case).
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim();
        let t = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(t);
        let parts: Vec<&str> = t.split('-').collect();
        if parts.len() != 5 || [8, 4, 4, 4, 12].iter().zip(&parts).any(|(n, p)| p.len() != *n) {
            return None;
        }
        let hex: String = parts.concat();
        let mut v = [0u8; 16];
        for (i, out) in v.iter_mut().enumerate() {
            *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        // Text is big-endian for the first three fields; storage is little-endian.
        v[0..4].reverse();
        v[4..6].reverse();
        v[6..8].reverse();
        Some(Guid(v))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random (version 4) GUID.
    pub fn random() -> Guid {
        let mut v = [0u8; 16];
        for c in v.chunks_mut(4) {
            c.copy_from_slice(&crate::clock::random_u32().to_le_bytes());
        }
        v[7] = (v[7] & 0x0f) | 0x40;
        v[8] = (v[8] & 0x3f) | 0x80;
        Guid(v)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_and_bytes_agree() {
        // The BAT region's GUID, [MS-VHDX] 2.2.3.2, and its on-disk bytes.
        let g = Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08").unwrap();
        assert_eq!(
            g.0,
            [0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]
        );
        assert_eq!(g.to_string(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}");
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a08}"), Some(g));
        assert_eq!(Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A0"), None);
        assert_eq!(Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A0G"), None);
    }

    proptest! {
        #[test]
        fn roundtrip(b in proptest::array::uniform16(any::<u8>())) {
            let g = Guid(b);
            prop_assert_eq!(Guid::parse(&g.to_string()), Some(g));
        }

        #[test]
        fn parse_never_panics(s in ".{0,50}") {
            let _ = Guid::parse(&s);
        }
    }
}
