//! TLS-RPT (RFC 8460): reading the aggregate reports other organisations send about our
//! domains ([`report`] the JSON, [`mail`] finding it in a message).

pub mod mail;
pub mod report;
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
