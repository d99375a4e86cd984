//! DANE (RFC 6698, RFC 7671) as SMTP uses it (RFC 7672): authenticating a receiving server
//! by the DNSSEC-validated TLSA records of its MX host instead of by a public CA.
//!
//! [`tlsa`] is the pure part: the records, which of them SMTP can use, and whether the
//! certificates a server presented match them. It does no I/O; finding the records (the TLSA
//! base domain, DNSSEC validation, CNAME expansion) and running the handshake are the
//! callers' business.

pub mod publish;
pub mod tlsa;

use std::sync::Mutex;
use std::time::Duration;

use crate::config::Config;
use crate::dns::{DnsError, Validator};

/// The validating resolver `[dane]` and `[outbound] nameservers` describe: Moat's own
/// validation from the trust anchors, or the AD bit of a validating resolver
/// (`resolver_validates`); the configured nameservers, else the system's.
pub fn validator(config: &Config) -> Result<Validator, DnsError> {
    let d = &config.dane;
    let o = &config.outbound;
    let timeout = Duration::from_secs(o.dns_timeout_secs);
    if d.resolver_validates {
        return if o.nameservers.is_empty() {
            Validator::trusting_system()
        } else {
            Validator::trusting(&o.nameservers, timeout, 1)
        };
    }
    let anchors = d.trust_anchor_file.as_ref().map(|f| config.data_path(f));
    if o.nameservers.is_empty() {
        Validator::system(anchors.as_deref())
    } else {
        Validator::new(&o.nameservers, timeout, 1, anchors.as_deref())
    }
}

/// DANE at run time: the validating resolver and whether validation works through the
/// configured nameservers (checked at start and then periodically; [`Dane::unavailable`]).
#[derive(Debug)]
pub struct Dane {
    pub validator: Validator,
    check_secure: String,
    check_bogus: Option<String>,
    /// `None` until the first check; then its result and when it ran (Unix seconds).
    state: Mutex<Option<(Result<(), String>, u64)>>,
}

impl Dane {
    pub fn new(validator: Validator, check_secure: &str, check_bogus: &str) -> Dane {
        Dane {
            validator,
            check_secure: check_secure.to_string(),
            check_bogus: (!check_bogus.is_empty()).then(|| check_bogus.to_string()),
            state: Mutex::new(None),
        }
    }

    /// Why DANE cannot be used now; `None` when validation works.
    pub fn unavailable(&self) -> Option<String> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Some("DNSSEC validation not checked yet".into()),
            Some((Ok(()), _)) => None,
            Some((Err(why), _)) => Some(format!("DNSSEC validation does not work here: {why}")),
        }
    }

    /// The last self-check: `Ok` or why it failed, and when it ran.
    pub fn status(&self) -> Option<(Result<(), String>, u64)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs the self-check once, logs a change of state, and records it.
    pub async fn check(&self) {
        let r = self
            .validator
            .self_check(&self.check_secure, self.check_bogus.as_deref())
            .await;
        let now = crate::util::unix_now();
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = g.as_ref().is_none_or(|(old, _)| old.is_ok() != r.is_ok());
        if changed {
            match &r {
                Ok(()) => tracing::info!(secure = %self.check_secure,
                    validation = if self.validator.trusts_resolver() { "resolver (AD bit trusted)" } else { "in-process" },
                    bogus = self.check_bogus.as_deref().unwrap_or("-"),
                    "DANE available: DNSSEC validation works"),
                Err(why) => tracing::warn!(reason = %why,
                    "DANE unavailable: DNSSEC validation does not work through the configured nameservers; mail is delivered without DANE"),
            }
        }
        crate::metrics::global().set(
            crate::metrics::Metric::DaneValidationWorking,
            &[],
            i64::from(r.is_ok()),
        );
        *g = Some((r, now));
    }

    /// Checks again every `every` in the background (call [`Dane::check`] first, before
    /// delivering anything); after a failed check, again within a minute.
    pub fn spawn_checker(self: &std::sync::Arc<Self>, every: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let failing = this.unavailable().is_some();
                let wait = if failing {
                    every.min(Duration::from_secs(60))
                } else {
                    every
                };
                tokio::time::sleep(wait).await;
                this.check().await;
            }
        });
    }
}
