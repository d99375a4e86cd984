//! The queue: durable spool, per-recipient state, the scheduler, and delivery (local routes
//! here, remote ones through `outbound`), retries, expiry and bounces.
//!
//! Every recipient is pending, deferred (with its cause and next attempt), delivered or
//! failed. A message leaves the spool once all its recipients are final. Temporary failures
//! are retried on the configured schedule until the lifetime runs out: 24 h for
//! transport-security failures, 5 days for the rest; then the recipient fails with the
//! permanent form of its code and the sender gets a DSN (never for a bounce).

pub mod admin;
pub mod dsn;
pub mod journal;
pub mod local;
pub mod spool;
pub mod state;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::QueueConfig;
use crate::domain::{Domain, DomainPattern};
use crate::outbound::deliver::{self, NextHop, Outbound, RcptResult};
use crate::outbound::tls::TlsRequirement;
use crate::report::{AuthClass, DeliveryEvent, Outcome, TlsClass};
use crate::smtp::client::Outgoing;
use crate::smtp::session::Envelope;
use crate::util::unix_now;
use spool::{Spool, Spooled};
use state::{MessageState, RcptState};

/// Where one domain's mail goes.
#[derive(Debug, Clone)]
pub enum Route {
    Maildir(PathBuf),
    Discard,
    Relay {
        host: String,
        port: u16,
        implicit_tls: bool,
        auth: Option<(String, String)>,
    },
}

/// TLS requirements per recipient domain pattern (exact or `*.suffix`; first match wins) and
/// per sender domain pattern.
#[derive(Debug, Default)]
pub struct TlsPolicy {
    pub rules: Vec<(DomainPattern, TlsRequirement)>,
    pub sender_rules: Vec<(DomainPattern, TlsRequirement)>,
    pub default: TlsRequirement,
    /// See `OutboundConfig::opportunistic_for_unmatched`.
    pub opportunistic_for_unmatched: bool,
}

/// The first rule whose pattern matches `domain` (canonicalised first, so a rule written with
/// U-labels covers mail addressed with A-labels and the reverse).
fn find<'a>(
    rules: &'a [(DomainPattern, TlsRequirement)],
    domain: &str,
) -> Option<&'a TlsRequirement> {
    let domain = Domain::parse(domain).ok()?;
    rules
        .iter()
        .find(|(p, _)| p.matches(&domain))
        .map(|(_, r)| r)
}

/// The canonical domain of an address ([`crate::domain`]; empty when it has none).
pub(crate) fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| crate::domain::canonical_or_lower(d))
        .unwrap_or_default()
}

impl TlsPolicy {
    /// The rule for a recipient domain alone.
    pub fn for_domain(&self, domain: &str) -> &TlsRequirement {
        find(&self.rules, domain).unwrap_or(&self.default)
    }

    /// The requirement for `domain` within a message from `sender` to `recipients`: the domain's
    /// own rule, raised (never lowered) by a sender rule and, when
    /// `opportunistic_for_unmatched` is off, by the strictest rule any recipient matched.
    pub fn for_message(&self, domain: &str, sender: &str, recipients: &[String]) -> TlsRequirement {
        let own = self.for_domain(domain).clone();
        let mut floor = find(&self.sender_rules, &domain_of(sender));
        if !self.opportunistic_for_unmatched {
            for r in recipients {
                if let Some(req) = find(&self.rules, &domain_of(r))
                    && floor.is_none_or(|f| req.level > f.level)
                {
                    floor = Some(req);
                }
            }
        }
        match floor {
            // A rule written for another domain lends its level (and private CA), not its
            // names or pins, which describe that domain's servers.
            Some(f) if f.level > own.level => TlsRequirement {
                level: f.level,
                match_names: Vec::new(),
                pins: Vec::new(),
                extra_roots: f.extra_roots.clone(),
                mta_sts: false,
            },
            _ => own,
        }
    }
}

/// Everything delivery needs.
#[derive(Debug)]
pub struct Queue {
    pub spool: Spool,
    pub routes: HashMap<String, Route>,
    pub hostname: String,
    pub outbound: Outbound,
    /// Replaced whole on reload.
    pub policy: std::sync::RwLock<Arc<TlsPolicy>>,
    /// Delivery events for the transport-security report.
    pub events: Arc<crate::report::EventLog>,
    /// MTA-STS discovery and cache; `None` when disabled.
    pub sts: Option<Arc<crate::sts::Sts>>,
    pub config: QueueConfig,
    /// One semaphore per destination, `max_per_destination` permits each.
    pub dest_slots: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Queue {
    /// Starts the scheduler with the messages already spooled; new ids go on the channel.
    /// Returns the channel for new ids and the shared queue (for the admin socket).
    pub fn spawn(self, existing: Vec<String>) -> (mpsc::UnboundedSender<String>, Arc<Queue>) {
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        let this = Arc::new(self);
        tokio::spawn(scheduler(this.clone(), existing, rx, tx.clone()));
        (tx, this)
    }

    /// Makes one delivery pass over the due recipients of `id`. Returns when to come back.
    pub async fn process(
        self: &Arc<Self>,
        id: &str,
        requeue: &mpsc::UnboundedSender<String>,
    ) -> std::io::Result<Option<u64>> {
        let spool = self.spool.clone();
        let id_owned = id.to_string();
        let load = move || -> std::io::Result<_> {
            let msg = spool.load(&id_owned)?;
            let st = spool.load_state(&id_owned, msg.envelope.recipients.len())?;
            Ok((msg, st))
        };
        // A message on its first pass was just written to the journal and is read back from
        // the page cache: done here, as two thread hand-offs would cost more than the read.
        let hot = self.spool.in_journal(id);
        let (msg, mut st) = if hot {
            load()?
        } else {
            tokio::task::spawn_blocking(load)
                .await
                .map_err(std::io::Error::other)??
        };
        let now = unix_now();
        let mut by_domain: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in msg.envelope.recipients.iter().enumerate() {
            if st.rcpts[i].state.is_final() || st.rcpts[i].next_attempt > now {
                continue;
            }
            by_domain.entry(domain_of(r)).or_default().push(i);
        }
        let msg = Arc::new(msg);
        let mut tasks = tokio::task::JoinSet::new();
        for (domain, idx) in by_domain {
            let route = self.routes.get(&domain).cloned();
            let msg = msg.clone();
            let this = self.clone();
            tasks.spawn(async move {
                let results = this.deliver_group(&domain, route, &msg, &idx).await;
                idx.into_iter().zip(results).collect::<Vec<_>>()
            });
        }
        let mut newly_failed = Vec::new();
        let mut succeeded: Vec<(usize, dsn::Action)> = Vec::new();
        let mut delayed: Vec<(usize, dsn::Action)> = Vec::new();
        let mut events: Vec<DeliveryEvent> = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let Ok(results) = done else { continue };
            for (i, result) in results {
                let rcpt = &msg.envelope.recipients[i];
                let r = &mut st.rcpts[i];
                match result {
                    RcptResult::Delivered {
                        remote,
                        reply,
                        dsn_passed,
                        tls,
                        auth,
                    } => {
                        events.push(event(&msg, i, Outcome::Delivered, tls, auth, None));
                        if msg.envelope.dsn_of(i).wants_success() && !dsn_passed {
                            let action = if remote == "maildir" || remote == "discard" {
                                dsn::Action::Delivered
                            } else {
                                dsn::Action::Relayed
                            };
                            succeeded.push((i, action));
                        }
                        tracing::info!(queue_id = id, to = %rcpt, relay = %remote, %reply, "delivered");
                        r.state = RcptState::Delivered;
                        r.status = "2.0.0".into();
                        r.remote = Some(remote);
                        r.reason = reply;
                    }
                    RcptResult::NotDelivered(f) => {
                        r.attempts += 1;
                        r.security = f.security;
                        r.remote = f.remote.clone();
                        r.reason = f.reason.clone();
                        r.status = f.status.clone();
                        let lifetime = if f.security {
                            self.config.security_lifetime_secs
                        } else {
                            self.config.max_lifetime_secs
                        };
                        let age = now.saturating_sub(msg.arrived);
                        if f.permanent {
                            r.state = RcptState::Failed;
                        } else if age >= lifetime {
                            r.state = RcptState::Failed;
                            r.status = permanent_form(&f.status);
                            r.reason = format!(
                                "{} (gave up after {} of retrying)",
                                f.reason,
                                crate::util::human_duration(age)
                            );
                        } else {
                            let schedule = &self.config.retry_schedule_secs;
                            let step = (r.attempts as usize)
                                .saturating_sub(1)
                                .min(schedule.len().saturating_sub(1));
                            r.state = RcptState::Deferred;
                            r.next_attempt = now + schedule.get(step).copied().unwrap_or(3600);
                        }
                        let outcome = if r.state == RcptState::Failed {
                            Outcome::Bounced
                        } else {
                            Outcome::Deferred
                        };
                        let cause = format!("{} {}", r.status, short_cause(&r.status, &f.reason));
                        events.push(event(
                            &msg,
                            i,
                            outcome,
                            TlsClass::None,
                            AuthClass::None,
                            Some(cause),
                        ));
                        tracing::warn!(queue_id = id, to = %rcpt, state = r.state.as_str(), status = %r.status,
                            remote = r.remote.as_deref().unwrap_or("-"), cause = %r.reason, "not delivered");
                        if r.state == RcptState::Failed && !r.notified {
                            newly_failed.push(i);
                        }
                        let warn_after = self.config.delay_warning_secs;
                        let d = msg.envelope.dsn_of(i);
                        if r.state == RcptState::Deferred
                            && warn_after > 0
                            && age >= warn_after
                            && !r.warned
                            && (d.notify == 0 || d.notify & crate::smtp::session::NOTIFY_DELAY != 0)
                        {
                            r.warned = true;
                            delayed.push((i, dsn::Action::Delayed));
                        }
                    }
                }
            }
        }
        if !newly_failed.is_empty() {
            self.bounce(&msg, &st, &newly_failed, now, requeue).await;
            for i in newly_failed {
                st.rcpts[i].notified = true;
            }
        }
        if !delayed.is_empty() {
            self.notify(&msg, &st, &delayed, dsn::DsnKind::Delay, now, requeue)
                .await;
        }
        if !succeeded.is_empty() {
            self.notify(&msg, &st, &succeeded, dsn::DsnKind::Success, now, requeue)
                .await;
        }
        let spool = self.spool.clone();
        let id_owned = id.to_string();
        let done = st.all_final();
        let next = st.next_due();
        let log = self.events.clone();
        // The common end, a message delivered on its first pass: one appended log line and a
        // one-byte dead mark, done here. Rewriting the event log, parking a message into a
        // file and saving its state take longer: on a blocking thread.
        let quick = done && hot && !log.rewrite_due();
        let finish = move || {
            for ev in events {
                crate::metrics::delivery(&ev);
                log.record(ev);
            }
            if done {
                spool.remove(&id_owned)
            } else if !spool.exists(&id_owned) {
                // Deleted by the administrator during this pass.
                Ok(())
            } else {
                spool.save_state(&id_owned, &st)?;
                // It waits for a retry: out of the journal, into a file of its own. If that
                // fails (a full disk), it simply stays in the journal a while longer.
                if let Err(e) = spool.park(&id_owned) {
                    tracing::warn!(queue_id = %id_owned, error = %e, "could not move a deferred message out of the journal");
                }
                Ok(())
            }
        };
        if quick {
            finish()?;
        } else {
            tokio::task::spawn_blocking(finish)
                .await
                .map_err(std::io::Error::other)??;
        }
        Ok(if done { None } else { next })
    }

    /// Sends a DSN for `failed` recipients to the sender (not for bounces, and not for
    /// recipients whose NOTIFY excludes FAILURE).
    pub(crate) async fn bounce(
        &self,
        msg: &Spooled,
        st: &MessageState,
        failed: &[usize],
        now: u64,
        requeue: &mpsc::UnboundedSender<String>,
    ) {
        let wanted: Vec<(usize, dsn::Action)> = failed
            .iter()
            .filter(|&&i| msg.envelope.dsn_of(i).wants_failure())
            .map(|&i| (i, dsn::Action::Failed))
            .collect();
        if wanted.len() < failed.len() {
            tracing::info!(queue_id = %msg.id, skipped = failed.len() - wanted.len(), "no failure notice: NOTIFY excludes FAILURE");
        }
        if !wanted.is_empty() {
            self.notify(msg, st, &wanted, dsn::DsnKind::Failure, now, requeue)
                .await;
        }
    }

    /// Queues a DSN of `kind` about `rcpts` to the message's sender.
    async fn notify(
        &self,
        msg: &Spooled,
        st: &MessageState,
        rcpts: &[(usize, dsn::Action)],
        kind: dsn::DsnKind,
        now: u64,
        requeue: &mpsc::UnboundedSender<String>,
    ) {
        if msg.envelope.sender.is_empty() {
            tracing::info!(queue_id = %msg.id, "no DSN for a message with the null sender");
            return;
        }
        let explanations: Vec<String> = rcpts
            .iter()
            .map(|&(i, action)| match action {
                dsn::Action::Failed | dsn::Action::Delayed => {
                    explain(&msg.envelope.recipients[i], &st.rcpts[i])
                }
                dsn::Action::Relayed => format!(
                    "Handed on to {}, which does not report delivery; no further notice will come.",
                    st.rcpts[i].remote.as_deref().unwrap_or("the next server")
                ),
                _ => "Delivered to the mailbox.".to_string(),
            })
            .collect();
        let orcpts: Vec<Option<String>> = rcpts
            .iter()
            .map(|&(i, _)| msg.envelope.dsn_of(i).orcpt)
            .collect();
        let recipients = rcpts
            .iter()
            .zip(&explanations)
            .zip(&orcpts)
            .map(|((&(i, action), expl), orcpt)| {
                let r = &st.rcpts[i];
                let failed = action == dsn::Action::Failed;
                let delayed = action == dsn::Action::Delayed;
                let lifetime = if r.security {
                    self.config.security_lifetime_secs
                } else {
                    self.config.max_lifetime_secs
                };
                dsn::RecipientStatus {
                    final_recipient: &msg.envelope.recipients[i],
                    original_recipient: orcpt.as_deref(),
                    action,
                    status: if failed || delayed {
                        &r.status
                    } else {
                        "2.0.0"
                    },
                    remote_mta: r
                        .remote
                        .as_deref()
                        .filter(|h| *h != "maildir" && *h != "discard"),
                    // "host said: 550 …" carries the remote reply verbatim: report it as such.
                    diagnostic_code: (failed || delayed).then(|| {
                        r.reason
                            .split_once(" said: ")
                            .map_or(r.reason.as_str(), |(_, reply)| reply)
                    }),
                    last_attempt: Some(now),
                    will_retry_until: delayed.then_some(msg.arrived + lifetime),
                    explanation: expl,
                }
            })
            .collect();
        let input = dsn::DsnInput {
            reporting_mta: &self.hostname,
            original_envelope_id: msg.envelope.envid.as_deref(),
            arrival_date: msg.arrived,
            now,
            sender: &msg.envelope.sender,
            recipients,
            original_message: &msg.message,
            return_full: msg.envelope.ret_full == Some(true),
            kind,
        };
        let Some(body) = dsn::build_dsn(&input) else {
            return;
        };
        let envelope = Envelope {
            sender: String::new(),
            recipients: vec![msg.envelope.sender.clone()],
            smtputf8: !msg.envelope.sender.is_ascii(),
            eight_bit: !body.is_ascii(),
            ..Envelope::default()
        };
        let id = crate::util::new_queue_id();
        match self.spool.store(&id, now, &envelope, &body).await {
            Ok(()) => {
                tracing::info!(queue_id = %msg.id, dsn_id = %id, to = %msg.envelope.sender, kind = ?kind, "DSN queued");
                let _ = requeue.send(id);
            }
            Err(e) => tracing::error!(queue_id = %msg.id, error = %e, "could not queue the DSN"),
        }
    }

    async fn deliver_group(
        &self,
        domain: &str,
        route: Option<Route>,
        msg: &Spooled,
        idx: &[usize],
    ) -> Vec<RcptResult> {
        match route {
            Some(Route::Discard) => idx
                .iter()
                .map(|_| RcptResult::Delivered {
                    tls: crate::report::TlsClass::Local,
                    auth: crate::report::AuthClass::Local,
                    dsn_passed: false,
                    remote: "discard".into(),
                    reply: "discarded by route".into(),
                })
                .collect(),
            Some(Route::Maildir(root)) => {
                let mut out = Vec::new();
                for &i in idx {
                    let (root, m, host) = (root.clone(), msg.clone(), self.hostname.clone());
                    let r = tokio::task::spawn_blocking(move || {
                        local::deliver_maildir(&root, &m, i, &host)
                    })
                    .await;
                    out.push(match r {
                        Ok(Ok(path)) => RcptResult::Delivered {
                            tls: crate::report::TlsClass::Local,
                            auth: crate::report::AuthClass::Local,
                            dsn_passed: false,
                            remote: "maildir".into(),
                            reply: path.display().to_string(),
                        },
                        Ok(Err(e)) => RcptResult::NotDelivered(deliver::failure(
                            "4.3.0",
                            false,
                            None,
                            format!("local delivery failed: {e}"),
                        )),
                        Err(e) => RcptResult::NotDelivered(deliver::failure(
                            "4.3.0",
                            false,
                            None,
                            format!("local delivery task failed: {e}"),
                        )),
                    });
                }
                out
            }
            Some(Route::Relay {
                host,
                port,
                implicit_tls,
                auth,
            }) => {
                self.remote(
                    domain,
                    NextHop::Relay {
                        host,
                        port,
                        implicit_tls,
                        auth,
                    },
                    msg,
                    idx,
                )
                .await
            }
            None => self.remote(domain, NextHop::Mx, msg, idx).await,
        }
    }

    async fn remote(
        &self,
        domain: &str,
        hop: NextHop,
        msg: &Spooled,
        idx: &[usize],
    ) -> Vec<RcptResult> {
        let out = Outgoing {
            sender: msg.envelope.sender.clone(),
            recipients: idx
                .iter()
                .map(|&i| msg.envelope.recipients[i].clone())
                .collect(),
            message: msg.message.clone(),
            smtputf8: msg.envelope.smtputf8,
            eight_bit: msg.envelope.eight_bit,
            ret_full: msg.envelope.ret_full,
            envid: msg.envelope.envid.clone(),
            dsn: idx.iter().map(|&i| msg.envelope.dsn_of(i)).collect(),
        };
        let key = match &hop {
            NextHop::Relay { host, port, .. } => format!("{host}:{port}"),
            NextHop::Mx => domain.to_string(),
        };
        let slots = match self.dest_slots.lock() {
            Ok(mut map) => map
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(self.config.max_per_destination))
                })
                .clone(),
            Err(_) => Arc::new(tokio::sync::Semaphore::new(self.config.max_per_destination)),
        };
        let _permit = slots.acquire_owned().await;
        let mut req =
            self.tls_policy()
                .for_message(domain, &msg.envelope.sender, &msg.envelope.recipients);
        let sts = match (&self.sts, &hop) {
            (Some(sts), NextHop::Mx) => sts.policy_for(domain).await,
            _ => None,
        };
        if let (Some(p), Some(s)) = (&sts, &self.sts) {
            req = p.requirement(&req, s);
        }
        tracing::debug!(queue_id = %msg.id, domain, level = req.level.as_str(),
            mta_sts = sts.as_ref().map(|p| p.describe()).unwrap_or_default(), "TLS requirement");
        deliver::deliver(
            &self.outbound,
            &msg.id,
            domain,
            &hop,
            &req,
            sts.as_ref(),
            out,
        )
        .await
    }
}

impl Queue {
    /// The TLS policy in force.
    pub fn tls_policy(&self) -> Arc<TlsPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the TLS policy (config reload); deliveries already under way keep the old one.
    pub fn set_tls_policy(&self, p: TlsPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }
}

/// One recipient's outcome, for the event log and the metrics.
fn event(
    msg: &Spooled,
    i: usize,
    outcome: Outcome,
    tls: TlsClass,
    auth: AuthClass,
    cause: Option<String>,
) -> DeliveryEvent {
    DeliveryEvent {
        time: unix_now(),
        queue_id: msg.id.clone(),
        sender_domain: domain_of(&msg.envelope.sender),
        rcpt_domain: domain_of(&msg.envelope.recipients[i]),
        outcome,
        tls,
        auth,
        cause,
    }
}

/// A few words for a failure's status code (the report and metrics group by these).
fn short_cause(status: &str, reason: &str) -> String {
    let tail = status.get(1..).unwrap_or("");
    let words = match tail {
        ".4.316" => "connection refused",
        ".4.315" => "connection timed out",
        ".4.312" => "DNS failure",
        ".4.317" => "STARTTLS not offered",
        ".7.320" => "certificate validation failed",
        ".4.8" => "MX not in MTA-STS policy",
        ".7.5" => "certificate failed MTA-STS validation",
        ".1.10" => "null MX",
        ".4.6" => "mail loop",
        _ => "",
    };
    if !words.is_empty() {
        return words.to_string();
    }
    // Otherwise the start of the reason, without host-specific detail after a colon.
    let first: String = reason
        .split([':', ';'])
        .next()
        .unwrap_or("")
        .chars()
        .take(50)
        .collect();
    first.trim().to_string()
}

/// `4.x.y` becomes `5.x.y` once retrying has ended.
fn permanent_form(status: &str) -> String {
    match status.strip_prefix('4') {
        Some(rest) => format!("5{rest}"),
        None => status.to_string(),
    }
}

/// The human sentence for a DSN: what failed, where, what the receiving side must fix.
fn explain(rcpt: &str, r: &state::RcptStatus) -> String {
    let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
    let host = r.remote.as_deref().unwrap_or(domain);
    let code = r.status.as_str();
    if code.ends_with(".4.8") {
        format!(
            "None of the MX hosts of {domain} is named in its MTA-STS policy, so the policy forbids delivering to them. The administrator of {domain} must list its MX hosts in the policy (mx: lines) or correct the MX records."
        )
    } else if code.ends_with(".7.5") {
        format!(
            "{host} failed the TLS check that the MTA-STS policy of {domain} demands ({}). Its administrator must offer STARTTLS with a certificate for {host} from a trusted CA that has not expired.",
            r.reason
                .split("Reason: ")
                .nth(1)
                .and_then(|x| x.split(" (").next())
                .unwrap_or("TLS failed")
        )
    } else if code.ends_with(".4.317") {
        format!(
            "{host} did not offer STARTTLS; the policy for {domain} requires TLS. Its administrator must enable STARTTLS on that mail server."
        )
    } else if code.ends_with(".7.320") {
        format!(
            "The certificate of {host} failed validation and the policy for {domain} requires a valid one. Its administrator must install a valid certificate for {host}."
        )
    } else if code.ends_with(".4.316") {
        format!(
            "{host} refused the connection. Its administrator must make sure the mail server runs and its SMTP port is open."
        )
    } else if code.ends_with(".4.315") {
        format!(
            "Connecting to {host} timed out. Its administrator must make sure its SMTP port is reachable."
        )
    } else if code.ends_with(".4.312") {
        format!(
            "The DNS records of {domain} could not be looked up. Its administrator must fix the domain's DNS."
        )
    } else if code == "5.1.10" {
        format!("{domain} publishes a null MX: it accepts no mail.")
    } else if code.starts_with("5.7") && r.security {
        format!(
            "TLS with {host} failed and the policy for {domain} requires it. Its administrator must fix TLS on {host}."
        )
    } else {
        format!("{host} did not accept the message for {rcpt}.")
    }
}

/// Dispatches due messages, at most `max_concurrent_deliveries` at a time.
async fn scheduler(
    queue: Arc<Queue>,
    existing: Vec<String>,
    mut incoming: mpsc::UnboundedReceiver<String>,
    requeue: mpsc::UnboundedSender<String>,
) {
    let mut due: BTreeSet<(u64, String)> = BTreeSet::new();
    for id in existing {
        let next = match queue.spool.load(&id) {
            Ok(m) => queue
                .spool
                .load_state(&id, m.envelope.recipients.len())
                .ok()
                .and_then(|s| s.next_due()),
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read queued message; left in place");
                continue;
            }
        };
        due.insert((next.unwrap_or(0), id));
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<u64>)>();
    let mut running: HashSet<String> = HashSet::new();
    let max = queue.config.max_concurrent_deliveries;
    loop {
        let now = unix_now();
        let ready: Vec<(u64, String)> = due
            .iter()
            .filter(|(t, id)| *t <= now && !running.contains(id))
            .take(max.saturating_sub(running.len()))
            .cloned()
            .collect();
        for entry in ready {
            due.remove(&entry);
            let id = entry.1;
            running.insert(id.clone());
            let (q, done, rq) = (queue.clone(), done_tx.clone(), requeue.clone());
            tokio::spawn(async move {
                let next = match q.process(&id, &rq).await {
                    Ok(next) => next,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        tracing::warn!(queue_id = %id, error = %e, "delivery pass failed; retrying in 60s");
                        Some(unix_now() + 60)
                    }
                };
                let _ = done.send((id, next));
            });
        }
        let wait = due
            .iter()
            .find(|(_, id)| !running.contains(id))
            .map(|(t, _)| Duration::from_secs(t.saturating_sub(unix_now()).max(1)))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            id = incoming.recv() => match id {
                Some(id) => { due.insert((0, id)); }
                None => return,
            },
            Some((id, next)) = done_rx.recv() => {
                running.remove(&id);
                if let Some(t) = next {
                    due.insert((t, id));
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::tls::TlsLevel;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn policy(split: bool) -> TlsPolicy {
        TlsPolicy {
            rules: vec![
                (
                    pat("strict.test"),
                    TlsRequirement {
                        level: TlsLevel::Verify,
                        match_names: vec!["mx.strict.test".into()],
                        ..Default::default()
                    },
                ),
                (pat("*.enc.test"), TlsRequirement::level(TlsLevel::Encrypt)),
            ],
            sender_rules: vec![(pat("bank.test"), TlsRequirement::level(TlsLevel::Encrypt))],
            default: TlsRequirement::level(TlsLevel::May),
            opportunistic_for_unmatched: split,
        }
    }

    #[test]
    fn message_level_policy() {
        let rcpts = vec!["a@strict.test".to_string(), "b@other.test".to_string()];
        let p = policy(true);
        assert_eq!(
            p.for_message("other.test", "x@me.test", &rcpts).level,
            TlsLevel::May
        );
        assert_eq!(
            p.for_message("strict.test", "x@me.test", &rcpts)
                .match_names,
            vec!["mx.strict.test"]
        );
        let p = policy(false);
        let lifted = p.for_message("other.test", "x@me.test", &rcpts);
        assert_eq!(lifted.level, TlsLevel::Verify);
        assert!(
            lifted.match_names.is_empty(),
            "names of another domain's rule are not lent"
        );
        // Sender rules lift every recipient, whatever the switch says; never lower.
        let p = policy(true);
        assert_eq!(
            p.for_message("other.test", "x@bank.test", &rcpts).level,
            TlsLevel::Encrypt
        );
        assert_eq!(
            p.for_message("strict.test", "x@bank.test", &rcpts).level,
            TlsLevel::Verify
        );
        // One form everywhere: a rule written with U-labels covers A-label recipients and
        // the reverse, and the ideographic full stop separates labels.
        let p = TlsPolicy {
            rules: vec![
                (pat("bücher.test"), TlsRequirement::level(TlsLevel::Verify)),
                (
                    pat("*.xn--caf-dma.test"),
                    TlsRequirement::level(TlsLevel::Encrypt),
                ),
            ],
            ..policy(true)
        };
        assert_eq!(p.for_domain("xn--bcher-kva.test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("BÜCHER.test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("bücher。test").level, TlsLevel::Verify);
        assert_eq!(p.for_domain("mx.café.test").level, TlsLevel::Encrypt);
        let idn = vec!["a@xn--bcher-kva.test".to_string()];
        assert_eq!(
            p.for_message(&domain_of(&idn[0]), "x@me.test", &idn).level,
            TlsLevel::Verify
        );
        let p = policy(true);
        let one = vec!["c@mx.enc.test".to_string()];
        assert_eq!(
            p.for_message("mx.enc.test", "x@me.test", &one).level,
            TlsLevel::Encrypt
        );
    }

    #[test]
    fn permanent_forms() {
        assert_eq!(permanent_form("4.4.317"), "5.4.317");
        assert_eq!(permanent_form("5.1.1"), "5.1.1");
    }
}
