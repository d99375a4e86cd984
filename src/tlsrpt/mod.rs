//! TLS-RPT (RFC 8460): reading the aggregate reports other organisations send about our
//! domains ([`report`] the JSON, [`mail`] finding it in a message).

pub mod mail;
pub mod report;
pub mod results;
pub mod send;
pub mod store;

use report::Report;

/// A report as text for `moat tlsrpt show`: who, which period, the totals, then per policy
/// its sessions and each failure detail.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let day = |t: Option<i64>| {
        t.map_or_else(
            || "?".to_string(),
            |t| {
                format!(
                    "{} UTC",
                    crate::util::utc_minutes(u64::try_from(t).unwrap_or(0))
                )
            },
        )
    };
    let (ok, failed) = r.totals();
    out.push_str(&format!(
        "report {} from {} ({}), {} to {}: {ok} successful, {failed} failed session(s)\n",
        if r.report_id.is_empty() {
            "?"
        } else {
            &r.report_id
        },
        if r.organization.is_empty() {
            "?"
        } else {
            &r.organization
        },
        if r.contact.is_empty() {
            "no contact"
        } else {
            &r.contact
        },
        day(r.begin),
        day(r.end),
    ));
    for p in &r.policies {
        out.push_str(&format!(
            "  {} {}: {} successful, {} failed",
            if p.policy_type.is_empty() {
                "?"
            } else {
                &p.policy_type
            },
            if p.policy_domain.is_empty() {
                "?"
            } else {
                &p.policy_domain
            },
            p.successful,
            p.failed
        ));
        if !p.mx_hosts.is_empty() {
            out.push_str(&format!(" (mx {})", p.mx_hosts.join(", ")));
        }
        out.push('\n');
        for d in &p.failures {
            out.push_str(&format!("    {} x{}", d.result_type, d.count));
            for (k, v) in [
                ("mx", &d.receiving_mx_hostname),
                ("ip", &d.receiving_ip),
                ("helo", &d.receiving_mx_helo),
                ("from", &d.sending_ip),
                ("reason", &d.reason_code),
                ("info", &d.additional_information),
            ] {
                if !v.is_empty() {
                    out.push_str(&format!(" {k}={v}"));
                }
            }
            out.push('\n');
        }
    }
    for s in &r.skipped {
        out.push_str(&format!("  (skipped: {s})\n"));
    }
    out
}

/// The admin API's answer to `/api/tlsrpt/results` or `/api/tlsrpt/send` as text.
pub fn render_admin(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_string();
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let day = s(&v["day"]);
    let mut out = String::new();
    if let Some(reports) = v["reports"].as_array() {
        if reports.is_empty() {
            out.push_str(&format!("{day}: no results recorded, no report to make\n"));
        }
        for r in reports {
            out.push_str(&format!("{day} {}: {}", s(&r["domain"]), s(&r["result"])));
            if let Some(id) = r["report_id"].as_str() {
                out.push_str(&format!(" (report {id})"));
            }
            out.push('\n');
            for u in r["rua"].as_array().into_iter().flatten() {
                out.push_str(&format!("  {}: {}\n", s(&u[0]), s(&u[1])));
            }
        }
        return out;
    }
    let policies = v["policies"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "{day}: {} policy domain(s) with results{}\n",
        policies.len(),
        if v["send_reports"].as_bool() == Some(true) {
            ""
        } else {
            " ([tls_rpt] send_reports is off: reports are made only by moat tlsrpt send)"
        }
    ));
    let reported: Vec<String> = v["reported"]
        .as_array()
        .into_iter()
        .flatten()
        .map(&s)
        .collect();
    for p in policies {
        let domain = s(&p["policy_domain"]);
        out.push_str(&format!(
            "  {} {domain}: {} successful, {} failed{}\n",
            s(&p["policy_type"]),
            n(&p["successful"]),
            n(&p["failed"]),
            if reported.contains(&domain) {
                " (reported)"
            } else {
                ""
            }
        ));
        for d in p["failures"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "    {} x{} mx={} ip={} reason={}\n",
                s(&d["result_type"]),
                n(&d["count"]),
                s(&d["receiving_mx_hostname"]),
                s(&d["receiving_ip"]),
                s(&d["reason_code"])
            ));
        }
    }
    if n(&v["dropped"]) > 0 {
        out.push_str(&format!(
            "  ({} session(s) not recorded: the day was full)\n",
            n(&v["dropped"])
        ));
    }
    out
}
