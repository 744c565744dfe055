//! Wall-clock times as people and log tools read them: RFC 3339 in UTC with milliseconds
//! (`2026-11-29T21:13:32.345Z`), without a date-time crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// `at` in milliseconds since the Unix epoch (0 before it): what the state file, peers and
/// the admin API carry.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `at` as RFC 3339, UTC, milliseconds. Times before 1970 print as the epoch.
pub fn rfc3339_ms(at: SystemTime) -> String {
    rfc3339_from_unix_ms(unix_ms(at))
}

/// Unix milliseconds as RFC 3339, UTC, milliseconds.
pub fn rfc3339_from_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// proleptic Gregorian).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339_from_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_ms(1_795_986_812_345), "2026-11-29T21:13:32.345Z");
        assert_eq!(rfc3339_from_unix_ms(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn every_day_follows_the_one_before() {
        let mut prev = civil_from_days(-1);
        for day in 0..200_000 {
            let (y, m, d) = civil_from_days(day);
            let next_day = (y, m, d) > prev && (1..=12).contains(&m) && (1..=31).contains(&d);
            assert!(next_day, "day {day}: {prev:?} then {:?}", (y, m, d));
            prev = (y, m, d);
        }
    }
}
