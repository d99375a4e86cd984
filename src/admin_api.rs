//! The admin listener: an HTTP+JSON API, Prometheus metrics and the transport-security report
//! page, on a loopback address by default (`[admin] listen`).
//!
//! Every request needs the token from `<data_dir>/admin.token` (made on first start, mode
//! 0600): `Authorization: Bearer <token>`, or `?token=<token>` where a header cannot be set
//! (a browser opening the report). Without it: `401`.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /api/health` | status, version, uptime, queue counts, DANE state (DNSSEC validation working or why not), certificates expiring within 21 days |
//! | `GET /api/version` | version |
//! | `GET /api/config` | a summary of the running configuration (no secrets) |
//! | `GET /api/queue[?domain=D][&state=S]` | queued messages with each recipient's state and cause |
//! | `GET /api/queue/<id>` | one message |
//! | `POST /api/queue/retry\|delete\|bounce?id=ID\|domain=D\|all=1` | the `moat queue` actions |
//! | `GET /api/certificates` | every served certificate: names, expiry, days left, warning |
//! | `GET /api/mta-sts` | the MTA-STS policy cache and its counters |
//! | `POST /api/reload` | reload certificates and the `[[tls_policy]]` rules from the config file |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /report[?window=day\|week]` | the transport-security report (HTML) |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::http::{self, Request, Response};
use crate::queue::Queue;
use crate::queue::admin;
use crate::report::{CertStatus, Window};
use crate::tls::CertStore;
use crate::util::unix_now;

/// Days before expiry at which a certificate is flagged.
pub const EXPIRY_WARNING_DAYS: i64 = 21;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

/// What the admin listener needs.
pub struct AdminCtx {
    pub queue: Arc<Queue>,
    pub requeue: mpsc::UnboundedSender<String>,
    pub token: String,
    /// Certificate stores by what they serve (`smtp`, `mta-sts host`).
    pub stores: Vec<(String, Arc<CertStore>)>,
    pub started: Instant,
    /// The configuration the server started with.
    pub config: Config,
    /// Log lines about refused (unauthenticated) requests, at most a few a minute.
    pub refusals: http::gate::LogLimit,
    /// The TLS-RPT report sender (`POST /api/tlsrpt/send`) and its recorded results.
    pub reports: Arc<crate::tlsrpt::send::Sender>,
}

/// The token file's path for `config`.
pub fn token_path(config: &Config) -> PathBuf {
    match &config.admin.token_file {
        Some(p) => config.data_path(p),
        None => config.data_dir.join("admin.token"),
    }
}

/// Reads the token, making a new random one (mode 0600) when the file does not exist.
pub fn ensure_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "no random numbers for the admin token".to_string())?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::tls::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Compares without an early exit, so timing does not reveal how much of a guess matched.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminCtx>) {
    // The admin API is on loopback, where every client has the same address: fairness comes
    // from the head deadline and from evicting the oldest idle connection, not address caps.
    let gate = http::gate::Gate::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(ticket) = gate.admit(peer.ip()) else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = ticket.evicted() => {}
                _ = tokio::time::timeout(REQUEST_TIMEOUT, connection(stream, peer, &ctx, &ticket)) => {}
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: &AdminCtx,
    ticket: &http::gate::Ticket,
) {
    let read = match tokio::time::timeout(HEAD_TIMEOUT, http::read_request(&mut stream)).await {
        Ok(r) => r,
        Err(_) => return,
    };
    ticket.head_done();
    let (response, head) = match read {
        Err(http::RequestError::Closed) => return,
        Err(http::RequestError::Bad(why)) => (Response::text(400, format!("{why}\n")), false),
        Ok(req) => {
            let head = req.method == "HEAD";
            let r = if !authorized(&req, &ctx.token) {
                if let Some(held) = ctx.refusals.allow() {
                    tracing::warn!(%peer, path = %req.path, held_back = held,
                        "admin API: request without a valid token");
                }
                Response::json(
                    401,
                    &json!({"error": "a token is required: Authorization: Bearer <token from the data dir's admin.token>"}),
                )
                .with_header("WWW-Authenticate", "Bearer realm=\"moat\"")
            } else {
                route(&req, ctx).await
            };
            (r, head)
        }
    };
    let response = response.with_header("Cache-Control", "no-store");
    let _ = http::write_response(&mut stream, &response, head).await;
}

fn authorized(req: &Request, token: &str) -> bool {
    req.bearer()
        .or_else(|| req.param("token"))
        .is_some_and(|t| same(t, token))
}

fn error(status: u16, msg: impl Into<String>) -> Response {
    Response::json(status, &json!({ "error": msg.into() }))
}

async fn route(req: &Request, ctx: &AdminCtx) -> Response {
    let get = matches!(req.method.as_str(), "GET" | "HEAD");
    let post = req.method == "POST";
    match req.path.as_str() {
        "/api/health" if get => Response::json(200, &health(ctx).await),
        "/api/version" if get => {
            Response::json(200, &json!({ "version": env!("CARGO_PKG_VERSION") }))
        }
        "/api/config" if get => Response::json(200, &config_summary(&ctx.config)),
        "/api/queue" if get => {
            match admin::messages(&ctx.queue, req.param("domain"), req.param("state")).await {
                Ok(list) => Response::json(200, &json!({ "count": list.len(), "messages": list })),
                Err(e) => error(500, e),
            }
        }
        "/api/certificates" if get => {
            Response::json(200, &json!({ "certificates": certificates(ctx) }))
        }
        "/api/mta-sts" if get => Response::json(200, &mta_sts(ctx)),
        "/api/tlsrpt" if get => tlsrpt(req, ctx).await,
        "/api/tlsrpt/results" if get => tlsrpt_results(req, ctx),
        "/api/tlsrpt/send" if post => tlsrpt_send(req, ctx).await,
        "/api/reload" if post => reload(ctx),
        "/metrics" if get => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(ctx).await.into_bytes(),
        ),
        "/report" | "/" if get => report(req, ctx),
        p if p.starts_with("/api/queue/") => {
            let rest = &p["/api/queue/".len()..];
            match (rest, get, post) {
                ("retry" | "delete" | "bounce", _, true) => queue_action(rest, req, ctx).await,
                (id, true, _) if crate::util::is_queue_id(id) => {
                    match admin::message(&ctx.queue, id).await {
                        Some(m) => Response::json(200, &m),
                        None => error(404, format!("no message {id} in the queue")),
                    }
                }
                _ => error(404, "not found"),
            }
        }
        "/api/health" | "/api/version" | "/api/config" | "/api/queue" | "/api/certificates"
        | "/api/mta-sts" | "/api/tlsrpt" | "/metrics" | "/report" | "/" => {
            error(405, "method not allowed").with_header("Allow", "GET, HEAD")
        }
        "/api/reload" | "/api/tlsrpt/send" => {
            error(405, "method not allowed").with_header("Allow", "POST")
        }
        "/api/tlsrpt/results" => error(405, "method not allowed").with_header("Allow", "GET"),
        _ => error(404, "not found"),
    }
}

/// `GET /api/tlsrpt?days=N` (default 7, at most 400): the TLS-RPT reports received about
/// our domains, summarised per reporter and day, and the stored report mails.
async fn tlsrpt(req: &Request, ctx: &AdminCtx) -> Response {
    let days = match req.param("days").map(str::parse::<u64>) {
        None => 7,
        Some(Ok(d)) if (1..=400).contains(&d) => d,
        Some(_) => return error(400, "days must be a number from 1 to 400"),
    };
    let dir = ctx.config.data_dir.join("tlsrpt").join("received");
    let stored =
        tokio::task::spawn_blocking(move || crate::tlsrpt::store::list_dir(&dir, unix_now(), days))
            .await
            .unwrap_or_default();
    Response::json(
        200,
        &json!({
            "days": days,
            "report_addresses": ctx.config.tls_rpt.report_addresses,
            "summary": crate::tlsrpt::store::summarize(&stored),
            "mails": stored,
        }),
    )
}

/// The `day` parameter (`YYYY-MM-DD`, default today, UTC).
fn day_param(req: &Request) -> Result<u64, Response> {
    match req.param("day") {
        None | Some("today") => Ok(crate::tlsrpt::results::day_of(unix_now())),
        Some("yesterday") => Ok(crate::tlsrpt::results::day_of(unix_now()).saturating_sub(1)),
        Some(d) => crate::tlsrpt::results::parse_day(d)
            .ok_or_else(|| error(400, "day must be YYYY-MM-DD, today or yesterday")),
    }
}

/// `GET /api/tlsrpt/results?day=YYYY-MM-DD`: the results of our own sessions recorded for
/// the reports we send, per policy domain, and which were reported.
fn tlsrpt_results(req: &Request, ctx: &AdminCtx) -> Response {
    let day = match day_param(req) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let d = ctx.reports.results().day(day).unwrap_or_default();
    Response::json(
        200,
        &json!({
            "day": crate::util::utc_day(day * 86_400),
            "send_reports": ctx.config.tls_rpt.send_reports,
            "policies": d.policies.values().collect::<Vec<_>>(),
            "reported": d.sent,
            "dropped": d.dropped,
        }),
    )
}

/// `POST /api/tlsrpt/send?day=YYYY-MM-DD` (default yesterday): makes that day's reports now,
/// for the domains not yet reported, whatever the hour and `send_reports`.
async fn tlsrpt_send(req: &Request, ctx: &AdminCtx) -> Response {
    let day = match req.param("day") {
        None => crate::tlsrpt::results::day_of(unix_now()).saturating_sub(1),
        Some(_) => match day_param(req) {
            Ok(d) => d,
            Err(r) => return r,
        },
    };
    let outcomes = ctx.reports.send_day(day).await;
    Response::json(
        200,
        &json!({ "day": crate::util::utc_day(day * 86_400), "reports": outcomes }),
    )
}

async fn queue_action(verb: &str, req: &Request, ctx: &AdminCtx) -> Response {
    let selection: Vec<String> = match (req.param("id"), req.param("domain"), req.param("all")) {
        (Some(id), None, None) => vec!["id".into(), id.to_string()],
        (None, Some(d), None) => vec!["domain".into(), d.to_string()],
        (None, None, Some(_)) => vec!["all".into()],
        _ => return error(400, "give exactly one of id=, domain= or all=1"),
    };
    let mut words = vec![verb];
    words.extend(selection.iter().map(String::as_str));
    match admin::run(&ctx.queue, &ctx.requeue, &words).await {
        Ok(text) => {
            let done: Vec<&str> = text.lines().collect();
            Response::json(
                200,
                &json!({ "action": verb, "count": done.len(), "result": done }),
            )
        }
        Err(e) => error(404, e),
    }
}

/// Queue counts by state and the oldest message's age.
#[derive(Debug, Default, Serialize)]
pub struct QueueCounts {
    pub messages: usize,
    pub pending: usize,
    pub deferred: usize,
    pub failed: usize,
    pub oldest_secs: u64,
}

/// Per recipient state: (recipients, age of the oldest message with one), every state
/// present; and the number of messages. `None` when the spool cannot be listed.
type ByState = std::collections::BTreeMap<&'static str, (u64, u64)>;

async fn queue_by_state(queue: &Queue) -> Option<(usize, ByState)> {
    let mut by: ByState = ["pending", "deferred", "delivered", "failed"]
        .into_iter()
        .map(|s| (s, (0, 0)))
        .collect();
    // A store that counts itself (the database: one query, not a load of every message).
    if let Some((messages, counted)) = queue.store.by_state().await.ok()? {
        for (state, n, oldest) in counted {
            by.insert(state.as_str(), (n, oldest));
        }
        return Some((messages, by));
    }
    let list = admin::messages(queue, None, None).await.ok()?;
    for m in &list {
        for r in &m.recipients {
            let e = by.entry(r.state).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(m.age_secs);
        }
    }
    Some((list.len(), by))
}

async fn queue_counts(queue: &Queue) -> QueueCounts {
    let Some((messages, by)) = queue_by_state(queue).await else {
        return QueueCounts::default();
    };
    let n = |s: &str| by.get(s).map_or(0, |e| e.0 as usize);
    QueueCounts {
        messages,
        pending: n("pending"),
        deferred: n("deferred"),
        failed: n("failed"),
        oldest_secs: by.values().map(|e| e.1).max().unwrap_or(0),
    }
}

async fn health(ctx: &AdminCtx) -> serde_json::Value {
    let certs = certificates(ctx);
    let expiring: Vec<&CertInfo> = certs.iter().filter(|c| c.warning).collect();
    let since = unix_now().saturating_sub(86_400);
    let events = ctx.queue.events.since(since);
    let count =
        |f: &dyn Fn(&crate::report::DeliveryEvent) -> bool| events.iter().filter(|e| f(e)).count();
    use crate::report::{AuthClass, Outcome, TlsClass};
    json!({
        "status": if expiring.iter().any(|c| c.days_left < 0) { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": ctx.started.elapsed().as_secs(),
        "hostname": ctx.config.hostname,
        "queue": queue_counts(&ctx.queue).await,
        "last_24h": {
            "delivered": count(&|e| e.outcome == Outcome::Delivered),
            "deferred": count(&|e| e.outcome == Outcome::Deferred),
            "bounced": count(&|e| e.outcome == Outcome::Bounced),
            "tls13": count(&|e| e.outcome == Outcome::Delivered && e.tls == TlsClass::Tls13),
            "tls12": count(&|e| e.outcome == Outcome::Delivered && e.tls == TlsClass::Tls12),
            "plaintext": count(&|e| e.outcome == Outcome::Delivered && e.tls == TlsClass::Plaintext),
            "mta_sts": count(&|e| e.outcome == Outcome::Delivered && e.auth == AuthClass::MtaSts),
            "verified": count(&|e| e.outcome == Outcome::Delivered && e.auth == AuthClass::Verified),
            "dane": count(&|e| e.outcome == Outcome::Delivered && e.auth == AuthClass::Dane),
        },
        "dane": dane_state(ctx),
        "store": ctx.queue.store.kind(),
        "cluster": ctx.queue.store.cluster().await,
        "certificates_expiring": expiring,
    })
}

/// Whether DANE is in use: `disabled`, `available`, or `unavailable` with the reason, and
/// when validation was last checked.
fn dane_state(ctx: &AdminCtx) -> serde_json::Value {
    let Some(d) = &ctx.queue.outbound.dane else {
        return json!({ "state": "disabled" });
    };
    let validation = if d.validator.trusts_resolver() {
        "resolver"
    } else {
        "in-process"
    };
    match d.status() {
        None => json!({ "state": "unavailable", "validation": validation,
            "reason": "DNSSEC validation not checked yet" }),
        Some((r, at)) => {
            let ago = unix_now().saturating_sub(at);
            match r {
                Ok(()) => json!({ "state": "available", "validation": validation,
                    "checked_secs_ago": ago }),
                Err(why) => {
                    json!({ "state": "unavailable", "validation": validation, "reason": why,
                        "checked_secs_ago": ago })
                }
            }
        }
    }
}

fn config_summary(c: &Config) -> serde_json::Value {
    json!({
        "hostname": c.hostname,
        "data_dir": c.data_dir,
        "config_file": c.source,
        "listeners": c.listeners.iter().map(|l| json!({
            "name": l.label(),
            "address": l.address,
            "mode": format!("{:?}", l.mode).to_ascii_lowercase(),
            "require_tls": l.requires_tls(),
            "require_auth": l.requires_auth(),
        })).collect::<Vec<_>>(),
        "domains": c.domains.iter().map(|d| json!({
            "name": d.name,
            "route": format!("{:?}", d.route).to_ascii_lowercase(),
            "relay": d.relay,
        })).collect::<Vec<_>>(),
        "tls_policies": c.tls_policies.iter().map(|p| json!({
            "domains": p.domains,
            "sender_domains": p.sender_domains,
            "level": p.level.as_str(),
            "match_names": p.match_names,
            "pins": p.pins.len(),
        })).collect::<Vec<_>>(),
        "opportunistic_for_unmatched": c.outbound.opportunistic_for_unmatched,
        "mta_sts": {
            "enabled": c.mta_sts.enabled,
            "policy_host": c.mta_sts.listen,
            "published": c.mta_sts.policies.iter().map(|p| json!({
                "domain": p.domain, "mode": p.mode, "mx": p.mx, "max_age": p.max_age,
            })).collect::<Vec<_>>(),
        },
        "queue": {
            "retry_schedule_secs": c.queue.retry_schedule_secs,
            "max_lifetime_secs": c.queue.max_lifetime_secs,
            "security_lifetime_secs": c.queue.security_lifetime_secs,
        },
        "admin": { "listen": c.admin.listen },
    })
}

/// One served certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub serves: String,
    pub names: Vec<String>,
    pub not_after: u64,
    pub days_left: i64,
    /// Expires within [`EXPIRY_WARNING_DAYS`] (or has expired).
    pub warning: bool,
}

fn certificates(ctx: &AdminCtx) -> Vec<CertInfo> {
    let now = unix_now();
    let mut out = Vec::new();
    for (serves, store) in &ctx.stores {
        for (names, not_after) in store.expiries() {
            let s = CertStatus::new(names, not_after, serves.clone(), now);
            out.push(CertInfo {
                serves: serves.clone(),
                warning: s.days_left < EXPIRY_WARNING_DAYS,
                names: s.names,
                not_after,
                days_left: s.days_left,
            });
        }
    }
    out
}

fn mta_sts(ctx: &AdminCtx) -> serde_json::Value {
    let Some(sts) = &ctx.queue.sts else {
        return json!({ "enabled": false });
    };
    use std::sync::atomic::Ordering;
    let entries: Vec<serde_json::Value> = sts
        .entries()
        .into_iter()
        .map(|(d, e)| {
            json!({
                "domain": d,
                "id": e.id,
                "mode": e.policy.mode.as_str(),
                "mx": e.policy.mx.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "max_age": e.policy.max_age,
                "fetched": e.fetched,
                "expires": e.expires(),
            })
        })
        .collect();
    json!({
        "enabled": true,
        "fetches": sts.stats.fetches.load(Ordering::Relaxed),
        "fetch_failures": sts.stats.fetch_failures.load(Ordering::Relaxed),
        "cache_hits": sts.stats.cache_hits.load(Ordering::Relaxed),
        "policies": entries,
    })
}

/// Certificates from their files, and the `[[tls_policy]]` rules from the config file.
fn reload(ctx: &AdminCtx) -> Response {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for (serves, store) in &ctx.stores {
        match store.reload() {
            Ok(n) => done.push(format!("{n} certificate(s) for {serves}")),
            Err(e) => errors.push(format!(
                "certificates for {serves}: {e} (the old ones stay)"
            )),
        }
    }
    match &ctx.config.source {
        Some(path) => match Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|c| crate::server::policy_from(&c))
        {
            Ok(p) => {
                let n = p.rules.len() + p.sender_rules.len();
                ctx.queue.set_tls_policy(p);
                done.push(format!("{n} TLS policy rule(s) from {}", path.display()));
            }
            Err(e) => errors.push(format!("config: {e} (the running rules stay)")),
        },
        None => done.push("embedded config: no TLS policy rules to reload".into()),
    }
    tracing::info!(reloaded = ?done, errors = ?errors, "admin reload");
    let status = if errors.is_empty() { 200 } else { 500 };
    Response::json(
        status,
        &json!({
            "reloaded": done,
            "errors": errors,
            "needs_restart": "listeners, routes, limits, queue settings and the MTA-STS policy host",
        }),
    )
}

async fn metrics_text(ctx: &AdminCtx) -> String {
    let reg = crate::metrics::global();
    let now = unix_now();
    // Queue gauges, fresh for this scrape.
    reg.clear(crate::metrics::Metric::QueueRecipients);
    reg.clear(crate::metrics::Metric::QueueOldestSeconds);
    reg.clear(crate::metrics::Metric::NodeInfo);
    reg.set(
        crate::metrics::Metric::NodeInfo,
        &[
            ("node", &crate::queue::pg::node_id(&ctx.config)),
            ("store", ctx.queue.store.kind()),
        ],
        1,
    );
    if let Some((_, by)) = queue_by_state(&ctx.queue).await {
        for (state, (n, oldest)) in by {
            reg.set(
                crate::metrics::Metric::QueueRecipients,
                &[("state", state)],
                i64::try_from(n).unwrap_or(i64::MAX),
            );
            reg.set(
                crate::metrics::Metric::QueueOldestSeconds,
                &[("state", state)],
                i64::try_from(oldest).unwrap_or(i64::MAX),
            );
        }
    }
    if let Some(sts) = &ctx.queue.sts {
        use std::sync::atomic::Ordering;
        let ok = sts
            .stats
            .fetches
            .load(Ordering::Relaxed)
            .saturating_sub(sts.stats.fetch_failures.load(Ordering::Relaxed));
        let failed = sts.stats.fetch_failures.load(Ordering::Relaxed);
        reg.set(
            crate::metrics::Metric::MtaStsFetchesTotal,
            &[("result", "ok")],
            i64::try_from(ok).unwrap_or(0),
        );
        reg.set(
            crate::metrics::Metric::MtaStsFetchesTotal,
            &[("result", "failed")],
            i64::try_from(failed).unwrap_or(0),
        );
        reg.set(
            crate::metrics::Metric::MtaStsCacheHitsTotal,
            &[],
            i64::try_from(sts.stats.cache_hits.load(Ordering::Relaxed)).unwrap_or(0),
        );
        reg.clear(crate::metrics::Metric::MtaStsPolicies);
        let mut modes: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (_, e) in sts.entries() {
            *modes.entry(e.policy.mode.as_str()).or_insert(0) += 1;
        }
        for (mode, n) in modes {
            reg.set(crate::metrics::Metric::MtaStsPolicies, &[("mode", mode)], n);
        }
    }
    reg.clear(crate::metrics::Metric::CertificateExpirySeconds);
    for c in certificates(ctx) {
        let name = c.names.first().cloned().unwrap_or_default();
        let secs = i64::try_from(c.not_after).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(0);
        reg.set(
            crate::metrics::Metric::CertificateExpirySeconds,
            &[("serves", &c.serves), ("name", &name)],
            secs,
        );
    }
    reg.render()
}

fn report(req: &Request, ctx: &AdminCtx) -> Response {
    let window = match req.param("window") {
        None => Window::Day,
        Some(w) => match Window::from_query(w) {
            Some(w) => w,
            None => return error(400, "window is day or week"),
        },
    };
    let now = unix_now();
    let summary = ctx.queue.events.summary(now, window);
    let certs: Vec<CertStatus> = certificates(ctx)
        .into_iter()
        .map(|c| CertStatus::new(c.names, c.not_after, c.serves, now))
        .collect();
    let token_query = req
        .param("token")
        .map(|t| format!("token={}", percent_encode(t)))
        .unwrap_or_default();
    let days = match window {
        Window::Day => 1,
        Window::Week => 7,
    };
    let dir = ctx.config.data_dir.join("tlsrpt").join("received");
    let rows = crate::tlsrpt::store::summarize(&crate::tlsrpt::store::list_dir(&dir, now, days));
    let others = crate::report::OthersView {
        days,
        receiving: !ctx.config.tls_rpt.report_addresses.is_empty(),
        rows: &rows,
    };
    let page =
        crate::report::render_page_with(&summary, &certs, Some(&others), now, window, &token_query);
    Response::new(200, "text/html; charset=utf-8", page.into_bytes())
}

/// RFC 3986 unreserved characters stay; everything else is `%XX`.
fn percent_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// A GET to the admin API (for `moat status`): the status and the body.
pub async fn get(addr: SocketAddr, path: &str, token: &str) -> Result<(u16, String), String> {
    request(addr, "GET", path, token, Duration::from_secs(10)).await
}

/// One request with an empty body (`GET`, or `POST` for an action) and the answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    limit: Duration,
) -> Result<(u16, String), String> {
    use tokio::io::AsyncWriteExt;
    let work = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| {
            format!("cannot reach the admin API at {addr}: {e} (is moat serve running?)")
        })?;
        let body = if method == "GET" {
            ""
        } else {
            "Content-Length: 0\r\n"
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{body}Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let r = crate::sts::fetch::read_response(&mut s, 16 * 1024 * 1024)
            .await
            .map_err(|e| e.to_string())?;
        Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(limit, work).await.map_err(|_| {
        format!(
            "the admin API at {addr} did not answer in {} s",
            limit.as_secs()
        )
    })?
}

/// `moat status`: the health answer in a few lines.
pub fn render_status(h: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut out = format!(
        "moat {} on {}: {} (up {})\n",
        h["version"].as_str().unwrap_or("?"),
        h["hostname"].as_str().unwrap_or("?"),
        h["status"].as_str().unwrap_or("?"),
        crate::util::human_duration(n(&h["uptime_secs"]))
    );
    let q = &h["queue"];
    out.push_str(&format!(
        "queue: {} message(s): {} pending, {} deferred, {} failed recipient(s); oldest {}\n",
        n(&q["messages"]),
        n(&q["pending"]),
        n(&q["deferred"]),
        n(&q["failed"]),
        crate::util::human_duration(n(&q["oldest_secs"]))
    ));
    let d = &h["last_24h"];
    out.push_str(&format!(
        "last 24 h: {} delivered (TLS 1.3 {}, TLS 1.2 {}, plaintext {}; MTA-STS {}, verified {}), {} deferred, {} bounced\n",
        n(&d["delivered"]),
        n(&d["tls13"]),
        n(&d["tls12"]),
        n(&d["plaintext"]),
        n(&d["mta_sts"]),
        n(&d["verified"]),
        n(&d["deferred"]),
        n(&d["bounced"])
    ));
    let dane = &h["dane"];
    match dane["state"].as_str() {
        Some("available") => out.push_str(&format!(
            "DANE: available, DNSSEC validation works ({}, checked {} ago); {} delivered by DANE in 24 h\n",
            if dane["validation"] == "resolver" {
                "by the resolver: its AD bit is trusted"
            } else {
                "validated in-process"
            },
            crate::util::human_duration(n(&dane["checked_secs_ago"])),
            n(&d["dane"])
        )),
        Some("unavailable") => out.push_str(&format!(
            "WARN DANE unavailable: {}\n",
            dane["reason"].as_str().unwrap_or("?")
        )),
        Some("disabled") => out.push_str("DANE: disabled ([dane] enabled = false)\n"),
        _ => {}
    }
    let cluster = &h["cluster"];
    if let Some(db) = cluster["database"].as_str() {
        out.push_str(&format!(
            "queue store: PostgreSQL at {db}, this node {}\n",
            cluster["node"].as_str().unwrap_or("?")
        ));
        if let Some(e) = cluster["error"].as_str() {
            out.push_str(&format!("WARN {e}\n"));
        }
        for node in cluster["nodes"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  node {}  version {}  last heartbeat {} ago  {} leased\n",
                node["id"].as_str().unwrap_or("?"),
                node["version"].as_str().unwrap_or("?"),
                crate::util::human_duration(n(&node["heartbeat_age_secs"])),
                n(&node["leased"])
            ));
        }
    }
    match h["certificates_expiring"].as_array() {
        Some(list) if !list.is_empty() => {
            for c in list {
                let names: Vec<&str> = c["names"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                let days = c["days_left"].as_i64().unwrap_or(0);
                let when = if days < 0 {
                    format!("EXPIRED {} day(s) ago", -days)
                } else {
                    format!("expires in {days} day(s)")
                };
                out.push_str(&format!(
                    "WARN certificate {} ({}) {when}\n",
                    names.join(", "),
                    c["serves"].as_str().unwrap_or("")
                ));
            }
        }
        _ => out.push_str(&format!(
            "certificates: none expires within {EXPIRY_WARNING_DAYS} days\n"
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_whether_dane_works() {
        let mut h = json!({
            "version": "1", "hostname": "h", "status": "ok", "uptime_secs": 5,
            "queue": {}, "last_24h": {"dane": 3},
            "dane": {"state": "available", "checked_secs_ago": 60},
        });
        let text = render_status(&h);
        assert!(
            text.contains(
                "DANE: available, DNSSEC validation works (validated in-process, checked "
            ),
            "{text}"
        );
        assert!(text.contains("3 delivered by DANE"), "{text}");
        h["dane"] = json!({"state": "unavailable", "reason": "the answer for . is not validated"});
        assert!(
            render_status(&h).contains("WARN DANE unavailable: the answer for . is not validated")
        );
    }

    #[test]
    fn token_compare_and_file() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        let t = ensure_token(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(ensure_token(&p).unwrap(), t);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn authorization_header_or_query() {
        let r = http::parse_head(
            b"GET /api/health HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sekrit",
        )
        .unwrap();
        assert!(authorized(&r, "sekrit"));
        assert!(!authorized(&r, "other"));
        let r = http::parse_head(b"GET /report?token=sekrit HTTP/1.1\r\nHost: a").unwrap();
        assert!(authorized(&r, "sekrit"));
        let r = http::parse_head(b"GET /metrics HTTP/1.1\r\nHost: a").unwrap();
        assert!(!authorized(&r, "sekrit"));
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
