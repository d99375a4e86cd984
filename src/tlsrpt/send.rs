//! Sending TLS-RPT aggregate reports (RFC 8460 §4-5) about our own outbound sessions.
//!
//! After midnight UTC, each policy domain with results for the previous day gets one report,
//! at a moment spread over [`TlsRptConfig::spread_secs`] by a hash of its name (so many
//! domains do not all go at 00:00), to the `rua` URIs of its `_smtp._tls` TXT record:
//! `mailto:` as a DKIM-signed `multipart/report` mail through our own queue (with
//! `TLS-Required: No`, so the report reaches a domain whose TLS is what fails), `https:` as a
//! POST. No report is made twice (the day is marked sent, on disk, before anything leaves),
//! none about a report's own delivery (`outbound` does not count those), none for a day
//! without a failure unless `send_always`, and at most `max_reports_per_hour`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::report::PolicyResult;
use super::results::{Day, Results, day_of};
use crate::config::TlsRptConfig;
use crate::queue::Queue;
use crate::smtp::session::Envelope;

/// Permanent failures after which an https rua is not tried again until restart.
const SUPPRESS_AFTER: u32 = 3;
/// How often the schedule is looked at (and results flushed).
const TICK: Duration = super::results::FLUSH_EVERY;

/// What became of one domain's report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub domain: String,
    /// `sent`, `queued`, or why not (`no TLS-RPT record`, `no failure`, ...).
    pub result: String,
    /// Per rua URI: what happened.
    pub rua: Vec<(String, String)>,
    pub report_id: Option<String>,
}

/// The report sender.
pub struct Sender {
    queue: Arc<Queue>,
    requeue: mpsc::UnboundedSender<String>,
    results: Arc<Results>,
    config: TlsRptConfig,
    hostname: String,
    signer: Option<crate::dkim::Signer>,
    fetcher: crate::sts::fetch::Fetcher,
    /// Reports made in the current hour (the hour, the count).
    rate: Mutex<(u64, u32)>,
    /// Permanent failures per https rua.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    /// `signer`: the DKIM key of report mails (none: reports go only to https rua).
    pub fn new(
        queue: Arc<Queue>,
        requeue: mpsc::UnboundedSender<String>,
        results: Arc<Results>,
        config: TlsRptConfig,
        hostname: String,
        signer: Option<crate::dkim::Signer>,
        fetcher: crate::sts::fetch::Fetcher,
    ) -> Sender {
        Sender {
            queue,
            requeue,
            results,
            config,
            hostname,
            signer,
            fetcher,
            rate: Mutex::new((0, 0)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The recorded results this sender reports from.
    pub fn results(&self) -> &Results {
        &self.results
    }

    fn submitter(&self) -> String {
        self.config
            .submitter
            .clone()
            .unwrap_or_else(|| self.hostname.clone())
    }

    fn from(&self) -> String {
        self.config
            .from
            .clone()
            .unwrap_or_else(|| format!("noreply-tlsrpt@{}", self.hostname))
    }

    /// Flushes results every [`TICK`]; with `send_reports`, sends what is due.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            let now = crate::util::unix_now();
            let results = self.results.clone();
            let flushed = tokio::task::spawn_blocking(move || results.flush(now)).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "TLS-RPT results could not be written; kept in memory, tried again");
            }
            if self.config.send_reports {
                self.send_due(now).await;
            }
        }
    }

    /// The previous day's reports whose moment has come.
    async fn send_due(&self, now: u64) {
        let today = day_of(now);
        let since_midnight = now - today * 86_400;
        let Some(yesterday) = today.checked_sub(1) else {
            return;
        };
        let Some(d) = self.results.day(yesterday) else {
            return;
        };
        for domain in d.domains().into_keys() {
            if d.sent.contains(&domain) || since_midnight < self.offset(&domain) {
                continue;
            }
            let o = self.send_domain(yesterday, &d, &domain, 3).await;
            if o.result == "rate limited" {
                break;
            }
        }
    }

    /// When after midnight `domain`'s report goes: ten minutes, plus a spread by its name.
    fn offset(&self, domain: &str) -> u64 {
        let spread = self.config.spread_secs.max(1);
        600 + u64::from(crc32fast::hash(domain.as_bytes())) % spread
    }

    /// Sends the reports for `day` now, whatever the hour (`moat tlsrpt send`); only
    /// domains not yet reported for that day.
    pub async fn send_day(&self, day: u64) -> Vec<Outcome> {
        let results = self.results.clone();
        let now = crate::util::unix_now();
        let _ = tokio::task::spawn_blocking(move || results.flush(now)).await;
        let Some(d) = self.results.day(day) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for domain in d.domains().into_keys() {
            if d.sent.contains(&domain) {
                out.push(Outcome {
                    domain,
                    result: "already reported".into(),
                    rua: Vec::new(),
                    report_id: None,
                });
                continue;
            }
            // One try each: the caller waits for the answer.
            out.push(self.send_domain(day, &d, &domain, 1).await);
        }
        out
    }

    async fn send_domain(&self, day: u64, d: &Day, domain: &str, tries: u32) -> Outcome {
        let mut outcome = Outcome {
            domain: domain.to_string(),
            result: String::new(),
            rua: Vec::new(),
            report_id: None,
        };
        let policies = d.policies_of(domain);
        let failed = policies.iter().any(|p| p.failed > 0);
        if !failed && !self.config.send_always {
            outcome.result = "no failure (send_always = false)".into();
            return outcome;
        }
        let rua = match self.rua_of(domain).await {
            Ok(r) => r,
            Err(why) => {
                // Looked up again tomorrow only for tomorrow's results: the record was
                // absent when the report was due, which is final for this day's report
                // unless the lookup failed (then the next tick tries again).
                if why.temporary {
                    outcome.result = format!("TLS-RPT record lookup failed: {}", why.words);
                    return outcome;
                }
                let _ = self.results.mark_sent(day, domain);
                outcome.result = why.words;
                return outcome;
            }
        };
        {
            let hour = crate::util::unix_now() / 3600;
            let mut r = self.rate.lock().unwrap_or_else(|e| e.into_inner());
            if r.0 != hour {
                *r = (hour, 0);
            }
            if r.1 >= self.config.max_reports_per_hour {
                outcome.result = "rate limited".into();
                return outcome;
            }
            r.1 += 1;
        }
        // Marked before anything leaves: a crash after this sends no report rather than two.
        match self.results.mark_sent(day, domain) {
            Ok(true) => {}
            Ok(false) => {
                outcome.result = "already reported".into();
                return outcome;
            }
            Err(e) => {
                outcome.result = format!("results could not be written ({e}); not sent");
                return outcome;
            }
        }
        let submitter = self.submitter();
        let unique = crate::util::new_queue_id();
        let report_id = format!(
            "{}.{unique}@{submitter}",
            crate::util::utc_day(day * 86_400)
        );
        let json = report_json(
            &submitter,
            self.config
                .contact
                .as_deref()
                .unwrap_or(&format!("mailto:postmaster@{}", self.hostname)),
            &report_id,
            day,
            &policies,
        );
        let gz = match gzip(json.to_string().as_bytes()) {
            Ok(g) => g,
            Err(e) => {
                outcome.result = format!("compressing the report failed: {e}");
                return outcome;
            }
        };
        let file = file_name(&submitter, domain, day, &unique);
        outcome.report_id = Some(report_id.clone());
        let mut mailto = Vec::new();
        for u in &rua {
            match u {
                Rua::Mailto(a) => mailto.push(a.clone()),
                Rua::Https(url) => {
                    let r = self.post(url, &gz, tries).await;
                    outcome.rua.push((url.clone(), r));
                }
            }
        }
        if !mailto.is_empty() {
            let r = self
                .mail(domain, &mailto, &submitter, &report_id, &file, &gz, day)
                .await;
            for a in &mailto {
                outcome.rua.push((format!("mailto:{a}"), r.clone()));
            }
        }
        outcome.result = if outcome.rua.is_empty() {
            "no usable rua".into()
        } else {
            "sent".into()
        };
        tracing::info!(domain, report_id, rua = ?outcome.rua, day = %crate::util::utc_day(day * 86_400),
            "TLS-RPT report made");
        outcome
    }

    /// POSTs the report, `tries` times a minute apart; then given up with a log line.
    async fn post(&self, url: &str, gz: &[u8], tries: u32) -> String {
        if self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
            .is_some_and(|n| *n >= SUPPRESS_AFTER)
        {
            return format!("suppressed after {SUPPRESS_AFTER} permanent failures");
        }
        let mut last = String::new();
        for attempt in 0..tries.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            match self.fetcher.post(url, "application/tlsrpt+gzip", gz).await {
                Ok(s) if (200..300).contains(&s) => {
                    self.failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(url);
                    return format!("HTTP {s}");
                }
                Ok(s) if (400..500).contains(&s) && s != 429 && s != 408 => {
                    last = format!("HTTP {s}");
                    *self
                        .failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(url.to_string())
                        .or_default() += 1;
                    break;
                }
                Ok(s) => last = format!("HTTP {s}"),
                Err(e) => last = e.to_string(),
            }
        }
        tracing::warn!(url, error = %last, "TLS-RPT report could not be POSTed; given up");
        format!("given up: {last}")
    }

    /// Builds, signs and queues the report mail.
    #[allow(clippy::too_many_arguments)]
    async fn mail(
        &self,
        domain: &str,
        to: &[String],
        submitter: &str,
        report_id: &str,
        file: &str,
        gz: &[u8],
        day: u64,
    ) -> String {
        let Some(signer) = &self.signer else {
            return "not sent: no [tls_rpt] dkim_key (RFC 8460 §5.3 requires DKIM)".into();
        };
        let now = crate::util::unix_now();
        let from = self.from();
        let body = report_mail(&MailParts {
            from: &from,
            to,
            domain,
            submitter,
            report_id,
            file,
            gz,
            day,
            now,
            hostname: &self.hostname,
        });
        let signature = match signer.sign(&body, now) {
            Ok(s) => s,
            Err(e) => return format!("not sent: DKIM signing failed: {e}"),
        };
        let mut message = signature.into_bytes();
        message.extend_from_slice(&body);
        let envelope = Envelope {
            sender: from,
            recipients: to.to_vec(),
            ..Envelope::default()
        };
        let id = crate::util::new_queue_id();
        match self.queue.store.store(&id, now, &envelope, &message).await {
            Ok(()) => {
                let _ = self.requeue.send(id.clone());
                format!("queued as {id}")
            }
            Err(e) => format!("not sent: queueing failed: {e}"),
        }
    }

    /// The `rua` URIs of `domain`'s `_smtp._tls` record (RFC 8460 §3).
    async fn rua_of(&self, domain: &str) -> Result<Vec<Rua>, NoRua> {
        let name = format!("_smtp._tls.{domain}");
        let records = self
            .queue
            .outbound
            .resolver
            .txt(&name)
            .await
            .map_err(|e| NoRua {
                temporary: e.is_temporary(),
                words: format!("{name}: {e}"),
            })?;
        parse_record(&records).map_err(|words| NoRua {
            temporary: false,
            words,
        })
    }
}

/// Why a domain gets no report.
struct NoRua {
    temporary: bool,
    words: String,
}

/// A report destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    Mailto(String),
    Https(String),
}

/// The destinations in a domain's TXT records: exactly one `v=TLSRPTv1` record, its `rua`
/// a comma-separated list of `mailto:` (percent-decoded, `?` parameters dropped) and
/// `https:` URIs; others are ignored.
pub fn parse_record(records: &[String]) -> Result<Vec<Rua>, String> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| {
            let r = r.trim_start();
            r.len() >= 10 && r[..10].eq_ignore_ascii_case("v=TLSRPTv1")
        })
        .collect();
    let record = match ours.as_slice() {
        [] => return Err("no TLS-RPT record".into()),
        [one] => one,
        _ => {
            return Err(format!(
                "{} TLS-RPT records (RFC 8460 §3: none is used)",
                ours.len()
            ));
        }
    };
    let mut out = Vec::new();
    for field in record.split(';') {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("rua") {
            continue;
        }
        for uri in v.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let lower = uri.to_ascii_lowercase();
            if lower.starts_with("mailto:") {
                let addr = uri[7..].split('?').next().unwrap_or("");
                let addr = percent_encoding::percent_decode_str(addr)
                    .decode_utf8_lossy()
                    .to_string();
                if crate::smtp::address::Address::parse(&addr, true).is_some() {
                    out.push(Rua::Mailto(addr));
                }
            } else if lower.starts_with("https://") {
                out.push(Rua::Https(uri.to_string()));
            }
        }
    }
    if out.is_empty() {
        return Err("the TLS-RPT record has no usable rua URI".into());
    }
    Ok(out)
}

/// `submitter!policy-domain!begin!end!id.json.gz` (RFC 8460 §5.3), times in Unix seconds.
pub fn file_name(submitter: &str, domain: &str, day: u64, unique: &str) -> String {
    let begin = day * 86_400;
    format!(
        "{submitter}!{domain}!{begin}!{}!{unique}.json.gz",
        begin + 86_399
    )
}

/// The report (RFC 8460 §4.4) for one day and one policy domain's policies.
pub fn report_json(
    organization: &str,
    contact: &str,
    report_id: &str,
    day: u64,
    policies: &[PolicyResult],
) -> Value {
    let begin = day * 86_400;
    let iso = |t: u64| {
        format!(
            "{}T{}Z",
            crate::util::utc_day(t),
            &crate::util::utc_seconds(t)
        )
    };
    let policies: Vec<Value> = policies
        .iter()
        .map(|p| {
            let mut policy = json!({
                "policy-type": p.policy_type,
                "policy-domain": p.policy_domain,
            });
            if !p.policy_strings.is_empty() {
                policy["policy-string"] = json!(p.policy_strings);
            }
            if !p.mx_hosts.is_empty() {
                policy["mx-host"] = json!(p.mx_hosts);
            }
            let details: Vec<Value> = p
                .failures
                .iter()
                .map(|d| {
                    let mut v = json!({
                        "result-type": d.result_type,
                        "failed-session-count": d.count,
                    });
                    for (k, x) in [
                        ("sending-mta-ip", &d.sending_ip),
                        ("receiving-mx-hostname", &d.receiving_mx_hostname),
                        ("receiving-mx-helo", &d.receiving_mx_helo),
                        ("receiving-ip", &d.receiving_ip),
                        ("additional-information", &d.additional_information),
                        ("failure-reason-code", &d.reason_code),
                    ] {
                        if !x.is_empty() {
                            v[k] = json!(x);
                        }
                    }
                    v
                })
                .collect();
            let mut v = json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": p.successful,
                    "total-failure-session-count": p.failed,
                },
            });
            if !details.is_empty() {
                v["failure-details"] = json!(details);
            }
            v
        })
        .collect();
    json!({
        "organization-name": organization,
        "date-range": {
            "start-datetime": iso(begin),
            "end-datetime": iso(begin + 86_399),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    })
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes)?;
    e.finish()
}

/// What a report mail is made of.
pub struct MailParts<'a> {
    pub from: &'a str,
    pub to: &'a [String],
    pub domain: &'a str,
    pub submitter: &'a str,
    pub report_id: &'a str,
    pub file: &'a str,
    pub gz: &'a [u8],
    pub day: u64,
    pub now: u64,
    pub hostname: &'a str,
}

/// The report mail (RFC 8460 §5.3), unsigned: `multipart/report; report-type="tlsrpt"` with
/// a short text part and the gzip report as `application/tlsrpt+gzip`, CRLF line endings.
pub fn report_mail(p: &MailParts<'_>) -> Vec<u8> {
    use base64::Engine;
    let boundary = format!("tlsrpt-{}", crate::util::new_queue_id());
    let day = crate::util::utc_day(p.day * 86_400);
    let mut m = String::new();
    m.push_str(&format!("From: <{}>\r\n", p.from));
    m.push_str(&format!(
        "To: {}\r\n",
        p.to.iter()
            .map(|a| format!("<{a}>"))
            .collect::<Vec<_>>()
            .join(",\r\n ")
    ));
    m.push_str(&format!(
        "Subject: Report Domain: {} Submitter: {} Report-ID: <{}>\r\n",
        p.domain, p.submitter, p.report_id
    ));
    m.push_str(&format!("Date: {}\r\n", crate::util::rfc5322_date(p.now)));
    m.push_str(&format!(
        "Message-ID: <{}.tlsrpt@{}>\r\n",
        crate::util::new_queue_id(),
        p.hostname
    ));
    m.push_str(&format!("TLS-Report-Domain: {}\r\n", p.domain));
    m.push_str(&format!("TLS-Report-Submitter: {}\r\n", p.submitter));
    // RFC 8460 §5.3 / RFC 8689 §4.1: the report must get through the TLS trouble it reports.
    m.push_str("TLS-Required: No\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a TLS-RPT aggregate report (RFC 8460) in MIME format.\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    m.push_str(&format!(
        "This is an aggregate TLS report from {} about the TLS sessions it made on {day}\r\n\
         (UTC) with the mail servers of {} (RFC 8460). The report is attached.\r\n\r\n",
        p.submitter, p.domain
    ));
    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: application/tlsrpt+gzip\r\n");
    m.push_str("Content-Transfer-Encoding: base64\r\n");
    m.push_str(&format!(
        "Content-Disposition: attachment;\r\n filename=\"{}\"\r\n\r\n",
        p.file
    ));
    let b64 = base64::engine::general_purpose::STANDARD.encode(p.gz);
    for chunk in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        m.push_str("\r\n");
    }
    m.push_str(&format!("--{boundary}--\r\n"));
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlsrpt::report::FailureDetail;

    fn policy() -> PolicyResult {
        PolicyResult {
            policy_type: "sts".into(),
            policy_domain: "example.net".into(),
            policy_strings: vec!["version: STSv1".into(), "mode: enforce".into()],
            mx_hosts: vec!["*.example.net".into()],
            successful: 5,
            failed: 2,
            failures: vec![FailureDetail {
                result_type: "certificate-expired".into(),
                receiving_mx_hostname: "mx1.example.net".into(),
                receiving_ip: "192.0.2.7".into(),
                count: 2,
                reason_code: "certificate:expired".into(),
                ..FailureDetail::default()
            }],
        }
    }

    #[test]
    fn the_report_is_rfc_8460_json_and_reads_back() {
        let day = day_of(1_796_256_000);
        let v = report_json(
            "mx.sender.example",
            "mailto:pm@sender.example",
            "r1",
            day,
            &[policy()],
        );
        assert_eq!(v["date-range"]["start-datetime"], "2026-12-03T00:00:00Z");
        assert_eq!(v["date-range"]["end-datetime"], "2026-12-03T23:59:59Z");
        let p = &v["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["mx-host"][0], "*.example.net");
        assert_eq!(p["summary"]["total-failure-session-count"], 2);
        assert_eq!(p["failure-details"][0]["failed-session-count"], 2);
        assert!(p["failure-details"][0].get("sending-mta-ip").is_none());
        let back = crate::tlsrpt::report::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(back.policies, vec![policy()]);
        assert_eq!(back.begin, Some(1_796_256_000));
        assert_eq!(back.organization, "mx.sender.example");
    }

    #[test]
    fn file_names_follow_rfc_8460() {
        assert_eq!(
            file_name(
                "mx.sender.example",
                "example.net",
                day_of(1_796_256_000),
                "abc"
            ),
            "mx.sender.example!example.net!1796256000!1796342399!abc.json.gz"
        );
    }

    #[test]
    fn rua_records() {
        let r = |s: &str| parse_record(&[s.to_string()]);
        assert_eq!(
            r("v=TLSRPTv1; rua=mailto:tls%2Brpt@example.net?subject=x, https://r.example/v1")
                .unwrap(),
            vec![
                Rua::Mailto("tls+rpt@example.net".into()),
                Rua::Https("https://r.example/v1".into())
            ]
        );
        assert!(r("v=TLSRPTv1; rua=ftp://x").is_err());
        assert!(r("v=spf1 -all").is_err());
        assert!(
            parse_record(&[
                "v=TLSRPTv1; rua=mailto:a@b.example".into(),
                "v=TLSRPTv1; rua=mailto:c@d.example".into()
            ])
            .is_err()
        );
    }

    #[test]
    fn the_mail_is_a_multipart_report_the_reader_takes() {
        let v = report_json(
            "s.example",
            "mailto:pm@s.example",
            "r1",
            20_790,
            &[policy()],
        );
        let gz = gzip(v.to_string().as_bytes()).unwrap();
        let to = vec!["tlsrpt@example.net".to_string()];
        let m = report_mail(&MailParts {
            from: "noreply@s.example",
            to: &to,
            domain: "example.net",
            submitter: "s.example",
            report_id: "r1",
            file: "s.example!example.net!1!2!x.json.gz",
            gz: &gz,
            day: 20_790,
            now: 1_796_300_000,
            hostname: "s.example",
        });
        let text = String::from_utf8(m.clone()).unwrap();
        assert!(text.contains("TLS-Report-Domain: example.net\r\n"));
        assert!(text.contains("TLS-Required: No\r\n"));
        assert!(text.contains("report-type=\"tlsrpt\""));
        assert!(!text.replace("\r\n", "").contains('\n'));
        assert!(crate::policy::is_tlsrpt_report(&m));
        let found = crate::tlsrpt::mail::reports_in_message(&m);
        assert_eq!(found.report_domain.as_deref(), Some("example.net"));
        assert_eq!(found.reports.len(), 1);
        assert_eq!(found.reports[0].policies, vec![policy()]);
    }
}
