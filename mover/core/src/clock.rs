//! Wall-clock helpers: UTC timestamps in RFC 3339 and backup ids, without a
//! date library (the civil-date conversion is the standard days-from-epoch
//! arithmetic on the proleptic Gregorian calendar).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

fn parts(unix: f64) -> (i64, u32, u32, i64, i64, i64) {
    let secs = unix.floor() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    (y, m, d, sod / 3600, (sod % 3600) / 60, sod % 60)
}

/// `2026-11-24T21:12:10Z`
pub fn rfc3339(unix: f64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20261124T211210Z`
pub fn compact(unix: f64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// A fresh random 32-bit value, from the kernel.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // getrandom(2) never fails for 4 bytes once the pool is initialised.
    // SAFETY: `b` is a valid, writable 4-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 4, 0) };
    if n != 4 {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        return t ^ std::process::id();
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_900_330.0), "2026-11-28T21:12:10Z");
        assert_eq!(compact(1_795_900_330.5), "20261128T211210Z");
    }
}
