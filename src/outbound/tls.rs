//! Outbound TLS: the policy levels, the connector that runs the client handshake after
//! STARTTLS, and the classification of what the peer's certificate proved (DESIGN §5).
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

/// SHA-256 from the TLS provider (no separate hash crate is a dependency).
fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
    {
        let digest = suite.common.hash_provider.hash(data);
        let digest = digest.as_ref();
        if digest.len() == 32 {
            out.copy_from_slice(digest);
        }
    }
    out
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
    /// Set by an MTA-STS `enforce` policy: failures carry 4.7.5/5.7.5 (DESIGN §4).
    pub mta_sts: bool,
}

impl TlsRequirement {
    /// A requirement with only a level.
    pub fn level(level: TlsLevel) -> TlsRequirement {
        TlsRequirement {
            level,
            ..TlsRequirement::default()
        }
    }
}

/// Why a certificate was not good enough, in terms a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFailure {
    /// A certificate in the chain (normally the server's own) expired at `not_after`.
    Expired {
        not_after: u64,
    },
    /// A certificate in the chain is not valid before `not_before`.
    NotYetValid {
        not_before: u64,
    },
    /// The chain does not lead to a trusted root.
    UntrustedIssuer,
    /// The certificate is not valid for any `expected` name.
    NameMismatch {
        expected: Vec<String>,
        presented: Vec<String>,
    },
    /// No configured pin matches.
    PinMismatch,
    Revoked,
    Other(String),
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
            CertFailure::UntrustedIssuer => f.write_str(
                "the certificate chain does not lead to a trusted root (untrusted issuer)",
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
                write!(
                    f,
                    "the certificate is issued to {presented}, not {}",
                    expected.join(" or ")
                )
            }
            CertFailure::PinMismatch => {
                f.write_str("the certificate matches none of the pinned fingerprints")
            }
            CertFailure::Revoked => f.write_str("the certificate has been revoked"),
            CertFailure::Other(s) => f.write_str(s),
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
}

impl Verification {
    /// `Verified`, `Trusted` or `Untrusted`, as in Postfix's "... TLS connection established".
    pub fn word(&self) -> &'static str {
        match self {
            Verification::Verified => "Verified",
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
    /// The certificate did not meet the requirement (DESIGN §4: 4.7.320 / 5.7.320).
    Certificate(CertFailure),
    /// Any other handshake failure, in words that name it: an alert from the server, no
    /// common protocol version or cipher, a peer that does not speak TLS, a connection closed
    /// mid-handshake.
    Handshake(String),
    /// The handshake did not finish in time.
    Timeout,
}

impl TlsFailure {
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
        let mut roots = RootCertStore::empty();
        if system_roots {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!(error = %e, "loading system CA certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
            if ignored > 0 {
                tracing::debug!(ignored, "unparsable system CA certificates skipped");
            }
            if added == 0 {
                tracing::warn!("no system CA certificates found; using the built-in Mozilla roots");
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
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
        let sni = ServerName::try_from(host.clone()).map_err(|_| {
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
                .map(|g| format!("{:?}", g.name())),
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
        let (verification, name_failure) = match &parsed {
            Err(e) => (Verification::Untrusted(cert_failure(e, der)), None),
            Ok(cert) => match self.check_chain(cert, intermediates, now) {
                Err(e) => (Verification::Untrusted(cert_failure(&e, der)), None),
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
        CertFailure::UntrustedIssuer => CertificateError::UnknownIssuer,
        CertFailure::NameMismatch { .. } => CertificateError::NotValidForName,
        CertFailure::Revoked => CertificateError::Revoked,
        CertFailure::PinMismatch | CertFailure::Other(_) => {
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

/// Classifies a rustls/webpki certificate error; `der` is the end-entity certificate, read
/// for the dates and names when the error carries none.
fn cert_failure(e: &rustls::Error, der: &[u8]) -> CertFailure {
    let rustls::Error::InvalidCertificate(ce) = e else {
        return CertFailure::Other(format!("certificate check failed: {e}"));
    };
    #[allow(deprecated)]
    match ce {
        CertificateError::ExpiredContext { not_after, .. } => CertFailure::Expired {
            not_after: not_after.as_secs(),
        },
        CertificateError::Expired => CertFailure::Expired {
            not_after: validity(der).map(|(_, a)| a).unwrap_or(0),
        },
        CertificateError::NotValidYetContext { not_before, .. } => CertFailure::NotYetValid {
            not_before: not_before.as_secs(),
        },
        CertificateError::NotValidYet => CertFailure::NotYetValid {
            not_before: validity(der).map(|(b, _)| b).unwrap_or(0),
        },
        CertificateError::UnknownIssuer => CertFailure::UntrustedIssuer,
        CertificateError::Revoked => CertFailure::Revoked,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertFailure::NameMismatch {
                expected: Vec::new(),
                presented: presented_names(der),
            }
        }
        CertificateError::BadSignature => CertFailure::Other(
            "a certificate in the chain has a signature that does not verify".into(),
        ),
        CertificateError::BadEncoding => CertFailure::Other("the certificate is malformed".into()),
        CertificateError::UnhandledCriticalExtension => CertFailure::Other(
            "the certificate has a critical extension this server does not understand".into(),
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            CertFailure::Other(
                "the certificate is not issued for TLS servers (extended key usage)".into(),
            )
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            CertFailure::Other(
                "a certificate in the chain is signed with an unsupported algorithm".into(),
            )
        }
        CertificateError::UnknownRevocationStatus
        | CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            CertFailure::Other("the certificate's revocation status is unknown".into())
        }
        other => CertFailure::Other(format!("certificate check failed: {other}")),
    }
}

/// Plain words for an error from the handshake itself (not our certificate policy).
fn describe_io_error(e: &std::io::Error) -> String {
    let Some(err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "the server closed the connection during the handshake".into()
            }
            _ => format!("connection error during the handshake: {e}"),
        };
    };
    match err {
        rustls::Error::AlertReceived(alert) => {
            format!("the server ended the handshake with the alert {alert:?}")
        }
        rustls::Error::InvalidMessage(m) => {
            format!("the server does not speak TLS here (invalid message: {m:?})")
        }
        rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => {
            format!("the server broke the TLS protocol ({err})")
        }
        rustls::Error::PeerIncompatible(p) => {
            format!("no protocol version, cipher or key exchange in common with the server ({p:?})")
        }
        rustls::Error::PeerMisbehaved(p) => format!("the server broke the TLS protocol ({p:?})"),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's certificate or its key is unusable ({c})")
        }
        other => format!("TLS error: {other}"),
    }
}
