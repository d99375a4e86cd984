//! Process-wide counters, gauges and one histogram, rendered in the Prometheus text format
//! (version 0.0.4) at `/metrics` on the admin listener.
//!
//! Labels are bounded sets (listener names, TLS versions, cipher names, status codes, cause
//! words), never domains or addresses: per-domain views live in the report page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::report::{AuthClass, DeliveryEvent, Outcome};

/// A metric family. An enum, not a string, so that a misspelt name is a compile error instead
/// of a series that silently never appears. Declaration order is exposition order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// SMTP connections accepted, by listener.
    ConnectionsTotal,
    /// SMTP connections open now, by listener.
    ConnectionsActive,
    /// SMTP connections refused by the connection limits, by listener.
    ConnectionsRefusedTotal,
    /// Finished SMTP sessions, by listener and whether TLS was up at the end.
    SessionsTotal,
    /// Completed TLS handshakes, by direction (in, out), version and cipher.
    TlsHandshakesTotal,
    /// Failed TLS handshakes, by direction and cause.
    TlsHandshakeFailuresTotal,
    /// Messages accepted (queued) by listener.
    MessagesAcceptedTotal,
    /// Negative replies to clients, by enhanced status code.
    MessagesRejectedTotal,
    /// Recipients delivered, by TLS mode (mta_sts, verified, opportunistic, plaintext, local).
    MessagesDeliveredTotal,
    /// Recipients deferred, by cause.
    MessagesDeferredTotal,
    /// Recipients bounced, by cause.
    MessagesBouncedTotal,
    /// Recipients in the queue, by state.
    QueueRecipients,
    /// Age of the oldest queued message with a recipient in each state.
    QueueOldestSeconds,
    /// MTA-STS policy fetches, by result.
    MtaStsFetchesTotal,
    /// Deliveries that used a cached MTA-STS policy.
    MtaStsCacheHitsTotal,
    /// Unexpired MTA-STS policies in the cache, by mode.
    MtaStsPolicies,
    /// Seconds until each served certificate expires (negative once expired), by first name.
    CertificateExpirySeconds,
    /// Time to make an accepted message durable (file fdatasync, then directory fsync).
    SpoolSyncSeconds,
    /// 1 when DNSSEC validation works (DANE is used), 0 when the self-check failed.
    DaneValidationWorking,
    /// Deliveries where `TLS-Required: No` (RFC 8689) set MTA-STS or DANE aside, by what.
    TlsRequiredNoTotal,
    /// Delivery passes that ended after this node's lease on the message ran out (a shared
    /// store: another node may have delivered the same recipients too).
    LeaseLostTotal,
    /// 1, labelled with this node's id and its queue store: every node of a cluster reports
    /// the cluster's queue gauges, this says which node a scrape came from.
    NodeInfo,
}

impl Metric {
    /// Every family, in exposition order.
    pub const ALL: &[Metric] = &[
        Metric::ConnectionsTotal,
        Metric::ConnectionsActive,
        Metric::ConnectionsRefusedTotal,
        Metric::SessionsTotal,
        Metric::TlsHandshakesTotal,
        Metric::TlsHandshakeFailuresTotal,
        Metric::MessagesAcceptedTotal,
        Metric::MessagesRejectedTotal,
        Metric::MessagesDeliveredTotal,
        Metric::MessagesDeferredTotal,
        Metric::MessagesBouncedTotal,
        Metric::QueueRecipients,
        Metric::QueueOldestSeconds,
        Metric::MtaStsFetchesTotal,
        Metric::MtaStsCacheHitsTotal,
        Metric::MtaStsPolicies,
        Metric::CertificateExpirySeconds,
        Metric::SpoolSyncSeconds,
        Metric::DaneValidationWorking,
        Metric::TlsRequiredNoTotal,
        Metric::LeaseLostTotal,
        Metric::NodeInfo,
    ];

    /// The exposition name, e.g. `moat_connections_total`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ConnectionsTotal => "moat_connections_total",
            Metric::ConnectionsActive => "moat_connections_active",
            Metric::ConnectionsRefusedTotal => "moat_connections_refused_total",
            Metric::SessionsTotal => "moat_sessions_total",
            Metric::TlsHandshakesTotal => "moat_tls_handshakes_total",
            Metric::TlsHandshakeFailuresTotal => "moat_tls_handshake_failures_total",
            Metric::MessagesAcceptedTotal => "moat_messages_accepted_total",
            Metric::MessagesRejectedTotal => "moat_messages_rejected_total",
            Metric::MessagesDeliveredTotal => "moat_messages_delivered_total",
            Metric::MessagesDeferredTotal => "moat_messages_deferred_total",
            Metric::MessagesBouncedTotal => "moat_messages_bounced_total",
            Metric::QueueRecipients => "moat_queue_recipients",
            Metric::QueueOldestSeconds => "moat_queue_oldest_seconds",
            Metric::MtaStsFetchesTotal => "moat_mta_sts_fetches_total",
            Metric::MtaStsCacheHitsTotal => "moat_mta_sts_cache_hits_total",
            Metric::MtaStsPolicies => "moat_mta_sts_policies",
            Metric::CertificateExpirySeconds => "moat_certificate_expiry_seconds",
            Metric::SpoolSyncSeconds => "moat_spool_sync_seconds",
            Metric::DaneValidationWorking => "moat_dane_validation_working",
            Metric::TlsRequiredNoTotal => "moat_tls_required_no_total",
            Metric::LeaseLostTotal => "moat_queue_leases_lost_total",
            Metric::NodeInfo => "moat_node_info",
        }
    }

    /// `counter`, `gauge` or `histogram`.
    pub fn kind(self) -> &'static str {
        match self {
            Metric::ConnectionsTotal => "counter",
            Metric::ConnectionsActive => "gauge",
            Metric::ConnectionsRefusedTotal => "counter",
            Metric::SessionsTotal => "counter",
            Metric::TlsHandshakesTotal => "counter",
            Metric::TlsHandshakeFailuresTotal => "counter",
            Metric::MessagesAcceptedTotal => "counter",
            Metric::MessagesRejectedTotal => "counter",
            Metric::MessagesDeliveredTotal => "counter",
            Metric::MessagesDeferredTotal => "counter",
            Metric::MessagesBouncedTotal => "counter",
            Metric::QueueRecipients => "gauge",
            Metric::QueueOldestSeconds => "gauge",
            Metric::MtaStsFetchesTotal => "counter",
            Metric::MtaStsCacheHitsTotal => "counter",
            Metric::MtaStsPolicies => "gauge",
            Metric::CertificateExpirySeconds => "gauge",
            Metric::SpoolSyncSeconds => "histogram",
            Metric::DaneValidationWorking => "gauge",
            Metric::TlsRequiredNoTotal => "counter",
            Metric::LeaseLostTotal => "counter",
            Metric::NodeInfo => "gauge",
        }
    }

    /// The `# HELP` text.
    pub fn help(self) -> &'static str {
        match self {
            Metric::ConnectionsTotal => "SMTP connections accepted, by listener.",
            Metric::ConnectionsActive => "SMTP connections open now, by listener.",
            Metric::ConnectionsRefusedTotal => {
                "SMTP connections refused by the connection limits, by listener."
            }
            Metric::SessionsTotal => {
                "Finished SMTP sessions, by listener and whether TLS was up at the end."
            }
            Metric::TlsHandshakesTotal => {
                "Completed TLS handshakes, by direction (in, out), version and cipher."
            }
            Metric::TlsHandshakeFailuresTotal => "Failed TLS handshakes, by direction and cause.",
            Metric::MessagesAcceptedTotal => "Messages accepted (queued) by listener.",
            Metric::MessagesRejectedTotal => {
                "Negative replies to clients, by enhanced status code."
            }
            Metric::MessagesDeliveredTotal => {
                "Recipients delivered, by TLS mode (mta_sts, verified, opportunistic, plaintext, local)."
            }
            Metric::MessagesDeferredTotal => "Recipients deferred, by cause.",
            Metric::MessagesBouncedTotal => "Recipients bounced, by cause.",
            Metric::QueueRecipients => "Recipients in the queue, by state.",
            Metric::QueueOldestSeconds => {
                "Age of the oldest queued message with a recipient in each state."
            }
            Metric::MtaStsFetchesTotal => "MTA-STS policy fetches, by result.",
            Metric::MtaStsCacheHitsTotal => "Deliveries that used a cached MTA-STS policy.",
            Metric::MtaStsPolicies => "Unexpired MTA-STS policies in the cache, by mode.",
            Metric::CertificateExpirySeconds => {
                "Seconds until each served certificate expires (negative once expired), by first name."
            }
            Metric::SpoolSyncSeconds => {
                "Time to make an accepted message durable (file fdatasync, then directory fsync)."
            }
            Metric::DaneValidationWorking => {
                "1 when DNSSEC validation works and DANE is used, 0 when the self-check failed."
            }
            Metric::TlsRequiredNoTotal => {
                "Deliveries where TLS-Required: No (RFC 8689) set MTA-STS or DANE aside, by what (mta_sts, dane)."
            }
            Metric::LeaseLostTotal => {
                "Delivery passes that ended after this node's lease on the message ran out (shared store)."
            }
            Metric::NodeInfo => {
                "1, labelled with this node's id and queue store (embedded, postgres); queue gauges are the cluster's with a shared store."
            }
        }
    }
}

/// Upper bounds of the spool sync histogram, seconds.
const SYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Counters and gauges keyed by family and rendered label set.
#[derive(Debug, Default)]
pub struct Registry {
    values: Mutex<BTreeMap<(Metric, String), i64>>,
    sync_buckets: [AtomicU64; 12],
    sync_count: AtomicU64,
    /// Sum in nanoseconds.
    sync_sum_ns: AtomicU64,
}

static GLOBAL: OnceLock<Registry> = OnceLock::new();

/// The process-wide registry.
pub fn global() -> &'static Registry {
    GLOBAL.get_or_init(Registry::default)
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Registry {
    /// Adds `delta` to a counter or gauge.
    pub fn add(&self, name: Metric, pairs: &[(&str, &str)], delta: i64) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *v.entry((name, labels(pairs))).or_insert(0) += delta;
    }

    /// Sets a gauge.
    pub fn set(&self, name: Metric, pairs: &[(&str, &str)], value: i64) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.insert((name, labels(pairs)), value);
    }

    /// Removes every series of a gauge family (before setting a fresh snapshot).
    pub fn clear(&self, name: Metric) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(n, _), _| *n != name);
    }

    /// The current value of one series (tests, `moat status`).
    pub fn get(&self, name: Metric, pairs: &[(&str, &str)]) -> i64 {
        let v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.get(&(name, labels(pairs))).copied().unwrap_or(0)
    }

    /// Records one spool sync.
    pub fn observe_sync(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.sync_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sync_count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sync_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let values = self
            .values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::with_capacity(8192);
        for &metric in Metric::ALL {
            let (name, kind) = (metric.name(), metric.kind());
            let _ = writeln!(out, "# HELP {name} {}", metric.help());
            let _ = writeln!(out, "# TYPE {name} {kind}");
            if kind == "histogram" {
                for (i, b) in SYNC_BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{b}\"}} {}",
                        self.sync_buckets[i].load(Ordering::Relaxed)
                    );
                }
                let count = self.sync_count.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
                let sum = self.sync_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(out, "{name}_sum {sum}");
                let _ = writeln!(out, "{name}_count {count}");
                continue;
            }
            for ((n, l), v) in values.range((metric, String::new())..) {
                if *n != metric {
                    break;
                }
                let _ = writeln!(out, "{name}{l} {v}");
            }
        }
        out
    }
}

/// Shorthand for [`Registry::add`] on the global registry with `+1`.
pub fn inc(name: Metric, pairs: &[(&str, &str)]) {
    global().add(name, pairs, 1);
}

/// Counts one recipient outcome.
pub fn delivery(ev: &DeliveryEvent) {
    match ev.outcome {
        Outcome::Delivered => {
            let mode = match ev.auth {
                AuthClass::MtaSts => "mta_sts",
                AuthClass::Dane => "dane",
                AuthClass::Verified => "verified",
                AuthClass::Opportunistic => "opportunistic",
                AuthClass::Plaintext | AuthClass::None => "plaintext",
                AuthClass::Local => "local",
            };
            inc(Metric::MessagesDeliveredTotal, &[("tls_mode", mode)]);
        }
        Outcome::Deferred | Outcome::Bounced => {
            let name = if ev.outcome == Outcome::Deferred {
                Metric::MessagesDeferredTotal
            } else {
                Metric::MessagesBouncedTotal
            };
            inc(name, &[("cause", ev.cause.as_deref().unwrap_or("unknown"))]);
        }
    }
}

/// Counts a negative reply the server sent, by its enhanced code (`5.7.1`), or the basic
/// code when it has none.
pub fn rejection(reply_line: &str) {
    let mut words = reply_line.split_ascii_whitespace();
    let code = words.next().unwrap_or("");
    if !(code.starts_with('4') || code.starts_with('5')) || code.len() < 3 {
        return;
    }
    let code = &code[..3];
    let enhanced = words
        .next()
        .filter(|w| w.split('.').count() == 3 && w.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .unwrap_or(code);
    inc(Metric::MessagesRejectedTotal, &[("code", enhanced)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_the_histogram() {
        let r = Registry::default();
        r.add(Metric::ConnectionsTotal, &[("listener", "smtp")], 1);
        r.add(Metric::ConnectionsTotal, &[("listener", "smtp")], 2);
        r.add(Metric::ConnectionsTotal, &[("listener", "sub\"mission")], 1);
        r.set(Metric::QueueRecipients, &[("state", "deferred")], 4);
        r.observe_sync(std::time::Duration::from_micros(300));
        r.observe_sync(std::time::Duration::from_millis(3));
        let text = r.render();
        assert!(
            text.contains("# TYPE moat_connections_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_connections_total{listener=\"smtp\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_connections_total{listener=\"sub\\\"mission\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_queue_recipients{state=\"deferred\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_spool_sync_seconds_bucket{le=\"0.00025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_spool_sync_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_spool_sync_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("moat_spool_sync_seconds_count 2\n"), "{text}");
        // Every family has HELP and TYPE once.
        for m in Metric::ALL {
            let name = m.name();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
        r.clear(Metric::QueueRecipients);
        assert!(!r.render().contains("moat_queue_recipients{"));
    }

    #[test]
    fn rejections_by_code() {
        rejection("554 5.7.1 Relay access denied");
        rejection("500 Syntax");
        rejection("250 2.0.0 Ok");
        assert!(global().get(Metric::MessagesRejectedTotal, &[("code", "5.7.1")]) >= 1);
        assert!(global().get(Metric::MessagesRejectedTotal, &[("code", "500")]) >= 1);
        assert_eq!(
            global().get(Metric::MessagesRejectedTotal, &[("code", "2.0.0")]),
            0
        );
    }
}
