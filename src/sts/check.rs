//! `moat sts check DOMAIN`: a domain's MTA-STS setup as an outside sender sees it.
//!
//! Checks, in order: the `_mta-sts` TXT record (syntax, exactly one), the policy fetch
//! (certificate of `mta-sts.<domain>`, status, media type, redirects, size, time against the
//! RFC's one-minute guidance), the policy's syntax and mode, that every MX host is covered by
//! an `mx` pattern, and that each MX host offers STARTTLS with a certificate valid for its
//! name. Each finding is PASS, WARN or FAIL, and every FAIL says what to fix.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use serde::Serialize;

use super::fetch::{FetchError, Fetcher, policy_host, policy_url};
use super::policy::{Mode, Parsed, Policy, parse_policy_lenient, parse_txt};
use crate::dns::{MxAnswer, Resolver};
use crate::outbound::tls::Connector;
use crate::probe::{Kind, ProbeOptions, Verdict, probe};

/// A finding's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Worth knowing, not a problem (not counted as a warning).
    Info,
    Warn,
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Info => "INFO",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub status: Status,
    /// `txt`, `fetch`, `policy`, `mx`, `tls`.
    pub check: &'static str,
    pub detail: String,
    /// What to change, for a FAIL or WARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub domain: String,
    pub ok: bool,
    pub findings: Vec<Finding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Report {
    /// The human form: one line per finding, the fix indented under it.
    pub fn render(&self) -> String {
        let mut out = format!("MTA-STS check for {}\n", self.domain);
        for f in &self.findings {
            out.push_str(&format!(
                "{}  {:<6} {}\n",
                f.status.word(),
                f.check,
                f.detail
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("            fix: {fix}\n"));
            }
        }
        let fails = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count();
        let warns = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Warn)
            .count();
        out.push_str(&if fails == 0 {
            format!("{}: MTA-STS set up correctly ({warns} warning(s))\n", self.domain)
        } else {
            format!(
                "{}: {fails} problem(s), {warns} warning(s); senders will not apply the policy as intended\n",
                self.domain
            )
        });
        out
    }
}

/// How to reach the world (tests point these at loopback).
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub resolver: Resolver,
    /// A validating resolver: the MX RRset's DNSSEC state and each MX host's TLSA records
    /// are checked too (`None`: not checked).
    pub validator: Option<crate::dns::Validator>,
    pub extra_roots: Option<RootCertStore>,
    pub policy_port: u16,
    pub smtp_port: u16,
    pub timeout: Duration,
}

/// RFC 8461 §3.3: senders wait about a minute for a policy; this much is worth a warning.
const SLOW_FETCH: Duration = Duration::from_secs(10);

fn finding(status: Status, check: &'static str, detail: String, fix: Option<String>) -> Finding {
    Finding {
        status,
        check,
        detail,
        fix,
    }
}

/// Runs every check for `domain`.
pub async fn check(domain: &str, opts: &CheckOptions) -> Report {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut out = Vec::new();
    let txt_name = format!("_mta-sts.{domain}");

    // 1. TXT record.
    match opts.resolver.txt(&txt_name).await {
        Err(e) => out.push(finding(
            Status::Fail,
            "txt",
            format!("{txt_name}: {e}"),
            Some("make the domain's DNS answer TXT queries".into()),
        )),
        Ok(records) => {
            let sts: Vec<&String> = records
                .iter()
                .filter(|r| super::policy::is_sts_record(r))
                .collect();
            match sts.as_slice() {
                [] => out.push(finding(
                    Status::Fail,
                    "txt",
                    format!("{txt_name} has no v=STSv1 TXT record"),
                    Some(format!(
                        "publish {txt_name} TXT \"v=STSv1; id=<yyyymmddhhmmss>Z;\" (moat sts generate --domain {domain} prints it)"
                    )),
                )),
                [one] => match parse_txt(one) {
                    Ok(r) => out.push(finding(
                        Status::Pass,
                        "txt",
                        format!("{txt_name} \"{one}\" (id {})", r.id),
                        None,
                    )),
                    Err(e) => out.push(finding(
                        Status::Fail,
                        "txt",
                        format!("{txt_name} \"{one}\": {e}"),
                        Some("write it as \"v=STSv1; id=<1-32 letters or digits>;\"".into()),
                    )),
                },
                many => out.push(finding(
                    Status::Fail,
                    "txt",
                    format!(
                        "{txt_name} has {} v=STSv1 records; senders then ignore them all",
                        many.len()
                    ),
                    Some("keep exactly one v=STSv1 record".into()),
                )),
            }
        }
    }

    // 2. Fetch.
    let fetcher = Fetcher {
        resolver: opts.resolver.clone(),
        connector: Connector::new(true, None),
        extra_roots: opts.extra_roots.clone().map(Arc::new),
        port: opts.policy_port,
        timeout: opts.timeout,
    };
    let url = policy_url(&domain);
    let mut policy: Option<Policy> = None;
    let mut policy_text = None;
    match fetcher.fetch(&domain).await {
        Err(e) => out.push(finding(
            Status::Fail,
            "fetch",
            format!("{url}: {e}"),
            Some(fetch_fix(&e, &domain)),
        )),
        Ok(f) => {
            let ms = f.elapsed.as_millis();
            out.push(finding(
                Status::Pass,
                "fetch",
                format!(
                    "{url}: 200, {}, {} bytes in {ms} ms from {}",
                    f.content_type,
                    f.body.len(),
                    f.addr.ip()
                ),
                None,
            ));
            if f.elapsed > SLOW_FETCH {
                out.push(finding(
                    Status::Warn,
                    "fetch",
                    format!("the policy took {ms} ms; senders give up after about 60 s"),
                    Some("serve the policy faster (a static file)".into()),
                ));
            }
            // 3. Policy syntax.
            match parse_policy_lenient(&f.body) {
                Ok(Parsed { policy: p, warnings }) => {
                    let mx: Vec<&str> = p.mx.iter().map(|m| m.as_str()).collect();
                    out.push(finding(
                        Status::Pass,
                        "policy",
                        if mx.is_empty() {
                            format!("mode {}, max_age {}, no mx", p.mode.as_str(), p.max_age)
                        } else {
                            format!(
                                "mode {}, max_age {}, mx {}",
                                p.mode.as_str(),
                                p.max_age,
                                mx.join(" ")
                            )
                        },
                        None,
                    ));
                    for w in warnings {
                        out.push(finding(
                            Status::Warn,
                            "policy",
                            format!("{w}; senders that follow RFC 8461 tolerate this, stricter ones may ignore the policy"),
                            Some(w.fix),
                        ));
                    }
                    match p.mode {
                        Mode::Testing => out.push(finding(
                            Status::Warn,
                            "policy",
                            "mode testing: senders report failures but still deliver".into(),
                            Some(
                                "once TLS reports are clean, set mode: enforce and publish a new id"
                                    .into(),
                            ),
                        )),
                        Mode::None => out.push(finding(
                            Status::Warn,
                            "policy",
                            "mode none: the domain is withdrawing MTA-STS".into(),
                            None,
                        )),
                        Mode::Enforce => {}
                    }
                    if p.max_age < 86_400 {
                        out.push(finding(
                            Status::Warn,
                            "policy",
                            format!("max_age {} is under a day", p.max_age),
                            Some(
                                "use at least 604800 (a week) once the policy is stable".into(),
                            ),
                        ));
                    }
                    policy = Some(p);
                    policy_text = Some(String::from_utf8_lossy(&f.body).into_owned());
                }
                Err(e) => out.push(finding(
                    Status::Fail,
                    "policy",
                    format!("the policy does not parse: {e}"),
                    Some(format!(
                        "serve version, mode, mx and max_age lines (moat sts generate --domain {domain} writes one)"
                    )),
                )),
            }
        }
    }

    // TLS-RPT (RFC 8460 §3): where senders report failures.
    out.push(tlsrpt_finding(&domain, opts).await);

    // DNSSEC of the MX RRset (DANE needs it secure).
    if let Some(v) = &opts.validator {
        use crate::policy::Dnssec;
        out.push(match v.mx(&domain).await {
            Dnssec::Secure => finding(
                Status::Pass,
                "dnssec",
                format!("the MX records of {domain} are DNSSEC-signed and validate"),
                None,
            ),
            Dnssec::Insecure => finding(
                Status::Warn,
                "dnssec",
                format!("the MX records of {domain} are not DNSSEC-signed: DANE cannot protect it"),
                Some("sign the zone (and publish its DS) to use DANE".into()),
            ),
            Dnssec::Unanswered(w) => finding(
                Status::Fail,
                "dnssec",
                format!("the validating MX lookup of {domain} got no answer: {w}"),
                Some("make the domain's nameservers answer DNSSEC queries (DO bit) for MX".into()),
            ),
            Dnssec::Bogus(w) => finding(
                Status::Fail,
                "dnssec",
                format!("the MX records of {domain} fail DNSSEC validation: {w}"),
                Some("fix the zone's signatures or its DS in the parent: validating senders defer all mail".into()),
            ),
        });
    }

    // 4. MX coverage and 5. each MX host's STARTTLS certificate.
    let hosts: Vec<String> = match opts.resolver.mx(&domain).await {
        Ok(MxAnswer::Records(mut r)) => {
            r.sort_by_key(|(p, _)| *p);
            r.into_iter()
                .map(|(_, h)| h)
                .filter(|h| !h.is_empty())
                .collect()
        }
        Ok(MxAnswer::NoRecords) => {
            out.push(finding(
                Status::Warn,
                "mx",
                format!("{domain} has no MX records; senders use {domain} itself (implicit MX)"),
                None,
            ));
            vec![domain.clone()]
        }
        Ok(MxAnswer::NxDomain) => {
            out.push(finding(
                Status::Fail,
                "mx",
                format!("{domain} does not exist"),
                None,
            ));
            Vec::new()
        }
        Err(e) => {
            out.push(finding(
                Status::Fail,
                "mx",
                format!("MX lookup: {e}"),
                Some("make the domain's DNS answer MX queries".into()),
            ));
            Vec::new()
        }
    };
    for host in &hosts {
        if let Some(p) = &policy {
            if p.mode == Mode::None {
                // Mode none withdraws the policy: there is nothing for MX hosts to match.
            } else if p.matches_mx(host) {
                out.push(finding(
                    Status::Pass,
                    "mx",
                    format!("{host} is covered by the policy"),
                    None,
                ));
            } else {
                out.push(finding(
                    Status::Fail,
                    "mx",
                    format!("{host} matches no mx pattern of the policy"),
                    Some(format!(
                        "add \"mx: {host}\" to the policy and publish a new id, or fix the MX record"
                    )),
                ));
            }
        }
        out.extend(mx_tls(host, opts).await);
    }
    let ok = !out.iter().any(|f| f.status == Status::Fail);
    Report {
        domain,
        ok,
        findings: out,
        policy: policy_text,
    }
}

/// Probes one MX host's STARTTLS and certificate for its name.
async fn mx_tls(host: &str, opts: &CheckOptions) -> Vec<Finding> {
    let ip: IpAddr = match opts
        .resolver
        .addresses(host)
        .await
        .map(|a| a.first().copied())
    {
        Ok(Some(ip)) => ip,
        Ok(None) => {
            return vec![finding(
                Status::Fail,
                "tls",
                format!("{host} has no address"),
                Some(format!("publish A/AAAA records for {host}")),
            )];
        }
        Err(e) => {
            return vec![finding(
                Status::Fail,
                "tls",
                format!("{host}: {e}"),
                Some(format!("publish A/AAAA records for {host}")),
            )];
        }
    };
    let probe_opts = ProbeOptions {
        host: ip.to_string(),
        port: opts.smtp_port,
        implicit_tls: false,
        name: Some(host.to_string()),
        helo: crate::probe::default_helo(),
        step_timeout: opts.timeout,
        extra_roots: opts.extra_roots.clone(),
        dane: opts.validator.clone(),
    };
    let report = probe(&probe_opts).await;
    let tls = report
        .tls
        .as_ref()
        .map(|t| {
            let days = t
                .chain
                .first()
                .map(|c| match c.days_left {
                    1 => ", certificate expires in 1 day".to_string(),
                    d => format!(", certificate expires in {d} days"),
                })
                .unwrap_or_default();
            format!("{} {}{days}", t.version, t.cipher)
        })
        .unwrap_or_default();
    // DANE: the probe judged the chain by the TLSA records; the CA result stands on its own
    // line for MTA-STS, which needs it whatever DANE says.
    let dane = report.dane.as_ref().and_then(|d| {
        let records: Vec<String> = d.records.iter().map(|r| r.record.clone()).collect();
        if d.applies && d.result.starts_with("verified") {
            Some(finding(
                Status::Pass,
                "dane",
                format!("{host}: {}", d.result),
                None,
            ))
        } else if d.applies {
            Some(finding(
                Status::Fail,
                "dane",
                format!("{host}: {} (records: {})", d.result, records.join("; ")),
                Some(format!(
                    "publish a TLSA record for the certificate {host} serves now (`moat dane tlsa` prints it) or serve the certificate the records describe"
                )),
            ))
        } else if d.result.starts_with("TLSA lookup failed") {
            Some(finding(
                Status::Fail,
                "dane",
                format!("{host}: {}", d.result),
                Some("fix the zone's DNSSEC so that the TLSA lookup validates".into()),
            ))
        } else if !d.records.is_empty() {
            Some(finding(
                Status::Warn,
                "dane",
                format!("{host}: {}", d.result),
                None,
            ))
        } else {
            None
        }
    });
    let dane_decides = report.dane.as_ref().is_some_and(|d| d.applies);
    let ca_failures: Vec<&crate::probe::Finding> = report
        .failures
        .iter()
        .filter(|f| f.kind != Kind::Dane)
        .collect();
    let verdict = if dane_decides {
        // The probe let DANE decide; MTA-STS still needs the CA check, reported as notes.
        let ca_notes: Vec<&String> = report
            .notes
            .iter()
            .filter(|n| n.starts_with("not needed under DANE"))
            .collect();
        if ca_notes.is_empty() && ca_failures.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    } else {
        report.verdict
    };
    let mut found = match verdict {
        Verdict::Pass if dane_decides && report.tls.is_none() => Vec::new(),
        Verdict::Pass => vec![finding(
            Status::Pass,
            "tls",
            format!("{host} [{ip}]: STARTTLS, {tls}, valid for {host}"),
            None,
        )],
        Verdict::Fail => {
            let mut why: Vec<String> = ca_failures.iter().map(|f| f.message.clone()).collect();
            if dane_decides {
                why.extend(
                    report
                        .notes
                        .iter()
                        .filter_map(|n| n.strip_prefix("not needed under DANE: "))
                        .map(str::to_string),
                );
            }
            let fix = ca_failures
                .first()
                .map(|f| tls_fix(f.kind, host, opts.smtp_port))
                .or_else(|| {
                    dane_decides.then(|| {
                        format!("install a certificate for {host} from a trusted CA (MTA-STS senders check it; DANE senders check the TLSA records)")
                    })
                });
            vec![finding(
                Status::Fail,
                "tls",
                format!("{host} [{ip}]: {}", why.join("; ")),
                fix,
            )]
        }
    };
    found.extend(dane);
    for w in &report.warnings {
        found.push(finding(
            Status::Warn,
            "tls",
            format!("{host}: {}", w.message),
            None,
        ));
    }
    found
}

/// The `_smtp._tls.<domain>` TXT record (RFC 8460 §3): exactly one `v=TLSRPTv1` record with
/// `rua=` URIs that are `mailto:` or `https:`.
async fn tlsrpt_finding(domain: &str, opts: &CheckOptions) -> Finding {
    let name = format!("_smtp._tls.{domain}");
    let records = match opts.resolver.txt(&name).await {
        Ok(r) => r,
        Err(e) => {
            return finding(Status::Info, "tlsrpt", format!("{name}: {e}"), None);
        }
    };
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=TLSRPTv1"))
        .collect();
    let fix_publish = format!(
        "publish {name} TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}\" (moat sts generate prints one) to receive reports of failed deliveries"
    );
    match ours.as_slice() {
        [] => finding(
            Status::Info,
            "tlsrpt",
            format!(
                "no TLS-RPT record at {name}: nobody is told when senders fail TLS with {domain}"
            ),
            Some(fix_publish),
        ),
        [one] => {
            let rua: Vec<&str> = one
                .split(';')
                .filter_map(|f| f.trim().strip_prefix("rua="))
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            let bad: Vec<&&str> = rua
                .iter()
                .filter(|u| !(u.starts_with("mailto:") || u.starts_with("https:")))
                .collect();
            if rua.is_empty() {
                finding(
                    Status::Fail,
                    "tlsrpt",
                    format!("{name}: {one:?} has no rua= field"),
                    Some(fix_publish),
                )
            } else if !bad.is_empty() {
                finding(
                    Status::Fail,
                    "tlsrpt",
                    format!("{name}: rua URIs must be mailto: or https: ({bad:?})"),
                    Some(fix_publish),
                )
            } else {
                finding(
                    Status::Pass,
                    "tlsrpt",
                    format!("{name}: reports go to {}", rua.join(", ")),
                    None,
                )
            }
        }
        _ => finding(
            Status::Fail,
            "tlsrpt",
            format!(
                "{name}: {} v=TLSRPTv1 records; senders ignore them all (RFC 8460 §3)",
                ours.len()
            ),
            Some("keep exactly one".into()),
        ),
    }
}

/// What the MX host's administrator must change, by the first failure.
fn tls_fix(kind: Kind, host: &str, port: u16) -> String {
    let enforced = "senders enforcing the policy will not deliver there until then";
    match kind {
        Kind::DnsFailure => format!("publish A/AAAA records for {host}"),
        Kind::ConnectionRefused | Kind::Timeout | Kind::ConnectError => format!(
            "make {host} accept SMTP connections on port {port} (a firewall may block it); {enforced}"
        ),
        Kind::StarttlsNotOffered | Kind::StarttlsRefused => {
            format!("enable STARTTLS on {host}; {enforced}")
        }
        Kind::Expired | Kind::NotYetValid => {
            format!("renew the certificate of {host} (and check its clock); {enforced}")
        }
        Kind::UntrustedIssuer => format!(
            "use a certificate for {host} from a CA senders trust, and send the intermediate certificates too; {enforced}"
        ),
        Kind::NameMismatch => {
            format!("use a certificate whose names include {host}; {enforced}")
        }
        _ => format!(
            "offer STARTTLS on {host} with a valid, unexpired certificate for {host}; {enforced}"
        ),
    }
}

fn fetch_fix(e: &FetchError, domain: &str) -> String {
    let host = policy_host(domain);
    match e {
        FetchError::Dns(_) => format!("publish an A or AAAA record for {host}"),
        FetchError::Connect { .. } => format!("run an HTTPS server for {host} on port 443"),
        FetchError::Tls { .. } if e.certificate().is_some() => format!(
            "install a certificate for {host} from a public CA, unexpired, with the whole chain"
        ),
        FetchError::Tls { .. } => format!("enable TLS 1.2 or 1.3 on {host}"),
        FetchError::Redirect { .. } => format!(
            "serve the policy at https://{host}/.well-known/mta-sts.txt itself; senders never follow redirects"
        ),
        FetchError::Status(_) => {
            format!("serve the policy at https://{host}/.well-known/mta-sts.txt with status 200")
        }
        FetchError::ContentType(_) => "serve the file as Content-Type: text/plain".into(),
        FetchError::TooLarge => "keep the policy under 64 KiB".into(),
        FetchError::Http(_) => "serve a plain HTTP/1.1 response".into(),
        FetchError::Timeout(_) => format!("make {host} answer within seconds"),
    }
}
