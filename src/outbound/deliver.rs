//! One delivery attempt to one destination: route (MX or fixed relay), connect to each
//! host and address in order, run the SMTP client with the TLS level the policy demands,
//! and classify every failure into a cause with its enhanced status code (docs/ARCHITECTURE.md, "Status codes").
//!
//! Under `encrypt` or `verify`, a missing STARTTLS, a failed handshake or a failed
//! certificate check moves on to the next host and finally defers; it never falls back to
//! plaintext (invariant 2). Under `may`, a failed handshake retries the same host once in
//! plaintext, as Postfix does, and says so in the log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::route::{Hop, resolve_route};
use rustls::RootCertStore;

use super::tls::{
    CertFailure, Connector, TlsFailure, TlsLevel, TlsOutcome, TlsRequirement, Verification,
};
use crate::dns::Resolver;
use crate::policy::cause::{Cause, StsProblem};
use crate::policy::{Dnssec, DomainDecision, Facts, HostFacts, HostVerdict, TlsPolicy, TlsaLookup};
use crate::smtp::client::{
    Client, ClientParams, Event, Outgoing, RcptOutcome, SessionError, StartTls,
};
use crate::smtp::session::Envelope;

/// Where a destination's mail goes.
#[derive(Debug, Clone)]
pub enum NextHop {
    /// MX lookup for the domain, port from the config.
    Mx,
    /// A fixed host and port (smarthost / internal server), optionally with implicit TLS
    /// (port 465) and AUTH credentials (sent only inside TLS).
    Relay {
        host: String,
        port: u16,
        implicit_tls: bool,
        auth: Option<(String, String)>,
    },
}

/// Shared settings for outbound connections.
#[derive(Debug)]
pub struct Outbound {
    pub resolver: Resolver,
    pub connector: Connector,
    pub helo_name: String,
    /// Names that mean "this server" for MX loop detection.
    pub our_names: Vec<String>,
    pub port: u16,
    pub connect_timeout: Duration,
    /// Sessions kept open after a transaction, for the next message to the same place.
    pub pool: Pool,
    /// Addresses our own SMTP listeners are bound to: delivering there would loop.
    pub our_addrs: Vec<SocketAddr>,
    /// DANE (validating resolver and its self-check); `None` when disabled.
    pub dane: Option<Arc<crate::dane::Dane>>,
    /// Where the results of MX sessions are counted for the TLS-RPT reports we send.
    pub tlsrpt: Option<Arc<crate::tlsrpt::results::Results>>,
}

/// Counts the TLS sessions of one delivery for TLS-RPT (RFC 8460 §4.4): under which policy
/// each host was tried and how it went.
struct Recorder<'a> {
    results: &'a crate::tlsrpt::results::Results,
    domain: &'a str,
    sts: Option<&'a crate::sts::Applied>,
}

impl Recorder<'_> {
    fn policy(&self, req: Option<&TlsRequirement>, host: &str) -> crate::tlsrpt::results::PolicyId {
        use crate::tlsrpt::results::PolicyId;
        if let Some(d) = req.and_then(|r| r.dane.as_ref()) {
            return PolicyId {
                kind: "tlsa",
                domain: if d.base.is_empty() {
                    host.to_string()
                } else {
                    d.base.clone()
                },
                strings: d.records.iter().map(ToString::to_string).collect(),
                mx_hosts: Vec::new(),
            };
        }
        match self.sts {
            Some(p) => PolicyId {
                kind: "sts",
                domain: self.domain.to_string(),
                strings: p
                    .entry
                    .policy
                    .to_text()
                    .lines()
                    .map(|l| l.trim_end().to_string())
                    .filter(|l| !l.is_empty())
                    .collect(),
                mx_hosts: p
                    .entry
                    .policy
                    .mx
                    .iter()
                    .map(|m| m.as_str().to_string())
                    .collect(),
            },
            None => PolicyId {
                kind: "no-policy-found",
                domain: self.domain.to_string(),
                strings: Vec::new(),
                mx_hosts: Vec::new(),
            },
        }
    }

    /// A host not tried, for a cause of its own: DNSSEC or TLSA trouble counts as a failed
    /// session under its `tlsa` policy, an MX host outside an `enforce` policy as one under
    /// `sts` (under testing it is tried, and counted, like any other).
    fn skipped(&self, host: &str, cause: Cause) {
        let req = match cause {
            Cause::StsMxMismatch
                if self
                    .sts
                    .is_some_and(|p| p.mode() == crate::sts::policy::Mode::Enforce) =>
            {
                None
            }
            Cause::DaneDnssec | Cause::DaneNoMatch | Cause::DaneStartTls => Some(TlsRequirement {
                dane: Some(Arc::new(crate::policy::DaneTrust {
                    records: Vec::new(),
                    names: Vec::new(),
                    base: host.to_string(),
                })),
                ..TlsRequirement::default()
            }),
            _ => return,
        };
        self.session(req.as_ref(), host, None, Err(cause));
    }

    /// One session with `host` at `ip`: `Ok` it had TLS as required, `Err` the cause.
    /// Causes that are not about TLS (a refused connection) are no TLS session and not counted.
    fn session(
        &self,
        req: Option<&TlsRequirement>,
        host: &str,
        ip: Option<IpAddr>,
        outcome: Result<(), Cause>,
    ) {
        let policy = self.policy(req, host);
        let failure = match outcome {
            Ok(()) => None,
            Err(cause) => {
                let Some(result_type) = cause.tlsrpt_result() else {
                    return;
                };
                Some(crate::tlsrpt::results::Failed {
                    result_type,
                    receiving_mx_hostname: host.to_string(),
                    receiving_ip: ip.map(|i| i.to_string()).unwrap_or_default(),
                    reason_code: cause.label(),
                    ..Default::default()
                })
            }
        };
        self.results
            .record(crate::util::unix_now(), &policy, failure.as_ref());
    }
}

/// How long an idle outbound session is kept for reuse.
const IDLE_LIMIT: Duration = Duration::from_secs(3);
/// Idle sessions kept per destination key. Above the usual per-destination parallelism, so
/// a burst of parallel deliveries can all hand their sessions on (the relay benchmark showed
/// 8 capping reuse at about 15 messages per connection with 20 parallel deliveries); idle
/// sessions are cheap and closed after `IDLE_LIMIT` anyway.
const IDLE_PER_KEY: usize = 64;

/// A plain or TLS outbound stream.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open session between transactions.
struct Idle {
    conn: Conn,
    client: Client,
    tls: String,
    /// The TLS session (`None`: plaintext).
    seen: Option<TlsOutcome>,
    since: std::time::Instant,
}

/// Idle sessions by destination key (address, host name and the exact TLS requirement, so a
/// session opened under one policy is never reused under a stricter one).
#[derive(Default)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Idle>>>,
    reaper: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

/// Says QUIT and closes, in the background.
fn close(mut idle: Idle) {
    tokio::spawn(async move {
        idle.client.quit();
        let out = idle.client.take_output();
        let _ = timeout(Duration::from_secs(2), async {
            let _ = idle.conn.write_all(&out).await;
            let _ = idle.conn.shutdown().await;
        })
        .await;
    });
}

impl Pool {
    fn take(&self, key: &str) -> Option<Idle> {
        let mut map = self.inner.idle.lock().ok()?;
        let list = map.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < IDLE_LIMIT {
                return Some(idle);
            }
            close(idle);
        }
        None
    }

    fn put(&self, key: String, idle: Idle) {
        let Ok(mut map) = self.inner.idle.lock() else {
            return;
        };
        let list = map.entry(key).or_default();
        if list.len() >= IDLE_PER_KEY {
            close(idle);
            return;
        }
        list.push(idle);
        drop(map);
        if !self
            .inner
            .reaper
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            // Closes sessions nobody reused, for the life of the process.
            let inner = self.inner.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    inner.expire();
                }
            });
        }
    }
}

impl PoolInner {
    fn expire(&self) {
        let Ok(mut map) = self.idle.lock() else {
            return;
        };
        for list in map.values_mut() {
            let (old, keep): (Vec<Idle>, Vec<Idle>) = list
                .drain(..)
                .partition(|i| i.since.elapsed() >= IDLE_LIMIT);
            *list = keep;
            old.into_iter().for_each(close);
        }
        map.retain(|_, l| !l.is_empty());
    }
}

/// Why a recipient was not delivered this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: Cause,
    /// Enhanced status code, `4.x.y` while retrying makes sense, `5.x.y` when it does not:
    /// the cause's own, or the remote's for [`Cause::Remote`].
    pub status: String,
    pub permanent: bool,
    /// A transport-security failure (TLS required but not achieved): 24 h lifetime.
    pub security: bool,
    pub remote: Option<String>,
    /// The cause in words, or the remote reply verbatim.
    pub reason: String,
}

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// `dsn_passed`: the next hop took our DSN parameters, so success notices are its job.
    Delivered {
        remote: String,
        reply: String,
        dsn_passed: bool,
        /// How the message travelled, for the report page and metrics.
        tls: crate::report::TlsClass,
        auth: crate::report::AuthClass,
    },
    NotDelivered(Failure),
}

/// What one connection attempt to one address achieved.
enum HostResult {
    /// Outcomes, TLS summary, and whether the server supports DSN.
    /// Also the TLS session (`None`: plaintext).
    Done(Vec<RcptOutcome>, String, bool, Option<TlsOutcome>),
    /// A failure of this host; try the next one.
    Failed(Failure),
    /// Handshake failed under `may`: try the same address again without TLS.
    RetryPlain(Failure),
}

/// A failure with `cause`'s own code and security class.
pub(crate) fn failure(cause: Cause, remote: Option<String>, reason: String) -> Failure {
    Failure {
        cause,
        permanent: cause.is_permanent(),
        status: cause.code(false).unwrap_or("4.0.0").to_string(),
        security: cause.security(),
        remote,
        reason,
    }
}

/// A refusal in the remote server's words: its code (or the class's default) is the status.
fn remote_failure(enhanced: Option<&str>, permanent: bool, host: &str, reason: String) -> Failure {
    let fallback = if permanent { "5.0.0" } else { "4.0.0" };
    Failure {
        cause: Cause::Remote,
        permanent,
        status: enhanced.unwrap_or(fallback).to_string(),
        security: false,
        remote: Some(host.to_string()),
        reason,
    }
}

/// Gathers the facts of a delivery to `domain` (the rules, and for MX delivery the domain's
/// MTA-STS policy from the cache or a fetch, and whether DANE can be used) and asks the
/// policy room for the decision; the per-host DANE facts follow after routing.
pub async fn decide(
    out: &Outbound,
    rules: &TlsPolicy,
    sts: Option<&crate::sts::Sts>,
    domain: &str,
    hop: &NextHop,
    envelope: &Envelope,
    tls_required_no: bool,
) -> DomainDecision {
    let applied = match (sts, hop) {
        (Some(s), NextHop::Mx) => s.policy_for(domain).await,
        _ => None,
    };
    let sts_roots = |rule: Option<&Arc<RootCertStore>>| match sts {
        Some(s) => s.roots_for(rule),
        None => rule.cloned(),
    };
    let decision = crate::policy::decide(&Facts {
        rules,
        sender: &envelope.sender,
        domain,
        recipients: &envelope.recipients,
        mta_sts: applied.as_ref(),
        sts_roots: &sts_roots,
        requiretls: envelope.requiretls,
        tls_required_no,
        dane_unavailable: match (&out.dane, hop) {
            (_, NextHop::Relay { .. }) => Some("DANE is used for MX delivery only".into()),
            (None, _) => Some("DANE is disabled ([dane] enabled = false)".into()),
            (Some(d), NextHop::Mx) => d.unavailable(),
        },
    });
    if tls_required_no && !envelope.requiretls && rules.honour_tls_required_no {
        let what = match (&applied, &out.dane, hop) {
            (Some(p), _, _) if p.mode() != crate::sts::policy::Mode::None => Some("mta_sts"),
            (_, Some(_), NextHop::Mx) => Some("dane"),
            _ => None,
        };
        if let Some(what) = what {
            tracing::info!(domain, set_aside = what, why = %decision.why,
                "TLS-Required: No: the message is delivered without MTA-STS and DANE (RFC 8689)");
            crate::metrics::inc(
                crate::metrics::Metric::TlsRequiredNoTotal,
                &[("what", what)],
            );
        }
    }
    decision
}

/// Delivers `msg` to `domain` under `decision`; one result per recipient of `msg`, in order.
pub async fn deliver(
    out: &Outbound,
    queue_id: &str,
    domain: &str,
    hop: &NextHop,
    decision: &DomainDecision,
    msg: Outgoing,
) -> Vec<RcptResult> {
    let n = msg.recipients.len();
    let all = |f: Failure| vec![RcptResult::NotDelivered(f); n];
    let sts = decision
        .mta_sts
        .as_ref()
        .filter(|_| matches!(hop, NextHop::Mx));
    let hosts: Vec<Hop> = match hop {
        NextHop::Mx => match resolve_route(&out.resolver, domain, &out.our_names).await {
            Ok(h) => h,
            Err(e) => {
                return all(failure(e.cause(), None, e.reply()));
            }
        },
        NextHop::Relay { host, .. } => match host.parse::<IpAddr>() {
            Ok(ip) => vec![Hop {
                host: host.clone(),
                preference: 0,
                addrs: vec![ip],
            }],
            Err(_) => match out.resolver.addresses(host).await {
                Ok(addrs) => vec![Hop {
                    host: host.clone(),
                    preference: 0,
                    addrs,
                }],
                Err(e) => {
                    let cause = if e.is_temporary() {
                        Cause::DnsFailure
                    } else {
                        Cause::NoMailHost
                    };
                    return all(failure(cause, None, format!("relay host {host}: {e}")));
                }
            },
        },
    };
    // The policy judges each host (DANE first, then MTA-STS: under enforce only MX hosts
    // the policy names are tried; under testing the others are tried too and reported).
    let mut sts_notes: Vec<String> = Vec::new();
    let mut own: Vec<Option<(TlsRequirement, crate::policy::Why)>> = Vec::new();
    let mut skipped: Vec<(String, Cause, String)> = Vec::new();
    let mut unmatched: Vec<String> = Vec::new();
    let mut kept: Vec<Hop> = Vec::new();
    if let Some(why) = &decision.dane_off
        && why.ends_with("by rule")
    {
        tracing::warn!(queue_id, domain, reason = %why, "DANE switched off by a rule for this delivery");
    }
    let dane_port = match hop {
        NextHop::Relay { port, .. } => *port,
        NextHop::Mx => out.port,
    };
    let dane = dane_facts(out, decision, domain, dane_port, &hosts).await;
    let recorder = match (&out.tlsrpt, hop) {
        (Some(results), NextHop::Mx) if !crate::policy::is_tlsrpt_report(&msg.message) => {
            Some(Recorder {
                results,
                domain,
                sts,
            })
        }
        _ => None,
    };
    for (h, d) in hosts.into_iter().zip(dane) {
        let facts = HostFacts {
            host: &h.host,
            mx: &d.mx,
            addresses: &d.addresses,
            tlsa: &d.tlsa,
        };
        match decision.for_host(&facts) {
            HostVerdict::Use { note } => {
                if note.is_some() {
                    unmatched.push(h.host.clone());
                }
                own.push(None);
                kept.push(h);
            }
            HostVerdict::Own { requirement, why } => {
                tracing::info!(queue_id, domain, host = %h.host, level = requirement.level_name(), %why, "TLS requirement of this host");
                own.push(Some((*requirement, why)));
                kept.push(h);
            }
            HostVerdict::Skip(cause, words) => {
                if let Some(r) = &recorder {
                    r.skipped(&h.host, cause);
                }
                if cause == Cause::StsMxMismatch {
                    unmatched.push(h.host.clone());
                } else {
                    tracing::warn!(queue_id, domain, host = %h.host, %cause, reason = %words, "host not used");
                }
                skipped.push((h.host.clone(), cause, words));
            }
        }
    }
    let hosts = kept;
    if let Some(p) = sts
        && !unmatched.is_empty()
    {
        let patterns: Vec<&str> = p.entry.policy.mx.iter().map(|m| m.as_str()).collect();
        let what = format!(
            "MX host(s) {} not covered by the policy's mx patterns ({})",
            unmatched.join(", "),
            patterns.join(", ")
        );
        if p.mode() == crate::sts::policy::Mode::Enforce {
            if hosts.is_empty() && skipped.iter().all(|(_, c, _)| *c == Cause::StsMxMismatch) {
                // A host the policy allows may exist but have had no usable address: that
                // is a DNS failure, not a policy mismatch.
                if let Ok(crate::dns::MxAnswer::Records(r)) = out.resolver.mx(domain).await
                    && let Some((_, h)) = r
                        .iter()
                        .find(|(_, h)| !h.is_empty() && p.entry.policy.matches_mx(h))
                {
                    return all(failure(
                        Cause::DnsFailure,
                        Some(h.clone()),
                        format!(
                            "{h}, the MX host of {domain} that its MTA-STS policy allows, has no usable address (DNS lookup failed); {}",
                            p.describe()
                        ),
                    ));
                }
                tracing::warn!(queue_id, domain, policy = %p.describe(), %what, "MTA-STS: no MX host matches");
                return all(failure(
                    Cause::StsMxMismatch,
                    None,
                    format!(
                        "MX hosts of {domain} failed MTA-STS validation: {what}; {}",
                        p.describe()
                    ),
                ));
            }
        } else {
            tracing::warn!(queue_id, domain, policy = %p.describe(), %what,
                "MTA-STS testing: enforce would skip these MX hosts");
            sts_notes.push(format!("would skip {}", unmatched.join(", ")));
        }
    }
    // A temporary reason beats a permanent one: a REQUIRETLS message whose only
    // authenticated host had a DNS failure waits for it rather than bouncing.
    if hosts.is_empty()
        && let Some((host, cause, words)) = skipped
            .iter()
            .find(|(_, c, _)| *c != Cause::StsMxMismatch && !c.is_permanent())
            .or_else(|| skipped.iter().find(|(_, c, _)| *c != Cause::StsMxMismatch))
            .or(skipped.first())
    {
        return all(failure(
            *cause,
            Some(host.clone()),
            format!("{host}: {words}"),
        ));
    }
    let port = match hop {
        NextHop::Relay { port, .. } => *port,
        NextHop::Mx => out.port,
    };
    // RFC 5321 §5.1: never deliver to ourselves, even when the MX names another host.
    let ours = |ip: &IpAddr| out.our_addrs.contains(&SocketAddr::new(*ip, port));
    if let Some((h, ip)) = hosts
        .iter()
        .flat_map(|h| h.addrs.iter().map(move |ip| (h, ip)))
        .find(|(_, ip)| ours(ip))
        && hosts.iter().all(|h| h.addrs.iter().all(ours))
    {
        return all(failure(
            Cause::MailLoop,
            Some(h.host.clone()),
            format!(
                "mail for {domain} loops back to myself: {} resolves to this server's own address {ip}:{port}",
                h.host
            ),
        ));
    }
    let mut last: Option<Failure> = None;
    for (h, own) in hosts.iter().zip(&own) {
        let (req, why) = match own {
            Some((r, w)) => (r, w),
            None => (&decision.requirement, &decision.why),
        };
        // MTA-STS is not applied to a host DANE governs.
        let sts = sts.filter(|_| req.dane.is_none());
        for ip in h.addrs.iter().filter(|ip| !ours(ip)) {
            let addr = SocketAddr::new(*ip, port);
            let (implicit_tls, auth) = match hop {
                NextHop::Relay {
                    implicit_tls, auth, ..
                } => (*implicit_tls, auth.as_ref()),
                NextHop::Mx => (false, None),
            };
            let who = Attempt {
                queue_id,
                domain,
                why,
                host: &h.host,
                addr,
                implicit_tls,
                auth,
            };
            let mut result = attempt(out, &who, req, msg.clone(), false).await;
            let mut handshake_failed = None;
            if let HostResult::RetryPlain(f) = &result {
                handshake_failed = Some(f.reason.clone());
                if let Some(r) = &recorder {
                    r.session(Some(req), &h.host, Some(*ip), Err(f.cause));
                }
                result = attempt(out, &who, req, msg.clone(), true).await;
            }
            if let Some(r) = &recorder
                && req.level != crate::policy::TlsLevel::None
            {
                match &result {
                    HostResult::Done(_, _, _, Some(_)) => {
                        r.session(Some(req), &h.host, Some(*ip), Ok(()))
                    }
                    // Plaintext after a failed handshake: that session was counted above.
                    HostResult::Done(_, _, _, None) if handshake_failed.is_none() => {
                        r.session(
                            Some(req),
                            &h.host,
                            Some(*ip),
                            Err(Cause::StartTlsNotOffered),
                        );
                    }
                    HostResult::Failed(f) => r.session(Some(req), &h.host, Some(*ip), Err(f.cause)),
                    _ => {}
                }
            }
            match result {
                HostResult::Done(outcomes, mut tls, dsn, seen) => {
                    let classes = classify(seen.as_ref(), req);
                    if let Some(p) = sts {
                        // What enforce would have said about this session.
                        let why = match (seen.as_ref().map(|o| &o.verification), &handshake_failed)
                        {
                            (Some(Verification::Verified), _) if req.match_names.is_empty() => None,
                            (Some(Verification::Verified), _) => Some(
                                "not checked against the MX host name (a rule names other hosts)"
                                    .to_string(),
                            ),
                            (Some(Verification::Trusted), _) => Some("name mismatch".into()),
                            (Some(Verification::Untrusted(c)), _) => {
                                Some(crate::sts::cert_reason(c).to_string())
                            }
                            (None, Some(f)) => Some(format!("handshake failed ({f})")),
                            (None, None) => Some("starttls not offered".into()),
                            // Not reached: MTA-STS is not applied to a DANE host.
                            (Some(Verification::Dane(_)), _) => None,
                        };
                        if p.mode() == crate::sts::policy::Mode::Testing
                            && let Some(why) = why
                        {
                            tracing::warn!(queue_id, domain, host = %h.host, policy = %p.describe(),
                                reason = %why, "MTA-STS testing: enforce would have refused this delivery");
                            sts_notes.push(format!("would fail: {why}"));
                        }
                        tls = if sts_notes.is_empty() {
                            format!("{tls}; {}", p.describe())
                        } else {
                            format!("{tls}; {}: {}", p.describe(), sts_notes.join("; "))
                        };
                    }
                    return outcomes
                        .into_iter()
                        .map(|o| rcpt_result(o, &h.host, &tls, dsn, classes))
                        .collect();
                }
                HostResult::Failed(f) | HostResult::RetryPlain(f) => {
                    // Keep the most telling cause: a security or protocol failure says more
                    // than a refused connection to a backup host.
                    let better = match &last {
                        None => true,
                        Some(prev) => f.security || !prev.security,
                    };
                    if better {
                        last = Some(f);
                    }
                }
            }
        }
    }
    let mut last = last.unwrap_or_else(|| {
        failure(
            Cause::NoUsableHost,
            None,
            format!("no usable host for {domain}"),
        )
    });
    if let Some(p) = sts {
        last.reason = format!("{}; {}", last.reason, p.describe());
    }
    all(last)
}

/// The DNSSEC facts of one host, for the DANE judgement.
#[derive(Debug, Clone)]
pub struct DaneFacts {
    pub mx: Dnssec,
    pub addresses: Dnssec,
    pub tlsa: TlsaLookup,
}

/// The DANE facts of each host (in order), looked up through the validating resolver when
/// the decision lets DANE apply: the MX RRset's state once, then per host its address
/// records' state and, on a secure path, its TLSA records (RFC 7672 §2.1-2.2).
pub async fn dane_facts(
    out: &Outbound,
    decision: &DomainDecision,
    domain: &str,
    port: u16,
    hosts: &[Hop],
) -> Vec<DaneFacts> {
    let none = || DaneFacts {
        mx: Dnssec::Insecure,
        addresses: Dnssec::Insecure,
        tlsa: TlsaLookup::NotLooked,
    };
    let Some(dane) = out.dane.as_ref().filter(|_| decision.dane_off.is_none()) else {
        return hosts.iter().map(|_| none()).collect();
    };
    let v = &dane.validator;
    let (mx, mut validated) = v.mx_hosts(domain).await;
    if validated.is_empty() {
        // A secure denial: the domain itself is the host (RFC 7672 §2.2.2).
        validated.push(domain.to_string());
    }
    let mut facts = Vec::with_capacity(hosts.len());
    for h in hosts {
        if matches!(mx, Dnssec::Insecure) {
            facts.push(none());
            continue;
        }
        // The hosts came from the routing resolver, which does not validate: under a secure
        // MX RRset only the hosts it names may be used.
        if mx == Dnssec::Secure && !validated.contains(&h.host) {
            facts.push(DaneFacts {
                mx: mx.clone(),
                addresses: Dnssec::Bogus(format!(
                    "{} is not among the DNSSEC-validated MX hosts of {domain} ({})",
                    h.host,
                    validated.join(", ")
                )),
                tlsa: TlsaLookup::NotLooked,
            });
            continue;
        }
        let (addresses, expanded) = v.addresses_expanded(&h.host).await;
        let tlsa = if crate::policy::dane_applies(&mx, &addresses) {
            v.tlsa_for_host(&h.host, expanded.as_deref(), port).await
        } else {
            TlsaLookup::NotLooked
        };
        facts.push(DaneFacts {
            mx: mx.clone(),
            addresses,
            tlsa,
        });
    }
    facts
}

/// Counts an outbound handshake in the metrics and passes its result on.
fn count_handshake<T>(
    r: Result<(T, TlsOutcome), TlsFailure>,
) -> Result<(T, TlsOutcome), TlsFailure> {
    match &r {
        Ok((_, o)) => crate::metrics::inc(
            crate::metrics::Metric::TlsHandshakesTotal,
            &[
                ("direction", "out"),
                ("version", &o.version),
                ("cipher", &o.cipher),
            ],
        ),
        Err(e) => {
            let cause = match e {
                TlsFailure::Certificate(c) => crate::sts::cert_reason(c),
                TlsFailure::Handshake(_) => "handshake",
                TlsFailure::Timeout => "timeout",
            };
            crate::metrics::inc(
                crate::metrics::Metric::TlsHandshakeFailuresTotal,
                &[("direction", "out"), ("cause", cause)],
            );
        }
    }
    r
}

/// The report's view of a session: TLS version, and how the server was authenticated
/// (`MtaSts` under an enforce policy, `Verified` under a `verify` rule, `Opportunistic` for TLS
/// that was not required to verify).
fn classify(
    seen: Option<&TlsOutcome>,
    req: &TlsRequirement,
) -> (crate::report::TlsClass, crate::report::AuthClass) {
    use crate::report::{AuthClass, TlsClass};
    let Some(o) = seen else {
        return (TlsClass::Plaintext, AuthClass::Plaintext);
    };
    let tls = if o.version == "TLSv1.3" {
        TlsClass::Tls13
    } else {
        TlsClass::Tls12
    };
    let auth = match o.verification {
        Verification::Dane(_) => AuthClass::Dane,
        Verification::Verified if req.mta_sts => AuthClass::MtaSts,
        Verification::Verified if req.level >= TlsLevel::Verify => AuthClass::Verified,
        _ => AuthClass::Opportunistic,
    };
    (tls, auth)
}

fn rcpt_result(
    o: RcptOutcome,
    host: &str,
    tls: &str,
    dsn_passed: bool,
    classes: (crate::report::TlsClass, crate::report::AuthClass),
) -> RcptResult {
    match o {
        RcptOutcome::Delivered(r) => RcptResult::Delivered {
            remote: host.to_string(),
            reply: format!("{} ({tls})", r.one_line()),
            dsn_passed,
            tls: classes.0,
            auth: classes.1,
        },
        RcptOutcome::Refused(r) => RcptResult::NotDelivered(remote_failure(
            r.enhanced(),
            r.is_permanent(),
            host,
            format!("{host} said: {}", r.one_line()),
        )),
        RcptOutcome::NoRequireTls => RcptResult::NotDelivered(failure(
            Cause::RequireTlsNotOffered,
            Some(host.to_string()),
            format!("{host} does not offer REQUIRETLS, which the message demands (RFC 8689)"),
        )),
        RcptOutcome::NotSent {
            permanent,
            enhanced,
            text,
        } => RcptResult::NotDelivered(remote_failure(
            Some(enhanced),
            permanent,
            host,
            format!("{host}: {text}"),
        )),
    }
}

/// Who an attempt is for, for its log line.
struct Attempt<'a> {
    queue_id: &'a str,
    domain: &'a str,
    /// Why the requirement is what it is (the policy room's words).
    why: &'a crate::policy::Why,
    host: &'a str,
    addr: SocketAddr,
    implicit_tls: bool,
    auth: Option<&'a (String, String)>,
}

/// One connection attempt, logged as one line: destination, address, TLS (version, cipher,
/// verification) or plaintext, and the outcome.
async fn attempt(
    out: &Outbound,
    who: &Attempt<'_>,
    req: &TlsRequirement,
    msg: Outgoing,
    plain: bool,
) -> HostResult {
    let mut tls = String::from("none");
    let mut result = attempt_inner(out, who, req, msg, plain, &mut tls).await;
    // A host that cannot carry a REQUIRETLS message is a failure of that host: the next
    // one may offer it (RFC 8689 §4.2.1).
    if let HostResult::Done(r, ..) = &result
        && !r.is_empty()
        && r.iter().all(|o| *o == RcptOutcome::NoRequireTls)
    {
        result = HostResult::Failed(failure(
            Cause::RequireTlsNotOffered,
            Some(who.host.to_string()),
            format!(
                "{} does not offer REQUIRETLS, which the message demands (RFC 8689)",
                who.host
            ),
        ));
    }
    let outcome = match &result {
        HostResult::Done(r, ..) => {
            let ok = r
                .iter()
                .filter(|o| matches!(o, RcptOutcome::Delivered(_)))
                .count();
            format!("{ok} of {} recipient(s) accepted", r.len())
        }
        HostResult::Failed(f) => format!("{} {}", f.status, f.reason),
        HostResult::RetryPlain(f) => format!(
            "{} {}; retrying in plaintext (policy may)",
            f.status, f.reason
        ),
    };
    tracing::info!(queue_id = who.queue_id, domain = who.domain, host = who.host, ip = %who.addr,
        level = req.level_name(), mta_sts = req.mta_sts, %tls, %outcome, why = %who.why, "delivery attempt");
    result
}

async fn attempt_inner(
    out: &Outbound,
    who: &Attempt<'_>,
    req: &TlsRequirement,
    msg: Outgoing,
    plain: bool,
    tls_desc: &mut String,
) -> HostResult {
    let (host, addr) = (who.host, who.addr);
    // A session is reused only under the same credentials (user and password, hashed).
    let creds = who.auth.map(|(u, p)| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (u, p).hash(&mut h);
        h.finish()
    });
    let tag = format!("{}|{creds:?}", who.implicit_tls);
    let key = pool_key(addr, host, req, plain, &tag);
    if let Some(mut idle) = out.pool.take(&key) {
        let mut pending = Some(msg.clone());
        let mut buf = Vec::new();
        let step = drive(
            &mut idle.conn,
            &mut idle.client,
            &mut buf,
            &mut pending,
            true,
            true,
        )
        .await;
        match step {
            Step::Done(r) => {
                *tls_desc = format!("{} (session reused)", idle.tls);
                let (summary, dsn) = (idle.tls.clone(), idle.client.capabilities().dsn);
                let seen = idle.seen.clone();
                keep_or_close(out, key, idle, &buf);
                return HostResult::Done(r, summary, dsn, seen);
            }
            // The server closed the idle session meanwhile, or refused RSET: the message
            // was not offered; open a new session (and say so).
            Step::Failed(e) => {
                tracing::info!(queue_id = who.queue_id, host, ip = %addr, reason = %e,
                    "reusing an open session failed; opening a new one");
            }
            Step::StartTls => {
                tracing::info!(queue_id = who.queue_id, host, ip = %addr,
                    "reusing an open session failed (unexpected STARTTLS); opening a new one");
            }
        }
    }
    let remote = Some(host.to_string());
    let mut tcp = match timeout(out.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return HostResult::Failed(failure(
                Cause::ConnectionTimedOut,
                remote,
                format!("connection to {host} [{addr}] timed out"),
            ));
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return HostResult::Failed(failure(
                Cause::ConnectionRefused,
                remote,
                format!(
                    "connection to {host} [{addr}] refused (nothing listening, or the port is blocked by a firewall)"
                ),
            ));
        }
        Ok(Err(e)) => {
            return HostResult::Failed(failure(
                Cause::ConnectFailed,
                remote,
                format!("cannot connect to {host} [{addr}]: {e}"),
            ));
        }
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    let mut buf = Vec::new();
    let mut pending = Some(msg);
    if who.implicit_tls {
        // RFC 8314: TLS first; no plaintext fallback exists on such a port.
        let (tls, outcome) = match count_handshake(out.connector.handshake(tcp, host, req).await) {
            Ok(x) => x,
            Err(e) => return HostResult::Failed(tls_failure(&e, host, req)),
        };
        let summary = tls_summary(&outcome);
        *tls_desc = summary.clone();
        let client = Client::new(ClientParams {
            helo_name: out.helo_name.clone(),
            starttls: StartTls::Never,
            implicit_tls: true,
            auth: who.auth.cloned(),
        });
        return over_tls(out, key, host, tls, client, buf, pending, summary, outcome).await;
    }
    let starttls = match (req.level, plain) {
        (TlsLevel::None, _) | (TlsLevel::May, true) => StartTls::Never,
        (TlsLevel::May, false) => StartTls::Opportunistic,
        (TlsLevel::Encrypt | TlsLevel::Verify, _) => StartTls::Required,
    };
    let mut client = Client::new(ClientParams {
        helo_name: out.helo_name.clone(),
        starttls,
        implicit_tls: false,
        auth: who.auth.cloned(),
    });
    match drive(&mut tcp, &mut client, &mut buf, &mut pending, true, false).await {
        Step::StartTls => {}
        Step::Done(r) => {
            *tls_desc = "plaintext".into();
            let dsn = client.capabilities().dsn;
            let idle = Idle {
                conn: Conn::Plain(tcp),
                client,
                tls: "plaintext".into(),
                seen: None,
                since: std::time::Instant::now(),
            };
            keep_or_close(out, key, idle, &buf);
            return HostResult::Done(r, "plaintext".into(), dsn, None);
        }
        Step::Failed(f) => return HostResult::Failed(before_tls_failure(f, host, req)),
    }
    // CVE-2021-38371: nothing the server sent after its 220 is kept.
    buf.clear();
    let (tls, outcome) = match count_handshake(out.connector.handshake(tcp, host, req).await) {
        Ok(x) => x,
        Err(e) => {
            let f = tls_failure(&e, host, req);
            return if req.level == TlsLevel::May {
                HostResult::RetryPlain(f)
            } else {
                HostResult::Failed(f)
            };
        }
    };
    let summary = tls_summary(&outcome);
    *tls_desc = summary.clone();
    client.tls_established();
    over_tls(out, key, host, tls, client, buf, pending, summary, outcome).await
}

/// Runs the rest of a session over an established TLS stream; keeps it for reuse if clean.
#[allow(clippy::too_many_arguments)]
async fn over_tls(
    out: &Outbound,
    key: String,
    host: &str,
    mut tls: tokio_rustls::client::TlsStream<TcpStream>,
    mut client: Client,
    mut buf: Vec<u8>,
    mut pending: Option<Outgoing>,
    summary: String,
    outcome: TlsOutcome,
) -> HostResult {
    match drive(&mut tls, &mut client, &mut buf, &mut pending, true, false).await {
        Step::Done(r) => {
            let dsn = client.capabilities().dsn;
            let idle = Idle {
                conn: Conn::Tls(Box::new(tls)),
                client,
                tls: summary.clone(),
                seen: Some(outcome.clone()),
                since: std::time::Instant::now(),
            };
            keep_or_close(out, key, idle, &buf);
            HostResult::Done(r, summary, dsn, Some(outcome))
        }
        Step::Failed(f) => HostResult::Failed(session_failure(f, host)),
        Step::StartTls => HostResult::Failed(failure(
            Cause::ConnectionLost,
            Some(host.to_string()),
            "STARTTLS inside TLS".into(),
        )),
    }
}

/// Pool key: the address, the name we verified against, and the whole TLS requirement.
fn pool_key(addr: SocketAddr, host: &str, req: &TlsRequirement, plain: bool, tag: &str) -> String {
    let pins: Vec<String> = req.pins.iter().map(|p| p.to_string()).collect();
    let roots = req
        .extra_roots
        .as_ref()
        .map_or(0, |r| Arc::as_ptr(r) as usize);
    let dane: Vec<String> = req
        .dane
        .iter()
        .flat_map(|d| {
            d.records
                .iter()
                .map(|r| r.to_string())
                .chain(d.names.clone())
        })
        .collect();
    format!(
        "{addr}|{host}|{}|{plain}|{:?}|{pins:?}|{roots}|{}|{dane:?}|{tag}",
        req.level.as_str(),
        req.match_names,
        req.mta_sts
    )
}

/// Keeps a session for reuse when it ended cleanly, otherwise says QUIT and closes it.
fn keep_or_close(out: &Outbound, key: String, mut idle: Idle, unread: &[u8]) {
    if unread.is_empty() {
        idle.since = std::time::Instant::now();
        out.pool.put(key, idle);
    } else {
        close(idle);
    }
}

fn verification_word(v: &Verification) -> &'static str {
    match v {
        Verification::Verified => "verified",
        Verification::Dane(_) => "verified by DANE",
        Verification::Trusted => "trusted",
        Verification::Untrusted(_) => "untrusted",
    }
}

fn tls_summary(o: &TlsOutcome) -> String {
    format!(
        "{} with cipher {} ({}/{} bits), {}",
        o.version,
        o.cipher,
        o.bits,
        o.bits,
        verification_word(&o.verification)
    )
}

fn tls_failure(e: &TlsFailure, host: &str, req: &TlsRequirement) -> Failure {
    if let Some(trust) = &req.dane {
        use crate::dane::tlsa::DaneFailure;
        let cause = match e {
            TlsFailure::Certificate(CertFailure::Dane(
                DaneFailure::Expired { .. } | DaneFailure::NotYetValid { .. },
            )) => Cause::DaneExpired,
            TlsFailure::Certificate(CertFailure::Dane(DaneFailure::NameMismatch { .. })) => {
                Cause::DaneName
            }
            TlsFailure::Certificate(CertFailure::PinMismatch) => {
                Cause::Certificate(crate::policy::cause::CertProblem::PinMismatch)
            }
            TlsFailure::Certificate(_) => Cause::DaneNoMatch,
            TlsFailure::Handshake(_) | TlsFailure::Timeout => Cause::TlsHandshake,
        };
        return failure(
            cause,
            Some(host.to_string()),
            format!(
                "TLS with {host} failed DANE authentication (TLSA records of {}): {e}",
                trust.base
            ),
        );
    }
    if req.mta_sts {
        return failure(
            Cause::StsValidation(e.sts_problem()),
            Some(host.to_string()),
            format!(
                "Remote certificate failed MTA-STS validation. Reason: {} ({host}: {e})",
                crate::sts::tls_reason(e)
            ),
        );
    }
    let required = req.level >= TlsLevel::Encrypt;
    let why = if required {
        "; TLS is required for this destination"
    } else {
        ""
    };
    let cause = match e {
        TlsFailure::Certificate(c) => Cause::Certificate(c.problem()),
        _ => Cause::TlsHandshake,
    };
    Failure {
        // Under `may` (an implicit-TLS relay) TLS was not a requirement of ours.
        security: required,
        ..failure(
            cause,
            Some(host.to_string()),
            format!("TLS with {host} failed: {e}{why}"),
        )
    }
}

/// A failure before TLS: under MTA-STS enforce a missing or refused STARTTLS is a 4.7.5,
/// for a DANE host a 4.7.321.
fn before_tls_failure(e: SessionError, host: &str, req: &TlsRequirement) -> Failure {
    match e {
        SessionError::StartTlsNotOffered | SessionError::StartTlsRefused(_)
            if req.dane.is_some() =>
        {
            let detail = match &e {
                SessionError::StartTlsRefused(r) => format!("{host} refused STARTTLS ({r})"),
                _ => format!("{host} did not offer STARTTLS"),
            };
            failure(
                Cause::DaneStartTls,
                Some(host.to_string()),
                format!(
                    "{detail}, but it publishes DANE TLSA records: TLS is required (RFC 7672 §2.2)"
                ),
            )
        }
        SessionError::StartTlsNotOffered | SessionError::StartTlsRefused(_) if req.mta_sts => {
            let detail = match &e {
                SessionError::StartTlsRefused(r) => format!("{host} refused STARTTLS ({r})"),
                _ => format!("{host} did not offer STARTTLS"),
            };
            failure(
                Cause::StsValidation(StsProblem::StartTls),
                Some(host.to_string()),
                format!(
                    "Remote certificate failed MTA-STS validation. Reason: starttls not offered ({detail})"
                ),
            )
        }
        e => session_failure(e, host),
    }
}

fn session_failure(e: SessionError, host: &str) -> Failure {
    let remote = Some(host.to_string());
    match e {
        SessionError::StartTlsNotOffered => failure(
            Cause::StartTlsNotOffered,
            remote,
            format!(
                "{host} did not offer STARTTLS, and the policy requires TLS; its administrator must enable STARTTLS on that mail server"
            ),
        ),
        SessionError::StartTlsRefused(r) => failure(
            Cause::StartTlsNotOffered,
            remote,
            format!("{host} refused STARTTLS ({r}), and the policy requires TLS"),
        ),
        SessionError::Greeting(r) | SessionError::Hello(r) => remote_failure(
            r.enhanced(),
            r.is_permanent(),
            host,
            format!("{host} said: {}", r.one_line()),
        ),
        SessionError::Closed(Some(r)) => failure(
            Cause::ConnectionLost,
            remote,
            format!("{host} closed the connection: {}", r.one_line()),
        ),
        SessionError::Closed(None) => failure(
            Cause::ConnectionLost,
            remote,
            format!("{host} closed the connection unexpectedly"),
        ),
        SessionError::AuthWithoutTls => failure(
            Cause::RelayAuthWithoutTls,
            remote,
            format!(
                "{host}: TLS could not be established, and the relay credentials are never sent in the clear"
            ),
        ),
        SessionError::AuthNotOffered => failure(
            Cause::RelayAuthNotOffered,
            remote,
            format!(
                "{host} offers neither AUTH PLAIN nor AUTH LOGIN, but credentials are configured for it"
            ),
        ),
        // A configuration problem on one side or the other: retried, not bounced at once.
        SessionError::AuthFailed(r) => failure(
            Cause::RelayAuthRefused,
            remote,
            format!("{host} refused the relay credentials: {}", r.one_line()),
        ),
        SessionError::ResetRefused(r) => failure(
            Cause::Protocol,
            remote,
            format!("{host} refused RSET: {}", r.one_line()),
        ),
        SessionError::Protocol(m) => failure(
            Cause::Protocol,
            remote,
            format!("{host}: protocol error: {m}"),
        ),
    }
}

enum Step {
    StartTls,
    Done(Vec<RcptOutcome>),
    Failed(SessionError),
}

/// Runs the client until STARTTLS, the end of the session, or a failure.
/// With `keep`, it returns right after the transaction instead of saying QUIT, so the session
/// can be reused; with `ready`, the session is already past EHLO (a reused one).
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client: &mut Client,
    buf: &mut Vec<u8>,
    pending: &mut Option<Outgoing>,
    keep: bool,
    ready: bool,
) -> Step {
    let mut results: Option<Vec<RcptOutcome>> = None;
    let mut kick = ready;
    loop {
        let (n, event) = if std::mem::take(&mut kick) {
            (0, Some(Event::Ready))
        } else {
            client.process(buf)
        };
        buf.drain(..n);
        let event = match event {
            Some(Event::Ready) => match pending.take() {
                Some(m) => client.send(m),
                None => {
                    client.quit();
                    None
                }
            },
            other => other,
        };
        match event {
            Some(Event::StartTls) => {
                let out = client.take_output();
                if s.write_all(&out).await.is_err() {
                    return Step::Failed(SessionError::Closed(None));
                }
                return Step::StartTls;
            }
            Some(Event::Transaction(r)) => {
                if keep {
                    return Step::Done(r);
                }
                results = Some(r);
                client.quit();
            }
            Some(Event::Failed(e)) => {
                let out = client.take_output();
                let _ = s.write_all(&out).await;
                return match results {
                    Some(r) => Step::Done(r),
                    None => Step::Failed(e),
                };
            }
            Some(Event::Closed) => {
                return results
                    .map(Step::Done)
                    .unwrap_or(Step::Failed(SessionError::Closed(None)));
            }
            Some(Event::Ready) | None => {}
        }
        let out = client.take_output();
        if !out.is_empty() && s.write_all(&out).await.and(s.flush().await).is_err() {
            return results
                .map(Step::Done)
                .unwrap_or(Step::Failed(SessionError::Closed(None)));
        }
        // More complete reply lines are already buffered.
        if buf.contains(&b'\n') {
            continue;
        }
        buf.reserve(4096);
        match timeout(client.wait_limit(), s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                client.eof();
                return results
                    .map(Step::Done)
                    .unwrap_or(Step::Failed(SessionError::Closed(None)));
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                return results
                    .map(Step::Done)
                    .unwrap_or(Step::Failed(SessionError::Protocol(
                        "timed out waiting for the server".into(),
                    )));
            }
        }
    }
}
