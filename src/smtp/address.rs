//! Envelope address checks that the parser leaves to us.
//!
//! `smtp-proto` removes quotes and source routes (`<@a,@b:user@c>` becomes `user@c`), so the
//! local part we see may contain `@`, `%` or `!` that came from a quoted string. Those are the
//! classic open-relay tricks (`"user@remote"@local`, `user%remote@local`, `remote!user@local`):
//! we never route on them, and unless the client may relay anyway they are refused.

/// A parsed envelope address: `local@domain`, domain lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl Address {
    /// Splits at the last `@` and checks the domain's syntax. `utf8` allows U-labels
    /// (SMTPUTF8 transactions).
    pub fn parse(addr: &str, utf8: bool) -> Option<Address> {
        let (local, domain) = addr.rsplit_once('@')?;
        if local.is_empty() || local.len() > 64 || !valid_domain(domain, utf8) {
            return None;
        }
        if local.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return None;
        }
        Some(Address {
            local: local.to_string(),
            domain: domain.to_ascii_lowercase(),
        })
    }

    /// Local part carries routing characters (`@`, `%`, `!`) used by relay tricks.
    pub fn has_routing_chars(&self) -> bool {
        self.local.contains(['@', '%', '!'])
    }

    /// True when the domain is an address literal such as `[192.0.2.1]`.
    pub fn is_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// RFC 5321 `Domain / address-literal`, without a trailing dot.
pub fn valid_domain(domain: &str, utf8: bool) -> bool {
    if domain.is_empty() || domain.len() > 255 {
        return false;
    }
    if let Some(inner) = domain.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return false;
        };
        if let Some(v6) = inner
            .strip_prefix("IPv6:")
            .or_else(|| inner.strip_prefix("ipv6:"))
        {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return inner.parse::<std::net::Ipv4Addr>().is_ok();
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || (utf8 && !c.is_ascii()))
    })
}

/// The mailbox name used for local (Maildir) delivery: the local part without a `+detail`
/// suffix, lowercased, restricted to characters that are safe as one path component: letters
/// and digits (any script: SMTPUTF8 local parts, NFC-normalised first so that one name has
/// one directory), `.`, `_` and `-`; at most 64 characters.
pub fn mailbox_name(local: &str) -> Option<String> {
    let base = local.split('+').next().unwrap_or(local);
    let base = if base.is_ascii() {
        base.to_ascii_lowercase()
    } else {
        let nfc = icu_normalizer::ComposingNormalizerBorrowed::new_nfc().normalize(base);
        // Lowercasing can decompose (`İ`), so normalise once more.
        icu_normalizer::ComposingNormalizerBorrowed::new_nfc()
            .normalize(&nfc.to_lowercase())
            .into_owned()
    };
    let ok = !base.is_empty()
        && base.chars().count() <= 64
        && !base.starts_with('.')
        && !base.contains("..")
        && base
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-'));
    ok.then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_lowercases_domain() {
        let a = Address::parse("Bob@Example.COM", false).unwrap();
        assert_eq!(a.local, "Bob");
        assert_eq!(a.domain, "example.com");
    }

    #[test]
    fn rejects_bad_domains() {
        for d in [
            "a@",
            "a@example.com.",
            "a@-x.com",
            "a@x..com",
            "a@[1.2.3]",
            "a@[x]",
            "a@ex ample",
        ] {
            assert!(Address::parse(d, false).is_none(), "{d}");
        }
        assert!(Address::parse("a@[127.0.0.1]", false).unwrap().is_literal());
        assert!(Address::parse("a@[IPv6:::1]", false).is_some());
        assert!(Address::parse("a@bücher.de", false).is_none());
        assert!(Address::parse("a@bücher.de", true).is_some());
    }

    #[test]
    fn routing_chars_found_after_dequoting() {
        for a in [
            "user@remote@local",
            "user%remote@local",
            "remote!user@local",
        ] {
            assert!(Address::parse(a, false).unwrap().has_routing_chars(), "{a}");
        }
        let a = Address::parse("user@remote@local", false).unwrap();
        assert_eq!(a.domain, "local");
    }

    #[test]
    fn mailbox_names_are_safe_path_components() {
        assert_eq!(mailbox_name("Alice+tag").as_deref(), Some("alice"));
        for bad in [
            "..",
            "../etc",
            "a/b",
            ".hidden",
            "a..b",
            "",
            "a b",
            "x\0",
            "ö/x",
            "a\u{200b}b",
        ] {
            assert!(mailbox_name(bad).is_none(), "{bad:?}");
        }
        // SMTPUTF8 local parts: one directory per name, whatever its case or composition.
        assert_eq!(mailbox_name("Jörg").as_deref(), Some("jörg"));
        assert_eq!(mailbox_name("jo\u{308}rg+x").as_deref(), Some("jörg"));
        assert_eq!(mailbox_name("用户").as_deref(), Some("用户"));
    }
}
