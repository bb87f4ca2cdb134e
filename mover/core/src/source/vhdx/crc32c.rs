//! CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log
//! entries ([MS-VHDX] 2.2.2). Reflected polynomial 0x82F63B78, initial value
//! and final XOR 0xFFFFFFFF; one 256-entry table built at compile time.

const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32C over `data` from a previous `crc` (start with 0).
pub fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for b in data {
        c = TABLE[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    update(0, data)
}

/// CRC-32C of `data` with the 4-byte checksum field at `at` taken as zero,
/// as VHDX computes it.
pub fn crc32c_with_zero_field(data: &[u8], at: usize) -> u32 {
    let c = update(0, &data[..at]);
    let c = update(c, &[0u8; 4]);
    update(c, &data[at + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA); // RFC 3720 B.4
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    #[test]
    fn incremental_equals_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(update(update(0, &data[..333]), &data[333..]), crc32c(&data));
        let mut z = data.clone();
        z[100..104].fill(0);
        assert_eq!(crc32c_with_zero_field(&data, 100), crc32c(&z));
    }
}
