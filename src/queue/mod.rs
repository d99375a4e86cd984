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
pub mod pg;
pub mod pg_share;
pub mod pg_tls;
pub mod spool;
pub mod state;
pub mod store;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::QueueConfig;
use crate::outbound::deliver::{self, NextHop, Outbound, RcptResult};
use crate::policy::cause::Cause;
use crate::report::{AuthClass, DeliveryEvent, Outcome, TlsClass};
use crate::smtp::client::Outgoing;
use crate::smtp::session::Envelope;
use crate::util::unix_now;
use spool::Spooled;
use state::{MessageState, RcptState};
use store::Store;

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

pub use crate::policy::{TlsPolicy, domain_of};

/// Everything delivery needs.
#[derive(Debug)]
pub struct Queue {
    /// Where queued mail is kept: the embedded journal or a shared database.
    pub store: Arc<dyn Store>,
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
    /// Where mail to TLS-RPT report addresses goes instead of its domain's route.
    pub tlsrpt: Option<Arc<crate::tlsrpt::store::Received>>,
}

/// The group key of recipients that are TLS-RPT report addresses (no domain has it).
const TLSRPT_GROUP: &str = "\0tlsrpt";

impl Queue {
    /// Starts the scheduler with the messages already spooled; new ids go on the channel.
    /// Returns the channel for new ids and the shared queue (for the admin socket).
    pub fn spawn(self) -> (mpsc::UnboundedSender<String>, Arc<Queue>) {
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        let this = Arc::new(self);
        tokio::spawn(scheduler(this.clone(), rx, tx.clone()));
        (tx, this)
    }

    /// Makes one delivery pass over the due recipients of `id`. Returns when to come back.
    pub async fn process(
        self: &Arc<Self>,
        id: &str,
        requeue: &mpsc::UnboundedSender<String>,
    ) -> std::io::Result<Option<u64>> {
        if !self.store.take(id).await? {
            // Another node holds it and delivers it.
            return Ok(None);
        }
        let hot = self.store.hot(id);
        let (msg, mut st) = self.store.load(id).await?;
        let now = unix_now();
        let mut by_domain: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in msg.envelope.recipients.iter().enumerate() {
            if st.rcpts[i].state.is_final() || st.rcpts[i].next_attempt > now {
                continue;
            }
            let key = match &self.tlsrpt {
                Some(t) if t.is_report_address(r) => TLSRPT_GROUP.to_string(),
                _ => domain_of(r),
            };
            by_domain.entry(key).or_default().push(i);
        }
        let msg = Arc::new(msg);
        let mut tasks = tokio::task::JoinSet::new();
        for (domain, idx) in by_domain {
            let route = self.routes.get(&domain).cloned();
            let msg = msg.clone();
            let this = self.clone();
            tasks.spawn(async move {
                let results = if domain == TLSRPT_GROUP {
                    this.store_reports(&msg, &idx).await
                } else {
                    this.deliver_group(&domain, route, &msg, &idx).await
                };
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
                        r.cause = None;
                        r.remote = Some(remote);
                        r.reason = reply;
                    }
                    RcptResult::NotDelivered(f) => {
                        r.attempts += 1;
                        r.security = f.security;
                        r.remote = f.remote.clone();
                        r.reason = f.reason.clone();
                        r.status = f.status.clone();
                        r.cause = Some(f.cause);
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
                            r.status = permanent_form(f.cause, &f.status);
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
                        let cause = format!("{} {}", r.status, short_cause(f.cause, &f.reason));
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
        let done = st.all_final();
        let next = st.next_due();
        let log = self.events.clone();
        // The common end, a message delivered on its first pass: one appended log line, done
        // here. Rewriting the event log takes longer: on a blocking thread.
        let record = move || {
            for ev in events {
                crate::metrics::delivery(&ev);
                log.record(ev);
            }
        };
        if done && hot && !self.events.rewrite_due() {
            record();
        } else {
            tokio::task::spawn_blocking(record)
                .await
                .map_err(std::io::Error::other)?;
        }
        self.store.finish(id, st).await?;
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
            // RFC 8689 §5: a notice about a REQUIRETLS message carries its header only.
            return_full: msg.envelope.ret_full == Some(true) && !msg.envelope.requiretls,
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
            // RFC 8689 §5: and it travels under REQUIRETLS itself, never in clear.
            requiretls: msg.envelope.requiretls,
            ..Envelope::default()
        };
        let id = crate::util::new_queue_id();
        match self.store.store(&id, now, &envelope, &body).await {
            Ok(()) => {
                tracing::info!(queue_id = %msg.id, dsn_id = %id, to = %msg.envelope.sender, kind = ?kind, "DSN queued");
                let _ = requeue.send(id);
            }
            Err(e) => tracing::error!(queue_id = %msg.id, error = %e, "could not queue the DSN"),
        }
    }

    /// Mail to TLS-RPT report addresses: the reports in it are read and stored (once per
    /// message, whatever it holds: a report mail is never refused), and that is its delivery.
    async fn store_reports(&self, msg: &Arc<Spooled>, idx: &[usize]) -> Vec<RcptResult> {
        let Some(store) = self.tlsrpt.clone() else {
            return Vec::new();
        };
        let m = msg.clone();
        let r = tokio::task::spawn_blocking(move || {
            store.store(&m.id, &m.envelope.sender, m.arrived, &m.message)
        })
        .await;
        let result = match r {
            Ok(Ok(stored)) => {
                let (ok, failed) = stored
                    .reports
                    .iter()
                    .map(crate::tlsrpt::report::Report::totals)
                    .fold((0u64, 0u64), |(a, b), (x, y)| (a + x, b + y));
                let orgs: Vec<&str> = stored
                    .reports
                    .iter()
                    .map(|r| r.organization.as_str())
                    .collect();
                tracing::info!(queue_id = %msg.id, from = %msg.envelope.sender,
                    reports = stored.reports.len(), organizations = ?orgs,
                    successful = ok, failed, problems = ?stored.problems,
                    "TLS-RPT report stored");
                let reply = if stored.reports.is_empty() {
                    format!(
                        "no readable report ({}); kept for inspection",
                        stored.problems.join("; ")
                    )
                } else {
                    format!(
                        "{} report(s) stored: {ok} successful, {failed} failed session(s)",
                        stored.reports.len()
                    )
                };
                Ok(reply)
            }
            Ok(Err(e)) => Err(format!("storing the TLS-RPT report failed: {e}")),
            Err(e) => Err(format!("storing the TLS-RPT report failed: {e}")),
        };
        idx.iter()
            .map(|_| match &result {
                Ok(reply) => RcptResult::Delivered {
                    tls: crate::report::TlsClass::Local,
                    auth: crate::report::AuthClass::Local,
                    dsn_passed: false,
                    remote: "tlsrpt".into(),
                    reply: reply.clone(),
                },
                Err(e) => RcptResult::NotDelivered(deliver::failure(
                    Cause::LocalDelivery,
                    None,
                    e.clone(),
                )),
            })
            .collect()
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
                            Cause::LocalDelivery,
                            None,
                            format!("local delivery failed: {e}"),
                        )),
                        Err(e) => RcptResult::NotDelivered(deliver::failure(
                            Cause::LocalDelivery,
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
            requiretls: msg.envelope.requiretls,
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
        let rules = self.tls_policy();
        let decision = deliver::decide(
            &self.outbound,
            &rules,
            self.sts.as_deref(),
            domain,
            &hop,
            &msg.envelope,
            crate::policy::says_tls_required_no(&msg.message),
        )
        .await;
        tracing::debug!(queue_id = %msg.id, domain, level = decision.requirement.level.as_str(),
            why = %decision.why, "TLS requirement");
        // A domain whose MTA-STS policy could not be had (RFC 8460 §4.3.2): one failed
        // session of its `sts` policy per delivery; the sessions themselves go under
        // `no-policy-found`, which is what they were.
        if let (Some(results), Some(sts), NextHop::Mx, None) =
            (&self.outbound.tlsrpt, &self.sts, &hop, &decision.mta_sts)
            && let Some((kind, why)) = sts.policy_failure(domain)
            && !crate::policy::is_tlsrpt_report(&msg.message)
        {
            tracing::debug!(queue_id = %msg.id, domain, result = kind, %why, "TLS-RPT: MTA-STS policy failure counted");
            results.record(
                unix_now(),
                &crate::tlsrpt::results::PolicyId {
                    kind: "sts",
                    domain: domain.to_string(),
                    strings: Vec::new(),
                    mx_hosts: Vec::new(),
                },
                Some(&crate::tlsrpt::results::Failed {
                    result_type: kind,
                    reason_code: why.chars().take(200).collect(),
                    ..Default::default()
                }),
            );
        }
        deliver::deliver(&self.outbound, &msg.id, domain, &hop, &decision, out).await
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

/// A few words for a failure (the report and metrics group by these): the cause's own, or
/// for a remote refusal the start of its reply, without host-specific detail after a colon.
fn short_cause(cause: Cause, reason: &str) -> String {
    let words = cause.words();
    if !words.is_empty() {
        return words.to_string();
    }
    let first: String = reason
        .split([':', ';'])
        .next()
        .unwrap_or("")
        .chars()
        .take(50)
        .collect();
    first.trim().to_string()
}

/// The code once retrying has ended: the cause's permanent form, or for a remote's code
/// `4.x.y` becomes `5.x.y`.
fn permanent_form(cause: Cause, status: &str) -> String {
    if let Some(code) = cause.code(true) {
        return code.to_string();
    }
    match status.strip_prefix('4') {
        Some(rest) => format!("5{rest}"),
        None => status.to_string(),
    }
}

/// The human sentence for a DSN: what failed, where, what the receiving side must fix.
fn explain(rcpt: &str, r: &state::RcptStatus) -> String {
    let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
    let host = r.remote.as_deref().unwrap_or(domain);
    r.cause.unwrap_or(Cause::Remote).explain(rcpt, domain, host)
}

/// Dispatches due messages, at most `max_concurrent_deliveries` at a time.
async fn scheduler(
    queue: Arc<Queue>,
    mut incoming: mpsc::UnboundedReceiver<String>,
    requeue: mpsc::UnboundedSender<String>,
) {
    let mut due: BTreeSet<(u64, String)> = queue.store.recovered().await.into_iter().collect();
    let shared = queue.store.shared();
    if shared {
        tokio::spawn(claimer(queue.clone(), requeue.clone()));
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
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        q.store.release(&id).await;
                        None
                    }
                    Err(e) => {
                        tracing::warn!(queue_id = %id, error = %e, "delivery pass failed; retrying in 60s");
                        // A shared store's message goes back to it, to be claimed again.
                        q.store.release(&id).await;
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
                // A shared store's message goes back to the store, from which whichever node
                // is free when it is due claims it.
                if let Some(t) = next.filter(|_| !shared) {
                    due.insert((t, id));
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How often a node of a shared store looks for due work no node holds.
const CLAIM_EVERY: Duration = Duration::from_secs(2);

/// Shared stores: claims due messages (deferred ones now due, and those of a node whose lease
/// ran out) and hands them to the scheduler.
async fn claimer(queue: Arc<Queue>, requeue: mpsc::UnboundedSender<String>) {
    let max = queue.config.max_concurrent_deliveries;
    let mut failing = false;
    loop {
        match queue.store.claim_due(max).await {
            Ok(ids) => {
                if failing {
                    tracing::info!("queue store reachable again; claiming due work");
                    failing = false;
                }
                for id in ids {
                    if requeue.send(id).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot claim due work from the queue store; deliveries paused until it answers");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(CLAIM_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_forms() {
        assert_eq!(
            permanent_form(Cause::StartTlsNotOffered, "4.4.317"),
            "5.4.317"
        );
        assert_eq!(permanent_form(Cause::Remote, "5.1.1"), "5.1.1");
        assert_eq!(permanent_form(Cause::Remote, "4.2.2"), "5.2.2");
    }
}
