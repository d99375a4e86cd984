//! `moat explain ADDRESS`: the real lookups and the real decision for one recipient, printed
//! with every reason behind it, per MX host: which rule matched, the MTA-STS policy and its
//! mode, the DNSSEC state of the MX, address and TLSA lookups, the TLSA records and whether
//! SMTP can use them, the requirement each host gets, and what would happen if the host
//! refused STARTTLS. It uses the same code as delivery (`outbound::deliver::decide`,
//! `dane_facts`, `DomainDecision::for_host`); nothing is sent.

use std::fmt::Write as _;

use crate::config::Config;
use crate::outbound::deliver::{self, NextHop};
use crate::policy::cause::Cause;
use crate::policy::{Dnssec, HostFacts, HostVerdict, TlsLevel, TlsRequirement, TlsaLookup};
use crate::queue::Route;
use crate::smtp::session::Envelope;

fn dnssec_words(d: &Dnssec) -> String {
    match d {
        Dnssec::Secure => "secure (DNSSEC-validated)".into(),
        Dnssec::Insecure => "insecure (not signed, or not validated)".into(),
        Dnssec::Bogus(w) => format!("BOGUS: {w}"),
        Dnssec::Unanswered(w) => format!("NO ANSWER: {w}"),
    }
}

/// What happens when a host under `req` does not offer STARTTLS.
fn without_starttls(req: &TlsRequirement) -> String {
    let cause = if req.dane.is_some() {
        Cause::DaneStartTls
    } else if req.mta_sts {
        Cause::StsValidation(crate::policy::cause::StsProblem::StartTls)
    } else if req.level >= TlsLevel::Encrypt {
        Cause::StartTlsNotOffered
    } else {
        return "the message goes in plaintext (opportunistic TLS)".into();
    };
    format!(
        "deferred with {} ({}), then bounced with {} once the retry window ends; never sent in plaintext",
        cause.code(false).unwrap_or("?"),
        cause.words(),
        cause.code(true).unwrap_or("?")
    )
}

fn requirement_words(req: &TlsRequirement) -> String {
    let mut s = match (req.dane.as_ref(), req.level) {
        (Some(d), _) => format!(
            "TLS required; the certificate must match the TLSA records of {} (names for DANE-TA: {})",
            d.base,
            d.names.join(", ")
        ),
        (None, TlsLevel::Verify) if req.match_names.is_empty() => {
            "TLS required; certificate from a trusted CA, valid for the MX host name".into()
        }
        (None, TlsLevel::Verify) => format!(
            "TLS required; certificate from a trusted CA, valid for {}",
            req.match_names.join(" or ")
        ),
        (None, TlsLevel::Encrypt) => "TLS required; the certificate is not checked".into(),
        (None, TlsLevel::May) => "TLS when offered, any certificate; plaintext otherwise".into(),
        (None, TlsLevel::None) => "no TLS".into(),
    };
    if !req.pins.is_empty() {
        let pins: Vec<String> = req.pins.iter().map(|p| p.to_string()).collect();
        let _ = write!(s, "; one of these pins must match: {}", pins.join(", "));
    }
    if req.mta_sts {
        s.push_str("; failures carry the MTA-STS codes 4.7.5/5.7.5");
    }
    s
}

/// Runs the lookups and the decision for `address` (from `sender`, with REQUIRETLS or not)
/// under `config`; the report as text.
pub async fn explain(
    config: &Config,
    address: &str,
    sender: &str,
    requiretls: bool,
) -> Result<String, String> {
    let Some((_, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} is not an address (local@domain)"));
    };
    let domain = crate::domain::canonical_or_lower(domain);
    let parts = crate::server::explain_parts(config)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Recipient {address} (domain {domain}), sender <{sender}>"
    );
    let hop = match parts.routes.get(&domain) {
        Some(Route::Maildir(p)) => {
            let _ = writeln!(
                out,
                "Route: local maildir {} (no network hop, no TLS decision)",
                p.display()
            );
            return Ok(out);
        }
        Some(Route::Discard) => {
            let _ = writeln!(out, "Route: discard (no network hop)");
            return Ok(out);
        }
        Some(Route::Relay {
            host,
            port,
            implicit_tls,
            auth,
        }) => {
            let _ = writeln!(
                out,
                "Route: relay {host}:{port}{} (no MX lookup, no MTA-STS, no DANE)",
                if *implicit_tls { ", implicit TLS" } else { "" }
            );
            NextHop::Relay {
                host: host.clone(),
                port: *port,
                implicit_tls: *implicit_tls,
                auth: auth.clone(),
            }
        }
        None => {
            let _ = writeln!(out, "Route: MX lookup");
            NextHop::Mx
        }
    };
    let envelope = Envelope {
        sender: sender.to_string(),
        recipients: vec![address.to_string()],
        requiretls,
        ..Envelope::default()
    };
    let out_ = &parts.outbound;
    if let Some(d) = &out_.dane {
        d.check().await;
    }
    let decision = deliver::decide(
        out_,
        &parts.rules,
        parts.sts.as_deref(),
        &domain,
        &hop,
        &envelope,
        false,
    )
    .await;
    match &decision.mta_sts {
        Some(p) => {
            let pats: Vec<&str> = p.entry.policy.mx.iter().map(|m| m.as_str()).collect();
            let _ = writeln!(out, "MTA-STS: {} with mx {}", p.describe(), pats.join(" "));
        }
        None if matches!(hop, NextHop::Mx) && parts.sts.is_some() => {
            let _ = writeln!(
                out,
                "MTA-STS: no policy (no _mta-sts TXT record, or none usable)"
            );
        }
        None => {}
    }
    match &decision.dane_off {
        Some(why) => {
            let _ = writeln!(out, "DANE: not used: {why}");
        }
        None => {
            let _ = writeln!(out, "DANE: available (DNSSEC validation works)");
        }
    }
    let _ = writeln!(
        out,
        "Domain requirement: {} ({}), because {}",
        decision.requirement.level_name(),
        requirement_words(&decision.requirement),
        decision.why
    );
    let hosts = match &hop {
        NextHop::Mx => {
            match crate::outbound::route::resolve_route(&out_.resolver, &domain, &out_.our_names)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    let _ = writeln!(out, "MX: {}", e.reply());
                    return Ok(out);
                }
            }
        }
        NextHop::Relay { host, .. } => match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![crate::outbound::route::Hop {
                host: host.clone(),
                preference: 0,
                addrs: vec![ip],
            }],
            Err(_) => match out_.resolver.addresses(host).await {
                Ok(addrs) => vec![crate::outbound::route::Hop {
                    host: host.clone(),
                    preference: 0,
                    addrs,
                }],
                Err(e) => {
                    let _ = writeln!(out, "Relay host: {e}");
                    return Ok(out);
                }
            },
        },
    };
    let port = match &hop {
        NextHop::Relay { port, .. } => *port,
        NextHop::Mx => out_.port,
    };
    let facts = deliver::dane_facts(out_, &decision, &domain, port, &hosts).await;
    if let (Some(f), NextHop::Mx) = (facts.first(), &hop)
        && decision.dane_off.is_none()
    {
        let _ = writeln!(out, "MX records: {}", dnssec_words(&f.mx));
    }
    for (h, f) in hosts.iter().zip(&facts) {
        let addrs: Vec<String> = h.addrs.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            out,
            "\nHost {} (preference {}, {})",
            h.host,
            h.preference,
            addrs.join(", ")
        );
        if decision.dane_off.is_none() && matches!(hop, NextHop::Mx) {
            let _ = writeln!(out, "  address records: {}", dnssec_words(&f.addresses));
            let tlsa = match &f.tlsa {
                TlsaLookup::NotLooked => {
                    "not looked up (DANE needs secure MX and address records)".to_string()
                }
                TlsaLookup::NoRecords { secure: true } => "none (securely denied)".into(),
                TlsaLookup::NoRecords { secure: false } => {
                    "none usable: the answer is insecure (DANE does not apply)".into()
                }
                TlsaLookup::Failed(w) => format!("lookup FAILED on a signed path: {w}"),
                TlsaLookup::Unanswered(w) => format!("NO ANSWER on a signed path: {w}"),
                TlsaLookup::Records { records, base } => {
                    let mut s = format!("secure, for {base}:");
                    for r in records {
                        let usable = match r.unusable_reason() {
                            None => "usable".to_string(),
                            Some(u) => format!("unusable: {u}"),
                        };
                        let _ = write!(s, "\n    {r} ({usable})");
                    }
                    s
                }
            };
            let _ = writeln!(out, "  TLSA: {tlsa}");
        }
        let verdict = decision.for_host(&HostFacts {
            host: &h.host,
            mx: &f.mx,
            addresses: &f.addresses,
            tlsa: &f.tlsa,
        });
        match verdict {
            HostVerdict::Skip(cause, words) => {
                let _ = writeln!(
                    out,
                    "  -> NOT USED: {words} ({} {})",
                    cause.code(false).unwrap_or("?"),
                    cause.words()
                );
            }
            HostVerdict::Use { note } => {
                let req = &decision.requirement;
                let _ = writeln!(
                    out,
                    "  -> {}: {}\n     because {}",
                    req.level_name(),
                    requirement_words(req),
                    decision.why
                );
                if let Some(n) = note {
                    let _ = writeln!(out, "     MTA-STS testing: enforce {n}");
                }
                let _ = writeln!(out, "     without STARTTLS: {}", without_starttls(req));
            }
            HostVerdict::Own { requirement, why } => {
                let _ = writeln!(
                    out,
                    "  -> {}: {}\n     because {why}",
                    requirement.level_name(),
                    requirement_words(&requirement)
                );
                let _ = writeln!(
                    out,
                    "     without STARTTLS: {}",
                    without_starttls(&requirement)
                );
            }
        }
    }
    Ok(out)
}
