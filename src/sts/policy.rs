//! MTA-STS policy and TXT record parsing (RFC 8461 §3).
//!
//! Pure code, no I/O. An error means "no policy" to callers, so the policy parser is strict
//! only where the RFC is, and lenient in the RFC's own way wherever strictness would take a
//! domain's protection away (a repeated `mode` must not turn `enforce` into nothing): see
//! [`parse_policy_lenient`] for each rule; what was forgiven comes back as warnings for
//! `moat sts check` and the log. Choices where the RFC is silent:
//! - Policy bodies: blank lines (empty or only spaces and tabs) are skipped wherever they are;
//!   extension names may contain `.` as in the ABNF; extension values may contain HTAB.
//! - Repeated `mx` patterns are kept once, in first-seen order; patterns are stored lowercase.
//! - `max_age: 0` is valid (the ABNF allows it).
//! - TXT records (RFC 8461 §3.1 is strict: not exactly one valid record means no policy):
//!   spaces or tabs after the last field, without a closing `;`, are accepted.

use std::fmt;
use std::str::FromStr;

/// Largest `max_age` a policy may declare, in seconds (RFC 8461 §3.2: about one year).
pub const MAX_AGE_LIMIT: u32 = 31_557_600;

/// Largest policy body accepted, in bytes (64 KiB: a policy is a few lines, and a bounded
/// fetch resists a hostile policy host).
pub const MAX_POLICY_BYTES: usize = 65_536;

/// Longest domain name, in characters, without a trailing dot.
const MAX_NAME_LEN: usize = 253;

/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Longest key of a policy line or name of a TXT field (RFC 8461 ABNF: 1 + 31).
const MAX_KEY_LEN: usize = 32;

/// Longest `id` of a TXT record.
const MAX_ID_LEN: usize = 32;

/// Why a policy, TXT record or MX pattern was rejected, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(String);

impl PolicyError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        PolicyError(reason.into())
    }

    fn at_line(line: usize, reason: impl fmt::Display) -> Self {
        PolicyError(format!("line {line}: {reason}"))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

/// A value quoted for an error message, cut to a readable length.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}...", &s[..i]),
        None => format!("{s:?}"),
    }
}

/// Policy mode (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deliver only over authenticated TLS to a matching MX host.
    Enforce,
    /// Deliver as usual, but report failures (TLS-RPT).
    Testing,
    /// No policy in force (used to withdraw one).
    None,
}

impl Mode {
    /// The policy-file spelling: `enforce`, `testing` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = PolicyError;

    /// Exact, case-sensitive spelling as in a policy file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "testing" => Ok(Mode::Testing),
            "none" => Ok(Mode::None),
            _ => Err(PolicyError(format!(
                "mode {} is not enforce, testing or none",
                shown(s)
            ))),
        }
    }
}

/// Checks an LDH domain name without trailing dot: labels of 1-63 letters, digits and hyphens,
/// not starting or ending with a hyphen. Returns the reason it is not one.
pub(crate) fn check_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    if name.ends_with('.') {
        return Err("trailing dot".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("label longer than {MAX_LABEL_LEN} characters"));
        }
        if label.contains('*') {
            return Err("a wildcard must be the whole leftmost label, as in *.example.com".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "label {} has characters other than letters, digits and '-'",
                shown(label)
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {} starts or ends with '-'", shown(label)));
        }
    }
    Ok(())
}

/// An `mx` pattern of a policy: a host name (`mx.example.com`) or a wildcard whose `*` stands
/// for exactly one leftmost label (`*.example.com`). Stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MxPattern(String);

impl MxPattern {
    /// Validates a pattern: LDH labels of 1-63 characters without leading or trailing hyphen,
    /// at most 253 characters in all, no trailing dot, and `*` only as a whole leftmost label
    /// followed by at least one label.
    pub fn parse(s: &str) -> Result<MxPattern, PolicyError> {
        let domain = s.strip_prefix("*.").unwrap_or(s);
        let result = if s.len() > MAX_NAME_LEN {
            Err(format!("longer than {MAX_NAME_LEN} characters"))
        } else {
            check_domain(domain)
        };
        match result {
            Ok(()) => Ok(MxPattern(s.to_ascii_lowercase())),
            Err(reason) => Err(PolicyError(format!("mx pattern {}: {reason}", shown(s)))),
        }
    }

    /// The pattern, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if `host` (an MX host name; case-insensitive, one trailing dot ignored) matches:
    /// the same name, or for `*.example.com` one extra non-empty label before `example.com`.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                let suffix = suffix.as_bytes();
                if host.len() < suffix.len() + 2 {
                    return false;
                }
                let split = host.len() - suffix.len();
                let label = &host[..split - 1];
                host[split..].eq_ignore_ascii_case(suffix)
                    && host[split - 1] == b'.'
                    && !label.contains(&b'.')
            }
            None => host.eq_ignore_ascii_case(self.0.as_bytes()),
        }
    }
}

impl fmt::Display for MxPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed MTA-STS policy (the body of `/.well-known/mta-sts.txt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What senders do with the policy.
    pub mode: Mode,
    /// MX patterns, without duplicates; empty only in mode `none`.
    pub mx: Vec<MxPattern>,
    /// How long senders may cache the policy, in seconds (at most [`MAX_AGE_LIMIT`]).
    pub max_age: u32,
}

impl Policy {
    /// True if any `mx` pattern matches `host` (see [`MxPattern::matches`]).
    pub fn matches_mx(&self, host: &str) -> bool {
        self.mx.iter().any(|p| p.matches(host))
    }

    /// The canonical policy file: `version`, `mode`, each `mx`, `max_age`, CRLF line endings.
    pub fn to_text(&self) -> String {
        let mut out = format!("version: STSv1\r\nmode: {}\r\n", self.mode);
        for mx in &self.mx {
            out.push_str("mx: ");
            out.push_str(mx.as_str());
            out.push_str("\r\n");
        }
        out.push_str(&format!("max_age: {}\r\n", self.max_age));
        out
    }
}

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Policy keys and TXT field names: a letter or digit, then up to 31 of those or `_ - .`.
fn is_field_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_KEY_LEN
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// Something a policy got wrong that senders (and Moat) tolerate, for `moat sts check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    /// 1-based line of the policy body; 0 for the body as a whole.
    pub line: usize,
    /// What is wrong and what was done about it.
    pub what: String,
    /// What the domain owner should change.
    pub fix: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: {}", self.line, self.what)
        } else {
            f.write_str(&self.what)
        }
    }
}

/// A policy and what it got wrong without being rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub policy: Policy,
    pub warnings: Vec<PolicyWarning>,
}

/// `max_age`: digits only (the ABNF allows 1-10); values above [`MAX_AGE_LIMIT`], however
/// many digits, are clamped to it. `Ok((value, clamped))`.
fn parse_max_age(value: &str) -> Result<(u32, bool), String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "max_age {} is not a number of seconds (digits only)",
            shown(value)
        ));
    }
    let digits = value.trim_start_matches('0');
    match digits.parse::<u64>() {
        _ if digits.is_empty() => Ok((0, false)),
        Ok(n) if n <= u64::from(MAX_AGE_LIMIT) => Ok((n as u32, false)),
        _ => Ok((MAX_AGE_LIMIT, true)),
    }
}

/// Splits a body into numbered lines: LF, CRLF and (leniently) a lone CR end a line.
/// `true` in the third place when the line ended in a lone CR.
fn policy_lines(text: &str) -> impl Iterator<Item = (usize, &str, bool)> {
    let mut rest = text;
    let mut n = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        n += 1;
        let (line, lone_cr, next) = match rest.find(['\r', '\n']) {
            None => (rest, false, ""),
            Some(i) if rest.as_bytes()[i] == b'\n' => (&rest[..i], false, &rest[i + 1..]),
            Some(i) => match rest[i + 1..].strip_prefix('\n') {
                Some(after) => (&rest[..i], false, after),
                None => (&rest[..i], true, &rest[i + 1..]),
            },
        };
        rest = next;
        Some((n, line, lone_cr))
    })
}

/// Parses a policy body (RFC 8461 §3.2), strictly where the RFC is strict and leniently
/// where strictness would only take a domain's protection away:
/// - `version: STSv1`, `mode` and `max_age` are required; when one is given more than once the
///   first is used and the others are ignored (§3.2: "all entries except for the first SHALL
///   be ignored"), with a warning.
/// - `mx` is required at least once unless the mode is `none`; an `mx` value that is not a
///   valid pattern is skipped with a warning (the other patterns still protect the domain);
///   a trailing dot is dropped and a U-label is turned into its A-label, with a warning.
/// - `max_age` above [`MAX_AGE_LIMIT`] is clamped to it, with a warning.
/// - Unknown fields are ignored (§3.2), and so is a line that is not a valid field at all
///   (bad key characters, no `:`, control characters or invalid UTF-8 in an unknown field's
///   value), with a warning. Keys and the `version`/`mode` values stay case-sensitive, as
///   the ABNF has them (`%s`).
/// - Lines end in LF or CRLF; a lone CR also ends a line (warning); a UTF-8 byte order mark
///   is skipped (warning); spaces or tabs around a key are tolerated (warning).
pub fn parse_policy_lenient(body: &[u8]) -> Result<Parsed, PolicyError> {
    if body.len() > MAX_POLICY_BYTES {
        return Err(PolicyError(format!(
            "policy is {} bytes, more than {MAX_POLICY_BYTES}",
            body.len()
        )));
    }
    let mut warnings = Vec::new();
    let mut warn = |line: usize, what: String, fix: &str| {
        warnings.push(PolicyWarning {
            line,
            what,
            fix: fix.to_string(),
        })
    };
    let body = match body.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => {
            warn(
                0,
                "the policy starts with a UTF-8 byte order mark (skipped)".into(),
                "save the policy without a byte order mark",
            );
            rest
        }
        None => body,
    };
    let text = String::from_utf8_lossy(body);

    // version, mode and max_age: where each was first given; later entries are ignored.
    let mut first_given: Vec<(&str, usize)> = Vec::new();
    let mut version = false;
    let mut mode: Option<Mode> = None;
    let mut max_age: Option<u32> = None;
    let mut mx: Vec<MxPattern> = Vec::new();
    let mut mx_lines = 0usize;
    let mut lone_cr_seen = false;
    for (n, line, lone_cr) in policy_lines(&text) {
        if lone_cr && !lone_cr_seen {
            lone_cr_seen = true;
            warn(
                n,
                "line ends in a CR without LF (taken as a line end)".into(),
                "end lines with LF or CRLF",
            );
        }
        if line.chars().all(is_wsp) {
            continue;
        }
        let Some((raw_key, rest)) = line.split_once(':') else {
            warn(
                n,
                format!("{} is not a key: value line (ignored)", shown(line)),
                "remove the line or write it as key: value",
            );
            continue;
        };
        let key = raw_key.trim_matches(is_wsp);
        if !is_field_name(key) {
            warn(
                n,
                format!("{} is not a valid key (line ignored)", shown(raw_key)),
                "keys are letters, digits, '_', '-' and '.', starting with a letter or digit",
            );
            continue;
        }
        let known = matches!(key, "version" | "mode" | "max_age" | "mx");
        if key != raw_key {
            warn(
                n,
                format!("spaces around the key {key}"),
                "write the key at the start of the line, directly followed by ':'",
            );
        }
        let value = rest.trim_matches(is_wsp);
        let bad_chars = value
            .chars()
            .any(|c| (c.is_ascii_control() && c != '\t') || c == char::REPLACEMENT_CHARACTER);
        if !known {
            if value.is_empty() || bad_chars {
                warn(
                    n,
                    format!("unknown field {key} has an empty or invalid value (ignored)"),
                    "remove the line",
                );
            }
            continue;
        }
        if bad_chars {
            return Err(PolicyError::at_line(
                n,
                format!("{key} value has control characters or invalid UTF-8"),
            ));
        }
        if key != "mx" {
            if let Some((_, first)) = first_given.iter().find(|(k, _)| *k == key) {
                warn(
                    n,
                    format!("{key} given again (line {first} is used, this one is ignored)"),
                    "give each of version, mode and max_age once",
                );
                continue;
            }
            first_given.push((key, n));
        }
        match key {
            "version" => {
                if value != "STSv1" {
                    return Err(PolicyError::at_line(
                        n,
                        format!("version {} is not STSv1", shown(value)),
                    ));
                }
                version = true;
            }
            "mode" => {
                if value.is_empty() {
                    return Err(PolicyError::at_line(n, "mode has no value"));
                }
                let m = value
                    .parse::<Mode>()
                    .map_err(|e| PolicyError::at_line(n, e))?;
                mode = Some(m);
            }
            "max_age" => {
                let (secs, clamped) =
                    parse_max_age(value).map_err(|e| PolicyError::at_line(n, e))?;
                if clamped {
                    warn(
                        n,
                        format!("max_age {value} exceeds {MAX_AGE_LIMIT}; {MAX_AGE_LIMIT} is used"),
                        "use at most 31557600 (about a year)",
                    );
                }
                max_age = Some(secs);
            }
            _ => {
                mx_lines += 1;
                match lenient_pattern(value) {
                    Ok((pattern, note)) => {
                        if let Some(note) = note {
                            warn(
                                n,
                                note,
                                "write mx patterns as A-labels without a trailing dot",
                            );
                        }
                        if !mx.contains(&pattern) {
                            mx.push(pattern);
                        }
                    }
                    Err(e) => warn(
                        n,
                        format!("{e} (pattern ignored; MX hosts only it would cover are refused)"),
                        "write mx patterns as host names or *.domain",
                    ),
                }
            }
        }
    }
    if !version {
        return Err(PolicyError::new("missing version: STSv1"));
    }
    let mode = mode.ok_or_else(|| PolicyError::new("missing mode"))?;
    let max_age = max_age.ok_or_else(|| PolicyError::new("missing max_age"))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(PolicyError(if mx_lines == 0 {
            format!("mode {mode} needs at least one mx pattern")
        } else {
            format!(
                "mode {mode} needs at least one mx pattern, and none of its {mx_lines} is valid"
            )
        }));
    }
    Ok(Parsed {
        policy: Policy { mode, mx, max_age },
        warnings,
    })
}

/// An `mx` value as a pattern, forgiving a trailing dot and U-labels (turned into A-labels);
/// the second value says what was forgiven.
fn lenient_pattern(value: &str) -> Result<(MxPattern, Option<String>), PolicyError> {
    let original = match MxPattern::parse(value) {
        Ok(p) => return Ok((p, None)),
        Err(e) => e,
    };
    let (wild, name) = match value.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", value),
    };
    // Domain takes one trailing dot and U-labels, and refuses empty labels.
    let ascii = match crate::domain::Domain::parse(name) {
        Ok(d) => d.into_string(),
        Err(_) => return Err(original),
    };
    let fixed = format!("{wild}{ascii}");
    match MxPattern::parse(&fixed) {
        Ok(p) => Ok((p, Some(format!("mx {} is taken as {fixed}", shown(value))))),
        Err(_) => Err(original),
    }
}

/// Parses a policy body; see [`parse_policy_lenient`], whose warnings this drops.
pub fn parse_policy(body: &[u8]) -> Result<Policy, PolicyError> {
    parse_policy_lenient(body).map(|p| p.policy)
}

/// The version tag every MTA-STS TXT record starts with.
const STS_VERSION: &str = "v=STSv1";

/// A parsed `_mta-sts` TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRecord {
    /// Policy id (1-32 letters and digits); a new id tells senders to refetch the policy.
    pub id: String,
}

/// True if a TXT record counts as MTA-STS: `v=STSv1`, optional spaces or tabs, then `;`
/// (RFC 8461 §3.1: records that do not begin with `v=STSv1;` are discarded). Other records,
/// `v=STSv1 junk` included, are ignored.
pub fn is_sts_record(record: &str) -> bool {
    record
        .strip_prefix(STS_VERSION)
        .is_some_and(|rest| rest.trim_start_matches(is_wsp).starts_with(';'))
}

/// Parses one `_mta-sts` TXT record (RFC 8461 §3.1): `v=STSv1`, then `;`-separated fields
/// (spaces and tabs allowed around `;`, a trailing `;` allowed), exactly one `id`, extension
/// fields `name=value` checked and ignored.
pub fn parse_txt(record: &str) -> Result<StsRecord, PolicyError> {
    let err = |reason: String| PolicyError(format!("TXT record {}: {reason}", shown(record)));
    let Some(rest) = record.strip_prefix(STS_VERSION) else {
        return Err(err("does not start with v=STSv1".into()));
    };
    let mut parts = rest.split(';');
    if !parts.next().unwrap_or("").chars().all(is_wsp) {
        return Err(err("expected ';' after v=STSv1".into()));
    }
    let fields: Vec<&str> = parts.collect();
    let mut id: Option<&str> = None;
    for (i, raw) in fields.iter().enumerate() {
        let field = raw.trim_matches(is_wsp);
        if field.is_empty() {
            if i + 1 == fields.len() {
                continue;
            }
            return Err(err("empty field between ';'".into()));
        }
        let Some((name, value)) = field.split_once('=') else {
            return Err(err(format!("field {} is not name=value", shown(field))));
        };
        if !is_field_name(name) {
            return Err(err(format!("{} is not a valid field name", shown(name))));
        }
        if name == "id" {
            if id.is_some() {
                return Err(err("id given twice".into()));
            }
            if value.is_empty()
                || value.len() > MAX_ID_LEN
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(err(format!(
                    "id {} is not 1-{MAX_ID_LEN} letters and digits",
                    shown(value)
                )));
            }
            id = Some(value);
        } else if value.is_empty()
            || !value
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'=' && b != b';')
        {
            return Err(err(format!(
                "field {name} has an invalid value {}",
                shown(value)
            )));
        }
    }
    match id {
        Some(id) => Ok(StsRecord { id: id.to_string() }),
        None => Err(err("missing id".into())),
    }
}

/// Picks the MTA-STS record among the TXT records of `_mta-sts.<domain>` (each already the
/// concatenation of its strings). Records not starting with `v=STSv1` are ignored; none gives
/// `Ok(None)`; more than one, or an invalid one, is an error (RFC 8461 §3.1: no policy).
pub fn parse_txt_records(records: &[String]) -> Result<Option<StsRecord>, PolicyError> {
    let mut sts = records.iter().filter(|r| is_sts_record(r));
    let Some(first) = sts.next() else {
        return Ok(None);
    };
    let extra = sts.count();
    if extra > 0 {
        return Err(PolicyError(format!(
            "{} v=STSv1 TXT records; exactly one is allowed",
            extra + 1
        )));
    }
    parse_txt(first).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(body: &str) -> Policy {
        match parse_policy(body.as_bytes()) {
            Ok(p) => p,
            Err(e) => panic!("{body:?}: {e}"),
        }
    }

    fn err(body: &str) -> String {
        match parse_policy(body.as_bytes()) {
            Ok(p) => panic!("{body:?} parsed as {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The policy and its warnings, as "line N: what".
    fn warned(body: &str) -> (Policy, Vec<String>) {
        match parse_policy_lenient(body.as_bytes()) {
            Ok(p) => (p.policy, p.warnings.iter().map(|w| w.to_string()).collect()),
            Err(e) => panic!("{body:?}: {e}"),
        }
    }

    fn pat(s: &str) -> MxPattern {
        MxPattern::parse(s).unwrap()
    }

    const RFC_EXAMPLE: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n\
                               mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";

    #[test]
    fn rfc_example_crlf() {
        let p = ok(RFC_EXAMPLE);
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        let mx: Vec<&str> = p.mx.iter().map(MxPattern::as_str).collect();
        assert_eq!(
            mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        assert_eq!(p.to_text(), RFC_EXAMPLE);
    }

    #[test]
    fn lf_mixed_and_no_final_newline() {
        let lf = RFC_EXAMPLE.replace("\r\n", "\n");
        assert_eq!(ok(&lf), ok(RFC_EXAMPLE));
        let mixed = "version: STSv1\nmode: enforce\r\nmx: mail.example.com\nmax_age: 86400\r\n";
        assert_eq!(ok(mixed).max_age, 86_400);
        let bare = "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 60";
        assert_eq!(ok(bare).mode, Mode::Testing);
    }

    #[test]
    fn whitespace_and_blank_lines() {
        let p = ok(
            "version:STSv1\n\nmode:\t testing \t\r\n \t\nmx:mx.example.com  \n\
                    max_age: 0\n\n\r\n\n",
        );
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.max_age, 0);
        // Spaces around a key: the field is still read, with a warning.
        for body in [
            " version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version : STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        ] {
            let (p, w) = warned(body);
            assert_eq!(p.mode, Mode::Enforce);
            assert_eq!(w, ["line 1: spaces around the key version"]);
        }
        // A byte order mark is skipped.
        let (p, w) = warned("\u{feff}version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 9\n");
        assert_eq!((p.mode, p.max_age), (Mode::Enforce, 9));
        assert!(w[0].contains("byte order mark"), "{w:?}");
    }

    #[test]
    fn stray_cr_and_control() {
        // A lone CR ends a line: the fields around it are read, with one warning.
        let (p, w) = warned("version: STSv1\rmode: enforce\rmx: a.example\rmax_age: 1\r");
        assert_eq!((p.mode, p.max_age), (Mode::Enforce, 1));
        assert_eq!(
            w,
            ["line 1: line ends in a CR without LF (taken as a line end)"]
        );
        let (p, _) = warned("version: STSv1\nmode: enforce\r\r\nmx: a.example\nmax_age: 1\n");
        assert_eq!(p.mode, Mode::Enforce);
        // Control characters: an unknown field is ignored, a known one is an error.
        let (_, w) = warned("version: STSv1\nmode: none\nmax_age: 1\nx: a\u{1}b\n");
        assert_eq!(
            w,
            ["line 4: unknown field x has an empty or invalid value (ignored)"]
        );
        assert!(err("version: STSv1\nmode: none\u{1}\nmax_age: 1\n").contains("control"));
    }

    #[test]
    fn missing_and_duplicate_keys() {
        assert_eq!(err(""), "missing version: STSv1");
        assert_eq!(err("mode: none\nmax_age: 1\n"), "missing version: STSv1");
        assert_eq!(err("version: STSv1\nmax_age: 1\n"), "missing mode");
        assert_eq!(err("version: STSv1\nmode: none\n"), "missing max_age");
        // RFC 8461 §3.2: a repeated non-mx field is ignored after its first entry. An
        // enforce policy must never be lost for this (it would be a downgrade).
        let (p, w) = warned(
            "version: STSv1\nmode: enforce\nmx: mx.example.com\nmode: testing\nmax_age: 86400\n\
             max_age: 5\nversion: STSv2\n",
        );
        assert_eq!((p.mode, p.max_age), (Mode::Enforce, 86_400));
        assert_eq!(
            w,
            [
                "line 4: mode given again (line 2 is used, this one is ignored)",
                "line 6: max_age given again (line 5 is used, this one is ignored)",
                "line 7: version given again (line 1 is used, this one is ignored)",
            ]
        );
        let (p, _) = warned("version: STSv1\nmode: enforce\nmode: enforce\nmx: a.b\nmax_age: 1\n");
        assert_eq!(p.mode, Mode::Enforce);
        // The first entry decides, also when a later one would be invalid or valid.
        let (p, _) = warned("version: STSv1\nmode: testing\nmode: bogus\nmx: a.b\nmax_age: 1\n");
        assert_eq!(p.mode, Mode::Testing);
        assert!(
            err("version: STSv1\nmode: bogus\nmode: enforce\nmx: a.b\nmax_age: 1\n")
                .contains("line 2")
        );
        assert!(err("version: STSv1\nmode:\nmax_age: 1\n").contains("mode has no value"));
        // A line that is not a field at all is ignored like an unknown field.
        let (_, w) = warned("version: STSv1\nmode: none\nmax_age: 1\nfoo\n");
        assert_eq!(w, ["line 4: \"foo\" is not a key: value line (ignored)"]);
    }

    #[test]
    fn version_and_mode_values() {
        assert!(err("version: STSv2\nmode: none\nmax_age: 1\n").contains("not STSv1"));
        assert!(err("version: stsv1\nmode: none\nmax_age: 1\n").contains("not STSv1"));
        assert!(err("version: STSv1 x\nmode: none\nmax_age: 1\n").contains("not STSv1"));
        assert!(err("version: STSv1\nmode: Enforce\nmax_age: 1\n").contains("mode \"Enforce\""));
        assert!(err("version: STSv1\nmode: report\nmax_age: 1\n").contains("line 2"));
        // Keys are case-sensitive: "Version" is an unknown key, so version is missing.
        assert_eq!(
            err("Version: STSv1\nmode: none\nmax_age: 1\n"),
            "missing version: STSv1"
        );
        for m in [Mode::Enforce, Mode::Testing, Mode::None] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string(), m.as_str());
        }
    }

    #[test]
    fn max_age_values() {
        let with = |v: &str| format!("version: STSv1\nmode: none\nmax_age: {v}\n");
        assert_eq!(ok(&with("31557600")).max_age, MAX_AGE_LIMIT);
        assert_eq!(ok(&with("0000086400")).max_age, 86_400);
        assert_eq!(ok(&with("0")).max_age, 0);
        assert_eq!(ok(&with("00000000001")).max_age, 1);
        // Above the maximum: clamped, with a warning (a typo must not drop the policy).
        for big in [
            "31557601",
            "9999999999",
            "99999999999",
            "123456789012345678901234567890",
        ] {
            let (p, w) = warned(&with(big));
            assert_eq!(p.max_age, MAX_AGE_LIMIT, "{big}");
            assert_eq!(
                w,
                [format!(
                    "line 3: max_age {big} exceeds 31557600; 31557600 is used"
                )]
            );
        }
        for bad in ["-1", "+1", "1 2", "86400s", "١٢", "0x10"] {
            assert!(err(&with(bad)).contains("not a number of seconds"), "{bad}");
        }
    }

    #[test]
    fn mx_requirements() {
        let p = ok("version: STSv1\nmode: none\nmax_age: 1\n");
        assert!(p.mx.is_empty());
        assert!(!p.matches_mx("mx.example.com"));
        assert_eq!(
            err("version: STSv1\nmode: enforce\nmax_age: 1\n"),
            "mode enforce needs at least one mx pattern"
        );
        assert_eq!(
            err("version: STSv1\nmode: testing\nmax_age: 1\n"),
            "mode testing needs at least one mx pattern"
        );
        let p = ok(
            "version: STSv1\nmode: enforce\nmx: MX.Example.COM\nmx: mx.example.com\n\
                    mx: *.example.net\nmax_age: 1\n",
        );
        assert_eq!(p.mx, vec![pat("mx.example.com"), pat("*.example.net")]);
        // A trailing dot or a U-label is forgiven; an invalid pattern is skipped while the
        // others still protect the domain; none valid at all is no policy.
        let (p, w) = warned(
            "version: STSv1\nmode: enforce\nmx: mx.example.com.\nmx: *.Bücher.example\n\
             mx: bad_name.example\nmx: a.*.example\nmax_age: 1\n",
        );
        assert_eq!(
            p.mx,
            vec![pat("mx.example.com"), pat("*.xn--bcher-kva.example")]
        );
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].starts_with("line 3: mx \"mx.example.com.\" is taken as mx.example.com"));
        assert!(
            w[2].starts_with("line 5: mx pattern \"bad_name.example\""),
            "{w:?}"
        );
        assert!(w[2].ends_with("(pattern ignored; MX hosts only it would cover are refused)"));
        assert_eq!(
            err("version: STSv1\nmode: enforce\nmx: bad_name\nmx: -x\nmax_age: 1\n"),
            "mode enforce needs at least one mx pattern, and none of its 2 is valid"
        );
        let (p, _) = warned("version: STSv1\nmode: none\nmx: bad_name\nmax_age: 1\n");
        assert!(p.mx.is_empty());
    }

    #[test]
    fn unknown_keys_ignored() {
        let p = ok(
            "version: STSv1\nmode: enforce\nx-note: héllo wörld\tmore\nmx: a.example\n\
                    ext.key_1-a: v\nmax_age: 1\n",
        );
        assert_eq!(p.mx, vec![pat("a.example")]);
        // Lines that are not valid fields are unknown fields: ignored, with a warning.
        let long = format!(
            "version: STSv1\nmode: none\nmax_age: 1\n{}: v\n",
            "k".repeat(33)
        );
        for body in [
            "version: STSv1\nmode: none\nmax_age: 1\n_x: v\n",
            "version: STSv1\nmode: none\nmax_age: 1\nx y: v\n",
            long.as_str(),
        ] {
            let (_, w) = warned(body);
            assert!(
                w[0].starts_with("line 4: ") && w[0].ends_with("is not a valid key (line ignored)")
            );
        }
        let max = format!(
            "version: STSv1\nmode: none\nmax_age: 1\n{}: v\n",
            "k".repeat(32)
        );
        assert!(warned(&max).1.is_empty());
        // Keys stay case-sensitive (%s in the ABNF): `Mode` is an unknown field.
        assert_eq!(
            err("version: STSv1\nMode: enforce\nmax_age: 1\n"),
            "missing mode"
        );
    }

    #[test]
    fn size_and_encoding() {
        let mut body = b"version: STSv1\nmode: none\nmax_age: 1\n".to_vec();
        body.resize(MAX_POLICY_BYTES, b'\n');
        assert!(parse_policy(&body).is_ok());
        body.push(b'\n');
        let e = parse_policy(&body).unwrap_err().to_string();
        assert!(e.contains("more than 65536"), "{e}");
        // Invalid UTF-8 in an unknown field is ignored; in a known one it is an error.
        let p =
            parse_policy_lenient(b"version: STSv1\nmode: enforce\nx: \xff\nmx: a.b\nmax_age: 1\n")
                .unwrap();
        assert_eq!(p.policy.mode, Mode::Enforce);
        assert_eq!(p.warnings.len(), 1);
        let e = parse_policy(b"version: STSv1\nmode: enforce\xff\nmx: a.b\nmax_age: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid UTF-8"), "{e}");
    }

    #[test]
    fn pattern_syntax() {
        for good in [
            "mx.example.com",
            "*.example.com",
            "*.com",
            "localhost",
            "MX1.Example.COM",
            "xn--bcher-kva.example",
            "a-b.c0",
            "1.2.3.4",
        ] {
            assert!(MxPattern::parse(good).is_ok(), "{good}");
        }
        assert_eq!(pat("MX1.Example.COM").as_str(), "mx1.example.com");
        let label63 = "a".repeat(63);
        assert!(MxPattern::parse(&format!("{label63}.example")).is_ok());
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        for bad in [
            "",
            "*",
            "*.",
            "**.example.com",
            "*x.example.com",
            "a.*.example.com",
            "example.*",
            "mx.example.com.",
            ".example.com",
            "mx..example.com",
            "-mx.example.com",
            "mx-.example.com",
            "mx_1.example.com",
            "mx example.com",
            "mx.exämple.com",
            &format!("{}a.example", label63),
            &long[1..],
            &format!("*.{}", &long[3..]),
        ] {
            assert!(MxPattern::parse(bad).is_err(), "{bad:?}");
        }
        // 253 characters in all, with or without the wildcard.
        assert!(MxPattern::parse(&long[2..]).is_ok());
        assert!(MxPattern::parse(&format!("*.{}", &long[4..])).is_ok());
    }

    #[test]
    fn pattern_matching() {
        let w = pat("*.example.com");
        assert!(w.matches("mx.example.com"));
        assert!(w.matches("MX.EXAMPLE.COM"));
        assert!(w.matches("mx.example.com."));
        assert!(!w.matches("mx.example.com.."));
        assert!(!w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("mxexample.com"));
        assert!(!w.matches("mx.example.org"));
        assert!(!w.matches(""));
        assert!(!w.matches("é.example.com.x"));
        let e = pat("Mx.Example.Com");
        assert!(e.matches("mx.example.com"));
        assert!(e.matches("MX.EXAMPLE.COM."));
        assert!(!e.matches("a.mx.example.com"));
        assert!(!e.matches("example.com"));
        assert!(!e.matches("mx.example.com.."));
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec![pat("mail.example.com"), pat("*.example.net")],
            max_age: 1,
        };
        assert!(p.matches_mx("mail.example.com"));
        assert!(p.matches_mx("mx2.example.net"));
        assert!(!p.matches_mx("example.net"));
    }

    fn txt(records: &[&str]) -> Result<Option<StsRecord>, PolicyError> {
        let v: Vec<String> = records.iter().map(|s| s.to_string()).collect();
        parse_txt_records(&v)
    }

    fn id(record: &str) -> String {
        match parse_txt(record) {
            Ok(r) => r.id,
            Err(e) => panic!("{record:?}: {e}"),
        }
    }

    #[test]
    fn txt_selection() {
        assert_eq!(txt(&[]), Ok(None));
        assert_eq!(
            txt(&[
                "v=spf1 -all",
                "v=STSv10; id=1",
                "v=stsv1; id=1",
                " v=STSv1; id=1"
            ]),
            Ok(None)
        );
        assert_eq!(
            txt(&["v=spf1 -all", "v=STSv1; id=20160831085700Z;"]),
            Ok(Some(StsRecord {
                id: "20160831085700Z".into()
            }))
        );
        let e = txt(&["v=STSv1; id=1", "v=STSv1; id=2"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2 v=STSv1 TXT records; exactly one is allowed"
        );
        assert!(txt(&["v=STSv1; id=1", "v=STSv1; id=1"]).is_err());
        // Not beginning with `v=STSv1;` (spaces allowed before the `;`): not an STS record.
        assert_eq!(txt(&["v=STSv1 id=1"]), Ok(None));
        assert_eq!(txt(&["v=STSv1"]), Ok(None));
        assert_eq!(
            txt(&["v=STSv1 junk", "v=STSv1; id=7;"]),
            Ok(Some(StsRecord { id: "7".into() }))
        );
        assert!(txt(&["v=STSv1;"]).is_err());
    }

    #[test]
    fn txt_syntax() {
        assert_eq!(id("v=STSv1;id=abc"), "abc");
        assert_eq!(id("v=STSv1; id=abc;"), "abc");
        assert_eq!(id("v=STSv1 \t;\t id=abc \t; "), "abc");
        assert_eq!(id("v=STSv1; id=abc "), "abc");
        assert_eq!(id("v=STSv1; ext=val; id=ABC123; x.y_z-1=a:b/c?"), "ABC123");
        assert_eq!(
            id(&format!("v=STSv1; id={}", "9".repeat(32))),
            "9".repeat(32)
        );
        for bad in [
            "v=STSv1",
            "v=STSv1;",
            "v=STSv1; ;",
            "v=STSv1;; id=1",
            "v=STSv1; id=1;;",
            "v=STSv1 id=1",
            "v=STSv1x; id=1",
            "v=STSv1; id=",
            "v=STSv1; id=a-b",
            "v=STSv1; id=a b",
            "v=STSv1; id=ü",
            "v=STSv1; id=1; id=1",
            "v=STSv1; id=1; id=2",
            "v=STSv1; ID=1",
            "v=STSv1; id = 1",
            "v=STSv1; id=1; ext",
            "v=STSv1; id=1; ext=",
            "v=STSv1; id=1; ext=a=b",
            "v=STSv1; id=1; ext=a b",
            "v=STSv1; id=1; _ext=a",
            "v=STSv1; id=1; ext=é",
            "v=STSv1; id=1; ext=a\u{7f}",
            "STSv1; id=1",
            "",
        ] {
            assert!(parse_txt(bad).is_err(), "{bad:?}");
        }
        assert!(parse_txt(&format!("v=STSv1; id={}", "9".repeat(33))).is_err());
        let e = parse_txt("v=STSv1; id=a-b").unwrap_err().to_string();
        assert_eq!(
            e,
            "TXT record \"v=STSv1; id=a-b\": id \"a-b\" is not 1-32 letters and digits"
        );
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?"
    }

    fn domain() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
    }

    fn pattern() -> impl Strategy<Value = MxPattern> {
        (any::<bool>(), domain()).prop_map(|(wild, d)| {
            let s = if wild { format!("*.{d}") } else { d };
            MxPattern::parse(&s).unwrap()
        })
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            prop_oneof![Just(Mode::Enforce), Just(Mode::Testing), Just(Mode::None)],
            prop::collection::vec(pattern(), 1..=5),
            0..=MAX_AGE_LIMIT,
        )
            .prop_map(|(mode, mut mx, max_age)| {
                let mut seen = Vec::new();
                mx.retain(|p| {
                    let new = !seen.contains(p);
                    seen.push(p.clone());
                    new
                });
                Policy { mode, mx, max_age }
            })
    }

    proptest! {
        #[test]
        fn never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_policy(&body);
            let text = String::from_utf8_lossy(&body);
            let records: Vec<String> = text.split('\n').map(str::to_string).collect();
            let _ = parse_txt_records(&records);
        }

        #[test]
        fn never_panics_near_valid(
            s in "(version|mode|mx|max_age|id|v=STSv1|[a-z]{1,3})[:=; \t\r\n*.a-z0-9]{0,40}"
        ) {
            let _ = parse_policy(s.as_bytes());
            let _ = parse_txt(&s);
            let _ = MxPattern::parse(&s);
        }

        #[test]
        fn round_trip(p in policy()) {
            let crlf = p.to_text();
            prop_assert_eq!(parse_policy(crlf.as_bytes()), Ok(p.clone()));
            let lf = crlf.replace("\r\n", "\n");
            prop_assert_eq!(parse_policy(lf.as_bytes()), Ok(p));
        }

        #[test]
        fn wildcard_matches_one_label(l in label(), x in label(), d in domain()) {
            let w = MxPattern::parse(&format!("*.{d}")).unwrap();
            let host = format!("{l}.{d}");
            prop_assert!(w.matches(&host));
            prop_assert!(w.matches(&host.to_ascii_uppercase()));
            let dotted = format!("{host}.");
            let deeper = format!("{x}.{host}");
            prop_assert!(w.matches(&dotted));
            prop_assert!(!w.matches(&d));
            prop_assert!(!w.matches(&deeper));
        }

        #[test]
        fn exact_matches_itself(d in domain(), other in domain()) {
            let e = MxPattern::parse(&d).unwrap();
            prop_assert!(e.matches(&d.to_ascii_uppercase()));
            prop_assert!(e.matches(&d.to_ascii_lowercase()));
            let dotted = format!("{d}.");
            let deeper = format!("x.{d}");
            prop_assert!(e.matches(&dotted));
            prop_assert_eq!(e.matches(&other), other.eq_ignore_ascii_case(&d));
            prop_assert!(!e.matches(&deeper));
        }
    }
}
