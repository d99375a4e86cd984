//! The reports others sent about our domains, kept under `<data_dir>/tlsrpt/received/`: one
//! JSON file per report mail (`<YYYY-MM-DD>/<queue id>.json`, the day it arrived, UTC), written
//! to a temporary name, synced and renamed, so a crash leaves the old file or the new one.
//! A mail with nothing readable keeps its raw text beside it (`.eml`) for inspection. Days
//! older than `keep_days` are removed when a new report arrives; at most [`MAX_PER_DAY`]
//! reports are kept per day.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::mail::Found;
use super::report::Report;

/// Report mails kept per day; more are counted in the log and dropped.
pub const MAX_PER_DAY: usize = 10_000;

/// One stored report mail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub queue_id: String,
    /// When it arrived (Unix seconds).
    pub received: u64,
    pub sender: String,
    pub report_domain: Option<String>,
    pub submitter: Option<String>,
    pub reports: Vec<Report>,
    pub problems: Vec<String>,
}

/// The received-report store and the addresses whose mail goes into it.
#[derive(Debug)]
pub struct Received {
    dir: PathBuf,
    addresses: HashSet<String>,
    keep_days: u64,
}

impl Received {
    /// `data_dir/tlsrpt/received`, for mail to `addresses` (compared lowercased).
    pub fn new(data_dir: &Path, addresses: &[String], keep_days: u64) -> Received {
        Received {
            dir: data_dir.join("tlsrpt").join("received"),
            addresses: addresses.iter().map(|a| a.to_ascii_lowercase()).collect(),
            keep_days: keep_days.max(1),
        }
    }

    pub fn is_report_address(&self, rcpt: &str) -> bool {
        !self.addresses.is_empty() && self.addresses.contains(&rcpt.to_ascii_lowercase())
    }

    /// Reads the reports in `message` and stores them; returns what was stored. Never fails
    /// for what the mail holds, only for the disk.
    pub fn store(
        &self,
        queue_id: &str,
        sender: &str,
        received: u64,
        message: &[u8],
    ) -> std::io::Result<Stored> {
        let found: Found = super::mail::reports_in_message(message);
        let stored = Stored {
            queue_id: queue_id.to_string(),
            received,
            sender: sender.to_string(),
            report_domain: found.report_domain.clone(),
            submitter: found.submitter.clone(),
            reports: found.reports.clone(),
            problems: found.problems.clone(),
        };
        let day = crate::util::utc_day(received);
        let dir = self.dir.join(&day);
        std::fs::create_dir_all(&dir)?;
        let name: String = queue_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let count = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count();
        let path = dir.join(format!("{name}.json"));
        if count >= MAX_PER_DAY && !path.exists() {
            return Err(std::io::Error::other(format!(
                "{MAX_PER_DAY} reports already stored for {day}"
            )));
        }
        if stored.reports.is_empty() {
            write_synced(&dir.join(format!("{name}.eml")), message)?;
        }
        let json = serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?;
        write_synced(&path, &json)?;
        self.prune(received);
        Ok(stored)
    }

    /// A report POSTed to the policy host (RFC 8460 §5.4): stored when it holds a readable
    /// report (`None`, nothing stored, when not: an open endpoint keeps no junk).
    pub fn store_post(
        &self,
        peer: std::net::IpAddr,
        now: u64,
        body: &[u8],
    ) -> std::io::Result<Option<Stored>> {
        let found = super::mail::reports_in_message(body);
        if found.reports.is_empty() {
            return Ok(None);
        }
        let id = format!("post{}", crate::util::new_queue_id());
        self.store(&id, &format!("https from {peer}"), now, body)
            .map(Some)
    }

    /// Day directories older than `keep_days` before `now` are removed.
    fn prune(&self, now: u64) {
        let oldest = crate::util::utc_day(now.saturating_sub(self.keep_days * 86_400));
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().to_string();
            if is_day(&name) && name < oldest {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// The stored report mails of the last `days` days (by arrival), oldest first.
    pub fn list(&self, now: u64, days: u64) -> Vec<Stored> {
        list_dir(&self.dir, now, days)
    }
}

/// The stored report mails under `dir` (a `tlsrpt/received` directory) of the last `days`
/// days before `now`, oldest first; unreadable files are skipped.
pub fn list_dir(dir: &Path, now: u64, days: u64) -> Vec<Stored> {
    let oldest = crate::util::utc_day(now.saturating_sub(days.saturating_sub(1) * 86_400));
    let mut day_dirs: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| is_day(n) && *n >= oldest)
                .collect()
        })
        .unwrap_or_default();
    day_dirs.sort();
    let mut out = Vec::new();
    for d in day_dirs {
        let Ok(rd) = std::fs::read_dir(dir.join(&d)) else {
            continue;
        };
        let mut day: Vec<Stored> = rd
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        day.sort_by_key(|s: &Stored| (s.received, s.queue_id.clone()));
        out.extend(day);
    }
    out
}

/// Per reporting organisation and day (the report's start, else its arrival; UTC): sessions
/// that succeeded and failed, failures by result type and by our MX host. Sorted by day,
/// then organisation. For `/api/tlsrpt` and the report page.
pub fn summarize(stored: &[Stored]) -> Vec<DaySummary> {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<(String, String), DaySummary> = BTreeMap::new();
    for s in stored {
        for r in &s.reports {
            let when = r
                .begin
                .and_then(|b| u64::try_from(b).ok())
                .unwrap_or(s.received);
            let day = crate::util::utc_day(when);
            let org = if r.organization.is_empty() {
                s.submitter.clone().unwrap_or_else(|| s.sender.clone())
            } else {
                r.organization.clone()
            };
            let e = by
                .entry((day.clone(), org.clone()))
                .or_insert_with(|| DaySummary {
                    day,
                    organization: org,
                    ..DaySummary::default()
                });
            for p in &r.policies {
                e.successful = e.successful.saturating_add(p.successful);
                e.failed = e.failed.saturating_add(p.failed);
                for d in &p.failures {
                    let t = if d.result_type.is_empty() {
                        "unknown".to_string()
                    } else {
                        d.result_type.clone()
                    };
                    *e.by_result.entry(t).or_default() += d.count;
                    let mx = if d.receiving_mx_hostname.is_empty() {
                        if d.receiving_ip.is_empty() {
                            "unknown".to_string()
                        } else {
                            d.receiving_ip.clone()
                        }
                    } else {
                        d.receiving_mx_hostname.clone()
                    };
                    *e.by_mx.entry(mx).or_default() += d.count;
                }
            }
        }
    }
    by.into_values().collect()
}

/// One reporter's view of one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DaySummary {
    pub day: String,
    pub organization: String,
    pub successful: u64,
    pub failed: u64,
    pub by_result: std::collections::BTreeMap<String, u64>,
    pub by_mx: std::collections::BTreeMap<String, u64>,
}

fn is_day(name: &str) -> bool {
    name.len() == 10
        && name.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{"organization-name": "R", "report-id": "x1",
        "date-range": {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"},
        "policies": [{"policy": {"policy-type": "sts", "policy-domain": "moat.test"},
          "summary": {"total-successful-session-count": 9, "total-failure-session-count": 1},
          "failure-details": [{"result-type": "certificate-expired", "failed-session-count": 1}]}]}"#;

    #[test]
    fn reports_are_stored_listed_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let r = Received::new(dir.path(), &["TLSRPT@moat.test".into()], 30);
        assert!(r.is_report_address("tlsrpt@MOAT.test"));
        assert!(!r.is_report_address("other@moat.test"));
        let day1 = 1_796_083_200; // 2026-12-01
        let s = r
            .store("AB12", "rep@x", day1 + 60, REPORT.as_bytes())
            .unwrap();
        assert_eq!(s.reports.len(), 1);
        // The same queue id again (a retried delivery) replaces, never doubles.
        r.store("AB12", "rep@x", day1 + 60, REPORT.as_bytes())
            .unwrap();
        // Nothing readable: stored with the problem and the raw mail.
        let s = r
            .store("CD34", "rep@y", day1 + 120, b"Subject: x\r\n\r\nhello")
            .unwrap();
        assert!(s.reports.is_empty());
        assert!(
            dir.path()
                .join("tlsrpt/received/2026-12-01/CD34.eml")
                .exists()
        );
        let listed = r.list(day1 + 3600, 1);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].queue_id, "AB12");
        let back = &listed[0].reports[0];
        assert_eq!(
            back.policies[0].failures[0].result_type,
            "certificate-expired"
        );
        assert_eq!(back.totals(), (9, 1));
        // 40 days later the old day is pruned (keep_days 30) when a report arrives.
        let later = day1 + 40 * 86_400;
        r.store("EF56", "rep@x", later, REPORT.as_bytes()).unwrap();
        assert!(!dir.path().join("tlsrpt/received/2026-12-01").exists());
        assert_eq!(r.list(later, 60).len(), 1);
        // The summary: one reporter, the report's own day, failures by type.
        let sum = summarize(&listed);
        assert_eq!(sum.len(), 1, "{sum:?}");
        assert_eq!(sum[0].day, "2026-12-01");
        assert_eq!(sum[0].organization, "R");
        assert_eq!((sum[0].successful, sum[0].failed), (9, 1));
        assert_eq!(sum[0].by_result["certificate-expired"], 1);
        assert_eq!(sum[0].by_mx["unknown"], 1);
    }
}
