//! The outbound TLS decision, in one room: what each MX host of a delivery must prove, and why.
//!
//! [`decide`] is a pure function. Its input, [`Facts`], is what is known about one delivery
//! before routing: the sender and recipients, the `[[tls_policy]]` rules ([`TlsPolicy`]), the
//! recipient domain's MTA-STS policy as the cache holds it, and the message's REQUIRETLS flag
//! and `TLS-Required: No` header (RFC 8689). Its output, a [`DomainDecision`], gives per MX host
//! ([`DomainDecision::for_host`]) either the [`TlsRequirement`] to meet and the [`Why`] behind
//! it, or a reason not to use that host at all. `outbound` gathers the facts (DNS, the MTA-STS
//! cache) before, and executes the decision after; `queue` only schedules. Logs, `queue show`,
//! DSNs, metrics and the report page all print the same [`Why`].
//!
//! Precedence, strongest first (docs/ARCHITECTURE.md, "Outbound TLS requirement"):
//!
//! 1. MTA-STS `enforce` (RFC 8461 §4): at least `verify` against the MX host name, only to MX
//!    hosts its patterns name. A rule's pins still apply and its private CA is trusted too;
//!    names a rule gave instead of the MX host give way to it (RFC 8461 §4.2).
//! 2. `[[tls_policy]]` rules: the recipient domain's own rule, raised (never lowered) by a
//!    sender-domain rule and, unless `opportunistic_for_unmatched`, by the strictest rule another
//!    recipient of the same message matched. A rule written for another domain lends its level
//!    and private CA, not its names or pins.
//! 3. Opportunistic (`may`): TLS when offered, any certificate.
//!
//! MTA-STS `testing` changes nothing about delivery: under a rule that asks for no
//! authentication, its trust anchors are added so the log can say what `enforce` would have
//! done.
//!
//! RFC 8689 on top of that: a message sent with REQUIRETLS goes only to hosts authenticated
//! by DANE or an MTA-STS `enforce` policy (or, when `requiretls_rules_count`, a rule at
//! `verify` or with pins); other hosts are skipped (5.7.30, permanent when none is left). A
//! message without REQUIRETLS that says `TLS-Required: No` (when honoured) is delivered
//! without MTA-STS and DANE: the rules alone decide.
//!
//! Why a delivery failed is a [`cause::Cause`].

pub mod cause;

use std::fmt;
use std::sync::Arc;

use rustls::RootCertStore;

use crate::dane::tlsa::{self, Tlsa};
use crate::domain::{Domain, DomainPattern};
use crate::outbound::tls::Pin;
use crate::sts::Applied;
use crate::sts::policy::Mode;

/// How much transport security a destination gets; ordered, so "at least" is `>=`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// Opportunistic: TLS when offered, any certificate, plaintext otherwise.
    #[default]
    May,
    /// TLS required, certificate not checked (but pins, when given, must match).
    Encrypt,
    /// TLS required, chain to a trusted root and the name must match.
    Verify,
}

impl TlsLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
        }
    }
}

impl fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one destination requires of the TLS session.
#[derive(Debug, Clone, Default)]
pub struct TlsRequirement {
    pub level: TlsLevel,
    /// Names the certificate must carry instead of the MX host name (exact host names; the
    /// certificate may use a `*.` wildcard for them). Empty: the MX host name.
    pub match_names: Vec<String>,
    /// Any match accepts; see the module documentation for how pins combine with the level.
    pub pins: Vec<Pin>,
    /// A private CA for this destination, trusted in addition to the system roots.
    pub extra_roots: Option<Arc<RootCertStore>>,
    /// Set by an MTA-STS `enforce` policy: failures carry 4.7.5/5.7.5 (RFC 8461 §4.2; docs/ARCHITECTURE.md).
    pub mta_sts: bool,
    /// Set for a host with usable DNSSEC-validated TLSA records (RFC 7672): the certificate
    /// is authenticated by them instead of by a CA (pins, when given, must match as well);
    /// failures carry 4.7.321-325.
    pub dane: Option<Arc<DaneTrust>>,
}

/// The trust a DANE host is held to: its usable TLSA records and the names a DANE-TA chain's
/// certificate may carry (the MX host name and the TLSA base domain, RFC 7672 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaneTrust {
    pub records: Vec<Tlsa>,
    pub names: Vec<String>,
    /// The name the records were found for (their owner `_<port>._tcp.<base>`, after CNAMEs).
    pub base: String,
}

impl TlsRequirement {
    /// The level's name, `dane` for a DANE-authenticated host (it satisfies `verify`).
    pub fn level_name(&self) -> &'static str {
        if self.dane.is_some() {
            "dane"
        } else {
            self.level.as_str()
        }
    }

    /// A requirement with only a level.
    pub fn level(level: TlsLevel) -> TlsRequirement {
        TlsRequirement {
            level,
            ..TlsRequirement::default()
        }
    }
}

/// TLS requirements per recipient domain pattern (exact or `*.suffix`; first match wins) and
/// per sender domain pattern: the `[[tls_policy]]` rules.
#[derive(Debug, Default)]
pub struct TlsPolicy {
    pub rules: Vec<(DomainPattern, TlsRequirement)>,
    pub sender_rules: Vec<(DomainPattern, TlsRequirement)>,
    pub default: TlsRequirement,
    /// See `OutboundConfig::opportunistic_for_unmatched`.
    pub opportunistic_for_unmatched: bool,
    /// Recipient domains whose rule says `dane = "off"`: DANE is not applied to their hosts
    /// (an emergency switch, logged on every use).
    pub dane_off: Vec<DomainPattern>,
    /// See `OutboundConfig::requiretls_rules_count`: a rule at `verify` (or with pins)
    /// authenticates a host for a REQUIRETLS message, as DANE and MTA-STS `enforce` do.
    pub requiretls_rules_count: bool,
    /// See `OutboundConfig::honour_tls_required_no`.
    pub honour_tls_required_no: bool,
}

/// The first rule whose pattern matches `domain` (canonicalised first, so a rule written with
/// U-labels covers mail addressed with A-labels and the reverse).
fn find<'a>(
    rules: &'a [(DomainPattern, TlsRequirement)],
    domain: &str,
) -> Option<(&'a DomainPattern, &'a TlsRequirement)> {
    let domain = Domain::parse(domain).ok()?;
    rules
        .iter()
        .find(|(p, _)| p.matches(&domain))
        .map(|(p, r)| (p, r))
}

/// The canonical domain of an address ([`crate::domain`]; empty when it has none).
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| crate::domain::canonical_or_lower(d))
        .unwrap_or_default()
}

impl TlsPolicy {
    /// The rule for a recipient domain alone.
    pub fn for_domain(&self, domain: &str) -> &TlsRequirement {
        find(&self.rules, domain).map_or(&self.default, |(_, r)| r)
    }

    /// The requirement for `domain` within a message from `sender` to `recipients` under the
    /// rules alone (no MTA-STS); see [`decide`] for the whole decision.
    pub fn for_message(&self, domain: &str, sender: &str, recipients: &[String]) -> TlsRequirement {
        self.by_rules(domain, sender, recipients).0
    }

    /// The rules' requirement and which rule set it.
    fn by_rules(&self, domain: &str, sender: &str, recipients: &[String]) -> (TlsRequirement, Why) {
        let own = find(&self.rules, domain);
        let sender_domain = domain_of(sender);
        let mut floor = find(&self.sender_rules, &sender_domain).map(|(p, r)| {
            (
                RuleMatch {
                    pattern: p.to_string(),
                    by: MatchedBy::Sender(sender_domain.clone()),
                },
                r,
            )
        });
        if !self.opportunistic_for_unmatched {
            for rcpt in recipients {
                let d = domain_of(rcpt);
                if let Some((p, req)) = find(&self.rules, &d)
                    && floor.as_ref().is_none_or(|(_, f)| req.level > f.level)
                {
                    floor = Some((
                        RuleMatch {
                            pattern: p.to_string(),
                            by: MatchedBy::OtherRecipient(d),
                        },
                        req,
                    ));
                }
            }
        }
        let own_level = own.map_or(self.default.level, |(_, r)| r.level);
        match floor {
            // A rule written for another domain lends its level (and private CA), not its
            // names or pins, which describe that domain's servers.
            Some((m, f)) if f.level > own_level => {
                let mut why = Why::new(Source::Rule(m));
                if let Some((p, r)) = own {
                    why.notes.push(format!(
                        "raises the recipient domain's rule \"{p}\" ({})",
                        r.level
                    ));
                }
                // The recipient domain's own names and pins still hold (they describe its
                // servers); the private CA is the raising rule's, else the domain's own.
                let (names, pins, own_roots) = own
                    .map_or((Vec::new(), Vec::new(), None), |(_, r)| {
                        (r.match_names.clone(), r.pins.clone(), r.extra_roots.clone())
                    });
                (
                    TlsRequirement {
                        level: f.level,
                        match_names: names,
                        pins,
                        extra_roots: f.extra_roots.clone().or(own_roots),
                        mta_sts: false,
                        dane: None,
                    },
                    why,
                )
            }
            _ => match own {
                Some((p, r)) => (
                    r.clone(),
                    Why::new(Source::Rule(RuleMatch {
                        pattern: p.to_string(),
                        by: MatchedBy::Recipient,
                    })),
                ),
                None => (self.default.clone(), Why::new(Source::Default)),
            },
        }
    }
}

/// How a rule came to apply to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchedBy {
    /// Its pattern matches the recipient domain.
    Recipient,
    /// Its sender pattern matches the sender's domain (given).
    Sender(String),
    /// It matches another recipient domain (given) of the same message, and
    /// `opportunistic_for_unmatched` is off.
    OtherRecipient(String),
}

/// A `[[tls_policy]]` rule that applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// The pattern as the rule's list gives it, canonical (`*.bank.test`).
    pub pattern: String,
    pub by: MatchedBy,
}

/// Which source set a requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A `[[tls_policy]]` rule.
    Rule(RuleMatch),
    /// The recipient domain's MTA-STS `enforce` policy (described as `MTA-STS enforce (id …,
    /// cached)`).
    MtaSts(String),
    /// No rule and no policy: opportunistic TLS.
    Default,
    /// DNSSEC-validated TLSA records of the MX host (RFC 7672), described as
    /// `DANE (TLSA records of mx.example, 2 usable records)`.
    Dane(String),
}

impl Source {
    /// `rule`, `mta-sts` or `opportunistic`: a metric label and a log field.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Rule(_) => "rule",
            Source::MtaSts(_) => "mta-sts",
            Source::Default => "opportunistic",
            Source::Dane(_) => "dane",
        }
    }
}

/// Why a host gets its requirement: the source that set it, and what else shaped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub source: Source,
    /// Other facts that shaped the requirement, in words (a rule that raised it, pins kept, a
    /// testing policy that only reports).
    pub notes: Vec<String>,
}

impl Why {
    fn new(source: Source) -> Why {
        Why {
            source,
            notes: Vec::new(),
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Rule(m) => {
                write!(f, "rule \"{}\"", m.pattern)?;
                match &m.by {
                    MatchedBy::Recipient => f.write_str(" (recipient domain)")?,
                    MatchedBy::Sender(d) => write!(f, " (sender domain {d})")?,
                    MatchedBy::OtherRecipient(d) => write!(
                        f,
                        " (another recipient's domain, {d}; opportunistic_for_unmatched is off)"
                    )?,
                }
            }
            Source::MtaSts(d) => f.write_str(d)?,
            Source::Default => f.write_str("opportunistic (no rule or policy)")?,
            Source::Dane(d) => f.write_str(d)?,
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

/// Merges a rule's private CA (if any) with the MTA-STS trust anchors into one store.
pub type RootsMerge<'a> = dyn Fn(Option<&Arc<RootCertStore>>) -> Option<Arc<RootCertStore>> + 'a;

/// What is known about one delivery to one recipient domain, before routing.
pub struct Facts<'a> {
    pub rules: &'a TlsPolicy,
    pub sender: &'a str,
    /// The recipient domain (canonical).
    pub domain: &'a str,
    /// Every recipient of the message (other domains' rules may raise the level).
    pub recipients: &'a [String],
    /// The domain's MTA-STS policy, if the cache or a fetch gave one (MX delivery only).
    pub mta_sts: Option<&'a Applied>,
    /// The trust anchors for a host under an MTA-STS policy, given a rule's private CA: the
    /// rule's and the policy's as one store (memoised by the caller, so a merged store keeps
    /// one identity for session reuse).
    pub sts_roots: &'a RootsMerge<'a>,
    /// The message asked for REQUIRETLS (RFC 8689): only authenticated hosts may take it.
    pub requiretls: bool,
    /// The message says `TLS-Required: No` (RFC 8689; [`says_tls_required_no`]): unless
    /// `requiretls`, or the rules do not honour it, MTA-STS and DANE are not applied.
    pub tls_required_no: bool,
    /// Why DANE cannot be used at all (disabled, or our resolver cannot validate); `None`
    /// when it can.
    pub dane_unavailable: Option<String>,
}

/// The decision for one recipient domain; [`DomainDecision::for_host`] judges each MX host.
#[derive(Debug, Clone)]
pub struct DomainDecision {
    /// What every host without DANE must meet.
    pub requirement: TlsRequirement,
    pub why: Why,
    /// What the rules alone gave, and why (a DANE host keeps a rule's pins).
    pub rules: (TlsRequirement, Why),
    /// DANE is not applied to this domain's hosts, and why (`dane = "off"`, DANE disabled,
    /// the resolver cannot validate).
    pub dane_off: Option<String>,
    /// The policy whose MX patterns restrict (enforce) or are reported on (testing).
    pub mta_sts: Option<Applied>,
    pub requiretls: bool,
    /// Whether a rule authenticates a host for REQUIRETLS ([`TlsPolicy::requiretls_rules_count`]).
    pub requiretls_rules_count: bool,
}

/// The judgement for one MX host.
#[derive(Debug, Clone)]
pub enum HostVerdict {
    /// Deliver to it under the domain's requirement. `note` says what a testing policy
    /// would have done differently.
    Use { note: Option<String> },
    /// Deliver to it under a requirement of its own (DANE, or TLS demanded by unusable
    /// TLSA records), with the why.
    Own {
        requirement: Box<TlsRequirement>,
        why: Why,
    },
    /// Do not try it, with the cause and what it means for this host.
    Skip(cause::Cause, String),
}

/// The DNSSEC state of one answer (RFC 4035 §4.3), as the resolver validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dnssec {
    /// Validated from the trust anchor.
    Secure,
    /// Proven unsigned (no DS on the path), or validation is not done.
    Insecure,
    /// Does not validate (bad or missing signatures, a wrong DS): the words say how.
    Bogus(String),
    /// No answer could be had (SERVFAIL, timeout, unreachable server), so whether it is
    /// signed is unknown: treated like bogus (never a downgrade), with a DNS failure's code.
    Unanswered(String),
}

impl Dnssec {
    /// The cause of not using a host whose lookup ended so, and the words; `None` for an
    /// answer (secure or insecure).
    fn failure(&self) -> Option<(cause::Cause, &str)> {
        match self {
            Dnssec::Bogus(w) => Some((cause::Cause::DaneDnssec, w)),
            Dnssec::Unanswered(w) => Some((cause::Cause::DnsFailure, w)),
            Dnssec::Secure | Dnssec::Insecure => None,
        }
    }
}

/// What the TLSA lookup for one MX host found (`_25._tcp.<host>`, RFC 7672 §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaLookup {
    /// Not looked up, because DANE cannot apply to the host (see [`dane_applies`]).
    NotLooked,
    /// Secure answer: the records (usable or not), at `base` after CNAME expansion.
    Records { records: Vec<Tlsa>, base: String },
    /// A secure denial (NXDOMAIN or NODATA), or an insecure answer: DANE does not apply.
    NoRecords { secure: bool },
    /// Bogus on a secure path: the host must not be used.
    Failed(String),
    /// No answer (SERVFAIL, timeout) on a secure path: the host must not be used either.
    Unanswered(String),
}

/// What is known about one MX host, after routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts<'a> {
    pub host: &'a str,
    /// The MX lookup (for implicit MX, the proof that there is none).
    pub mx: &'a Dnssec,
    /// The host's address records.
    pub addresses: &'a Dnssec,
    pub tlsa: &'a TlsaLookup,
}

/// Whether the TLSA records of a host should be looked up (RFC 7672 §2.1-2.2): only with a
/// secure MX RRset (or a secure proof of its absence) and secure address records.
pub fn dane_applies(mx: &Dnssec, addresses: &Dnssec) -> bool {
    *mx == Dnssec::Secure && *addresses == Dnssec::Secure
}

/// Whether the message's header section has `TLS-Required: No` (RFC 8689: the sender asks
/// that MTA-STS and DANE failures not stop delivery). Field name and value are
/// case-insensitive; folded values and surrounding blanks are allowed.
pub fn says_tls_required_no(message: &[u8]) -> bool {
    header_fields(message).iter().any(|(name, value)| {
        name.eq_ignore_ascii_case(b"TLS-Required") && value.eq_ignore_ascii_case(b"No")
    })
}

/// Whether the message is a TLS-RPT report (RFC 8460 §5.3: it has a `TLS-Report-Domain`
/// field). Deliveries of reports are not themselves recorded for reports (no report about
/// a report).
pub fn is_tlsrpt_report(message: &[u8]) -> bool {
    header_fields(message)
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case(b"TLS-Report-Domain"))
}

/// The header section's fields as (name, unfolded value), both trimmed.
fn header_fields(message: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let header = &message[..end];
    let mut fields: Vec<Vec<u8>> = Vec::new();
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(f)) => f.extend_from_slice(line),
            (Some(_), _) => fields.push(line.to_vec()),
            (None, _) => break,
        }
    }
    fields
        .iter()
        .filter_map(|f| {
            let colon = f.iter().position(|&b| b == b':')?;
            Some((
                f[..colon].trim_ascii().to_vec(),
                f[colon + 1..].trim_ascii().to_vec(),
            ))
        })
        .collect()
}

/// The decision (pure; see the module documentation for the precedence).
pub fn decide(facts: &Facts<'_>) -> DomainDecision {
    let (base, mut why) = facts
        .rules
        .by_rules(facts.domain, facts.sender, facts.recipients);
    let rules = (base.clone(), why.clone());
    let tls_required_no =
        facts.tls_required_no && !facts.requiretls && facts.rules.honour_tls_required_no;
    let mta_sts = match facts.mta_sts {
        Some(p) if tls_required_no && p.mode() != Mode::None => {
            why.notes.push(format!(
                "{} not applied: the message says TLS-Required: No (RFC 8689)",
                p.describe()
            ));
            None
        }
        other => other,
    };
    let dane_off = match (&facts.dane_unavailable, Domain::parse(facts.domain)) {
        _ if tls_required_no => {
            Some("DANE is not applied: the message says TLS-Required: No (RFC 8689)".into())
        }
        (Some(why), _) => Some(why.clone()),
        (None, Ok(d)) => facts
            .rules
            .dane_off
            .iter()
            .find(|p| p.matches(&d))
            .map(|p| format!("DANE is off for \"{p}\" by rule")),
        (None, Err(_)) => None,
    };
    let requirement = match mta_sts {
        Some(p) if p.mode() == Mode::Enforce => {
            let mut sts_why = Why::new(Source::MtaSts(p.describe()));
            if !matches!(why.source, Source::Default) {
                let kept = if base.pins.is_empty() {
                    ""
                } else {
                    ", its pins kept"
                };
                let names = if base.match_names.is_empty() {
                    ""
                } else {
                    ", its names giving way to the MX host name (RFC 8461 §4.2)"
                };
                sts_why
                    .notes
                    .push(format!("also {} at {}{kept}{names}", why, base.level));
            }
            why = sts_why;
            TlsRequirement {
                level: base.level.max(TlsLevel::Verify),
                match_names: Vec::new(),
                pins: base.pins.clone(),
                extra_roots: (facts.sts_roots)(base.extra_roots.as_ref()),
                mta_sts: true,
                dane: None,
            }
        }
        Some(p) if p.mode() == Mode::Testing => {
            why.notes.push(format!("{} reports only", p.describe()));
            if base.level < TlsLevel::Encrypt {
                TlsRequirement {
                    extra_roots: (facts.sts_roots)(base.extra_roots.as_ref()),
                    ..base
                }
            } else {
                base
            }
        }
        _ => base,
    };
    DomainDecision {
        requirement,
        why,
        rules,
        dane_off,
        mta_sts: mta_sts.cloned(),
        requiretls: facts.requiretls,
        requiretls_rules_count: facts.rules.requiretls_rules_count,
    }
}

impl DomainDecision {
    /// The judgement for one MX host (RFC 7672 §2 and RFC 8461 §2, §4.1):
    ///
    /// * usable TLSA records: the host is held to them (DANE), a rule's pins still apply,
    ///   and MTA-STS is not applied to it;
    /// * a TLSA lookup that failed on a secure path: the host is not used (never downgraded);
    /// * TLSA records that are all unusable: TLS is required, not authenticated (RFC 7672
    ///   §2.2), on top of what MTA-STS and the rules demand;
    /// * otherwise MTA-STS and the rules decide: under `enforce` only hosts the policy names
    ///   are used; under `testing` the others are used and the mismatch reported.
    ///
    /// A REQUIRETLS message then goes only to a host authenticated by DANE, MTA-STS
    /// `enforce` or (when rules count) a rule (RFC 8689 §4.2.1); the others are skipped.
    pub fn for_host(&self, h: &HostFacts<'_>) -> HostVerdict {
        let verdict = self.judge(h);
        if !self.requiretls {
            return verdict;
        }
        let req = match &verdict {
            HostVerdict::Skip(..) => return verdict,
            HostVerdict::Use { .. } => &self.requirement,
            HostVerdict::Own { requirement, .. } => requirement,
        };
        let by_rule =
            self.requiretls_rules_count && (req.level >= TlsLevel::Verify || !req.pins.is_empty());
        if req.dane.is_some() || req.mta_sts || by_rule {
            return verdict;
        }
        let rules = if self.requiretls_rules_count {
            ", nor held to verify by a rule"
        } else {
            ""
        };
        HostVerdict::Skip(
            cause::Cause::RequireTlsUnauthenticated,
            format!(
                "not authenticated by DANE or an MTA-STS enforce policy{rules}, which the message's REQUIRETLS demands (RFC 8689 §4.2.1)"
            ),
        )
    }

    fn judge(&self, h: &HostFacts<'_>) -> HostVerdict {
        if self.dane_off.is_none()
            && let Some((cause, why)) = [h.mx, h.addresses].into_iter().find_map(Dnssec::failure)
        {
            // Bogus or unanswerable on a path that may be signed: never downgrade.
            let what = if cause == cause::Cause::DaneDnssec {
                "DNSSEC validation of"
            } else {
                "the validating lookup of"
            };
            return HostVerdict::Skip(
                cause,
                format!(
                    "{what} the MX or address records of {} failed ({why}); the host is not used until it succeeds",
                    h.host
                ),
            );
        }
        if self.dane_off.is_none() && dane_applies(h.mx, h.addresses) {
            match h.tlsa {
                TlsaLookup::Unanswered(why) => {
                    return HostVerdict::Skip(
                        cause::Cause::DnsFailure,
                        format!(
                            "the TLSA lookup for {} got no answer on a DNSSEC-signed path ({why}); the host is not used until it does",
                            h.host
                        ),
                    );
                }
                TlsaLookup::Failed(why) => {
                    return HostVerdict::Skip(
                        cause::Cause::DaneDnssec,
                        format!(
                            "the TLSA lookup for {} failed on a DNSSEC-signed path ({why}); the host is not used until it succeeds",
                            h.host
                        ),
                    );
                }
                TlsaLookup::Records { records, base } => {
                    let (usable, ignored) = tlsa::usable(records);
                    if !usable.is_empty() {
                        return self.dane_host(h.host, usable, ignored.len(), base);
                    }
                    let mut why = self.why.clone();
                    why.notes.push(format!(
                        "the TLSA records of {base} are all unusable for SMTP, so TLS is required but not authenticated by them (RFC 7672 §2.2)"
                    ));
                    let mut requirement = self.requirement.clone();
                    requirement.level = requirement.level.max(TlsLevel::Encrypt);
                    // MTA-STS still judges the host as it would without TLSA records.
                    if let HostVerdict::Skip(c, w) = self.sts_verdict(h.host) {
                        return HostVerdict::Skip(c, w);
                    }
                    return HostVerdict::Own {
                        requirement: Box::new(requirement),
                        why,
                    };
                }
                TlsaLookup::NotLooked | TlsaLookup::NoRecords { .. } => {}
            }
        }
        self.sts_verdict(h.host)
    }

    /// A host with usable TLSA records.
    fn dane_host(&self, host: &str, usable: Vec<Tlsa>, ignored: usize, base: &str) -> HostVerdict {
        let n = usable.len();
        let mut why = Why::new(Source::Dane(format!(
            "DANE (TLSA records of {base}, {n} usable record{}{})",
            if n == 1 { "" } else { "s" },
            if ignored > 0 {
                format!(", {ignored} unusable ignored")
            } else {
                String::new()
            }
        )));
        let (rule, rule_why) = &self.rules;
        if !matches!(rule_why.source, Source::Default) {
            let pins = if rule.pins.is_empty() {
                ""
            } else {
                ", its pins kept"
            };
            why.notes
                .push(format!("also {rule_why} at {}{pins}", rule.level));
        }
        if let Some(p) = &self.mta_sts {
            why.notes.push(format!(
                "{} not applied to this host: DANE governs it (RFC 8461 §2)",
                p.describe()
            ));
        }
        let mut names = vec![host.to_string()];
        if base != host {
            names.push(base.to_string());
        }
        HostVerdict::Own {
            requirement: Box::new(TlsRequirement {
                level: TlsLevel::Verify,
                match_names: Vec::new(),
                pins: rule.pins.clone(),
                extra_roots: None,
                mta_sts: false,
                dane: Some(Arc::new(DaneTrust {
                    records: usable,
                    names,
                    base: base.to_string(),
                })),
            }),
            why,
        }
    }

    /// The MTA-STS judgement of a host without DANE.
    fn sts_verdict(&self, host: &str) -> HostVerdict {
        match &self.mta_sts {
            Some(p) if !p.entry.policy.matches_mx(host) => match p.mode() {
                Mode::Enforce => HostVerdict::Skip(
                    cause::Cause::StsMxMismatch,
                    format!("{host} is not named in the policy's mx patterns"),
                ),
                Mode::Testing => HostVerdict::Use {
                    note: Some(format!("would skip {host}")),
                },
                Mode::None => HostVerdict::Use { note: None },
            },
            _ => HostVerdict::Use { note: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Entry;
    use crate::sts::policy::parse_policy;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn level(s: &str) -> TlsLevel {
        match s {
            "none" => TlsLevel::None,
            "may" => TlsLevel::May,
            "encrypt" => TlsLevel::Encrypt,
            "verify" => TlsLevel::Verify,
            _ => panic!("{s}"),
        }
    }

    fn applied(mode: &str) -> Applied {
        let text = if mode == "none" {
            "version: STSv1\nmode: none\nmax_age: 86400\n".to_string()
        } else {
            format!("version: STSv1\nmode: {mode}\nmx: mx.dest.test\nmax_age: 86400\n")
        };
        Applied {
            domain: "dest.test".into(),
            entry: Arc::new(Entry {
                id: "20261203000000Z".into(),
                policy: parse_policy(text.as_bytes()).unwrap(),
                fetched: 0,
                text,
            }),
            source: "cached".into(),
        }
    }

    /// The decision for mail to `rcpt@dest.test` in a message that also goes to
    /// `x@other.test` (whose rule is `verify`), under a rule for dest.test at `rule`
    /// ("-": none) and an MTA-STS policy in `sts` mode ("-": none published).
    fn run(rule: &str, sts: &str, opp: bool, roots: &Arc<RootCertStore>) -> DomainDecision {
        let mut rules = vec![(pat("other.test"), TlsRequirement::level(TlsLevel::Verify))];
        if rule != "-" {
            rules.insert(0, (pat("dest.test"), TlsRequirement::level(level(rule))));
        }
        let rules = TlsPolicy {
            rules,
            sender_rules: Vec::new(),
            default: TlsRequirement::level(TlsLevel::May),
            opportunistic_for_unmatched: opp,
            dane_off: Vec::new(),
            requiretls_rules_count: false,
            honour_tls_required_no: true,
        };
        let policy = (sts != "-").then(|| applied(sts));
        let merge = |_: Option<&Arc<RootCertStore>>| Some(roots.clone());
        let recipients = ["rcpt@dest.test".to_string(), "x@other.test".to_string()];
        decide(&Facts {
            rules: &rules,
            sender: "s@sender.test",
            domain: "dest.test",
            recipients: &recipients,
            mta_sts: policy.as_ref(),
            sts_roots: &merge,
            requiretls: false,
            tls_required_no: false,
            dane_unavailable: None,
        })
    }

    /// Every combination of the sources there are today: the recipient domain's rule level
    /// (or no rule) x the MTA-STS mode (or no policy) x `opportunistic_for_unmatched`, with
    /// another recipient under a `verify` rule. Columns: rule, MTA-STS, opportunistic for
    /// unmatched -> level, source (`rule:own` / `rule:other` / `mta-sts` / `opportunistic`),
    /// MTA-STS codes on failure, trust anchors from the policy added (`sts`) or not (`-`).
    /// DANE adds its column with DANE.
    #[test]
    fn decision_table() {
        #[rustfmt::skip]
        let table: &[(&str, &str, bool, &str, &str, bool, &str)] = &[
        ("-", "-", true, "may", "opportunistic", false, "-"),
        ("-", "-", false, "verify", "rule:other", false, "-"),
        ("-", "none", true, "may", "opportunistic", false, "-"),
        ("-", "none", false, "verify", "rule:other", false, "-"),
        ("-", "testing", true, "may", "opportunistic", false, "sts"),
        ("-", "testing", false, "verify", "rule:other", false, "-"),
        ("-", "enforce", true, "verify", "mta-sts", true, "sts"),
        ("-", "enforce", false, "verify", "mta-sts", true, "sts"),
        ("none", "-", true, "none", "rule:own", false, "-"),
        ("none", "-", false, "verify", "rule:other", false, "-"),
        ("none", "none", true, "none", "rule:own", false, "-"),
        ("none", "none", false, "verify", "rule:other", false, "-"),
        ("none", "testing", true, "none", "rule:own", false, "sts"),
        ("none", "testing", false, "verify", "rule:other", false, "-"),
        ("none", "enforce", true, "verify", "mta-sts", true, "sts"),
        ("none", "enforce", false, "verify", "mta-sts", true, "sts"),
        ("may", "-", true, "may", "rule:own", false, "-"),
        ("may", "-", false, "verify", "rule:other", false, "-"),
        ("may", "none", true, "may", "rule:own", false, "-"),
        ("may", "none", false, "verify", "rule:other", false, "-"),
        ("may", "testing", true, "may", "rule:own", false, "sts"),
        ("may", "testing", false, "verify", "rule:other", false, "-"),
        ("may", "enforce", true, "verify", "mta-sts", true, "sts"),
        ("may", "enforce", false, "verify", "mta-sts", true, "sts"),
        ("encrypt", "-", true, "encrypt", "rule:own", false, "-"),
        ("encrypt", "-", false, "verify", "rule:other", false, "-"),
        ("encrypt", "none", true, "encrypt", "rule:own", false, "-"),
        ("encrypt", "none", false, "verify", "rule:other", false, "-"),
        ("encrypt", "testing", true, "encrypt", "rule:own", false, "-"),
        ("encrypt", "testing", false, "verify", "rule:other", false, "-"),
        ("encrypt", "enforce", true, "verify", "mta-sts", true, "sts"),
        ("encrypt", "enforce", false, "verify", "mta-sts", true, "sts"),
        ("verify", "-", true, "verify", "rule:own", false, "-"),
        ("verify", "-", false, "verify", "rule:own", false, "-"),
        ("verify", "none", true, "verify", "rule:own", false, "-"),
        ("verify", "none", false, "verify", "rule:own", false, "-"),
        ("verify", "testing", true, "verify", "rule:own", false, "-"),
        ("verify", "testing", false, "verify", "rule:own", false, "-"),
        ("verify", "enforce", true, "verify", "mta-sts", true, "sts"),
        ("verify", "enforce", false, "verify", "mta-sts", true, "sts"),
        ];
        assert_eq!(table.len(), 5 * 4 * 2);
        let roots = Arc::new(RootCertStore::empty());
        for &(rule, sts, opp, want_level, want_source, want_sts, want_roots) in table {
            let row = format!("rule {rule}, MTA-STS {sts}, opportunistic_for_unmatched {opp}");
            let d = run(rule, sts, opp, &roots);
            assert_eq!(d.requirement.level, level(want_level), "{row}: {}", d.why);
            let source = match &d.why.source {
                Source::Rule(RuleMatch {
                    by: MatchedBy::Recipient,
                    ..
                }) => "rule:own",
                Source::Rule(RuleMatch {
                    by: MatchedBy::OtherRecipient(d),
                    ..
                }) if d == "other.test" => "rule:other",
                Source::Rule(_) => "rule:?",
                Source::MtaSts(_) => "mta-sts",
                Source::Default => "opportunistic",
                Source::Dane(_) => "dane",
            };
            assert_eq!(source, want_source, "{row}: {}", d.why);
            assert_eq!(d.requirement.mta_sts, want_sts, "{row}");
            let got_roots = match &d.requirement.extra_roots {
                Some(r) if Arc::ptr_eq(r, &roots) => "sts",
                Some(_) => "other",
                None => "-",
            };
            assert_eq!(got_roots, want_roots, "{row}");
            // The why names its source in words every output can print.
            let text = d.why.to_string();
            match source {
                "mta-sts" => assert!(
                    text.starts_with("MTA-STS enforce (id 20261203000000Z"),
                    "{text}"
                ),
                "rule:own" => assert!(
                    text.starts_with("rule \"dest.test\" (recipient domain)"),
                    "{text}"
                ),
                "rule:other" => assert!(
                    text.contains("rule \"other.test\" (another recipient's domain"),
                    "{text}"
                ),
                _ => assert!(text.starts_with("opportunistic"), "{text}"),
            }
            if sts == "testing" {
                assert!(
                    text.contains("MTA-STS testing (id 20261203000000Z, cached) reports only"),
                    "{row}: {text}"
                );
            }
            // Hosts without DANE: enforce skips an MX host its patterns do not name, testing
            // reports it.
            let verdict = d.for_host(&host(
                "mx.elsewhere.test",
                &INSECURE,
                &TlsaLookup::NotLooked,
            ));
            let want = match sts {
                "enforce" => "skip:mta-sts:mx-mismatch",
                "testing" => "use:would skip mx.elsewhere.test",
                _ => "use",
            };
            assert_eq!(kind(&verdict), want, "{row}");
            // A DANE host is governed by DANE even where MTA-STS enforce would skip it.
            let usable = tlsa_records("3 1 1");
            let verdict = d.for_host(&host("mx.elsewhere.test", &SECURE, &usable));
            assert_eq!(kind(&verdict), "own", "{row}");
        }
    }

    const SECURE: Dnssec = Dnssec::Secure;
    const INSECURE: Dnssec = Dnssec::Insecure;

    fn host<'a>(name: &'a str, dnssec: &'a Dnssec, tlsa: &'a TlsaLookup) -> HostFacts<'a> {
        HostFacts {
            host: name,
            mx: dnssec,
            addresses: dnssec,
            tlsa,
        }
    }

    /// A secure TLSA answer with one record of the given usage, selector and matching type.
    fn tlsa_records(kind: &str) -> TlsaLookup {
        let len = if kind.ends_with('2') { 64 } else { 32 };
        TlsaLookup::Records {
            records: vec![
                Tlsa::parse_presentation(&format!("{kind} {}", "ab".repeat(len))).unwrap(),
            ],
            base: "mx.dest.test".into(),
        }
    }

    fn kind(v: &HostVerdict) -> String {
        match v {
            HostVerdict::Use { note: None } => "use".into(),
            HostVerdict::Use { note: Some(n) } => format!("use:{n}"),
            HostVerdict::Own { .. } => "own".into(),
            HostVerdict::Skip(c, _) => format!("skip:{}", c.label()),
        }
    }

    /// The decision table with the DANE column, for the host `mx.dest.test` (which the MTA-STS
    /// policy names): rule, MTA-STS, opportunistic for unmatched, the host's DANE state
    /// (`insecure`: MX or address records unsigned, so no TLSA lookup; `usable`: a secure
    /// `3 1 1` record; `bogus`: the TLSA lookup failed on a signed path; `unusable`: only a
    /// secure PKIX-EE `1 1 1` record) -> verdict (`use` the domain's requirement, `own`
    /// requirement, `skip:<cause>`), level, source, MTA-STS codes.
    /// rule, MTA-STS, opportunistic for unmatched, DANE -> verdict, level, source, MTA-STS codes.
    type DaneRow = (
        &'static str,
        &'static str,
        bool,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        bool,
    );

    #[test]
    fn decision_table_with_dane() {
        #[rustfmt::skip]
        let table: &[DaneRow] = &[
            ("-", "-", true, "insecure", "use", "may", "opportunistic", false),
            ("-", "-", true, "usable", "own", "verify", "dane", false),
            ("-", "-", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "-", true, "unusable", "own", "encrypt", "opportunistic", false),
            ("-", "-", false, "insecure", "use", "verify", "rule:other", false),
            ("-", "-", false, "usable", "own", "verify", "dane", false),
            ("-", "-", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "-", false, "unusable", "own", "verify", "rule:other", false),
            ("-", "none", true, "insecure", "use", "may", "opportunistic", false),
            ("-", "none", true, "usable", "own", "verify", "dane", false),
            ("-", "none", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "none", true, "unusable", "own", "encrypt", "opportunistic", false),
            ("-", "none", false, "insecure", "use", "verify", "rule:other", false),
            ("-", "none", false, "usable", "own", "verify", "dane", false),
            ("-", "none", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "none", false, "unusable", "own", "verify", "rule:other", false),
            ("-", "testing", true, "insecure", "use", "may", "opportunistic", false),
            ("-", "testing", true, "usable", "own", "verify", "dane", false),
            ("-", "testing", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "testing", true, "unusable", "own", "encrypt", "opportunistic", false),
            ("-", "testing", false, "insecure", "use", "verify", "rule:other", false),
            ("-", "testing", false, "usable", "own", "verify", "dane", false),
            ("-", "testing", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "testing", false, "unusable", "own", "verify", "rule:other", false),
            ("-", "enforce", true, "insecure", "use", "verify", "mta-sts", true),
            ("-", "enforce", true, "usable", "own", "verify", "dane", false),
            ("-", "enforce", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "enforce", true, "unusable", "own", "verify", "mta-sts", true),
            ("-", "enforce", false, "insecure", "use", "verify", "mta-sts", true),
            ("-", "enforce", false, "usable", "own", "verify", "dane", false),
            ("-", "enforce", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("-", "enforce", false, "unusable", "own", "verify", "mta-sts", true),
            ("none", "-", true, "insecure", "use", "none", "rule:own", false),
            ("none", "-", true, "usable", "own", "verify", "dane", false),
            ("none", "-", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "-", true, "unusable", "own", "encrypt", "rule:own", false),
            ("none", "-", false, "insecure", "use", "verify", "rule:other", false),
            ("none", "-", false, "usable", "own", "verify", "dane", false),
            ("none", "-", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "-", false, "unusable", "own", "verify", "rule:other", false),
            ("none", "none", true, "insecure", "use", "none", "rule:own", false),
            ("none", "none", true, "usable", "own", "verify", "dane", false),
            ("none", "none", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "none", true, "unusable", "own", "encrypt", "rule:own", false),
            ("none", "none", false, "insecure", "use", "verify", "rule:other", false),
            ("none", "none", false, "usable", "own", "verify", "dane", false),
            ("none", "none", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "none", false, "unusable", "own", "verify", "rule:other", false),
            ("none", "testing", true, "insecure", "use", "none", "rule:own", false),
            ("none", "testing", true, "usable", "own", "verify", "dane", false),
            ("none", "testing", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "testing", true, "unusable", "own", "encrypt", "rule:own", false),
            ("none", "testing", false, "insecure", "use", "verify", "rule:other", false),
            ("none", "testing", false, "usable", "own", "verify", "dane", false),
            ("none", "testing", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "testing", false, "unusable", "own", "verify", "rule:other", false),
            ("none", "enforce", true, "insecure", "use", "verify", "mta-sts", true),
            ("none", "enforce", true, "usable", "own", "verify", "dane", false),
            ("none", "enforce", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "enforce", true, "unusable", "own", "verify", "mta-sts", true),
            ("none", "enforce", false, "insecure", "use", "verify", "mta-sts", true),
            ("none", "enforce", false, "usable", "own", "verify", "dane", false),
            ("none", "enforce", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("none", "enforce", false, "unusable", "own", "verify", "mta-sts", true),
            ("may", "-", true, "insecure", "use", "may", "rule:own", false),
            ("may", "-", true, "usable", "own", "verify", "dane", false),
            ("may", "-", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "-", true, "unusable", "own", "encrypt", "rule:own", false),
            ("may", "-", false, "insecure", "use", "verify", "rule:other", false),
            ("may", "-", false, "usable", "own", "verify", "dane", false),
            ("may", "-", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "-", false, "unusable", "own", "verify", "rule:other", false),
            ("may", "none", true, "insecure", "use", "may", "rule:own", false),
            ("may", "none", true, "usable", "own", "verify", "dane", false),
            ("may", "none", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "none", true, "unusable", "own", "encrypt", "rule:own", false),
            ("may", "none", false, "insecure", "use", "verify", "rule:other", false),
            ("may", "none", false, "usable", "own", "verify", "dane", false),
            ("may", "none", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "none", false, "unusable", "own", "verify", "rule:other", false),
            ("may", "testing", true, "insecure", "use", "may", "rule:own", false),
            ("may", "testing", true, "usable", "own", "verify", "dane", false),
            ("may", "testing", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "testing", true, "unusable", "own", "encrypt", "rule:own", false),
            ("may", "testing", false, "insecure", "use", "verify", "rule:other", false),
            ("may", "testing", false, "usable", "own", "verify", "dane", false),
            ("may", "testing", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "testing", false, "unusable", "own", "verify", "rule:other", false),
            ("may", "enforce", true, "insecure", "use", "verify", "mta-sts", true),
            ("may", "enforce", true, "usable", "own", "verify", "dane", false),
            ("may", "enforce", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "enforce", true, "unusable", "own", "verify", "mta-sts", true),
            ("may", "enforce", false, "insecure", "use", "verify", "mta-sts", true),
            ("may", "enforce", false, "usable", "own", "verify", "dane", false),
            ("may", "enforce", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("may", "enforce", false, "unusable", "own", "verify", "mta-sts", true),
            ("encrypt", "-", true, "insecure", "use", "encrypt", "rule:own", false),
            ("encrypt", "-", true, "usable", "own", "verify", "dane", false),
            ("encrypt", "-", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "-", true, "unusable", "own", "encrypt", "rule:own", false),
            ("encrypt", "-", false, "insecure", "use", "verify", "rule:other", false),
            ("encrypt", "-", false, "usable", "own", "verify", "dane", false),
            ("encrypt", "-", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "-", false, "unusable", "own", "verify", "rule:other", false),
            ("encrypt", "none", true, "insecure", "use", "encrypt", "rule:own", false),
            ("encrypt", "none", true, "usable", "own", "verify", "dane", false),
            ("encrypt", "none", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "none", true, "unusable", "own", "encrypt", "rule:own", false),
            ("encrypt", "none", false, "insecure", "use", "verify", "rule:other", false),
            ("encrypt", "none", false, "usable", "own", "verify", "dane", false),
            ("encrypt", "none", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "none", false, "unusable", "own", "verify", "rule:other", false),
            ("encrypt", "testing", true, "insecure", "use", "encrypt", "rule:own", false),
            ("encrypt", "testing", true, "usable", "own", "verify", "dane", false),
            ("encrypt", "testing", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "testing", true, "unusable", "own", "encrypt", "rule:own", false),
            ("encrypt", "testing", false, "insecure", "use", "verify", "rule:other", false),
            ("encrypt", "testing", false, "usable", "own", "verify", "dane", false),
            ("encrypt", "testing", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "testing", false, "unusable", "own", "verify", "rule:other", false),
            ("encrypt", "enforce", true, "insecure", "use", "verify", "mta-sts", true),
            ("encrypt", "enforce", true, "usable", "own", "verify", "dane", false),
            ("encrypt", "enforce", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "enforce", true, "unusable", "own", "verify", "mta-sts", true),
            ("encrypt", "enforce", false, "insecure", "use", "verify", "mta-sts", true),
            ("encrypt", "enforce", false, "usable", "own", "verify", "dane", false),
            ("encrypt", "enforce", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("encrypt", "enforce", false, "unusable", "own", "verify", "mta-sts", true),
            ("verify", "-", true, "insecure", "use", "verify", "rule:own", false),
            ("verify", "-", true, "usable", "own", "verify", "dane", false),
            ("verify", "-", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "-", true, "unusable", "own", "verify", "rule:own", false),
            ("verify", "-", false, "insecure", "use", "verify", "rule:own", false),
            ("verify", "-", false, "usable", "own", "verify", "dane", false),
            ("verify", "-", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "-", false, "unusable", "own", "verify", "rule:own", false),
            ("verify", "none", true, "insecure", "use", "verify", "rule:own", false),
            ("verify", "none", true, "usable", "own", "verify", "dane", false),
            ("verify", "none", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "none", true, "unusable", "own", "verify", "rule:own", false),
            ("verify", "none", false, "insecure", "use", "verify", "rule:own", false),
            ("verify", "none", false, "usable", "own", "verify", "dane", false),
            ("verify", "none", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "none", false, "unusable", "own", "verify", "rule:own", false),
            ("verify", "testing", true, "insecure", "use", "verify", "rule:own", false),
            ("verify", "testing", true, "usable", "own", "verify", "dane", false),
            ("verify", "testing", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "testing", true, "unusable", "own", "verify", "rule:own", false),
            ("verify", "testing", false, "insecure", "use", "verify", "rule:own", false),
            ("verify", "testing", false, "usable", "own", "verify", "dane", false),
            ("verify", "testing", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "testing", false, "unusable", "own", "verify", "rule:own", false),
            ("verify", "enforce", true, "insecure", "use", "verify", "mta-sts", true),
            ("verify", "enforce", true, "usable", "own", "verify", "dane", false),
            ("verify", "enforce", true, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "enforce", true, "unusable", "own", "verify", "mta-sts", true),
            ("verify", "enforce", false, "insecure", "use", "verify", "mta-sts", true),
            ("verify", "enforce", false, "usable", "own", "verify", "dane", false),
            ("verify", "enforce", false, "bogus", "skip:dane:dnssec", "-", "-", false),
            ("verify", "enforce", false, "unusable", "own", "verify", "mta-sts", true),
        ];
        assert_eq!(table.len(), 5 * 4 * 2 * 4);
        let roots = Arc::new(RootCertStore::empty());
        for &(rule, sts, opp, dane, want_verdict, want_level, want_source, want_sts) in table {
            let row = format!(
                "rule {rule}, MTA-STS {sts}, opportunistic_for_unmatched {opp}, DANE {dane}"
            );
            let d = run(rule, sts, opp, &roots);
            let (dnssec, tlsa) = match dane {
                "insecure" => (INSECURE, TlsaLookup::NotLooked),
                "usable" => (SECURE, tlsa_records("3 1 1")),
                "bogus" => (SECURE, TlsaLookup::Failed("SERVFAIL".into())),
                _ => (SECURE, tlsa_records("1 1 1")),
            };
            let v = d.for_host(&host("mx.dest.test", &dnssec, &tlsa));
            assert_eq!(kind(&v), want_verdict, "{row}");
            let (req, why) = match &v {
                HostVerdict::Use { .. } => (&d.requirement, &d.why),
                HostVerdict::Own { requirement, why } => (&**requirement, why),
                HostVerdict::Skip(..) => continue,
            };
            assert_eq!(req.level, level(want_level), "{row}: {why}");
            assert_eq!(req.mta_sts, want_sts, "{row}");
            let source = match &why.source {
                Source::Rule(RuleMatch {
                    by: MatchedBy::Recipient,
                    ..
                }) => "rule:own",
                Source::Rule(_) => "rule:other",
                s => s.label(),
            };
            assert_eq!(source, want_source, "{row}: {why}");
            assert_eq!(req.dane.is_some(), dane == "usable", "{row}");
            if dane == "usable" {
                let text = why.to_string();
                assert!(
                    text.starts_with("DANE (TLSA records of mx.dest.test, 1 usable record)"),
                    "{text}"
                );
                if sts == "enforce" || sts == "testing" {
                    assert!(
                        text.contains("not applied to this host: DANE governs it (RFC 8461 §2)"),
                        "{text}"
                    );
                }
            }
            if dane == "unusable" {
                assert!(
                    why.to_string().contains("all unusable for SMTP"),
                    "{row}: {why}"
                );
            }
        }
    }

    #[test]
    fn dane_off_and_unavailable_leave_the_decision_to_the_rest() {
        let roots = Arc::new(RootCertStore::empty());
        let mut d = run("-", "-", true, &roots);
        let usable = tlsa_records("3 1 1");
        assert_eq!(
            kind(&d.for_host(&host("mx.dest.test", &SECURE, &usable))),
            "own"
        );
        d.dane_off = Some("DANE is off for \"dest.test\" by rule".into());
        assert_eq!(
            kind(&d.for_host(&host("mx.dest.test", &SECURE, &usable))),
            "use"
        );
        let failed = TlsaLookup::Failed("timeout".into());
        assert_eq!(
            kind(&d.for_host(&host("mx.dest.test", &SECURE, &failed))),
            "use"
        );
        // Insecure address records: DANE does not apply whatever the TLSA lookup said.
        d.dane_off = None;
        let half = HostFacts {
            host: "mx.dest.test",
            mx: &SECURE,
            addresses: &INSECURE,
            tlsa: &failed,
        };
        assert_eq!(kind(&d.for_host(&half)), "use");
    }

    #[test]
    fn no_answer_is_a_dns_failure_and_bad_signatures_a_dnssec_failure() {
        let roots = Arc::new(RootCertStore::empty());
        let d = run("-", "-", true, &roots);
        let usable = tlsa_records("3 1 1");
        let code = |v: &HostVerdict| match v {
            HostVerdict::Skip(c, w) => format!("{} {}", c.code(false).unwrap_or("-"), w),
            other => format!("not skipped: {}", kind(other)),
        };
        // Address lookup timed out under a signed MX: skipped, temporary DNS failure.
        let lost = Dnssec::Unanswered("timeout".into());
        let v = d.for_host(&HostFacts {
            host: "mx.dest.test",
            mx: &SECURE,
            addresses: &lost,
            tlsa: &usable,
        });
        let c = code(&v);
        assert!(c.starts_with("4.4.312 the validating lookup of"), "{c}");
        // Bad signatures: the DNSSEC code.
        let bad = Dnssec::Bogus("RRSIG expired".into());
        let v = d.for_host(&HostFacts {
            host: "mx.dest.test",
            mx: &bad,
            addresses: &SECURE,
            tlsa: &usable,
        });
        let c = code(&v);
        assert!(c.starts_with("4.7.324 DNSSEC validation of"), "{c}");
        assert!(c.contains("RRSIG expired"), "{c}");
        // The TLSA lookup itself unanswered on a signed path: DNS failure, not DANE's code.
        let v = d.for_host(&host(
            "mx.dest.test",
            &SECURE,
            &TlsaLookup::Unanswered("SERVFAIL".into()),
        ));
        let c = code(&v);
        assert!(c.starts_with("4.4.312 the TLSA lookup"), "{c}");
        assert!(c.contains("SERVFAIL"), "{c}");
    }

    #[test]
    fn a_dane_host_keeps_a_rules_pins_and_names_both_names() {
        let pin = Pin::Cert([9; 32]);
        let rules = TlsPolicy {
            rules: vec![(
                pat("dest.test"),
                TlsRequirement {
                    level: TlsLevel::Encrypt,
                    pins: vec![pin],
                    ..TlsRequirement::default()
                },
            )],
            ..TlsPolicy::default()
        };
        let none = |r: Option<&Arc<RootCertStore>>| r.cloned();
        let d = decide(&Facts {
            rules: &rules,
            sender: "",
            domain: "dest.test",
            recipients: &["a@dest.test".to_string()],
            mta_sts: None,
            sts_roots: &none,
            requiretls: false,
            tls_required_no: false,
            dane_unavailable: None,
        });
        let tlsa = TlsaLookup::Records {
            records: vec![
                Tlsa::parse_presentation(&format!("2 1 1 {}", "cd".repeat(32))).unwrap(),
                Tlsa::parse_presentation(&format!("0 1 1 {}", "cd".repeat(32))).unwrap(),
            ],
            base: "mx.hosting.test".into(),
        };
        let HostVerdict::Own { requirement, why } =
            d.for_host(&host("mx.dest.test", &SECURE, &tlsa))
        else {
            panic!("not a DANE host");
        };
        assert_eq!(requirement.pins, vec![pin]);
        assert_eq!(requirement.level_name(), "dane");
        let trust = requirement.dane.unwrap();
        assert_eq!(trust.records.len(), 1, "PKIX-TA is unusable for SMTP");
        assert_eq!(
            trust.names,
            vec!["mx.dest.test".to_string(), "mx.hosting.test".to_string()]
        );
        assert_eq!(
            why.to_string(),
            "DANE (TLSA records of mx.hosting.test, 1 usable record, 1 unusable ignored); also rule \"dest.test\" (recipient domain) at encrypt, its pins kept"
        );
    }

    #[test]
    fn enforce_keeps_a_rules_pins_and_drops_its_names() {
        let pin = Pin::Cert([7; 32]);
        let rules = TlsPolicy {
            rules: vec![(
                pat("dest.test"),
                TlsRequirement {
                    level: TlsLevel::Encrypt,
                    match_names: vec!["relay.dest.test".into()],
                    pins: vec![pin],
                    ..TlsRequirement::default()
                },
            )],
            ..TlsPolicy::default()
        };
        let policy = applied("enforce");
        let none = |r: Option<&Arc<RootCertStore>>| r.cloned();
        let d = decide(&Facts {
            rules: &rules,
            sender: "",
            domain: "dest.test",
            recipients: &["a@dest.test".to_string()],
            mta_sts: Some(&policy),
            sts_roots: &none,
            requiretls: false,
            tls_required_no: false,
            dane_unavailable: None,
        });
        assert_eq!(d.requirement.level, TlsLevel::Verify);
        assert_eq!(d.requirement.pins, vec![pin]);
        assert!(d.requirement.match_names.is_empty());
        let why = d.why.to_string();
        assert!(
            why.contains("also rule \"dest.test\" (recipient domain) at encrypt, its pins kept, its names giving way to the MX host name"),
            "{why}"
        );
    }

    #[test]
    fn a_raised_domain_keeps_its_own_names_and_pins() {
        let pin = Pin::Cert([3; 32]);
        let rules = TlsPolicy {
            rules: vec![(
                pat("dest.test"),
                TlsRequirement {
                    level: TlsLevel::Encrypt,
                    match_names: vec!["mx.dest.test".into()],
                    pins: vec![pin],
                    ..TlsRequirement::default()
                },
            )],
            sender_rules: vec![(pat("bank.test"), TlsRequirement::level(TlsLevel::Verify))],
            ..TlsPolicy::default()
        };
        let req = rules.for_message("dest.test", "a@bank.test", &["u@dest.test".to_string()]);
        assert_eq!(req.level, TlsLevel::Verify);
        assert_eq!(
            req.pins,
            vec![pin],
            "the domain's own pins must survive the raise"
        );
        assert_eq!(req.match_names, vec!["mx.dest.test".to_string()]);
    }

    #[test]
    fn a_rule_for_another_domain_lends_only_its_level_and_ca() {
        let ca = Arc::new(RootCertStore::empty());
        let rules = TlsPolicy {
            rules: vec![(pat("dest.test"), TlsRequirement::level(TlsLevel::Encrypt))],
            sender_rules: vec![(
                pat("bank.test"),
                TlsRequirement {
                    level: TlsLevel::Verify,
                    match_names: vec!["mx.bank.test".into()],
                    pins: vec![Pin::Spki([1; 32])],
                    extra_roots: Some(ca.clone()),
                    mta_sts: false,
                    dane: None,
                },
            )],
            ..TlsPolicy::default()
        };
        let none = |r: Option<&Arc<RootCertStore>>| r.cloned();
        let d = decide(&Facts {
            rules: &rules,
            sender: "pay@BANK.test",
            domain: "dest.test",
            recipients: &["a@dest.test".to_string()],
            mta_sts: None,
            sts_roots: &none,
            requiretls: false,
            tls_required_no: false,
            dane_unavailable: None,
        });
        assert_eq!(d.requirement.level, TlsLevel::Verify);
        assert!(d.requirement.pins.is_empty() && d.requirement.match_names.is_empty());
        assert!(
            d.requirement
                .extra_roots
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &ca))
        );
        assert_eq!(
            d.why.to_string(),
            "rule \"bank.test\" (sender domain bank.test); raises the recipient domain's rule \"dest.test\" (encrypt)"
        );
        assert_eq!(d.why.source.label(), "rule");
    }
    /// REQUIRETLS (RFC 8689 §4.2.1) and `TLS-Required: No` on top of the sources: the
    /// recipient domain's rule x MTA-STS mode x DANE state of its MX host x whether rules
    /// count for REQUIRETLS. Columns: rule, MTA-STS, DANE, rules count -> the verdict for a
    /// REQUIRETLS message; the verdict for a message that says `TLS-Required: No` (honoured)
    /// and, for it, whether MTA-STS codes apply.
    #[test]
    fn requiretls_and_tls_required_no_table() {
        #[rustfmt::skip]
        let table: &[(&str, &str, &str, bool, &str, &str)] = &[
        // A host without authentication never takes a REQUIRETLS message.
        ("-", "-", "insecure", false, "skip:requiretls:unauthenticated", "use"),
        ("encrypt", "-", "insecure", false, "skip:requiretls:unauthenticated", "use"),
        ("verify", "-", "insecure", false, "skip:requiretls:unauthenticated", "use"),
        // ... unless config lets a verify rule count.
        ("verify", "-", "insecure", true, "use", "use"),
        ("encrypt", "-", "insecure", true, "skip:requiretls:unauthenticated", "use"),
        // MTA-STS testing is not enough; enforce is.
        ("-", "testing", "insecure", false, "skip:requiretls:unauthenticated", "use"),
        ("-", "enforce", "insecure", false, "use", "use"),
        ("verify", "enforce", "insecure", false, "use", "use"),
        // DANE authenticates; TLS-Required: No sets it aside (the rules decide).
        ("-", "-", "usable", false, "own", "use"),
        ("-", "testing", "usable", false, "own", "use"),
        ("-", "enforce", "usable", false, "own", "use"),
        // TLSA records all unusable: encrypted, not authenticated, unless enforce.
        ("-", "-", "unusable", false, "skip:requiretls:unauthenticated", "use"),
        ("-", "enforce", "unusable", false, "own", "use"),
        // A bogus TLSA lookup stops both (never a downgrade for REQUIRETLS); TLS-Required:
        // No ignores DANE, so the host is used under the rules.
        ("-", "-", "bogus", false, "skip:dane:dnssec", "use"),
        ("-", "enforce", "bogus", false, "skip:dane:dnssec", "use"),
        ];
        let roots = Arc::new(RootCertStore::empty());
        for &(rule, sts, dane, rules_count, want_rt, want_no) in table {
            let row = format!("rule {rule}, MTA-STS {sts}, DANE {dane}, rules count {rules_count}");
            let mut rules = Vec::new();
            if rule != "-" {
                rules.push((pat("dest.test"), TlsRequirement::level(level(rule))));
            }
            let rules = TlsPolicy {
                rules,
                sender_rules: Vec::new(),
                default: TlsRequirement::level(TlsLevel::May),
                opportunistic_for_unmatched: true,
                dane_off: Vec::new(),
                requiretls_rules_count: rules_count,
                honour_tls_required_no: true,
            };
            let policy = (sts != "-").then(|| applied(sts));
            let merge = |_: Option<&Arc<RootCertStore>>| Some(roots.clone());
            let recipients = ["rcpt@dest.test".to_string()];
            let (dnssec, tlsa) = match dane {
                "insecure" => (INSECURE, TlsaLookup::NotLooked),
                "usable" => (SECURE, tlsa_records("3 1 1")),
                "bogus" => (SECURE, TlsaLookup::Failed("SERVFAIL".into())),
                _ => (SECURE, tlsa_records("1 1 1")),
            };
            let decide_with = |requiretls: bool, tls_required_no: bool| {
                decide(&Facts {
                    rules: &rules,
                    sender: "s@sender.test",
                    domain: "dest.test",
                    recipients: &recipients,
                    mta_sts: policy.as_ref(),
                    sts_roots: &merge,
                    requiretls,
                    tls_required_no,
                    dane_unavailable: None,
                })
            };
            let d = decide_with(true, false);
            let v = d.for_host(&host("mx.dest.test", &dnssec, &tlsa));
            assert_eq!(kind(&v), want_rt, "REQUIRETLS, {row}");
            if let HostVerdict::Skip(c, words) = &v
                && *c == cause::Cause::RequireTlsUnauthenticated
            {
                assert!(words.contains("RFC 8689"), "{words}");
                assert_eq!(c.code(false), Some("5.7.30"));
            }
            // REQUIRETLS wins over the header.
            let both = decide_with(true, true).for_host(&host("mx.dest.test", &dnssec, &tlsa));
            assert_eq!(kind(&both), want_rt, "REQUIRETLS + TLS-Required: No, {row}");
            // TLS-Required: No: the rules alone.
            let d = decide_with(false, true);
            let v = d.for_host(&host("mx.dest.test", &dnssec, &tlsa));
            assert_eq!(kind(&v), want_no, "TLS-Required: No, {row}");
            assert!(!d.requirement.mta_sts, "{row}");
            assert!(d.mta_sts.is_none(), "{row}");
            let want_level = if rule == "-" {
                TlsLevel::May
            } else {
                level(rule)
            };
            assert_eq!(d.requirement.level, want_level, "{row}");
            if sts != "-" {
                assert!(
                    d.why.to_string().contains("TLS-Required: No"),
                    "{row}: {}",
                    d.why
                );
            }
        }
    }

    #[test]
    fn tls_required_no_is_read_from_the_header_section_only() {
        assert!(says_tls_required_no(
            b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n"
        ));
        assert!(says_tls_required_no(b"tls-required:   no  \r\n\r\n"));
        assert!(says_tls_required_no(
            b"Subject: x\r\nTLS-Required:\r\n No\r\n\r\n"
        ));
        assert!(!says_tls_required_no(b"TLS-Required: Yes\r\n\r\n"));
        assert!(!says_tls_required_no(b"TLS-Required: Nope\r\n\r\n"));
        assert!(!says_tls_required_no(b"X-TLS-Required: No\r\n\r\n"));
        assert!(!says_tls_required_no(
            b"Subject: x\r\n\r\nTLS-Required: No\r\n"
        ));
        assert!(!says_tls_required_no(b""));
    }
}

#[cfg(test)]
mod rules_tests {
    use super::*;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn policy(split: bool) -> TlsPolicy {
        TlsPolicy {
            rules: vec![
                (
                    pat("strict.test"),
                    TlsRequirement {
                        level: TlsLevel::Verify,
                        match_names: vec!["mx.strict.test".into()],
                        ..Default::default()
                    },
                ),
                (pat("*.enc.test"), TlsRequirement::level(TlsLevel::Encrypt)),
            ],
            sender_rules: vec![(pat("bank.test"), TlsRequirement::level(TlsLevel::Encrypt))],
            default: TlsRequirement::level(TlsLevel::May),
            opportunistic_for_unmatched: split,
            dane_off: Vec::new(),
            requiretls_rules_count: false,
            honour_tls_required_no: true,
        }
    }

    #[test]
    fn message_level_policy() {
        let rcpts = vec!["a@strict.test".to_string(), "b@other.test".to_string()];
        let p = policy(true);
        assert_eq!(
            p.for_message("other.test", "x@me.test", &rcpts).level,
            TlsLevel::May
        );
        assert_eq!(
            p.for_message("strict.test", "x@me.test", &rcpts)
                .match_names,
            vec!["mx.strict.test"]
        );
        let p = policy(false);
        let lifted = p.for_message("other.test", "x@me.test", &rcpts);
        assert_eq!(lifted.level, TlsLevel::Verify);
        assert!(
            lifted.match_names.is_empty(),
            "names of another domain's rule are not lent"
        );
        // Sender rules lift every recipient, whatever the switch says; never lower.
        let p = policy(true);
        assert_eq!(
            p.for_message("other.test", "x@bank.test", &rcpts).level,
            TlsLevel::Encrypt
        );
        assert_eq!(
            p.for_message("strict.test", "x@bank.test", &rcpts).level,
            TlsLevel::Verify
        );
        // One form everywhere: a rule written with U-labels covers A-label recipients and
        // the reverse, and the ideographic full stop separates labels.
        let p = TlsPolicy {
            rules: vec![
                (pat("bücher.test"), TlsRequirement::level(TlsLevel::Verify)),
                (
                    pat("*.xn--caf-dma.test"),
                    TlsRequirement::level(TlsLevel::Encrypt),
                ),
            ],
            ..policy(true)
        };
        assert_eq!(p.for_domain("xn--bcher-kva.test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("BÜCHER.test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("bücher。test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("mx.café.test").level, TlsLevel::Encrypt);
        let idn = vec!["a@xn--bcher-kva.test".to_string()];
        assert_eq!(
            p.for_message(&domain_of(&idn[0]), "x@me.test", &idn).level,
            TlsLevel::Verify
        );
        let p = policy(true);
        let one = vec!["c@mx.enc.test".to_string()];
        assert_eq!(
            p.for_message("mx.enc.test", "x@me.test", &one).level,
            TlsLevel::Encrypt
        );
    }
}
