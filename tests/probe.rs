//! `moat probe` as a user runs it: the real binary against a real Moat server with certificates
//! from a test CA (valid, for another name, expired, expiring soon, untrusted), and against
//! small scripted peers on loopback (no STARTTLS, a refused banner, EHLO refused, bytes
//! injected after the STARTTLS 220), a closed port and a name that does not resolve.
//!
//! Addresses: 127.0.60.x, one per test, so the tests run in parallel.
//!
//! Also: a self-signed certificate that says CA:TRUE (what `openssl req -x509` makes) is an
//! untrusted issuer like any other self-signed one, never a debug string.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use serde_json::Value;

/// Exit status, standard output and standard error of `moat probe ARGS`.
fn probe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("probe")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `moat probe ARGS --json`, parsed.
fn probe_json(args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = probe(&all);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, v)
}

fn kinds(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

/// A Moat server on `ip` with the certificate `(cert, key)`.
fn moat_with_cert(ip: &str, leaf: &(std::path::PathBuf, std::path::PathBuf)) -> Moat {
    let extra = format!(
        "[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
        leaf.0.display(),
        leaf.1.display()
    );
    Moat::start_with(ip, &extra, "")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const DAY: i64 = 86_400;

#[test]
fn valid_certificate_passes_over_starttls_and_implicit_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mx.moat.test"]);
    let ca = ca.to_str().unwrap();
    let m = moat_with_cert("127.0.60.1", &leaves[0]);
    let target = m.addr(SMTP).to_string();

    let (code, out, err) = probe(&[&target, "--name", "mx.moat.test", "--ca-file", ca]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "Probing 127.0.60.1:2525\n",
        "  S: 220 mx.moat.test",
        "  C: STARTTLS",
        "  S: 220 2.0.0",
        "  -- TLS handshake: TLSv1.3",
        "  connect     127.0.60.1:2525 ok",
        "  banner      220 mx.moat.test",
        "  starttls    220 2.0.0",
        "  tls         TLSv1.3 TLS_AES_",
        "SAN mx.moat.test  issuer CN=Moat Test CA  valid ",
        "days left)  EC P-256",
        "  verify      ok for mx.moat.test",
        "  note        AUTH PLAIN LOGIN offered only inside TLS",
        "PASS  127.0.60.1:2525 offers STARTTLS with a certificate valid for mx.moat.test\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let ehlo = out.lines().find(|l| l.starts_with("  ehlo  ")).unwrap();
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let ehlo_tls = out.lines().find(|l| l.starts_with("  ehlo (tls)")).unwrap();
    assert!(ehlo_tls.contains("AUTH PLAIN LOGIN"), "{ehlo_tls}");
    assert!(!out.contains("FAIL") && !out.contains("WARN"), "{out}");

    let (code, v) = probe_json(&[&target, "--name", "mx.moat.test", "--ca-file", ca]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["verdict"], "pass");
    assert_eq!(v["target"], "127.0.60.1:2525");
    assert_eq!(v["address"], "127.0.60.1:2525");
    assert_eq!(v["expected_name"], "mx.moat.test");
    assert_eq!(v["implicit_tls"], false);
    assert_eq!(v["banner"]["code"], 220);
    assert_eq!(v["starttls"]["code"], 220);
    assert!(v["after_starttls"].is_null());
    assert!(
        v["capabilities"]
            .as_array()
            .unwrap()
            .contains(&"STARTTLS".into())
    );
    assert!(
        v["capabilities_tls"]
            .as_array()
            .unwrap()
            .contains(&"AUTH PLAIN LOGIN".into())
    );
    let tls = &v["tls"];
    assert_eq!(tls["version"], "TLSv1.3");
    assert!(tls["cipher"].as_str().unwrap().starts_with("TLS_"));
    assert!(tls["bits"] == 128 || tls["bits"] == 256, "{tls}");
    assert_eq!(tls["sni"], "mx.moat.test");
    let leaf = &tls["chain"][0];
    assert_eq!(leaf["dns_names"], serde_json::json!(["mx.moat.test"]));
    assert_eq!(leaf["issuer"], "CN=Moat Test CA");
    assert_eq!(leaf["self_signed"], false);
    assert_eq!(leaf["key"], "EC P-256");
    assert!(leaf["days_left"].as_i64().unwrap() > 300, "{leaf}");
    assert!(leaf["not_after"].as_str().unwrap().ends_with('Z'), "{leaf}");
    let verify = &tls["verification"];
    assert_eq!(verify["result"], "verified");
    assert_eq!(verify["chain_trusted"], true);
    assert_eq!(verify["name_matches"], true);
    assert_eq!(v["failures"], serde_json::json!([]));
    assert_eq!(v["quit"]["code"], 221);

    // Implicit TLS: the handshake first, then banner and EHLO inside TLS.
    let smtps = m.addr(SMTPS).to_string();
    let args = [
        smtps.as_str(),
        "--implicit-tls",
        "--name",
        "mx.moat.test",
        "--ca-file",
        ca,
    ];
    let (code, out, _) = probe(&args);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "PASS  127.0.60.1:2465 offers implicit TLS with a certificate valid for mx.moat.test"
        ),
        "{out}"
    );
    let (code, v) = probe_json(&args);
    assert_eq!(code, 0);
    assert_eq!(v["implicit_tls"], true);
    assert!(v["ehlo"].is_null() && v["starttls"].is_null());
    assert_eq!(v["banner"]["code"], 220);
    assert_eq!(v["ehlo_tls"]["code"], 250);
    assert_eq!(v["tls"]["verification"]["result"], "verified");

    // An IP address without --name: the chain is checked, the name is not (a warning).
    let (code, out, _) = probe(&[&target, "--ca-file", ca]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain ok; name not checked"), "{out}");
    assert!(out.contains("WARN  name not checked"), "{out}");
    assert!(out.contains("(name not checked)"), "{out}");
}

#[test]
fn wrong_name_untrusted_issuer_and_wrong_port_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mx.moat.test"]);
    let ca = ca.to_str().unwrap();
    let m = moat_with_cert("127.0.60.2", &leaves[0]);
    let target = m.addr(SMTP).to_string();

    let (code, out, _) = probe(&[&target, "--name", "wrong.example", "--ca-file", ca]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("  verify      FAILED: not valid for wrong.example"),
        "{out}"
    );
    assert!(
        out.contains(
            "FAIL  wrong name: the certificate is issued to mx.moat.test, not wrong.example"
        ),
        "{out}"
    );
    assert!(!out.contains("PASS"), "{out}");
    let (code, v) = probe_json(&[&target, "--name", "wrong.example", "--ca-file", ca]);
    assert_eq!(code, 1);
    assert_eq!(v["verdict"], "fail");
    assert_eq!(kinds(&v, "failures"), ["name_mismatch"]);
    assert_eq!(v["tls"]["verification"]["result"], "trusted");
    assert_eq!(v["tls"]["verification"]["chain_trusted"], true);
    assert_eq!(v["tls"]["verification"]["name_matches"], false);
    // The session still went on inside TLS.
    assert_eq!(v["ehlo_tls"]["code"], 250);

    // Without the test CA the chain leads nowhere; the issuer is named.
    let (code, out, _) = probe(&[&target, "--name", "mx.moat.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  untrusted issuer: the certificate is issued by CN=Moat Test CA"),
        "{out}"
    );
    let (_, v) = probe_json(&[&target, "--name", "mx.moat.test"]);
    assert_eq!(kinds(&v, "failures"), ["untrusted_issuer"]);
    assert_eq!(v["tls"]["verification"]["result"], "untrusted");
    assert_eq!(v["tls"]["verification"]["name_matches"], true);

    // Untrusted and the wrong name: both are reported.
    let (_, v) = probe_json(&[&target, "--name", "wrong.example"]);
    assert_eq!(kinds(&v, "failures"), ["untrusted_issuer", "name_mismatch"]);

    // Implicit TLS on the STARTTLS port: the server answers in plaintext.
    let (code, out, _) = probe(&[&target, "--implicit-tls", "--timeout", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  TLS handshake failed: the server does not speak TLS on this port"),
        "{out}"
    );
    // STARTTLS on the implicit-TLS port: no banner comes before a handshake.
    let smtps = m.addr(SMTPS).to_string();
    let (code, out, _) = probe(&[&smtps, "--timeout", "1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  timed out waiting for the banner: no answer within 1 s")
            && out.contains("try --implicit-tls"),
        "{out}"
    );
}

#[test]
fn expired_and_expiring_certificates() {
    let now = unix_now();
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf) = make_cert_valid(dir.path(), "mx.moat.test", now - 400 * DAY, now - 10 * DAY);
    let ca = ca.to_str().unwrap().to_string();
    let m = moat_with_cert("127.0.60.3", &leaf);
    let target = m.addr(SMTP).to_string();
    let (code, out, _) = probe(&[&target, "--name", "mx.moat.test", "--ca-file", &ca]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(expired 10 days ago)"), "{out}");
    assert!(
        out.contains("FAIL  expired: the certificate expired on ") && out.contains("(10 days ago)"),
        "{out}"
    );
    let (_, v) = probe_json(&[&target, "--name", "mx.moat.test", "--ca-file", &ca]);
    assert_eq!(kinds(&v, "failures"), ["expired"]);
    assert_eq!(v["tls"]["chain"][0]["days_left"], -10);
    drop(m);

    let dir2 = tempfile::tempdir().unwrap();
    let (ca, leaf) = make_cert_valid(
        dir2.path(),
        "mx.moat.test",
        now - 80 * DAY,
        now + 5 * DAY + 3600,
    );
    let ca = ca.to_str().unwrap().to_string();
    let m = moat_with_cert("127.0.60.4", &leaf);
    let target = m.addr(SMTP).to_string();
    let (code, out, _) = probe(&[&target, "--name", "mx.moat.test", "--ca-file", &ca]);
    assert_eq!(code, 0, "expiring soon is a warning: {out}");
    assert!(
        out.contains("WARN  the certificate expires in 5 days"),
        "{out}"
    );
    assert!(out.contains("PASS  "), "{out}");
    let (_, v) = probe_json(&[&target, "--name", "mx.moat.test", "--ca-file", &ca]);
    assert_eq!(kinds(&v, "warnings"), ["expires_soon"]);
}

/// Reads one line (to LF) a byte at a time, so nothing after it is consumed.
fn read_line(s: &mut impl Read) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    return Some(String::from_utf8_lossy(&line).trim_end().to_string());
                }
            }
            _ => return None,
        }
    }
}

/// A plaintext peer on `ip`: sends `banner`, then answers each command with the reply of the
/// first entry whose prefix it starts with ("" matches anything); QUIT gets 221 and a close.
fn scripted_peer(
    ip: &str,
    banner: &'static str,
    script: Vec<(&'static str, &'static str)>,
) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(banner.as_bytes());
            while let Some(line) = read_line(&mut s) {
                if line.eq_ignore_ascii_case("QUIT") {
                    let _ = s.write_all(b"221 2.0.0 bye\r\n");
                    break;
                }
                let reply = script
                    .iter()
                    .find(|(p, _)| line.to_ascii_uppercase().starts_with(p))
                    .map(|(_, r)| *r)
                    .unwrap_or("500 5.5.1 unknown command\r\n");
                let _ = s.write_all(reply.as_bytes());
            }
        }
    });
    addr
}

#[test]
fn plaintext_peers_and_connection_failures() {
    let ip = "127.0.60.5";
    let plain = scripted_peer(
        ip,
        "220 plain.test ESMTP\r\n",
        vec![(
            "EHLO",
            "250-plain.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n",
        )],
    );
    let (code, out, _) = probe(&[&plain.to_string(), "--timeout", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  STARTTLS not offered: TLS is not enabled on this MTA"),
        "{out}"
    );
    assert!(out.contains("  C: QUIT\n  S: 221 2.0.0 bye"), "{out}");
    assert!(
        out.contains("WARN  AUTH PLAIN is offered before STARTTLS"),
        "{out}"
    );
    let (_, v) = probe_json(&[&plain.to_string(), "--timeout", "5"]);
    assert_eq!(kinds(&v, "failures"), ["starttls_not_offered"]);
    assert!(v["tls"].is_null());

    // EHLO refused: HELO, then no extensions at all.
    let old = scripted_peer(
        ip,
        "220 old.test SMTP\r\n",
        vec![("HELO", "250 old.test\r\n")],
    );
    let (code, v) = probe_json(&[
        &old.to_string(),
        "--helo",
        "probe.example",
        "--timeout",
        "5",
    ]);
    assert_eq!(code, 1);
    assert_eq!(v["ehlo"]["code"], 500);
    assert_eq!(v["helo"]["code"], 250);
    assert!(
        v["transcript"]
            .as_array()
            .unwrap()
            .contains(&"C: HELO probe.example".into()),
        "{v:#}"
    );
    assert_eq!(kinds(&v, "failures"), ["starttls_not_offered"]);

    // STARTTLS offered, then refused.
    let refusing = scripted_peer(
        ip,
        "220 half.test ESMTP\r\n",
        vec![
            ("EHLO", "250-half.test\r\n250 STARTTLS\r\n"),
            (
                "STARTTLS",
                "454 4.7.0 TLS not available due to local problem\r\n",
            ),
        ],
    );
    let (code, out, _) = probe(&[&refusing.to_string(), "--timeout", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "FAIL  the server offers STARTTLS but refused it: \"454 4.7.0 TLS not available"
        ),
        "{out}"
    );
    assert!(out.contains("WARN  no PIPELINING"), "{out}");

    // A refusing banner.
    let busy = scripted_peer(ip, "554 5.3.2 busy.test no service\r\n", vec![]);
    let (code, out, _) = probe(&[&busy.to_string(), "--timeout", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "FAIL  the server greeted with \"554 5.3.2 busy.test no service\" instead of 220"
        ),
        "{out}"
    );

    // Nothing listening.
    let closed = {
        let l = TcpListener::bind((ip, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let (code, out, _) = probe(&[&closed.to_string(), "--timeout", "5"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL  connection refused: nothing listens on {closed}, or a firewall rejects it"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("  connect     {closed} refused")),
        "{out}"
    );
    let (_, v) = probe_json(&[&closed.to_string()]);
    assert_eq!(kinds(&v, "failures"), ["connection_refused"]);
    assert_eq!(v["connect"][0]["result"], "refused");

    // A name that does not resolve (RFC 6761 reserves .invalid).
    let (code, v) = probe_json(&["no-such-host.invalid", "--timeout", "10"]);
    assert_eq!(code, 1);
    let k = kinds(&v, "failures");
    assert!(k == ["dns_failure"] || k == ["timeout"], "{v:#}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["mx.example.com:99999"],
        vec!["mx.example.com:"],
        vec!["[::1"],
        vec!["bad host"],
        vec!["127.0.0.1", "--ca-file", "/nonexistent/ca.pem"],
        vec!["127.0.0.1", "--helo", "two words"],
        vec!["127.0.0.1", "--timeout", "0"],
        vec![],
    ] {
        let (code, out, err) = probe(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
}

/// The server side of one TLS session with `leaf`; TLS 1.2 only with `tls12_only`.
fn tls_server(
    leaf: &(std::path::PathBuf, std::path::PathBuf),
    tls12_only: bool,
) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.0)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&leaf.1).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// A STARTTLS peer with a certificate for inject.moat.test from a test CA; returns its address
/// and the CA file. It sends `after_220` in the same write as its STARTTLS 220 (what a man in
/// the middle would inject), then does the handshake and answers EHLO inside TLS.
fn starttls_peer(
    ip: &str,
    dir: &Path,
    after_220: &'static [u8],
    tls12_only: bool,
) -> (SocketAddr, String) {
    let (ca, leaves) = make_certs(dir, &["inject.moat.test"]);
    let config = tls_server(&leaves[0], tls12_only);
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(b"220 inject.moat.test ESMTP\r\n");
            let _ = read_line(&mut s);
            let _ = s.write_all(b"250-inject.moat.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n");
            let _ = read_line(&mut s);
            let _ = s.write_all(&[&b"220 2.0.0 Ready to start TLS\r\n"[..], after_220].concat());
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, s);
            while let Some(line) = read_line(&mut tls) {
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-inject.moat.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"
                } else {
                    b"221 2.0.0 bye\r\n"
                };
                let _ = tls.write_all(reply);
                let _ = tls.flush();
                if line == "QUIT" {
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    break;
                }
            }
        }
    });
    (addr, ca.to_str().unwrap().to_string())
}

#[test]
fn bytes_after_the_starttls_220_are_reported_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = starttls_peer(
        "127.0.60.6",
        dir.path(),
        b"250-injected.example\r\n250 AUTH PLAIN\r\n",
        false,
    );
    let target = addr.to_string();
    let args = [
        target.as_str(),
        "--name",
        "inject.moat.test",
        "--ca-file",
        &ca,
        "--timeout",
        "5",
    ];
    let (code, out, _) = probe(&args);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("  injected    250-injected.example\\r\\n250 AUTH PLAIN\\r\\n"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  the server sent 38 bytes after its 220 to STARTTLS")
            && out.contains("CVE-2021-38371"),
        "{out}"
    );
    // The handshake and the session inside TLS went on; the injected lines were not used.
    assert!(
        out.contains("  verify      ok for inject.moat.test"),
        "{out}"
    );
    let (_, v) = probe_json(&args);
    assert_eq!(kinds(&v, "failures"), ["injection"]);
    assert_eq!(v["ehlo_tls"]["lines"][0], "inject.moat.test");
    assert_eq!(v["quit"]["code"], 221);
}

#[test]
fn tls12_only_server_passes_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = starttls_peer("127.0.60.7", dir.path(), b"", true);
    let target = addr.to_string();
    let args = [
        target.as_str(),
        "--name",
        "inject.moat.test",
        "--ca-file",
        &ca,
        "--timeout",
        "5",
    ];
    let (code, out, _) = probe(&args);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  tls         TLSv1.2 TLS_ECDHE_"), "{out}");
    assert!(
        out.contains("WARN  the server negotiated TLS 1.2: it does not support TLS 1.3"),
        "{out}"
    );
    let (_, v) = probe_json(&args);
    assert_eq!(kinds(&v, "warnings"), ["no_tls13"]);
    assert!(v["after_starttls"].is_null());
}

/// Writes a self-signed certificate for `name` (CA:TRUE when `ca`, as `openssl req -x509`
/// makes by default) and its key under `dir`.
fn write_self_signed(dir: &Path, name: &str, ca: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Rust debug formatting that must never reach a person.
fn assert_no_debug(text: &str) {
    for bad in [
        "Other(",
        "OtherError",
        "CaUsedAsEndEntity",
        "UnknownIssuer",
        "::",
        "{ ",
    ] {
        assert!(!text.contains(bad), "{bad:?} in\n{text}");
    }
}

#[test]
fn self_signed_ca_true_certificate_is_an_untrusted_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let ca_true = write_self_signed(dir.path(), "mx.moat.test", true);
    let ca_false = write_self_signed(dir.path(), "plain.moat.test", false);
    let mut extra = String::new();
    for (c, k) in [&ca_true, &ca_false] {
        extra.push_str(&format!(
            "[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    let m = Moat::start_with("127.0.60.8", &extra, "");
    let target = m.addr(SMTP).to_string();
    let ca_words = "untrusted issuer: the certificate is self-signed (CN=mx.moat.test) and marked \
                    as a CA certificate (CA:TRUE), which is never accepted as a server's own \
                    certificate, trusted or not; the server needs a certificate from a CA that \
                    senders trust";

    // CA:TRUE: the untrusted-issuer kind and the self-signed words, in text and in JSON.
    let (code, out, err) = probe(&[&target, "--name", "mx.moat.test", "--timeout", "10"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("FAIL  {ca_words}\n")), "{out}");
    assert_no_debug(&out);
    let (code, v) = probe_json(&[&target, "--name", "mx.moat.test", "--timeout", "10"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(kinds(&v, "failures"), ["untrusted_issuer"], "{v:#}");
    assert_eq!(v["failures"][0]["message"], ca_words);
    let verify = &v["tls"]["verification"];
    assert_eq!(verify["result"], "untrusted");
    assert_eq!(verify["chain_trusted"], false);
    assert_eq!(verify["chain_problem"], ca_words);
    assert_eq!(verify["name_matches"], true);
    assert_eq!(v["tls"]["chain"][0]["self_signed"], true);
    assert_no_debug(&v.to_string());

    // Trusting it does not help: a CA certificate is never a server's own.
    let ca_file = ca_true.0.to_str().unwrap();
    let (code, v) = probe_json(&[
        &target,
        "--name",
        "mx.moat.test",
        "--ca-file",
        ca_file,
        "--timeout",
        "10",
    ]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(kinds(&v, "failures"), ["untrusted_issuer"], "{v:#}");
    assert_eq!(v["failures"][0]["message"], ca_words);

    // CA:FALSE, chosen by SNI on the same server: the same kind, and --ca-file makes it pass.
    let plain_words = "untrusted issuer: the certificate is self-signed (CN=plain.moat.test); \
                       the server needs a certificate from a CA that senders trust; give it \
                       with --ca-file if you trust it";
    let (code, out, _) = probe(&[&target, "--name", "plain.moat.test", "--timeout", "10"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("FAIL  {plain_words}\n")), "{out}");
    assert_no_debug(&out);
    let (_, v) = probe_json(&[&target, "--name", "plain.moat.test", "--timeout", "10"]);
    assert_eq!(kinds(&v, "failures"), ["untrusted_issuer"], "{v:#}");
    assert_eq!(v["failures"][0]["message"], plain_words);
    let plain_file = ca_false.0.to_str().unwrap();
    let (code, out, _) = probe(&[
        &target,
        "--name",
        "plain.moat.test",
        "--ca-file",
        plain_file,
        "--timeout",
        "10",
    ]);
    assert_eq!(code, 0, "{out}");
}
