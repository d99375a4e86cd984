//! A small HTTP/1.1 server side for Moat's own endpoints (the MTA-STS policy host, the admin
//! API, metrics and the report page): one request per connection (`Connection: close`),
//! request head limited to [`MAX_HEAD`] bytes, a body (when `Content-Length` says so) of at most
//! [`MAX_BODY`] bytes, no chunked request bodies. Callers bound the time.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod gate;

/// Limit for the request line and headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Limit for a request body.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query, e.g. `/api/queue`.
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    /// The host from an absolute-form target or the `Host` header, without a port.
    pub host: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    }
}

/// Why a request could not be read; the caller answers 400 (or nothing, for `Closed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The peer closed or the read failed before a whole request arrived.
    Closed,
    /// Malformed or over a limit.
    Bad(String),
}

/// Reads one request.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, RequestError> {
    read_request_with_body(stream, MAX_BODY).await
}

/// [`read_request`] with a body of at most `max_body` bytes (for an upload endpoint).
pub async fn read_request_with_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_body: usize,
) -> Result<Request, RequestError> {
    let mut buf = Vec::new();
    let head_end = loop {
        let found = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if found.unwrap_or(buf.len()) > MAX_HEAD {
            return Err(RequestError::Bad("request head too long".into()));
        }
        if let Some(i) = found {
            break i;
        }
        let mut chunk = [0u8; 2048];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(RequestError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut req = parse_head(&buf[..head_end]).map_err(RequestError::Bad)?;
    if req
        .header("transfer-encoding")
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
    {
        return Err(RequestError::Bad(
            "chunked request bodies are not accepted".into(),
        ));
    }
    let len = content_length(&req).map_err(RequestError::Bad)?;
    if len > max_body {
        return Err(RequestError::Bad("request body too large".into()));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(RequestError::Closed),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    req.body = body;
    Ok(req)
}

/// Parses the request line and headers (without the final blank line), refusing what RFC 9112
/// and RFC 9110 require a server to reject, since a lenient parser behind or in front of
/// another one is how requests get smuggled: a version other than HTTP/1.0 or 1.1, an
/// HTTP/1.1 request without `Host` or with two, NUL, CR or LF inside a line (a bare CR or LF
/// is not a line end here), obsolete line folding, and whitespace before a header's colon.
pub fn parse_head(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut first = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err("malformed request line".into());
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err("only HTTP/1.0 and HTTP/1.1 are spoken here".into()),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("malformed request method".into());
    }
    let method = method.to_string();
    // Absolute-form targets name the host too.
    let (target, absolute_host) = match target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))
    {
        Some(rest) => match rest.split_once('/') {
            Some((h, p)) => (format!("/{p}"), Some(h.to_string())),
            None => ("/".to_string(), Some(rest.to_string())),
        },
        None => (target.to_string(), None),
    };
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("malformed request target".into());
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target, Vec::new()),
    };
    let mut headers = Vec::new();
    let mut host_header: Option<String> = None;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err("obsolete header line folding is not accepted".into());
        }
        if line.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
            return Err("NUL, CR or LF inside a header line".into());
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err("header line without ':'".into());
        };
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err("malformed header name".into());
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim_matches([' ', '\t']).to_string();
        if name == "host" {
            if host_header.is_some() {
                return Err("two Host headers".into());
            }
            host_header = Some(value.clone());
        }
        headers.push((name, value));
    }
    if http11 && host_header.is_none() {
        return Err("an HTTP/1.1 request needs a Host header".into());
    }
    let host = absolute_host.or(host_header);
    let host = host.map(|h| match h.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            name.to_string()
        }
        _ => h,
    });
    Ok(Request {
        method,
        path,
        query,
        headers,
        host,
        body: Vec::new(),
    })
}

/// The body length from `Content-Length` (RFC 9112 §6.3): digits only; several fields, or a
/// comma-separated list, must all agree; anything else is refused.
fn content_length(req: &Request) -> Result<usize, String> {
    let mut len: Option<usize> = None;
    for (_, v) in req.headers.iter().filter(|(n, _)| n == "content-length") {
        for item in v.split(',') {
            let item = item.trim_matches([' ', '\t']);
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err("bad Content-Length".into());
            }
            let n = item
                .parse::<usize>()
                .map_err(|_| "bad Content-Length".to_string())?;
            if len.is_some_and(|l| l != n) {
                return Err("differing Content-Length values".into());
            }
            len = Some(n);
        }
    }
    Ok(len.unwrap_or(0))
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// `%XX` and `+` decoding; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    // `+` is a space in form encoding; `%2B` (decoded after) stays a plus.
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            body.into().into_bytes(),
        )
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        match serde_json::to_vec_pretty(value) {
            Ok(mut v) => {
                v.push(b'\n');
                Response::new(status, "application/json", v)
            }
            Err(e) => Response::text(500, format!("cannot encode the answer: {e}\n")),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes `r` (without a body for `HEAD`) and closes the write side.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    r: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (n, v) in &r.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&r.body);
    }
    stream.write_all(&bytes).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_requests_with_and_without_bodies() {
        let mut raw: &[u8] = b"GET /api/queue?domain=a%2Eb&state=deferred&x HTTP/1.1\r\nHost: 127.0.0.1:8025\r\nAuthorization: Bearer abc\r\n\r\n";
        let r = read_request(&mut raw).await.unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/queue");
        assert_eq!(r.param("domain"), Some("a.b"));
        assert_eq!(r.param("x"), Some(""));
        assert_eq!(r.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(r.bearer(), Some("abc"));
        let mut raw: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloMORE";
        let r = read_request(&mut raw).await.unwrap();
        assert_eq!(r.body, b"hello");
    }

    #[tokio::test]
    async fn refuses_bad_requests() {
        for raw in [
            &b"GET / HTTP/1.1 x\r\n\r\n"[..],
            b"get / HTTP/1.1\r\n\r\n",
            b"GET / SMTP/1.0\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbroken\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            // RFC 9112 / 9110: what a server must refuse (smuggling material).
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.9\r\nHost: a\r\n\r\n",
        ] {
            let mut r = raw;
            assert!(
                matches!(read_request(&mut r).await, Err(RequestError::Bad(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(read_request(&mut r).await, Err(RequestError::Closed));
        // Still accepted: HTTP/1.0 without Host, equal repeated lengths, an absolute target.
        for raw in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            b"GET http://mta-sts.example/x HTTP/1.1\r\nHost: mta-sts.example\r\n\r\n",
        ] {
            let mut r = raw;
            assert!(
                read_request(&mut r).await.is_ok(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        let mut r = long.as_bytes();
        assert!(matches!(
            read_request(&mut r).await,
            Err(RequestError::Bad(_))
        ));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[tokio::test]
    async fn writes_responses() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let r = Response::text(404, "nope\n").with_header("Cache-Control", "no-store");
        write_response(&mut a, &r, false).await.unwrap();
        drop(a);
        let mut out = String::new();
        b.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
        assert!(out.contains("Cache-Control: no-store\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nnope\n"), "{out}");
    }
}
