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

/// Metric families: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "moat_connections_total",
        "counter",
        "SMTP connections accepted, by listener.",
    ),
    (
        "moat_connections_active",
        "gauge",
        "SMTP connections open now, by listener.",
    ),
    (
        "moat_connections_refused_total",
        "counter",
        "SMTP connections refused by the connection limits, by listener.",
    ),
    (
        "moat_sessions_total",
        "counter",
        "Finished SMTP sessions, by listener and whether TLS was up at the end.",
    ),
    (
        "moat_tls_handshakes_total",
        "counter",
        "Completed TLS handshakes, by direction (in, out), version and cipher.",
    ),
    (
        "moat_tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes, by direction and cause.",
    ),
    (
        "moat_messages_accepted_total",
        "counter",
        "Messages accepted (queued) by listener.",
    ),
    (
        "moat_messages_rejected_total",
        "counter",
        "Negative replies to clients, by enhanced status code.",
    ),
    (
        "moat_messages_delivered_total",
        "counter",
        "Recipients delivered, by TLS mode (mta_sts, verified, opportunistic, plaintext, local).",
    ),
    (
        "moat_messages_deferred_total",
        "counter",
        "Recipients deferred, by cause.",
    ),
    (
        "moat_messages_bounced_total",
        "counter",
        "Recipients bounced, by cause.",
    ),
    (
        "moat_queue_recipients",
        "gauge",
        "Recipients in the queue, by state.",
    ),
    (
        "moat_queue_oldest_seconds",
        "gauge",
        "Age of the oldest queued message with a recipient in each state.",
    ),
    (
        "moat_mta_sts_fetches_total",
        "counter",
        "MTA-STS policy fetches, by result.",
    ),
    (
        "moat_mta_sts_cache_hits_total",
        "counter",
        "Deliveries that used a cached MTA-STS policy.",
    ),
    (
        "moat_mta_sts_policies",
        "gauge",
        "Unexpired MTA-STS policies in the cache, by mode.",
    ),
    (
        "moat_certificate_expiry_seconds",
        "gauge",
        "Seconds until each served certificate expires (negative once expired), by first name.",
    ),
    (
        "moat_spool_sync_seconds",
        "histogram",
        "Time to make an accepted message durable (file fdatasync, then directory fsync).",
    ),
];

/// Upper bounds of the spool sync histogram, seconds.
const SYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Counters and gauges keyed by family and rendered label set.
#[derive(Debug, Default)]
pub struct Registry {
    values: Mutex<BTreeMap<(&'static str, String), i64>>,
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
    pub fn add(&self, name: &'static str, pairs: &[(&str, &str)], delta: i64) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *v.entry((name, labels(pairs))).or_insert(0) += delta;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, pairs: &[(&str, &str)], value: i64) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.insert((name, labels(pairs)), value);
    }

    /// Removes every series of a gauge family (before setting a fresh snapshot).
    pub fn clear(&self, name: &'static str) {
        let mut v = self.values.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(n, _), _| *n != name);
    }

    /// The current value of one series (tests, `moat status`).
    pub fn get(&self, name: &'static str, pairs: &[(&str, &str)]) -> i64 {
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
        for (name, kind, help) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            if *kind == "histogram" {
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
            for ((n, l), v) in values.range((*name, String::new())..) {
                if n != name {
                    break;
                }
                let _ = writeln!(out, "{name}{l} {v}");
            }
        }
        out
    }
}

/// Shorthand for [`Registry::add`] on the global registry with `+1`.
pub fn inc(name: &'static str, pairs: &[(&str, &str)]) {
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
            inc("moat_messages_delivered_total", &[("tls_mode", mode)]);
        }
        Outcome::Deferred | Outcome::Bounced => {
            let name = if ev.outcome == Outcome::Deferred {
                "moat_messages_deferred_total"
            } else {
                "moat_messages_bounced_total"
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
    inc("moat_messages_rejected_total", &[("code", enhanced)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_the_histogram() {
        let r = Registry::default();
        r.add("moat_connections_total", &[("listener", "smtp")], 1);
        r.add("moat_connections_total", &[("listener", "smtp")], 2);
        r.add("moat_connections_total", &[("listener", "sub\"mission")], 1);
        r.set("moat_queue_recipients", &[("state", "deferred")], 4);
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
        for (name, ..) in FAMILIES {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
        r.clear("moat_queue_recipients");
        assert!(!r.render().contains("moat_queue_recipients{"));
    }

    #[test]
    fn rejections_by_code() {
        rejection("554 5.7.1 Relay access denied");
        rejection("500 Syntax");
        rejection("250 2.0.0 Ok");
        assert!(global().get("moat_messages_rejected_total", &[("code", "5.7.1")]) >= 1);
        assert!(global().get("moat_messages_rejected_total", &[("code", "500")]) >= 1);
        assert_eq!(
            global().get("moat_messages_rejected_total", &[("code", "2.0.0")]),
            0
        );
    }
}
