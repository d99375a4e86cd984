//! The built-in MTA-STS policy host: `https://mta-sts.<domain>/.well-known/mta-sts.txt` for each
//! configured domain, `text/plain`, and 404 for anything else.
//!
//! One request per connection (`Connection: close`), request headers limited to 8 KiB;
//! the TLS handshake and request head must arrive within 5 seconds, the whole exchange within
//! 10; `GET` and `HEAD` only. At most 512 connections, 32 per client address; when full, the
//! oldest connection still waiting for its request makes room ([`http::gate`]), so idle
//! connections cannot lock senders out of policy discovery (RFC 8461 §10.2). The certificate
//! is chosen by SNI among the policy's own certificate files and the `[tls]` certificates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::fetch::POLICY_PATH;
use super::policy::{Mode, MxPattern, Policy};
use crate::config::Config;
use crate::http::{self, Response};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake and request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once, in all and per client address.
const MAX_CONNECTIONS: usize = 512;
const MAX_PER_ADDRESS: usize = 32;

/// Policy texts by policy host name (`mta-sts.<domain>`, lowercase).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    by_host: HashMap<String, String>,
}

impl Policies {
    /// Builds the published policies from the config; `served_names` are the MX names used
    /// when a policy lists none (the hostname and the names in Moat's certificates).
    pub fn from_config(config: &Config, served_names: &[String]) -> Result<Policies, String> {
        let mut by_host = HashMap::new();
        for p in &config.mta_sts.policies {
            let mode: Mode = p
                .mode
                .parse()
                .map_err(|e| format!("mta_sts policy for {}: {e}", p.domain))?;
            let names: Vec<String> = if p.mx.is_empty() {
                served_names.to_vec()
            } else {
                p.mx.clone()
            };
            let mut mx = Vec::new();
            for n in &names {
                let pattern = MxPattern::parse(&crate::domain::canonical_or_lower(n))
                    .map_err(|e| format!("mta_sts policy for {}: mx `{n}`: {e}", p.domain))?;
                if !mx.contains(&pattern) {
                    mx.push(pattern);
                }
            }
            if mx.is_empty() && mode != Mode::None {
                return Err(format!(
                    "mta_sts policy for {}: no mx names (set mx = [...])",
                    p.domain
                ));
            }
            let policy = Policy {
                mode,
                mx,
                max_age: p.max_age,
            };
            by_host.insert(
                format!("mta-sts.{}", crate::domain::canonical_or_lower(&p.domain)),
                policy.to_text(),
            );
        }
        Ok(Policies { by_host })
    }

    /// The policy text served for `host`.
    pub fn get(&self, host: &str) -> Option<&str> {
        self.by_host
            .get(&crate::domain::canonical_or_lower(host))
            .map(String::as_str)
    }

    /// The policy host names.
    pub fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_host.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Serves policies on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, policies: Arc<Policies>) {
    let gate = http::gate::Gate::new(MAX_CONNECTIONS, MAX_PER_ADDRESS);
    let refusals = http::gate::LogLimit::new(5, Duration::from_secs(60));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "policy host: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Every slot busy past its request head: the connection is simply closed; a policy
        // is small and cacheable.
        let Some(ticket) = gate.admit(peer.ip()) else {
            if let Some(held) = refusals.allow() {
                tracing::warn!(%peer, held_back = held, "policy host: every connection is busy; refused");
            }
            continue;
        };
        let (acceptor, policies) = (acceptor.clone(), policies.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
            let work = async {
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "policy host: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                answer(tls, sni, &policies, peer, &ticket, deadline).await;
            };
            tokio::select! {
                _ = ticket.evicted() => {}
                _ = tokio::time::timeout(REQUEST_TIMEOUT, work) => {}
            }
        });
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    sni: Option<String>,
    policies: &Policies,
    peer: std::net::SocketAddr,
    ticket: &http::gate::Ticket,
    head_deadline: tokio::time::Instant,
) {
    let read = match tokio::time::timeout_at(head_deadline, http::read_request(&mut stream)).await {
        Ok(r) => r,
        Err(_) => return,
    };
    ticket.head_done();
    let (response, head_only) = match read {
        Err(http::RequestError::Closed) => return,
        Err(http::RequestError::Bad(why)) => (Response::text(400, format!("{why}\n")), false),
        Ok(req) => {
            let head_only = req.method == "HEAD";
            let host = req.host.clone().or(sni).unwrap_or_default();
            let r = match (req.method.as_str(), req.path.as_str()) {
                ("GET" | "HEAD", POLICY_PATH) => match policies.get(&host) {
                    Some(text) => Response::text(200, text),
                    None => Response::text(404, "no policy for this host\n"),
                },
                ("GET" | "HEAD", _) => Response::text(404, "not found\n"),
                _ => Response::text(405, "method not allowed\n").with_header("Allow", "GET, HEAD"),
            };
            (r.with_header("Cache-Control", "max-age=300"), head_only)
        }
    };
    tracing::debug!(%peer, status = response.status, "policy host request");
    let _ = http::write_response(&mut stream, &response, head_only).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn answers_policy_404_and_405() {
        let mut policies = Policies::default();
        policies.by_host.insert(
            "mta-sts.example.com".into(),
            "version: STSv1\r\nmode: testing\r\nmx: mx.example.com\r\nmax_age: 86400\r\n".into(),
        );
        let peer: std::net::SocketAddr = ([127, 0, 0, 1], 1).into();
        for (req, status, body) in [
            (
                "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: MTA-STS.example.com\r\n\r\n",
                "200 OK",
                Some("mode: testing"),
            ),
            (
                "HEAD /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.com\r\n\r\n",
                "200 OK",
                None,
            ),
            (
                "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.other.test\r\n\r\n",
                "404",
                None,
            ),
            (
                "GET /index.html HTTP/1.1\r\nHost: mta-sts.example.com\r\n\r\n",
                "404",
                None,
            ),
            (
                "POST /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.com\r\n\r\n",
                "405",
                None,
            ),
            ("nonsense\r\n\r\n", "400", None),
        ] {
            let (mut client, server) = tokio::io::duplex(65536);
            client.write_all(req.as_bytes()).await.unwrap();
            let gate = http::gate::Gate::new(4, 4);
            let ticket = gate.admit(peer.ip()).unwrap();
            let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
            answer(server, None, &policies, peer, &ticket, deadline).await;
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{req:?} -> {out}"
            );
            if let Some(b) = body {
                assert!(out.contains(b), "{out}");
                assert!(out.contains("Content-Type: text/plain"), "{out}");
            }
            if req.starts_with("HEAD") {
                assert!(out.ends_with("\r\n\r\n"), "{out}");
            }
        }
    }
}
