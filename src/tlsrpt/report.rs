//! TLS-RPT aggregate reports (RFC 8460 §4) as they arrive from other organisations, read
//! leniently: real reports omit fields, give counts as strings, dates without a time zone or
//! as Unix seconds, wrap JSON inside a JSON string, name keys with `_` instead of `-`, and use
//! policy and result types this code does not know. What can be read is kept, what cannot is
//! noted in [`Report::skipped`]; only input with no JSON object at all is an error. Pure: no
//! I/O; sizes are bounded here ([`MAX_POLICIES`], [`MAX_DETAILS`], [`MAX_TEXT`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Policies read from one report; the rest are skipped (and counted in `skipped`).
pub const MAX_POLICIES: usize = 10_000;
/// Failure details read per policy.
pub const MAX_DETAILS: usize = 10_000;
/// Characters kept of any one text field.
pub const MAX_TEXT: usize = 1_000;
/// How deep JSON wrapped in JSON strings is unwrapped.
const MAX_WRAPPING: usize = 3;

/// One aggregate report, normalised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// `organization-name`: who sent it.
    pub organization: String,
    /// `date-range`: the start and end of the period (Unix seconds, UTC) when readable.
    pub begin: Option<i64>,
    pub end: Option<i64>,
    pub contact: String,
    pub report_id: String,
    pub policies: Vec<PolicyResult>,
    /// What could not be read, in words (the report is kept without it).
    pub skipped: Vec<String>,
}

/// One policy's results (RFC 8460 §4.4 `policies[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyResult {
    /// `sts`, `tlsa`, `no-policy-found`, or whatever the reporter wrote (lowercased).
    pub policy_type: String,
    pub policy_domain: String,
    pub policy_strings: Vec<String>,
    pub mx_hosts: Vec<String>,
    pub successful: u64,
    pub failed: u64,
    pub failures: Vec<FailureDetail>,
}

/// One `failure-details` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailureDetail {
    /// `result-type` as written (lowercased): `certificate-expired`, `starttls-not-supported`, …
    pub result_type: String,
    pub sending_ip: String,
    pub receiving_mx_hostname: String,
    pub receiving_mx_helo: String,
    pub receiving_ip: String,
    pub count: u64,
    pub additional_information: String,
    pub reason_code: String,
}

impl Report {
    /// Sessions that succeeded and failed, over all policies.
    pub fn totals(&self) -> (u64, u64) {
        self.policies.iter().fold((0, 0), |(s, f), p| {
            (s.saturating_add(p.successful), f.saturating_add(p.failed))
        })
    }
}

/// Reads a report from JSON text (already decompressed). `Err` only when there is no JSON
/// object to read.
pub fn parse(bytes: &[u8]) -> Result<Report, String> {
    let root = json_object(bytes)?;
    let known = [
        "organization-name",
        "report-id",
        "date-range",
        "policies",
        "contact-info",
    ];
    if known.iter().all(|k| get(&root, &[k]).is_none()) {
        return Err("a JSON object without any TLS-RPT report field".into());
    }
    let mut r = Report::default();
    let mut skipped = Vec::new();
    r.organization = text(get(
        &root,
        &["organization-name", "organization", "org-name"],
    ));
    r.contact = text(get(&root, &["contact-info", "contact"]));
    r.report_id = text(get(&root, &["report-id", "id"]));
    match get(&root, &["date-range", "daterange", "date"]).map(unwrap_string) {
        Some(Value::Object(range)) => {
            r.begin = datetime_field(&range, &["start-datetime", "start", "begin"], &mut skipped);
            r.end = datetime_field(&range, &["end-datetime", "end"], &mut skipped);
        }
        Some(_) => skipped.push("date-range is not an object".into()),
        None => {
            // Some reporters put the two dates at the top level.
            r.begin = datetime_field(&root, &["start-datetime"], &mut skipped);
            r.end = datetime_field(&root, &["end-datetime"], &mut skipped);
            if r.begin.is_none() && r.end.is_none() {
                skipped.push("no date-range".into());
            }
        }
    }
    let policies = match get(&root, &["policies", "policy"]).map(unwrap_string) {
        Some(Value::Array(a)) => a,
        Some(o @ Value::Object(_)) => vec![o],
        Some(_) => {
            skipped.push("policies is neither a list nor an object".into());
            Vec::new()
        }
        None => {
            skipped.push("no policies".into());
            Vec::new()
        }
    };
    for (i, p) in policies.into_iter().enumerate() {
        if i >= MAX_POLICIES {
            skipped.push(format!("policies after the first {MAX_POLICIES}"));
            break;
        }
        match unwrap_string(&p) {
            Value::Object(o) => r.policies.push(policy(&o, i, &mut skipped)),
            _ => skipped.push(format!("policies[{i}] is not an object")),
        }
    }
    r.skipped = skipped;
    Ok(r)
}

fn policy(o: &Map<String, Value>, i: usize, skipped: &mut Vec<String>) -> PolicyResult {
    // The policy block; some reporters flatten its fields into the entry itself.
    let block = match get(o, &["policy"]).map(unwrap_string) {
        Some(Value::Object(p)) => p,
        _ => o.clone(),
    };
    let summary = match get(o, &["summary"]).map(unwrap_string) {
        Some(Value::Object(s)) => s,
        _ => o.clone(),
    };
    let mut p = PolicyResult {
        policy_type: text(get(&block, &["policy-type", "type"])).to_ascii_lowercase(),
        policy_domain: text(get(&block, &["policy-domain", "domain"]))
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        policy_strings: texts(get(&block, &["policy-string", "policy-strings"])),
        mx_hosts: texts(get(&block, &["mx-host", "mx-hosts", "mx-host-pattern"])),
        ..PolicyResult::default()
    };
    if p.policy_type.is_empty() {
        skipped.push(format!("policies[{i}]: no policy-type"));
    }
    let details =
        match get(o, &["failure-details", "failure-detail", "failures"]).map(unwrap_string) {
            Some(Value::Array(a)) => a,
            Some(d @ Value::Object(_)) => vec![d],
            _ => Vec::new(),
        };
    for (j, d) in details.into_iter().enumerate() {
        if j >= MAX_DETAILS {
            skipped.push(format!(
                "policies[{i}]: failure details after the first {MAX_DETAILS}"
            ));
            break;
        }
        match unwrap_string(&d) {
            Value::Object(d) => p.failures.push(FailureDetail {
                result_type: text(get(&d, &["result-type", "result"])).to_ascii_lowercase(),
                sending_ip: text(get(&d, &["sending-mta-ip", "sending-ip"])),
                receiving_mx_hostname: text(get(&d, &["receiving-mx-hostname"]))
                    .trim_end_matches('.')
                    .to_ascii_lowercase(),
                receiving_mx_helo: text(get(&d, &["receiving-mx-helo"])),
                receiving_ip: text(get(&d, &["receiving-ip"])),
                count: count(get(&d, &["failed-session-count", "count"])).unwrap_or(1),
                additional_information: text(get(&d, &["additional-information"])),
                reason_code: text(get(&d, &["failure-reason-code", "failure-reason"])),
            }),
            _ => skipped.push(format!(
                "policies[{i}].failure-details[{j}] is not an object"
            )),
        }
    }
    p.successful = count(get(
        &summary,
        &[
            "total-successful-session-count",
            "total-success-session-count",
        ],
    ))
    .unwrap_or(0);
    p.failed = match count(get(&summary, &["total-failure-session-count"])) {
        Some(n) => n,
        // Missing: what the details add up to.
        None => p
            .failures
            .iter()
            .fold(0u64, |a, d| a.saturating_add(d.count)),
    };
    p
}

/// The document's top-level object: JSON text (a BOM, surrounding junk and JSON wrapped in a
/// JSON string are tolerated).
fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut value = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v,
        Err(first) => {
            // Text before or after the object (a mail footer, NULs): the outermost braces.
            let text = String::from_utf8_lossy(bytes);
            let (Some(a), Some(b)) = (text.find('{'), text.rfind('}')) else {
                return Err(format!("not a JSON report: {first}"));
            };
            if b < a {
                return Err(format!("not a JSON report: {first}"));
            }
            serde_json::from_str::<Value>(&text[a..=b])
                .map_err(|_| format!("not a JSON report: {first}"))?
        }
    };
    for _ in 0..MAX_WRAPPING {
        match value {
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v) => value = v,
                Err(e) => return Err(format!("a JSON string that holds no report: {e}")),
            },
            _ => break,
        }
    }
    match value {
        Value::Object(o) => Ok(o),
        Value::Array(a) => match a.into_iter().next() {
            // A list holding the report.
            Some(Value::Object(o)) => Ok(o),
            _ => Err("a JSON list that holds no report".into()),
        },
        _ => Err("the JSON document is not an object".into()),
    }
}

/// A value that is a JSON document inside a string, parsed; other values as they are.
fn unwrap_string(v: &Value) -> Value {
    if let Value::String(s) = v {
        let t = s.trim_start();
        if (t.starts_with('{') || t.starts_with('['))
            && let Ok(inner) = serde_json::from_str::<Value>(s)
        {
            return inner;
        }
    }
    v.clone()
}

/// The value of the first of `names` present, comparing keys case-insensitively with `_`,
/// ` ` and `-` the same.
fn get<'a>(o: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    let norm = |k: &str| -> String {
        k.trim()
            .chars()
            .map(|c| match c {
                '_' | ' ' => '-',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    for want in names {
        if let Some(v) = o.get(*want) {
            return Some(v);
        }
        if let Some((_, v)) = o.iter().find(|(k, _)| norm(k) == *want) {
            return Some(v);
        }
    }
    None
}

/// A text field: strings as they are, numbers and booleans written out, others empty.
fn text(v: Option<&Value>) -> String {
    let s = match v {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    };
    if s.chars().count() > MAX_TEXT {
        s.chars().take(MAX_TEXT).collect()
    } else {
        s
    }
}

/// A list of text: a list (of strings or numbers), or one string.
fn texts(v: Option<&Value>) -> Vec<String> {
    match v.map(unwrap_string) {
        Some(Value::Array(a)) => a
            .iter()
            .take(MAX_DETAILS)
            .map(|x| text(Some(x)))
            .filter(|s| !s.is_empty())
            .collect(),
        Some(other) => {
            let s = text(Some(&other));
            if s.is_empty() { Vec::new() } else { vec![s] }
        }
        None => Vec::new(),
    }
}

/// A count: a non-negative integer, or a number or string holding one (fractions dropped,
/// negatives as 0).
fn count(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i.max(0) as u64))
            .or_else(|| n.as_f64().map(|f| if f > 0.0 { f as u64 } else { 0 })),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<u64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .map(|f| if f > 0.0 { f as u64 } else { 0 })
            })
        }
        _ => None,
    }
}

fn datetime_field(
    o: &Map<String, Value>,
    names: &[&str],
    skipped: &mut Vec<String>,
) -> Option<i64> {
    let v = get(o, names)?;
    let t = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => parse_datetime(s),
        _ => None,
    };
    if t.is_none() {
        skipped.push(format!("{}: unreadable date {v}", names[0]));
    }
    t
}

/// An RFC 3339 date-time, leniently: `T` or a space between date and time, optional seconds
/// and fraction, `Z`, `±HH:MM`, `±HHMM` or no zone at all (taken as UTC), or a date alone;
/// also Unix seconds as text. Unix seconds, UTC.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.len() >= 9 {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !(1..=12).contains(&mo) {
        return None;
    }
    if !(1..=days_in_month(y, mo)).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, mo, d) * 86400;
    let mut i = 10;
    if matches!(b.get(i), Some(b'T' | b't' | b' ')) {
        let (h, mi) = (num(i + 1, 2)?, num(i + 4, 2)?);
        if b.get(i + 3) != Some(&b':') || h > 23 || mi > 59 {
            return None;
        }
        secs += h * 3600 + mi * 60;
        i += 6;
        if b.get(i) == Some(&b':') {
            let sec = num(i + 1, 2)?;
            if sec > 60 {
                return None;
            }
            secs += sec.min(59);
            i += 3;
            if matches!(b.get(i), Some(b'.' | b',')) {
                i += 1;
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
        }
    }
    let zone = s.get(i..)?.trim();
    let offset = match zone {
        "" | "Z" | "z" | "UTC" | "GMT" | "+00:00" | "-00:00" => 0,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(char::is_ascii_digit).collect();
            if digits.len() != 4 {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = digits[2..].parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    Some(secs - offset)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report in the RFC's own shape (RFC 8460 §4.4), with a failure detail.
    const FULL: &str = r#"{
      "organization-name": "Example Sender Inc.",
      "date-range": {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"},
      "contact-info": "tlsrpt@sender.example",
      "report-id": "2026-12-01T00:00:00Z_moat.test",
      "policies": [{
        "policy": {
          "policy-type": "sts",
          "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.moat.test", "max_age: 604800"],
          "policy-domain": "moat.test",
          "mx-host": ["mx.moat.test"]
        },
        "summary": {"total-successful-session-count": 5326, "total-failure-session-count": 303},
        "failure-details": [{
          "result-type": "certificate-expired",
          "sending-mta-ip": "192.0.2.1",
          "receiving-mx-hostname": "MX.moat.test.",
          "receiving-mx-helo": "mx.moat.test",
          "receiving-ip": "198.51.100.7",
          "failed-session-count": 200,
          "additional-information": "https://reports.sender.example/x",
          "failure-reason-code": "X509_V_ERR_CERT_HAS_EXPIRED"
        }, {
          "result-type": "starttls-not-supported",
          "sending-mta-ip": "2001:db8::1",
          "receiving-ip": "198.51.100.8",
          "failed-session-count": 103
        }]
      }]
    }"#;

    #[test]
    fn a_complete_report_is_read_field_by_field() {
        let r = parse(FULL.as_bytes()).unwrap();
        assert_eq!(r.organization, "Example Sender Inc.");
        assert_eq!(r.begin, Some(1_796_083_200));
        assert_eq!(r.end, Some(1_796_083_200 + 86_399));
        assert_eq!(r.contact, "tlsrpt@sender.example");
        assert_eq!(r.report_id, "2026-12-01T00:00:00Z_moat.test");
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let p = &r.policies[0];
        assert_eq!(p.policy_type, "sts");
        assert_eq!(p.policy_domain, "moat.test");
        assert_eq!(p.policy_strings.len(), 4);
        assert_eq!(p.mx_hosts, ["mx.moat.test"]);
        assert_eq!((p.successful, p.failed), (5326, 303));
        let d = &p.failures[0];
        assert_eq!(d.result_type, "certificate-expired");
        assert_eq!(d.receiving_mx_hostname, "mx.moat.test");
        assert_eq!(d.count, 200);
        assert_eq!(d.reason_code, "X509_V_ERR_CERT_HAS_EXPIRED");
        assert_eq!(p.failures[1].sending_ip, "2001:db8::1");
        assert_eq!(r.totals(), (5326, 303));
    }

    #[test]
    fn what_real_reporters_do_is_read_anyway() {
        // Counts as strings, a date without a zone and one with an offset, underscores and
        // capitals in key names, an unknown policy type, a one-string policy-string, no
        // summary block (counts in the entry), a missing failure total (from the details).
        let odd = r#"{
          "Organization_Name": "Odd Reporter",
          "date_range": {"start_datetime": "2026-12-01 00:00:00", "end_datetime": "2026-12-02T01:00:00+01:00"},
          "report_id": 12345,
          "policies": [
            {"policy": {"policy_type": "STS", "policy_string": "version: STSv1", "policy_domain": "Moat.Test."},
             "total-successful-session-count": "17"},
            {"policy": {"policy-type": "dane-future", "policy-domain": "moat.test"},
             "summary": {"total-successful-session-count": 2.0},
             "failure-details": [{"result-type": "Validation-Failure", "failed-session-count": "4"},
                                 {"result-type": "dnssec-invalid"}]}
          ]
        }"#;
        let r = parse(odd.as_bytes()).unwrap();
        assert_eq!(r.organization, "Odd Reporter");
        assert_eq!(r.begin, Some(1_796_083_200));
        assert_eq!(r.end, Some(1_796_083_200 + 86_400));
        assert_eq!(r.report_id, "12345");
        assert_eq!(r.policies[0].policy_type, "sts");
        assert_eq!(r.policies[0].policy_domain, "moat.test");
        assert_eq!(r.policies[0].policy_strings, ["version: STSv1"]);
        assert_eq!(r.policies[0].successful, 17);
        let p = &r.policies[1];
        assert_eq!(p.policy_type, "dane-future");
        assert_eq!(p.successful, 2);
        assert_eq!(p.failures[0].result_type, "validation-failure");
        // A detail without a count is one session; the total is their sum.
        assert_eq!(p.failures[1].count, 1);
        assert_eq!(p.failed, 5);
    }

    #[test]
    fn json_inside_strings_and_around_junk_is_unwrapped() {
        let inner = serde_json::to_string(FULL).unwrap();
        let r = parse(inner.as_bytes()).unwrap();
        assert_eq!(r.organization, "Example Sender Inc.");
        // The policies list as a string.
        let v: Value = serde_json::from_str(FULL).unwrap();
        let mut o = v.as_object().unwrap().clone();
        let pol = serde_json::to_string(&o["policies"]).unwrap();
        o.insert("policies".into(), Value::String(pol));
        let r = parse(serde_json::to_string(&o).unwrap().as_bytes()).unwrap();
        assert_eq!(r.policies.len(), 1);
        assert_eq!(r.policies[0].failures.len(), 2);
        // A BOM and a footer.
        let mut with_junk = b"\xef\xbb\xbf".to_vec();
        with_junk.extend_from_slice(FULL.as_bytes());
        with_junk.extend_from_slice(b"\r\n-- \r\nsent by a robot\0\0");
        assert_eq!(parse(&with_junk).unwrap().report_id, r.report_id);
    }

    #[test]
    fn unreadable_parts_are_skipped_and_said() {
        let r = parse(
            br#"{"organization-name": "X", "date-range": {"start-datetime": "yesterday"},
                 "policies": [17, {"summary": {}}]}"#,
        )
        .unwrap();
        assert_eq!(r.organization, "X");
        assert_eq!(r.begin, None);
        assert_eq!(r.policies.len(), 1);
        assert!(
            r.skipped.iter().any(|s| s.contains("yesterday")),
            "{:?}",
            r.skipped
        );
        assert!(
            r.skipped.iter().any(|s| s.contains("policies[0]")),
            "{:?}",
            r.skipped
        );
        assert!(
            r.skipped.iter().any(|s| s.contains("no policy-type")),
            "{:?}",
            r.skipped
        );
        // Nothing at all to read.
        assert!(parse(b"").is_err());
        assert!(parse(b"not json").is_err());
        assert!(parse(b"[1, 2]").is_err());
        assert!(parse(b"\"just text\"").is_err());
        assert!(parse(b"{}").is_err());
        assert!(parse(br#"{"kind": "dmarc"}"#).is_err());
        assert!(parse(br#"{"organization-name": 1}"#).is_ok());
    }

    #[test]
    fn sizes_are_bounded() {
        let many: Vec<String> = (0..MAX_POLICIES + 5)
            .map(|_| r#"{"policy": {"policy-type": "sts"}}"#.to_string())
            .collect();
        let doc = format!(r#"{{"policies": [{}]}}"#, many.join(","));
        let r = parse(doc.as_bytes()).unwrap();
        assert_eq!(r.policies.len(), MAX_POLICIES);
        assert!(r.skipped.iter().any(|s| s.contains("after the first")));
        let long = "x".repeat(MAX_TEXT * 3);
        let r = parse(format!(r#"{{"organization-name": "{long}"}}"#).as_bytes()).unwrap();
        assert_eq!(r.organization.len(), MAX_TEXT);
    }

    #[test]
    fn datetimes_in_the_forms_reporters_use() {
        let day = 1_796_083_200; // 2026-12-01T00:00:00Z
        for s in [
            "2026-12-01T00:00:00Z",
            "2026-12-01T00:00:00z",
            "2026-12-01T00:00:00",
            "2026-12-01 00:00:00",
            "2026-12-01T00:00:00.000Z",
            "2026-12-01T00:00:00.123456+00:00",
            "2026-12-01T01:00:00+01:00",
            "2026-11-30T19:00:00-0500",
            "2026-12-01T00:00Z",
            "2026-12-01",
            "2026-12-01T00:00:00 UTC",
            "1796083200",
        ] {
            assert_eq!(parse_datetime(s), Some(day), "{s}");
        }
        assert_eq!(parse_datetime("2024-02-29T12:00:00Z"), Some(1_709_208_000));
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-02-30",
            "2026-12-01T24:00:00Z",
            "2026-12-01T00:00:00+25:00",
            "01/12/2026",
            "2026-12-01T00:00:00 CET",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad}");
        }
    }
}
