//! One inbound connection: the thin async layer around [`Session`].
//!
//! It reads bytes, feeds the session, writes its replies in one buffer per batch, and carries
//! out the session's actions: the STARTTLS handshake (after dropping every byte the client
//! pipelined in plaintext), credential checks with throttling, and spooling with the Received
//! stamp. Timeouts (RFC 5321 §4.5.3.2) and shutdown are applied here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;

use super::auth::Authenticator;
use super::received;
use crate::config::{IpNet, Limits};
use crate::metrics;
use crate::queue::spool::Incoming;
use crate::queue::store::Store;
use crate::smtp::session::{Action, AuthOutcome, ListenerRules, Peer, Rules, Session};
use crate::util;

/// State shared by every connection.
pub struct Shared {
    pub rules: Arc<Rules>,
    pub limits: Limits,
    pub spool: Arc<dyn Store>,
    pub deliver: mpsc::UnboundedSender<String>,
    pub auth: Authenticator,
    pub trusted: Vec<IpNet>,
    pub tls_required_networks: Vec<IpNet>,
    /// Networks whose clients must present a certificate issued to a name.
    pub client_cert_networks: Vec<(IpNet, String)>,
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("hostname", &self.rules.hostname)
            .finish_non_exhaustive()
    }
}

/// Per-listener facts.
pub struct ListenerCtx {
    pub name: String,
    /// This listener's TLS settings (session tickets differ by mode).
    pub acceptor: TlsAcceptor,
    pub rules: Arc<ListenerRules>,
    pub implicit_tls: bool,
}

impl std::fmt::Debug for ListenerCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCtx")
            .field("name", &self.name)
            .field("implicit_tls", &self.implicit_tls)
            .finish_non_exhaustive()
    }
}

enum Next {
    Close,
    StartTls,
}

/// Serves one accepted connection to the end.
pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerCtx>,
    shared: Arc<Shared>,
) {
    let ip = peer.ip();
    let _ = stream.set_nodelay(true);
    let limits = &shared.limits;
    let deadline = Instant::now() + Duration::from_secs(limits.session_timeout_secs);
    let mut info = Peer {
        ip,
        tls: None,
        trusted: shared.trusted.iter().any(|n| n.contains(ip)),
        tls_required_by_rule: shared.tls_required_networks.iter().any(|n| n.contains(ip)),
        client_cert_required: shared
            .client_cert_networks
            .iter()
            .filter(|(n, _)| n.contains(ip))
            .map(|(_, name)| name.clone())
            .collect(),
    };
    tracing::debug!(%peer, listener = %listener.name, "connection");
    let _open = OpenConnection::new(&listener.name);
    let handshake_timeout = Duration::from_secs(limits.handshake_timeout_secs);
    if listener.implicit_tls {
        let Some(mut tls) = handshake(&listener, stream, peer, handshake_timeout).await else {
            return;
        };
        info.tls = Some(crate::tls::summarize(tls.get_ref().1));
        let mut session = Session::new(shared.rules.clone(), listener.rules.clone(), info);
        session.greeting();
        drive(&mut tls, &mut session, &shared, deadline, &listener.name).await;
        let _ = tls.shutdown().await;
        metrics::inc(
            crate::metrics::Metric::SessionsTotal,
            &[("listener", &listener.name), ("tls", "yes")],
        );
        return;
    }
    let mut stream = stream;
    let mut session = Session::new(shared.rules.clone(), listener.rules.clone(), info);
    session.greeting();
    match drive(&mut stream, &mut session, &shared, deadline, &listener.name).await {
        Next::Close => {
            // Dropping the stream closes it, which sends the FIN after the last reply: no
            // separate shutdown(2) needed.
            drop(stream);
            metrics::inc(
                crate::metrics::Metric::SessionsTotal,
                &[("listener", &listener.name), ("tls", "no")],
            );
        }
        Next::StartTls => {
            let Some(mut tls) = handshake(&listener, stream, peer, handshake_timeout).await else {
                return;
            };
            session.tls_started(crate::tls::summarize(tls.get_ref().1));
            drive(&mut tls, &mut session, &shared, deadline, &listener.name).await;
            let _ = tls.shutdown().await;
            metrics::inc(
                crate::metrics::Metric::SessionsTotal,
                &[("listener", &listener.name), ("tls", "yes")],
            );
        }
    }
}

async fn handshake(
    ctx: &ListenerCtx,
    stream: TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let listener = ctx.name.as_str();
    match timeout(limit, ctx.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let s = crate::tls::summarize(tls.get_ref().1);
            tracing::info!(%peer, listener, version = %s.version, cipher = %s.cipher,
                key_exchange = s.key_exchange.as_deref().unwrap_or("-"),
                sni = s.sni.as_deref().unwrap_or("-"),
                client_cert = if s.client_names.is_empty() { "none".to_string() } else { format!("verified ({})", s.client_names.join(" ")) },
                "TLS established");
            metrics::inc(
                crate::metrics::Metric::TlsHandshakesTotal,
                &[
                    ("direction", "in"),
                    ("version", &s.version),
                    ("cipher", &s.cipher),
                ],
            );
            Some(tls)
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, listener, cause = %e, "TLS handshake failed");
            metrics::inc(
                crate::metrics::Metric::TlsHandshakeFailuresTotal,
                &[
                    ("direction", "in"),
                    ("cause", handshake_cause(&e.to_string())),
                ],
            );
            None
        }
        Err(_) => {
            tracing::warn!(%peer, listener, cause = "timeout", "TLS handshake failed");
            metrics::inc(
                crate::metrics::Metric::TlsHandshakeFailuresTotal,
                &[("direction", "in"), ("cause", "timeout")],
            );
            None
        }
    }
}

/// Writes the session's pending replies in one buffer. A client that stops reading (its
/// window full) gets the command timeout, then the connection is dropped.
async fn write_out<S: AsyncWrite + Unpin>(
    s: &mut S,
    session: &mut Session,
    limit: Duration,
) -> bool {
    if !session.has_output() {
        return true;
    }
    let out = session.take_output();
    count_rejections(&out);
    let write = async { s.write_all(&out).await.and(s.flush().await) };
    matches!(timeout(limit, write).await, Ok(Ok(())))
}

/// Counts each negative final reply line (`550 5.7.1 …`) in a batch of output.
fn count_rejections(out: &[u8]) {
    for line in out.split(|&b| b == b'\n') {
        if line.len() > 4
            && (line[0] == b'4' || line[0] == b'5')
            && line[3] == b' '
            && let Ok(text) = std::str::from_utf8(line)
        {
            metrics::rejection(text.trim_end());
        }
    }
}

/// A short, bounded cause for a failed inbound handshake (a metrics label).
fn handshake_cause(e: &str) -> &'static str {
    let e = e.to_ascii_lowercase();
    if e.contains("protocol version") || e.contains("no protocols") {
        "protocol_version"
    } else if e.contains("cipher") || e.contains("no shared") || e.contains("handshakefailure") {
        "no_shared_cipher"
    } else if e.contains("corrupt")
        || e.contains("invalidcontenttype")
        || e.contains("invalid message")
    {
        "not_tls"
    } else if e.contains("alert") {
        "alert_from_client"
    } else if e.contains("eof") || e.contains("reset") || e.contains("closed") {
        "closed"
    } else if e.contains("certificate") {
        "client_certificate"
    } else {
        "other"
    }
}

/// Counts a connection as open while it lives.
struct OpenConnection(String);

impl OpenConnection {
    fn new(listener: &str) -> OpenConnection {
        metrics::inc(
            crate::metrics::Metric::ConnectionsTotal,
            &[("listener", listener)],
        );
        metrics::global().add(
            crate::metrics::Metric::ConnectionsActive,
            &[("listener", listener)],
            1,
        );
        OpenConnection(listener.to_string())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::global().add(
            crate::metrics::Metric::ConnectionsActive,
            &[("listener", &self.0)],
            -1,
        );
    }
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    session: &mut Session,
    shared: &Shared,
    deadline: Instant,
    listener: &str,
) -> Next {
    let mut buf: Vec<u8> = Vec::new();
    let mut shutdown = shared.shutdown.clone();
    let mut auth_failures = 0u32;
    let mut pending: Option<Action> = None;
    let ip = session.peer_ip();
    let write_limit = Duration::from_secs(shared.limits.command_timeout_secs);
    // The spool file of a large message being received (see `Action::Spill`); dropping it
    // removes the file.
    let mut spill: Option<Incoming> = None;
    loop {
        let action = match pending.take() {
            Some(a) => Some(a),
            None => {
                let p = session.process(&buf);
                buf.drain(..p.consumed);
                p.action
            }
        };
        match action {
            None => {
                if spill.is_some() && !session.spill_open() {
                    // Refused, reset or ended without being queued.
                    spill = None;
                }
                if !write_out(s, session, write_limit).await || session.is_closed() {
                    return Next::Close;
                }
                let limits = &shared.limits;
                let idle = Duration::from_secs(if session.in_data() {
                    limits.data_timeout_secs
                } else {
                    limits.command_timeout_secs
                });
                let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(4096);
                }
                tokio::select! {
                    r = timeout(wait, s.read_buf(&mut buf)) => match r {
                        Ok(Ok(0)) | Ok(Err(_)) => return Next::Close,
                        Ok(Ok(_)) => {}
                        Err(_) => {
                            session.shutdown("Error: timeout exceeded");
                            write_out(s, session, write_limit).await;
                            return Next::Close;
                        }
                    },
                    _ = shutdown.changed() => {
                        session.shutdown("Service shutting down, try again later");
                        write_out(s, session, write_limit).await;
                        return Next::Close;
                    }
                }
            }
            Some(Action::StartTls) => {
                if !write_out(s, session, write_limit).await {
                    return Next::Close;
                }
                // CVE-2011-0411: nothing sent before the handshake may be read after it.
                buf.clear();
                return Next::StartTls;
            }
            Some(Action::Authenticate { username, password }) => {
                let outcome =
                    authenticate(shared, ip, username, password, &mut auth_failures).await;
                pending = session.auth_result(outcome);
            }
            Some(Action::Spill { chunk, first }) => {
                if first {
                    // A file an earlier message began and never queued goes now, even when
                    // that message was refused within the same read as this one began.
                    spill = None;
                }
                let ok = spill_chunk(shared, session, &mut spill, chunk).await;
                session.spilled(ok);
            }
            Some(Action::Queue {
                envelope,
                body,
                spilled,
                trace,
            }) => {
                let started = std::time::Instant::now();
                let (id, size, result) = match (spilled, spill.take()) {
                    (true, Some(incoming)) => {
                        let id = incoming.id().to_string();
                        let size = incoming.len() as usize + body.len();
                        (id, size, shared.spool.commit(incoming, body).await)
                    }
                    (true, None) => {
                        let id = util::new_queue_id();
                        let lost = std::io::Error::other("spooled content of the message is gone");
                        (id, 0, Err(lost))
                    }
                    (false, _) => {
                        let (id, now, header) = new_message(shared, &envelope, &trace);
                        let mut message = header.into_bytes();
                        message.extend_from_slice(&body);
                        let result = shared.spool.store(&id, now, &envelope, &message).await;
                        (id, message.len(), result)
                    }
                };
                match &result {
                    Ok(()) => {
                        metrics::global().observe_sync(started.elapsed());
                        metrics::inc(
                            crate::metrics::Metric::MessagesAcceptedTotal,
                            &[("listener", listener)],
                        );
                        tracing::info!(queue_id = %id, client = %trace.ip, protocol = %trace.protocol,
                            from = %envelope.sender, rcpts = envelope.recipients.len(),
                            size,
                            tls = trace.tls.as_ref().map_or("none", |t| t.version.as_str()),
                            cipher = trace.tls.as_ref().map_or("-", |t| t.cipher.as_str()),
                            "accepted");
                        let _ = shared.deliver.send(id.clone());
                    }
                    Err(e) => tracing::error!(queue_id = %id, error = %e, "spool write failed"),
                }
                pending = session.queued(result.map(|_| id).map_err(|e| e.to_string()));
            }
            Some(Action::Close) => {
                write_out(s, session, write_limit).await;
                return Next::Close;
            }
        }
    }
}

/// A new message's queue id, arrival time and our Received header for it.
fn new_message(
    shared: &Shared,
    envelope: &crate::smtp::session::Envelope,
    trace: &crate::smtp::session::Trace,
) -> (String, u64, String) {
    let id = util::new_queue_id();
    let now = util::unix_now();
    let received = received::stamp(
        trace,
        &shared.rules.hostname,
        &id,
        envelope,
        &util::rfc5322_date(now),
    );
    (id, now, received)
}

/// Writes content handed out by the session to the message's spool file, beginning the file
/// (envelope and our Received header first) on the first chunk. False when it could not be
/// written; the session then refuses the message at its end.
async fn spill_chunk(
    shared: &Shared,
    session: &Session,
    spill: &mut Option<Incoming>,
    chunk: Vec<u8>,
) -> bool {
    let start = match spill.take() {
        Some(incoming) => Ok(incoming),
        None => {
            let Some((envelope, trace)) = session.pending_message() else {
                return false;
            };
            let (id, now, received) = new_message(shared, &envelope, &trace);
            Err((id, now, envelope, received))
        }
    };
    let spool = shared.spool.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut incoming = match start {
            Ok(incoming) => incoming,
            Err((id, now, envelope, received)) => {
                let mut incoming = spool.begin(&id, now, &envelope)?;
                incoming.append(received.as_bytes())?;
                incoming
            }
        };
        incoming.append(&chunk)?;
        Ok::<_, std::io::Error>(incoming)
    })
    .await;
    match written {
        Ok(Ok(incoming)) => {
            *spill = Some(incoming);
            true
        }
        Ok(Err(e)) => {
            tracing::error!(client = %session.peer_ip(), error = %e,
                "spool write failed while receiving a message");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "spool writer failed");
            false
        }
    }
}

async fn authenticate(
    shared: &Shared,
    ip: std::net::IpAddr,
    username: String,
    password: String,
    failures: &mut u32,
) -> AuthOutcome {
    let auth = &shared.auth;
    if auth.limiter.blocked(ip) {
        tracing::warn!(client = %ip, "AUTH refused: too many failures from this address");
        return AuthOutcome::Blocked;
    }
    // Hashing is bounded (memory and CPU); an attempt that finds no capacity is refused for
    // now and counts toward the address's failures, so a flood of logins runs out of tries.
    let Some(mut slot) = auth.pool.slot(ip).await else {
        auth.limiter.record_failure(ip);
        tracing::warn!(client = %ip, user = %username, "AUTH refused for now: too many logins being checked");
        return AuthOutcome::Busy;
    };
    let path = auth.users_file.clone();
    let user = username.clone();
    let mut memory = std::mem::take(&mut slot.memory);
    let checked = tokio::task::spawn_blocking(move || {
        let ok = super::auth::verify(&path, &user, &password, &mut memory);
        (ok, memory)
    })
    .await;
    let ok = match checked {
        Ok((ok, memory)) => {
            slot.memory = memory;
            ok
        }
        Err(_) => false,
    };
    drop(slot);
    if ok {
        tracing::info!(client = %ip, user = %username, "AUTH succeeded");
        return AuthOutcome::Success(username);
    }
    *failures += 1;
    auth.limiter.record_failure(ip);
    tracing::warn!(client = %ip, user = %username, failures = *failures, "AUTH failed");
    let delay = shared
        .limits
        .auth_failure_delay_ms
        .saturating_mul(u64::from(*failures));
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if *failures >= auth.max_failures_per_connection || auth.limiter.blocked(ip) {
        AuthOutcome::Blocked
    } else {
        AuthOutcome::Failure
    }
}
