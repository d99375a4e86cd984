//! Why a recipient was not delivered, as one value every room renders and none re-parses.
//!
//! A [`Cause`] carries what each output needs: the enhanced status code in its temporary and
//! permanent form ([`Cause::code`]), a few words for the report page and logs
//! ([`Cause::words`]), a stable label for metrics and the state file ([`Cause::label`]), the
//! DSN sentence with what the receiving side must fix ([`Cause::explain`]), whether it is a
//! transport-security failure (24 h retry window; [`Cause::security`]) and the TLS-RPT result
//! type (RFC 8460 §4.3; [`Cause::tlsrpt_result`]).
//!
//! The codes follow Exchange Online where it has one, RFC 3463 otherwise
//! (docs/ARCHITECTURE.md, "Status codes"). A refusal by the remote server is [`Cause::Remote`]:
//! its code is the remote's own, kept verbatim beside the cause.

use std::fmt;

/// What was wrong with a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertProblem {
    Expired,
    NotYetValid,
    Untrusted,
    NameMismatch,
    PinMismatch,
    Revoked,
    Other,
}

impl CertProblem {
    /// `expired`, `untrusted`, `name mismatch`, …: the words of a `Reason:` (Exchange Online's
    /// 5.7.5 wording) and of the handshake metrics.
    pub fn words(self) -> &'static str {
        match self {
            CertProblem::Expired => "expired",
            CertProblem::NotYetValid => "not yet valid",
            CertProblem::Untrusted => "untrusted",
            CertProblem::NameMismatch => "name mismatch",
            CertProblem::PinMismatch => "pin mismatch",
            CertProblem::Revoked => "revoked",
            CertProblem::Other => "invalid certificate",
        }
    }

    fn label(self) -> &'static str {
        match self {
            CertProblem::Expired => "expired",
            CertProblem::NotYetValid => "not-yet-valid",
            CertProblem::Untrusted => "untrusted",
            CertProblem::NameMismatch => "name-mismatch",
            CertProblem::PinMismatch => "pin-mismatch",
            CertProblem::Revoked => "revoked",
            CertProblem::Other => "other",
        }
    }

    const ALL: [CertProblem; 7] = [
        CertProblem::Expired,
        CertProblem::NotYetValid,
        CertProblem::Untrusted,
        CertProblem::NameMismatch,
        CertProblem::PinMismatch,
        CertProblem::Revoked,
        CertProblem::Other,
    ];

    /// The RFC 8460 §4.3 result type of a certificate that failed validation.
    fn tlsrpt_result(self) -> &'static str {
        match self {
            CertProblem::Expired => "certificate-expired",
            CertProblem::NameMismatch => "certificate-host-mismatch",
            CertProblem::Untrusted => "certificate-not-trusted",
            _ => "validation-failure",
        }
    }
}

/// What failed the TLS check an MTA-STS `enforce` policy demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StsProblem {
    /// STARTTLS was not offered or was refused.
    StartTls,
    Certificate(CertProblem),
    Handshake,
    Timeout,
}

impl StsProblem {
    /// The words after `Reason:` in a `5.7.5 Remote certificate failed MTA-STS validation` reply.
    pub fn words(self) -> &'static str {
        match self {
            StsProblem::StartTls => "starttls not offered",
            StsProblem::Certificate(c) => c.words(),
            StsProblem::Handshake => "handshake failed",
            StsProblem::Timeout => "handshake timed out",
        }
    }
}

/// Why one recipient was not delivered on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Nothing listening, or the port is blocked: 4.4.316.
    ConnectionRefused,
    /// 4.4.315.
    ConnectionTimedOut,
    /// Any other connect error (network unreachable, …): 4.4.1.
    ConnectFailed,
    /// The server closed the connection mid-session: 4.4.2.
    ConnectionLost,
    /// The next hop's DNS could not be looked up: 4.4.312.
    DnsFailure,
    /// The domain does not exist or is not a valid destination: 5.1.2.
    NoSuchDomain,
    /// RFC 7505 null MX: 5.1.10.
    NullMx,
    /// No mail host (no MX and no address, or a relay host that does not resolve): 5.4.4.
    NoMailHost,
    /// Hosts existed but none could be tried: 4.4.4.
    NoUsableHost,
    /// The mail would come back to this server: 5.4.6.
    MailLoop,
    /// TLS required by a rule, STARTTLS not offered or refused: 4.4.317.
    StartTlsNotOffered,
    /// TLS required by a rule, the handshake failed: 4.7.0.
    TlsHandshake,
    /// A certificate failed the check a rule demands: 4.7.320.
    Certificate(CertProblem),
    /// No MX host is named in the domain's MTA-STS `enforce` policy: 4.4.8.
    StsMxMismatch,
    /// A host failed the TLS check of an MTA-STS `enforce` policy: 4.7.5.
    StsValidation(StsProblem),
    /// DANE host (usable TLSA records): STARTTLS not offered or refused: 4.7.321.
    DaneStartTls,
    /// DANE-TA: a certificate on the chain expired (or is not yet valid): 4.7.322.
    DaneExpired,
    /// No TLSA record matched the presented chain (or the chain does not reach the matching
    /// trust anchor): 4.7.323.
    DaneNoMatch,
    /// The TLSA lookup failed on a DNSSEC-signed path (bogus, SERVFAIL, timeout): 4.7.324.
    DaneDnssec,
    /// DANE-TA: the certificate is not valid for the MX host or TLSA base name: 4.7.325.
    DaneName,
    /// REQUIRETLS (RFC 8689 §4.2.1): no host of the destination is authenticated by DANE or
    /// an MTA-STS `enforce` policy (or a rule, where config lets rules count): 5.7.30 at once.
    RequireTlsUnauthenticated,
    /// REQUIRETLS: the host does not offer REQUIRETLS (or TLS) after all: 4.7.30, then 5.7.30.
    RequireTlsNotOffered,
    /// Relay credentials would have to be sent without TLS: 4.7.0.
    RelayAuthWithoutTls,
    /// The relay offers no AUTH mechanism we speak: 4.7.0.
    RelayAuthNotOffered,
    /// The relay refused the credentials: 4.7.8.
    RelayAuthRefused,
    /// A protocol error (unexpected reply, RSET refused): 4.5.0.
    Protocol,
    /// Delivery to a local mailbox failed: 4.3.0.
    LocalDelivery,
    /// Returned to the sender by the administrator: 5.0.0.
    Administrator,
    /// The remote server refused; its reply's code is the status.
    Remote,
}

impl Cause {
    /// The enhanced status code while retrying (`permanent == false`) or once retrying has
    /// ended; `None` for [`Cause::Remote`], whose code is the remote's. Causes that are only
    /// ever permanent give their permanent code either way.
    pub fn code(self, permanent: bool) -> Option<&'static str> {
        let (t, p) = match self {
            Cause::ConnectionRefused => ("4.4.316", "5.4.316"),
            Cause::ConnectionTimedOut => ("4.4.315", "5.4.315"),
            Cause::ConnectFailed => ("4.4.1", "5.4.1"),
            Cause::ConnectionLost => ("4.4.2", "5.4.2"),
            Cause::DnsFailure => ("4.4.312", "5.4.312"),
            Cause::NoSuchDomain => ("5.1.2", "5.1.2"),
            Cause::NullMx => ("5.1.10", "5.1.10"),
            Cause::NoMailHost => ("5.4.4", "5.4.4"),
            Cause::NoUsableHost => ("4.4.4", "5.4.4"),
            Cause::MailLoop => ("5.4.6", "5.4.6"),
            Cause::StartTlsNotOffered => ("4.4.317", "5.4.317"),
            Cause::TlsHandshake => ("4.7.0", "5.7.0"),
            Cause::Certificate(_) => ("4.7.320", "5.7.320"),
            Cause::StsMxMismatch => ("4.4.8", "5.4.8"),
            Cause::StsValidation(_) => ("4.7.5", "5.7.5"),
            Cause::DaneStartTls => ("4.7.321", "5.7.321"),
            Cause::DaneExpired => ("4.7.322", "5.7.322"),
            Cause::DaneNoMatch => ("4.7.323", "5.7.323"),
            Cause::DaneDnssec => ("4.7.324", "5.7.324"),
            Cause::DaneName => ("4.7.325", "5.7.325"),
            Cause::RequireTlsUnauthenticated => ("5.7.30", "5.7.30"),
            Cause::RequireTlsNotOffered => ("4.7.30", "5.7.30"),
            Cause::RelayAuthWithoutTls | Cause::RelayAuthNotOffered => ("4.7.0", "5.7.0"),
            Cause::RelayAuthRefused => ("4.7.8", "5.7.8"),
            Cause::Protocol => ("4.5.0", "5.5.0"),
            Cause::LocalDelivery => ("4.3.0", "5.3.0"),
            Cause::Administrator => ("5.0.0", "5.0.0"),
            Cause::Remote => return None,
        };
        Some(if permanent { p } else { t })
    }

    /// Fails at once, without retrying.
    pub fn is_permanent(self) -> bool {
        self.code(false).is_some_and(|c| c.starts_with('5'))
    }

    /// A transport-security failure: TLS was required and not achieved (24 h retry window).
    pub fn security(self) -> bool {
        matches!(
            self,
            Cause::StartTlsNotOffered
                | Cause::TlsHandshake
                | Cause::Certificate(_)
                | Cause::StsMxMismatch
                | Cause::StsValidation(_)
                | Cause::DaneStartTls
                | Cause::DaneExpired
                | Cause::DaneNoMatch
                | Cause::DaneDnssec
                | Cause::DaneName
                | Cause::RequireTlsUnauthenticated
                | Cause::RequireTlsNotOffered
                | Cause::RelayAuthWithoutTls
        )
    }

    /// A few words for the report page, metrics and logs; empty for [`Cause::Remote`] (the
    /// remote's reply says it).
    pub fn words(self) -> &'static str {
        match self {
            Cause::ConnectionRefused => "connection refused",
            Cause::ConnectionTimedOut => "connection timed out",
            Cause::ConnectFailed => "cannot connect",
            Cause::ConnectionLost => "connection lost",
            Cause::DnsFailure => "DNS failure",
            Cause::NoSuchDomain => "no such domain",
            Cause::NullMx => "null MX",
            Cause::NoMailHost => "no mail host",
            Cause::NoUsableHost => "no usable host",
            Cause::MailLoop => "mail loop",
            Cause::StartTlsNotOffered => "STARTTLS not offered",
            Cause::TlsHandshake => "TLS handshake failed",
            Cause::Certificate(_) => "certificate validation failed",
            Cause::StsMxMismatch => "MX not in MTA-STS policy",
            Cause::StsValidation(_) => "certificate failed MTA-STS validation",
            Cause::DaneStartTls => "DANE: STARTTLS not offered",
            Cause::DaneExpired => "DANE: certificate expired",
            Cause::DaneNoMatch => "DANE: no TLSA record matched",
            Cause::DaneDnssec => "DANE: DNSSEC validation failed",
            Cause::DaneName => "DANE: certificate name mismatch",
            Cause::RequireTlsUnauthenticated => "REQUIRETLS: no authenticated host",
            Cause::RequireTlsNotOffered => "REQUIRETLS not offered",
            Cause::RelayAuthWithoutTls => "no TLS for relay credentials",
            Cause::RelayAuthNotOffered => "relay offers no AUTH",
            Cause::RelayAuthRefused => "relay refused credentials",
            Cause::Protocol => "protocol error",
            Cause::LocalDelivery => "local delivery failed",
            Cause::Administrator => "returned by the administrator",
            Cause::Remote => "",
        }
    }

    /// A stable label (metrics, the state file): `connection-refused`, `certificate:expired`,
    /// `mta-sts:starttls`, …
    pub fn label(self) -> String {
        let simple = match self {
            Cause::Certificate(c) => return format!("certificate:{}", c.label()),
            Cause::StsValidation(p) => {
                return match p {
                    StsProblem::StartTls => "mta-sts:starttls".into(),
                    StsProblem::Handshake => "mta-sts:handshake".into(),
                    StsProblem::Timeout => "mta-sts:timeout".into(),
                    StsProblem::Certificate(c) => format!("mta-sts:{}", c.label()),
                };
            }
            Cause::ConnectionRefused => "connection-refused",
            Cause::ConnectionTimedOut => "connection-timed-out",
            Cause::ConnectFailed => "connect-failed",
            Cause::ConnectionLost => "connection-lost",
            Cause::DnsFailure => "dns-failure",
            Cause::NoSuchDomain => "no-such-domain",
            Cause::NullMx => "null-mx",
            Cause::NoMailHost => "no-mail-host",
            Cause::NoUsableHost => "no-usable-host",
            Cause::MailLoop => "mail-loop",
            Cause::StartTlsNotOffered => "starttls-not-offered",
            Cause::TlsHandshake => "tls-handshake",
            Cause::StsMxMismatch => "mta-sts:mx-mismatch",
            Cause::DaneStartTls => "dane:starttls",
            Cause::DaneExpired => "dane:expired",
            Cause::DaneNoMatch => "dane:no-match",
            Cause::DaneDnssec => "dane:dnssec",
            Cause::DaneName => "dane:name",
            Cause::RequireTlsUnauthenticated => "requiretls:unauthenticated",
            Cause::RequireTlsNotOffered => "requiretls:not-offered",
            Cause::RelayAuthWithoutTls => "relay-auth-without-tls",
            Cause::RelayAuthNotOffered => "relay-auth-not-offered",
            Cause::RelayAuthRefused => "relay-auth-refused",
            Cause::Protocol => "protocol",
            Cause::LocalDelivery => "local-delivery",
            Cause::Administrator => "administrator",
            Cause::Remote => "remote",
        };
        simple.to_string()
    }

    /// The cause a [`Cause::label`] names.
    pub fn from_label(s: &str) -> Option<Cause> {
        if let Some(c) = s.strip_prefix("certificate:") {
            return cert_problem(c).map(Cause::Certificate);
        }
        if let Some(p) = s.strip_prefix("mta-sts:") {
            return Some(Cause::StsValidation(match p {
                "starttls" => StsProblem::StartTls,
                "handshake" => StsProblem::Handshake,
                "timeout" => StsProblem::Timeout,
                "mx-mismatch" => return Some(Cause::StsMxMismatch),
                c => StsProblem::Certificate(cert_problem(c)?),
            }));
        }
        Cause::SIMPLE.into_iter().find(|c| c.label() == s)
    }

    const SIMPLE: [Cause; 27] = [
        Cause::RequireTlsUnauthenticated,
        Cause::RequireTlsNotOffered,
        Cause::DaneStartTls,
        Cause::DaneExpired,
        Cause::DaneNoMatch,
        Cause::DaneDnssec,
        Cause::DaneName,
        Cause::ConnectionRefused,
        Cause::ConnectionTimedOut,
        Cause::ConnectFailed,
        Cause::ConnectionLost,
        Cause::DnsFailure,
        Cause::NoSuchDomain,
        Cause::NullMx,
        Cause::NoMailHost,
        Cause::NoUsableHost,
        Cause::MailLoop,
        Cause::StartTlsNotOffered,
        Cause::TlsHandshake,
        Cause::StsMxMismatch,
        Cause::RelayAuthWithoutTls,
        Cause::RelayAuthNotOffered,
        Cause::RelayAuthRefused,
        Cause::Protocol,
        Cause::LocalDelivery,
        Cause::Administrator,
        Cause::Remote,
    ];

    /// The cause behind a status code written by a version of Moat that stored no cause
    /// (state files from before causes were recorded); the only place a code is read back.
    pub fn from_legacy_status(status: &str, reason: &str) -> Cause {
        let tail = status.get(1..).unwrap_or("");
        match tail {
            ".4.316" => Cause::ConnectionRefused,
            ".4.315" => Cause::ConnectionTimedOut,
            ".4.312" => Cause::DnsFailure,
            ".4.317" => Cause::StartTlsNotOffered,
            ".7.320" => Cause::Certificate(CertProblem::Other),
            ".4.8" => Cause::StsMxMismatch,
            ".7.5" => {
                let word = reason
                    .split("Reason: ")
                    .nth(1)
                    .and_then(|x| x.split(" (").next())
                    .unwrap_or("");
                let problem = match word {
                    "starttls not offered" => StsProblem::StartTls,
                    "handshake timed out" => StsProblem::Timeout,
                    w if w.starts_with("handshake failed") => StsProblem::Handshake,
                    w => StsProblem::Certificate(
                        CertProblem::ALL
                            .into_iter()
                            .find(|c| c.words() == w)
                            .unwrap_or(CertProblem::Other),
                    ),
                };
                Cause::StsValidation(problem)
            }
            ".1.10" => Cause::NullMx,
            ".7.321" => Cause::DaneStartTls,
            ".7.322" => Cause::DaneExpired,
            ".7.323" => Cause::DaneNoMatch,
            ".7.324" => Cause::DaneDnssec,
            ".7.325" => Cause::DaneName,
            ".4.6" => Cause::MailLoop,
            _ => Cause::Remote,
        }
    }

    /// The RFC 8460 §4.3 result type for a TLS-RPT report; `None` when the failure was not
    /// about transport security.
    pub fn tlsrpt_result(self) -> Option<&'static str> {
        Some(match self {
            Cause::StartTlsNotOffered
            | Cause::StsValidation(StsProblem::StartTls)
            | Cause::DaneStartTls => "starttls-not-supported",
            Cause::DaneExpired => "certificate-expired",
            Cause::DaneName => "certificate-host-mismatch",
            Cause::DaneNoMatch => "tlsa-invalid",
            Cause::DaneDnssec => "dnssec-invalid",
            Cause::Certificate(c) | Cause::StsValidation(StsProblem::Certificate(c)) => {
                c.tlsrpt_result()
            }
            Cause::TlsHandshake
            | Cause::StsMxMismatch
            | Cause::StsValidation(StsProblem::Handshake | StsProblem::Timeout) => {
                "validation-failure"
            }
            _ => return None,
        })
    }

    /// The DSN's human sentence: what failed, where, and what the receiving side must fix.
    /// `host` is the server that gave the outcome (the domain when there was none), `reason`
    /// the recorded cause in words.
    pub fn explain(self, rcpt: &str, domain: &str, host: &str) -> String {
        match self {
            Cause::StsMxMismatch => format!(
                "None of the MX hosts of {domain} is named in its MTA-STS policy, so the policy forbids delivering to them. The administrator of {domain} must list its MX hosts in the policy (mx: lines) or correct the MX records."
            ),
            Cause::StsValidation(p) => format!(
                "{host} failed the TLS check that the MTA-STS policy of {domain} demands ({}). Its administrator must offer STARTTLS with a certificate for {host} from a trusted CA that has not expired.",
                p.words()
            ),
            Cause::DaneStartTls => format!(
                "{host} publishes DANE TLSA records but did not offer STARTTLS. Its administrator must enable STARTTLS, or remove the TLSA records of {host}."
            ),
            Cause::DaneExpired => format!(
                "The certificate of {host} (authenticated by its DANE-TA record) has expired. Its administrator must renew it."
            ),
            Cause::DaneNoMatch => format!(
                "The DANE TLSA records of {host} match none of the certificates it presented. The administrator of {domain} must publish a TLSA record for the server's current key (or install the certificate the records describe)."
            ),
            Cause::DaneDnssec => format!(
                "The DNSSEC-signed TLSA records of {host} could not be validated (bogus signatures, or the lookup failed). The administrator of {domain} must fix the zone's DNSSEC."
            ),
            Cause::DaneName => format!(
                "The certificate of {host} chains to its DANE-TA record but is not issued for {host}. Its administrator must install a certificate for that name."
            ),
            Cause::StartTlsNotOffered => format!(
                "{host} did not offer STARTTLS; the policy for {domain} requires TLS. Its administrator must enable STARTTLS on that mail server."
            ),
            Cause::Certificate(_) => format!(
                "The certificate of {host} failed validation and the policy for {domain} requires a valid one. Its administrator must install a valid certificate for {host}."
            ),
            Cause::ConnectionRefused => format!(
                "{host} refused the connection. Its administrator must make sure the mail server runs and its SMTP port is open."
            ),
            Cause::ConnectionTimedOut => format!(
                "Connecting to {host} timed out. Its administrator must make sure its SMTP port is reachable."
            ),
            Cause::DnsFailure => format!(
                "The DNS records of {domain} could not be looked up. Its administrator must fix the domain's DNS."
            ),
            Cause::NullMx => format!("{domain} publishes a null MX: it accepts no mail."),
            Cause::Administrator => format!(
                "The administrator of this mail server returned the message for {rcpt} before it could be delivered."
            ),
            Cause::RequireTlsUnauthenticated => format!(
                "The message was sent with REQUIRETLS (RFC 8689): it may only travel to a mail server authenticated by DNSSEC (DANE) or by an MTA-STS policy in enforce mode, and no mail server of {domain} is. The administrator of {domain} must publish DANE TLSA records or an MTA-STS enforce policy for it; or send the message without REQUIRETLS."
            ),
            Cause::RequireTlsNotOffered => format!(
                "The message was sent with REQUIRETLS (RFC 8689) and {host} does not offer REQUIRETLS, so the message was not passed to it. Its administrator must enable REQUIRETLS; or send the message without REQUIRETLS."
            ),
            Cause::TlsHandshake | Cause::RelayAuthWithoutTls => format!(
                "TLS with {host} failed and the policy for {domain} requires it. Its administrator must fix TLS on {host}."
            ),
            _ => format!("{host} did not accept the message for {rcpt}."),
        }
    }
}

fn cert_problem(label: &str) -> Option<CertProblem> {
    CertProblem::ALL.into_iter().find(|c| c.label() == label)
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every() -> Vec<Cause> {
        let mut all: Vec<Cause> = Cause::SIMPLE.to_vec();
        for c in CertProblem::ALL {
            all.push(Cause::Certificate(c));
            all.push(Cause::StsValidation(StsProblem::Certificate(c)));
        }
        all.extend([
            Cause::StsValidation(StsProblem::StartTls),
            Cause::StsValidation(StsProblem::Handshake),
            Cause::StsValidation(StsProblem::Timeout),
        ]);
        all
    }

    #[test]
    fn labels_round_trip_and_are_unique() {
        let all = every();
        let mut seen = std::collections::HashSet::new();
        for c in &all {
            let l = c.label();
            assert!(seen.insert(l.clone()), "duplicate label {l}");
            assert_eq!(Cause::from_label(&l), Some(*c), "{l}");
        }
        assert_eq!(Cause::from_label("nonsense"), None);
        assert_eq!(Cause::from_label("certificate:nonsense"), None);
    }

    #[test]
    fn codes_have_both_forms() {
        for c in every() {
            let Some(t) = c.code(false) else {
                assert_eq!(c, Cause::Remote);
                continue;
            };
            let p = c.code(true).unwrap();
            assert!(p.starts_with('5'), "{c}: {p}");
            assert_eq!(&t[1..], &p[1..], "{c}");
        }
        assert_eq!(Cause::StsMxMismatch.code(false), Some("4.4.8"));
        assert_eq!(Cause::StsMxMismatch.code(true), Some("5.4.8"));
        assert_eq!(
            Cause::StsValidation(StsProblem::StartTls).code(true),
            Some("5.7.5")
        );
        assert!(Cause::NullMx.is_permanent());
        assert!(!Cause::ConnectionRefused.is_permanent());
    }

    #[test]
    fn legacy_codes_map_to_causes() {
        assert_eq!(
            Cause::from_legacy_status("4.4.317", ""),
            Cause::StartTlsNotOffered
        );
        assert_eq!(
            Cause::from_legacy_status(
                "5.7.5",
                "Remote certificate failed MTA-STS validation. Reason: expired (mx: …)"
            ),
            Cause::StsValidation(StsProblem::Certificate(CertProblem::Expired))
        );
        assert_eq!(Cause::from_legacy_status("5.1.1", ""), Cause::Remote);
    }

    #[test]
    fn tlsrpt_result_types() {
        assert_eq!(
            Cause::StartTlsNotOffered.tlsrpt_result(),
            Some("starttls-not-supported")
        );
        assert_eq!(
            Cause::StsValidation(StsProblem::Certificate(CertProblem::NameMismatch))
                .tlsrpt_result(),
            Some("certificate-host-mismatch")
        );
        assert_eq!(
            Cause::Certificate(CertProblem::Expired).tlsrpt_result(),
            Some("certificate-expired")
        );
        assert_eq!(Cause::ConnectionRefused.tlsrpt_result(), None);
    }
}
