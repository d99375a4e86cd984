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
    /// `POST /tlsrpt` takes TLS-RPT reports into this store (`[tls_rpt] https_endpoint`).
    pub reports: Option<Arc<crate::tlsrpt::store::Received>>,
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
        Ok(Policies {
            by_host,
            reports: None,
        })
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

/// Where reporters POST TLS-RPT reports (the `rua=https://mta-sts.<domain>/tlsrpt` URI).
pub const TLSRPT_PATH: &str = "/tlsrpt";
/// The largest report body taken (compressed or not).
const MAX_REPORT_POST: usize = 5 * 1024 * 1024;

/// `POST /tlsrpt`: a report as `application/tlsrpt+gzip` or `application/tlsrpt+json` (RFC
/// 8460 §5.4; plain `application/json` and `application/gzip` too). 201 when stored, 415 for
/// another type, 400 when the body holds no readable report.
async fn post_report(
    req: &http::Request,
    policies: &Policies,
    peer: std::net::SocketAddr,
) -> Response {
    let Some(store) = policies.reports.clone() else {
        return Response::text(404, "not found\n");
    };
    let ctype = req
        .header("content-type")
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !matches!(
        ctype.as_str(),
        "application/tlsrpt+gzip"
            | "application/tlsrpt+json"
            | "application/json"
            | "application/gzip"
    ) {
        return Response::text(
            415,
            "a TLS-RPT report is application/tlsrpt+gzip or application/tlsrpt+json\n",
        );
    }
    let body = req.body.clone();
    let ip = peer.ip();
    let stored =
        tokio::task::spawn_blocking(move || store.store_post(ip, crate::util::unix_now(), &body))
            .await;
    match stored {
        Ok(Ok(Some(s))) => {
            tracing::info!(%peer, reports = s.reports.len(), id = %s.queue_id,
                "TLS-RPT report stored (HTTPS)");
            Response::text(201, "report stored\n")
        }
        Ok(Ok(None)) => Response::text(400, "no readable TLS-RPT report in the body\n"),
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "TLS-RPT report (HTTPS) not stored");
            Response::text(503, "the report could not be stored now; try again later\n")
        }
        Err(_) => Response::text(500, "internal error\n"),
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
    let max_body = if policies.reports.is_some() {
        MAX_REPORT_POST
    } else {
        http::MAX_BODY
    };
    let read = match tokio::time::timeout_at(
        head_deadline,
        http::read_request_with_body(&mut stream, max_body),
    )
    .await
    {
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
                ("POST", TLSRPT_PATH) if policies.reports.is_some() => {
                    post_report(&req, policies, peer).await
                }
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

    async fn exchange(policies: &Policies, req: &[u8]) -> String {
        let peer: std::net::SocketAddr = ([127, 0, 0, 1], 1).into();
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let gate = http::gate::Gate::new(4, 4);
        let ticket = gate.admit(peer.ip()).unwrap();
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        let req = req.to_vec();
        let writer = tokio::spawn(async move {
            // A refused body is not read to its end: the write may fail.
            let _ = client.write_all(&req).await;
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            out
        });
        answer(server, None, policies, peer, &ticket, deadline).await;
        writer.await.unwrap()
    }

    fn post(ctype: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "POST /tlsrpt HTTP/1.1\r\nHost: mta-sts.example.com\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn reports_are_taken_by_post_only_when_enabled() {
        use std::io::Write as _;
        let report = br#"{"organization-name": "Poster", "report-id": "p1",
            "date-range": {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"},
            "policies": [{"policy": {"policy-type": "sts", "policy-domain": "example.com"},
              "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0}}]}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(report).unwrap();
        let gz = gz.finish().unwrap();
        // Off by default: POST is not allowed.
        let off = Policies::default();
        assert!(
            exchange(&off, &post("application/tlsrpt+gzip", &gz))
                .await
                .starts_with("HTTP/1.1 405")
        );
        let dir = tempfile::tempdir().unwrap();
        let on = Policies {
            reports: Some(Arc::new(crate::tlsrpt::store::Received::new(
                dir.path(),
                &[],
                30,
            ))),
            ..Policies::default()
        };
        let out = exchange(&on, &post("application/tlsrpt+gzip", &gz)).await;
        assert!(out.starts_with("HTTP/1.1 201"), "{out}");
        let out = exchange(&on, &post("application/tlsrpt+json; charset=utf-8", report)).await;
        assert!(out.starts_with("HTTP/1.1 201"), "{out}");
        let stored = crate::tlsrpt::store::list_dir(
            &dir.path().join("tlsrpt/received"),
            crate::util::unix_now(),
            1,
        );
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].reports[0].organization, "Poster");
        assert!(stored[0].sender.starts_with("https from 127.0.0.1"));
        // Wrong type, no report, too large: refused, nothing stored.
        assert!(
            exchange(&on, &post("text/plain", report))
                .await
                .starts_with("HTTP/1.1 415")
        );
        assert!(
            exchange(&on, &post("application/json", b"{\"a\": 1}"))
                .await
                .starts_with("HTTP/1.1 400")
        );
        let big = vec![b' '; MAX_REPORT_POST + 1];
        assert!(
            exchange(&on, &post("application/json", &big))
                .await
                .starts_with("HTTP/1.1 400")
        );
        assert_eq!(
            crate::tlsrpt::store::list_dir(
                &dir.path().join("tlsrpt/received"),
                crate::util::unix_now(),
                1
            )
            .len(),
            2
        );
    }
}
