//! MTA-STS end to end on loopback: a sending Moat looks up `_mta-sts` TXT records on a real
//! DNS server, fetches policies over real HTTPS (a test CA) from a scriptable policy server or
//! from another Moat's built-in policy host, and delivers to real receivers (Moat instances with
//! good and bad certificates, a plaintext-only peer), or defers and bounces with 4.4.8/5.4.8 and
//! 4.7.5/5.7.5. Also: fetch failures (redirect, media type, size, syntax, policy host
//! certificate), testing mode, and the cache across DNS failures, restarts and id changes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::dns::{Rr, serve_dynamic, serve_zone};
use common::https::{PolicyServer, ok_response};
use common::*;

const POLICY_PORT: u16 = 8443;

/// Sender config: relays for loopback, DNS and SMTP port pointing at the test world, policies
/// fetched from port 8443 with the test CA trusted.
fn sender_extra(dns: SocketAddr, ca: &Path, queue: &str) -> String {
    format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [1]\n{queue}\n\n[mta_sts]\nfetch_port = {POLICY_PORT}\nfetch_timeout_secs = 5\nca_file = \"{}\"\n",
        ca.display()
    )
}

/// A receiving Moat for `domain` with the certificate `identity`.
fn receiver(
    ip: &str,
    domain: &str,
    identity: &(std::path::PathBuf, std::path::PathBuf),
    more: &str,
) -> Moat {
    let extra = format!("{}\n{more}", maildir_receiver(domain, identity));
    Moat::start_with(ip, &extra, "")
}

/// Runs `moat sts check` against the test world; returns (exit code, stdout).
fn sts_check(domain: &str, dns: SocketAddr, ca: &Path, json: bool) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.args(["sts", "check", domain, "--nameserver"])
        .arg(dns.to_string())
        .args([
            "--policy-port",
            &POLICY_PORT.to_string(),
            "--smtp-port",
            "2525",
            "--timeout",
            "5",
            "--ca-file",
        ])
        .arg(ca);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn policy(mode: &str, mx: &[&str]) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p.push_str("max_age: 86400\r\n");
    p
}

#[test]
fn enforce_policy_from_moats_own_policy_host_delivers_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mx.good.test", "mta-sts.good.test"]);
    let dns = serve_zone(
        "127.0.12.53",
        "good.test",
        &[
            Rr::Mx("good.test", 10, "mx.good.test"),
            Rr::A("mx.good.test", [127, 0, 12, 11]),
            Rr::A("mta-sts.good.test", [127, 0, 12, 11]),
            Rr::Txt("_mta-sts.good.test", "v=STSv1; id=20261123000000Z;"),
        ],
    );
    // The receiver publishes the policy itself; its mx list defaults to the names it serves.
    let host = format!(
        "[mta_sts]\nlisten = [\"127.0.12.11:{POLICY_PORT}\"]\n\n[[mta_sts.policy]]\ndomain = \"good.test\"\nmode = \"enforce\"\nmax_age = 86400\ncert = \"{}\"\nkey = \"{}\"\n",
        leaves[1].0.display(),
        leaves[1].1.display()
    );
    let receiver = receiver("127.0.12.11", "good.test", &leaves[0], &host);
    let sender = Moat::start_with("127.0.12.1", &sender_extra(dns, &ca, ""), "");
    submit(
        &sender,
        "alice@moat.test",
        &["bob@good.test"],
        "sts-enforce",
    );
    let mail = wait_for("delivery under enforce", Duration::from_secs(20), || {
        receiver.mailbox("bob").into_iter().next()
    });
    assert!(mail.contains("with ESMTPS"), "{mail}");
    let log = sender.log();
    assert!(
        log.contains("MTA-STS policy fetched") && log.contains("mode=\"enforce\""),
        "{log}"
    );
    assert!(log.contains("mta_sts=true"), "{log}");
    assert!(
        log.contains("MTA-STS enforce (id 20261123000000Z, fetched)"),
        "{log}"
    );
    // The cache file survives in the data dir.
    let cached = std::fs::read_to_string(sender.data().join("sts/good.test.json")).unwrap();
    assert!(cached.contains("mode: enforce"), "{cached}");
    assert!(cached.contains("mx: mx.good.test"), "{cached}");

    // The domain owner's check passes, in words and in JSON.
    let (code, out) = sts_check("good.test", dns, &ca, false);
    assert_eq!(code, 0, "{out}");
    for line in [
        "PASS  txt",
        "PASS  fetch  https://mta-sts.good.test/.well-known/mta-sts.txt: 200, text/plain",
        "PASS  policy mode enforce",
        "PASS  mx     mx.good.test is covered by the policy",
        "PASS  tls    mx.good.test [127.0.12.11]: STARTTLS, TLSv1.3",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    let (code, out) = sts_check("good.test", dns, &ca, true);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["domain"], "good.test");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["status"] != "fail")
    );
    assert!(v["policy"].as_str().unwrap().contains("mode: enforce"));
}

/// One broken destination per case, each with its own policy host.
struct Case {
    domain: &'static str,
    mx_host: &'static str,
    mx_ip: [u8; 4],
    policy_ip: [u8; 4],
    policy: String,
}

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

#[test]
fn enforce_failures_defer_with_4_4_8_and_4_7_5_and_bounce_with_5_x() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(
        dir.path(),
        &[
            "mta-sts.mismatch.bad.test",
            "mta-sts.deep.bad.test",
            "mta-sts.name.bad.test",
            "mta-sts.expired.bad.test",
            "mta-sts.plain.bad.test",
            "mta-sts.untrusted.bad.test",
            "somewhere-else.test",
            "mx.mismatch.bad.test",
            "a.b.deep.bad.test",
        ],
    );
    let other_dir = tempfile::tempdir().unwrap();
    let (_other_ca, other_leaves) =
        make_certs_named(other_dir.path(), "Unknown CA", &["mx.untrusted.bad.test"]);
    let expired_dir = tempfile::tempdir().unwrap();
    let (expired_ca, expired) = make_cert_valid(
        expired_dir.path(),
        "mx.expired.bad.test",
        978_307_200,
        1_000_000_000,
    );
    // The sender trusts both test CAs, so "expired" is the only fault of that certificate.
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&ca).unwrap() + &std::fs::read_to_string(&expired_ca).unwrap(),
    )
    .unwrap();

    let cases = [
        Case {
            domain: "mismatch.bad.test",
            mx_host: "mx.mismatch.bad.test",
            mx_ip: [127, 0, 12, 41],
            policy_ip: [127, 0, 12, 31],
            policy: policy("enforce", &["mx.elsewhere.test"]),
        },
        Case {
            domain: "deep.bad.test",
            mx_host: "a.b.deep.bad.test",
            mx_ip: [127, 0, 12, 42],
            policy_ip: [127, 0, 12, 32],
            policy: policy("enforce", &["*.deep.bad.test"]),
        },
        Case {
            domain: "name.bad.test",
            mx_host: "mx.name.bad.test",
            mx_ip: [127, 0, 12, 43],
            policy_ip: [127, 0, 12, 33],
            // `mode` and `max_age` given twice: RFC 8461 §3.2 says the first counts. Dropping
            // the policy for it would deliver to this wrong-name MX (a downgrade).
            policy: "version: STSv1\r\nmode: enforce\r\nmode: testing\r\nmx: mx.name.bad.test\r\nmax_age: 86400\r\nmax_age: 1\r\n".to_string(),
        },
        Case {
            domain: "expired.bad.test",
            mx_host: "mx.expired.bad.test",
            mx_ip: [127, 0, 12, 44],
            policy_ip: [127, 0, 12, 34],
            policy: policy("enforce", &["*.expired.bad.test"]),
        },
        Case {
            domain: "plain.bad.test",
            mx_host: "mx.plain.bad.test",
            mx_ip: [127, 0, 12, 45],
            policy_ip: [127, 0, 12, 35],
            policy: policy("enforce", &["mx.plain.bad.test"]),
        },
        Case {
            domain: "untrusted.bad.test",
            mx_host: "mx.untrusted.bad.test",
            mx_ip: [127, 0, 12, 46],
            policy_ip: [127, 0, 12, 36],
            policy: policy("enforce", &["mx.untrusted.bad.test"]),
        },
    ];
    let mut records = Vec::new();
    let txt: Vec<String> = cases
        .iter()
        .map(|c| format!("_mta-sts.{}", c.domain))
        .collect();
    let sts_hosts: Vec<String> = cases
        .iter()
        .map(|c| format!("mta-sts.{}", c.domain))
        .collect();
    for (i, c) in cases.iter().enumerate() {
        records.push(Rr::Mx(c.domain, 10, c.mx_host));
        records.push(Rr::A(c.mx_host, c.mx_ip));
        records.push(Rr::A(&sts_hosts[i], c.policy_ip));
        records.push(Rr::Txt(&txt[i], "v=STSv1; id=1;"));
    }
    let dns = serve_zone("127.0.12.53", "bad.test", &records);
    let mut servers = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let s = PolicyServer::start(&format!("{}:{POLICY_PORT}", ip(c.policy_ip)), &leaves[i]);
        s.set_policy(&c.policy);
        servers.push(s);
    }
    // Receivers: right name and CA (but the MX is not in the policy), a certificate for
    // another name, an expired one, plaintext only, another CA.
    let _r1 = receiver("127.0.12.41", "mismatch.bad.test", &leaves[7], "");
    let _r2 = receiver("127.0.12.42", "deep.bad.test", &leaves[8], "");
    let _r3 = receiver("127.0.12.43", "name.bad.test", &leaves[6], "");
    let _r4 = receiver("127.0.12.44", "expired.bad.test", &expired, "");
    plain_peer("127.0.12.45");
    let _r6 = receiver("127.0.12.46", "untrusted.bad.test", &other_leaves[0], "");

    let sender = Moat::start_with(
        "127.0.12.2",
        &sender_extra(
            dns,
            &both,
            "security_lifetime_secs = 3600\nmax_lifetime_secs = 3600",
        ),
        "",
    );
    let expect = [
        (
            "4.4.8",
            "MX hosts of mismatch.bad.test failed MTA-STS validation",
        ),
        (
            "4.4.8",
            "MX hosts of deep.bad.test failed MTA-STS validation",
        ),
        (
            "4.7.5",
            "Remote certificate failed MTA-STS validation. Reason: name mismatch",
        ),
        (
            "4.7.5",
            "Remote certificate failed MTA-STS validation. Reason: expired",
        ),
        (
            "4.7.5",
            "Remote certificate failed MTA-STS validation. Reason: starttls not offered",
        ),
        (
            "4.7.5",
            "Remote certificate failed MTA-STS validation. Reason: untrusted",
        ),
    ];
    let mut ids = Vec::new();
    for c in &cases {
        ids.push(submit(
            &sender,
            "alice@moat.test",
            &[&format!("rcpt@{}", c.domain)],
            c.domain,
        ));
    }
    for (id, (code, text)) in ids.iter().zip(expect) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let shown = loop {
            let last = moat_cli(&sender, &["queue", "show", id]).1;
            if last.contains(code) && last.contains(text) {
                break last;
            }
            assert!(Instant::now() < deadline, "no {code} {text:?} in:\n{last}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(shown.contains("MTA-STS enforce (id 1"), "{shown}");
    }
    // The owner's check names each problem and its fix.
    let (code, out) = sts_check("mismatch.bad.test", dns, &both, false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  mx     mx.mismatch.bad.test matches no mx pattern"),
        "{out}"
    );
    assert!(
        out.contains("fix: add \"mx: mx.mismatch.bad.test\""),
        "{out}"
    );
    let (code, out) = sts_check("name.bad.test", dns, &both, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  tls    mx.name.bad.test"), "{out}");
    assert!(out.contains("somewhere-else.test"), "{out}");
    assert!(
        out.contains("WARN  policy line 3: mode given again (line 2 is used, this one is ignored)"),
        "{out}"
    );
    assert!(
        out.contains("fix: give each of version, mode and max_age once"),
        "{out}"
    );
    assert!(out.contains("mode enforce, max_age 86400"), "{out}");
    let (code, out) = sts_check("plain.bad.test", dns, &both, true);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tls = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "tls")
        .unwrap()
        .clone();
    assert_eq!(tls["status"], "fail");
    assert!(
        tls["detail"].as_str().unwrap().contains("STARTTLS"),
        "{tls}"
    );
    // Nothing reached the plaintext peer or any receiver.
    for (i, c) in cases.iter().enumerate() {
        assert!(servers[i].hits() >= 1, "{} policy never fetched", c.domain);
    }
    // After the retry window the sender gets DSNs with the permanent codes.
    let out = moat_cli(&sender, &["queue", "bounce", "--all"]).1;
    assert!(out.contains("bounced"), "{out}");
    let dsns = wait_for("six DSNs", Duration::from_secs(20), || {
        let m = sender.mailbox("alice");
        (m.len() >= 6).then_some(m)
    });
    let all = dsns.join("\n");
    assert!(
        all.contains("MX hosts of mismatch.bad.test failed MTA-STS validation"),
        "{all}"
    );
    assert!(all.contains("Reason: name mismatch"), "{all}");
    assert!(all.contains("Reason: starttls not offered"), "{all}");
}

#[test]
fn expiry_bounces_with_5_4_8_and_5_7_5() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(
        dir.path(),
        &[
            "mta-sts.nomx.late.test",
            "mta-sts.cert.late.test",
            "wrong.late.test",
        ],
    );
    let dns = serve_zone(
        "127.0.12.54",
        "late.test",
        &[
            Rr::Mx("nomx.late.test", 10, "mx.nomx.late.test"),
            Rr::A("mx.nomx.late.test", [127, 0, 12, 61]),
            Rr::A("mta-sts.nomx.late.test", [127, 0, 12, 62]),
            Rr::Txt("_mta-sts.nomx.late.test", "v=STSv1; id=a1"),
            Rr::Mx("cert.late.test", 10, "mx.cert.late.test"),
            Rr::A("mx.cert.late.test", [127, 0, 12, 63]),
            Rr::A("mta-sts.cert.late.test", [127, 0, 12, 64]),
            Rr::Txt("_mta-sts.cert.late.test", "v=STSv1; id=b2;"),
        ],
    );
    let p1 = PolicyServer::start(&format!("127.0.12.62:{POLICY_PORT}"), &leaves[0]);
    p1.set_policy(&policy("enforce", &["mx.other.late.test"]));
    let p2 = PolicyServer::start(&format!("127.0.12.64:{POLICY_PORT}"), &leaves[1]);
    p2.set_policy(&policy("enforce", &["mx.cert.late.test"]));
    let _r = receiver("127.0.12.63", "cert.late.test", &leaves[2], "");
    let sender = Moat::start_with(
        "127.0.12.3",
        &sender_extra(
            dns,
            &ca,
            "security_lifetime_secs = 3\nmax_lifetime_secs = 3",
        ),
        "",
    );
    submit(&sender, "alice@moat.test", &["x@nomx.late.test"], "nomx");
    submit(&sender, "alice@moat.test", &["y@cert.late.test"], "cert");
    let dsns = wait_for("two DSNs", Duration::from_secs(30), || {
        let m = sender.mailbox("alice");
        (m.len() >= 2).then_some(m)
    });
    let all = dsns.join("\n");
    assert!(all.contains("Status: 5.4.8"), "{all}");
    assert!(all.contains("Status: 5.7.5"), "{all}");
    assert!(all.contains("Reason: name mismatch"), "{all}");
    assert!(all.contains("MTA-STS policy"), "{all}");
}

#[test]
fn testing_mode_delivers_and_reports_what_enforce_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mta-sts.try.test", "not-the-mx.test"]);
    let dns = serve_zone(
        "127.0.12.55",
        "try.test",
        &[
            Rr::Mx("try.test", 10, "mx.try.test"),
            Rr::A("mx.try.test", [127, 0, 12, 71]),
            Rr::A("mta-sts.try.test", [127, 0, 12, 72]),
            Rr::Txt("_mta-sts.try.test", "v=STSv1; id=t1;"),
        ],
    );
    let p = PolicyServer::start(&format!("127.0.12.72:{POLICY_PORT}"), &leaves[0]);
    p.set_policy(&policy("testing", &["mx.try.test"]));
    let receiver = receiver("127.0.12.71", "try.test", &leaves[1], "");
    let sender = Moat::start_with("127.0.12.4", &sender_extra(dns, &ca, ""), "");
    submit(&sender, "alice@moat.test", &["t@try.test"], "testing-mode");
    wait_for("delivery under testing", Duration::from_secs(20), || {
        receiver.mailbox("t").into_iter().next()
    });
    let log = sender.log();
    assert!(
        log.contains("MTA-STS testing: enforce would have refused"),
        "{log}"
    );
    assert!(log.contains("mta_sts=false"), "{log}");
    assert!(log.contains("would fail: name mismatch"), "{log}");
}

#[test]
fn unusable_policies_mean_no_policy() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "mta-sts.redirect.odd.test",
        "mta-sts.html.odd.test",
        "mta-sts.big.odd.test",
        "mta-sts.syntax.odd.test",
        "mta-sts.status.odd.test",
        "www.odd.test",
        "mta-sts.none.odd.test",
    ];
    let (ca, leaves) = make_certs(dir.path(), &names);
    let exp_dir = tempfile::tempdir().unwrap();
    let (exp_ca, exp_leaf) = make_cert_valid(
        exp_dir.path(),
        "mta-sts.expired.odd.test",
        978_307_200,
        1_000_000_000,
    );
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&ca).unwrap() + &std::fs::read_to_string(&exp_ca).unwrap(),
    )
    .unwrap();
    let domains = [
        "redirect",
        "html",
        "big",
        "syntax",
        "status",
        "expired",
        "wrongname",
        "none",
    ];
    let mut owned: Vec<(String, String, String, String)> = Vec::new();
    for d in domains {
        owned.push((
            format!("{d}.odd.test"),
            format!("mx.{d}.odd.test"),
            format!("mta-sts.{d}.odd.test"),
            format!("_mta-sts.{d}.odd.test"),
        ));
    }
    let mut records = Vec::new();
    for (i, (d, mx, sts, txt)) in owned.iter().enumerate() {
        records.push(Rr::Mx(d, 10, mx));
        // Every MX is the same plaintext peer: with no usable policy, delivery is plaintext.
        records.push(Rr::A(mx, [127, 0, 12, 80]));
        records.push(Rr::A(sts, [127, 0, 12, 81 + i as u8]));
        records.push(Rr::Txt(txt, "v=STSv1; id=x;"));
    }
    let dns = serve_zone("127.0.12.56", "odd.test", &records);
    plain_peer("127.0.12.80");
    let good = policy("enforce", &["mx.nowhere.test"]);
    let responses: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 301 Moved\r\nLocation: https://mta-sts.elsewhere.test/.well-known/mta-sts.txt\r\nContent-Length: 0\r\n\r\n".to_vec(),
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{good}",
            good.len()
        )
        .into_bytes(),
        ok_response(&format!("{good}{}", "x-padding: yes\r\n".repeat(5000))),
        ok_response("version: STSv1\r\nmode: enforced\r\nmx: mx.nowhere.test\r\nmax_age: 86400\r\n"),
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ];
    let mut servers = Vec::new();
    for (i, raw) in responses.into_iter().enumerate() {
        let s = PolicyServer::start(&format!("127.0.12.{}:{POLICY_PORT}", 81 + i), &leaves[i]);
        s.set_response(raw);
        servers.push(s);
    }
    let s = PolicyServer::start(&format!("127.0.12.86:{POLICY_PORT}"), &exp_leaf);
    s.set_policy(&good);
    servers.push(s);
    // Signed by the trusted CA, but for another name than mta-sts.wrongname.odd.test.
    let s = PolicyServer::start(&format!("127.0.12.87:{POLICY_PORT}"), &leaves[5]);
    s.set_policy(&good);
    servers.push(s);
    // Mode none, without mx lines: valid (the ABNF requires mx "except when mode is none").
    let s = PolicyServer::start(&format!("127.0.12.88:{POLICY_PORT}"), &leaves[6]);
    s.set_policy("version: STSv1\nmode: none\nmax_age: 86400\n");
    servers.push(s);

    let sender = Moat::start_with("127.0.12.5", &sender_extra(dns, &both, ""), "");
    for (d, ..) in &owned {
        submit(&sender, "alice@moat.test", &[&format!("r@{d}")], d);
    }
    // Every message goes out (in plaintext, to a host no policy names).
    wait_for("all eight delivered", Duration::from_secs(30), || {
        (sender.queue_len() == 0).then_some(())
    });
    let log = sender.log();
    for needle in [
        "forbids following redirects",
        "not text/plain",
        "larger than 65536 bytes",
        "malformed",
        "HTTP 404",
        "expired",
        "is issued to www.odd.test, not mta-sts.wrongname.odd.test",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("MTA-STS policy fetch failed") && l.contains(needle)),
            "no fetch failure with {needle:?}:\n{log}"
        );
    }
    assert!(!log.contains("mta_sts=true"), "{log}");

    // The owner's check reports each fetch problem with its fix.
    for (domain, needle, fix) in [
        (
            "redirect.odd.test",
            "forbids following redirects",
            "never follow redirects",
        ),
        (
            "html.odd.test",
            "not text/plain",
            "Content-Type: text/plain",
        ),
        ("syntax.odd.test", "does not parse", "moat sts generate"),
        ("expired.odd.test", "expired", "unexpired"),
    ] {
        let (code, out) = sts_check(domain, dns, &both, false);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(needle) && out.contains(fix), "{domain}: {out}");
    }
    // Mode none parses and is not faulted for covering no MX host (its MX, a plaintext
    // peer, still fails the TLS check).
    let (_, out) = sts_check("none.odd.test", dns, &both, false);
    assert!(
        out.contains("PASS  policy mode none, max_age 86400"),
        "{out}"
    );
    assert!(out.contains("WARN  policy mode none"), "{out}");
    assert!(
        !out.contains("FAIL  policy") && !out.contains("FAIL  mx"),
        "{out}"
    );
}

#[test]
fn generate_prints_a_policy_and_records_that_parse() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "sts",
            "generate",
            "--domain",
            "example.com",
            "--mx",
            "mx1.example.com",
            "--mx",
            "*.mail.example.com",
            "--mode",
            "enforce",
            "--max-age",
            "86400",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let id = text
        .split("id=")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap();
    assert_eq!(id.len(), 15, "{id}");
    assert!(
        id.ends_with('Z') && id[..14].bytes().all(|b| b.is_ascii_digit()),
        "{id}"
    );
    assert!(id.starts_with("20"), "{id}");
    assert!(
        text.contains("_mta-sts.example.com. 3600 IN TXT \"v=STSv1; id="),
        "{text}"
    );
    assert!(
        text.contains("_smtp._tls.example.com. 3600 IN TXT \"v=TLSRPTv1; rua=mailto:"),
        "{text}"
    );
    let policy: String = text
        .lines()
        .filter(|l| l.starts_with("       ") && l.contains(": ") && !l.contains("IN TXT"))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    let p = moat::sts::policy::parse_policy(policy.as_bytes()).unwrap();
    assert_eq!(p.mode, moat::sts::policy::Mode::Enforce);
    assert_eq!(p.max_age, 86400);
    assert!(p.matches_mx("a.mail.example.com") && p.matches_mx("MX1.example.com."));
    // Bad input is refused with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "sts",
            "generate",
            "--domain",
            "example.com",
            "--mx",
            "a.*.example.com",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a.*.example.com"));
}

#[test]
fn cache_survives_dns_failure_restart_and_removal_and_follows_id_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mta-sts.kept.test", "mx.kept.test"]);
    let dns = serve_dynamic(
        "127.0.12.57",
        "kept.test",
        &[
            Rr::Mx("kept.test", 10, "mx.kept.test"),
            Rr::A("mx.kept.test", [127, 0, 12, 91]),
            Rr::A("mta-sts.kept.test", [127, 0, 12, 92]),
            Rr::Txt("_mta-sts.kept.test", "v=STSv1; id=one;"),
        ],
    );
    let p = PolicyServer::start(&format!("127.0.12.92:{POLICY_PORT}"), &leaves[0]);
    p.set_policy(&policy("enforce", &["mx.kept.test"]));
    let receiver = receiver("127.0.12.91", "kept.test", &leaves[1], "");
    let mut sender = Moat::start_with("127.0.12.6", &sender_extra(dns.addr, &ca, ""), "");
    let deliver = |sender: &Moat, n: usize| {
        submit(
            sender,
            "alice@moat.test",
            &["k@kept.test"],
            &format!("m{n}"),
        );
        wait_for(&format!("message {n}"), Duration::from_secs(20), || {
            (receiver.mailbox("k").len() >= n).then_some(())
        });
    };
    deliver(&sender, 1);
    assert_eq!(p.hits(), 1);
    // Same id: the cached policy is used, nothing is fetched.
    deliver(&sender, 2);
    assert_eq!(p.hits(), 1);
    assert!(sender.log().contains("MTA-STS enforce (id one, cached)"));

    // DNS fails for TXT; the policy host is gone too: the cache still applies.
    dns.fail_txt();
    // Past the TXT record's 1 s TTL in the sender's resolver cache.
    std::thread::sleep(Duration::from_millis(1500));
    p.set_response(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec());
    deliver(&sender, 3);
    assert!(
        sender
            .log()
            .contains("MTA-STS enforce (id one, cached; TXT lookup failed"),
        "{}",
        sender.log()
    );

    // After a restart the policy comes from the cache file.
    sender.kill9();
    sender.spawn();
    deliver(&sender, 4);
    assert!(
        sender
            .log()
            .matches("MTA-STS enforce (id one, cached; TXT lookup failed")
            .count()
            >= 2,
        "{}",
        sender.log()
    );
    assert_eq!(p.hits(), 1);

    // The TXT record is removed: the policy is kept until max_age.
    dns.set_txt(&[]);
    std::thread::sleep(Duration::from_millis(1500));
    deliver(&sender, 5);
    assert!(
        sender
            .log()
            .contains("MTA-STS enforce (id one, cached; no TXT record now)"),
        "{}",
        sender.log()
    );

    // A new id whose policy cannot be fetched: the cached enforce policy still applies.
    dns.set_txt(&[Rr::Txt("_mta-sts.kept.test", "v=STSv1; id=broken;")]);
    std::thread::sleep(Duration::from_millis(1500));
    deliver(&sender, 6);
    assert_eq!(p.hits(), 2);
    assert!(
        sender.log().contains(
            "MTA-STS enforce (id one, cached; policy fetch failed: the policy host answered HTTP 500"
        ),
        "{}",
        sender.log()
    );

    // A new id: fetched again, and the new policy (testing) applies.
    p.set_policy(&policy("testing", &["mx.kept.test"]));
    dns.set_txt(&[Rr::Txt("_mta-sts.kept.test", "v=STSv1; id=two;")]);
    std::thread::sleep(Duration::from_millis(1500));
    deliver(&sender, 7);
    assert_eq!(p.hits(), 3);
    assert!(
        sender.log().contains("MTA-STS testing (id two, fetched)"),
        "{}",
        sender.log()
    );
    let cached = std::fs::read_to_string(sender.data().join("sts/kept.test.json")).unwrap();
    assert!(cached.contains("\"id\": \"two\""), "{cached}");

    // mode none withdraws the policy: the next delivery names none.
    p.set_policy(&policy("none", &[]));
    dns.set_txt(&[Rr::Txt("_mta-sts.kept.test", "v=STSv1; id=three;")]);
    std::thread::sleep(Duration::from_millis(1500));
    deliver(&sender, 8);
    assert_eq!(p.hits(), 4);
    let log = sender.log();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("delivered") && l.contains("k@kept.test"))
        .unwrap();
    assert!(!last.contains("MTA-STS"), "{last}");
    assert!(log.contains("mode=\"none\""), "{log}");
}

#[test]
fn a_hanging_policy_host_is_asked_once_and_mail_still_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mta-sts.slow.test"]);
    let dns = serve_zone(
        "127.0.12.58",
        "slow.test",
        &[
            Rr::Mx("slow.test", 10, "mx.slow.test"),
            Rr::A("mx.slow.test", [127, 0, 12, 101]),
            Rr::A("mta-sts.slow.test", [127, 0, 12, 102]),
            Rr::Txt("_mta-sts.slow.test", "v=STSv1; id=s1;"),
        ],
    );
    let p = PolicyServer::start(&format!("127.0.12.102:{POLICY_PORT}"), &leaves[0]);
    p.hang();
    plain_peer("127.0.12.101");
    let extra =
        sender_extra(dns, &ca, "").replace("fetch_timeout_secs = 5", "fetch_timeout_secs = 2");
    let sender = Moat::start_with("127.0.12.7", &extra, "");
    for i in 0..4 {
        submit(
            &sender,
            "alice@moat.test",
            &[&format!("r{i}@slow.test")],
            &format!("s{i}"),
        );
    }
    wait_for(
        "all four delivered without a policy",
        Duration::from_secs(30),
        || (sender.queue_len() == 0).then_some(()),
    );
    // One fetch, timed out and remembered; the other deliveries did not start their own.
    assert_eq!(p.hits(), 1);
    let log = sender.log();
    assert_eq!(
        log.matches("MTA-STS policy fetch failed").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("fetching the policy took longer than 2s"),
        "{log}"
    );
}
