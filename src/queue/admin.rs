//! Queue administration over a local Unix socket (`<data_dir>/admin.sock`, mode 0600): no
//! network exposure. `moat queue …` is the client.
//!
//! Protocol: one request line, `VERB ARGS…`; the answer is `ok` or `error TEXT`, then body
//! lines, then a line holding a single `.` (body lines starting with `.` are dot-stuffed).
//!
//! | request | effect |
//! |---|---|
//! | `list [domain=D] [state=S]` | one block per message: id, age, size, sender, then each recipient's state and cause |
//! | `show ID` | the same for one message, plus the TLS policy per domain and the header |
//! | `retry id ID` / `retry domain D` / `retry all` | deferred recipients become due now (e.g. after the far side fixed its certificate) |
//! | `delete …` | removes messages without notice |
//! | `bounce …` | fails every undelivered recipient and sends the sender a DSN |

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::Queue;
use super::spool::Spooled;
use super::state::{MessageState, RcptState};
use crate::util::unix_now;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "admin.sock";

/// Binds the socket, replacing a stale one left by a crash; owner-only permissions.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another moat is running on this data dir",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests until the process ends.
pub async fn serve(
    listener: UnixListener,
    queue: Arc<Queue>,
    requeue: mpsc::UnboundedSender<String>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (q, rq) = (queue.clone(), requeue.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &q, &rq).await {
                tracing::warn!(error = %e, "admin request failed");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    queue: &Arc<Queue>,
    requeue: &mpsc::UnboundedSender<String>,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(4096)).read_line(&mut line).await?;
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let answer = match run(queue, requeue, &words).await {
        Ok(body) => format!("ok\n{}.\n", stuff(&body)),
        Err(e) => format!("error {}\n.\n", e.replace('\n', " ")),
    };
    w.write_all(answer.as_bytes()).await?;
    w.shutdown().await
}

fn stuff(body: &str) -> String {
    let mut out = String::new();
    for l in body.lines() {
        if l.starts_with('.') {
            out.push('.');
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Which messages a retry/delete/bounce applies to.
async fn select(queue: &Queue, words: &[&str]) -> Result<Vec<String>, String> {
    match words {
        ["id", id] => {
            if queue.store.exists(id).await.unwrap_or(false) {
                Ok(vec![id.to_string()])
            } else {
                Err(format!("no message {id} in the queue"))
            }
        }
        ["domain", d] => ids(queue, Some(d)).await,
        ["all"] => ids(queue, None).await,
        _ => Err("give `id ID`, `domain DOMAIN` or `all`".into()),
    }
}

/// The queued messages, all or those with a recipient in `domain` (either label form).
async fn ids(queue: &Queue, domain: Option<&str>) -> Result<Vec<String>, String> {
    match domain {
        Some(d) => {
            let d = crate::domain::canonical_or_lower(d);
            queue.store.with_domain(&d).await
        }
        None => queue.store.list().await,
    }
    .map_err(|e| e.to_string())
}

/// One recipient of a queued message, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RcptInfo {
    pub address: String,
    pub state: &'static str,
    pub attempts: u32,
    /// Seconds until the next attempt, for deferred recipients.
    pub next_attempt_in: Option<u64>,
    pub status: String,
    pub remote: Option<String>,
    pub reason: String,
}

/// One queued message, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MessageInfo {
    pub id: String,
    pub age_secs: u64,
    pub size: usize,
    pub sender: String,
    /// Sent with REQUIRETLS (RFC 8689).
    pub requiretls: bool,
    pub recipients: Vec<RcptInfo>,
}

fn info(m: &Spooled, st: &MessageState, now: u64) -> MessageInfo {
    MessageInfo {
        id: m.id.clone(),
        age_secs: now.saturating_sub(m.arrived),
        size: m.message.len(),
        sender: m.envelope.sender.clone(),
        requiretls: m.envelope.requiretls,
        recipients: m
            .envelope
            .recipients
            .iter()
            .zip(&st.rcpts)
            .map(|(a, r)| RcptInfo {
                address: a.clone(),
                state: r.state.as_str(),
                attempts: r.attempts,
                next_attempt_in: (r.state == RcptState::Deferred)
                    .then(|| r.next_attempt.saturating_sub(now)),
                status: r.status.clone(),
                remote: r.remote.clone(),
                reason: r.reason.clone(),
            })
            .collect(),
    }
}

/// The queued messages, optionally only those with a recipient in `domain` or in `state`.
pub async fn messages(
    queue: &Queue,
    domain: Option<&str>,
    state: Option<&str>,
) -> Result<Vec<MessageInfo>, String> {
    let now = unix_now();
    let mut out = Vec::new();
    for id in ids(queue, domain).await? {
        let Ok((m, st)) = queue.store.load(&id).await else {
            continue;
        };
        if state.is_some_and(|s| !st.rcpts.iter().any(|r| r.state.as_str() == s)) {
            continue;
        }
        out.push(info(&m, &st, now));
    }
    Ok(out)
}

/// One queued message.
pub async fn message(queue: &Queue, id: &str) -> Option<MessageInfo> {
    let (m, st) = queue.store.load(id).await.ok()?;
    Some(info(&m, &st, unix_now()))
}

fn describe(queue: &Queue, m: &Spooled, st: &MessageState, now: u64, detail: bool) -> String {
    let mut s = format!(
        "{}  age {}  {} bytes  from <{}>\n",
        m.id,
        crate::util::human_duration(now.saturating_sub(m.arrived)),
        m.message.len(),
        m.envelope.sender
    );
    if m.envelope.requiretls {
        s.push_str("    REQUIRETLS: only to hosts authenticated by DANE or MTA-STS enforce that offer REQUIRETLS (RFC 8689)\n");
    }
    for (rcpt, r) in m.envelope.recipients.iter().zip(&st.rcpts) {
        let next = if r.state == RcptState::Deferred {
            format!(
                "  next in {}",
                crate::util::human_duration(r.next_attempt.saturating_sub(now))
            )
        } else {
            String::new()
        };
        s.push_str(&format!(
            "    {rcpt}  {}  attempts {}{next}",
            r.state.as_str(),
            r.attempts
        ));
        if !r.status.is_empty() {
            s.push_str(&format!("  {}", r.status));
        }
        if let Some(remote) = &r.remote {
            s.push_str(&format!("  via {remote}"));
        }
        if !r.reason.is_empty() {
            s.push_str(&format!("\n        {}", r.reason));
        }
        s.push('\n');
    }
    if detail {
        let mut domains: Vec<&str> = m
            .envelope
            .recipients
            .iter()
            .filter_map(|r| r.rsplit_once('@').map(|(_, d)| d))
            .collect();
        domains.sort();
        domains.dedup();
        for d in domains {
            let lower = crate::domain::canonical_or_lower(d);
            let route = match queue.routes.get(&lower) {
                Some(super::Route::Maildir(p)) => format!("maildir {}", p.display()),
                Some(super::Route::Discard) => "discard".into(),
                Some(super::Route::Relay {
                    host,
                    port,
                    implicit_tls,
                    auth,
                }) => format!(
                    "relay {host}:{port}{}{}",
                    if *implicit_tls { " (implicit TLS)" } else { "" },
                    auth.as_ref()
                        .map(|(u, _)| format!(" as {u}"))
                        .unwrap_or_default()
                ),
                None => "mx".into(),
            };
            let sts = queue
                .sts
                .as_ref()
                .and_then(|s| s.entry(&lower))
                .map(|e| {
                    format!(
                        ", MTA-STS {} (id {}, mx {}, cached until {})",
                        e.policy.mode.as_str(),
                        e.id,
                        e.policy
                            .mx
                            .iter()
                            .map(|m| m.as_str())
                            .collect::<Vec<_>>()
                            .join(" "),
                        crate::util::rfc5322_date(e.expires())
                    )
                })
                .unwrap_or_default();
            // The decision a delivery would make now, from the cached policy (no lookups).
            let applied = match queue.routes.get(&lower) {
                None => queue
                    .sts
                    .as_ref()
                    .and_then(|s| s.entry(&lower))
                    .map(|entry| crate::sts::Applied {
                        domain: lower.clone(),
                        entry,
                        source: "cached".into(),
                    }),
                Some(_) => None,
            };
            let rules = queue.tls_policy();
            let sts_roots = |r: Option<&std::sync::Arc<rustls::RootCertStore>>| match &queue.sts {
                Some(s) => s.roots_for(r),
                None => r.cloned(),
            };
            let decision = crate::policy::decide(&crate::policy::Facts {
                rules: &rules,
                sender: &m.envelope.sender,
                domain: &lower,
                recipients: &m.envelope.recipients,
                mta_sts: applied.as_ref(),
                sts_roots: &sts_roots,
                requiretls: m.envelope.requiretls,
                tls_required_no: crate::policy::says_tls_required_no(&m.message),
                // `queue show` makes no lookups, so it cannot say what DANE would find.
                dane_unavailable: Some("not looked up by queue show".into()),
            });
            s.push_str(&format!(
                "  {d}: route {route}, TLS policy {}, because {}{sts}\n",
                decision.requirement.level.as_str(),
                decision.why
            ));
        }
        let header_end = m
            .message
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(m.message.len());
        s.push_str("  header:\n");
        for l in String::from_utf8_lossy(&m.message[..header_end]).lines() {
            s.push_str(&format!("    {l}\n"));
        }
    }
    s
}

pub(crate) async fn run(
    queue: &Arc<Queue>,
    requeue: &mpsc::UnboundedSender<String>,
    words: &[&str],
) -> Result<String, String> {
    let now = unix_now();
    let Some((verb, args)) = words.split_first() else {
        return Err("empty request".into());
    };
    match *verb {
        "count" => {
            let n = queue.store.count().await.map_err(|e| e.to_string())?;
            Ok(format!("{n}\n"))
        }
        "list" => {
            let mut domain = None;
            let mut state = None;
            for a in args {
                match a.split_once('=') {
                    Some(("domain", d)) => domain = Some(crate::domain::canonical_or_lower(d)),
                    Some(("state", s)) => state = Some(s.to_ascii_lowercase()),
                    _ => return Err(format!("unknown filter `{a}`")),
                }
            }
            if let Some(s) = &state
                && !["pending", "deferred", "delivered", "failed"].contains(&s.as_str())
            {
                return Err(format!(
                    "unknown state `{s}` (pending, deferred, delivered, failed)"
                ));
            }
            let filtered = domain.is_some() || state.is_some();
            let mut out = String::new();
            let mut n = 0;
            let mut unreadable = Vec::new();
            for id in ids(queue, domain.as_deref()).await? {
                let (m, st) = match queue.store.load(&id).await {
                    Ok(loaded) => loaded,
                    // Removed since it was listed.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        // Counted as `count` counts it, and named, whatever the filter.
                        if !filtered {
                            n += 1;
                        }
                        unreadable.push(format!("{id}  unreadable: {e}\n"));
                        continue;
                    }
                };
                if state
                    .as_deref()
                    .is_some_and(|s| !st.rcpts.iter().any(|r| r.state.as_str() == s))
                {
                    continue;
                }
                n += 1;
                out.push_str(&describe(queue, &m, &st, now, false));
            }
            if !unreadable.is_empty() {
                out.push_str(&format!(
                    "{} queued message(s) cannot be read (see the log):\n",
                    unreadable.len()
                ));
                for line in &unreadable {
                    out.push_str("  ");
                    out.push_str(line);
                }
            }
            out.push_str(&format!("{n} message(s)\n"));
            let lost = queue.store.lost();
            if !lost.is_empty() {
                out.push_str(&format!(
                    "{} damaged journal record(s) found at start-up; their messages are lost if \
                     they were acknowledged (a copy of each segment is kept beside it as \
                     <segment>.damaged-<time>):\n",
                    lost.len()
                ));
                for l in &lost {
                    out.push_str(&format!(
                        "  {}  from {}  {} bytes  journal/{} at offset {}\n",
                        l.id.as_deref().unwrap_or("(id unreadable)"),
                        l.sender.as_deref().unwrap_or("(unreadable)"),
                        l.size,
                        l.segment,
                        l.offset
                    ));
                }
            }
            Ok(out)
        }
        "show" => {
            let [id] = args else {
                return Err("usage: show ID".into());
            };
            let (m, st) = queue
                .store
                .load(id)
                .await
                .map_err(|_| format!("no message {id} in the queue"))?;
            Ok(describe(queue, &m, &st, now, true))
        }
        "retry" => {
            let mut out = String::new();
            for id in select(queue, args).await? {
                let Ok((_, mut st)) = queue.store.load(&id).await else {
                    continue;
                };
                for r in st.rcpts.iter_mut().filter(|r| !r.state.is_final()) {
                    r.next_attempt = 0;
                }
                queue
                    .store
                    .save_state(&id, &st)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = requeue.send(id.clone());
                out.push_str(&format!("retrying {id}\n"));
            }
            Ok(out)
        }
        "delete" => {
            let mut out = String::new();
            for id in select(queue, args).await? {
                queue
                    .store
                    .remove(&id)
                    .await
                    .map_err(|e| format!("{id}: {e}"))?;
                tracing::info!(queue_id = %id, "deleted by the administrator");
                out.push_str(&format!("deleted {id}\n"));
            }
            Ok(out)
        }
        "bounce" => {
            let mut out = String::new();
            for id in select(queue, args).await? {
                let Ok((m, mut st)) = queue.store.load(&id).await else {
                    continue;
                };
                let mut failed = Vec::new();
                for (i, r) in st.rcpts.iter_mut().enumerate() {
                    if r.state.is_final() {
                        continue;
                    }
                    r.state = RcptState::Failed;
                    r.status = "5.0.0".into();
                    r.cause = Some(crate::policy::cause::Cause::Administrator);
                    r.reason = if r.reason.is_empty() {
                        "returned to the sender by the administrator".into()
                    } else {
                        format!(
                            "returned to the sender by the administrator; last cause: {}",
                            r.reason
                        )
                    };
                    failed.push(i);
                }
                if !failed.is_empty() {
                    queue.bounce(&m, &st, &failed, now, requeue).await;
                }
                queue
                    .store
                    .remove(&id)
                    .await
                    .map_err(|e| format!("{id}: {e}"))?;
                tracing::info!(queue_id = %id, recipients = failed.len(), "bounced by the administrator");
                out.push_str(&format!("bounced {id} ({} recipient(s))\n", failed.len()));
            }
            Ok(out)
        }
        other => Err(format!("unknown request `{other}`")),
    }
}

/// Client side: sends one request and returns the body, or the server's error.
pub fn request(path: &Path, line: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "moat is not running for this data dir (no admin socket at {}: {e}); start it with `moat serve`",
            path.display()
        )
    })?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let mut lines = text.lines();
    let status = lines.next().unwrap_or("error empty answer from the server");
    let mut body = String::new();
    for l in lines {
        if l == "." {
            break;
        }
        body.push_str(l.strip_prefix('.').unwrap_or(l));
        body.push('\n');
    }
    match status.strip_prefix("error ") {
        Some(e) => Err(e.to_string()),
        None if status == "ok" => Ok(body),
        None => Err(format!("unexpected answer: {status}")),
    }
}
