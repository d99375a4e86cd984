//! The domain owner's side: a policy file and the DNS records that announce it, with
//! instructions for publishing them (`moat sts generate`). Pure code, no I/O.

use crate::sts::policy::{
    MAX_AGE_LIMIT, Mode, MxPattern, Policy, PolicyError, check_domain, parse_policy, parse_txt,
};
use crate::util::compact_utc;

/// Mode of a newly generated policy: `testing`, so mistakes are reported, not enforced.
pub const DEFAULT_MODE: Mode = Mode::Testing;

/// `max_age` of a newly generated policy: one week, in seconds.
pub const DEFAULT_MAX_AGE: u32 = 604_800;

/// Longest prefix put before the domain (`_smtp._tls.`), to keep every name within 253 characters.
const LONGEST_PREFIX: usize = "_smtp._tls.".len();

/// A generated policy and the DNS records to publish with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The policy.
    pub policy: Policy,
    /// The policy file (CRLF line endings), served at `/.well-known/mta-sts.txt`.
    pub policy_text: String,
    /// Owner name of the MTA-STS TXT record: `_mta-sts.<domain>` (no trailing dot).
    pub sts_name: String,
    /// The MTA-STS TXT record: `v=STSv1; id=<id>;`.
    pub sts_value: String,
    /// Owner name of the TLS-RPT TXT record: `_smtp._tls.<domain>` (no trailing dot).
    pub tlsrpt_name: String,
    /// The TLS-RPT TXT record (RFC 8460): `v=TLSRPTv1; rua=<uri>`.
    pub tlsrpt_value: String,
}

/// Policy id for a moment: `yyyymmddhhmmssZ` in UTC, e.g. `20261123232619Z` (15 letters and
/// digits, a valid `id`). Ids made later sort later.
pub fn sts_id(unix: u64) -> String {
    format!("{}Z", compact_utc(unix))
}

/// Lowercase, without one trailing dot.
fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Checks a TLS-RPT `rua`: one or more comma-separated `mailto:` or `https:` URIs, printable
/// ASCII without `;`, `"` or `\`. Returns the list with spaces around commas removed.
fn check_rua(rua: &str) -> Result<String, PolicyError> {
    let mut uris = Vec::new();
    for raw in rua.split(',') {
        let uri = raw.trim_matches([' ', '\t']);
        let bad = |why: &str| PolicyError::new(format!("rua {uri:?}: {why}"));
        if uri.is_empty() {
            return Err(bad("empty URI"));
        }
        if !uri
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b';' | b'"' | b'\\'))
        {
            return Err(bad(
                "only printable ASCII without spaces, ';', '\"' or '\\' is allowed",
            ));
        }
        let lower = uri.to_ascii_lowercase();
        if let Some(addr) = lower.strip_prefix("mailto:") {
            let addr = addr.split('?').next().unwrap_or("");
            match addr.rsplit_once('@') {
                Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {}
                _ => return Err(bad("mailto: needs an address like tlsrpt@example.com")),
            }
        } else if let Some(rest) = lower.strip_prefix("https://") {
            if rest.split('/').next().unwrap_or("").is_empty() {
                return Err(bad("https: needs a host"));
            }
        } else {
            return Err(bad("must be a mailto: or https:// URI"));
        }
        uris.push(uri);
    }
    Ok(uris.join(","))
}

/// Builds a policy for `domain` with the given MX patterns (a trailing dot on the domain or a
/// pattern is dropped; repeated patterns are kept once), the TXT record with an id from
/// `unix_now`, and a TLS-RPT record sending reports to `rua` (default
/// `mailto:tlsrpt@<domain>`).
pub fn generate(
    domain: &str,
    mx: &[String],
    mode: Mode,
    max_age: u32,
    unix_now: u64,
    rua: Option<&str>,
) -> Result<Generated, PolicyError> {
    let domain = normalize(domain);
    if let Err(reason) = check_domain(&domain) {
        return Err(PolicyError::new(format!("domain {domain:?}: {reason}")));
    }
    if !domain.contains('.') {
        return Err(PolicyError::new(format!(
            "domain {domain:?}: needs at least two labels"
        )));
    }
    if domain.len() + LONGEST_PREFIX > 253 {
        return Err(PolicyError::new(format!(
            "domain {domain:?}: too long for _smtp._tls.{domain}"
        )));
    }
    let mut patterns: Vec<MxPattern> = Vec::new();
    for m in mx {
        let p = MxPattern::parse(m.strip_suffix('.').unwrap_or(m))?;
        if !patterns.contains(&p) {
            patterns.push(p);
        }
    }
    if patterns.is_empty() && mode != Mode::None {
        return Err(PolicyError::new(format!(
            "mode {mode} needs at least one mx pattern"
        )));
    }
    if max_age > MAX_AGE_LIMIT {
        return Err(PolicyError::new(format!(
            "max_age {max_age} exceeds {MAX_AGE_LIMIT}"
        )));
    }
    let rua = match rua {
        Some(r) => check_rua(r)?,
        None => format!("mailto:tlsrpt@{domain}"),
    };
    let policy = Policy {
        mode,
        mx: patterns,
        max_age,
    };
    let policy_text = policy.to_text();
    let sts_value = format!("v=STSv1; id={};", sts_id(unix_now));
    // What we publish must be what senders accept.
    if parse_policy(policy_text.as_bytes()).as_ref() != Ok(&policy) {
        return Err(PolicyError::new("generated policy does not parse back"));
    }
    parse_txt(&sts_value)?;
    Ok(Generated {
        policy,
        policy_text,
        sts_name: format!("_mta-sts.{domain}"),
        sts_value,
        tlsrpt_name: format!("_smtp._tls.{domain}"),
        tlsrpt_value: format!("v=TLSRPTv1; rua={rua}"),
    })
}

/// A TXT record in zone-file form, split into quoted strings of at most 255 characters.
fn zone_txt(name: &str, value: &str) -> String {
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{name}. 3600 IN TXT {}", strings.join(" "))
}

/// Instructions for people: the policy file and where to serve it, the DNS records, and the
/// steps for rolling MTA-STS out and changing it later.
pub fn render(g: &Generated, domain: &str) -> String {
    let domain = normalize(domain);
    let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
    let mut out = String::new();
    out.push_str(&format!("MTA-STS for {domain}\n\n"));

    out.push_str(&format!(
        "1. Serve this policy file at {url}\n\
         \x20  with status 200 and Content-Type text/plain:\n\n"
    ));
    for line in g.policy_text.lines() {
        out.push_str(&format!("       {line}\n"));
    }
    out.push_str(&format!(
        "\n   mta-sts.{domain} needs an address record and a certificate for that name from a\n\
         \x20  public CA: senders check it as browsers do. Serve the file at exactly this URL;\n\
         \x20  senders do not follow redirects.\n\n"
    ));

    out.push_str("2. Publish these DNS records:\n\n");
    out.push_str(&format!("       {}\n", zone_txt(&g.sts_name, &g.sts_value)));
    out.push_str(&format!(
        "       {}\n\n",
        zone_txt(&g.tlsrpt_name, &g.tlsrpt_value)
    ));
    out.push_str(
        "   The first tells senders a policy exists and which version is current (its id).\n\
         \x20  The second asks them for daily TLS reports (RFC 8460), sent to the rua address.\n\
         \x20  Put the policy file in place before the TXT record.\n\n",
    );

    out.push_str(&format!(
        "3. Start in mode testing with a short max_age, such as 86400 (one day). This policy\n\
         \x20  is mode {}, max_age {}. In testing, senders deliver as before and report\n\
         \x20  failures.\n\n",
        g.policy.mode, g.policy.max_age
    ));
    out.push_str(
        "4. Watch the TLS reports for a week or two. Every MX host must match an mx line and\n\
         \x20  offer STARTTLS with a valid certificate for its name.\n\n",
    );
    out.push_str(&format!(
        "5. When reports are clean, switch to mode enforce and raise max_age to 604800 (one\n\
         \x20  week) or more, up to {MAX_AGE_LIMIT}. Senders then refuse MX hosts that are not\n\
         \x20  listed or fail certificate checks.\n\n"
    ));
    out.push_str(
        "6. Every time the policy file changes, publish a new id: run `moat sts generate`\n\
         \x20  again and replace both the file and the _mta-sts TXT record. Senders keep their\n\
         \x20  cached copy until the id changes or max_age runs out. Add a new MX host to the\n\
         \x20  policy before it goes into the MX records, and remove one from the policy only\n\
         \x20  after it has left them. To withdraw MTA-STS, publish mode none with a new id and\n\
         \x20  keep serving it for the old max_age before removing anything.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::policy::parse_txt_records;

    /// 2026-11-23 23:26:19 UTC.
    const T: u64 = 1_795_476_379;

    fn mx(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn gen_ok(domain: &str, names: &[&str], mode: Mode, rua: Option<&str>) -> Generated {
        match generate(domain, &mx(names), mode, DEFAULT_MAX_AGE, T, rua) {
            Ok(g) => g,
            Err(e) => panic!("{domain} {names:?}: {e}"),
        }
    }

    fn gen_err(domain: &str, names: &[&str], max_age: u32, rua: Option<&str>) -> String {
        match generate(domain, &mx(names), DEFAULT_MODE, max_age, T, rua) {
            Ok(g) => panic!("{domain} {names:?} generated {g:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ids() {
        assert_eq!(sts_id(T), "20261123232619Z");
        assert_eq!(sts_id(0), "19700101000000Z");
        assert!(sts_id(T) < sts_id(T + 1));
        assert_eq!(
            parse_txt(&format!("v=STSv1; id={};", sts_id(T)))
                .unwrap()
                .id,
            sts_id(T)
        );
    }

    #[test]
    fn generated_output_parses_back() {
        let g = gen_ok(
            "Example.COM.",
            &["mx1.example.com.", "*.mail.example.com", "MX1.example.com"],
            DEFAULT_MODE,
            None,
        );
        assert_eq!(parse_policy(g.policy_text.as_bytes()), Ok(g.policy.clone()));
        assert_eq!(g.policy.mode, Mode::Testing);
        assert_eq!(g.policy.max_age, 604_800);
        assert_eq!(
            g.policy_text,
            "version: STSv1\r\nmode: testing\r\nmx: mx1.example.com\r\n\
             mx: *.mail.example.com\r\nmax_age: 604800\r\n"
        );
        assert_eq!(g.sts_name, "_mta-sts.example.com");
        assert_eq!(g.sts_value, "v=STSv1; id=20261123232619Z;");
        assert_eq!(
            parse_txt_records(std::slice::from_ref(&g.sts_value))
                .unwrap()
                .unwrap()
                .id,
            "20261123232619Z"
        );
        assert_eq!(g.tlsrpt_name, "_smtp._tls.example.com");
        assert_eq!(g.tlsrpt_value, "v=TLSRPTv1; rua=mailto:tlsrpt@example.com");
    }

    #[test]
    fn mode_none_and_enforce() {
        let g = gen_ok("example.com", &[], Mode::None, None);
        assert!(g.policy.mx.is_empty());
        assert_eq!(parse_policy(g.policy_text.as_bytes()), Ok(g.policy));
        let g = gen_ok("example.com", &["mx.example.com"], Mode::Enforce, None);
        assert!(g.policy_text.contains("mode: enforce\r\n"));
        assert!(
            generate("example.com", &[], Mode::Enforce, 1, T, None)
                .unwrap_err()
                .to_string()
                .contains("needs at least one mx")
        );
    }

    #[test]
    fn invalid_input() {
        assert!(gen_err("example.com", &[], 1, None).contains("mode testing needs"));
        assert!(gen_err("example.com", &["mx"], MAX_AGE_LIMIT + 1, None).contains("exceeds"));
        assert!(gen_err("example.com", &["a.*.example.com"], 1, None).contains("mx pattern"));
        assert!(gen_err("example.com", &["mx.example.com.."], 1, None).contains("mx pattern"));
        for domain in [
            "",
            "com",
            "*.example.com",
            "exa mple.com",
            "-x.com",
            "a..com",
        ] {
            assert!(
                gen_err(domain, &["mx"], 1, None).contains("domain"),
                "{domain:?}"
            );
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(60)
        );
        assert_eq!(long.len(), 252);
        assert!(gen_err(&long, &["mx"], 1, None).contains("too long"));
    }

    #[test]
    fn rua() {
        let value = |r: &str| gen_ok("example.com", &["mx"], Mode::Testing, Some(r)).tlsrpt_value;
        assert_eq!(
            value("mailto:reports@example.net"),
            "v=TLSRPTv1; rua=mailto:reports@example.net"
        );
        assert_eq!(
            value("https://reports.example.net/tlsrpt"),
            "v=TLSRPTv1; rua=https://reports.example.net/tlsrpt"
        );
        assert_eq!(
            value("MAILTO:a@b.example , https://r.example/x"),
            "v=TLSRPTv1; rua=MAILTO:a@b.example,https://r.example/x"
        );
        for bad in [
            "",
            "reports@example.net",
            "mailto:",
            "mailto:@example.net",
            "mailto:reports@",
            "http://reports.example.net/",
            "https://",
            "https:///path",
            "mailto:a@b.example;x",
            "mailto:a b@example.net",
            "mailto:\"a\"@example.net",
            "mailto:a@b.example,",
            "mailto:ä@example.net",
        ] {
            assert!(
                gen_err("example.com", &["mx"], 1, Some(bad)).contains("rua"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn instructions() {
        let g = gen_ok("example.com", &["mx.example.com"], DEFAULT_MODE, None);
        let text = render(&g, "Example.com.");
        for needle in [
            "https://mta-sts.example.com/.well-known/mta-sts.txt",
            "text/plain",
            "certificate",
            "redirects",
            "       version: STSv1\n       mode: testing\n       mx: mx.example.com\n",
            "_mta-sts.example.com. 3600 IN TXT \"v=STSv1; id=20261123232619Z;\"",
            "_smtp._tls.example.com. 3600 IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.com\"",
            "86400",
            "enforce",
            "604800",
            "new id",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(!text.contains('\r'));
        let steps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .collect();
        assert_eq!(steps.len(), 6, "{text}");
    }

    #[test]
    fn long_txt_values_are_split() {
        let v = "x".repeat(300);
        let z = zone_txt("_smtp._tls.example.com", &v);
        assert_eq!(
            z,
            format!(
                "_smtp._tls.example.com. 3600 IN TXT \"{}\" \"{}\"",
                "x".repeat(255),
                "x".repeat(45)
            )
        );
    }
}
