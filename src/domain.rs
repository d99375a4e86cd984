//! Domain names in one form everywhere.
//!
//! Configuration (local domains, routes, `[[tls_policy]]` and inbound rules), envelope
//! addresses, MTA-STS and DNS all compare domains as [`Domain`]: A-labels (IDNA 2008 via
//! UTS #46, so `Bücher.Example` and `xn--bcher-kva.example` are the same domain, and the
//! ideographic full stop `。` separates labels as `.` does), lowercase, without a trailing dot.
//! A rule written in one form therefore always covers mail addressed in the other; comparing
//! raw strings would let a `verify` rule miss and the mail go out at `may`.

use std::fmt;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// A domain name in canonical form: A-labels, lowercase, no trailing dot, 1-253 characters,
/// LDH labels of 1-63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

/// Why a name is not a domain, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainError {
    pub name: String,
    pub reason: &'static str,
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a domain name: {}", self.name, self.reason)
    }
}

impl std::error::Error for DomainError {}

impl Domain {
    /// Canonicalises `name` (U-labels or A-labels, any case, one trailing dot allowed).
    pub fn parse(name: &str) -> Result<Domain, DomainError> {
        let err = |reason| DomainError {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(err("empty name"));
        }
        if name.starts_with('[') {
            return Err(err("an address literal is not a domain name"));
        }
        // One trailing dot (in any of the forms UTS #46 maps to `.`) is the root and allowed.
        let ascii = Uts46::new()
            .to_ascii(
                name.as_bytes(),
                AsciiDenyList::STD3,
                Hyphens::CheckFirstLast,
                DnsLength::VerifyAllowRootDot,
            )
            .map_err(|_| {
                err("labels must be 1-63 letters, digits or hyphens (or valid U-labels), not starting or ending with a hyphen, 253 characters in all")
            })?;
        let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
        if ascii.is_empty() || ascii.ends_with('.') {
            return Err(err("empty label"));
        }
        Ok(Domain(ascii.to_string()))
    }

    /// The canonical (A-label) form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// True when this domain is `suffix` or below it (`mx.example.com` is under `example.com`).
    pub fn is_at_or_under(&self, suffix: &Domain) -> bool {
        match self.0.strip_suffix(suffix.as_str()) {
            Some("") => true,
            Some(head) => head.ends_with('.'),
            None => false,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Domain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The canonical form of the domain of an envelope address or host name, for lookups and
/// grouping: [`Domain`]'s form when it is one, otherwise (address literals, names that are
/// not valid domains) the name lowercased, which matches no configured domain or rule.
pub fn canonical_or_lower(name: &str) -> String {
    match Domain::parse(name) {
        Ok(d) => d.into_string(),
        Err(_) => name.to_lowercase(),
    }
}

/// A domain pattern of a rule: a domain (exact match) or `*.suffix` (any name strictly below
/// `suffix`, at any depth).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(Domain),
    Below(Domain),
}

impl DomainPattern {
    /// Parses `example.com` or `*.example.com`, either label form.
    pub fn parse(pattern: &str) -> Result<DomainPattern, DomainError> {
        match pattern.strip_prefix("*.") {
            Some(suffix) => Domain::parse(suffix).map(DomainPattern::Below),
            None => Domain::parse(pattern).map(DomainPattern::Exact),
        }
    }

    /// True when `domain` matches (see the type's docs).
    pub fn matches(&self, domain: &Domain) -> bool {
        match self {
            DomainPattern::Exact(d) => d == domain,
            DomainPattern::Below(s) => domain != s && domain.is_at_or_under(s),
        }
    }

    /// True when the domain of `name` (canonicalised first) matches; never for names that
    /// are not domains.
    pub fn matches_name(&self, name: &str) -> bool {
        Domain::parse(name).is_ok_and(|d| self.matches(&d))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => write!(f, "{d}"),
            DomainPattern::Below(d) => write!(f, "*.{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Domain {
        Domain::parse(s).unwrap()
    }

    #[test]
    fn one_form_for_every_spelling() {
        let canonical = "xn--bcher-kva.example";
        for s in [
            "bücher.example",
            "Bücher.Example",
            "BÜCHER.EXAMPLE.",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.EXAMPLE",
            "bücher。example",
            "bücher．example",
            "bücher.example\u{3002}",
        ] {
            assert_eq!(d(s).as_str(), canonical, "{s}");
        }
        assert_eq!(d("Mail.Example.COM.").as_str(), "mail.example.com");
    }

    #[test]
    fn not_domains() {
        for s in [
            "",
            ".",
            "a..b",
            ".a",
            "a.b..",
            "-a.example",
            "a-.example",
            "a_b.example",
            "a b.example",
            "[127.0.0.1]",
            "xn--zzzzzzzzz.example",
            &"a".repeat(64),
            &[&"a".repeat(63)[..]; 5].join("."),
        ] {
            assert!(Domain::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn patterns_match_in_either_form() {
        let exact = DomainPattern::parse("bücher.example").unwrap();
        assert!(exact.matches_name("xn--bcher-kva.example"));
        assert!(exact.matches_name("BÜCHER.example."));
        assert!(!exact.matches_name("a.bücher.example"));
        let below = DomainPattern::parse("*.xn--bcher-kva.example").unwrap();
        assert!(below.matches_name("mx.bücher.example"));
        assert!(below.matches_name("a.b.xn--bcher-kva.example"));
        assert!(!below.matches_name("bücher.example"));
        assert!(!below.matches_name("xbücher.example"));
        assert!(!below.matches_name("[127.0.0.1]"));
        assert_eq!(below.to_string(), "*.xn--bcher-kva.example");
        assert!(DomainPattern::parse("*.").is_err());
        assert!(DomainPattern::parse("a.*.b").is_err());
    }

    #[test]
    fn canonical_or_lower_keeps_literals() {
        assert_eq!(
            canonical_or_lower("Bücher.Example"),
            "xn--bcher-kva.example"
        );
        assert_eq!(canonical_or_lower("[IPv6:::1]"), "[ipv6:::1]");
    }
}
