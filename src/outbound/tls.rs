//! Outbound TLS: the policy levels, the connector that runs the client handshake after
//! STARTTLS, and the classification of what the peer's certificate proved (docs/ARCHITECTURE.md, "Outbound TLS requirement").
//!
//! # Levels
//!
//! [`TlsLevel`] is ordered, so "at least" is a comparison: `none < may < encrypt < verify`.
//!
//! * `may` and `encrypt`: any certificate is accepted for the handshake, but the checks are
//!   still made and reported in [`TlsOutcome::verification`], in Postfix's words: `Verified`
//!   (chain to a trusted root and the name matches), `Trusted` (chain good, name wrong) or
//!   `Untrusted` (with the reason). Whether a failed handshake falls back to plaintext is the
//!   caller's business (only under `may`).
//! * `verify`: the chain must lead to a trusted root (the system roots, the connector's extra
//!   roots and the requirement's own [`TlsRequirement::extra_roots`]) at the current time, and
//!   the end-entity certificate must be valid (RFC 6125, via webpki: a `*.` wildcard covers
//!   exactly one label) for one of [`TlsRequirement::match_names`], or for the MX host name
//!   when that list is empty. Otherwise the handshake is aborted from inside the verifier (the
//!   server receives an alert) and [`TlsFailure::Certificate`] says why.
//!
//! # Pins
//!
//! [`TlsRequirement::pins`] are an *additional* requirement on top of the level, never a
//! substitute for it: under `verify` the chain and name checks must pass *and* one pin must
//! match; under `encrypt` (where the chain is not checked) a matching pin is enough, which is
//! Postfix's `fingerprint` level; under `may` pins are only reported ([`TlsOutcome::pinned`]),
//! since refusing would only push the session down to plaintext. A pin is the SHA-256 of the
//! end-entity certificate (DER) or of its SubjectPublicKeyInfo; any one match accepts.
//!
//! # Handshake
//!
//! TLS 1.3 preferred, then 1.2 (rustls' defaults: AEAD-only, forward-secret suites on
//! aws-lc-rs). SNI is the MX host name, as Postfix sends it, whatever `match_names` says.
//! Session resumption is off: a resumed session skips the certificate check, and one made
//! under `may` must never be resumed under `verify`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::{certificate_names, cipher_bits};
use crate::util::rfc5322_date;

/// The default limit for one TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

use crate::dane::tlsa::{DaneFailure, DaneMatch};
use crate::policy::DaneTrust;
use crate::policy::cause::{CertProblem, StsProblem};
pub use crate::policy::{TlsLevel, TlsRequirement};

/// A certificate pin: SHA-256 of the end-entity certificate's DER, or of its
/// SubjectPublicKeyInfo (survives renewal with the same key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pin {
    Cert([u8; 32]),
    Spki([u8; 32]),
}

impl Pin {
    /// Parses `sha256:cert:HEX` or `sha256:spki:HEX`; HEX may be separated by colons
    /// (`openssl x509 -fingerprint -sha256` style), and standard base64 (44 characters, as
    /// in HPKP) is accepted instead of hex.
    pub fn parse(s: &str) -> Result<Pin, String> {
        let bad = |why: &str| {
            format!("{s:?}: {why}; expected sha256:cert:HEX or sha256:spki:HEX (hex or base64)")
        };
        let mut parts = s.trim().splitn(3, ':');
        let (Some(alg), Some(kind), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a pin"));
        };
        if !alg.eq_ignore_ascii_case("sha256") {
            return Err(bad("only sha256 pins are supported"));
        }
        let digest =
            decode_digest(value).ok_or_else(|| bad("the value is not a SHA-256 digest"))?;
        match kind.to_ascii_lowercase().as_str() {
            "cert" => Ok(Pin::Cert(digest)),
            "spki" => Ok(Pin::Spki(digest)),
            _ => Err(bad("the kind must be cert or spki")),
        }
    }

    /// The certificate pin of a DER certificate.
    pub fn cert_of(der: &[u8]) -> Pin {
        Pin::Cert(sha256(der))
    }

    /// The public-key pin of a DER certificate; `None` if it cannot be parsed.
    pub fn spki_of(der: &[u8]) -> Option<Pin> {
        let der = CertificateDer::from(der);
        let parsed = ParsedCertificate::try_from(&der).ok()?;
        Some(Pin::Spki(sha256(parsed.subject_public_key_info().as_ref())))
    }

    fn matches(&self, cert: &[u8; 32], spki: Option<&[u8; 32]>) -> bool {
        match self {
            Pin::Cert(d) => d == cert,
            Pin::Spki(d) => Some(d) == spki,
        }
    }
}

impl std::str::FromStr for Pin {
    type Err = String;
    fn from_str(s: &str) -> Result<Pin, String> {
        Pin::parse(s)
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, digest) = match self {
            Pin::Cert(d) => ("cert", d),
            Pin::Spki(d) => ("spki", d),
        };
        write!(f, "sha256:{kind}:")?;
        digest.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn decode_digest(value: &str) -> Option<[u8; 32]> {
    let hex: String = value.chars().filter(|&c| c != ':').collect();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        return Some(out);
    }
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    bytes.try_into().ok()
}

/// SHA-256 by aws-lc-rs (the TLS stack's own crypto). It cannot fail: there is no lookup
/// that could leave an all-zero digest for a pin to match.
fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Why a certificate was not good enough, in terms a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFailure {
    /// A certificate in the chain (normally the server's own) expired at `not_after`.
    Expired { not_after: u64 },
    /// A certificate in the chain is not valid before `not_before`.
    NotYetValid { not_before: u64 },
    /// The chain does not lead to a trusted root: an unknown CA, missing intermediate
    /// certificates, or a self-signed certificate (CA:FALSE or CA:TRUE alike);
    /// [`UntrustedChain::of`] tells which from the certificates the server sent; the
    /// verifier fills it in, so the queue, log and DSN say it in probe's words.
    UntrustedIssuer(Option<UntrustedChain>),
    /// The certificate is not valid for any `expected` name.
    NameMismatch {
        expected: Vec<String>,
        presented: Vec<String>,
    },
    /// No configured pin matches.
    PinMismatch,
    /// The certificate (or one in its chain) has been revoked.
    Revoked,
    /// Any other cause (bad signature, unsupported algorithm, malformed certificate, wrong
    /// key usage, a CA certificate as the server's own, name or path length constraints, a
    /// distrusted certificate, …), as a sentence saying what is wrong and what the server
    /// must do.
    Other(String),
    /// The certificates do not meet the host's DANE TLSA records (RFC 7672).
    Dane(DaneFailure),
}

impl CertFailure {
    /// The kind of problem, for causes and metrics.
    pub fn problem(&self) -> CertProblem {
        match self {
            CertFailure::Expired { .. } => CertProblem::Expired,
            CertFailure::NotYetValid { .. } => CertProblem::NotYetValid,
            CertFailure::UntrustedIssuer(_) => CertProblem::Untrusted,
            CertFailure::NameMismatch { .. } => CertProblem::NameMismatch,
            CertFailure::PinMismatch => CertProblem::PinMismatch,
            CertFailure::Revoked => CertProblem::Revoked,
            CertFailure::Other(_) => CertProblem::Other,
            CertFailure::Dane(d) => match d {
                DaneFailure::Expired { .. } => CertProblem::Expired,
                DaneFailure::NotYetValid { .. } => CertProblem::NotYetValid,
                DaneFailure::NameMismatch { .. } => CertProblem::NameMismatch,
                _ => CertProblem::Untrusted,
            },
        }
    }
}

impl fmt::Display for CertFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertFailure::Expired { not_after } => {
                write!(f, "the certificate expired on {}", rfc5322_date(*not_after))
            }
            CertFailure::NotYetValid { not_before } => write!(
                f,
                "the certificate is not valid until {} (check the clocks on both sides)",
                rfc5322_date(*not_before)
            ),
            CertFailure::UntrustedIssuer(None) => f.write_str(
                "the certificate chain does not lead to a trusted root (untrusted issuer)",
            ),
            CertFailure::UntrustedIssuer(Some(why)) => write!(
                f,
                "the certificate chain does not lead to a trusted root (untrusted issuer): {why}"
            ),
            CertFailure::NameMismatch {
                expected,
                presented,
            } => {
                let presented = if presented.is_empty() {
                    "no host name".to_string()
                } else {
                    presented.join(", ")
                };
                if expected.is_empty() {
                    write!(
                        f,
                        "the certificate is issued to {presented}, not to the name asked for"
                    )
                } else {
                    write!(
                        f,
                        "the certificate is issued to {presented}, not {}",
                        expected.join(" or ")
                    )
                }
            }
            CertFailure::PinMismatch => {
                f.write_str("the certificate matches none of the pinned fingerprints")
            }
            CertFailure::Revoked => f.write_str(
                "the certificate has been revoked by its CA; the server needs a new certificate",
            ),
            CertFailure::Other(s) => f.write_str(s),
            CertFailure::Dane(d) => d.fmt(f),
        }
    }
}

/// What the peer's certificate proved (Postfix's log words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Chain to a trusted root and the name matches.
    Verified,
    /// Chain to a trusted root, but the name does not match.
    Trusted,
    /// The chain does not verify.
    Untrusted(CertFailure),
    /// Authenticated by the host's DANE TLSA records (RFC 7672): which record matched.
    Dane(DaneMatch),
}

impl Verification {
    /// `Verified`, `Trusted` or `Untrusted`, as in Postfix's "... TLS connection established".
    pub fn word(&self) -> &'static str {
        match self {
            // Postfix says "Verified" for a DANE-authenticated peer too.
            Verification::Verified | Verification::Dane(_) => "Verified",
            Verification::Trusted => "Trusted",
            Verification::Untrusted(_) => "Untrusted",
        }
    }
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verification::Verified => f.write_str("verified"),
            Verification::Trusted => f.write_str("trusted (name does not match)"),
            Verification::Untrusted(why) => write!(f, "untrusted ({why})"),
            Verification::Dane(m) => write!(f, "verified by DANE ({m})"),
        }
    }
}

/// Summary of an established session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOutcome {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// IANA name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    pub bits: u16,
    /// e.g. `X25519MLKEM768`.
    pub key_exchange: Option<String>,
    pub verification: Verification,
    /// Names in the server's certificate (subject CN and DNS SANs, lowercased).
    pub peer_names: Vec<String>,
    /// The server certificate's `notAfter`, Unix seconds.
    pub not_after: Option<u64>,
    /// Whether a configured pin matched; `None` when no pins are configured.
    pub pinned: Option<bool>,
}

/// Why a handshake did not produce a usable session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate did not meet the requirement (4.7.320 / 5.7.320, as Exchange Online; docs/ARCHITECTURE.md).
    Certificate(CertFailure),
    /// Any other handshake failure, in words that name it: an alert from the server, no
    /// common protocol version or cipher, a peer that does not speak TLS, a connection closed
    /// mid-handshake.
    Handshake(String),
    /// The handshake did not finish in time.
    Timeout,
}

impl TlsFailure {
    /// What failed, in the terms of an MTA-STS `Reason:`.
    pub fn sts_problem(&self) -> StsProblem {
        match self {
            TlsFailure::Certificate(c) => StsProblem::Certificate(c.problem()),
            TlsFailure::Handshake(_) => StsProblem::Handshake,
            TlsFailure::Timeout => StsProblem::Timeout,
        }
    }

    /// The enhanced status code for this failure, the one place it is decided: certificate
    /// problems are `4.7.320`/`5.7.320` (Exchange Online's "certificate validation failed"),
    /// every other handshake failure `4.7.0`/`5.7.0` (RFC 3463 "other security status").
    /// Callers acting for MTA-STS or DANE substitute their own codes (4.7.5, 4.7.32x).
    pub fn enhanced_code(&self, permanent: bool) -> &'static str {
        match (self, permanent) {
            (TlsFailure::Certificate(_), false) => "4.7.320",
            (TlsFailure::Certificate(_), true) => "5.7.320",
            (_, false) => "4.7.0",
            (_, true) => "5.7.0",
        }
    }

    pub fn is_certificate(&self) -> bool {
        matches!(self, TlsFailure::Certificate(_))
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::Certificate(c) => c.fmt(f),
            TlsFailure::Handshake(s) => f.write_str(s),
            TlsFailure::Timeout => f.write_str("the TLS handshake timed out"),
        }
    }
}

impl std::error::Error for TlsFailure {}

/// Makes outbound TLS sessions; create once and share.
#[derive(Clone)]
pub struct Connector {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("roots", &self.roots.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Connector {
    /// With `system_roots`, the platform's CA certificates (rustls-native-certs; the Mozilla
    /// set from webpki-roots when none load), plus `extra` when given.
    pub fn new(system_roots: bool, extra: Option<RootCertStore>) -> Connector {
        let mut roots = if system_roots {
            crate::tls::system_roots()
        } else {
            RootCertStore::empty()
        };
        if let Some(extra) = extra {
            roots.extend(extra.roots);
        }
        Connector {
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// The limit for one handshake (default 30 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Connector {
        self.timeout = timeout;
        self
    }

    /// Number of trusted roots (for the startup log).
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// Runs the client handshake on `tcp` (after `220` to STARTTLS, with nothing buffered)
    /// for `mx_host` under `req`.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        mx_host: &str,
        req: &TlsRequirement,
    ) -> Result<(TlsStream<TcpStream>, TlsOutcome), TlsFailure> {
        let host = normalize_host(mx_host);
        // Under DANE the SNI is the TLSA base domain (RFC 7672 §8.1), which differs from the
        // MX host when the records were found at its CNAME target.
        let sni_name = req
            .dane
            .as_ref()
            .map_or_else(|| host.clone(), |d| normalize_host(&d.base));
        let sni = ServerName::try_from(sni_name).map_err(|_| {
            TlsFailure::Handshake(format!("{mx_host:?} is not a host name TLS can check"))
        })?;
        let expected: Vec<String> = if req.match_names.is_empty() {
            vec![host]
        } else {
            req.match_names.iter().map(|n| normalize_host(n)).collect()
        };
        let record = Arc::new(Mutex::new(Record::default()));
        let verifier = PolicyVerifier {
            roots: self.roots.clone(),
            extra_roots: req.extra_roots.clone(),
            names: expected
                .iter()
                .filter_map(|n| ServerName::try_from(n.clone()).ok())
                .collect(),
            expected,
            level: req.level,
            pins: req.pins.clone(),
            dane: req.dane.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            record: record.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsFailure::Handshake(format!("TLS configuration: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

        let result = tokio::time::timeout(self.timeout, connector.connect(sni, tcp)).await;
        let taken = match record.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Record::default(),
        };
        let stream = match result {
            Err(_) => return Err(TlsFailure::Timeout),
            Ok(Err(e)) => {
                return Err(match taken.rejected {
                    Some(why) => TlsFailure::Certificate(why),
                    None => TlsFailure::Handshake(describe_io_error(&e)),
                });
            }
            Ok(Ok(s)) => s,
        };
        let conn = stream.get_ref().1;
        let (version, cipher) = crate::tls::version_and_cipher(conn);
        let outcome = TlsOutcome {
            version,
            bits: cipher_bits(&cipher),
            cipher,
            key_exchange: conn
                .negotiated_key_exchange_group()
                .map(|g| group_name(g.name())),
            verification: taken.verification.unwrap_or_else(|| {
                Verification::Untrusted(CertFailure::Other(
                    "the certificate was not checked".into(),
                ))
            }),
            peer_names: taken.peer_names,
            not_after: taken.not_after,
            pinned: taken.pinned,
        };
        Ok((stream, outcome))
    }
}

/// A key exchange group's IANA name (`X25519MLKEM768`, `secp256r1`), or its number.
fn group_name(g: rustls::NamedGroup) -> String {
    match g.as_str() {
        Some(name) => name.to_string(),
        None => format!("group 0x{:04x}", u16::from(g)),
    }
}

/// Lowercase, without a trailing dot or address-literal brackets.
fn normalize_host(name: &str) -> String {
    let name = name.trim();
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What the verifier found, handed back to [`Connector::handshake`].
#[derive(Debug, Default)]
struct Record {
    verification: Option<Verification>,
    pinned: Option<bool>,
    peer_names: Vec<String>,
    not_after: Option<u64>,
    /// Set when the verifier aborted the handshake.
    rejected: Option<CertFailure>,
}

/// One handshake's certificate policy.
#[derive(Debug)]
struct PolicyVerifier {
    roots: Arc<RootCertStore>,
    extra_roots: Option<Arc<RootCertStore>>,
    /// `expected` as server names (ones that cannot be names are left out: nothing matches).
    names: Vec<ServerName<'static>>,
    expected: Vec<String>,
    level: TlsLevel,
    pins: Vec<Pin>,
    /// DANE: the TLSA records replace the CA and name checks.
    dane: Option<Arc<DaneTrust>>,
    algorithms: WebPkiSupportedAlgorithms,
    record: Arc<Mutex<Record>>,
}

impl PolicyVerifier {
    /// Chain, then name, then pins; returns the record and, if the level is not met, why.
    fn assess(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Record {
        let der = end_entity.as_ref();
        let cert_digest = sha256(der);
        let parsed = ParsedCertificate::try_from(end_entity);
        let spki_digest = parsed
            .as_ref()
            .ok()
            .map(|p| sha256(p.subject_public_key_info().as_ref()));
        let pinned = (!self.pins.is_empty()).then(|| {
            self.pins
                .iter()
                .any(|p| p.matches(&cert_digest, spki_digest.as_ref()))
        });
        if let Some(trust) = &self.dane {
            // RFC 7672 §3: the TLSA records decide; pins, when given, must match as well.
            let mut chain = vec![end_entity.clone()];
            chain.extend(intermediates.iter().cloned());
            let (verification, rejected) =
                match crate::dane::tlsa::verify(&trust.records, &chain, &trust.names, now) {
                    Ok(m) => (
                        Verification::Dane(m),
                        (pinned == Some(false)).then_some(CertFailure::PinMismatch),
                    ),
                    Err(f) => (
                        Verification::Untrusted(CertFailure::Dane(f.clone())),
                        Some(CertFailure::Dane(f)),
                    ),
                };
            return Record {
                verification: Some(verification),
                pinned,
                peer_names: certificate_names(der),
                not_after: validity(der).map(|(_, a)| a),
                rejected,
            };
        }
        // An untrusted chain says why, judged from what the server sent.
        let explained = |f: CertFailure| match f {
            CertFailure::UntrustedIssuer(None) => {
                let mut chain = vec![end_entity.clone()];
                chain.extend(intermediates.iter().cloned());
                CertFailure::UntrustedIssuer(Some(UntrustedChain::of(&chain)))
            }
            other => other,
        };
        let (verification, name_failure) = match &parsed {
            Err(e) => (
                Verification::Untrusted(explained(cert_failure(e, der))),
                None,
            ),
            Ok(cert) => match self.check_chain(cert, intermediates, now) {
                Err(e) => (
                    Verification::Untrusted(explained(cert_failure(&e, der))),
                    None,
                ),
                Ok(()) => match self.check_name(cert, der) {
                    None => (Verification::Verified, None),
                    Some(f) => (Verification::Trusted, Some(f)),
                },
            },
        };
        let rejected = match self.level {
            TlsLevel::None | TlsLevel::May => None,
            TlsLevel::Encrypt => (pinned == Some(false)).then_some(CertFailure::PinMismatch),
            TlsLevel::Verify => match (&verification, name_failure) {
                (Verification::Untrusted(f), _) => Some(f.clone()),
                (_, Some(f)) => Some(f),
                _ => (pinned == Some(false)).then_some(CertFailure::PinMismatch),
            },
        };
        Record {
            verification: Some(verification),
            pinned,
            peer_names: certificate_names(der),
            not_after: validity(der).map(|(_, a)| a),
            rejected,
        }
    }

    /// The system (and connector) roots first, then the requirement's own; when both fail,
    /// the more telling error wins (anything says more than "unknown issuer").
    fn check_chain(
        &self,
        cert: &ParsedCertificate<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let algs = self.algorithms.all;
        let first =
            verify_server_cert_signed_by_trust_anchor(cert, &self.roots, intermediates, now, algs);
        match (first, &self.extra_roots) {
            (Err(e), Some(extra)) => {
                match verify_server_cert_signed_by_trust_anchor(
                    cert,
                    extra,
                    intermediates,
                    now,
                    algs,
                ) {
                    Ok(()) => Ok(()),
                    Err(e2) if is_unknown_issuer(&e2) => Err(e),
                    Err(e2) => Err(e2),
                }
            }
            (r, _) => r,
        }
    }

    /// `None` when the certificate is valid for one of the expected names.
    fn check_name(&self, cert: &ParsedCertificate<'_>, der: &[u8]) -> Option<CertFailure> {
        if self
            .names
            .iter()
            .any(|n| verify_server_name(cert, n).is_ok())
        {
            return None;
        }
        Some(CertFailure::NameMismatch {
            expected: self.expected.clone(),
            presented: presented_names(der),
        })
    }
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let record = self.assess(end_entity, intermediates, now);
        let alert = record.rejected.as_ref().map(alert_error);
        if let Ok(mut g) = self.record.lock() {
            *g = record;
        }
        match alert {
            Some(e) => Err(e),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn is_unknown_issuer(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    )
}

/// The error the verifier returns, chosen so the server gets the matching alert.
fn alert_error(f: &CertFailure) -> rustls::Error {
    rustls::Error::InvalidCertificate(match f {
        CertFailure::Expired { .. } => CertificateError::Expired,
        CertFailure::NotYetValid { .. } => CertificateError::NotValidYet,
        CertFailure::UntrustedIssuer(_) => CertificateError::UnknownIssuer,
        CertFailure::NameMismatch { .. } => CertificateError::NotValidForName,
        CertFailure::Revoked => CertificateError::Revoked,
        CertFailure::Dane(DaneFailure::Expired { .. }) => CertificateError::Expired,
        CertFailure::Dane(DaneFailure::NotYetValid { .. }) => CertificateError::NotValidYet,
        CertFailure::Dane(DaneFailure::NameMismatch { .. }) => CertificateError::NotValidForName,
        CertFailure::PinMismatch | CertFailure::Other(_) | CertFailure::Dane(_) => {
            CertificateError::ApplicationVerificationFailure
        }
    })
}

/// The names a certificate is valid for, as name checks see them: DNS and IP subject
/// alternative names; the subject common names only when there are none (so a message can
/// still say whom the certificate was made for).
fn presented_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let mut names = Vec::new();
    if let Ok((_, cert)) = X509Certificate::from_der(der)
        && let Ok(Some(san)) = cert.subject_alternative_name()
    {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
                    Ok(v4) => names.push(std::net::Ipv4Addr::from(v4).to_string()),
                    Err(_) => {
                        if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                            names.push(std::net::Ipv6Addr::from(v6).to_string());
                        }
                    }
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names = certificate_names(der);
    }
    names
}

/// `(notBefore, notAfter)` of a certificate, Unix seconds.
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    Some((
        u64::try_from(v.not_before.timestamp()).unwrap_or(0),
        u64::try_from(v.not_after.timestamp()).unwrap_or(0),
    ))
}

/// A certificate's subject and issuer (as `CN=…, O=…`, control characters escaped), whether
/// it names itself as its issuer, and whether its basic constraints say CA:TRUE.
struct CertSummary {
    subject: String,
    issuer: String,
    self_signed: bool,
    ca: bool,
}

fn summary(der: &[u8]) -> Option<CertSummary> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let dn = |name: &X509Name<'_>| {
        let s = escape_controls(&name.to_string());
        if s.is_empty() {
            "(an empty name)".to_string()
        } else {
            s
        }
    };
    Some(CertSummary {
        subject: dn(cert.subject()),
        issuer: dn(cert.issuer()),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        ca: cert.is_ca(),
    })
}

/// Whether a certificate names itself as its issuer.
fn is_self_signed(der: &[u8]) -> bool {
    summary(der).is_some_and(|s| s.self_signed)
}

/// Text from the peer, safe for a log line, a reply or a DSN.
fn escape_controls(s: &str) -> String {
    crate::smtp::client::escape_text(s)
}

/// Why a chain does not lead to a trusted root, judged from the certificates the server sent
/// (its own first): the detail behind [`CertFailure::UntrustedIssuer`], in words that say what
/// the server must change. `moat probe` reports it; the connector's own verdict is the same
/// class whichever of these it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UntrustedChain {
    /// The server sent no certificate.
    Empty,
    /// The server's certificate is its own issuer; `ca` when it also says CA:TRUE (what
    /// `openssl req -x509` makes by default), which no verifier accepts as a server's own
    /// certificate even when it is trusted.
    SelfSigned { subject: String, ca: bool },
    /// The server sent only its own certificate, and its issuer is not a trusted root: the
    /// intermediate certificates are missing (or the CA is unknown).
    MissingIntermediate { issuer: String },
    /// The chain sent ends at a self-signed root that is not trusted.
    UntrustedRoot { root: String },
    /// The last certificate sent is issued by a CA that is neither sent nor trusted.
    UnknownIssuer { issuer: String },
    /// The server's certificate cannot be read.
    Unreadable,
}

impl UntrustedChain {
    /// Classifies the chain the server sent, its own certificate first.
    pub fn of(chain: &[CertificateDer<'_>]) -> UntrustedChain {
        let Some(first) = chain.first() else {
            return UntrustedChain::Empty;
        };
        let Some(leaf) = summary(first.as_ref()) else {
            return UntrustedChain::Unreadable;
        };
        if leaf.self_signed {
            return UntrustedChain::SelfSigned {
                subject: leaf.subject,
                ca: leaf.ca,
            };
        }
        let last = match chain.last().filter(|_| chain.len() > 1) {
            None => {
                return UntrustedChain::MissingIntermediate {
                    issuer: leaf.issuer,
                };
            }
            Some(last) => summary(last.as_ref()),
        };
        match last {
            Some(s) if s.self_signed => UntrustedChain::UntrustedRoot { root: s.subject },
            Some(s) => UntrustedChain::UnknownIssuer { issuer: s.issuer },
            None => UntrustedChain::Unreadable,
        }
    }
}

impl fmt::Display for UntrustedChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UntrustedChain::Empty => f.write_str("the server sent no certificate"),
            UntrustedChain::SelfSigned { subject, ca: false } => write!(
                f,
                "the certificate is self-signed ({subject}); the server needs a certificate \
                 from a CA that senders trust"
            ),
            UntrustedChain::SelfSigned { subject, ca: true } => write!(
                f,
                "the certificate is self-signed ({subject}) and marked as a CA certificate \
                 (CA:TRUE), which is never accepted as a server's own certificate, trusted or \
                 not; the server needs a certificate from a CA that senders trust"
            ),
            UntrustedChain::MissingIntermediate { issuer } => write!(
                f,
                "the certificate is issued by {issuer}, which is not a trusted root, and the \
                 server sends no intermediate certificates; the server must send its \
                 intermediate certificates after its own (or, if {issuer} is a private CA, use \
                 a certificate from a CA that senders trust)"
            ),
            UntrustedChain::UntrustedRoot { root } => write!(
                f,
                "the chain ends at the root {root}, which is not a trusted CA; the server needs \
                 a certificate from a CA that senders trust"
            ),
            UntrustedChain::UnknownIssuer { issuer } => write!(
                f,
                "the last certificate the server sends is issued by {issuer}, which is neither \
                 sent nor a trusted root; the server must send all its intermediate \
                 certificates, or use a certificate from a CA that senders trust"
            ),
            UntrustedChain::Unreadable => f.write_str(
                "the certificate cannot be read, so its issuer is unknown; the server needs a \
                 correctly encoded certificate from a CA that senders trust",
            ),
        }
    }
}

// What is wrong with a certificate, and what the server must do about it: the words of
// `CertFailure::Other`, one per cause, each with its own wording in logs and DSNs.
const BAD_SIGNATURE: &str = "a signature in the certificate chain does not verify (a corrupted \
    or forged certificate, or one from a different CA with the same name); the server must send \
    a chain in which each certificate is signed by the next";
const BAD_ENCODING: &str = "the certificate is malformed (its encoding is invalid); the server \
    needs a correctly encoded certificate from its CA";
const CRITICAL_EXTENSION: &str = "the certificate has a critical extension that Moat does not \
    support; the server needs a certificate without it";
const NOT_FOR_SERVERS: &str = "the certificate is not issued for TLS servers (its extended key \
    usage lacks server authentication); the server needs a certificate issued for TLS servers";
const EMPTY_EKU: &str = "the certificate's extended key usage is empty, so it is valid for no \
    purpose; the server needs a certificate issued for TLS servers";
const UNSUPPORTED_ALGORITHM: &str = "a certificate in the chain is signed with an algorithm \
    Moat does not accept (such as SHA-1 or MD5); the server needs a certificate signed with \
    RSA, ECDSA or Ed25519 and SHA-256 or better";
const ALGORITHM_KEY_MISMATCH: &str = "a certificate in the chain is signed with an algorithm \
    that does not fit its issuer's key, or with a key type Moat does not support; the server \
    needs a certificate with an RSA, ECDSA or Ed25519 key from its CA";
const REVOCATION_UNKNOWN: &str = "the certificate's revocation status cannot be determined; the \
    server's CA must publish current revocation information";
const BAD_OCSP: &str = "the server's stapled OCSP response (certificate status) is invalid; the \
    server must staple a current, valid response or none";
const REFUSED_BY_POLICY: &str = "the certificate was refused by Moat's own checks";
const CA_AS_SERVER: &str = "the server's certificate is a CA certificate (basic constraints \
    CA:TRUE), which cannot identify a server; the server needs a certificate issued to it, not \
    a CA's certificate";
const END_ENTITY_AS_CA: &str = "a certificate in the chain has issued another but is not a CA \
    certificate (basic constraints CA:FALSE or missing); the server must send its CA's real \
    intermediate certificates";
const DISTRUSTED: &str = "a certificate in the chain is explicitly distrusted; the server needs \
    a certificate from a CA that senders trust";
const NAME_CONSTRAINTS: &str = "the certificate has names its CA may not issue for (name \
    constraints); the server needs a certificate from a CA allowed to issue for its names";
const BAD_NAME_CONSTRAINT: &str = "a CA certificate in the chain has malformed name \
    constraints; the server needs a certificate from a CA with a valid chain";
const PATH_LENGTH: &str = "the chain has more intermediate CAs than a CA above them allows \
    (path length constraint); the server must send the chain its CA issued, without extra \
    intermediate certificates";
const TOO_COMPLEX: &str = "the certificate chain is too long or too complex to verify; the \
    server must send only its certificate and the intermediate certificates that lead to its \
    CA's root";
const NOT_V3: &str = "the certificate is not an X.509 version 3 certificate; the server needs \
    a current certificate from its CA";
const MALFORMED_EXTENSIONS: &str = "the certificate's extensions are malformed (for example, \
    host names outside the subject alternative name extension); the server needs a certificate \
    with valid extensions";
const BAD_EXTENSION_VALUE: &str = "a certificate extension has an invalid value; the server \
    needs a certificate with valid extensions";
const BAD_SERIAL: &str = "the certificate's serial number is invalid (negative, empty or longer \
    than 20 bytes); the server needs a new certificate from its CA";
const BAD_DNS_NAME: &str = "a host name in the certificate is malformed; the server needs a \
    certificate with valid host names";
const ALGORITHM_FIELDS_DIFFER: &str = "the certificate's two signature algorithm fields \
    disagree (a malformed or altered certificate); the server needs a new certificate from its \
    CA";
const INVALID_VALIDITY: &str = "the certificate's validity period is invalid (it ends before \
    it begins); the server needs a new certificate";
const NAME_TYPE: &str = "the certificate cannot be checked for this kind of server name";
const UNNAMED: &str = "the certificate could not be validated, for a reason Moat cannot name";

fn other(words: &str) -> CertFailure {
    CertFailure::Other(words.to_string())
}

/// Classifies a rustls/webpki certificate error; `der` is the end-entity certificate, read
/// for the dates and names when the error carries none.
fn cert_failure(e: &rustls::Error, der: &[u8]) -> CertFailure {
    match e {
        rustls::Error::InvalidCertificate(ce) => certificate_error(ce, der),
        other => CertFailure::Other(format!(
            "the certificate could not be checked: {}",
            tls_error_words(other)
        )),
    }
}

/// The rustls view of a certificate error; the webpki errors rustls does not map to a
/// variant of its own arrive wrapped in `Other` and are unwrapped here.
fn certificate_error(ce: &CertificateError, der: &[u8]) -> CertFailure {
    #[allow(deprecated)]
    match ce {
        CertificateError::ExpiredContext { not_after, .. } => CertFailure::Expired {
            not_after: not_after.as_secs(),
        },
        // rustls also says `Expired` for a validity period that ends before it begins.
        CertificateError::Expired => match validity(der) {
            Some((before, after)) if after < before => other(INVALID_VALIDITY),
            v => CertFailure::Expired {
                not_after: v.map(|(_, a)| a).unwrap_or(0),
            },
        },
        CertificateError::NotValidYetContext { not_before, .. } => CertFailure::NotYetValid {
            not_before: not_before.as_secs(),
        },
        CertificateError::NotValidYet => CertFailure::NotYetValid {
            not_before: validity(der).map(|(b, _)| b).unwrap_or(0),
        },
        CertificateError::UnknownIssuer => CertFailure::UntrustedIssuer(None),
        CertificateError::Revoked => CertFailure::Revoked,
        CertificateError::NotValidForName => CertFailure::NameMismatch {
            expected: Vec::new(),
            presented: presented_names(der),
        },
        CertificateError::NotValidForNameContext { expected, .. } => CertFailure::NameMismatch {
            expected: vec![expected.to_str().into_owned()],
            presented: presented_names(der),
        },
        CertificateError::BadSignature => other(BAD_SIGNATURE),
        CertificateError::BadEncoding => other(BAD_ENCODING),
        CertificateError::UnhandledCriticalExtension => other(CRITICAL_EXTENSION),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            other(NOT_FOR_SERVERS)
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
            other(UNSUPPORTED_ALGORITHM)
        }
        CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            other(ALGORITHM_KEY_MISMATCH)
        }
        CertificateError::UnknownRevocationStatus
        | CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => other(REVOCATION_UNKNOWN),
        CertificateError::InvalidOcspResponse => other(BAD_OCSP),
        CertificateError::ApplicationVerificationFailure => other(REFUSED_BY_POLICY),
        CertificateError::Other(rustls::OtherError(inner)) => {
            match inner.downcast_ref::<webpki::Error>() {
                Some(w) => webpki_error(w, der),
                None => other(UNNAMED),
            }
        }
        unknown => CertFailure::Other(unnamed(&format!("{unknown:?}"))),
    }
}

/// A webpki error, in the same classes and words as the rustls ones it may stand for.
fn webpki_error(w: &webpki::Error, der: &[u8]) -> CertFailure {
    use webpki::Error as W;
    #[allow(deprecated)]
    match w {
        // `openssl req -x509` makes CA:TRUE certificates: self-signed, it is the same case as
        // any other self-signed certificate, and the fix is the same.
        W::CaUsedAsEndEntity if is_self_signed(der) => CertFailure::UntrustedIssuer(None),
        W::CaUsedAsEndEntity => other(CA_AS_SERVER),
        W::EndEntityUsedAsCa => other(END_ENTITY_AS_CA),
        W::CertDistrusted => other(DISTRUSTED),
        W::NameConstraintViolation => other(NAME_CONSTRAINTS),
        W::MalformedNameConstraint | W::InvalidNetworkMaskConstraint => other(BAD_NAME_CONSTRAINT),
        W::PathLenConstraintViolated => other(PATH_LENGTH),
        W::MaximumPathDepthExceeded
        | W::MaximumPathBuildCallsExceeded
        | W::MaximumSignatureChecksExceeded
        | W::MaximumNameConstraintComparisonsExceeded => other(TOO_COMPLEX),
        W::UnsupportedCertVersion => other(NOT_V3),
        W::UnsupportedCriticalExtension => other(CRITICAL_EXTENSION),
        W::MalformedExtensions => other(MALFORMED_EXTENSIONS),
        W::ExtensionValueInvalid => other(BAD_EXTENSION_VALUE),
        W::EmptyEkuExtension => other(EMPTY_EKU),
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => other(NOT_FOR_SERVERS),
        W::InvalidSerialNumber => other(BAD_SERIAL),
        W::MalformedDnsIdentifier => other(BAD_DNS_NAME),
        W::SignatureAlgorithmMismatch => other(ALGORITHM_FIELDS_DIFFER),
        W::BadDer | W::BadDerTime | W::TrailingData(_) => other(BAD_ENCODING),
        W::CertExpired { not_after, .. } => CertFailure::Expired {
            not_after: not_after.as_secs(),
        },
        W::CertNotValidYet { not_before, .. } => CertFailure::NotYetValid {
            not_before: not_before.as_secs(),
        },
        W::InvalidCertValidity => other(INVALID_VALIDITY),
        W::UnknownIssuer => CertFailure::UntrustedIssuer(None),
        W::CertNotValidForName(cx) => CertFailure::NameMismatch {
            expected: vec![cx.expected.to_str().into_owned()],
            presented: presented_names(der),
        },
        W::CertRevoked => CertFailure::Revoked,
        W::InvalidSignatureForPublicKey => other(BAD_SIGNATURE),
        W::UnsupportedSignatureAlgorithm | W::UnsupportedSignatureAlgorithmContext(_) => {
            other(UNSUPPORTED_ALGORITHM)
        }
        W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => other(ALGORITHM_KEY_MISMATCH),
        // Revocation lists: Moat fetches none, so these mean the status is unknown.
        W::UnknownRevocationStatus
        | W::CrlExpired { .. }
        | W::IssuerNotCrlSigner
        | W::InvalidCrlNumber
        | W::InvalidCrlSignatureForPublicKey
        | W::UnsupportedCrlIssuingDistributionPoint
        | W::UnsupportedCrlVersion
        | W::UnsupportedDeltaCrl
        | W::UnsupportedIndirectCrl
        | W::UnsupportedRevocationReason
        | W::UnsupportedRevocationReasonsPartitioning
        | W::UnsupportedCrlSignatureAlgorithm
        | W::UnsupportedCrlSignatureAlgorithmContext(_)
        | W::UnsupportedCrlSignatureAlgorithmForPublicKey
        | W::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_) => other(REVOCATION_UNKNOWN),
        W::UnsupportedNameType => other(NAME_TYPE),
        unknown => CertFailure::Other(unnamed(&format!("{unknown:?}"))),
    }
}

/// The catch-all sentence for an error a later library version may add: the error's name in
/// words when it is a bare name (`SomeNewError` → "some new error"), nothing otherwise.
fn unnamed(name: &str) -> String {
    match ident_words(name) {
        Some(words) => format!("the certificate could not be validated (webpki: {words})"),
        None => UNNAMED.to_string(),
    }
}

/// `SelectedUnofferedCipherSuite` → `selected unoffered cipher suite`, `UnknownCA` → `unknown
/// CA`; `None` unless `ident` is a bare identifier (letters and digits only).
fn ident_words(ident: &str) -> Option<String> {
    if ident.is_empty() || !ident.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let b = ident.as_bytes();
    let word = |w: &str| {
        if w.len() > 1 && w.bytes().all(|c| !c.is_ascii_lowercase()) {
            w.to_string()
        } else {
            w.to_ascii_lowercase()
        }
    };
    let mut words = Vec::new();
    let mut start = 0;
    for (i, pair) in b.windows(2).enumerate() {
        let (prev, cur) = (pair[0], pair[1]);
        let next_lower = b.get(i + 2).is_some_and(u8::is_ascii_lowercase);
        let boundary = cur.is_ascii_uppercase()
            && (prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower));
        if boundary {
            words.push(word(ident.get(start..=i)?));
            start = i + 1;
        }
    }
    words.push(word(ident.get(start..)?));
    Some(words.join(" "))
}

/// The name of a TLS alert, in the RFCs' words (`handshake_failure` → "handshake failure").
fn alert_name(a: rustls::AlertDescription) -> Option<&'static str> {
    use rustls::AlertDescription as A;
    Some(match a {
        A::CloseNotify => "close notify",
        A::UnexpectedMessage => "unexpected message",
        A::BadRecordMac => "bad record MAC",
        A::DecryptionFailed => "decryption failed",
        A::RecordOverflow => "record overflow",
        A::DecompressionFailure => "decompression failure",
        A::HandshakeFailure => "handshake failure",
        A::NoCertificate => "no certificate",
        A::BadCertificate => "bad certificate",
        A::UnsupportedCertificate => "unsupported certificate",
        A::CertificateRevoked => "certificate revoked",
        A::CertificateExpired => "certificate expired",
        A::CertificateUnknown => "certificate unknown",
        A::IllegalParameter => "illegal parameter",
        A::UnknownCA => "unknown CA",
        A::AccessDenied => "access denied",
        A::DecodeError => "decode error",
        A::DecryptError => "decrypt error",
        A::ExportRestriction => "export restriction",
        A::ProtocolVersion => "protocol version",
        A::InsufficientSecurity => "insufficient security",
        A::InternalError => "internal error",
        A::InappropriateFallback => "inappropriate fallback",
        A::UserCanceled => "user canceled",
        A::NoRenegotiation => "no renegotiation",
        A::MissingExtension => "missing extension",
        A::UnsupportedExtension => "unsupported extension",
        A::CertificateUnobtainable => "certificate unobtainable",
        A::UnrecognisedName => "unrecognized name",
        A::BadCertificateStatusResponse => "bad certificate status response",
        A::BadCertificateHashValue => "bad certificate hash value",
        A::UnknownPSKIdentity => "unknown PSK identity",
        A::CertificateRequired => "certificate required",
        A::NoApplicationProtocol => "no application protocol",
        A::EncryptedClientHelloRequired => "encrypted client hello required",
        _ => return None,
    })
}

/// "TLS alert 40 (handshake failure)".
fn alert_words(a: rustls::AlertDescription) -> String {
    let n = u8::from(a);
    match alert_name(a) {
        Some(name) => format!("TLS alert {n} ({name})"),
        None => format!("TLS alert number {n} (not a standard alert)"),
    }
}

/// A TLS protocol enum's name in words (`ServerHello` → "server hello").
fn enum_words(name: Option<&str>) -> String {
    name.and_then(ident_words)
        .unwrap_or_else(|| "unknown".to_string())
}

/// What a server that is not compatible with our TLS settings lacks.
fn incompatible_words(p: &rustls::PeerIncompatible) -> String {
    use rustls::PeerIncompatible as P;
    match p {
        P::ServerDoesNotSupportTls12Or13 => {
            "the server supports neither TLS 1.3 nor TLS 1.2".into()
        }
        P::ServerTlsVersionIsDisabledByOurConfig
        | P::Tls12NotOffered
        | P::Tls12NotOfferedOrEnabled => {
            "the server chose a TLS version Moat did not offer (only TLS 1.3 and 1.2 are)".into()
        }
        P::NoCipherSuitesInCommon => "no cipher suite in common with the server".into(),
        P::NoKxGroupsInCommon => "no key exchange group in common with the server".into(),
        P::NoSignatureSchemesInCommon => "no signature algorithm in common with the server".into(),
        P::NoEcPointFormatsInCommon
        | P::UncompressedEcPointsRequired
        | P::EcPointsExtensionRequired => {
            "no elliptic curve point format in common with the server".into()
        }
        P::ExtendedMasterSecretExtensionRequired => "the server does not support the extended \
            master secret (RFC 7627) that Moat requires for TLS 1.2"
            .into(),
        other => match ident_words(&format!("{other:?}")) {
            Some(words) => format!("the server's TLS is incompatible with Moat's ({words})"),
            None => "the server's TLS is incompatible with Moat's".into(),
        },
    }
}

/// A malformed message from the server; most often the answer of a server that does not
/// speak TLS at all (plaintext SMTP where a handshake was expected).
fn invalid_message_words(m: &rustls::InvalidMessage) -> String {
    use rustls::InvalidMessage as M;
    match m {
        M::InvalidContentType | M::UnknownProtocolVersion => {
            "the server does not speak TLS here (what it sent is not a TLS record)".into()
        }
        M::CertificatePayloadTooLarge => {
            "the server's certificate chain is larger than TLS allows (65536 bytes)".into()
        }
        M::HandshakePayloadTooLarge | M::MessageTooLarge => {
            "the server sent a TLS message larger than TLS allows".into()
        }
        other => match ident_words(&format!("{other:?}")) {
            Some(words) => format!("the server sent a malformed TLS message ({words})"),
            None => "the server sent a malformed TLS message".into(),
        },
    }
}

/// A certificate error raised by the handshake itself (not by our verifier): the server's
/// signature with the certificate's key.
fn handshake_certificate_words(c: &CertificateError) -> String {
    #[allow(deprecated)]
    match c {
        CertificateError::BadSignature => "the server's handshake signature does not verify \
            with the key in its certificate (the certificate and the private key do not match?)"
            .into(),
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "the server signed the handshake with an algorithm Moat does not accept".into()
        }
        other => format!(
            "the server's certificate is unusable: {}",
            certificate_error(other, &[])
        ),
    }
}

/// Plain words for a rustls error.
fn tls_error_words(err: &rustls::Error) -> String {
    use rustls::Error as E;
    match err {
        E::AlertReceived(alert) => {
            format!(
                "the server ended the handshake with {}",
                alert_words(*alert)
            )
        }
        E::InvalidMessage(m) => invalid_message_words(m),
        E::InappropriateMessage { got_type, .. } => format!(
            "the server broke the TLS protocol (an unexpected {} message)",
            enum_words(got_type.as_str())
        ),
        E::InappropriateHandshakeMessage { got_type, .. } => format!(
            "the server broke the TLS protocol (an unexpected {} handshake message)",
            enum_words(got_type.as_str())
        ),
        E::PeerIncompatible(p) => incompatible_words(p),
        E::PeerMisbehaved(p) => match ident_words(&format!("{p:?}")) {
            Some(words) => format!("the server broke the TLS protocol ({words})"),
            None => "the server broke the TLS protocol".into(),
        },
        E::InvalidCertificate(c) => handshake_certificate_words(c),
        E::NoCertificatesPresented => "the server sent no certificate".into(),
        E::DecryptError => "a TLS record from the server could not be decrypted (corrupted on \
            the way, or a broken TLS implementation)"
            .into(),
        E::PeerSentOversizedRecord => "the server sent a TLS record larger than TLS allows".into(),
        E::InvalidCertRevocationList(_) => "a certificate revocation list is unusable".into(),
        E::InvalidEncryptedClientHello(_) => "encrypted client hello (ECH) failed".into(),
        E::UnsupportedNameType => "the server name is of a kind TLS cannot check".into(),
        E::EncryptError => "a TLS record could not be encrypted".into(),
        E::FailedToGetCurrentTime => "the current time is not available on this host".into(),
        E::FailedToGetRandomBytes => "random numbers are not available on this host".into(),
        E::HandshakeNotComplete => "the handshake did not complete".into(),
        E::NoApplicationProtocol => {
            "no application protocol (ALPN) in common with the server".into()
        }
        E::BadMaxFragmentSize => "the TLS fragment size is misconfigured".into(),
        E::InconsistentKeys(_) => "a certificate and its private key do not match".into(),
        E::General(s) => format!("TLS error: {}", escape_controls(s)),
        E::Other(o) => match o.0.downcast_ref::<webpki::Error>() {
            Some(w) => webpki_error(w, &[]).to_string(),
            None => "the TLS library failed for a reason Moat cannot name".into(),
        },
        _ => "the TLS handshake failed for a reason Moat cannot name".into(),
    }
}

/// Plain words for an error from the handshake itself (not our certificate policy).
fn describe_io_error(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(err) => tls_error_words(err),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the server closed the connection during the handshake".into()
        }
        None => format!("connection error during the handshake: {e}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose,
        GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
    };

    const UNTRUSTED: &str =
        "the certificate chain does not lead to a trusted root (untrusted issuer)";

    /// A webpki error as rustls hands it on when it has no variant of its own for it.
    fn wrapped(e: webpki::Error) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }

    fn cert(e: CertificateError) -> rustls::Error {
        rustls::Error::InvalidCertificate(e)
    }

    fn words(e: &rustls::Error) -> String {
        cert_failure(e, &[]).to_string()
    }

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca_params(name: &str, ca: IsCa) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = ca;
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p
    }

    /// A CA (or, with `ca: IsCa::ExplicitNoCa`, a certificate posing as one) signed by
    /// `parent`, or self-signed.
    fn make_ca(p: CertificateParams, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = match parent {
            Some(parent) => p.signed_by(&key, &parent.issuer).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn root(name: &str) -> Ca {
        make_ca(
            ca_params(name, IsCa::Ca(BasicConstraints::Unconstrained)),
            None,
        )
    }

    fn leaf_params(name: &str) -> CertificateParams {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p
    }

    fn leaf(p: CertificateParams, ca: &Ca) -> CertificateDer<'static> {
        p.signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap()
            .der()
            .clone()
    }

    /// A self-signed certificate for `name`, CA:TRUE when `ca` (as `openssl req -x509`); the
    /// probe's tests use it too.
    pub(crate) fn self_signed(name: &str, ca: bool) -> CertificateDer<'static> {
        let mut p = leaf_params(name);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    /// What a `verify` connector trusting `roots` concludes about `chain` for mx.test.
    fn verdict(
        roots: &[&CertificateDer<'static>],
        chain: &[CertificateDer<'static>],
    ) -> Verification {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add((*r).clone()).unwrap();
        }
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let v = PolicyVerifier {
            roots: Arc::new(store),
            extra_roots: None,
            names: vec![ServerName::try_from("mx.test").unwrap()],
            expected: vec!["mx.test".into()],
            level: TlsLevel::Verify,
            pins: Vec::new(),
            dane: None,
            algorithms: provider.signature_verification_algorithms,
            record: Arc::default(),
        };
        // The chain's detail is checked on its own (`untrusted_issuer_says_why`).
        match v
            .assess(&chain[0], &chain[1..], UnixTime::now())
            .verification
            .unwrap()
        {
            Verification::Untrusted(CertFailure::UntrustedIssuer(Some(_))) => {
                Verification::Untrusted(CertFailure::UntrustedIssuer(None))
            }
            other => other,
        }
    }

    fn untrusted(words: &str) -> Verification {
        Verification::Untrusted(CertFailure::Other(words.into()))
    }

    #[test]
    fn self_signed_ca_true_is_an_untrusted_issuer() {
        // `openssl req -x509` by default: CA:TRUE. webpki says "CA used as end entity".
        let der = self_signed("mx.test", true);
        let f = cert_failure(&wrapped(webpki::Error::CaUsedAsEndEntity), &der);
        assert_eq!(f, CertFailure::UntrustedIssuer(None));
        assert_eq!(f.to_string(), UNTRUSTED);
        // The same from a real check, trusted or not.
        let expect = Verification::Untrusted(CertFailure::UntrustedIssuer(None));
        assert_eq!(verdict(&[], std::slice::from_ref(&der)), expect);
        assert_eq!(verdict(&[&der], std::slice::from_ref(&der)), expect);
        assert_eq!(
            UntrustedChain::of(&[der]).to_string(),
            "the certificate is self-signed (CN=mx.test) and marked as a CA certificate \
             (CA:TRUE), which is never accepted as a server's own certificate, trusted or not; \
             the server needs a certificate from a CA that senders trust"
        );
    }

    #[test]
    fn sha256_known_answer() {
        let d = sha256(b"abc");
        assert_eq!(d[..8], [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea]);
        assert_ne!(sha256(b""), [0u8; 32]);
    }

    #[test]
    fn untrusted_issuer_says_why() {
        // The verifier's own verdict (what the queue, log and DSN print) carries the chain's
        // detail in probe's words.
        let der = self_signed("mx.test", true);
        let mut store = RootCertStore::empty();
        store.add(der.clone()).unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let v = PolicyVerifier {
            roots: Arc::new(RootCertStore::empty()),
            extra_roots: None,
            names: vec![ServerName::try_from("mx.test").unwrap()],
            expected: vec!["mx.test".into()],
            level: TlsLevel::Verify,
            pins: Vec::new(),
            dane: None,
            algorithms: provider.signature_verification_algorithms,
            record: Arc::default(),
        };
        let r = v.assess(&der, &[], UnixTime::now());
        let f = r.rejected.unwrap();
        assert_eq!(
            f.to_string(),
            "the certificate chain does not lead to a trusted root (untrusted issuer): the \
             certificate is self-signed (CN=mx.test) and marked as a CA certificate (CA:TRUE), \
             which is never accepted as a server's own certificate, trusted or not; the server \
             needs a certificate from a CA that senders trust"
        );
    }

    #[test]
    fn self_signed_ca_false_is_an_untrusted_issuer() {
        let der = self_signed("mx.test", false);
        assert_eq!(
            verdict(&[], std::slice::from_ref(&der)),
            Verification::Untrusted(CertFailure::UntrustedIssuer(None))
        );
        assert_eq!(
            UntrustedChain::of(std::slice::from_ref(&der)),
            UntrustedChain::SelfSigned {
                subject: "CN=mx.test".into(),
                ca: false
            }
        );
        assert_eq!(
            UntrustedChain::of(&[der]).to_string(),
            "the certificate is self-signed (CN=mx.test); the server needs a certificate from \
             a CA that senders trust"
        );
    }

    #[test]
    fn ca_certificate_as_the_server_certificate() {
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = leaf(p, &r);
        let want = "the server's certificate is a CA certificate (basic constraints CA:TRUE), \
                    which cannot identify a server; the server needs a certificate issued to \
                    it, not a CA's certificate";
        assert_eq!(
            verdict(&[&r.der], std::slice::from_ref(&der)),
            untrusted(want)
        );
        assert_eq!(
            cert_failure(&wrapped(webpki::Error::CaUsedAsEndEntity), &der).to_string(),
            want
        );
        // Without the certificate at hand it is not known to be self-signed.
        assert_eq!(words(&wrapped(webpki::Error::CaUsedAsEndEntity)), want);
    }

    #[test]
    fn unknown_issuer() {
        for e in [
            cert(CertificateError::UnknownIssuer),
            wrapped(webpki::Error::UnknownIssuer),
        ] {
            assert_eq!(cert_failure(&e, &[]), CertFailure::UntrustedIssuer(None));
            assert_eq!(words(&e), UNTRUSTED);
        }
        let r = root("Words Root");
        let stranger = root("Stranger Root");
        assert_eq!(
            verdict(&[&r.der], &[leaf(leaf_params("mx.test"), &stranger)]),
            Verification::Untrusted(CertFailure::UntrustedIssuer(None))
        );
    }

    #[test]
    fn missing_intermediate() {
        let r = root("Words Root");
        let inter = make_ca(
            ca_params(
                "Words Intermediate",
                IsCa::Ca(BasicConstraints::Unconstrained),
            ),
            Some(&r),
        );
        let der = leaf(leaf_params("mx.test"), &inter);
        assert_eq!(
            verdict(&[&r.der], &[der.clone(), inter.der.clone()]),
            Verification::Verified
        );
        // The server sends only its own certificate.
        let alone = [der];
        assert_eq!(
            verdict(&[&r.der], &alone),
            Verification::Untrusted(CertFailure::UntrustedIssuer(None))
        );
        assert_eq!(
            UntrustedChain::of(&alone),
            UntrustedChain::MissingIntermediate {
                issuer: "CN=Words Intermediate".into()
            }
        );
        assert_eq!(
            UntrustedChain::of(&alone).to_string(),
            "the certificate is issued by CN=Words Intermediate, which is not a trusted root, \
             and the server sends no intermediate certificates; the server must send its \
             intermediate certificates after its own (or, if CN=Words Intermediate is a \
             private CA, use a certificate from a CA that senders trust)"
        );
    }

    #[test]
    fn untrusted_root_and_unknown_issuer_chains() {
        let r = root("Words Root");
        let inter = make_ca(
            ca_params(
                "Words Intermediate",
                IsCa::Ca(BasicConstraints::Unconstrained),
            ),
            Some(&r),
        );
        let der = leaf(leaf_params("mx.test"), &inter);
        let full = [der.clone(), inter.der.clone(), r.der.clone()];
        assert_eq!(
            verdict(&[], &full),
            Verification::Untrusted(CertFailure::UntrustedIssuer(None))
        );
        assert_eq!(
            UntrustedChain::of(&full).to_string(),
            "the chain ends at the root CN=Words Root, which is not a trusted CA; the server \
             needs a certificate from a CA that senders trust"
        );
        assert_eq!(
            UntrustedChain::of(&[der.clone(), inter.der.clone()]).to_string(),
            "the last certificate the server sends is issued by CN=Words Root, which is \
             neither sent nor a trusted root; the server must send all its intermediate \
             certificates, or use a certificate from a CA that senders trust"
        );
        assert_eq!(
            UntrustedChain::of(&[]).to_string(),
            "the server sent no certificate"
        );
        assert_eq!(
            UntrustedChain::of(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]).to_string(),
            "the certificate cannot be read, so its issuer is unknown; the server needs a \
             correctly encoded certificate from a CA that senders trust"
        );
    }

    #[test]
    fn names_from_the_peer_are_escaped() {
        let der = self_signed("evil\r\nX-Injected: 1", false);
        let w = UntrustedChain::of(&[der]).to_string();
        assert!(w.contains("CN=evil\\r\\nX-Injected: 1"), "{w}");
        assert!(!w.contains('\n') && !w.contains('\r'), "{w}");
    }

    #[test]
    fn expired() {
        let want = "the certificate expired on Mon, 1 Jan 2001 00:00:00 +0000";
        let e = cert(CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(1_000_000_000)),
            not_after: UnixTime::since_unix_epoch(Duration::from_secs(978_307_200)),
        });
        assert_eq!(words(&e), want);
        let e = wrapped(webpki::Error::CertExpired {
            time: UnixTime::since_unix_epoch(Duration::from_secs(1_000_000_000)),
            not_after: UnixTime::since_unix_epoch(Duration::from_secs(978_307_200)),
        });
        assert_eq!(words(&e), want);
        // Without the date in the error, it is read from the certificate.
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let der = leaf(p, &r);
        assert_eq!(
            cert_failure(&cert(CertificateError::Expired), &der).to_string(),
            want
        );
        assert_eq!(
            verdict(&[&r.der], &[der]),
            Verification::Untrusted(CertFailure::Expired {
                not_after: 978_307_200
            })
        );
    }

    #[test]
    fn validity_ending_before_it_begins() {
        let want = "the certificate's validity period is invalid (it ends before it begins); \
                    the server needs a new certificate";
        assert_eq!(words(&wrapped(webpki::Error::InvalidCertValidity)), want);
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        p.not_before = rcgen::date_time_ymd(2001, 1, 1);
        p.not_after = rcgen::date_time_ymd(2000, 1, 1);
        let der = leaf(p, &r);
        assert_eq!(
            cert_failure(&cert(CertificateError::Expired), &der).to_string(),
            want
        );
    }

    #[test]
    fn not_yet_valid() {
        let want = "the certificate is not valid until Sun, 1 Jan 2090 00:00:00 +0000 (check \
                    the clocks on both sides)";
        let e = cert(CertificateError::NotValidYetContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(1_000_000_000)),
            not_before: UnixTime::since_unix_epoch(Duration::from_secs(3_786_912_000)),
        });
        assert_eq!(words(&e), want);
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
        let der = leaf(p, &r);
        assert_eq!(
            cert_failure(&cert(CertificateError::NotValidYet), &der).to_string(),
            want
        );
        assert_eq!(
            cert_failure(
                &wrapped(webpki::Error::CertNotValidYet {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(1)),
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(3_786_912_000)),
                }),
                &der
            )
            .to_string(),
            want
        );
    }

    #[test]
    fn wrong_name() {
        let r = root("Words Root");
        let der = leaf(leaf_params("other.test"), &r);
        let e = cert(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("mx.test").unwrap(),
            presented: vec!["other.test".into()],
        });
        assert_eq!(
            cert_failure(&e, &der).to_string(),
            "the certificate is issued to other.test, not mx.test"
        );
        assert_eq!(
            cert_failure(&cert(CertificateError::NotValidForName), &der).to_string(),
            "the certificate is issued to other.test, not to the name asked for"
        );
    }

    #[test]
    fn bad_signature() {
        let want = "a signature in the certificate chain does not verify (a corrupted or forged \
                    certificate, or one from a different CA with the same name); the server \
                    must send a chain in which each certificate is signed by the next";
        assert_eq!(words(&cert(CertificateError::BadSignature)), want);
        assert_eq!(
            words(&wrapped(webpki::Error::InvalidSignatureForPublicKey)),
            want
        );
        // A CA with the name of a trusted one, but another key.
        let r = root("Words Root");
        let twin = root("Words Root");
        assert_eq!(
            verdict(&[&r.der], &[leaf(leaf_params("mx.test"), &twin)]),
            untrusted(want)
        );
    }

    #[test]
    fn unsupported_signature_algorithm() {
        let want = "a certificate in the chain is signed with an algorithm Moat does not accept \
                    (such as SHA-1 or MD5); the server needs a certificate signed with RSA, \
                    ECDSA or Ed25519 and SHA-256 or better";
        #[allow(deprecated)]
        let plain = cert(CertificateError::UnsupportedSignatureAlgorithm);
        assert_eq!(words(&plain), want);
        let e = cert(CertificateError::UnsupportedSignatureAlgorithmContext {
            signature_algorithm_id: vec![6, 1, 0],
            supported_algorithms: Vec::new(),
        });
        assert_eq!(words(&e), want);
        #[allow(deprecated)]
        let w = wrapped(webpki::Error::UnsupportedSignatureAlgorithm);
        assert_eq!(words(&w), want);
    }

    #[test]
    fn signature_algorithm_not_for_the_key() {
        let want = "a certificate in the chain is signed with an algorithm that does not fit its \
                    issuer's key, or with a key type Moat does not support; the server needs a \
                    certificate with an RSA, ECDSA or Ed25519 key from its CA";
        let e = cert(
            CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                signature_algorithm_id: vec![6, 1, 0],
                public_key_algorithm_id: vec![6, 1, 1],
            },
        );
        assert_eq!(words(&e), want);
        #[allow(deprecated)]
        let w = wrapped(webpki::Error::UnsupportedSignatureAlgorithmForPublicKey);
        assert_eq!(words(&w), want);
    }

    #[test]
    fn bad_encoding() {
        let want = "the certificate is malformed (its encoding is invalid); the server needs a \
                    correctly encoded certificate from its CA";
        assert_eq!(words(&cert(CertificateError::BadEncoding)), want);
        assert_eq!(words(&wrapped(webpki::Error::BadDer)), want);
        assert_eq!(words(&wrapped(webpki::Error::BadDerTime)), want);
        let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        assert_eq!(verdict(&[], &[garbage]), untrusted(want));
    }

    #[test]
    fn revoked() {
        let want = "the certificate has been revoked by its CA; the server needs a new \
                    certificate";
        assert_eq!(words(&cert(CertificateError::Revoked)), want);
        assert_eq!(words(&wrapped(webpki::Error::CertRevoked)), want);
    }

    #[test]
    fn wrong_key_usage() {
        let want = "the certificate is not issued for TLS servers (its extended key usage lacks \
                    server authentication); the server needs a certificate issued for TLS \
                    servers";
        assert_eq!(words(&cert(CertificateError::InvalidPurpose)), want);
        let e = cert(CertificateError::InvalidPurposeContext {
            required: rustls::ExtendedKeyPurpose::ServerAuth,
            presented: vec![rustls::ExtendedKeyPurpose::ClientAuth],
        });
        assert_eq!(words(&e), want);
        #[allow(deprecated)]
        let w = wrapped(webpki::Error::RequiredEkuNotFound);
        assert_eq!(words(&w), want);
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        assert_eq!(verdict(&[&r.der], &[leaf(p, &r)]), untrusted(want));
        assert_eq!(
            words(&wrapped(webpki::Error::EmptyEkuExtension)),
            "the certificate's extended key usage is empty, so it is valid for no purpose; the \
             server needs a certificate issued for TLS servers"
        );
    }

    #[test]
    fn name_constraints() {
        let want = "the certificate has names its CA may not issue for (name constraints); the \
                    server needs a certificate from a CA allowed to issue for its names";
        assert_eq!(
            words(&wrapped(webpki::Error::NameConstraintViolation)),
            want
        );
        let r = root("Words Root");
        let mut p = ca_params(
            "Words Constrained",
            IsCa::Ca(BasicConstraints::Unconstrained),
        );
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("allowed.test".into())],
            excluded_subtrees: Vec::new(),
        });
        let inter = make_ca(p, Some(&r));
        let der = leaf(leaf_params("mx.test"), &inter);
        assert_eq!(verdict(&[&r.der], &[der, inter.der]), untrusted(want));
        assert_eq!(
            words(&wrapped(webpki::Error::MalformedNameConstraint)),
            "a CA certificate in the chain has malformed name constraints; the server needs a \
             certificate from a CA with a valid chain"
        );
    }

    #[test]
    fn path_length() {
        let want = "the chain has more intermediate CAs than a CA above them allows (path \
                    length constraint); the server must send the chain its CA issued, without \
                    extra intermediate certificates";
        assert_eq!(
            words(&wrapped(webpki::Error::PathLenConstraintViolated)),
            want
        );
        let r = root("Words Root");
        let first = make_ca(
            ca_params("Words First", IsCa::Ca(BasicConstraints::Constrained(0))),
            Some(&r),
        );
        let second = make_ca(
            ca_params("Words Second", IsCa::Ca(BasicConstraints::Unconstrained)),
            Some(&first),
        );
        let der = leaf(leaf_params("mx.test"), &second);
        assert_eq!(
            verdict(&[&r.der], &[der, second.der, first.der]),
            untrusted(want)
        );
    }

    #[test]
    fn distrusted() {
        assert_eq!(
            words(&wrapped(webpki::Error::CertDistrusted)),
            "a certificate in the chain is explicitly distrusted; the server needs a \
             certificate from a CA that senders trust"
        );
    }

    #[test]
    fn end_entity_certificate_as_a_ca() {
        let want = "a certificate in the chain has issued another but is not a CA certificate \
                    (basic constraints CA:FALSE or missing); the server must send its CA's real \
                    intermediate certificates";
        assert_eq!(words(&wrapped(webpki::Error::EndEntityUsedAsCa)), want);
        let r = root("Words Root");
        let fake = make_ca(ca_params("Words Not A CA", IsCa::ExplicitNoCa), Some(&r));
        let der = leaf(leaf_params("mx.test"), &fake);
        assert_eq!(verdict(&[&r.der], &[der, fake.der]), untrusted(want));
    }

    #[test]
    fn chain_too_long_or_complex() {
        let want = "the certificate chain is too long or too complex to verify; the server must \
                    send only its certificate and the intermediate certificates that lead to \
                    its CA's root";
        for e in [
            webpki::Error::MaximumPathDepthExceeded,
            webpki::Error::MaximumPathBuildCallsExceeded,
            webpki::Error::MaximumSignatureChecksExceeded,
            webpki::Error::MaximumNameConstraintComparisonsExceeded,
        ] {
            assert_eq!(words(&wrapped(e)), want);
        }
    }

    #[test]
    fn not_version_3() {
        assert_eq!(
            words(&wrapped(webpki::Error::UnsupportedCertVersion)),
            "the certificate is not an X.509 version 3 certificate; the server needs a current \
             certificate from its CA"
        );
    }

    #[test]
    fn unsupported_critical_extension() {
        let want = "the certificate has a critical extension that Moat does not support; the \
                    server needs a certificate without it";
        assert_eq!(
            words(&cert(CertificateError::UnhandledCriticalExtension)),
            want
        );
        assert_eq!(
            words(&wrapped(webpki::Error::UnsupportedCriticalExtension)),
            want
        );
        let r = root("Words Root");
        let mut p = leaf_params("mx.test");
        let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        ext.set_criticality(true);
        p.custom_extensions = vec![ext];
        assert_eq!(verdict(&[&r.der], &[leaf(p, &r)]), untrusted(want));
    }

    #[test]
    fn malformed_extensions() {
        assert_eq!(
            words(&wrapped(webpki::Error::MalformedExtensions)),
            "the certificate's extensions are malformed (for example, host names outside the \
             subject alternative name extension); the server needs a certificate with valid \
             extensions"
        );
        assert_eq!(
            words(&wrapped(webpki::Error::ExtensionValueInvalid)),
            "a certificate extension has an invalid value; the server needs a certificate with \
             valid extensions"
        );
        assert_eq!(
            words(&wrapped(webpki::Error::InvalidSerialNumber)),
            "the certificate's serial number is invalid (negative, empty or longer than 20 \
             bytes); the server needs a new certificate from its CA"
        );
        assert_eq!(
            words(&wrapped(webpki::Error::MalformedDnsIdentifier)),
            "a host name in the certificate is malformed; the server needs a certificate with \
             valid host names"
        );
        assert_eq!(
            words(&wrapped(webpki::Error::SignatureAlgorithmMismatch)),
            "the certificate's two signature algorithm fields disagree (a malformed or altered \
             certificate); the server needs a new certificate from its CA"
        );
    }

    #[test]
    fn revocation_status_unknown() {
        let want = "the certificate's revocation status cannot be determined; the server's CA \
                    must publish current revocation information";
        assert_eq!(
            words(&cert(CertificateError::UnknownRevocationStatus)),
            want
        );
        assert_eq!(words(&cert(CertificateError::ExpiredRevocationList)), want);
        assert_eq!(
            words(&wrapped(webpki::Error::UnknownRevocationStatus)),
            want
        );
        assert_eq!(words(&wrapped(webpki::Error::UnsupportedDeltaCrl)), want);
    }

    #[test]
    fn ocsp_and_own_checks() {
        assert_eq!(
            words(&cert(CertificateError::InvalidOcspResponse)),
            "the server's stapled OCSP response (certificate status) is invalid; the server \
             must staple a current, valid response or none"
        );
        assert_eq!(
            words(&cert(CertificateError::ApplicationVerificationFailure)),
            "the certificate was refused by Moat's own checks"
        );
    }

    #[test]
    fn catch_alls_are_sentences() {
        let foreign = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(std::io::Error::other("CustomThing { x: 1 }"))),
        ));
        assert_eq!(
            words(&foreign),
            "the certificate could not be validated, for a reason Moat cannot name"
        );
        assert_eq!(
            words(&rustls::Error::General("no\nluck".into())),
            "the certificate could not be checked: TLS error: no\\nluck"
        );
        assert_eq!(
            words(&rustls::Error::NoCertificatesPresented),
            "the certificate could not be checked: the server sent no certificate"
        );
        assert_eq!(
            unnamed("SomeNewError"),
            "the certificate could not be validated (webpki: some new error)"
        );
        assert_eq!(
            unnamed("SomeNewError(3)"),
            "the certificate could not be validated, for a reason Moat cannot name"
        );
        assert_eq!(
            ident_words("SelectedUnofferedCipherSuite").as_deref(),
            Some("selected unoffered cipher suite")
        );
        assert_eq!(ident_words("UnknownCA").as_deref(), Some("unknown CA"));
        assert_eq!(ident_words("ServerHello").as_deref(), Some("server hello"));
        assert_eq!(ident_words("A").as_deref(), Some("a"));
        assert_eq!(ident_words("Bad(1)"), None);
        assert_eq!(ident_words(""), None);
    }

    fn io(e: rustls::Error) -> String {
        describe_io_error(&std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn handshake_errors_in_plain_words() {
        use rustls::AlertDescription as A;
        assert_eq!(
            io(rustls::Error::AlertReceived(A::HandshakeFailure)),
            "the server ended the handshake with TLS alert 40 (handshake failure)"
        );
        assert_eq!(
            io(rustls::Error::AlertReceived(A::ProtocolVersion)),
            "the server ended the handshake with TLS alert 70 (protocol version)"
        );
        assert_eq!(
            io(rustls::Error::AlertReceived(A::UnknownCA)),
            "the server ended the handshake with TLS alert 48 (unknown CA)"
        );
        assert_eq!(
            io(rustls::Error::AlertReceived(A::from(200))),
            "the server ended the handshake with TLS alert number 200 (not a standard alert)"
        );
        assert_eq!(
            io(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            )),
            "the server does not speak TLS here (what it sent is not a TLS record)"
        );
        assert_eq!(
            io(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::MissingData("Thing")
            )),
            "the server sent a malformed TLS message"
        );
        assert_eq!(
            io(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidCcs
            )),
            "the server sent a malformed TLS message (invalid ccs)"
        );
        assert_eq!(
            io(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13
            )),
            "the server supports neither TLS 1.3 nor TLS 1.2"
        );
        assert_eq!(
            io(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon
            )),
            "no cipher suite in common with the server"
        );
        assert_eq!(
            io(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoKxGroupsInCommon
            )),
            "no key exchange group in common with the server"
        );
        assert_eq!(
            io(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SelectedUnofferedCipherSuite
            )),
            "the server broke the TLS protocol (selected unoffered cipher suite)"
        );
        assert_eq!(
            io(rustls::Error::InappropriateHandshakeMessage {
                expect_types: vec![rustls::HandshakeType::ServerHello],
                got_type: rustls::HandshakeType::Finished,
            }),
            "the server broke the TLS protocol (an unexpected finished handshake message)"
        );
        assert_eq!(
            io(rustls::Error::InappropriateMessage {
                expect_types: vec![rustls::ContentType::Handshake],
                got_type: rustls::ContentType::ApplicationData,
            }),
            "the server broke the TLS protocol (an unexpected application data message)"
        );
        assert_eq!(
            io(cert(CertificateError::BadSignature)),
            "the server's handshake signature does not verify with the key in its certificate \
             (the certificate and the private key do not match?)"
        );
        assert_eq!(
            io(cert(CertificateError::BadEncoding)),
            "the server's certificate is unusable: the certificate is malformed (its encoding \
             is invalid); the server needs a correctly encoded certificate from its CA"
        );
        assert_eq!(
            io(rustls::Error::DecryptError),
            "a TLS record from the server could not be decrypted (corrupted on the way, or a \
             broken TLS implementation)"
        );
        assert_eq!(
            describe_io_error(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            "the server closed the connection during the handshake"
        );
        assert_eq!(
            describe_io_error(&std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            "connection error during the handshake: connection reset"
        );
        assert_eq!(group_name(rustls::NamedGroup::X25519), "X25519");
        assert_eq!(group_name(rustls::NamedGroup::from(0x1234)), "group 0x1234");
    }

    /// Rust debug formatting: `Other(`, `OtherError`, `{ x: 1 }`, `a::b`, or a CamelCase
    /// word (`CaUsedAsEndEntity`).
    fn debug_formatting(text: &str) -> Option<String> {
        for bad in ["::", "{ ", " }", "Other(", "OtherError", "Some(", "None"] {
            if text.contains(bad) {
                return Some(bad.to_string());
            }
        }
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .find(|w| {
                w.as_bytes()
                    .windows(2)
                    .any(|p| p[0].is_ascii_lowercase() && p[1].is_ascii_uppercase())
            })
            .map(str::to_string)
    }

    #[test]
    fn debug_formatting_detector_works() {
        assert!(
            debug_formatting("certificate check failed: Other(OtherError(CaUsedAsEndEntity))")
                .is_some()
        );
        assert!(debug_formatting("alert HandshakeFailure").is_some());
        assert!(debug_formatting("x { a: 1 }").is_some());
        assert!(debug_formatting("rustls::Error").is_some());
        assert!(debug_formatting("TLSv1.3 with X25519MLKEM768 and Ed25519 (CA:TRUE)").is_none());
    }

    #[test]
    fn no_text_contains_debug_formatting() {
        use webpki::Error as W;
        let r = root("Words Root");
        let der = leaf(leaf_params("mx.test"), &r);
        let ss = self_signed("mx.test", true);
        #[allow(deprecated)]
        let webpki_errors = vec![
            W::BadDer,
            W::BadDerTime,
            W::CaUsedAsEndEntity,
            W::CertDistrusted,
            W::CertExpired {
                time: UnixTime::since_unix_epoch(Duration::from_secs(2)),
                not_after: UnixTime::since_unix_epoch(Duration::from_secs(1)),
            },
            W::CertNotValidYet {
                time: UnixTime::since_unix_epoch(Duration::from_secs(1)),
                not_before: UnixTime::since_unix_epoch(Duration::from_secs(2)),
            },
            W::CertRevoked,
            W::CrlExpired {
                time: UnixTime::since_unix_epoch(Duration::from_secs(2)),
                next_update: UnixTime::since_unix_epoch(Duration::from_secs(1)),
            },
            W::EmptyEkuExtension,
            W::EndEntityUsedAsCa,
            W::ExtensionValueInvalid,
            W::InvalidCertValidity,
            W::InvalidCrlNumber,
            W::InvalidNetworkMaskConstraint,
            W::InvalidSerialNumber,
            W::InvalidCrlSignatureForPublicKey,
            W::InvalidSignatureForPublicKey,
            W::IssuerNotCrlSigner,
            W::MalformedDnsIdentifier,
            W::MalformedExtensions,
            W::MalformedNameConstraint,
            W::MaximumNameConstraintComparisonsExceeded,
            W::MaximumPathBuildCallsExceeded,
            W::MaximumPathDepthExceeded,
            W::MaximumSignatureChecksExceeded,
            W::NameConstraintViolation,
            W::PathLenConstraintViolated,
            W::RequiredEkuNotFound,
            W::SignatureAlgorithmMismatch,
            W::TrailingData(webpki::DerTypeId::Certificate),
            W::UnknownIssuer,
            W::UnknownRevocationStatus,
            W::UnsupportedCertVersion,
            W::UnsupportedCriticalExtension,
            W::UnsupportedCrlIssuingDistributionPoint,
            W::UnsupportedCrlVersion,
            W::UnsupportedDeltaCrl,
            W::UnsupportedIndirectCrl,
            W::UnsupportedNameType,
            W::UnsupportedRevocationReason,
            W::UnsupportedRevocationReasonsPartitioning,
            W::UnsupportedCrlSignatureAlgorithm,
            W::UnsupportedSignatureAlgorithm,
            W::UnsupportedCrlSignatureAlgorithmForPublicKey,
            W::UnsupportedSignatureAlgorithmForPublicKey,
        ];
        #[allow(deprecated)]
        let mut errors: Vec<rustls::Error> = vec![
            cert(CertificateError::BadEncoding),
            cert(CertificateError::Expired),
            cert(CertificateError::NotValidYet),
            cert(CertificateError::Revoked),
            cert(CertificateError::UnhandledCriticalExtension),
            cert(CertificateError::UnknownIssuer),
            cert(CertificateError::UnknownRevocationStatus),
            cert(CertificateError::ExpiredRevocationList),
            cert(CertificateError::BadSignature),
            cert(CertificateError::UnsupportedSignatureAlgorithm),
            cert(CertificateError::NotValidForName),
            cert(CertificateError::InvalidPurpose),
            cert(CertificateError::InvalidOcspResponse),
            cert(CertificateError::ApplicationVerificationFailure),
            cert(CertificateError::Other(rustls::OtherError(Arc::new(
                std::io::Error::other("Boxed { thing: 1 }"),
            )))),
            rustls::Error::General("x".into()),
            rustls::Error::DecryptError,
            rustls::Error::NoCertificatesPresented,
            rustls::Error::PeerSentOversizedRecord,
            rustls::Error::HandshakeNotComplete,
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
            rustls::Error::InvalidCertRevocationList(rustls::CertRevocationListError::BadSignature),
            rustls::Error::Other(rustls::OtherError(Arc::new(W::CaUsedAsEndEntity))),
            rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::AttemptedDowngradeToTls12WhenTls13IsSupported,
            ),
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered),
            rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::ServerRejectedEncryptedClientHello(None),
            ),
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NullCompressionRequired),
            rustls::Error::InvalidMessage(rustls::InvalidMessage::UnexpectedMessage("Thing")),
            rustls::Error::InvalidMessage(rustls::InvalidMessage::DuplicateExtension(5)),
            rustls::Error::InvalidMessage(rustls::InvalidMessage::CertificatePayloadTooLarge),
            rustls::Error::InappropriateHandshakeMessage {
                expect_types: Vec::new(),
                got_type: rustls::HandshakeType::from(99),
            },
        ];
        errors.extend(webpki_errors.into_iter().map(wrapped));
        errors.extend((0..=255u8).map(|n| rustls::Error::AlertReceived(n.into())));
        let mut texts = Vec::new();
        for e in &errors {
            for d in [&[][..], der.as_ref(), ss.as_ref()] {
                texts.push(cert_failure(e, d).to_string());
            }
            texts.push(io(e.clone()));
        }
        let chains = [
            vec![der.clone()],
            vec![ss.clone()],
            vec![der.clone(), r.der.clone()],
            vec![self_signed("mx.test", false)],
        ];
        texts.extend(chains.iter().map(|c| UntrustedChain::of(c).to_string()));
        for t in &texts {
            assert!(!t.is_empty());
            if let Some(bad) = debug_formatting(t) {
                panic!("debug formatting ({bad}) in {t:?}");
            }
        }
    }
}
