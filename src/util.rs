//! Small helpers shared by several rooms: RFC 5322 dates and queue ids.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `unix` as a UTC date-time; times beyond what `time` represents (year 9999) are clamped.
fn utc(unix: u64) -> time::OffsetDateTime {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc())
}

/// RFC 5322 date-time in UTC, e.g. `Mon, 23 Nov 2026 21:06:56 +0000`.
pub fn rfc5322_date(unix: u64) -> String {
    let t = utc(unix);
    let weekday = t.weekday().to_string();
    let month = t.month().to_string();
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        &weekday[..3],
        t.day(),
        &month[..3],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `yyyymmddhhmmss` in UTC (used for MTA-STS ids and file names).
pub fn compact_utc(unix: u64) -> String {
    let t = utc(unix);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `YYYY-MM-DD` in UTC.
pub fn utc_day(unix: u64) -> String {
    let t = utc(unix);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// `HH:MM:SS` in UTC.
pub fn utc_seconds(unix: u64) -> String {
    let t = utc(unix);
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

/// `YYYY-MM-DD HH:MM` in UTC.
pub fn utc_minutes(unix: u64) -> String {
    let t = utc(unix);
    format!("{} {:02}:{:02}", utc_day(unix), t.hour(), t.minute())
}

/// RFC 3461 xtext: `+` `=` and bytes outside `!`..`~` become `+HH`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Inverse of [`xtext_encode`]; `None` for malformed input.
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A duration for people: `45s`, `12m`, `5h`, `3d`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new queue id: 16 uppercase hex digits, microseconds since the epoch then a counter, so
/// ids sort by arrival and stay unique across restarts.
pub fn new_queue_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
    format!("{:011X}{:05X}", micros & 0xFFF_FFFF_FFFF, n)
}

/// True for a string that can be a queue id (also guards paths built from ids).
pub fn is_queue_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_468_016),
            "Mon, 23 Nov 2026 21:06:56 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(compact_utc(1_795_468_016), "20261123210656");
        assert_eq!(utc_day(1_795_468_016), "2026-11-23");
        assert_eq!(utc_minutes(1_795_468_016), "2026-11-23 21:06");
        assert_eq!(rfc5322_date(u64::MAX), "Fri, 31 Dec 9999 23:59:59 +0000");
    }

    #[test]
    fn xtext_roundtrip() {
        for s in ["plain", "a+b=c", "sp ace", "nul\0x", "ünï"] {
            let e = xtext_encode(s);
            assert!(e.bytes().all(|b| (33..=126).contains(&b)), "{e}");
            assert_eq!(xtext_decode(&e).as_deref(), Some(s));
        }
        assert_eq!(xtext_decode("a+2"), None);
        assert_eq!(xtext_decode("a+ZZ"), None);
    }

    #[test]
    fn ids_unique_and_valid() {
        let a = new_queue_id();
        let b = new_queue_id();
        assert_ne!(a, b);
        assert!(is_queue_id(&a) && is_queue_id(&b));
        assert!(!is_queue_id("../../etc/passwd"));
    }
}
