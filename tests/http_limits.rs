//! Moat's HTTP listeners under abuse, over real sockets: idle connections (no ClientHello, no
//! request) cannot lock senders out of the MTA-STS policy host or the operator out of the admin
//! API, requests RFC 9112 requires refusing get 400, and refused requests do not flood the log.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;

const POLICY_PORT: u16 = 8443;
const ADMIN_PORT: u16 = 2580;

fn moat_with_policy_host() -> (Moat, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, leaves) = make_certs(dir.path(), &["mta-sts.moat.test"]);
    let extra = format!(
        "[mta_sts]\nlisten = [\"127.0.15.1:{POLICY_PORT}\"]\n\n[[mta_sts.policy]]\ndomain = \"moat.test\"\nmode = \"enforce\"\nmx = [\"mx.moat.test\"]\nmax_age = 86400\ncert = \"{}\"\nkey = \"{}\"\n\n[admin]\nlisten = \"127.0.15.1:{ADMIN_PORT}\"\n",
        leaves[0].0.display(),
        leaves[0].1.display()
    );
    (Moat::start_with("127.0.15.1", &extra, ""), dir)
}

/// GET over HTTPS (any certificate): the status line, or the error.
fn fetch_policy(addr: SocketAddr) -> Result<String, String> {
    let config = client_config(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let name = ServerName::try_from("mta-sts.moat.test").unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::clone(&config), name).map_err(|e| e.to_string())?;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.moat.test\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    if text.is_empty() {
        return Err("no response".into());
    }
    Ok(text)
}

/// One plain HTTP request; the whole response.
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn idle_connections_do_not_lock_out_the_policy_host_or_the_admin_api() {
    let (m, _dir) = moat_with_policy_host();
    let policy: SocketAddr = format!("127.0.15.1:{POLICY_PORT}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.15.1:{ADMIN_PORT}").parse().unwrap();
    let ok = fetch_policy(policy).unwrap();
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("mode: enforce"),
        "{ok}"
    );

    // 600 idle connections from one address: more than the host's 512 slots.
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(TcpStream::connect(policy).unwrap());
    }
    // 100 to the admin API, whose 64 slots they would all take.
    for _ in 0..100 {
        idle.push(TcpStream::connect(admin).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        let r = fetch_policy(policy).unwrap_or_else(|e| panic!("fetch {i} under a flood: {e}"));
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let token = std::fs::read_to_string(m.data().join("admin.token")).unwrap();
    let r = raw(
        admin,
        format!(
            "GET /api/health HTTP/1.1\r\nHost: 127.0.15.1\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        )
        .as_bytes(),
    );
    assert!(
        r.starts_with("HTTP/1.1 200"),
        "admin API under a flood: {r}"
    );
    drop(idle);

    // Requests that RFC 9112 / 9110 require refusing.
    for bad in [
        &b"POST /api/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"GET /api/health HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\n\r\n",
    ] {
        let r = raw(admin, bad);
        assert!(r.starts_with("HTTP/1.1 400"), "{:?} -> {r}", String::from_utf8_lossy(bad));
    }

    // 200 requests without a token: each refused, the log says so only a few times.
    for _ in 0..200 {
        let r = raw(
            admin,
            b"GET /api/health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    let warned = m
        .log()
        .lines()
        .filter(|l| l.contains("admin API: request without a valid token"))
        .count();
    assert!(
        (1..=10).contains(&warned),
        "{warned} warnings for 200 refused requests"
    );
}
