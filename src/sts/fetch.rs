//! Fetching `https://mta-sts.<domain>/.well-known/mta-sts.txt` (RFC 8461 §3.3).
//!
//! A deliberately small HTTP/1.1 client: one `GET` per connection (`Connection: close`), the
//! certificate checked for `mta-sts.<domain>` against the trusted roots, no redirects (a 3xx is a
//! failure, never followed), status 200 only, `Content-Type: text/plain`, the body capped at
//! [`MAX_POLICY_BYTES`], the response headers at 16 KiB, and the whole exchange bounded in time.
//! `Content-Length`, chunked and close-delimited bodies are understood.
//!
//! The policy host's name is resolved with Moat's own resolver and the port is configurable, so
//! tests can serve policies on loopback.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::policy::MAX_POLICY_BYTES;
use crate::dns::{DnsError, Resolver};
use crate::outbound::tls::{CertFailure, Connector, TlsFailure, TlsLevel, TlsRequirement};

/// The path of the policy on the policy host.
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
/// Limit for the status line and headers.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Where and how to fetch policies.
#[derive(Debug, Clone)]
pub struct Fetcher {
    pub resolver: Resolver,
    pub connector: Connector,
    /// Trusted in addition to the connector's roots (a test CA, a private PKI).
    pub extra_roots: Option<Arc<RootCertStore>>,
    /// 443 outside tests.
    pub port: u16,
    /// For the whole fetch: resolution, connection, handshake, request and body.
    pub timeout: Duration,
}

/// A policy body as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub body: Vec<u8>,
    pub content_type: String,
    /// The address the policy came from.
    pub addr: SocketAddr,
    pub elapsed: Duration,
}

/// Why no policy body was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// `mta-sts.<domain>` did not resolve.
    Dns(DnsError),
    /// No address accepted a connection.
    Connect { host: String, detail: String },
    /// The TLS handshake or the certificate check failed.
    Tls { host: String, failure: TlsFailure },
    /// A 3xx reply: RFC 8461 forbids following it.
    Redirect {
        status: u16,
        location: Option<String>,
    },
    /// Any other status than 200.
    Status(u16),
    /// The media type is not `text/plain`.
    ContentType(String),
    /// The body exceeds [`MAX_POLICY_BYTES`].
    TooLarge,
    /// A malformed or truncated response, or an I/O error.
    Http(String),
    /// The fetch did not finish within the time limit.
    Timeout(Duration),
}

impl FetchError {
    /// A short cause word for logs and metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            FetchError::Dns(_) => "dns",
            FetchError::Connect { .. } => "connect",
            FetchError::Tls {
                failure: TlsFailure::Certificate(_),
                ..
            } => "certificate",
            FetchError::Tls { .. } => "tls",
            FetchError::Redirect { .. } => "redirect",
            FetchError::Status(_) => "status",
            FetchError::ContentType(_) => "content-type",
            FetchError::TooLarge => "too-large",
            FetchError::Http(_) => "http",
            FetchError::Timeout(_) => "timeout",
        }
    }

    /// The certificate failure, when that is the cause.
    pub fn certificate(&self) -> Option<&CertFailure> {
        match self {
            FetchError::Tls {
                failure: TlsFailure::Certificate(c),
                ..
            } => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Dns(e) => write!(f, "policy host: {e}"),
            FetchError::Connect { host, detail } => write!(f, "cannot connect to {host}: {detail}"),
            FetchError::Tls { host, failure } => write!(f, "TLS with {host} failed: {failure}"),
            FetchError::Redirect { status, location } => {
                write!(f, "the policy host answered {status} (a redirect")?;
                if let Some(l) = location {
                    write!(f, " to {l}")?;
                }
                f.write_str("); RFC 8461 forbids following redirects")
            }
            FetchError::Status(s) => write!(f, "the policy host answered HTTP {s}, not 200"),
            FetchError::ContentType(t) => {
                write!(f, "the policy is served as {t:?}, not text/plain")
            }
            FetchError::TooLarge => {
                write!(f, "the policy is larger than {} bytes", MAX_POLICY_BYTES)
            }
            FetchError::Http(s) => write!(f, "bad HTTP response: {s}"),
            FetchError::Timeout(t) => {
                write!(f, "fetching the policy took longer than {}s", t.as_secs())
            }
        }
    }
}

impl std::error::Error for FetchError {}

/// The policy host of `domain`.
pub fn policy_host(domain: &str) -> String {
    format!("mta-sts.{domain}")
}

/// The policy URL of `domain`.
pub fn policy_url(domain: &str) -> String {
    format!("https://mta-sts.{domain}{POLICY_PATH}")
}

impl Fetcher {
    /// Fetches the policy body of `domain` (not parsed here).
    pub async fn fetch(&self, domain: &str) -> Result<Fetched, FetchError> {
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.fetch_inner(domain, start)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(self.timeout)),
        }
    }

    async fn fetch_inner(&self, domain: &str, start: Instant) -> Result<Fetched, FetchError> {
        let host = policy_host(domain);
        let addrs = self
            .resolver
            .addresses(&host)
            .await
            .map_err(FetchError::Dns)?;
        let mut last = None;
        // A black-holed first address must not use up the whole budget.
        let per_address = (self.timeout / 3).max(Duration::from_secs(1));
        for ip in addrs {
            let addr = SocketAddr::new(ip, self.port);
            let tcp = match tokio::time::timeout(per_address, TcpStream::connect(addr)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    last = Some(FetchError::Connect {
                        host: format!("{host} [{addr}]"),
                        detail: e.to_string(),
                    });
                    continue;
                }
                Err(_) => {
                    last = Some(FetchError::Connect {
                        host: format!("{host} [{addr}]"),
                        detail: format!("timed out after {}s", per_address.as_secs()),
                    });
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match self.exchange(tcp, &host, addr, start).await {
                Ok(f) => return Ok(f),
                // Another address may serve it properly.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| FetchError::Connect {
            host,
            detail: "no address".into(),
        }))
    }
}

impl Fetcher {
    /// POSTs `body` to the `https:` URL `url` (a TLS-RPT report, RFC 8460 §5.4) under the
    /// trust rules of the policy fetch (verified chain and name, no redirects followed, one
    /// deadline) and returns the status. A URL without a port uses [`Fetcher::port`].
    pub async fn post(
        &self,
        url: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<u16, FetchError> {
        let rest = url
            .get(..8)
            .filter(|s| s.eq_ignore_ascii_case("https://"))
            .map(|_| &url[8..])
            .ok_or_else(|| FetchError::Http(format!("{url}: not an https: URL")))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.contains('@') || authority.is_empty() || path.contains(['\r', '\n', ' ']) {
            return Err(FetchError::Http(format!("{url}: unusable URL")));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return Err(FetchError::Http(format!("{url}: bad port"))),
            },
            _ => (authority, self.port),
        };
        let host = host.to_ascii_lowercase();
        let start = Instant::now();
        let work = async {
            let addrs = self
                .resolver
                .addresses(&host)
                .await
                .map_err(FetchError::Dns)?;
            let mut last = None;
            let per_address = (self.timeout / 3).max(Duration::from_secs(1));
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                let tcp = match tokio::time::timeout(per_address, TcpStream::connect(addr)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        last = Some(FetchError::Connect {
                            host: format!("{host} [{addr}]"),
                            detail: e.to_string(),
                        });
                        continue;
                    }
                    Err(_) => {
                        last = Some(FetchError::Connect {
                            host: format!("{host} [{addr}]"),
                            detail: format!("timed out after {}s", per_address.as_secs()),
                        });
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let req = TlsRequirement {
                    level: TlsLevel::Verify,
                    extra_roots: self.extra_roots.clone(),
                    ..TlsRequirement::default()
                };
                let mut tls = match self.connector.handshake(tcp, &host, &req).await {
                    Ok((t, _)) => t,
                    Err(failure) => {
                        last = Some(FetchError::Tls {
                            host: host.clone(),
                            failure,
                        });
                        continue;
                    }
                };
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: Moat/{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    env!("CARGO_PKG_VERSION"),
                    body.len()
                );
                tls.write_all(head.as_bytes())
                    .await
                    .map_err(|e| FetchError::Http(format!("sending the request: {e}")))?;
                tls.write_all(body)
                    .await
                    .map_err(|e| FetchError::Http(format!("sending the body: {e}")))?;
                tls.flush()
                    .await
                    .map_err(|e| FetchError::Http(format!("sending the body: {e}")))?;
                let response = read_response(&mut tls, 64 * 1024).await?;
                return Ok(response.status);
            }
            Err(last.unwrap_or_else(|| FetchError::Connect {
                host: host.clone(),
                detail: "no address".into(),
            }))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(start.elapsed())),
        }
    }

    /// TLS, request and response on one connection.
    async fn exchange(
        &self,
        tcp: TcpStream,
        host: &str,
        addr: SocketAddr,
        start: Instant,
    ) -> Result<Fetched, FetchError> {
        let req = TlsRequirement {
            level: TlsLevel::Verify,
            extra_roots: self.extra_roots.clone(),
            ..TlsRequirement::default()
        };
        let (mut tls, _) = self
            .connector
            .handshake(tcp, host, &req)
            .await
            .map_err(|failure| FetchError::Tls {
                host: host.to_string(),
                failure,
            })?;
        let request = format!(
            "GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Moat/{}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| FetchError::Http(format!("sending the request: {e}")))?;
        let response = read_response(&mut tls, MAX_POLICY_BYTES).await?;
        check(response, addr, start.elapsed())
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Applies RFC 8461 §3.3 to a response.
fn check(r: Response, addr: SocketAddr, elapsed: Duration) -> Result<Fetched, FetchError> {
    if (300..400).contains(&r.status) {
        return Err(FetchError::Redirect {
            status: r.status,
            location: r.header("location").map(str::to_string),
        });
    }
    if r.status != 200 {
        return Err(FetchError::Status(r.status));
    }
    let content_type = r.header("content-type").unwrap_or("").to_string();
    if !is_text_plain(&content_type) {
        return Err(FetchError::ContentType(content_type));
    }
    Ok(Fetched {
        body: r.body,
        content_type,
        addr,
        elapsed,
    })
}

/// `text/plain`, any case, with or without parameters such as `charset=utf-8`.
pub fn is_text_plain(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/plain"))
}

/// Reads one response with a body of at most `cap` bytes; a larger one is [`FetchError::TooLarge`].
pub async fn read_response<R: AsyncRead + Unpin>(
    stream: &mut R,
    cap: usize,
) -> Result<Response, FetchError> {
    let mut buf = Vec::with_capacity(4096);
    // Interim 1xx responses (100 Continue, 103 Early Hints) come before the real one.
    for _ in 0..8 {
        let (status, headers, rest) = read_head(stream, buf).await?;
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        return read_body(stream, status, headers, rest, cap).await;
    }
    Err(FetchError::Http("too many interim responses".into()))
}

/// Reads a status line and headers; returns them and the bytes read past them.
async fn read_head<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut buf: Vec<u8>,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), FetchError> {
    let io = |e: std::io::Error| FetchError::Http(format!("reading the response: {e}"));
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEADER_BYTES {
            return Err(FetchError::Http("response headers too long".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(FetchError::Http(
                "the connection closed before the headers ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| FetchError::Http("headers are not text".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = parse_status(status_line)
        .ok_or_else(|| FetchError::Http(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| FetchError::Http(format!("bad header line {line:?}")))?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(FetchError::Http(format!("bad header name {name:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = buf[head_end + 4..].to_vec();
    Ok((status, headers, rest))
}

/// Reads the body that follows a final response head.
async fn read_body<R: AsyncRead + Unpin>(
    stream: &mut R,
    status: u16,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
    cap: usize,
) -> Result<Response, FetchError> {
    let io = |e: std::io::Error| FetchError::Http(format!("reading the response: {e}"));
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let encodings: Vec<String> = response
        .headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "identity")
        .collect();
    let lengths: Vec<&str> = response
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    if !encodings.is_empty() {
        // Only plain chunked framing; a compressed policy is not a text/plain policy.
        if encodings != ["chunked"] {
            return Err(FetchError::Http(format!(
                "unsupported Transfer-Encoding {}",
                encodings.join(", ")
            )));
        }
        response.body = read_chunked(stream, rest, cap).await?;
    } else if let Some(&len) = lengths.first() {
        if lengths.iter().any(|l| *l != len) {
            return Err(FetchError::Http(
                "conflicting Content-Length headers".into(),
            ));
        }
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FetchError::Http(format!("bad Content-Length {len:?}")));
        }
        let len: usize = len.parse().map_err(|_| FetchError::TooLarge)?;
        if len > cap {
            return Err(FetchError::TooLarge);
        }
        let mut body = rest;
        while body.len() < len {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(FetchError::Http(format!(
                    "the body ended after {} of {len} bytes",
                    body.len()
                )));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
        response.body = body;
    } else {
        let mut body = rest;
        loop {
            if body.len() > cap {
                return Err(FetchError::TooLarge);
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                // Without close_notify the end of a close-delimited body cannot be told from
                // a cut (an injected FIN could shorten max_age): refuse it.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(FetchError::Http(
                        "the connection closed without TLS close_notify; the body may be cut"
                            .into(),
                    ));
                }
                Err(e) => return Err(io(e)),
            }
        }
        response.body = body;
    }
    Ok(response)
}

fn parse_status(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("HTTP/1.")?;
    let mut parts = rest.splitn(3, ' ');
    let minor = parts.next()?;
    if minor != "0" && minor != "1" {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

async fn read_chunked<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut pending: Vec<u8>,
    cap: usize,
) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    loop {
        // Chunk size line.
        let line_end = loop {
            if let Some(i) = find(&pending, b"\r\n") {
                break i;
            }
            if pending.len() > 1024 {
                return Err(FetchError::Http("bad chunk header".into()));
            }
            fill(stream, &mut pending).await?;
        };
        let line = std::str::from_utf8(&pending[..line_end])
            .map_err(|_| FetchError::Http("bad chunk header".into()))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| FetchError::Http(format!("bad chunk size {size_text:?}")))?;
        pending.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        if size > cap.saturating_sub(body.len()) {
            return Err(FetchError::TooLarge);
        }
        while pending.len() < size + 2 {
            fill(stream, &mut pending).await?;
        }
        body.extend_from_slice(&pending[..size]);
        if &pending[size..size + 2] != b"\r\n" {
            return Err(FetchError::Http("chunk not followed by CRLF".into()));
        }
        pending.drain(..size + 2);
    }
}

async fn fill<R: AsyncRead + Unpin>(stream: &mut R, buf: &mut Vec<u8>) -> Result<(), FetchError> {
    let mut chunk = [0u8; 8192];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| FetchError::Http(format!("reading the response: {e}")))?;
    if n == 0 {
        return Err(FetchError::Http("the body was cut short".into()));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &[u8], cap: usize) -> Result<Response, FetchError> {
        let mut r = raw;
        read_response(&mut r, cap).await
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 443))
    }

    #[tokio::test]
    async fn content_length_body() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
            100,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert!(check(r, addr(), Duration::ZERO).is_ok());
    }

    #[tokio::test]
    async fn chunked_body() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            100,
        )
        .await
        .unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[tokio::test]
    async fn close_delimited_body_and_caps() {
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it", 100)
            .await
            .unwrap();
        assert_eq!(r.body, b"all of it");
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\n\r\n0123456789", 5).await,
            Err(FetchError::TooLarge)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n", 65536).await,
            Err(FetchError::TooLarge)
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
                8
            )
            .await,
            Err(FetchError::TooLarge)
        );
        // A chunk size near usize::MAX must not overflow.
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nffffffffffffffff\r\n",
                100
            )
            .await,
            Err(FetchError::TooLarge)
        );
    }

    #[tokio::test]
    async fn malformed_responses() {
        for raw in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"SMTP 220 hi\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\n",
        ] {
            assert!(
                matches!(parse(raw, 100).await, Err(FetchError::Http(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[tokio::test]
    async fn redirects_status_and_type_are_refused() {
        let r = parse(
            b"HTTP/1.1 301 Moved\r\nLocation: https://elsewhere.example/p\r\nContent-Length: 0\r\n\r\n",
            100,
        )
        .await
        .unwrap();
        let e = check(r, addr(), Duration::ZERO).unwrap_err();
        assert_eq!(
            e,
            FetchError::Redirect {
                status: 301,
                location: Some("https://elsewhere.example/p".into())
            }
        );
        assert!(e.to_string().contains("forbids following redirects"));
        let r = parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 100)
            .await
            .unwrap();
        assert_eq!(
            check(r, addr(), Duration::ZERO),
            Err(FetchError::Status(404))
        );
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n",
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            check(r, addr(), Duration::ZERO),
            Err(FetchError::ContentType("text/html".into()))
        );
    }

    #[test]
    fn media_type() {
        assert!(is_text_plain("text/plain"));
        assert!(is_text_plain("Text/Plain; charset=utf-8"));
        assert!(!is_text_plain("text/plainx"));
        assert!(!is_text_plain(""));
        assert!(!is_text_plain("application/octet-stream"));
    }
}
