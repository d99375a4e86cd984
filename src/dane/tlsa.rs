//! TLSA records and DANE certificate matching for SMTP (RFC 6698, RFC 7671, RFC 7672 §3).
//!
//! Pure and I/O-free: the caller looks the records up (DNSSEC-validated, at the TLSA base
//! domain), runs the handshake, and hands [`verify`] the records, the certificates the server
//! presented and the names it may carry.
//!
//! # Records
//!
//! A [`Tlsa`] record is `usage selector matching data` (RFC 6698 §2, names from RFC 7218):
//! usage DANE-TA(2) or DANE-EE(3); selector Cert(0), the whole certificate, or SPKI(1), its
//! SubjectPublicKeyInfo; matching type Full(0), the selected bytes themselves, SHA2-256(1) or
//! SHA2-512(2), their digest.
//!
//! # Which records count ([`usable`])
//!
//! 1. PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (RFC 7672 §3.1.3), and so are usages,
//!    selectors and matching types that have no meaning yet.
//! 2. Malformed records are unusable (RFC 7671 §5): a digest that is not 32 (SHA2-256) or 64
//!    (SHA2-512) bytes long, empty data, or Full(0) data that is not a DER certificate
//!    (selector 0) or SubjectPublicKeyInfo (selector 1).
//! 3. Digest algorithm agility (RFC 7671 §9): among the records left with the same usage and
//!    selector, SHA2-256 records are ignored when a SHA2-512 record is present (Full(0) ones
//!    are always kept), so an attacker who can break SHA2-256 gains nothing while a domain
//!    publishes both during a migration.
//!
//! Malformed records are dropped before step 3, so they cannot suppress a good one. When no
//! record is usable, RFC 7672 §2.2 still requires TLS, but without authentication: [`verify`]
//! reports [`DaneFailure::NoUsableRecords`] and the caller decides (it is not a mismatch).
//!
//! # Matching ([`verify`])
//!
//! Any one usable record that matches accepts (RFC 7671 §5). DANE-EE records are tried first,
//! as they are the cheaper check:
//!
//! * **DANE-EE(3)** (RFC 7672 §3.1.1): the server's own certificate (the first presented)
//!   matches the record, and that is all. Names, validity dates and issuer are not checked:
//!   the TLSA record, not a CA, binds the key to the name.
//! * **DANE-TA(2)** (RFC 7672 §3.1.2): a certificate the server presented matches the record
//!   (servers must include the trust anchor in their chain), and that certificate is the
//!   trust anchor for ordinary PKIX validation of the server's certificate by webpki:
//!   signatures, validity dates at `now`, basic constraints and path length, name
//!   constraints, the serverAuth extended key usage when the certificate lists any, with the
//!   other presented certificates as intermediates and the TLS stack's own signature
//!   algorithms. Then the server's certificate must be valid for one of the caller's
//!   reference identifiers (RFC 7672 §3.2.2: the TLSA base domain and the MX host name, after
//!   CNAME expansion): its DNS subject alternative names, where a `*.` wildcard covers exactly
//!   one label; its subject common names only when it has no DNS names (RFC 7672 §3.2.3).
//!
//! # Corner cases, as decided here
//!
//! * A DANE-TA record that carries its trust anchor whole, `2 0 0` (a certificate) or `2 1 0`
//!   (a bare public key), is used as the trust anchor even when the server does not present
//!   it (RFC 7671 §5.2.1, §5.2.2). A bare key is tried as the issuer of each certificate the
//!   server presented; a signature check decides.
//! * The trust anchor's own validity dates are not checked: trust anchor information has no
//!   validity period (RFC 5280 §6.1.1), and the record in the DNS is what vouches for it.
//!   Every other certificate on the path must be valid at `now`.
//! * A DANE-TA record that matches only the server's own certificate makes that certificate
//!   its own trust anchor. When it is self-signed (its signature verifies with its own key,
//!   CA:FALSE) that works, and names and dates are still checked, so it is never weaker than
//!   the same record as DANE-EE. When it is issued by someone else it cannot be its own
//!   anchor, and the failure says to publish the record as DANE-EE(3) or to match the CA
//!   instead (OpenSSL, and so Postfix, never match DANE-TA records against the server's own
//!   certificate at all).
//! * When several records fail, the failure reported is the most specific one: a wrong name
//!   on a chain that reached a matching trust anchor, then an expired (or not yet valid)
//!   certificate on such a chain, then a chain that does not lead to the matching anchor,
//!   and only then "nothing matched". A chain is reported as expired only when it verifies
//!   at a time within its certificates' validity; otherwise the other fault is reported.
//!
//! # Failures and codes
//!
//! [`DaneFailure::code`] gives Exchange Online's temporary codes: `4.7.322` for an expired
//! certificate, `4.7.325` for a name mismatch, `4.7.323` (TLSA validation failed) for the
//! rest; the permanent ones start with 5 ([`DaneFailure::enhanced_code`]).

use std::collections::HashSet;
use std::fmt;
use std::sync::LazyLock;

use rustls_pki_types::{
    CertificateDer, Der, ServerName, SignatureVerificationAlgorithm, TrustAnchor, UnixTime,
};
use x509_parser::prelude::{FromDer, GeneralName, SubjectPublicKeyInfo, X509Certificate};

use crate::smtp::client::escape_text;
use crate::util::rfc5322_date;

/// Certificate usage PKIX-TA(0): a CA that must also be publicly trusted (not for SMTP).
pub const PKIX_TA: u8 = 0;
/// Certificate usage PKIX-EE(1): the server's certificate, publicly trusted (not for SMTP).
pub const PKIX_EE: u8 = 1;
/// Certificate usage DANE-TA(2): a trust anchor for the server's certificate chain.
pub const DANE_TA: u8 = 2;
/// Certificate usage DANE-EE(3): the server's own certificate or key.
pub const DANE_EE: u8 = 3;
/// Selector Cert(0): the whole certificate (DER).
pub const SELECTOR_CERT: u8 = 0;
/// Selector SPKI(1): the certificate's SubjectPublicKeyInfo (DER).
pub const SELECTOR_SPKI: u8 = 1;
/// Matching type Full(0): the selected bytes themselves.
pub const MATCHING_FULL: u8 = 0;
/// Matching type SHA2-256(1): their SHA-256 digest (32 bytes).
pub const MATCHING_SHA256: u8 = 1;
/// Matching type SHA2-512(2): their SHA-512 digest (64 bytes).
pub const MATCHING_SHA512: u8 = 2;

/// The RFC 7218 name of a certificate usage (`DANE-EE`), or `unknown`.
pub fn usage_name(usage: u8) -> &'static str {
    match usage {
        PKIX_TA => "PKIX-TA",
        PKIX_EE => "PKIX-EE",
        DANE_TA => "DANE-TA",
        DANE_EE => "DANE-EE",
        _ => "unknown",
    }
}

/// The RFC 7218 name of a matching type (`SHA2-256`), or `unknown`.
pub fn matching_name(matching: u8) -> &'static str {
    match matching {
        MATCHING_FULL => "Full",
        MATCHING_SHA256 => "SHA2-256",
        MATCHING_SHA512 => "SHA2-512",
        _ => "unknown",
    }
}

/// One TLSA record (RFC 6698 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    /// Certificate usage: [`DANE_TA`] or [`DANE_EE`] for SMTP.
    pub usage: u8,
    /// [`SELECTOR_CERT`] or [`SELECTOR_SPKI`].
    pub selector: u8,
    /// [`MATCHING_FULL`], [`MATCHING_SHA256`] or [`MATCHING_SHA512`].
    pub matching: u8,
    /// Certificate association data: the selected bytes or their digest.
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Parses the presentation form, `3 1 1 <hex>` (RFC 6698 §2.2): three decimal numbers
    /// up to 255, then the data in hex, which may be split by white space and is
    /// case-insensitive.
    pub fn parse_presentation(s: &str) -> Result<Tlsa, String> {
        let bad =
            |why: String| format!("{s:?}: {why}; expected a TLSA record such as \"3 1 1 <hex>\"");
        let mut fields = s.split_ascii_whitespace();
        let mut number = |what: &str| -> Result<u8, String> {
            let field = fields
                .next()
                .ok_or_else(|| bad(format!("the {what} is missing")))?;
            if !field.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!("the {what} {field:?} is not a number")));
            }
            // Only digits: the one way to fail is a number too large.
            field
                .parse::<u8>()
                .map_err(|_| bad(format!("the {what} {field} is larger than 255")))
        };
        let usage = number("certificate usage")?;
        let selector = number("selector")?;
        let matching = number("matching type")?;
        let hex: String = fields.collect();
        if hex.is_empty() {
            return Err(bad("the certificate association data is missing".into()));
        }
        let data = decode_hex(&hex).map_err(bad)?;
        Ok(Tlsa {
            usage,
            selector,
            matching,
            data,
        })
    }

    /// Parses the wire form of the RDATA: usage, selector and matching type octets, then
    /// the data (RFC 6698 §2.1).
    pub fn from_rdata(rdata: &[u8]) -> Result<Tlsa, String> {
        match rdata {
            [usage, selector, matching, data @ ..] => Ok(Tlsa {
                usage: *usage,
                selector: *selector,
                matching: *matching,
                data: data.to_vec(),
            }),
            _ => Err(format!(
                "a TLSA record's data is at least 3 bytes long, not {}",
                rdata.len()
            )),
        }
    }

    /// The record with `usage`, `selector` and `matching` that matches the certificate
    /// `cert` (DER), the one to publish for it; `None` for a selector or matching type that
    /// has no meaning, or selector SPKI(1) on a certificate that cannot be parsed.
    pub fn for_certificate(usage: u8, selector: u8, matching: u8, cert: &[u8]) -> Option<Tlsa> {
        let selected = selected_content(selector, cert)?;
        Some(Tlsa {
            usage,
            selector,
            matching,
            data: association_data(matching, selected)?,
        })
    }

    /// Why SMTP cannot use the record on its own terms, or `None` when it can (see the
    /// module documentation; digest agility depends on the other records and is [`usable`]'s
    /// business).
    pub fn unusable_reason(&self) -> Option<Unusable> {
        match self.usage {
            PKIX_TA | PKIX_EE => return Some(Unusable::PkixUsage(self.usage)),
            DANE_TA | DANE_EE => {}
            u => return Some(Unusable::UnknownUsage(u)),
        }
        if self.selector > SELECTOR_SPKI {
            return Some(Unusable::UnknownSelector(self.selector));
        }
        let len = self.data.len();
        match self.matching {
            MATCHING_FULL if len == 0 => Some(Unusable::Empty),
            MATCHING_FULL => {
                let parses = match self.selector {
                    SELECTOR_CERT => {
                        matches!(X509Certificate::from_der(&self.data), Ok((rest, _)) if rest.is_empty())
                    }
                    _ => matches!(
                        SubjectPublicKeyInfo::from_der(&self.data),
                        Ok((rest, _)) if rest.is_empty()
                    ),
                };
                (!parses).then_some(Unusable::Malformed {
                    selector: self.selector,
                })
            }
            MATCHING_SHA256 if len != 32 => Some(Unusable::DigestLength {
                matching: self.matching,
                len,
            }),
            MATCHING_SHA512 if len != 64 => Some(Unusable::DigestLength {
                matching: self.matching,
                len,
            }),
            MATCHING_SHA256 | MATCHING_SHA512 => None,
            m => Some(Unusable::UnknownMatching(m)),
        }
    }

    /// Whether SMTP can use the record on its own terms: usage DANE-TA(2) or DANE-EE(3),
    /// selector 0 or 1, matching type 0, 1 or 2, and data of the right form.
    pub fn usable_for_smtp(&self) -> bool {
        self.unusable_reason().is_none()
    }

    /// Whether the certificate `cert` (DER) matches the record's selector, matching type and
    /// data; the usage is not considered.
    pub fn matches(&self, cert: &[u8]) -> bool {
        let Some(selected) = selected_content(self.selector, cert) else {
            return false;
        };
        match self.matching {
            MATCHING_FULL => selected == self.data.as_slice(),
            m => association_data(m, selected).is_some_and(|d| d == self.data),
        }
    }

    /// The record for messages: as [`Display`](fmt::Display), except that data longer than
    /// 64 bytes (Full(0) data) is abbreviated to its first and last 16 bytes and its length.
    pub fn short(&self) -> ShortTlsa<'_> {
        ShortTlsa(self)
    }
}

impl std::str::FromStr for Tlsa {
    type Err = String;
    fn from_str(s: &str) -> Result<Tlsa, String> {
        Tlsa::parse_presentation(s)
    }
}

/// The presentation form, `3 1 1 <hex>`, with lowercase hex.
impl fmt::Display for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.usage, self.selector, self.matching)?;
        if !self.data.is_empty() {
            f.write_str(" ")?;
            write_hex(f, &self.data)?;
        }
        Ok(())
    }
}

/// A record abbreviated for messages; see [`Tlsa::short`].
#[derive(Debug, Clone, Copy)]
pub struct ShortTlsa<'a>(&'a Tlsa);

impl fmt::Display for ShortTlsa<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        let len = t.data.len();
        if len <= 64 {
            return t.fmt(f);
        }
        write!(f, "{} {} {} ", t.usage, t.selector, t.matching)?;
        write_hex(f, &t.data[..16])?;
        f.write_str("...")?;
        write_hex(f, &t.data[len - 16..])?;
        write!(f, " ({len} bytes)")
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, data: &[u8]) -> fmt::Result {
    data.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if let Some(c) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "{c:?} in the certificate association data is not a hex digit"
        ));
    }
    if !hex.len().is_multiple_of(2) {
        return Err(format!(
            "the certificate association data has an odd number of hex digits ({})",
            hex.len()
        ));
    }
    // All ASCII hex digits, so every pair is a byte.
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| "the certificate association data is not hex".to_string())
        })
        .collect()
}

/// Why a record is not used; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// PKIX-TA(0) or PKIX-EE(1), which SMTP does not use (RFC 7672 §3.1.3).
    PkixUsage(u8),
    /// A certificate usage with no meaning yet.
    UnknownUsage(u8),
    /// A selector with no meaning yet.
    UnknownSelector(u8),
    /// A matching type with no meaning yet.
    UnknownMatching(u8),
    /// A digest of the wrong length for its matching type.
    DigestLength {
        /// [`MATCHING_SHA256`] or [`MATCHING_SHA512`].
        matching: u8,
        /// The data's length in bytes.
        len: usize,
    },
    /// No certificate association data.
    Empty,
    /// Full(0) data that is not a DER certificate (selector 0) or SubjectPublicKeyInfo
    /// (selector 1).
    Malformed {
        /// The record's selector.
        selector: u8,
    },
    /// A SHA2-256 record beside a SHA2-512 one with the same usage and selector (RFC 7671
    /// §9, digest algorithm agility).
    WeakerDigest {
        /// The stronger matching type present ([`MATCHING_SHA512`]).
        stronger: u8,
    },
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::PkixUsage(u) => write!(
                f,
                "certificate usage {u} ({}) is not used with SMTP (RFC 7672 section 3.1.3)",
                usage_name(*u)
            ),
            Unusable::UnknownUsage(u) => write!(f, "certificate usage {u} is not defined"),
            Unusable::UnknownSelector(s) => write!(f, "selector {s} is not defined"),
            Unusable::UnknownMatching(m) => write!(f, "matching type {m} is not defined"),
            Unusable::DigestLength { matching, len } => write!(
                f,
                "a {} digest is {} bytes long, not {len}",
                matching_name(*matching),
                if *matching == MATCHING_SHA512 { 64 } else { 32 }
            ),
            Unusable::Empty => f.write_str("the record has no certificate association data"),
            Unusable::Malformed { selector } => write!(
                f,
                "the data is not a DER-encoded {}",
                if *selector == SELECTOR_CERT {
                    "certificate"
                } else {
                    "SubjectPublicKeyInfo"
                }
            ),
            Unusable::WeakerDigest { stronger } => write!(
                f,
                "a record with the same usage and selector uses the stronger {} digest, so \
                 this one is ignored (RFC 7671 section 9, digest algorithm agility)",
                matching_name(*stronger)
            ),
        }
    }
}

/// Splits a TLSA record set into the records SMTP uses and the ignored ones with the reason
/// for each, in their original order (rules in the module documentation).
pub fn usable(records: &[Tlsa]) -> (Vec<Tlsa>, Vec<(Tlsa, Unusable)>) {
    let mut good = Vec::new();
    let mut ignored = Vec::new();
    for r in records {
        match r.unusable_reason() {
            None => good.push(r.clone()),
            Some(why) => ignored.push((r.clone(), why)),
        }
    }
    // Digest agility, among the well-formed records only.
    let strongest: HashSet<(u8, u8)> = good
        .iter()
        .filter(|r| r.matching == MATCHING_SHA512)
        .map(|r| (r.usage, r.selector))
        .collect();
    let (kept, weaker): (Vec<Tlsa>, Vec<Tlsa>) = good.into_iter().partition(|r| {
        r.matching != MATCHING_SHA256 || !strongest.contains(&(r.usage, r.selector))
    });
    ignored.extend(weaker.into_iter().map(|r| {
        (
            r,
            Unusable::WeakerDigest {
                stronger: MATCHING_SHA512,
            },
        )
    }));
    (kept, ignored)
}

/// The bytes selector `selector` picks from the certificate `cert` (DER): all of it for
/// Cert(0), its SubjectPublicKeyInfo (as encoded in the certificate) for SPKI(1); `None`
/// for another selector, or SPKI(1) on a certificate that cannot be parsed.
pub fn selected_content(selector: u8, cert: &[u8]) -> Option<&[u8]> {
    match selector {
        SELECTOR_CERT => Some(cert),
        SELECTOR_SPKI => {
            let (_, parsed) = X509Certificate::from_der(cert).ok()?;
            Some(parsed.tbs_certificate.subject_pki.raw)
        }
        _ => None,
    }
}

/// The certificate association data for `selected` under matching type `matching`: the
/// bytes themselves, or their SHA-256 or SHA-512 digest (aws-lc-rs); `None` for another
/// matching type.
pub fn association_data(matching: u8, selected: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    match matching {
        MATCHING_FULL => Some(selected.to_vec()),
        MATCHING_SHA256 => Some(digest::digest(&digest::SHA256, selected).as_ref().to_vec()),
        MATCHING_SHA512 => Some(digest::digest(&digest::SHA512, selected).as_ref().to_vec()),
        _ => None,
    }
}

/// How the server was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaneMatch {
    /// [`DANE_EE`] or [`DANE_TA`].
    pub usage: u8,
    /// The record that matched.
    pub record: Tlsa,
    /// Where the matching certificate sits on the verified path: 0 for the server's own
    /// certificate (always, for DANE-EE), 1 for its issuer, and so on; for a trust anchor
    /// the server did not present (`2 0 0`, `2 1 0`), one above the last certificate used.
    pub depth: usize,
    /// For DANE-TA, the reference identifier the certificate is valid for; `None` for
    /// DANE-EE, which checks no names.
    pub name: Option<String>,
}

impl fmt::Display for DaneMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            None => write!(
                f,
                "TLSA {} matches the server's certificate",
                self.record.short()
            ),
            Some(name) => write!(
                f,
                "TLSA {} matches the trust anchor at depth {}, and the certificate is valid \
                 for {name}",
                self.record.short(),
                self.depth
            ),
        }
    }
}

/// Why DANE authentication failed, in terms a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaneFailure {
    /// None of the records is usable for SMTP. RFC 7672 §2.2: TLS is still required, but it
    /// is not authenticated; the caller decides whether this fails the delivery.
    NoUsableRecords {
        /// Each record, with why it is not used.
        ignored: Vec<(Tlsa, Unusable)>,
    },
    /// None of the usable records matches any certificate the server presented.
    NoMatch {
        /// The usable records.
        tried: Vec<Tlsa>,
        /// The certificates the server presented, as records in the forms tried: its own
        /// certificate with usage 3 for each selector and matching type of the DANE-EE
        /// records, the others with usage 2 for those of the DANE-TA records; what to
        /// compare the records with.
        presented: Vec<Tlsa>,
    },
    /// A DANE-TA chain reached a matching trust anchor, but a certificate on it expired at
    /// `not_after`.
    Expired {
        /// The certificate's notAfter, Unix seconds.
        not_after: u64,
    },
    /// A DANE-TA chain reached a matching trust anchor, but a certificate on it is not
    /// valid before `not_before`.
    NotYetValid {
        /// The certificate's notBefore, Unix seconds.
        not_before: u64,
    },
    /// A DANE-TA chain verified up to a matching trust anchor, but the server's certificate
    /// is not valid for any `expected` name.
    NameMismatch {
        /// The reference identifiers, normalized (lowercase, no trailing dot).
        expected: Vec<String>,
        /// The certificate's DNS names, or its common names when it has none.
        presented: Vec<String>,
    },
    /// A DANE-TA record matches a certificate, but the server's certificate does not chain
    /// to it: the record, the certificate and the reason, as a sentence.
    ChainInvalid(String),
}

impl DaneFailure {
    /// The enhanced status code for a temporary failure, as Exchange Online: `4.7.322`
    /// (certificate expired), `4.7.325` (certificate host mismatch), `4.7.323` (TLSA
    /// validation failed) for the rest.
    pub fn code(&self) -> &'static str {
        self.enhanced_code(false)
    }

    /// [`code`](Self::code), or with `permanent` its `5.7.32x` counterpart.
    pub fn enhanced_code(&self, permanent: bool) -> &'static str {
        match (self, permanent) {
            (DaneFailure::Expired { .. }, false) => "4.7.322",
            (DaneFailure::Expired { .. }, true) => "5.7.322",
            (DaneFailure::NameMismatch { .. }, false) => "4.7.325",
            (DaneFailure::NameMismatch { .. }, true) => "5.7.325",
            (_, false) => "4.7.323",
            (_, true) => "5.7.323",
        }
    }

    /// How specific the failure is; the highest is reported when several records fail.
    fn rank(&self) -> u8 {
        match self {
            DaneFailure::NameMismatch { .. } => 5,
            DaneFailure::Expired { .. } => 4,
            DaneFailure::NotYetValid { .. } => 3,
            DaneFailure::ChainInvalid(_) => 2,
            DaneFailure::NoMatch { .. } => 1,
            DaneFailure::NoUsableRecords { .. } => 0,
        }
    }
}

impl fmt::Display for DaneFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaneFailure::NoUsableRecords { ignored } => {
                f.write_str("none of the domain's TLSA records can be used for SMTP")?;
                for (i, (r, why)) in ignored.iter().enumerate() {
                    let sep = if i == 0 { ": " } else { "; " };
                    write!(f, "{sep}TLSA {}: {why}", r.short())?;
                }
                Ok(())
            }
            DaneFailure::NoMatch { tried, presented } => {
                match tried.as_slice() {
                    [one] => write!(
                        f,
                        "TLSA {} matches none of the certificates the server presented",
                        one.short()
                    )?,
                    _ => {
                        f.write_str("none of the TLSA records ")?;
                        for (i, r) in tried.iter().enumerate() {
                            let sep = if i == 0 { "" } else { ", " };
                            write!(f, "{sep}{}", r.short())?;
                        }
                        f.write_str(" matches the certificates the server presented")?;
                    }
                }
                for (i, r) in presented.iter().enumerate() {
                    let sep = if i == 0 { " (it presented " } else { ", " };
                    write!(f, "{sep}{}", r.short())?;
                }
                if !presented.is_empty() {
                    f.write_str(")")?;
                }
                f.write_str(
                    "; the domain's TLSA records must describe the server's current \
                     certificate (or its CA), or the server must present the certificate \
                     they describe",
                )
            }
            DaneFailure::Expired { not_after } => write!(
                f,
                "the certificate chain leads to the trust anchor in the domain's TLSA \
                 records, but a certificate in it expired on {}; the server needs a renewed \
                 certificate",
                rfc5322_date(*not_after)
            ),
            DaneFailure::NotYetValid { not_before } => write!(
                f,
                "the certificate chain leads to the trust anchor in the domain's TLSA \
                 records, but a certificate in it is not valid until {} (check the clocks on \
                 both sides)",
                rfc5322_date(*not_before)
            ),
            DaneFailure::NameMismatch {
                expected,
                presented,
            } => {
                let presented = if presented.is_empty() {
                    "no host name".to_string()
                } else {
                    presented.join(", ")
                };
                let expected = if expected.is_empty() {
                    "(no name to check was given)".to_string()
                } else {
                    expected.join(" or ")
                };
                write!(
                    f,
                    "the certificate chain leads to the trust anchor in the domain's TLSA \
                     records, but the certificate is issued to {presented}, not {expected}"
                )
            }
            DaneFailure::ChainInvalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for DaneFailure {}

/// Authenticates a server by DANE: `records` is the TLSA record set as found (unusable
/// records are set aside here, see [`usable`]), `chain` the certificates the server
/// presented, its own first, `names` the reference identifiers for DANE-TA (the TLSA base
/// domain and the MX host name), `now` the time to check validity dates at. Rules in the
/// module documentation.
pub fn verify(
    records: &[Tlsa],
    chain: &[CertificateDer<'_>],
    names: &[String],
    now: UnixTime,
) -> Result<DaneMatch, DaneFailure> {
    let (usable, ignored) = usable(records);
    if usable.is_empty() {
        return Err(DaneFailure::NoUsableRecords { ignored });
    }
    let Some(ee) = chain.first() else {
        return Err(no_match(&usable, chain));
    };
    if let Some(r) = usable
        .iter()
        .find(|r| r.usage == DANE_EE && r.matches(ee.as_ref()))
    {
        return Ok(DaneMatch {
            usage: DANE_EE,
            record: r.clone(),
            depth: 0,
            name: None,
        });
    }
    let mut failure: Option<DaneFailure> = None;
    for r in usable.iter().filter(|r| r.usage == DANE_TA) {
        let anchors = match anchors_for(r, chain) {
            Ok(a) if a.is_empty() => continue,
            Ok(a) => a,
            Err(f) => {
                keep_most_specific(&mut failure, f);
                continue;
            }
        };
        match verify_anchored(r, &anchors, chain, names, now) {
            Ok(m) => return Ok(m),
            Err(f) => keep_most_specific(&mut failure, f),
        }
    }
    Err(failure.unwrap_or_else(|| no_match(&usable, chain)))
}

fn keep_most_specific(kept: &mut Option<DaneFailure>, f: DaneFailure) {
    if kept.as_ref().is_none_or(|k| f.rank() > k.rank()) {
        *kept = Some(f);
    }
}

/// At most this many of the server's other certificates are shown in a [`DaneFailure::NoMatch`].
const MAX_SHOWN: usize = 4;

fn no_match(usable: &[Tlsa], chain: &[CertificateDer<'_>]) -> DaneFailure {
    let mut forms: Vec<(u8, u8, u8)> = Vec::new();
    for r in usable {
        let form = (r.usage, r.selector, r.matching);
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    let mut presented = Vec::new();
    for &(usage, selector, matching) in &forms {
        let certs = match usage {
            DANE_EE => chain.get(..1).unwrap_or_default(),
            _ => chain
                .get(1..chain.len().min(1 + MAX_SHOWN))
                .unwrap_or_default(),
        };
        presented.extend(
            certs
                .iter()
                .filter_map(|c| Tlsa::for_certificate(usage, selector, matching, c.as_ref())),
        );
    }
    DaneFailure::NoMatch {
        tried: usable.to_vec(),
        presented,
    }
}

/// Where a trust anchor came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The certificate at this depth of the presented chain.
    Presented(usize),
    /// The certificate in a `2 0 0` record.
    RecordCert,
    /// The public key in a `2 1 0` record.
    RecordKey,
}

struct Anchor {
    ta: TrustAnchor<'static>,
    origin: Origin,
}

/// The trust anchors a DANE-TA record stands for: each presented certificate it matches,
/// or else the certificate or public key it carries whole. Empty when it matches nothing;
/// an error when it matches a certificate that cannot serve as an anchor.
fn anchors_for(record: &Tlsa, chain: &[CertificateDer<'_>]) -> Result<Vec<Anchor>, DaneFailure> {
    fn push(anchors: &mut Vec<Anchor>, ta: TrustAnchor<'static>, origin: Origin) {
        if !anchors.iter().any(|a| a.ta == ta) {
            anchors.push(Anchor { ta, origin });
        }
    }
    let mut anchors: Vec<Anchor> = Vec::new();
    for (depth, cert) in chain.iter().enumerate() {
        if !record.matches(cert.as_ref()) {
            continue;
        }
        let ta = webpki::anchor_from_trusted_cert(cert).map_err(|e| {
            DaneFailure::ChainInvalid(format!(
                "TLSA {} matches the certificate at depth {depth} of the chain the server \
                 presented, but that certificate cannot be used as a trust anchor ({}); the \
                 server needs a valid CA certificate",
                record.short(),
                webpki_words(&e)
            ))
        })?;
        push(&mut anchors, ta.to_owned(), Origin::Presented(depth));
    }
    if !anchors.is_empty() || record.matching != MATCHING_FULL {
        return Ok(anchors);
    }
    match record.selector {
        SELECTOR_CERT => {
            let der = CertificateDer::from(record.data.as_slice());
            if let Ok(ta) = webpki::anchor_from_trusted_cert(&der) {
                push(&mut anchors, ta.to_owned(), Origin::RecordCert);
            }
        }
        _ => {
            // A bare key has no subject name, and webpki finds an anchor by name: offer it
            // under the issuer name of each presented certificate, and let the signature
            // check decide.
            if let Some(spki) = der_sequence_contents(&record.data) {
                for cert in chain {
                    if let Some(issuer) = issuer_contents(cert.as_ref()) {
                        push(
                            &mut anchors,
                            TrustAnchor {
                                subject: Der::from(issuer),
                                subject_public_key_info: Der::from(spki.to_vec()),
                                name_constraints: None,
                            },
                            Origin::RecordKey,
                        );
                    }
                }
            }
        }
    }
    Ok(anchors)
}

/// The signature algorithms of the TLS stack's own provider, so DANE-TA accepts exactly
/// what the connector's PKIX checks do.
fn algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    static ALGS: LazyLock<&'static [&'static dyn SignatureVerificationAlgorithm]> =
        LazyLock::new(|| {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all
        });
    *ALGS
}

/// PKIX validation of the server's certificate up to `anchors` (from one record), then the
/// name check.
fn verify_anchored(
    record: &Tlsa,
    anchors: &[Anchor],
    chain: &[CertificateDer<'_>],
    names: &[String],
    now: UnixTime,
) -> Result<DaneMatch, DaneFailure> {
    let (ee_der, intermediates) = match chain.split_first() {
        Some(split) => split,
        None => {
            return Err(DaneFailure::ChainInvalid(
                "the server sent no certificate".into(),
            ));
        }
    };
    let ee = webpki::EndEntityCert::try_from(ee_der).map_err(|e| {
        DaneFailure::ChainInvalid(format!(
            "TLSA {} matches {}, but the server's own certificate cannot be read ({}); the \
             server needs a valid certificate",
            record.short(),
            describe_origin(anchors, chain),
            webpki_words(&e)
        ))
    })?;
    let tas: Vec<TrustAnchor<'static>> = anchors.iter().map(|a| a.ta.clone()).collect();
    let check = |time: UnixTime| {
        ee.verify_for_usage(
            algorithms(),
            &tas,
            intermediates,
            time,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|path| {
            let origin = tas
                .iter()
                .position(|t| t == path.anchor())
                .and_then(|i| anchors.get(i))
                .map(|a| a.origin);
            match origin {
                Some(Origin::Presented(0)) => 0,
                _ => path.intermediate_certificates().count() + 1,
            }
        })
    };
    let depth = match check(now) {
        Ok(depth) => depth,
        Err(e) => return Err(chain_failure(record, anchors, chain, &e, check)),
    };
    let name = check_names(&ee, ee_der.as_ref(), names)?;
    Ok(DaneMatch {
        usage: DANE_TA,
        record: record.clone(),
        depth,
        name: Some(name),
    })
}

/// The failure for a chain that does not verify at `now` (`err`); `check` verifies at
/// another time, so an expiry is only reported for a chain that is otherwise sound.
fn chain_failure(
    record: &Tlsa,
    anchors: &[Anchor],
    chain: &[CertificateDer<'_>],
    err: &webpki::Error,
    check: impl Fn(UnixTime) -> Result<usize, webpki::Error>,
) -> DaneFailure {
    let time_failure = |e: &webpki::Error| match e {
        webpki::Error::CertExpired { not_after, .. } => Some(DaneFailure::Expired {
            not_after: not_after.as_secs(),
        }),
        webpki::Error::CertNotValidYet { not_before, .. } => Some(DaneFailure::NotYetValid {
            not_before: not_before.as_secs(),
        }),
        _ => None,
    };
    let within = |e: &webpki::Error| match e {
        webpki::Error::CertExpired { not_after, .. } => Some(*not_after),
        webpki::Error::CertNotValidYet { not_before, .. } => Some(*not_before),
        _ => None,
    };
    let mut cause = err.clone();
    if let Some(failure) = time_failure(err) {
        // Try again at a time when the failing certificate is valid; a few steps reach a
        // time when all are, unless their validity periods do not overlap.
        let mut at = within(err);
        let mut sound = true;
        for _ in 0..=chain.len() {
            let Some(t) = at else { break };
            match check(t) {
                Ok(_) => break,
                Err(e) => match within(&e) {
                    Some(next) if next != t => at = Some(next),
                    Some(_) => break,
                    None => {
                        sound = false;
                        cause = e;
                        break;
                    }
                },
            }
        }
        if sound {
            return failure;
        }
    }
    let only_leaf = anchors.iter().all(|a| a.origin == Origin::Presented(0));
    if only_leaf && matches!(cause, webpki::Error::UnknownIssuer) {
        return DaneFailure::ChainInvalid(format!(
            "TLSA {} matches the server's own certificate, which is issued by {}: a DANE-TA \
             record must match the CA certificate it is issued by (or another CA above it), \
             and a record that pins the server's own certificate or key is published with \
             usage 3 (DANE-EE)",
            record.short(),
            chain
                .first()
                .and_then(|c| issuer_name(c.as_ref()))
                .unwrap_or_else(|| "another certificate".into())
        ));
    }
    let why = match cause {
        webpki::Error::UnknownIssuer => "the server's certificate is not issued by it, or \
            the intermediate certificates between them are missing from the chain the server \
            presented"
            .to_string(),
        other => webpki_words(&other),
    };
    DaneFailure::ChainInvalid(format!(
        "TLSA {} matches {}, but the server's certificate does not chain to it: {why}",
        record.short(),
        describe_origin(anchors, chain)
    ))
}

/// What a record's trust anchor is, for messages.
fn describe_origin(anchors: &[Anchor], chain: &[CertificateDer<'_>]) -> String {
    match anchors.first().map(|a| a.origin) {
        Some(Origin::Presented(0)) => "the server's own certificate".into(),
        Some(Origin::Presented(depth)) => {
            let subject = chain
                .get(depth)
                .and_then(|c| subject_name(c.as_ref()))
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            format!("the certificate at depth {depth} of the chain the server presented{subject}")
        }
        Some(Origin::RecordCert) => "the CA certificate it carries".into(),
        Some(Origin::RecordKey) | None => "the public key it carries".into(),
    }
}

/// `Ok(name)`: the first reference identifier the certificate is valid for.
fn check_names(
    ee: &webpki::EndEntityCert<'_>,
    der: &[u8],
    names: &[String],
) -> Result<String, DaneFailure> {
    let mut expected: Vec<String> = Vec::new();
    for n in names {
        let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
        if !n.is_empty() && !expected.contains(&n) {
            expected.push(n);
        }
    }
    for n in &expected {
        if let Ok(sn @ ServerName::DnsName(_)) = ServerName::try_from(n.as_str())
            && ee.verify_is_valid_for_subject_name(&sn).is_ok()
        {
            return Ok(n.clone());
        }
    }
    let (dns_ids, cn_ids) = identities(der);
    if dns_ids.is_empty()
        && let Some(n) = expected
            .iter()
            .find(|n| cn_ids.iter().any(|cn| name_matches(cn, n)))
    {
        return Ok(n.clone());
    }
    let presented = if dns_ids.is_empty() { cn_ids } else { dns_ids };
    Err(DaneFailure::NameMismatch {
        expected,
        presented: presented.iter().map(|n| escape_text(n)).collect(),
    })
}

/// Whether a presented identifier (a common name) covers `name` (lowercase, no trailing
/// dot): equal ignoring case, or `*.rest` with `rest` equal to all but the first label of
/// `name` and at least two labels long (RFC 7672 §3.2.3, RFC 6125 §6.4.3).
fn name_matches(presented: &str, name: &str) -> bool {
    let presented = presented.trim_end_matches('.').to_ascii_lowercase();
    match presented.strip_prefix("*.") {
        Some(rest) => {
            rest.contains('.')
                && name
                    .split_once('.')
                    .is_some_and(|(first, tail)| !first.is_empty() && tail == rest)
        }
        None => presented == name,
    }
}

/// A certificate's DNS subject alternative names and its subject common names, lowercased.
fn identities(der: &[u8]) -> (Vec<String>, Vec<String>) {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return (Vec::new(), Vec::new());
    };
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                dns.push(d.to_ascii_lowercase());
            }
        }
    }
    let cns = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect();
    (dns, cns)
}

fn subject_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(escape_text(&cert.subject().to_string()))
}

fn issuer_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(escape_text(&cert.issuer().to_string()))
}

/// The issuer name of a certificate without its SEQUENCE header: the form webpki compares
/// with a trust anchor's subject.
fn issuer_contents(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    der_sequence_contents(cert.issuer().as_raw()).map(<[u8]>::to_vec)
}

/// The contents of a DER SEQUENCE that spans all of `der`.
fn der_sequence_contents(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, body) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, body)
    };
    (body.len() == len).then_some(body)
}

/// A webpki error as a sentence saying what is wrong.
fn webpki_words(e: &webpki::Error) -> String {
    use webpki::Error as W;
    #[allow(deprecated)]
    match e {
        W::CaUsedAsEndEntity => "the server's certificate is a CA certificate (basic \
            constraints CA:TRUE), which cannot identify a server; a self-signed CA:TRUE \
            certificate (as `openssl req -x509` makes) can be published with usage 3 \
            (DANE-EE) instead"
            .into(),
        W::EndEntityUsedAsCa => "a certificate in the chain has issued another but is not a \
            CA certificate (basic constraints CA:FALSE or missing)"
            .into(),
        W::InvalidSignatureForPublicKey => "a signature in the chain does not verify (a \
            corrupted or forged certificate, or one from a different CA with the same name)"
            .into(),
        W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => "a certificate in the \
            chain is signed with an algorithm Moat does not accept (such as SHA-1), or one \
            that does not fit its issuer's key"
            .into(),
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => {
            "the certificate is not issued for TLS servers (its extended key usage lacks \
             server authentication)"
                .into()
        }
        W::NameConstraintViolation => "the certificate has names the trust anchor may not \
            issue for (name constraints)"
            .into(),
        W::PathLenConstraintViolated => "the chain has more intermediate CAs than a CA above \
            them allows (path length constraint)"
            .into(),
        W::CertDistrusted => "a certificate in the chain is explicitly distrusted".into(),
        W::InvalidCertValidity => {
            "a certificate's validity period is invalid (it ends before it begins)".into()
        }
        W::MaximumPathDepthExceeded
        | W::MaximumPathBuildCallsExceeded
        | W::MaximumSignatureChecksExceeded
        | W::MaximumNameConstraintComparisonsExceeded => {
            "the certificate chain is too long or too complex to verify".into()
        }
        W::BadDer | W::BadDerTime | W::TrailingData(_) => {
            "a certificate is malformed (its encoding is invalid)".into()
        }
        W::CertExpired { not_after, .. } => format!(
            "a certificate in it expired on {}",
            rfc5322_date(not_after.as_secs())
        ),
        W::CertNotValidYet { not_before, .. } => format!(
            "a certificate in it is not valid until {}",
            rfc5322_date(not_before.as_secs())
        ),
        other => format!("the chain does not verify (webpki: {other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::*;

    /// 2026-06-01 00:00:00 UTC: "now" in every test.
    const NOW: u64 = 1_780_272_000;
    const DAY: i64 = 86_400;

    fn now() -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(NOW))
    }

    /// `NOW + days` as rcgen wants it.
    fn day(days: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(NOW as i64 + days * DAY).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = day(-365);
        p.not_after = day(3650);
        p
    }

    fn root(cn: &str) -> Ca {
        let p = ca_params(cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn intermediate(cn: &str, parent: &Ca) -> Ca {
        let p = ca_params(cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &parent.issuer).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    /// Leaf parameters for `sans` (the first also as CN), valid from `from` to `to` days
    /// around NOW.
    fn leaf_params(sans: &[&str], from: i64, to: i64) -> CertificateParams {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        if let Some(first) = sans.first() {
            p.distinguished_name.push(DnType::CommonName, *first);
        }
        p.not_before = day(from);
        p.not_after = day(to);
        p
    }

    fn leaf(sans: &[&str], from: i64, to: i64, ca: &Ca) -> CertificateDer<'static> {
        leaf_params(sans, from, to)
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap()
            .der()
            .clone()
    }

    fn self_signed(sans: &[&str], from: i64, to: i64) -> CertificateDer<'static> {
        leaf_params(sans, from, to)
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    fn record(usage: u8, selector: u8, matching: u8, cert: &CertificateDer<'_>) -> Tlsa {
        Tlsa::for_certificate(usage, selector, matching, cert.as_ref()).unwrap()
    }

    const MX: &str = "mx.example.com";

    // DANE-EE

    #[test]
    fn dane_ee_spki_ignores_expiry_name_and_issuer() {
        let ca = root("Some CA");
        // Expired a year ago, issued to another name, issuer not presented.
        let ee = leaf(&["other.example.net"], -800, -365, &ca);
        let r = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let m = verify(std::slice::from_ref(&r), &[ee], &names(&[MX]), now()).unwrap();
        assert_eq!(
            m,
            DaneMatch {
                usage: DANE_EE,
                record: r,
                depth: 0,
                name: None
            }
        );
    }

    #[test]
    fn dane_ee_full_certificate_digest() {
        let ee = self_signed(&[MX], -10, 90);
        let r = record(DANE_EE, SELECTOR_CERT, MATCHING_SHA256, &ee);
        assert_eq!(r.data.len(), 32);
        assert_eq!(verify(&[r], &[ee], &[], now()).unwrap().depth, 0);
    }

    #[test]
    fn dane_ee_spki_sha512() {
        let ee = self_signed(&[MX], -10, 90);
        let r = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA512, &ee);
        assert_eq!(r.data.len(), 64);
        assert!(verify(&[r], &[ee], &[], now()).is_ok());
    }

    #[test]
    fn dane_ee_exact_certificate() {
        let ee = self_signed(&[MX], -10, 90);
        let r = record(DANE_EE, SELECTOR_CERT, MATCHING_FULL, &ee);
        assert_eq!(r.data, ee.as_ref());
        assert!(r.usable_for_smtp());
        assert!(verify(&[r], &[ee], &[], now()).is_ok());
    }

    #[test]
    fn dane_ee_mismatch_is_no_match_and_shows_what_the_server_has() {
        let ee = self_signed(&[MX], -10, 90);
        let other = self_signed(&[MX], -10, 90);
        let r = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &other);
        let err = verify(
            std::slice::from_ref(&r),
            std::slice::from_ref(&ee),
            &names(&[MX]),
            now(),
        )
        .unwrap_err();
        let actual = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        assert_eq!(
            err,
            DaneFailure::NoMatch {
                tried: vec![r.clone()],
                presented: vec![actual.clone()]
            }
        );
        assert_eq!(err.code(), "4.7.323");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "TLSA {r} matches none of the certificates the server presented (it presented {actual})"
            )),
            "{text}"
        );
    }

    #[test]
    fn empty_chain_is_no_match() {
        let r = record(
            DANE_EE,
            SELECTOR_SPKI,
            MATCHING_SHA256,
            &self_signed(&[MX], -1, 1),
        );
        assert!(matches!(
            verify(&[r], &[], &names(&[MX]), now()),
            Err(DaneFailure::NoMatch { .. })
        ));
    }

    // DANE-TA

    #[test]
    fn dane_ta_issuing_ca_in_chain() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let m = verify(
            std::slice::from_ref(&r),
            &[ee, ca.der.clone()],
            &names(&[MX]),
            now(),
        )
        .unwrap();
        assert_eq!(
            m,
            DaneMatch {
                usage: DANE_TA,
                record: r,
                depth: 1,
                name: Some(MX.into())
            }
        );
    }

    #[test]
    fn dane_ta_intermediate_anchor_with_wildcard_and_second_name() {
        let root = root("Root");
        let ica = intermediate("Intermediate", &root);
        let ee = leaf(&["*.example.com"], -10, 90, &ica);
        // The record pins the root; the server sends the whole chain.
        let r = record(DANE_TA, SELECTOR_CERT, MATCHING_SHA256, &root.der);
        let chain = [ee, ica.der.clone(), root.der.clone()];
        let m = verify(
            &[r],
            &chain,
            &names(&["mail.example.net.", "MX.Example.COM."]),
            now(),
        )
        .unwrap();
        assert_eq!((m.depth, m.name.as_deref()), (2, Some(MX)));
        // A wildcard covers one label only.
        let err = verify(
            &[record(DANE_TA, SELECTOR_CERT, MATCHING_SHA256, &root.der)],
            &chain,
            &names(&["a.mx.example.com"]),
            now(),
        )
        .unwrap_err();
        assert!(matches!(err, DaneFailure::NameMismatch { .. }), "{err}");
    }

    #[test]
    fn dane_ta_wrong_name() {
        let ca = root("Example CA");
        let ee = leaf(&["other.example.net"], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        assert_eq!(
            err,
            DaneFailure::NameMismatch {
                expected: names(&[MX]),
                presented: names(&["other.example.net"]),
            }
        );
        assert_eq!(err.code(), "4.7.325");
        assert_eq!(err.enhanced_code(true), "5.7.325");
        assert!(
            err.to_string()
                .ends_with("issued to other.example.net, not mx.example.com")
        );
    }

    #[test]
    fn dane_ta_expired_end_entity() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], -100, -5, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        assert_eq!(
            err,
            DaneFailure::Expired {
                not_after: (NOW as i64 - 5 * DAY) as u64
            }
        );
        assert_eq!(err.code(), "4.7.322");
        assert!(
            err.to_string().contains("expired on Wed, 27 May 2026"),
            "{err}"
        );
    }

    #[test]
    fn dane_ta_not_yet_valid() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], 3, 90, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::NotYetValid { .. }), "{err}");
        assert_eq!(err.code(), "4.7.323");
    }

    #[test]
    fn expired_but_unrelated_chain_is_chain_invalid_not_expired() {
        // The record matches a CA the server sends, but its certificate is issued by
        // another CA: fixing the date would not help, so the chain is what is reported.
        let ca = root("Example CA");
        let other = root("Other CA");
        let ee = leaf(&[MX], -100, -5, &other);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        let DaneFailure::ChainInvalid(why) = &err else {
            panic!("{err:?}");
        };
        assert!(why.contains("not issued by it"), "{why}");
        assert!(why.contains("depth 1"), "{why}");
        assert_eq!(err.code(), "4.7.323");
    }

    #[test]
    fn dane_ta_full_certificate_not_presented() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_CERT, MATCHING_FULL, &ca.der);
        let m = verify(&[r], &[ee], &names(&[MX]), now()).unwrap();
        assert_eq!((m.usage, m.depth), (DANE_TA, 1));
    }

    #[test]
    fn dane_ta_bare_public_key_not_presented() {
        let root = root("Root");
        let ica = intermediate("Intermediate", &root);
        let ee = leaf(&[MX], -10, 90, &ica);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_FULL, &root.der);
        assert!(r.usable_for_smtp());
        // The root is not sent; its key signs the intermediate.
        let m = verify(
            std::slice::from_ref(&r),
            &[ee.clone(), ica.der.clone()],
            &names(&[MX]),
            now(),
        )
        .unwrap();
        assert_eq!(m.depth, 2);
        // Without the intermediate, nothing leads to the key.
        let err = verify(&[r], &[ee], &names(&[MX]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::ChainInvalid(_)), "{err}");
    }

    #[test]
    fn dane_ta_digest_of_absent_anchor_is_no_match() {
        // Only Full(0) records can stand in for a certificate the server does not send.
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee], &names(&[MX]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::NoMatch { .. }), "{err}");
    }

    #[test]
    fn dane_ta_matching_only_a_leaf_issued_by_a_ca_is_refused() {
        // Decided: a leaf issued by someone else cannot be its own trust anchor, whether or
        // not its CA is sent; the message points at DANE-EE.
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        for chain in [vec![ee.clone()], vec![ee.clone(), ca.der.clone()]] {
            let err = verify(std::slice::from_ref(&r), &chain, &names(&[MX]), now()).unwrap_err();
            let DaneFailure::ChainInvalid(why) = &err else {
                panic!("{err:?}");
            };
            assert!(
                why.contains("matches the server's own certificate"),
                "{why}"
            );
            assert!(why.contains("usage 3 (DANE-EE)"), "{why}");
            assert!(why.contains("CN=Example CA"), "{why}");
        }
    }

    #[test]
    fn dane_ta_self_signed_leaf_is_its_own_anchor_with_checks() {
        let ee = self_signed(&[MX], -10, 90);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let m = verify(
            std::slice::from_ref(&r),
            std::slice::from_ref(&ee),
            &names(&[MX]),
            now(),
        )
        .unwrap();
        assert_eq!(
            (m.usage, m.depth, m.name.as_deref()),
            (DANE_TA, 0, Some(MX))
        );
        // Unlike DANE-EE, names are checked.
        let err = verify(&[r], &[ee], &names(&["other.example.com"]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::NameMismatch { .. }), "{err}");
        // And dates.
        let old = self_signed(&[MX], -100, -1);
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &old);
        let err = verify(&[r], &[old], &names(&[MX]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::Expired { .. }), "{err}");
    }

    #[test]
    fn dane_ta_full_certificate_of_another_ca_is_chain_invalid() {
        let ca = root("Example CA");
        let other = root("Other CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let r = record(DANE_TA, SELECTOR_CERT, MATCHING_FULL, &other.der);
        let err = verify(&[r], &[ee], &names(&[MX]), now()).unwrap_err();
        let DaneFailure::ChainInvalid(why) = &err else {
            panic!("{err:?}");
        };
        assert!(why.contains("the CA certificate it carries"), "{why}");
    }

    #[test]
    fn forged_ca_with_the_same_name_is_refused() {
        let real = root("Example CA");
        let fake = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &fake);
        let chain = [ee, fake.der.clone()];
        // A digest of the real CA matches nothing the forger sends.
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &real.der);
        let err = verify(&[r], &chain, &names(&[MX]), now()).unwrap_err();
        assert!(matches!(err, DaneFailure::NoMatch { .. }), "{err}");
        // The real CA carried whole in the record: same name, but the signature fails.
        for r in [
            record(DANE_TA, SELECTOR_CERT, MATCHING_FULL, &real.der),
            record(DANE_TA, SELECTOR_SPKI, MATCHING_FULL, &real.der),
        ] {
            let err = verify(&[r], &chain, &names(&[MX]), now()).unwrap_err();
            let DaneFailure::ChainInvalid(why) = &err else {
                panic!("{err:?}");
            };
            assert!(why.contains("signature"), "{why}");
        }
    }

    #[test]
    fn dane_ta_self_signed_ca_true_leaf_is_refused() {
        // What `openssl req -x509` makes: fine as DANE-EE, never as a server's own
        // certificate under DANE-TA.
        let mut p = leaf_params(&[MX], -10, 90);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ee = p
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone();
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let err = verify(&[r], std::slice::from_ref(&ee), &names(&[MX]), now()).unwrap_err();
        let DaneFailure::ChainInvalid(why) = &err else {
            panic!("{err:?}");
        };
        assert!(why.contains("CA:TRUE"), "{why}");
        let r = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        assert!(verify(&[r], &[ee], &names(&[MX]), now()).is_ok());
    }

    #[test]
    fn dane_ta_requires_server_auth_when_eku_is_listed() {
        let ca = root("Example CA");
        let mut p = leaf_params(&[MX], -10, 90);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let ee = p
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap()
            .der()
            .clone();
        let r = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        let DaneFailure::ChainInvalid(why) = &err else {
            panic!("{err:?}");
        };
        assert!(why.contains("not issued for TLS servers"), "{why}");
    }

    #[test]
    fn dane_ta_common_name_only_when_no_dns_names() {
        let ca = root("Example CA");
        let mut p = leaf_params(&[], -10, 90);
        p.distinguished_name
            .push(DnType::CommonName, "*.example.com");
        let ee = p
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap()
            .der()
            .clone();
        let r = record(DANE_TA, SELECTOR_CERT, MATCHING_SHA256, &ca.der);
        let chain = [ee, ca.der.clone()];
        let m = verify(std::slice::from_ref(&r), &chain, &names(&[MX]), now()).unwrap();
        assert_eq!(m.name.as_deref(), Some(MX));
        // With DNS names present, the common name is not considered.
        let mut p = leaf_params(&["other.example.net"], -10, 90);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, MX);
        let ee = p
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap()
            .der()
            .clone();
        let err = verify(&[r], &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        assert_eq!(
            err,
            DaneFailure::NameMismatch {
                expected: names(&[MX]),
                presented: names(&["other.example.net"]),
            }
        );
    }

    #[test]
    fn name_matching_rules() {
        assert!(name_matches("MX.example.com.", MX));
        assert!(name_matches("*.example.com", MX));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.mx.example.com"));
        assert!(!name_matches("*.com", "example.com"));
        assert!(!name_matches("m*.example.com", MX));
    }

    // Usability

    #[test]
    fn pkix_usages_only_are_no_usable_records() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let records = [
            record(PKIX_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee),
            record(PKIX_TA, SELECTOR_CERT, MATCHING_SHA256, &ca.der),
        ];
        let err = verify(&records, &[ee, ca.der.clone()], &names(&[MX]), now()).unwrap_err();
        let DaneFailure::NoUsableRecords { ignored } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            ignored
                .iter()
                .map(|(_, why)| why.clone())
                .collect::<Vec<_>>(),
            vec![Unusable::PkixUsage(1), Unusable::PkixUsage(0)]
        );
        assert_eq!(err.code(), "4.7.323");
        assert!(
            err.to_string().contains("(PKIX-EE) is not used with SMTP"),
            "{err}"
        );
    }

    #[test]
    fn wrong_digest_lengths_are_unusable() {
        let short = Tlsa {
            usage: DANE_EE,
            selector: SELECTOR_SPKI,
            matching: MATCHING_SHA256,
            data: vec![0xab; 31],
        };
        assert!(!short.usable_for_smtp());
        assert_eq!(
            short.unusable_reason(),
            Some(Unusable::DigestLength {
                matching: 1,
                len: 31
            })
        );
        // A SHA-256 digest published as SHA2-512.
        let mislabeled = Tlsa {
            matching: MATCHING_SHA512,
            data: vec![0xab; 32],
            ..short.clone()
        };
        assert_eq!(
            mislabeled
                .unusable_reason()
                .map(|u| u.to_string())
                .as_deref(),
            Some("a SHA2-512 digest is 64 bytes long, not 32")
        );
        let err = verify(
            &[short, mislabeled],
            &[self_signed(&[MX], -1, 1)],
            &[],
            now(),
        )
        .unwrap_err();
        assert!(matches!(err, DaneFailure::NoUsableRecords { .. }), "{err}");
    }

    #[test]
    fn other_unusable_records() {
        let base = Tlsa {
            usage: DANE_EE,
            selector: SELECTOR_SPKI,
            matching: MATCHING_SHA256,
            data: vec![0; 32],
        };
        let with = |f: fn(&mut Tlsa)| {
            let mut t = base.clone();
            f(&mut t);
            t.unusable_reason()
        };
        assert_eq!(with(|_| {}), None);
        assert_eq!(with(|t| t.usage = 4), Some(Unusable::UnknownUsage(4)));
        assert_eq!(with(|t| t.selector = 2), Some(Unusable::UnknownSelector(2)));
        assert_eq!(with(|t| t.matching = 3), Some(Unusable::UnknownMatching(3)));
        assert_eq!(
            with(|t| {
                t.matching = MATCHING_FULL;
                t.data.clear();
            }),
            Some(Unusable::Empty)
        );
        assert_eq!(
            with(|t| t.matching = MATCHING_FULL),
            Some(Unusable::Malformed { selector: 1 })
        );
    }

    #[test]
    fn mixed_set_one_bad_one_good_passes() {
        let ee = self_signed(&[MX], -10, 90);
        let bad = Tlsa {
            usage: DANE_EE,
            selector: SELECTOR_SPKI,
            matching: MATCHING_SHA256,
            data: vec![1, 2, 3],
        };
        let pkix = record(PKIX_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let good = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let records = [bad.clone(), pkix.clone(), good.clone()];
        let (kept, ignored) = usable(&records);
        assert_eq!(kept, vec![good.clone()]);
        assert_eq!(
            ignored.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
            vec![bad, pkix]
        );
        assert_eq!(verify(&records, &[ee], &[], now()).unwrap().record, good);
    }

    #[test]
    fn a_non_matching_ee_record_does_not_hide_a_matching_ta_record() {
        let ca = root("Example CA");
        let ee = leaf(&[MX], -10, 90, &ca);
        let stale = record(
            DANE_EE,
            SELECTOR_SPKI,
            MATCHING_SHA256,
            &self_signed(&[MX], -1, 1),
        );
        let ta = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let m = verify(
            &[stale, ta.clone()],
            &[ee, ca.der.clone()],
            &names(&[MX]),
            now(),
        )
        .unwrap();
        assert_eq!(m.record, ta);
    }

    #[test]
    fn most_specific_failure_wins() {
        let ca = root("Example CA");
        let ee = leaf(&["other.example.net"], -10, 90, &ca);
        let stale_ee = record(
            DANE_EE,
            SELECTOR_SPKI,
            MATCHING_SHA256,
            &self_signed(&[MX], -1, 1),
        );
        let unrelated_ta = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let ta = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &ca.der);
        let err = verify(
            &[stale_ee, unrelated_ta, ta],
            &[ee, ca.der.clone()],
            &names(&[MX]),
            now(),
        )
        .unwrap_err();
        assert!(matches!(err, DaneFailure::NameMismatch { .. }), "{err}");
    }

    #[test]
    fn digest_agility_prefers_sha512() {
        let ee = self_signed(&[MX], -10, 90);
        let other = self_signed(&[MX], -10, 90);
        // SHA2-256 matches the server, the SHA2-512 record does not: SHA2-256 is ignored.
        let sha256 = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee);
        let sha512 = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA512, &other);
        let full = record(DANE_EE, SELECTOR_CERT, MATCHING_FULL, &other);
        let ta256 = record(DANE_TA, SELECTOR_SPKI, MATCHING_SHA256, &other);
        let records = [sha256.clone(), sha512.clone(), full.clone(), ta256.clone()];
        let (kept, ignored) = usable(&records);
        assert_eq!(kept, vec![sha512, full, ta256]);
        assert_eq!(
            ignored,
            vec![(
                sha256.clone(),
                Unusable::WeakerDigest {
                    stronger: MATCHING_SHA512
                }
            )]
        );
        assert!(matches!(
            verify(&records, std::slice::from_ref(&ee), &[], now()),
            Err(DaneFailure::NoMatch { .. })
        ));
        // Without the SHA2-512 record it matches.
        assert!(verify(&[sha256], &[ee], &[], now()).is_ok());
    }

    // Presentation form

    #[test]
    fn presentation_round_trip() {
        let t = Tlsa::parse_presentation("  3 1 1 0A0b 0c\t0D ee ").unwrap();
        assert_eq!(
            t,
            Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: vec![0x0a, 0x0b, 0x0c, 0x0d, 0xee]
            }
        );
        assert_eq!(t.to_string(), "3 1 1 0a0b0c0dee");
        assert_eq!(t.to_string().parse::<Tlsa>().unwrap(), t);
        let ee = self_signed(&[MX], -10, 90);
        for r in [
            record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA256, &ee),
            record(DANE_TA, SELECTOR_CERT, MATCHING_FULL, &ee),
        ] {
            assert_eq!(Tlsa::parse_presentation(&r.to_string()).unwrap(), r);
        }
        assert_eq!(Tlsa::parse_presentation("003 1 2 ff").unwrap().usage, 3);
    }

    #[test]
    fn presentation_errors() {
        let err = |s: &str| Tlsa::parse_presentation(s).unwrap_err();
        assert!(err("3 1 1 abc").contains("odd number of hex digits"));
        assert!(err("3 1 1 abcg").contains("'g'"));
        assert!(err("3 1 x ab").contains("matching type \"x\" is not a number"));
        assert!(err("3 -1 1 ab").contains("selector \"-1\" is not a number"));
        assert!(err("+3 1 1 ab").contains("not a number"));
        assert!(err("256 1 1 ab").contains("certificate usage 256 is larger than 255"));
        assert!(err("3 1 1").contains("data is missing"));
        assert!(err("3 1").contains("matching type is missing"));
        assert!(err("").contains("certificate usage is missing"));
    }

    #[test]
    fn wire_form() {
        assert_eq!(
            Tlsa::from_rdata(&[3, 1, 1, 0xab, 0xcd]).unwrap(),
            Tlsa::parse_presentation("3 1 1 abcd").unwrap()
        );
        assert!(Tlsa::from_rdata(&[3, 1]).is_err());
        assert_eq!(Tlsa::from_rdata(&[3, 1, 1]).unwrap().to_string(), "3 1 1");
    }

    #[test]
    fn short_form_abbreviates_full_data() {
        let ee = self_signed(&[MX], -10, 90);
        let full = record(DANE_EE, SELECTOR_CERT, MATCHING_FULL, &ee);
        let short = full.short().to_string();
        assert!(short.starts_with("3 0 0 "), "{short}");
        assert!(
            short.ends_with(&format!(" ({} bytes)", ee.as_ref().len())),
            "{short}"
        );
        assert!(short.len() < 100, "{short}");
        let digest = record(DANE_EE, SELECTOR_SPKI, MATCHING_SHA512, &ee);
        assert_eq!(digest.short().to_string(), digest.to_string());
    }

    #[test]
    fn der_sequence_contents_checks_length() {
        assert_eq!(der_sequence_contents(&[0x30, 2, 1, 2]), Some(&[1u8, 2][..]));
        assert_eq!(der_sequence_contents(&[0x30, 3, 1, 2]), None);
        assert_eq!(der_sequence_contents(&[0x31, 2, 1, 2]), None);
        let long: Vec<u8> = [0x30, 0x81, 200].into_iter().chain([7; 200]).collect();
        assert_eq!(der_sequence_contents(&long).map(<[u8]>::len), Some(200));
    }
}
