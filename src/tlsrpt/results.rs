//! The results of our own outbound TLS sessions, for the reports we send (RFC 8460 §4):
//! per UTC day and policy (type and domain) the successful and failed session counts and the
//! failure details, equal details merged into one counted entry.
//!
//! Recording is in memory on the delivery path (one short lock); [`Results::flush`] writes the
//! days that changed to `<data_dir>/tlsrpt/results/<YYYY-MM-DD>.json` (temporary name, sync,
//! rename), called every [`FLUSH_EVERY`] by the sender task and at shutdown, so a crash loses
//! at most that much of the counts and never a report already marked sent. Bounded:
//! [`MAX_POLICIES_PER_DAY`] policies a day, [`MAX_DETAILS`] details a policy (further sessions
//! are still counted), days older than `keep_days` pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::report::{FailureDetail, PolicyResult};

/// Policies (type, domain) recorded per day; sessions for more are dropped and logged once.
pub const MAX_POLICIES_PER_DAY: usize = 20_000;
/// Distinct failure details kept per policy and day.
pub const MAX_DETAILS: usize = 200;
/// How often recorded results are written to disk.
pub const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// The policy a session was made under (RFC 8460 §4.4 `policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyId {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub kind: &'static str,
    /// The recipient domain (`sts`, `no-policy-found`) or the TLSA base name (`tlsa`).
    pub domain: String,
    /// The MTA-STS policy's lines or the TLSA records in presentation form.
    pub strings: Vec<String>,
    /// The MTA-STS policy's `mx` patterns.
    pub mx_hosts: Vec<String>,
}

/// A failed session's detail (RFC 8460 §4.4 `failure-details`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failed {
    pub result_type: &'static str,
    pub receiving_mx_hostname: String,
    pub receiving_ip: String,
    pub sending_ip: String,
    pub receiving_mx_helo: String,
    /// Moat's own cause label (stable text, so equal failures merge).
    pub reason_code: String,
}

/// One day's results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Day {
    /// Keyed by `type policy-domain`.
    pub policies: BTreeMap<String, PolicyResult>,
    /// Policy domains whose report for this day was made (whatever became of it).
    pub sent: BTreeSet<String>,
    /// Sessions not recorded because the day was full.
    pub dropped: u64,
}

impl Day {
    /// The policy domains with results, and whether any of their sessions failed.
    pub fn domains(&self) -> BTreeMap<String, bool> {
        let mut out: BTreeMap<String, bool> = BTreeMap::new();
        for p in self.policies.values() {
            *out.entry(p.policy_domain.clone()).or_default() |= p.failed > 0;
        }
        out
    }

    /// The policies of `domain`, in a stable order.
    pub fn policies_of(&self, domain: &str) -> Vec<PolicyResult> {
        self.policies
            .values()
            .filter(|p| p.policy_domain == domain)
            .cloned()
            .collect()
    }

    fn record(&mut self, policy: &PolicyId, failure: Option<&Failed>) -> bool {
        let key = format!("{} {}", policy.kind, policy.domain);
        if !self.policies.contains_key(&key) && self.policies.len() >= MAX_POLICIES_PER_DAY {
            self.dropped += 1;
            return false;
        }
        let p = self.policies.entry(key).or_insert_with(|| PolicyResult {
            policy_type: policy.kind.to_string(),
            policy_domain: policy.domain.clone(),
            ..PolicyResult::default()
        });
        // The policy as last seen this day (a policy can change within the day; the report
        // shows the latest).
        p.policy_strings.clone_from(&policy.strings);
        p.mx_hosts.clone_from(&policy.mx_hosts);
        let Some(f) = failure else {
            p.successful = p.successful.saturating_add(1);
            return true;
        };
        p.failed = p.failed.saturating_add(1);
        let same = |d: &FailureDetail| {
            d.result_type == f.result_type
                && d.receiving_mx_hostname == f.receiving_mx_hostname
                && d.receiving_ip == f.receiving_ip
                && d.sending_ip == f.sending_ip
                && d.receiving_mx_helo == f.receiving_mx_helo
                && d.reason_code == f.reason_code
        };
        if let Some(d) = p.failures.iter_mut().find(|d| same(d)) {
            d.count = d.count.saturating_add(1);
        } else if p.failures.len() < MAX_DETAILS {
            p.failures.push(FailureDetail {
                result_type: f.result_type.to_string(),
                sending_ip: f.sending_ip.clone(),
                receiving_mx_hostname: f.receiving_mx_hostname.clone(),
                receiving_mx_helo: f.receiving_mx_helo.clone(),
                receiving_ip: f.receiving_ip.clone(),
                count: 1,
                additional_information: String::new(),
                reason_code: f.reason_code.clone(),
            });
        }
        true
    }
}

#[derive(Debug, Default)]
struct Inner {
    days: BTreeMap<u64, Day>,
    dirty: BTreeSet<u64>,
    full_logged: BTreeSet<u64>,
}

/// The recorded results, in memory and under the data dir.
#[derive(Debug)]
pub struct Results {
    dir: PathBuf,
    keep_days: u64,
    inner: Mutex<Inner>,
}

/// The day number (days since 1970-01-01, UTC) of `unix`.
pub fn day_of(unix: u64) -> u64 {
    unix / 86_400
}

impl Results {
    /// Opens `data_dir/tlsrpt/results`, reading the days kept there (unreadable files are
    /// logged and set aside as `.bad`).
    pub fn open(data_dir: &Path, keep_days: u64, now: u64) -> Results {
        let dir = data_dir.join("tlsrpt").join("results");
        let mut inner = Inner::default();
        let oldest = day_of(now).saturating_sub(keep_days.max(2));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                let Some(day) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(parse_day)
                else {
                    continue;
                };
                if day < oldest {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<Day>(&b).map_err(|e| e.to_string()))
                {
                    Ok(d) => {
                        inner.days.insert(day, d);
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e,
                            "TLS-RPT results unreadable; set aside as .bad, that day's counts start again");
                        let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                    }
                }
            }
        }
        Results {
            dir,
            keep_days: keep_days.max(2),
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one session under `policy` at `now`: successful when `failure` is `None`.
    pub fn record(&self, now: u64, policy: &PolicyId, failure: Option<&Failed>) {
        let day = day_of(now);
        let mut inner = self.lock();
        let recorded = inner.days.entry(day).or_default().record(policy, failure);
        if recorded {
            inner.dirty.insert(day);
        } else if inner.full_logged.insert(day) {
            tracing::warn!(
                day = %crate::util::utc_day(now),
                limit = MAX_POLICIES_PER_DAY,
                "TLS-RPT results: the day holds the most policies kept; further ones are not recorded"
            );
        }
    }

    /// A copy of one day's results.
    pub fn day(&self, day: u64) -> Option<Day> {
        self.lock().days.get(&day).cloned()
    }

    /// Notes that `domain`'s report for `day` was made and writes it to disk before it
    /// returns: a report is never made twice, even across a crash. `false`: it was already.
    pub fn mark_sent(&self, day: u64, domain: &str) -> std::io::Result<bool> {
        let snapshot = {
            let mut inner = self.lock();
            let d = inner.days.entry(day).or_default();
            if !d.sent.insert(domain.to_string()) {
                return Ok(false);
            }
            inner.dirty.remove(&day);
            inner.days.get(&day).cloned().unwrap_or_default()
        };
        if let Err(e) = self.write(day, &snapshot) {
            // Not recorded as sent on disk: take it back, so a later attempt decides again.
            let mut inner = self.lock();
            if let Some(d) = inner.days.get_mut(&day) {
                d.sent.remove(domain);
            }
            inner.dirty.insert(day);
            return Err(e);
        }
        Ok(true)
    }

    /// Writes the days that changed since the last flush and removes days past `keep_days`.
    pub fn flush(&self, now: u64) -> std::io::Result<()> {
        let (todo, old): (Vec<(u64, Day)>, Vec<u64>) = {
            let mut inner = self.lock();
            let oldest = day_of(now).saturating_sub(self.keep_days);
            let old: Vec<u64> = inner.days.range(..oldest).map(|(d, _)| *d).collect();
            for d in &old {
                inner.days.remove(d);
                inner.dirty.remove(d);
            }
            let dirty = std::mem::take(&mut inner.dirty);
            (
                dirty
                    .into_iter()
                    .filter_map(|d| inner.days.get(&d).map(|x| (d, x.clone())))
                    .collect(),
                old,
            )
        };
        for d in old {
            let _ = std::fs::remove_file(self.path(d));
        }
        for (i, (day, d)) in todo.iter().enumerate() {
            if let Err(e) = self.write(*day, d) {
                let mut inner = self.lock();
                for (day, _) in &todo[i..] {
                    inner.dirty.insert(*day);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn path(&self, day: u64) -> PathBuf {
        self.dir
            .join(format!("{}.json", crate::util::utc_day(day * 86_400)))
    }

    fn write(&self, day: u64, d: &Day) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let json = serde_json::to_vec_pretty(d).map_err(std::io::Error::other)?;
        super::store::write_synced(&self.path(day), &json)
    }
}

/// `YYYY-MM-DD` to a day number.
pub fn parse_day(s: &str) -> Option<u64> {
    let t = super::report::parse_datetime(&format!("{s}T00:00:00Z"))?;
    u64::try_from(t).ok().map(day_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(domain: &str) -> PolicyId {
        PolicyId {
            kind: "sts",
            domain: domain.into(),
            strings: vec!["version: STSv1".into(), "mode: enforce".into()],
            mx_hosts: vec!["mx.example.com".into()],
        }
    }

    fn expired(host: &str) -> Failed {
        Failed {
            result_type: "certificate-expired",
            receiving_mx_hostname: host.into(),
            receiving_ip: "192.0.2.1".into(),
            reason_code: "certificate:expired".into(),
            ..Failed::default()
        }
    }

    #[test]
    fn sessions_are_counted_and_equal_details_merge() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_796_000_000;
        let r = Results::open(dir.path(), 7, now);
        let p = sts("example.com");
        r.record(now, &p, None);
        r.record(now, &p, Some(&expired("mx.example.com")));
        r.record(now + 1, &p, Some(&expired("mx.example.com")));
        r.record(now + 2, &p, Some(&expired("mx2.example.com")));
        let d = r.day(day_of(now)).unwrap();
        let got = d.policies_of("example.com");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].successful, got[0].failed), (1, 3));
        assert_eq!(got[0].failures.len(), 2);
        assert_eq!(got[0].failures[0].count, 2);
        assert_eq!(got[0].mx_hosts, vec!["mx.example.com"]);
        assert_eq!(d.domains().get("example.com"), Some(&true));
    }

    #[test]
    fn results_survive_a_restart_and_sent_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_796_000_000;
        let day = day_of(now);
        {
            let r = Results::open(dir.path(), 7, now);
            r.record(now, &sts("a.example"), None);
            r.flush(now).unwrap();
            assert!(r.mark_sent(day, "a.example").unwrap());
            assert!(!r.mark_sent(day, "a.example").unwrap());
            // Recorded after the last flush: lost in a crash, which this simulates.
            r.record(now, &sts("b.example"), None);
        }
        let r = Results::open(dir.path(), 7, now);
        let d = r.day(day).unwrap();
        assert!(d.sent.contains("a.example"));
        assert_eq!(d.domains().len(), 1);
        assert!(!r.mark_sent(day, "a.example").unwrap());
    }

    #[test]
    fn old_days_are_pruned_and_a_damaged_day_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_796_000_000;
        let r = Results::open(dir.path(), 3, now);
        r.record(now - 10 * 86_400, &sts("old.example"), None);
        r.record(now, &sts("new.example"), None);
        r.flush(now).unwrap();
        assert!(r.day(day_of(now - 10 * 86_400)).is_none());
        let files = dir.path().join("tlsrpt/results");
        std::fs::write(files.join("2026-11-29.json"), b"{not json").unwrap();
        let r = Results::open(dir.path(), 30, day_of(now) * 86_400);
        assert!(files.join("2026-11-29.json.bad").exists());
        assert!(r.day(day_of(now)).is_some());
    }

    #[test]
    fn a_full_day_still_counts_known_policies() {
        let mut d = Day::default();
        for i in 0..MAX_POLICIES_PER_DAY {
            assert!(d.record(&sts(&format!("d{i}.example")), None));
        }
        assert!(!d.record(&sts("one-more.example"), None));
        assert!(d.record(&sts("d0.example"), None));
        assert_eq!(d.dropped, 1);
        let mut p = Day::default();
        for i in 0..MAX_DETAILS + 5 {
            p.record(
                &sts("x.example"),
                Some(&expired(&format!("mx{i}.x.example"))),
            );
        }
        let x = &p.policies_of("x.example")[0];
        assert_eq!(x.failed, (MAX_DETAILS + 5) as u64);
        assert_eq!(x.failures.len(), MAX_DETAILS);
    }

    #[test]
    fn day_names() {
        assert_eq!(parse_day("2026-12-03"), Some(day_of(1_796_256_000)));
        assert_eq!(parse_day("not a day"), None);
    }
}
