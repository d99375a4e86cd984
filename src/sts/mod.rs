//! MTA-STS (RFC 8461): policy parsing, discovery, cache and enforcement when sending,
//! and the domain owner's tools (generate, host, check).
//!
//! Discovery for a recipient domain ([`Sts::policy_for`], RFC 8461 §3, §5):
//!
//! 1. TXT `_mta-sts.<domain>`. Exactly one valid `v=STSv1` record counts; none (or several)
//!    means "no record".
//! 2. With a record whose `id` equals the cached policy's, the cached policy is used; it is
//!    refetched once half its `max_age` has passed, so it is refreshed before it expires.
//!    With a new `id` (or nothing cached) the policy is fetched over HTTPS ([`fetch`]) and,
//!    when it parses, cached under that id.
//! 3. A DNS failure, a fetch failure or a removed TXT record never drops a cached policy
//!    before its `max_age` runs out: the cached one applies.
//!
//! The cache is kept in memory and in `<data>/sts/<domain>.json` (written through a temporary
//! file and a rename), so it survives restarts. Concurrent deliveries to one domain fetch once.
//! Nodes sharing a queue in PostgreSQL share their caches too ([`share`]): a policy one node
//! fetched applies on every node.
//!
//! Enforcement ([`crate::policy::decide`]): `enforce` acts as `verify` restricted to the policy's
//! MX patterns (RFC 8461 §4.1); failures carry 4.4.8/5.4.8 and 4.7.5/5.7.5 (docs/ARCHITECTURE.md).
//! `testing` delivers as usual and reports what would have failed. `none` is no policy.

pub mod check;
pub mod fetch;
pub mod generate;
pub mod host;
pub mod policy;
pub mod share;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::RootCertStore;
use serde::{Deserialize, Serialize};

use self::fetch::{FetchError, Fetcher};
use self::policy::{
    Mode, Policy, PolicyError, parse_policy, parse_policy_lenient, parse_txt_records,
};
use crate::outbound::tls::{CertFailure, TlsFailure};
use crate::util::unix_now;

/// A cached policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The TXT record's `id` the policy was fetched under.
    pub id: String,
    pub policy: Policy,
    /// When it was fetched, Unix seconds.
    pub fetched: u64,
    /// The body as served (for `moat queue show`, the admin API and the cache file).
    pub text: String,
}

impl Entry {
    /// A policy saved earlier (a cache file, another node); `None` when it does not parse.
    /// The fetch time is clamped to `now`: a clock set back here, or another node's clock
    /// ahead of ours, must not stretch a policy's life.
    fn saved(id: String, text: String, fetched: u64, now: u64) -> Option<Entry> {
        let policy = parse_policy(text.as_bytes()).ok()?;
        Some(Entry {
            id,
            policy,
            fetched: fetched.min(now),
            text,
        })
    }

    /// Unix time after which the entry must not be used.
    pub fn expires(&self) -> u64 {
        self.fetched.saturating_add(u64::from(self.policy.max_age))
    }

    /// Past half its lifetime: time to fetch it again.
    fn wants_refresh(&self, now: u64) -> bool {
        now >= self
            .fetched
            .saturating_add(u64::from(self.policy.max_age) / 2)
    }
}

/// The policy that governs one delivery, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub domain: String,
    pub entry: Arc<Entry>,
    /// `fetched`, `cached`, or `cached (<why the fresh lookup failed>)`.
    pub source: String,
}

impl Applied {
    pub fn mode(&self) -> Mode {
        self.entry.policy.mode
    }

    /// `MTA-STS enforce (id 20261123000000Z, cached)`: for logs, replies and `queue show`.
    pub fn describe(&self) -> String {
        format!(
            "MTA-STS {} (id {}, {})",
            self.entry.policy.mode.as_str(),
            self.entry.id,
            self.source
        )
    }
}

fn merge_roots(
    a: Option<&Arc<RootCertStore>>,
    b: Option<&Arc<RootCertStore>>,
) -> Option<Arc<RootCertStore>> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let mut all = RootCertStore::empty();
            all.roots.extend(a.roots.iter().cloned());
            all.roots.extend(b.roots.iter().cloned());
            Some(Arc::new(all))
        }
        (Some(x), None) | (None, Some(x)) => Some(x.clone()),
        (None, None) => None,
    }
}

/// The reason word of a `5.7.5 Remote certificate failed MTA-STS validation. Reason: …` reply.
pub fn tls_reason(f: &TlsFailure) -> String {
    match f {
        TlsFailure::Certificate(c) => cert_reason(c).to_string(),
        TlsFailure::Handshake(s) => format!("handshake failed ({s})"),
        TlsFailure::Timeout => "handshake timed out".into(),
    }
}

/// `expired`, `untrusted`, `name mismatch`, …
pub fn cert_reason(c: &CertFailure) -> &'static str {
    c.problem().words()
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub fetches: AtomicU64,
    pub fetch_failures: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// How long a failed policy fetch (or a failed TXT lookup with nothing cached) is remembered,
/// so a dead or trickling policy host costs one fetch timeout per few minutes, not one per
/// message.
const FAILURE_MEMORY: u64 = 300;
/// How long a failed read of the cluster's shared policies keeps deliveries from asking again.
const SHARE_RETRY_SECS: u64 = 30;

/// How long a TXT lookup failure is remembered when nothing is cached.
const TXT_FAILURE_MEMORY: u64 = 60;
/// Bound for the failure memo and the in-flight map.
const MAX_TRACKED: usize = 10_000;

/// A remembered lookup or fetch failure: the TXT id it was for (empty: the TXT lookup),
/// until when it is remembered, why, and its TLS-RPT result type (empty: none).
type Failure = (String, u64, String, &'static str);

/// Policy discovery and cache for the sending side.
#[derive(Debug)]
pub struct Sts {
    fetcher: Fetcher,
    /// The trust anchors for MX certificates under a policy (the same extra roots as for fetches).
    extra_roots: Option<Arc<RootCertStore>>,
    dir: Option<PathBuf>,
    cache: std::sync::Mutex<HashMap<String, Arc<Entry>>>,
    /// Recent failures by domain: `(TXT id or "" for the TXT lookup, until, why)`.
    failures: std::sync::Mutex<HashMap<String, Failure>>,
    /// One fetch at a time per domain.
    inflight: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Rule trust anchors merged with `extra_roots`, by the rule store's address (rule stores
    /// live as long as the config), so a merged store keeps one identity for session reuse.
    merged: std::sync::Mutex<HashMap<usize, MergedRoots>>,
    /// The cluster's shared cache, when the queue is shared ([`share`]).
    share: std::sync::OnceLock<Arc<dyn share::Share>>,
    /// The shared store's mark of the last pull.
    share_mark: std::sync::atomic::AtomicI64,
    /// Until when the shared store is not asked (it just failed).
    share_down_until: AtomicU64,
    pub stats: Stats,
}

/// A rule's store (kept so its address stays valid) and the merged store.
type MergedRoots = (Arc<RootCertStore>, Arc<RootCertStore>);

/// Locks, recovering from a panicked holder: a poisoned cache must not silently drop policies.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a cache file holds.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    domain: String,
    id: String,
    fetched: u64,
    policy: String,
}

impl Sts {
    /// A resolver whose cache lives in `dir` (created if missing; `None`: memory only).
    pub fn new(fetcher: Fetcher, dir: Option<PathBuf>) -> Result<Sts, String> {
        let extra_roots = fetcher.extra_roots.clone();
        let mut cache = HashMap::new();
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            load_cache(dir, &mut cache);
        }
        Ok(Sts {
            fetcher,
            extra_roots,
            dir,
            cache: std::sync::Mutex::new(cache),
            failures: std::sync::Mutex::new(HashMap::new()),
            inflight: std::sync::Mutex::new(HashMap::new()),
            merged: std::sync::Mutex::new(HashMap::new()),
            share: std::sync::OnceLock::new(),
            share_mark: std::sync::atomic::AtomicI64::new(0),
            share_down_until: AtomicU64::new(0),
            stats: Stats::default(),
        })
    }

    /// Extra trust anchors for MX certificates checked under a policy.
    pub fn extra_roots(&self) -> Option<&Arc<RootCertStore>> {
        self.extra_roots.as_ref()
    }

    /// The trust anchors for a delivery under `enforce`: the rule's and the policy's, as one
    /// store with a stable identity.
    pub fn roots_for(&self, rule: Option<&Arc<RootCertStore>>) -> Option<Arc<RootCertStore>> {
        match (rule, &self.extra_roots) {
            (Some(r), Some(x)) => {
                let key = Arc::as_ptr(r) as usize;
                let mut m = lock(&self.merged);
                if let Some((kept, merged)) = m.get(&key)
                    && Arc::ptr_eq(kept, r)
                {
                    return Some(merged.clone());
                }
                let merged = merge_roots(Some(r), Some(x))?;
                m.insert(key, (r.clone(), merged.clone()));
                Some(merged)
            }
            (Some(r), None) => Some(r.clone()),
            (None, x) => x.clone(),
        }
    }

    /// The fetcher (for `moat sts check`).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Every unexpired cache entry, by domain.
    pub fn entries(&self) -> Vec<(String, Arc<Entry>)> {
        let now = unix_now();
        let mut v: Vec<(String, Arc<Entry>)> = lock(&self.cache)
            .iter()
            .filter(|(_, e)| e.expires() > now)
            .map(|(d, e)| (d.clone(), e.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The unexpired cached policy of `domain`, without any lookup.
    pub fn entry(&self, domain: &str) -> Option<Arc<Entry>> {
        let domain = canonical(domain)?;
        lock(&self.cache)
            .get(&domain)
            .filter(|e| e.expires() > unix_now())
            .cloned()
    }

    fn cached(&self, domain: &str, now: u64) -> Option<Arc<Entry>> {
        let mut cache = lock(&self.cache);
        match cache.get(domain) {
            Some(e) if e.expires() > now => Some(e.clone()),
            Some(_) => {
                cache.remove(domain);
                if let Some(dir) = &self.dir
                    && safe_domain(domain)
                {
                    let _ = std::fs::remove_file(cache_path(dir, domain));
                }
                None
            }
            None => None,
        }
    }

    /// A remembered failure for `domain` under `id`, if still fresh.
    fn failed_recently(&self, domain: &str, id: &str, now: u64) -> Option<String> {
        lock(&self.failures)
            .get(domain)
            .filter(|(i, until, _, _)| i == id && *until > now)
            .map(|(_, _, why, _)| why.clone())
    }

    /// When `domain` publishes an MTA-STS TXT record but its policy could not be had
    /// recently: the TLS-RPT result type (`sts-policy-fetch-error`, `sts-policy-invalid`,
    /// `sts-webpki-invalid`, RFC 8460 §4.3.2) and why.
    pub fn policy_failure(&self, domain: &str) -> Option<(&'static str, String)> {
        let domain = canonical(domain)?;
        lock(&self.failures)
            .get(&domain)
            .filter(|(id, until, _, kind)| {
                !id.is_empty() && !kind.is_empty() && *until > unix_now()
            })
            .map(|(_, _, why, kind)| (*kind, why.clone()))
    }

    fn remember_failure(
        &self,
        domain: &str,
        id: &str,
        for_secs: u64,
        why: String,
        kind: &'static str,
    ) {
        let now = unix_now();
        let mut f = lock(&self.failures);
        if f.len() >= MAX_TRACKED {
            f.retain(|_, (_, until, _, _)| *until > now);
            if f.len() >= MAX_TRACKED {
                f.clear();
            }
        }
        f.insert(
            domain.to_string(),
            (id.to_string(), now + for_secs, why, kind),
        );
    }

    /// The policy in force for `domain`, if any; `mode: none` counts as none.
    pub async fn policy_for(&self, domain: &str) -> Option<Applied> {
        let applied = self.lookup(domain).await?;
        if applied.entry.policy.mode == Mode::None {
            return None;
        }
        Some(applied)
    }

    /// Like [`Sts::policy_for`] but also returns `mode: none` policies.
    pub async fn lookup(&self, domain: &str) -> Option<Applied> {
        self.lookup_inner(domain, false).await
    }

    /// Fetches `domain`'s policy again even when the cached id is current (the background
    /// refresh before `max_age` runs out).
    pub async fn refresh(&self, domain: &str) -> Option<Applied> {
        self.lookup_inner(domain, true).await
    }

    async fn lookup_inner(&self, domain: &str, refresh: bool) -> Option<Applied> {
        // The same name the router uses: A-labels, lowercase, no trailing dot.
        let domain = canonical(domain)?;
        let now = unix_now();
        let mut cached = self.cached(&domain, now);
        let use_cached = |entry: Option<Arc<Entry>>, why: String| {
            entry.map(|entry| {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                Applied {
                    domain: domain.clone(),
                    entry,
                    source: why,
                }
            })
        };
        if cached.is_none() && self.failed_recently(&domain, "", now).is_some() {
            return None;
        }
        let records = match self
            .fetcher
            .resolver
            .txt(&format!("_mta-sts.{domain}"))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(domain, error = %e, "MTA-STS TXT lookup failed");
                if cached.is_none() && self.pull().await {
                    // Another node of the cluster may know the policy this lookup can't find.
                    cached = self.cached(&domain, now);
                }
                if e.is_temporary() && cached.is_none() {
                    self.remember_failure(&domain, "", TXT_FAILURE_MEMORY, e.to_string(), "");
                }
                return use_cached(cached, format!("cached; TXT lookup failed: {e}"));
            }
        };
        let record = match parse_txt_records(&records) {
            Ok(Some(r)) => r,
            Ok(None) => return use_cached(cached, "cached; no TXT record now".into()),
            Err(e) => {
                tracing::info!(domain, error = %e, "unusable MTA-STS TXT record");
                return use_cached(cached, format!("cached; TXT record unusable: {e}"));
            }
        };
        let current = |c: &Option<Arc<Entry>>| c.as_ref().is_some_and(|c| c.id == record.id);
        if current(&cached) && !refresh {
            return use_cached(cached, "cached".into());
        }
        if let Some(why) = self.failed_recently(&domain, &record.id, now) {
            return use_cached(cached, format!("cached; policy fetch failed: {why}"));
        }

        // One fetch per domain at a time; whoever waited takes the result.
        let gate = lock(&self.inflight)
            .entry(domain.clone())
            .or_default()
            .clone();
        let result = {
            let _guard = gate.lock().await;
            let fresh = |c: &Option<Arc<Entry>>| {
                current(c) && (!refresh || c.as_ref().is_some_and(|c| !c.wants_refresh(unix_now())))
            };
            let mut cached = self.cached(&domain, now);
            // Another node of the cluster may have fetched it already.
            if !fresh(&cached) && self.pull().await {
                cached = self.cached(&domain, now);
            }
            if fresh(&cached) {
                Ok(cached)
            } else if let Some(why) = self.failed_recently(&domain, &record.id, unix_now()) {
                Err((cached, why))
            } else {
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                match self.fetch_policy(&domain).await {
                    Ok((policy, text)) => {
                        let entry = Arc::new(Entry {
                            id: record.id.clone(),
                            policy,
                            fetched: unix_now(),
                            text,
                        });
                        tracing::info!(domain, id = %entry.id, mode = entry.policy.mode.as_str(),
                            max_age = entry.policy.max_age, "MTA-STS policy fetched");
                        self.keep(&domain, entry.clone());
                        self.push(&domain, &entry).await;
                        return self.finish(
                            &domain,
                            &gate,
                            Some(Applied {
                                domain: domain.clone(),
                                entry,
                                source: "fetched".into(),
                            }),
                        );
                    }
                    Err(e) => {
                        self.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(domain, error = %e, cached = cached.is_some(),
                            "MTA-STS policy fetch failed");
                        let kind = match &e {
                            StsError::Policy(_) => "sts-policy-invalid",
                            StsError::Fetch(f) if f.certificate().is_some() => "sts-webpki-invalid",
                            StsError::Fetch(_) => "sts-policy-fetch-error",
                        };
                        self.remember_failure(
                            &domain,
                            &record.id,
                            FAILURE_MEMORY,
                            e.to_string(),
                            kind,
                        );
                        Err((cached, e.to_string()))
                    }
                }
            }
        };
        let applied = match result {
            Ok(c) => use_cached(c, "cached".into()),
            Err((c, why)) => use_cached(c, format!("cached; policy fetch failed: {why}")),
        };
        self.finish(&domain, &gate, applied)
    }

    /// Drops the domain's in-flight gate when nobody else holds it (the map stays small).
    fn finish(
        &self,
        domain: &str,
        gate: &Arc<tokio::sync::Mutex<()>>,
        applied: Option<Applied>,
    ) -> Option<Applied> {
        let mut m = lock(&self.inflight);
        // Ours and the map's: nobody else is waiting.
        if Arc::strong_count(gate) <= 2 {
            m.remove(domain);
        }
        applied
    }

    async fn fetch_policy(&self, domain: &str) -> Result<(Policy, String), StsError> {
        let fetched = self.fetcher.fetch(domain).await.map_err(StsError::Fetch)?;
        let parsed = parse_policy_lenient(&fetched.body).map_err(StsError::Policy)?;
        for w in &parsed.warnings {
            tracing::warn!(domain, problem = %w, fix = %w.fix, "MTA-STS policy has a flaw (tolerated)");
        }
        Ok((
            parsed.policy,
            String::from_utf8_lossy(&fetched.body).into_owned(),
        ))
    }

    /// Keeps a policy in this node's cache (memory and file).
    fn keep(&self, domain: &str, entry: Arc<Entry>) {
        if let Some(dir) = &self.dir {
            let file = CacheFile {
                domain: domain.to_string(),
                id: entry.id.clone(),
                fetched: entry.fetched,
                policy: entry.text.clone(),
            };
            if let Err(e) = write_cache_file(dir, domain, &file) {
                tracing::warn!(domain, error = %e, "cannot save the MTA-STS policy cache");
            }
        }
        lock(&self.failures).remove(domain);
        lock(&self.cache).insert(domain.to_string(), entry);
    }

    /// Shares this node's cache through `share` from now on: offers what it holds, takes
    /// what the others hold, then pulls every `every` (see [`share`]).
    pub fn share_through(self: &Arc<Self>, share: Arc<dyn share::Share>, every: Duration) {
        if self.share.set(share).is_err() {
            return;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(sts) = this.upgrade() else { return };
            for (domain, entry) in sts.entries() {
                if !sts.push(&domain, &entry).await {
                    break;
                }
            }
            drop(sts);
            loop {
                let Some(sts) = this.upgrade() else { return };
                sts.pull().await;
                drop(sts);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Saves a policy this node fetched to the cluster's cache, if there is one; false when
    /// that failed.
    async fn push(&self, domain: &str, entry: &Entry) -> bool {
        let Some(share) = self.share.get() else {
            return true;
        };
        let p = share::SharedPolicy {
            domain: domain.to_string(),
            id: entry.id.clone(),
            fetched: entry.fetched,
            expires: entry.expires(),
            policy: entry.text.clone(),
        };
        match share.put(&p).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot share the MTA-STS policy with the cluster; kept on this node");
                false
            }
        }
    }

    /// Takes what other nodes saved since the last pull; false without a shared cache (or
    /// when it can't be read: this node's own cache goes on alone, and deliveries do not
    /// wait on the database again for [`SHARE_RETRY_SECS`]).
    async fn pull(&self) -> bool {
        let Some(share) = self.share.get() else {
            return false;
        };
        if self.share_down_until.load(Ordering::Relaxed) > unix_now() {
            return false;
        }
        let mark = self.share_mark.load(Ordering::Relaxed);
        match share.since(mark).await {
            Ok((policies, next)) => {
                for p in policies {
                    self.adopt(p);
                }
                self.share_mark.fetch_max(next, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's MTA-STS policies; this node goes on with its own cache");
                self.share_down_until
                    .store(unix_now() + SHARE_RETRY_SECS, Ordering::Relaxed);
                false
            }
        }
    }

    /// Takes a policy another node fetched unless this node's is as recent.
    fn adopt(&self, p: share::SharedPolicy) {
        let Some(domain) = canonical(&p.domain) else {
            return;
        };
        let now = unix_now();
        if lock(&self.cache)
            .get(&domain)
            .is_some_and(|e| e.fetched >= p.fetched)
        {
            return;
        }
        let Some(entry) = Entry::saved(p.id, p.policy, p.fetched, now) else {
            tracing::warn!(
                domain,
                "ignoring a shared MTA-STS policy that does not parse"
            );
            return;
        };
        if entry.expires() <= now {
            return;
        }
        tracing::info!(domain, id = %entry.id, mode = entry.policy.mode.as_str(),
            "MTA-STS policy taken from the cluster");
        self.keep(&domain, Arc::new(entry));
    }

    /// Refreshes, in the background, every cached policy past half its lifetime, so a policy
    /// is renewed before it expires whether or not mail flows (RFC 8461 §5.1).
    pub fn spawn_refresher(self: &Arc<Self>, every: std::time::Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(sts) = this.upgrade() else { return };
                let now = unix_now();
                let due: Vec<String> = sts
                    .entries()
                    .into_iter()
                    .filter(|(_, e)| e.wants_refresh(now))
                    .map(|(d, _)| d)
                    .collect();
                for d in due {
                    let _ = sts.refresh(&d).await;
                }
            }
        });
    }
}

/// The cache key for a domain: A-labels, lowercase, no trailing dot; `None` for a non-name.
fn canonical(domain: &str) -> Option<String> {
    crate::dns::canonical_name(domain)
        .ok()
        .filter(|d| safe_domain(d))
}

/// A fetch or parse failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsError {
    Fetch(FetchError),
    Policy(PolicyError),
}

impl std::fmt::Display for StsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StsError::Fetch(e) => e.fmt(f),
            StsError::Policy(e) => write!(f, "the policy is malformed: {e}"),
        }
    }
}

fn cache_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{domain}.json"))
}

/// Domains are LDH names here; anything else is never used as a file name.
fn safe_domain(domain: &str) -> bool {
    !domain.is_empty()
        && !domain.starts_with('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn write_cache_file(dir: &Path, domain: &str, file: &CacheFile) -> Result<(), String> {
    if !safe_domain(domain) {
        return Err(format!("{domain:?} is not a cacheable domain name"));
    }
    let json = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(".{domain}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let path = cache_path(dir, domain);
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_cache(dir: &Path, cache: &mut HashMap<String, Arc<Entry>>) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    let now = unix_now();
    for item in list.flatten() {
        let path = item.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok());
        let Some(file) = parsed else {
            tracing::warn!(path = %path.display(), "ignoring an unreadable MTA-STS cache file");
            continue;
        };
        let Some(entry) = Entry::saved(file.id, file.policy, file.fetched, now) else {
            tracing::warn!(path = %path.display(), "ignoring a cached policy that does not parse");
            continue;
        };
        if entry.expires() <= now || !safe_domain(&file.domain) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        cache.insert(file.domain, Arc::new(entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::tls::{Connector, Pin, TlsLevel, TlsRequirement};
    use crate::sts::policy::MxPattern;

    fn roots() -> Arc<RootCertStore> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key).unwrap();
        let mut store = RootCertStore::empty();
        store.add(ca.der().clone()).unwrap();
        Arc::new(store)
    }

    fn sts(extra: Option<Arc<RootCertStore>>, dir: Option<PathBuf>) -> Sts {
        let fetcher = Fetcher {
            resolver: crate::dns::Resolver::with_nameservers(&["127.0.0.1:9".parse().unwrap()])
                .unwrap(),
            connector: Connector::new(false, None),
            extra_roots: extra,
            port: 443,
            timeout: std::time::Duration::from_secs(1),
        };
        Sts::new(fetcher, dir).unwrap()
    }

    fn applied(mode: Mode) -> Applied {
        Applied {
            domain: "example.com".into(),
            entry: Arc::new(Entry {
                id: "1".into(),
                policy: Policy {
                    mode,
                    mx: vec![MxPattern::parse("mx.example.com").unwrap()],
                    max_age: 86_400,
                },
                fetched: unix_now(),
                text: String::new(),
            }),
            source: "fetched".into(),
        }
    }

    /// The policy room's requirement under `a`, with `base` as what the rules give.
    fn requirement(a: &Applied, base: &TlsRequirement, s: &Sts) -> TlsRequirement {
        let rules = crate::policy::TlsPolicy {
            default: base.clone(),
            ..Default::default()
        };
        let roots = |r: Option<&Arc<RootCertStore>>| s.roots_for(r);
        crate::policy::decide(&crate::policy::Facts {
            rules: &rules,
            sender: "",
            domain: &a.domain,
            recipients: &[],
            mta_sts: Some(a),
            sts_roots: &roots,
            requiretls: false,
            tls_required_no: false,
            dane_unavailable: None,
        })
        .requirement
    }

    #[test]
    fn enforce_is_at_least_verify_and_keeps_pins_and_anchors() {
        let (rule_ca, sts_ca) = (roots(), roots());
        let s = sts(Some(sts_ca.clone()), None);
        let pin = Pin::parse(&format!("sha256:cert:{}", "ab".repeat(32))).unwrap();
        let rule = TlsRequirement {
            level: TlsLevel::Encrypt,
            match_names: vec!["other.example".into()],
            pins: vec![pin],
            extra_roots: Some(rule_ca.clone()),
            mta_sts: false,
            dane: None,
        };
        let r = requirement(&applied(Mode::Enforce), &rule, &s);
        assert_eq!(r.level, TlsLevel::Verify);
        assert!(r.mta_sts);
        assert!(r.match_names.is_empty(), "the MX host name must be checked");
        assert_eq!(r.pins, vec![pin]);
        let merged = r.extra_roots.clone().unwrap();
        assert_eq!(merged.len(), 2);
        // The merged store keeps one identity, so sessions can be reused.
        let again = requirement(&applied(Mode::Enforce), &rule, &s);
        assert!(Arc::ptr_eq(&merged, &again.extra_roots.unwrap()));
        // A rule without a CA gets the policy's anchors as they are.
        let plain = requirement(
            &applied(Mode::Enforce),
            &TlsRequirement::level(TlsLevel::May),
            &s,
        );
        assert!(Arc::ptr_eq(&plain.extra_roots.unwrap(), &sts_ca));
    }

    #[test]
    fn testing_and_none_do_not_change_delivery() {
        let s = sts(Some(roots()), None);
        let verify = TlsRequirement::level(TlsLevel::Verify);
        let t = requirement(&applied(Mode::Testing), &verify, &s);
        assert_eq!(t.level, TlsLevel::Verify);
        assert!(!t.mta_sts);
        assert!(
            t.extra_roots.is_none(),
            "an enforced rule keeps its own anchors"
        );
        let may = requirement(
            &applied(Mode::Testing),
            &TlsRequirement::level(TlsLevel::May),
            &s,
        );
        assert_eq!(may.level, TlsLevel::May);
        assert!(
            may.extra_roots.is_some(),
            "testing reports against the policy's anchors"
        );
        let none = requirement(&applied(Mode::None), &verify, &s);
        assert_eq!(none.level, TlsLevel::Verify);
        assert!(!none.mta_sts);
    }

    #[test]
    fn reasons_name_the_failure() {
        assert_eq!(
            cert_reason(&CertFailure::Expired { not_after: 0 }),
            "expired"
        );
        assert_eq!(
            cert_reason(&CertFailure::UntrustedIssuer(None)),
            "untrusted"
        );
        assert_eq!(
            cert_reason(&CertFailure::NameMismatch {
                expected: vec![],
                presented: vec![]
            }),
            "name mismatch"
        );
        assert_eq!(tls_reason(&TlsFailure::Timeout), "handshake timed out");
        assert!(tls_reason(&TlsFailure::Handshake("alert".into())).starts_with("handshake failed"));
    }

    #[test]
    fn cache_keys_are_canonical_and_safe() {
        assert_eq!(canonical("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(
            canonical("bücher.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(canonical("../etc"), None);
        assert!(!safe_domain(".hidden"));
        assert!(!safe_domain("a/b"));
        assert!(safe_domain("mx-1.example.com"));
    }

    #[test]
    fn shared_policies_are_taken_when_newer_and_unexpired() {
        let dir = tempfile::tempdir().unwrap();
        let s = sts(None, Some(dir.path().to_path_buf()));
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 86400\r\n";
        let now = unix_now();
        let shared = |domain: &str, id: &str, fetched: u64, policy: &str| share::SharedPolicy {
            domain: domain.into(),
            id: id.into(),
            fetched,
            expires: fetched + 86_400,
            policy: policy.into(),
        };
        s.adopt(shared("Example.COM", "one", now - 100, text));
        assert_eq!(s.entry("example.com").unwrap().id, "one");
        // Kept in the node's own cache file too.
        assert!(dir.path().join("example.com.json").exists());
        // An older fetch does not replace a newer one; a newer one does.
        s.adopt(shared("example.com", "older", now - 200, text));
        assert_eq!(s.entry("example.com").unwrap().id, "one");
        s.adopt(shared("example.com", "two", now - 10, text));
        assert_eq!(s.entry("example.com").unwrap().id, "two");
        // Expired, unparsable or not a name: ignored.
        s.adopt(shared("old.example", "x", now - 90_000, text));
        assert!(s.entry("old.example").is_none());
        s.adopt(shared("bad.example", "x", now, "mode: sometimes"));
        assert!(s.entry("bad.example").is_none());
        s.adopt(shared("../etc", "x", now, text));
        assert_eq!(s.entries().len(), 1);
        // Another node's clock ahead: the fetch time is clamped to ours.
        s.adopt(shared("ahead.example", "a", now + 1_000_000, text));
        assert!(s.entry("ahead.example").unwrap().fetched <= unix_now());
    }

    #[test]
    fn cache_files_survive_a_restart_and_expired_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = sts(None, Some(dir.path().to_path_buf()));
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 86400\r\n";
        s.keep(
            "example.com",
            Arc::new(Entry {
                id: "abc".into(),
                policy: parse_policy(text.as_bytes()).unwrap(),
                fetched: unix_now(),
                text: text.into(),
            }),
        );
        // An expired one, written as if by an earlier run.
        let old = CacheFile {
            domain: "old.example".into(),
            id: "x".into(),
            fetched: 1_000,
            policy: text.into(),
        };
        write_cache_file(dir.path(), "old.example", &old).unwrap();
        // A clock set back: the fetch time is clamped to now.
        let future = CacheFile {
            domain: "future.example".into(),
            id: "f".into(),
            fetched: unix_now() + 10_000_000,
            policy: text.into(),
        };
        write_cache_file(dir.path(), "future.example", &future).unwrap();
        std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
        let again = sts(None, Some(dir.path().to_path_buf()));
        let e = again.entry("EXAMPLE.com").unwrap();
        assert_eq!(e.id, "abc");
        assert_eq!(e.policy.mode, Mode::Enforce);
        assert!(again.entry("old.example").is_none());
        assert!(!dir.path().join("old.example.json").exists());
        let f = again.entry("future.example").unwrap();
        assert!(f.fetched <= unix_now());
        assert_eq!(again.entries().len(), 2);
    }
}
