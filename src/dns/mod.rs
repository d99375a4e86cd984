//! The resolver facade: the only place that talks to `hickory-resolver`.
//!
//! Everything above this module sees three kinds of outcome and never a hickory type:
//!
//! * an answer ([`MxAnswer::Records`], a non-empty address list);
//! * an authoritative "no": the name does not exist (NXDOMAIN) or has no records of the asked type
//!   (NODATA). These are facts about the domain and are permanent;
//! * a failure to get an answer at all (timeout, SERVFAIL, REFUSED, unreachable nameserver,
//!   malformed response). These say nothing about the domain and are temporary
//!   ([`DnsError::is_temporary`]).
//!
//! Unlike `res_query(3)`, which reports REFUSED, FORMERR and NOTIMP as `NO_RECOVERY` (Postfix then
//! bounces), every response code other than NXDOMAIN/NOERROR counts as temporary here: such codes
//! describe our path to the data, not the data, and the queue turns a temporary failure into a
//! permanent one only after the retry window.
//!
//! Names are always queried as absolute names (`example.com.`), so `resolv.conf` `search` and
//! `ndots` never rewrite a mail domain into something else. Names may be given in UTF-8 (IDNA) or
//! ASCII form; answers are returned as lowercase ASCII (A-labels) without the trailing dot.
//!
//! Tests build a [`Resolver`] with [`Resolver::with_nameservers_timeout`] pointing at an in-process
//! DNS server on a loopback address (see `tests/dns_route.rs`).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::dnssec::{DnssecSummary, Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

use crate::dane::tlsa::Tlsa;
use crate::policy::{Dnssec, TlsaLookup};

mod trusted;

/// Default time to wait for one answer from one nameserver.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of retries after the first attempt (hickory's `attempts`).
pub const DEFAULT_RETRIES: usize = 2;

/// The record type(s) a lookup asked for; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// MX records.
    Mx,
    /// A records only.
    A,
    /// AAAA records only.
    Aaaa,
    /// A and AAAA records (an address lookup).
    Address,
    /// TXT records.
    Txt,
    /// TLSA records (DANE).
    Tlsa,
    /// An SOA record (the validation self-check).
    Soa,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Mx => "MX",
            RecordKind::A => "A",
            RecordKind::Aaaa => "AAAA",
            RecordKind::Address => "A/AAAA",
            RecordKind::Txt => "TXT",
            RecordKind::Tlsa => "TLSA",
            RecordKind::Soa => "SOA",
        })
    }
}

/// What a lookup asked: the record type and the name (as given, without trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// The record type(s).
    pub kind: RecordKind,
    /// The queried name.
    pub name: String,
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} for {}", self.kind, self.name)
    }
}

/// The outcome of an MX lookup that got an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// MX records: `(preference, exchange)`, in the order received. The exchange is lowercase
    /// ASCII without the trailing dot; the root name (a null MX, RFC 7505) is the empty string.
    Records(Vec<(u16, String)>),
    /// The name exists but has no MX records (NODATA): RFC 5321 §5.1 implicit MX applies.
    NoRecords,
    /// The name does not exist (NXDOMAIN).
    NxDomain,
}

/// Why a lookup did not produce records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name is not a valid domain name (permanent).
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The name does not exist (NXDOMAIN; permanent). Only [`Resolver::addresses`] returns this;
    /// [`Resolver::mx`] reports it as [`MxAnswer::NxDomain`].
    NxDomain {
        /// The lookup.
        query: DnsQuery,
    },
    /// The name exists but has no records of the asked type (NODATA; permanent). Only
    /// [`Resolver::addresses`] returns this; [`Resolver::mx`] reports it as [`MxAnswer::NoRecords`].
    NoRecords {
        /// The lookup.
        query: DnsQuery,
    },
    /// No nameserver answered in time (temporary).
    Timeout {
        /// The lookup.
        query: DnsQuery,
    },
    /// A nameserver answered with an error code such as SERVFAIL or REFUSED (temporary).
    ServerFailure {
        /// The lookup.
        query: DnsQuery,
        /// The response code, e.g. `SERVFAIL`.
        rcode: String,
    },
    /// No nameserver could be reached (temporary).
    Network {
        /// The lookup.
        query: DnsQuery,
        /// What the network said, e.g. `connection refused`.
        detail: String,
    },
    /// An answer arrived but could not be used: malformed, truncated, spoofing suspected
    /// (temporary).
    BadResponse {
        /// The lookup.
        query: DnsQuery,
        /// What was wrong with it.
        detail: String,
    },
    /// The resolver could not be set up, e.g. `/etc/resolv.conf` is unreadable.
    Config {
        /// What went wrong.
        detail: String,
    },
}

impl DnsError {
    /// Whether asking again later may give a different result.
    ///
    /// NXDOMAIN, NODATA and invalid names are facts about the name; everything else is a failure
    /// to learn the facts.
    pub fn is_temporary(&self) -> bool {
        match self {
            DnsError::InvalidName { .. }
            | DnsError::NxDomain { .. }
            | DnsError::NoRecords { .. } => false,
            DnsError::Timeout { .. }
            | DnsError::ServerFailure { .. }
            | DnsError::Network { .. }
            | DnsError::BadResponse { .. }
            | DnsError::Config { .. } => true,
        }
    }

    /// The lookup this error belongs to, if any.
    pub fn query(&self) -> Option<&DnsQuery> {
        match self {
            DnsError::NxDomain { query }
            | DnsError::NoRecords { query }
            | DnsError::Timeout { query }
            | DnsError::ServerFailure { query, .. }
            | DnsError::Network { query, .. }
            | DnsError::BadResponse { query, .. } => Some(query),
            DnsError::InvalidName { .. } | DnsError::Config { .. } => None,
        }
    }

    /// The same error reported for another lookup (used to merge the A and AAAA halves).
    fn with_kind(mut self, kind: RecordKind) -> Self {
        match &mut self {
            DnsError::NxDomain { query }
            | DnsError::NoRecords { query }
            | DnsError::Timeout { query }
            | DnsError::ServerFailure { query, .. }
            | DnsError::Network { query, .. }
            | DnsError::BadResponse { query, .. } => query.kind = kind,
            DnsError::InvalidName { .. } | DnsError::Config { .. } => {}
        }
        self
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::InvalidName { name, reason } => {
                write!(
                    f,
                    "cannot look up {name:?}: not a valid domain name ({reason})"
                )
            }
            DnsError::NxDomain { query } => write!(
                f,
                "DNS lookup of {query}: {} does not exist (NXDOMAIN)",
                query.name
            ),
            DnsError::NoRecords { query } => write!(
                f,
                "DNS lookup of {query}: {} has no {} records (NODATA)",
                query.name, query.kind
            ),
            DnsError::Timeout { query } => write!(
                f,
                "DNS lookup of {query} timed out (no nameserver answered)"
            ),
            DnsError::ServerFailure { query, rcode } => write!(
                f,
                "DNS lookup of {query} failed: the nameserver answered {rcode}"
            ),
            DnsError::Network { query, detail } => write!(
                f,
                "DNS lookup of {query} failed: could not reach a nameserver ({detail})"
            ),
            DnsError::BadResponse { query, detail } => write!(
                f,
                "DNS lookup of {query} failed: unusable response ({detail})"
            ),
            DnsError::Config { detail } => write!(f, "DNS resolver configuration: {detail}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// One resolver for routing lookups (plain, non-validating). Cheap to clone; clones share the
/// cache and connections.
#[derive(Clone, Debug)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// A resolver using the system configuration (`/etc/resolv.conf` on Unix), including its
    /// timeout and attempts options. Lookups never use the hosts file.
    pub fn system() -> Result<Self, DnsError> {
        let mut builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Config {
            detail: format!("cannot read the system resolver configuration: {e}"),
        })?;
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        let inner = builder.build().map_err(|e| DnsError::Config {
            detail: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// A resolver asking the given nameservers over UDP (and TCP for truncated answers), with
    /// the default timeout ([`DEFAULT_TIMEOUT`]) and retries ([`DEFAULT_RETRIES`]).
    pub fn with_nameservers(servers: &[SocketAddr]) -> Result<Self, DnsError> {
        Self::with_nameservers_timeout(servers, DEFAULT_TIMEOUT, DEFAULT_RETRIES)
    }

    /// Like [`Resolver::with_nameservers`], with a per-query `timeout` and a number of `retries`
    /// after the first attempt (0 = ask once).
    pub fn with_nameservers_timeout(
        servers: &[SocketAddr],
        timeout: Duration,
        retries: usize,
    ) -> Result<Self, DnsError> {
        let (name_servers, opts) = nameserver_config(servers, timeout, retries)?;
        let inner = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Config {
            detail: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// MX records of `domain`.
    ///
    /// NXDOMAIN and NODATA are answers ([`MxAnswer::NxDomain`], [`MxAnswer::NoRecords`]), not
    /// errors. An MX answer reached through a CNAME is followed.
    pub async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        let name = absolute_name(domain)?;
        let query = DnsQuery {
            kind: RecordKind::Mx,
            name: display_name(domain),
        };
        match self.inner.mx_lookup(name).await {
            Ok(lookup) => {
                let records: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::MX(mx) => Some((mx.preference, normalize(&mx.exchange))),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    Ok(MxAnswer::NoRecords)
                } else {
                    Ok(MxAnswer::Records(records))
                }
            }
            Err(e) => match classify(e, query) {
                DnsError::NxDomain { .. } => Ok(MxAnswer::NxDomain),
                DnsError::NoRecords { .. } => Ok(MxAnswer::NoRecords),
                other => Err(other),
            },
        }
    }

    /// TXT records of `name`, each the concatenation of its strings (RFC 7208 §3.3 style),
    /// invalid UTF-8 replaced. NXDOMAIN and NODATA are an empty list, not errors.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let absolute = absolute_name(name)?;
        let query = DnsQuery {
            kind: RecordKind::Txt,
            name: display_name(name),
        };
        match self.inner.txt_lookup(absolute).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => {
                        let bytes: Vec<u8> = txt
                            .txt_data
                            .iter()
                            .flat_map(|s| s.iter().copied())
                            .collect();
                        Some(String::from_utf8_lossy(&bytes).into_owned())
                    }
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(e, query) {
                DnsError::NxDomain { .. } | DnsError::NoRecords { .. } => Ok(Vec::new()),
                other => Err(other),
            },
        }
    }

    /// IPv4 then IPv6 addresses of `host`; the A and AAAA queries are sent together.
    ///
    /// If either query yields addresses they are returned, even if the other one failed (mail
    /// can go over the family that answered). Otherwise the error is, in this order: a
    /// temporary failure of either query, [`DnsError::NxDomain`] if either said the name does not
    /// exist, else [`DnsError::NoRecords`].
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let name = absolute_name(host)?;
        let query = |kind| DnsQuery {
            kind,
            name: display_name(host),
        };
        let (v4, v6) = tokio::join!(
            self.inner.ipv4_lookup(name.clone()),
            self.inner.ipv6_lookup(name)
        );
        let v4 = v4.map_err(|e| classify(e, query(RecordKind::A)));
        let v6 = v6.map_err(|e| classify(e, query(RecordKind::Aaaa)));

        let mut addrs = Vec::new();
        if let Ok(lookup) = &v4 {
            addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            }));
        }
        if let Ok(lookup) = &v6 {
            addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            }));
        }
        if !addrs.is_empty() {
            return Ok(addrs);
        }

        let errors = [v4.err(), v6.err()];
        let errors = errors.into_iter().flatten();
        let mut nx = None;
        for e in errors {
            match e {
                e if e.is_temporary() => return Err(e),
                e @ DnsError::NxDomain { .. } => nx = Some(e),
                _ => {}
            }
        }
        Err(match nx {
            Some(e) => e.with_kind(RecordKind::Address),
            None => DnsError::NoRecords {
                query: query(RecordKind::Address),
            },
        })
    }
}

/// Entries in the validated-answer cache before it is pruned.
const VALIDATED_CACHE_ENTRIES: usize = 10_000;

type CachedAnswer = (std::time::Instant, (Dnssec, Vec<Record>));

/// A DNSSEC-validating resolver (RFC 4035 §5), for DANE: the same nameservers as the
/// routing resolver, its own cache. Every answer comes with its [`Dnssec`] state; lookups
/// that do not validate are [`Dnssec::Bogus`], ones that get no answer (SERVFAIL, timeouts)
/// [`Dnssec::Unanswered`], both with
/// the reason, never an insecure answer.
#[derive(Clone)]
pub struct Validator {
    inner: Backend,
    /// Validated answers by (name, type), with when they expire.
    cache: std::sync::Arc<std::sync::Mutex<HashMap<(String, RecordType), CachedAnswer>>>,
    /// The most one lookup may take, key fetches included (a validating lookup whose DNSKEY
    /// or DS queries go unanswered can otherwise take many times the per-query timeout).
    limit: Duration,
}

/// Who validates: Moat itself, or a validating resolver whose AD bit it trusts.
#[derive(Clone)]
enum Backend {
    Own(Box<TokioResolver>),
    Trusted(trusted::Trusted),
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Validator")
    }
}

impl Validator {
    /// Validates from the root's trust anchors built into hickory, or from the DNSKEY records
    /// in `anchor_file` instead (`NAME TTL IN DNSKEY 257 3 ALG KEY` lines, as `dig DNSKEY`
    /// prints them; a test zone's key makes it an island of trust).
    pub fn new(
        servers: &[SocketAddr],
        timeout: Duration,
        retries: usize,
        anchor_file: Option<&std::path::Path>,
    ) -> Result<Self, DnsError> {
        let anchors = Self::anchors(anchor_file)?;
        let (name_servers, mut opts) = nameserver_config(servers, timeout, retries)?;
        opts.validate = true;
        // No answer cache: hickory 0.26 can drop an insecure CNAME from an answer whose
        // target is cached, which would make an insecure TLSA look secure. Key proofs are
        // still cached by the validator.
        opts.cache_size = 0;
        let inner = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .with_trust_anchor(std::sync::Arc::new(anchors))
        .build()
        .map_err(|e| DnsError::Config {
            detail: e.to_string(),
        })?;
        Ok(Validator {
            inner: Backend::Own(Box::new(inner)),
            cache: Default::default(),
            limit: timeout.saturating_mul(4).max(Duration::from_secs(2)),
        })
    }

    /// A validator that does not validate itself but trusts the AD bit of `servers`
    /// (`[dane] resolver_validates = true`): they must be validating resolvers on this host.
    pub fn trusting(
        servers: &[SocketAddr],
        timeout: Duration,
        retries: usize,
    ) -> Result<Self, DnsError> {
        if servers.is_empty() {
            return Err(DnsError::Config {
                detail: "no nameservers configured".to_owned(),
            });
        }
        Ok(Validator {
            inner: Backend::Trusted(trusted::Trusted {
                servers: servers.to_vec(),
                timeout,
                retries,
            }),
            cache: Default::default(),
            limit: timeout
                .saturating_mul(u32::try_from(retries + 1).unwrap_or(u32::MAX))
                .saturating_mul(2)
                .max(Duration::from_secs(2)),
        })
    }

    /// Like [`Validator::trusting`], with the system's nameservers (`/etc/resolv.conf`).
    pub fn trusting_system() -> Result<Self, DnsError> {
        let (config, opts) =
            hickory_resolver::system_conf::read_system_conf().map_err(|e| DnsError::Config {
                detail: format!("cannot read the system resolver configuration: {e}"),
            })?;
        let servers: Vec<SocketAddr> = config
            .name_servers()
            .iter()
            .map(|ns| {
                let port = ns.connections.first().map_or(53, |c| c.port);
                SocketAddr::new(ns.ip, port)
            })
            .collect();
        Self::trusting(&servers, opts.timeout, opts.attempts)
    }

    /// Whether this validator trusts a resolver's AD bit instead of validating itself.
    pub fn trusts_resolver(&self) -> bool {
        matches!(self.inner, Backend::Trusted(_))
    }

    /// The configured nameservers that are not on this host (for the warning that the AD
    /// bit is trusted across a network).
    pub fn remote_trusted_servers(&self) -> Vec<SocketAddr> {
        match &self.inner {
            Backend::Trusted(t) => t
                .servers
                .iter()
                .filter(|s| !s.ip().is_loopback())
                .copied()
                .collect(),
            Backend::Own(_) => Vec::new(),
        }
    }

    /// Like [`Validator::new`], with the system's nameservers.
    pub fn system(anchor_file: Option<&std::path::Path>) -> Result<Self, DnsError> {
        let anchors = Self::anchors(anchor_file)?;
        let mut builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Config {
            detail: format!("cannot read the system resolver configuration: {e}"),
        })?;
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        builder.options_mut().validate = true;
        builder.options_mut().cache_size = 0;
        let limit = builder
            .options_mut()
            .timeout
            .saturating_mul(4)
            .max(Duration::from_secs(2));
        let inner = builder
            .with_trust_anchor(std::sync::Arc::new(anchors))
            .build()
            .map_err(|e| DnsError::Config {
                detail: e.to_string(),
            })?;
        Ok(Validator {
            inner: Backend::Own(Box::new(inner)),
            cache: Default::default(),
            limit,
        })
    }

    fn anchors(anchor_file: Option<&std::path::Path>) -> Result<TrustAnchors, DnsError> {
        match anchor_file {
            Some(p) => TrustAnchors::from_file(p).map_err(|e| DnsError::Config {
                detail: format!("trust anchor file {}: {e}", p.display()),
            }),
            None => Ok(TrustAnchors::default()),
        }
    }

    /// The DNSSEC state of `name`'s `rtype` RRset, or of the proof that there is none; with
    /// the records when there are some.
    async fn state(&self, name: &str, rtype: RecordType) -> (Dnssec, Vec<Record>) {
        let key = (name.to_ascii_lowercase(), rtype);
        let now = std::time::Instant::now();
        if let Some((until, hit)) = self.cache_get(&key)
            && until > now
        {
            return hit;
        }
        let answer = self.state_uncached(name, rtype).await;
        // Whole validated answers are cached (not hickory's records: see `new`): answers for
        // their smallest TTL (at most an hour), denials a minute, failures 10 s.
        let ttl = match &answer.0 {
            Dnssec::Bogus(_) | Dnssec::Unanswered(_) => 10,
            _ if answer.1.is_empty() => 60,
            _ => answer
                .1
                .iter()
                .map(|r| r.ttl)
                .min()
                .unwrap_or(60)
                .clamp(1, 3600),
        };
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= VALIDATED_CACHE_ENTRIES {
            c.retain(|_, (until, _)| *until > now);
            if c.len() >= VALIDATED_CACHE_ENTRIES {
                c.clear();
            }
        }
        c.insert(
            key,
            (now + Duration::from_secs(u64::from(ttl)), answer.clone()),
        );
        answer
    }

    fn cache_get(&self, key: &(String, RecordType)) -> Option<CachedAnswer> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    async fn state_uncached(&self, name: &str, rtype: RecordType) -> (Dnssec, Vec<Record>) {
        let what = format!("{rtype} {}", display_name(name));
        let absolute = match validator_name(name) {
            Ok(n) => n,
            Err(e) => return (Dnssec::Unanswered(e.to_string()), Vec::new()),
        };
        let inner = match &self.inner {
            Backend::Own(r) => r,
            Backend::Trusted(t) => {
                return match tokio::time::timeout(self.limit, t.query(&absolute, rtype)).await {
                    Ok(v) => trusted_state(&absolute, rtype, &what, v),
                    Err(_) => (
                        Dnssec::Unanswered(format!(
                            "{what}: no answer from the validating resolver within {} s",
                            self.limit.as_secs()
                        )),
                        Vec::new(),
                    ),
                };
            }
        };
        let Ok(result) =
            tokio::time::timeout(self.limit, inner.lookup(absolute.clone(), rtype)).await
        else {
            return (
                Dnssec::Unanswered(format!(
                    "{what}: no validated answer within {} s",
                    self.limit.as_secs()
                )),
                Vec::new(),
            );
        };
        match result {
            Ok(lookup) => {
                // Only the answer's own RRsets count: the CNAME chain from the queried name
                // and the asked type at its end. Anything else in the section (an unrelated
                // unsigned record an attacker appended) must not make a secure answer look
                // insecure (RFC 4035 §4.3).
                let records = chain_records(&absolute, rtype, lookup.answers());
                let state = match DnssecSummary::from_records(records.iter()) {
                    DnssecSummary::Secure => Dnssec::Secure,
                    DnssecSummary::Insecure => Dnssec::Insecure,
                    DnssecSummary::Bogus => Dnssec::Bogus(format!("{what}: bogus signatures")),
                };
                (state, records)
            }
            Err(NetError::Dns(HickoryDnsError::NoRecordsFound(no))) => {
                // The denial's own records: the SOA and NSEC/NSEC3 records (other records in
                // the authority section say nothing about it).
                let auth: Vec<&Record> = no
                    .authorities
                    .as_deref()
                    .unwrap_or(&[])
                    .iter()
                    .filter(|r| {
                        matches!(
                            r.record_type(),
                            RecordType::SOA | RecordType::NSEC | RecordType::NSEC3
                        )
                    })
                    .collect();
                let state = match DnssecSummary::from_records(auth.into_iter()) {
                    DnssecSummary::Secure => Dnssec::Secure,
                    DnssecSummary::Bogus => {
                        Dnssec::Bogus(format!("{what}: the denial of existence is bogus"))
                    }
                    DnssecSummary::Insecure => Dnssec::Insecure,
                };
                (state, Vec::new())
            }
            Err(NetError::Dns(HickoryDnsError::Nsec { proof, .. })) => {
                let state = match proof {
                    Proof::Secure => Dnssec::Secure,
                    Proof::Bogus => {
                        Dnssec::Bogus(format!("{what}: the denial of existence is bogus"))
                    }
                    _ => Dnssec::Insecure,
                };
                (state, Vec::new())
            }
            Err(NetError::Dns(HickoryDnsError::DnssecBogus)) => (
                Dnssec::Bogus(format!("{what}: DNSSEC validation failed")),
                Vec::new(),
            ),
            Err(e) => {
                let kind = match rtype {
                    RecordType::MX => RecordKind::Mx,
                    RecordType::A => RecordKind::A,
                    RecordType::AAAA => RecordKind::Aaaa,
                    RecordType::TLSA => RecordKind::Tlsa,
                    RecordType::SOA => RecordKind::Soa,
                    _ => RecordKind::Txt,
                };
                let query = DnsQuery {
                    kind,
                    name: display_name(name),
                };
                (
                    Dnssec::Unanswered(classify(e, query).to_string()),
                    Vec::new(),
                )
            }
        }
    }

    /// The DNSSEC state of `domain`'s MX RRset (or of the proof that it has none).
    pub async fn mx(&self, domain: &str) -> Dnssec {
        self.state(domain, RecordType::MX).await.0
    }

    /// The DNSSEC state of `domain`'s MX RRset and the MX host names it holds (lowercase, no
    /// trailing dot; empty for a denial).
    pub async fn mx_hosts(&self, domain: &str) -> (Dnssec, Vec<String>) {
        let (state, records) = self.state(domain, RecordType::MX).await;
        let hosts = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(normalize(&mx.exchange)),
                _ => None,
            })
            .collect();
        (state, hosts)
    }

    /// The DNSSEC state of `host`'s address records: secure only when every answer (A and
    /// AAAA, or their secure denials) is.
    pub async fn addresses(&self, host: &str) -> Dnssec {
        self.addresses_expanded(host).await.0
    }

    /// The addresses of `host` as this resolver answers them (A, then AAAA; empty when it
    /// has none), so what is connected to is what was validated.
    pub async fn ips(&self, host: &str) -> Vec<IpAddr> {
        let (a, aaaa) = tokio::join!(
            self.state(host, RecordType::A),
            self.state(host, RecordType::AAAA)
        );
        a.1.iter()
            .chain(aaaa.1.iter())
            .filter_map(|r| match &r.data {
                RData::A(ip) => Some(IpAddr::V4(ip.0)),
                RData::AAAA(ip) => Some(IpAddr::V6(ip.0)),
                _ => None,
            })
            .collect()
    }

    /// Like [`Validator::addresses`], with the name the address records are at when `host`
    /// is an alias (the end of its CNAME chain; `None` when there is no CNAME).
    pub async fn addresses_expanded(&self, host: &str) -> (Dnssec, Option<String>) {
        let (a, aaaa) = tokio::join!(
            self.state(host, RecordType::A),
            self.state(host, RecordType::AAAA)
        );
        let own = host.trim_end_matches('.').to_ascii_lowercase();
        let expanded = [&a.1, &aaaa.1]
            .into_iter()
            .flat_map(|rs| rs.iter())
            .find(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
            .map(|r| normalize(&r.name))
            .filter(|n| *n != own);
        let state = match (a.0, aaaa.0) {
            (Dnssec::Bogus(w), _) | (_, Dnssec::Bogus(w)) => Dnssec::Bogus(w),
            (Dnssec::Unanswered(w), _) | (_, Dnssec::Unanswered(w)) => Dnssec::Unanswered(w),
            (Dnssec::Secure, Dnssec::Secure) => Dnssec::Secure,
            _ => Dnssec::Insecure,
        };
        (state, expanded)
    }

    /// The TLSA records of `_<port>._tcp.<host>` (RFC 7672 §2.2.3), following CNAMEs. The
    /// base name stays `host`: a CNAME on the TLSA name only shares the records (RFC 7671 §7).
    pub async fn tlsa(&self, host: &str, port: u16) -> TlsaLookup {
        let name = format!("_{port}._tcp.{host}");
        let (state, records) = self.state(&name, RecordType::TLSA).await;
        match state {
            Dnssec::Bogus(w) => return TlsaLookup::Failed(w),
            Dnssec::Unanswered(w) => return TlsaLookup::Unanswered(w),
            Dnssec::Insecure => return TlsaLookup::NoRecords { secure: false },
            Dnssec::Secure => {}
        }
        let mut found = Vec::new();
        for r in &records {
            if let RData::TLSA(t) = &r.data {
                found.push(Tlsa {
                    usage: u8::from(t.cert_usage),
                    selector: u8::from(t.selector),
                    matching: u8::from(t.matching),
                    data: t.cert_data.clone(),
                });
            }
        }
        if found.is_empty() {
            return TlsaLookup::NoRecords { secure: true };
        }
        TlsaLookup::Records {
            records: found,
            base: host.trim_end_matches('.').to_ascii_lowercase(),
        }
    }

    /// The TLSA records for an MX host whose (secure) address records may be at the end of a
    /// CNAME chain (`expanded`, from [`Validator::addresses_expanded`]): RFC 7672 §2.2.3 looks
    /// first at the expanded name, which is then the TLSA base domain, and only when that
    /// finds no records (a secure denial, or an insecure answer) at the MX host's own name. A
    /// failed or unanswered lookup at the expanded name is the host's result: no fallback.
    pub async fn tlsa_for_host(&self, host: &str, expanded: Option<&str>, port: u16) -> TlsaLookup {
        if let Some(target) = expanded {
            match self.tlsa(target, port).await {
                TlsaLookup::NoRecords { .. } => {}
                found => return found,
            }
        }
        self.tlsa(host, port).await
    }

    /// Whether validation works through the configured nameservers: `secure` must validate
    /// (its SOA), and `bogus`, when given, must be refused. `Err` says what went wrong.
    pub async fn self_check(&self, secure: &str, bogus: Option<&str>) -> Result<(), String> {
        match self.state_uncached(secure, RecordType::SOA).await.0 {
            Dnssec::Secure => {}
            Dnssec::Insecure => {
                return Err(format!(
                    "the answer for {secure} is not validated: the nameservers return no DNSSEC signatures, or the trust anchor does not cover it"
                ));
            }
            Dnssec::Bogus(w) | Dnssec::Unanswered(w) => {
                return Err(format!("validating {secure} failed: {w}"));
            }
        }
        if let Some(b) = bogus {
            match self.state_uncached(b, RecordType::A).await.0 {
                Dnssec::Bogus(_) => {}
                // A validating resolver refuses a bogus answer with SERVFAIL, which without an
                // Extended DNS Error looks like any other failure; the secure name validated
                // through the same resolver just before, so the refusal is taken as one.
                Dnssec::Unanswered(w) if self.trusts_resolver() && w.contains("SERVFAIL") => {}
                other => {
                    return Err(format!(
                        "{b}, which is signed wrongly on purpose, was accepted as {other:?}: validation is not effective"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// UDP (and TCP for truncated answers) to each of `servers`, with the per-query `timeout`,
/// `retries` after the first attempt, and never the hosts file.
fn nameserver_config(
    servers: &[SocketAddr],
    timeout: Duration,
    retries: usize,
) -> Result<(Vec<NameServerConfig>, ResolverOpts), DnsError> {
    if servers.is_empty() {
        return Err(DnsError::Config {
            detail: "no nameservers configured".to_owned(),
        });
    }
    let name_servers = servers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = retries;
    opts.use_hosts_file = ResolveHosts::Never;
    Ok((name_servers, opts))
}

/// The name for a validating lookup: `.` is the root (the self-check asks for its SOA).
fn validator_name(name: &str) -> Result<Name, DnsError> {
    if name == "." {
        return Ok(Name::root());
    }
    absolute_name(name)
}

/// The DNSSEC state of a trusted resolver's answer: secure when it set AD, insecure when
/// not; SERVFAIL is bogus when its Extended DNS Error says so, otherwise no answer.
fn trusted_state(
    qname: &Name,
    rtype: RecordType,
    what: &str,
    verdict: trusted::Verdict,
) -> (Dnssec, Vec<Record>) {
    match verdict {
        trusted::Verdict::Answer { message, authentic } => {
            let records = chain_records(qname, rtype, &message.answers);
            let state = if authentic {
                Dnssec::Secure
            } else {
                Dnssec::Insecure
            };
            (state, records)
        }
        trusted::Verdict::ServFail { dnssec: Some(code) } => (
            Dnssec::Bogus(format!(
                "{what}: the validating resolver refused the answer (DNSSEC error {code}, RFC 8914)"
            )),
            Vec::new(),
        ),
        trusted::Verdict::ServFail { dnssec: None } => (
            Dnssec::Unanswered(format!(
                "{what}: the validating resolver answered SERVFAIL (a bogus signature, or no answer from the domain's servers)"
            )),
            Vec::new(),
        ),
        trusted::Verdict::Failed(w) => (Dnssec::Unanswered(format!("{what}: {w}")), Vec::new()),
    }
}

/// The records of an answer that belong to it: the CNAME chain starting at `qname` and the
/// `rtype` records at the chain's end (RRSIGs left out).
fn chain_records(qname: &Name, rtype: RecordType, answers: &[Record]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut current = qname.to_lowercase();
    for _ in 0..16 {
        let mut next = None;
        for r in answers {
            if r.name.to_lowercase() != current {
                continue;
            }
            match &r.data {
                RData::CNAME(c) if rtype != RecordType::CNAME => {
                    next = Some(c.0.to_lowercase());
                    out.push(r.clone());
                }
                _ if r.record_type() == rtype => out.push(r.clone()),
                _ => {}
            }
        }
        match next {
            Some(n) if n != current => current = n,
            _ => break,
        }
    }
    out
}

/// `domain` as an absolute DNS name, or [`DnsError::InvalidName`].
fn absolute_name(domain: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidName {
        name: domain.to_owned(),
        reason,
    };
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() {
        return Err(invalid("empty name".to_owned()));
    }
    let mut name = Name::from_str_relaxed(trimmed).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// The canonical form of a domain name for comparisons, the same as [`crate::domain::Domain`]'s:
/// lowercase ASCII (A-labels), no trailing dot. `Bücher.Example.` becomes
/// `xn--bcher-kva.example`. Names `Domain` refuses but DNS allows (underscores, as in
/// `_mta-sts.example`) are normalised by the resolver's own rules.
pub fn canonical_name(domain: &str) -> Result<String, DnsError> {
    match crate::domain::Domain::parse(domain) {
        Ok(d) => Ok(d.into_string()),
        Err(_) => absolute_name(domain).map(|name| normalize(&name)),
    }
}

/// `domain` as shown in messages: without the trailing dot.
fn display_name(domain: &str) -> String {
    domain.strip_suffix('.').unwrap_or(domain).to_owned()
}

/// Lowercase ASCII form without the trailing dot; the root name becomes `""`.
fn normalize(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    match ascii.strip_suffix('.') {
        Some(s) => s.to_owned(),
        None => ascii,
    }
}

/// The conventional mnemonic of a response code (`SERVFAIL`), or its description and number.
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".to_owned(),
        ResponseCode::Refused => "REFUSED".to_owned(),
        ResponseCode::FormErr => "FORMERR".to_owned(),
        ResponseCode::NotImp => "NOTIMP".to_owned(),
        other => format!("{} (rcode {})", other.to_str(), u16::from(other)),
    }
}

/// Map hickory's error to ours. `query` says what was asked.
fn classify(error: NetError, query: DnsQuery) -> DnsError {
    match error {
        NetError::Dns(HickoryDnsError::NoRecordsFound(no)) => {
            if no.response_code == ResponseCode::NXDomain {
                DnsError::NxDomain { query }
            } else {
                DnsError::NoRecords { query }
            }
        }
        NetError::Dns(HickoryDnsError::ResponseCode(code)) => DnsError::ServerFailure {
            query,
            rcode: rcode_name(code),
        },
        NetError::Dns(HickoryDnsError::DnssecBogus) => DnsError::BadResponse {
            query,
            detail: "DNSSEC validation failed".to_owned(),
        },
        NetError::Timeout => DnsError::Timeout { query },
        NetError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => DnsError::Timeout { query },
        NetError::Io(e) => DnsError::Network {
            query,
            detail: e.to_string(),
        },
        NetError::NoConnections => DnsError::Network {
            query,
            detail: "no connection to any nameserver".to_owned(),
        },
        NetError::Busy => DnsError::Network {
            query,
            detail: "resolver busy".to_owned(),
        },
        NetError::Proto(e) => DnsError::BadResponse {
            query,
            detail: e.to_string(),
        },
        NetError::Truncated => DnsError::BadResponse {
            query,
            detail: "response truncated even over TCP".to_owned(),
        },
        NetError::QueryCaseMismatch | NetError::ForeignClassRecord { .. } => {
            DnsError::BadResponse {
                query,
                detail: error.to_string(),
            }
        }
        other => DnsError::BadResponse {
            query,
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_a_name_for_validating_lookups() {
        assert!(validator_name(".").unwrap().is_root());
        assert!(absolute_name(".").is_err());
        assert_eq!(
            validator_name("mx.example").unwrap().to_ascii(),
            "mx.example."
        );
    }

    #[test]
    fn only_the_answers_own_rrsets_are_judged() {
        use hickory_resolver::proto::rr::rdata::{A, CNAME};
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let q = n("_25._tcp.mx.example.");
        let records = vec![
            Record::from_rdata(q.clone(), 60, RData::CNAME(CNAME(n("_25._tcp.mx.other.")))),
            Record::from_rdata(n("_25._tcp.mx.other."), 60, RData::A(A::new(192, 0, 2, 1))),
            // Appended by someone on the path: not part of the answer.
            Record::from_rdata(n("x.unsigned.example."), 60, RData::A(A::new(192, 0, 2, 9))),
            Record::from_rdata(n("_25._tcp.mx.other."), 60, RData::A(A::new(192, 0, 2, 2))),
        ];
        let got = chain_records(&q, RecordType::A, &records);
        let names: Vec<String> = got.iter().map(|r| r.name.to_ascii()).collect();
        assert_eq!(
            names,
            [
                "_25._tcp.mx.example.",
                "_25._tcp.mx.other.",
                "_25._tcp.mx.other."
            ]
        );
        // A chain that loops ends.
        let looped = vec![
            Record::from_rdata(q.clone(), 60, RData::CNAME(CNAME(n("a.example.")))),
            Record::from_rdata(n("a.example."), 60, RData::CNAME(CNAME(q.clone()))),
        ];
        assert!(chain_records(&q, RecordType::A, &looped).len() <= 16);
    }

    #[test]
    fn names() {
        assert_eq!(
            normalize(&Name::from_ascii("MX1.Example.COM.").unwrap()),
            "mx1.example.com"
        );
        assert_eq!(normalize(&Name::root()), "");
        assert!(absolute_name("").is_err());
        assert!(absolute_name(".").is_err());
        assert!(absolute_name("a..b").is_err());
        let n = absolute_name("example.com").unwrap();
        assert!(n.is_fqdn());
        assert_eq!(
            normalize(&absolute_name("bücher.example.").unwrap()),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn messages_name_the_lookup() {
        let q = DnsQuery {
            kind: RecordKind::Mx,
            name: "example.com".to_owned(),
        };
        assert_eq!(
            DnsError::Timeout { query: q.clone() }.to_string(),
            "DNS lookup of MX for example.com timed out (no nameserver answered)"
        );
        let e = DnsError::ServerFailure {
            query: q,
            rcode: "SERVFAIL".to_owned(),
        };
        assert!(e.is_temporary());
        assert_eq!(
            e.to_string(),
            "DNS lookup of MX for example.com failed: the nameserver answered SERVFAIL"
        );
    }
}
