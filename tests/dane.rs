//! DANE when sending (RFC 7672), end to end on loopback: a sending Moat validates DNSSEC
//! in-process against real signed zones (hickory-server, keys generated at start; the anchor
//! zone's key is the trust anchor), looks up TLSA records per MX host, and delivers to real
//! receivers (Moat instances; a plaintext-only peer) or defers with the DANE codes:
//! 4.7.321 STARTTLS not offered, 4.7.323 no TLSA record matched, 4.7.324 DNSSEC failed,
//! 4.7.325 name mismatch (DANE-TA). Insecure zones, secure zones without TLSA records, and a
//! resolver that cannot validate leave delivery to the rest of the policy.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::signed_dns::{Kind, SignedDns, Srr, serve_signed};
use common::*;

/// The first certificate in a PEM file, as DER.
fn der_of(pem: &Path) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: the data of a `x 1 1` TLSA record,
/// computed here from the certificate (x509-parser, aws-lc-rs), not by Moat's DANE code.
fn spki_sha256(pem: &Path) -> Vec<u8> {
    let der = der_of(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert.tbs_certificate.subject_pki.raw,
    )
    .as_ref()
    .to_vec()
}

/// A file holding the leaf and then its CA: the chain a DANE-TA server must present.
fn chain_file(dir: &Path, leaf: &Path, ca: &Path) -> PathBuf {
    let p = dir.join(format!(
        "chain-{}",
        leaf.file_name().unwrap().to_string_lossy()
    ));
    let mut text = std::fs::read_to_string(leaf).unwrap();
    text.push_str(&std::fs::read_to_string(ca).unwrap());
    std::fs::write(&p, text).unwrap();
    p
}

/// A receiving Moat on `ip` taking mail for `domains`, presenting `cert` (a chain file).
fn receiver(ip: &str, domains: &[&str], cert: &Path, key: &Path) -> Moat {
    let mut extra = String::new();
    for d in domains {
        extra.push_str(&format!(
            "[[domain]]\nname = \"{d}\"\nroute = \"maildir\"\n\n"
        ));
    }
    extra.push_str(&format!(
        "[tls]\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    Moat::start_with(ip, &extra, "")
}

/// The sending Moat: relays for loopback, the signed zones' server as its nameserver, their
/// anchor trusted, and a self-check on names of the test tree; waits until DANE is available.
fn sender(ip: &str, dns: &SignedDns, more: &str) -> Moat {
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = {SMTP}\nnameservers = [\"{}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [1]\n\n[mta_sts]\nenabled = false\n\n[dane]\ntrust_anchor_file = \"{}\"\ncheck_secure = \"dane.test\"\ncheck_bogus = \"mx.bogus.dane.test\"\n\n{more}",
        dns.addr,
        dns.anchor_file.display()
    );
    Moat::start_with(ip, &extra, "")
}

fn wait_dane_available(m: &Moat) {
    wait_for("DANE self-check", Duration::from_secs(20), || {
        m.log().contains("DANE available").then_some(())
    });
}

/// The first `delivery attempt` log line for `host`.
fn attempt_line(log: &str, host: &str) -> String {
    log.lines()
        .find(|l| l.contains("delivery attempt") && l.contains(&format!("host=\"{host}\"")))
        .unwrap_or_else(|| panic!("no attempt to {host}: {log}"))
        .to_string()
}

/// Waits for a `not delivered` line for `rcpt` with `status`; returns that line.
fn wait_deferred(m: &Moat, rcpt: &str, status: &str) -> String {
    wait_for(
        &format!("{rcpt} deferred with {status}"),
        Duration::from_secs(30),
        || {
            m.log()
                .lines()
                .find(|l| {
                    l.contains("not delivered")
                        && l.contains(&format!("to={rcpt}"))
                        && l.contains(&format!("status={status}"))
                })
                .map(str::to_string)
        },
    )
}

#[test]
fn dane_authenticates_defers_and_never_downgrades() {
    let dir = tempfile::tempdir().unwrap();
    // Receiver A: a certificate for a name no MX has, from a CA the sender does not trust.
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let (a_ca, a_leaves) = make_certs(&a_dir, &["wrong-name.example"]);
    // Receivers B (right name) and C (wrong name), issued by a second CA: DANE-TA.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let (b_ca, b_leaves) = make_certs_named(
        &b_dir,
        "Moat DANE-TA CA",
        &["mx3.secure.dane.test", "someone-else.example"],
    );
    let a_spki = spki_sha256(&a_leaves[0].0);
    let b_ca_spki = spki_sha256(&b_ca);
    let wrong = vec![0x5a; 32];

    let secure = "secure.dane.test";
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.21.53",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                secure,
                Kind::Secure,
                vec![
                    // ee.secure: DANE-EE matching A's key (wrong name, untrusted CA).
                    Srr::Mx(s("ee.secure.dane.test"), 10, s("mx1.secure.dane.test")),
                    Srr::A(s("mx1.secure.dane.test"), [127, 0, 21, 11]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx1.secure.dane.test"),
                        3,
                        1,
                        1,
                        a_spki.clone(),
                    ),
                    // nomatch.secure: DANE-EE that matches nothing A presents.
                    Srr::Mx(s("nomatch.secure.dane.test"), 10, s("mx2.secure.dane.test")),
                    Srr::A(s("mx2.secure.dane.test"), [127, 0, 21, 11]),
                    Srr::Tlsa(s("_2525._tcp.mx2.secure.dane.test"), 3, 1, 1, wrong.clone()),
                    // ta.secure: DANE-TA on B's CA, certificate for the MX host name.
                    Srr::Mx(s("ta.secure.dane.test"), 10, s("mx3.secure.dane.test")),
                    Srr::A(s("mx3.secure.dane.test"), [127, 0, 21, 12]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx3.secure.dane.test"),
                        2,
                        1,
                        1,
                        b_ca_spki.clone(),
                    ),
                    // taname.secure: DANE-TA on B's CA, certificate for another name.
                    Srr::Mx(s("taname.secure.dane.test"), 10, s("mx4.secure.dane.test")),
                    Srr::A(s("mx4.secure.dane.test"), [127, 0, 21, 13]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx4.secure.dane.test"),
                        2,
                        1,
                        1,
                        b_ca_spki.clone(),
                    ),
                    // plain.secure: TLSA published, but the host offers no STARTTLS.
                    Srr::Mx(s("plain.secure.dane.test"), 10, s("mx5.secure.dane.test")),
                    Srr::A(s("mx5.secure.dane.test"), [127, 0, 21, 14]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx5.secure.dane.test"),
                        3,
                        1,
                        1,
                        a_spki.clone(),
                    ),
                    // notlsa.secure: signed, no TLSA records: DANE does not apply.
                    Srr::Mx(s("notlsa.secure.dane.test"), 10, s("mx6.secure.dane.test")),
                    Srr::A(s("mx6.secure.dane.test"), [127, 0, 21, 11]),
                    // cname.secure: the TLSA records are found through a CNAME.
                    Srr::Mx(s("cname.secure.dane.test"), 10, s("mx7.secure.dane.test")),
                    Srr::A(s("mx7.secure.dane.test"), [127, 0, 21, 11]),
                    Srr::Cname(
                        s("_2525._tcp.mx7.secure.dane.test"),
                        s("_2525._tcp.mx1.secure.dane.test"),
                    ),
                ],
            ),
            (
                "insecure.dane.test",
                Kind::Insecure,
                vec![
                    // Unsigned: its (wrong) TLSA record must be ignored.
                    Srr::Mx(s("insecure.dane.test"), 10, s("mx.insecure.dane.test")),
                    Srr::A(s("mx.insecure.dane.test"), [127, 0, 21, 11]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx.insecure.dane.test"),
                        3,
                        1,
                        1,
                        wrong.clone(),
                    ),
                ],
            ),
            (
                "bogus.dane.test",
                Kind::Bogus,
                vec![
                    Srr::Mx(s("bogus.dane.test"), 10, s("mx.bogus.dane.test")),
                    Srr::A(s("mx.bogus.dane.test"), [127, 0, 21, 11]),
                    Srr::Tlsa(s("_2525._tcp.mx.bogus.dane.test"), 3, 1, 1, a_spki.clone()),
                ],
            ),
        ],
    );
    let a_chain = chain_file(&a_dir, &a_leaves[0].0, &a_ca);
    let rx_a = receiver(
        "127.0.21.11",
        &[
            "ee.secure.dane.test",
            "nomatch.secure.dane.test",
            "notlsa.secure.dane.test",
            "cname.secure.dane.test",
            "insecure.dane.test",
            "bogus.dane.test",
        ],
        &a_chain,
        &a_leaves[0].1,
    );
    let rx_b = receiver(
        "127.0.21.12",
        &["ta.secure.dane.test"],
        &chain_file(&b_dir, &b_leaves[0].0, &b_ca),
        &b_leaves[0].1,
    );
    let rx_c = receiver(
        "127.0.21.13",
        &["taname.secure.dane.test"],
        &chain_file(&b_dir, &b_leaves[1].0, &b_ca),
        &b_leaves[1].1,
    );
    let plain = plain_peer("127.0.21.14");

    let tx = sender("127.0.21.1", &dns, "");
    wait_dane_available(&tx);
    let rcpts = [
        "u@ee.secure.dane.test",
        "u@nomatch.secure.dane.test",
        "u@ta.secure.dane.test",
        "u@taname.secure.dane.test",
        "u@plain.secure.dane.test",
        "u@notlsa.secure.dane.test",
        "u@cname.secure.dane.test",
        "u@insecure.dane.test",
        "u@bogus.dane.test",
    ];
    submit(&tx, "alice@moat.test", &rcpts, "dane");

    // DANE-EE: accepted although the name is wrong and the CA unknown (RFC 7672 §3.1.1).
    let mail = wait_for("DANE-EE delivery", Duration::from_secs(30), || {
        rx_a.mailbox("u")
            .into_iter()
            .find(|m| m.contains("ee.secure.dane.test"))
    });
    assert!(mail.contains("with ESMTPS"), "{mail}");
    // DANE-TA with the right name.
    let mail = wait_for("DANE-TA delivery", Duration::from_secs(30), || {
        rx_b.mailbox("u").into_iter().next()
    });
    assert!(mail.contains("with ESMTPS"), "{mail}");
    // Deferred, never downgraded.
    let l = wait_deferred(&tx, "u@nomatch.secure.dane.test", "4.7.323");
    assert!(l.contains("matches none of the certificates"), "{l}");
    let l = wait_deferred(&tx, "u@taname.secure.dane.test", "4.7.325");
    assert!(l.contains("mx4.secure.dane.test"), "{l}");
    let l = wait_deferred(&tx, "u@plain.secure.dane.test", "4.7.321");
    assert!(l.contains("did not offer STARTTLS"), "{l}");
    let l = wait_deferred(&tx, "u@bogus.dane.test", "4.7.324");
    assert!(l.contains("DNSSEC"), "{l}");
    // The rest reach receiver A without DANE (insecure zone, no TLSA) or through a CNAME.
    let got = wait_for("the other deliveries", Duration::from_secs(30), || {
        let m = rx_a.mailbox("u");
        (m.len() >= 4).then_some(m)
    });
    for d in ["notlsa.secure", "cname.secure", "insecure"] {
        assert!(
            got.iter().any(|m| m.contains(&format!("u@{d}.dane.test"))),
            "{d}: {got:?}"
        );
    }
    assert!(
        !rx_a
            .mailbox("u")
            .iter()
            .any(|m| m.contains("nomatch.secure") || m.contains("bogus.dane.test")),
        "a DANE failure was delivered anyway"
    );
    assert!(rx_c.mailbox("u").is_empty(), "name mismatch delivered");
    assert!(
        !plain
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c)| c.starts_with("MESSAGE")),
        "sent in plaintext to a host with TLSA records"
    );

    let log = tx.log();
    let attempt = |host: &str| attempt_line(&log, host);
    let ee = attempt("mx1.secure.dane.test");
    assert!(ee.contains("level=\"dane\""), "{ee}");
    assert!(ee.contains("verified by DANE"), "{ee}");
    assert!(
        ee.contains("why=DANE (TLSA records of mx1.secure.dane.test, 1 usable record)"),
        "{ee}"
    );
    let cname = attempt("mx7.secure.dane.test");
    assert!(cname.contains("level=\"dane\""), "{cname}");
    assert!(
        cname.contains("TLSA records of mx7.secure.dane.test"),
        "a CNAME on the TLSA name shares the records, the base stays the MX host: {cname}"
    );
    let insecure = attempt("mx.insecure.dane.test");
    assert!(insecure.contains("level=\"may\""), "{insecure}");
    let notlsa = attempt("mx6.secure.dane.test");
    assert!(notlsa.contains("level=\"may\""), "{notlsa}");

    // `moat explain` makes the same decision and says why, per host.
    let (ok, out) = moat_cli(&tx, &["explain", "u@nomatch.secure.dane.test"]);
    assert!(ok, "{out}");
    for want in [
        "DANE: available (DNSSEC validation works)",
        "MX records: secure (DNSSEC-validated)",
        "Host mx2.secure.dane.test (preference 10, 127.0.21.11)",
        "address records: secure (DNSSEC-validated)",
        "TLSA: secure, for mx2.secure.dane.test:",
        "3 1 1 5a5a5a5a",
        "(usable)",
        "-> dane: TLS required; the certificate must match the TLSA records of mx2.secure.dane.test",
        "because DANE (TLSA records of mx2.secure.dane.test, 1 usable record)",
        "without STARTTLS: deferred with 4.7.321",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let (ok, out) = moat_cli(&tx, &["explain", "u@bogus.dane.test"]);
    assert!(ok, "{out}");
    assert!(out.contains("MX records: BOGUS"), "{out}");
    assert!(
        out.contains("-> NOT USED:") && out.contains("4.7.324"),
        "{out}"
    );
    let (ok, out) = moat_cli(&tx, &["explain", "u@insecure.dane.test"]);
    assert!(ok, "{out}");
    assert!(out.contains("MX records: insecure"), "{out}");
    assert!(
        out.contains("-> may: TLS when offered") && out.contains("because opportunistic"),
        "{out}"
    );
    assert!(
        out.contains("without STARTTLS: the message goes in plaintext"),
        "{out}"
    );

    // `moat probe --dane` judges each host as the sender did.
    let probe = |name: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
            .args([
                "probe",
                "127.0.21.11:2525",
                "--timeout",
                "5",
                "--name",
                name,
                "--dane",
            ])
            .arg("--nameserver")
            .arg(dns.addr.to_string())
            .arg("--trust-anchor")
            .arg(&dns.anchor_file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = probe("mx1.secure.dane.test");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("TLSA _2525._tcp.mx1.secure.dane.test: secure"),
        "{out}"
    );
    assert!(
        out.contains("3 1 1 ") && out.contains("(matches the presented chain)"),
        "{out}"
    );
    assert!(out.contains("verified: TLSA 3 1 1"), "{out}");
    assert!(
        out.contains("not needed under DANE"),
        "the CA verdict is only reported: {out}"
    );
    assert!(
        out.contains("PASS") && out.contains("DANE TLSA records authenticate"),
        "{out}"
    );
    let (code, out) = probe("mx2.secure.dane.test");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("(matches nothing presented)"), "{out}");
    assert!(
        out.contains("FAIL  DANE:") && out.contains("4.7.323"),
        "{out}"
    );
    // By name: the address comes from the DANE nameserver (the system resolver knows
    // nothing of these zones).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "probe",
            "mx1.secure.dane.test:2525",
            "--timeout",
            "5",
            "--dane",
        ])
        .arg("--nameserver")
        .arg(dns.addr.to_string())
        .arg("--trust-anchor")
        .arg(&dns.anchor_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("127.0.21.11:2525"), "{text}");
    assert!(text.contains("verified: TLSA 3 1 1"), "{text}");
    let (code, out) = probe("mx.insecure.dane.test");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("insecure (not signed or not validated)"),
        "{out}"
    );
    assert!(out.contains("DANE does not apply"), "{out}");
    assert!(!out.contains("FAIL  DANE"), "{out}");

    // `moat check DOMAIN --dane`: DNSSEC of the MX records and each host's TLSA records.
    let check = |domain: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
            .args([
                "check",
                domain,
                "--dane",
                "--smtp-port",
                "2525",
                "--timeout",
                "5",
            ])
            .arg("--nameserver")
            .arg(dns.addr.to_string())
            .arg("--trust-anchor")
            .arg(&dns.anchor_file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = check("ee.secure.dane.test");
    assert!(out.contains("PASS  dnssec"), "{out}");
    assert!(
        out.contains("PASS  dane   mx1.secure.dane.test: verified: TLSA 3 1 1"),
        "{out}"
    );
    assert!(out.contains("INFO  tlsrpt"), "{out}");
    let out = check("nomatch.secure.dane.test");
    assert!(out.contains("FAIL  dane   mx2.secure.dane.test:"), "{out}");
    assert!(
        out.contains("moat dane tlsa"),
        "the fix names the tool: {out}"
    );
    let out = check("bogus.dane.test");
    assert!(out.contains("FAIL  dnssec"), "{out}");

    // `moat dane tlsa` on receiver A: the 3 1 1 record the zone publishes for mx1 is the
    // one it prints (computed here independently), and the 2 1 1 one of its CA.
    let (_, out) = moat_cli(&rx_a, &["dane", "tlsa", "--offline"]);
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(
        out.contains(&format!(
            "_25._tcp.wrong-name.example. IN TLSA 3 1 1 {}",
            hex(&a_spki)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("IN TLSA 2 1 1 {}", hex(&spki_sha256(&a_ca)))),
        "{out}"
    );
}

#[test]
fn without_working_validation_dane_is_unavailable_and_mail_still_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["wrong-name.example"]);
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.21.54",
        dir.path(),
        "dane.test",
        &[],
        &[(
            "secure.dane.test",
            Kind::Secure,
            vec![
                Srr::Mx(s("secure.dane.test"), 10, s("mx.secure.dane.test")),
                Srr::A(s("mx.secure.dane.test"), [127, 0, 21, 21]),
                Srr::Tlsa(s("_2525._tcp.mx.secure.dane.test"), 3, 1, 1, vec![0x11; 32]),
            ],
        )],
    );
    let rx = receiver(
        "127.0.21.21",
        &["secure.dane.test"],
        &chain_file(dir.path(), &leaves[0].0, &ca),
        &leaves[0].1,
    );
    // The self-check asks for a name the trust anchor does not cover: validation "fails".
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = {SMTP}\nnameservers = [\"{}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [1]\n\n[mta_sts]\nenabled = false\n\n[dane]\ntrust_anchor_file = \"{}\"\ncheck_secure = \"not-covered.example\"\ncheck_bogus = \"\"\n",
        dns.addr,
        dns.anchor_file.display()
    );
    let tx = Moat::start_with("127.0.21.2", &extra, "");
    wait_for("the failed self-check", Duration::from_secs(20), || {
        tx.log().contains("DANE unavailable").then_some(())
    });
    submit(&tx, "alice@moat.test", &["u@secure.dane.test"], "no-dane");
    wait_for("opportunistic delivery", Duration::from_secs(30), || {
        rx.mailbox("u").into_iter().next()
    });
    let log = tx.log();
    assert!(
        log.contains("DANE unavailable: DNSSEC validation does not work"),
        "{log}"
    );
}

#[test]
fn a_rule_can_switch_dane_off_for_a_domain() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["wrong-name.example"]);
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.21.55",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                "secure.dane.test",
                Kind::Secure,
                vec![
                    Srr::Mx(s("secure.dane.test"), 10, s("mx.secure.dane.test")),
                    Srr::A(s("mx.secure.dane.test"), [127, 0, 21, 31]),
                    // Stale record: matches nothing the server has.
                    Srr::Tlsa(s("_2525._tcp.mx.secure.dane.test"), 3, 1, 1, vec![0x22; 32]),
                ],
            ),
            ("bogus.dane.test", Kind::Bogus, vec![]),
        ],
    );
    let rx = receiver(
        "127.0.21.31",
        &["secure.dane.test"],
        &chain_file(dir.path(), &leaves[0].0, &ca),
        &leaves[0].1,
    );
    let rule =
        "[[tls_policy]]\ndomains = [\"secure.dane.test\"]\nlevel = \"encrypt\"\ndane = \"off\"\n";
    let tx = sender("127.0.21.3", &dns, rule);
    wait_dane_available(&tx);
    submit(&tx, "alice@moat.test", &["u@secure.dane.test"], "dane-off");
    wait_for("delivery with DANE off", Duration::from_secs(30), || {
        rx.mailbox("u").into_iter().next()
    });
    let log = tx.log();
    assert!(log.contains("DANE switched off by a rule"), "{log}");
    assert!(log.contains("level=\"encrypt\""), "{log}");
}

/// RFC 7672 §2.1-2.2 rows beyond the main test: an implicit MX (secure denial of the MX
/// RRset), a secure MX whose host's address records are insecure, TLSA records reached through
/// a CNAME into an insecure zone, records that are all unusable (TLS still required), and an
/// expired certificate under DANE-TA.
#[test]
fn dane_corner_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["wrong-name.example"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let old_dir = dir.path().join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let (old_ca, old) = make_cert_valid(
        &old_dir,
        "mx5.secure.dane.test",
        now - 90 * 86400,
        now - 86400,
    );
    let a_spki = spki_sha256(&leaves[0].0);
    let s = |x: &str| x.to_string();
    let wrong = vec![0x77; 32];
    let dns = serve_signed(
        "127.0.21.56",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                "secure.dane.test",
                Kind::Secure,
                vec![
                    // No MX: the domain's own A record is the host (secure NSEC denial).
                    Srr::A(s("implicit.secure.dane.test"), [127, 0, 21, 41]),
                    Srr::Tlsa(
                        s("_2525._tcp.implicit.secure.dane.test"),
                        3,
                        1,
                        1,
                        wrong.clone(),
                    ),
                    // Secure MX naming a host in the unsigned zone.
                    Srr::Mx(s("addr.secure.dane.test"), 10, s("mx.insecure.dane.test")),
                    // TLSA through a CNAME into the unsigned zone.
                    Srr::Mx(s("cname.secure.dane.test"), 10, s("mx3.secure.dane.test")),
                    Srr::A(s("mx3.secure.dane.test"), [127, 0, 21, 41]),
                    Srr::Cname(
                        s("_2525._tcp.mx3.secure.dane.test"),
                        s("_2525._tcp.mx.insecure.dane.test"),
                    ),
                    // Only a PKIX-EE record: unusable for SMTP, TLS still required.
                    Srr::Mx(s("pkix.secure.dane.test"), 10, s("mx4.secure.dane.test")),
                    Srr::A(s("mx4.secure.dane.test"), [127, 0, 21, 41]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx4.secure.dane.test"),
                        1,
                        1,
                        1,
                        a_spki.clone(),
                    ),
                    Srr::Mx(
                        s("pkixplain.secure.dane.test"),
                        10,
                        s("mx6.secure.dane.test"),
                    ),
                    Srr::A(s("mx6.secure.dane.test"), [127, 0, 21, 43]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx6.secure.dane.test"),
                        1,
                        1,
                        1,
                        a_spki.clone(),
                    ),
                    // DANE-TA with an expired server certificate.
                    Srr::Mx(s("expired.secure.dane.test"), 10, s("mx5.secure.dane.test")),
                    Srr::A(s("mx5.secure.dane.test"), [127, 0, 21, 42]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx5.secure.dane.test"),
                        2,
                        1,
                        1,
                        spki_sha256(&old_ca),
                    ),
                ],
            ),
            (
                "insecure.dane.test",
                Kind::Insecure,
                vec![
                    Srr::A(s("mx.insecure.dane.test"), [127, 0, 21, 41]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx.insecure.dane.test"),
                        3,
                        1,
                        1,
                        wrong.clone(),
                    ),
                ],
            ),
            ("bogus.dane.test", Kind::Bogus, vec![]),
        ],
    );
    let rx = receiver(
        "127.0.21.41",
        &[
            "implicit.secure.dane.test",
            "addr.secure.dane.test",
            "cname.secure.dane.test",
            "pkix.secure.dane.test",
        ],
        &chain_file(dir.path(), &leaves[0].0, &ca),
        &leaves[0].1,
    );
    let rx_old = receiver(
        "127.0.21.42",
        &["expired.secure.dane.test"],
        &chain_file(&old_dir, &old.0, &old_ca),
        &old.1,
    );
    let plain = plain_peer("127.0.21.43");
    let tx = sender("127.0.21.4", &dns, "");
    wait_dane_available(&tx);
    submit(
        &tx,
        "alice@moat.test",
        &[
            "u@implicit.secure.dane.test",
            "u@addr.secure.dane.test",
            "u@cname.secure.dane.test",
            "u@pkix.secure.dane.test",
            "u@pkixplain.secure.dane.test",
            "u@expired.secure.dane.test",
        ],
        "corners",
    );
    // Implicit MX with a secure denial: DANE applies, and the wrong record defers.
    wait_deferred(&tx, "u@implicit.secure.dane.test", "4.7.323");
    // DANE-TA: the chain reaches the published anchor but the certificate expired.
    wait_deferred(&tx, "u@expired.secure.dane.test", "4.7.322");
    // Unusable records only: TLS required, so the plaintext-only host defers.
    wait_deferred(&tx, "u@pkixplain.secure.dane.test", "4.4.317");
    let got = wait_for(
        "the deliveries without DANE",
        Duration::from_secs(30),
        || {
            let m = rx.mailbox("u");
            (m.len() >= 3).then_some(m)
        },
    );
    for d in ["addr", "cname", "pkix"] {
        assert!(
            got.iter()
                .any(|m| m.contains(&format!("u@{d}.secure.dane.test"))),
            "{d}: {got:?}"
        );
    }
    assert!(
        !got.iter().any(|m| m.contains("implicit.secure")),
        "the implicit MX host was used without DANE"
    );
    assert!(rx_old.mailbox("u").is_empty());
    assert!(
        !plain
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c)| c.starts_with("MESSAGE")),
        "plaintext despite TLSA records"
    );
    let log = tx.log();
    let attempt = |host: &str| attempt_line(&log, host);
    let pkix = attempt("mx4.secure.dane.test");
    assert!(pkix.contains("level=\"encrypt\""), "{pkix}");
    assert!(pkix.contains("all unusable for SMTP"), "{pkix}");
    let addr = attempt("mx.insecure.dane.test");
    assert!(addr.contains("level=\"may\""), "{addr}");
    let cname = attempt("mx3.secure.dane.test");
    assert!(cname.contains("level=\"may\""), "{cname}");
}

/// Lookups that get no answer on a signed path (RFC 7672 §2.1.1: "the SMTP client MUST NOT
/// deliver to" a host whose TLSA lookup fails, and must not treat it as insecure): a TLSA
/// name CNAMEd into a securely delegated zone whose server answers SERVFAIL, one into a zone
/// whose server never answers, and an MX host whose own address lookup gets SERVFAIL. Each
/// host is skipped with a temporary DNS failure (4.4.312, not DANE's DNSSEC code: nothing
/// was shown to be forged), the next MX host with good records is used, and a domain with no
/// other host is deferred, never sent without DANE.
#[test]
fn unanswered_lookups_skip_the_host_and_never_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, leaves) = make_certs(dir.path(), &["unrelated-name.example"]);
    let spki = spki_sha256(&leaves[0].0);
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.21.57",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                "secure.dane.test",
                Kind::Secure,
                vec![
                    // mx1's TLSA records are behind a SERVFAIL; mx2's match.
                    Srr::Mx(s("two.secure.dane.test"), 10, s("mx1.secure.dane.test")),
                    Srr::Mx(s("two.secure.dane.test"), 20, s("mx2.secure.dane.test")),
                    Srr::Mx(s("one.secure.dane.test"), 10, s("mx1.secure.dane.test")),
                    Srr::A(s("mx1.secure.dane.test"), [127, 0, 21, 44]),
                    Srr::Cname(
                        s("_2525._tcp.mx1.secure.dane.test"),
                        s("_2525._tcp.mx.sf.dane.test"),
                    ),
                    Srr::A(s("mx2.secure.dane.test"), [127, 0, 21, 44]),
                    Srr::Tlsa(s("_2525._tcp.mx2.secure.dane.test"), 3, 1, 1, spki),
                    // mx3's TLSA records are behind a server that never answers.
                    Srr::Mx(s("slow.secure.dane.test"), 10, s("mx3.secure.dane.test")),
                    Srr::A(s("mx3.secure.dane.test"), [127, 0, 21, 44]),
                    Srr::Cname(
                        s("_2525._tcp.mx3.secure.dane.test"),
                        s("_2525._tcp.mx.to.dane.test"),
                    ),
                    // The MX host's own zone answers SERVFAIL.
                    Srr::Mx(s("addr.secure.dane.test"), 10, s("mx.sf.dane.test")),
                ],
            ),
            ("sf.dane.test", Kind::Servfail, vec![]),
            ("to.dane.test", Kind::Silent, vec![]),
            ("bogus.dane.test", Kind::Bogus, vec![]),
        ],
    );
    let rx = receiver(
        "127.0.21.44",
        &[
            "two.secure.dane.test",
            "one.secure.dane.test",
            "slow.secure.dane.test",
            "addr.secure.dane.test",
        ],
        &leaves[0].0,
        &leaves[0].1,
    );
    let tx = sender("127.0.21.5", &dns, "");
    wait_dane_available(&tx);
    submit(
        &tx,
        "alice@moat.test",
        &[
            "u@two.secure.dane.test",
            "u@one.secure.dane.test",
            "u@slow.secure.dane.test",
            "u@addr.secure.dane.test",
        ],
        "unanswered",
    );
    let one = wait_deferred(&tx, "u@one.secure.dane.test", "4.4.312");
    assert!(one.contains("mx1.secure.dane.test"), "{one}");
    assert!(one.contains("TLSA"), "{one}");
    let slow = wait_deferred(&tx, "u@slow.secure.dane.test", "4.4.312");
    assert!(slow.contains("mx3.secure.dane.test"), "{slow}");
    wait_deferred(&tx, "u@addr.secure.dane.test", "4.4.312");
    let got = wait_for("the delivery through mx2", Duration::from_secs(30), || {
        let m = rx.mailbox("u");
        (!m.is_empty()).then_some(m)
    });
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("u@two.secure.dane.test"), "{got:?}");
    let log = tx.log();
    let mx2 = attempt_line(&log, "mx2.secure.dane.test");
    assert!(mx2.contains("level=\"dane\""), "{mx2}");
    for host in [
        "mx1.secure.dane.test",
        "mx3.secure.dane.test",
        "mx.sf.dane.test",
    ] {
        assert!(
            !log.lines()
                .any(|l| l.contains("delivery attempt") && l.contains(&format!("host=\"{host}\""))),
            "{host} was tried: {log}"
        );
    }
    // No mail went out without DANE: only the one message arrived.
    assert_eq!(rx.mailbox("u").len(), 1);
}

/// An MX host that is an alias (RFC 7672 §2.2.3): with a secure CNAME chain the TLSA records
/// are looked up first at the chain's target, which is then the TLSA base domain (and the SNI,
/// §8.1); only when the target has none are the MX host's own records used. The target's
/// records win over the alias's: a wrong record at the target defers even though the alias
/// has a matching one.
#[test]
fn an_aliased_mx_host_is_authenticated_at_its_target_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, leaves) = make_certs(dir.path(), &["unrelated-name.example"]);
    let spki = spki_sha256(&leaves[0].0);
    let wrong = vec![0x33; 32];
    let z = |n: &str| format!("{n}.secure.dane.test");
    let tlsa = |host: &str, data: &Vec<u8>| {
        Srr::Tlsa(format!("_2525._tcp.{}", z(host)), 3, 1, 1, data.clone())
    };
    let dns = serve_signed(
        "127.0.21.58",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                "secure.dane.test",
                Kind::Secure,
                vec![
                    // Records at the target (right) and at the alias (wrong): the target's count.
                    Srr::Mx(z("exp"), 10, z("alias1")),
                    Srr::Cname(z("alias1"), z("target1")),
                    Srr::A(z("target1"), [127, 0, 21, 45]),
                    tlsa("target1", &spki),
                    tlsa("alias1", &wrong),
                    // No records at the target: the alias's own (right) records are used.
                    Srr::Mx(z("fallback"), 10, z("alias2")),
                    Srr::Cname(z("alias2"), z("target2")),
                    Srr::A(z("target2"), [127, 0, 21, 45]),
                    tlsa("alias2", &spki),
                    // A wrong record at the target, a right one at the alias: deferred.
                    Srr::Mx(z("wrongfirst"), 10, z("alias3")),
                    Srr::Cname(z("alias3"), z("target3")),
                    Srr::A(z("target3"), [127, 0, 21, 45]),
                    tlsa("target3", &wrong),
                    tlsa("alias3", &spki),
                ],
            ),
            ("bogus.dane.test", Kind::Bogus, vec![]),
        ],
    );
    let rx = receiver(
        "127.0.21.45",
        &[&z("exp"), &z("fallback"), &z("wrongfirst")],
        &leaves[0].0,
        &leaves[0].1,
    );
    let tx = sender("127.0.21.6", &dns, "");
    wait_dane_available(&tx);
    submit(
        &tx,
        "alice@moat.test",
        &[
            &format!("u@{}", z("exp")),
            &format!("u@{}", z("fallback")),
            &format!("u@{}", z("wrongfirst")),
        ],
        "aliases",
    );
    let wrongfirst = wait_deferred(&tx, &format!("u@{}", z("wrongfirst")), "4.7.323");
    assert!(wrongfirst.contains(&z("target3")), "{wrongfirst}");
    let got = wait_for("the two DANE deliveries", Duration::from_secs(30), || {
        let m = rx.mailbox("u");
        (m.len() >= 2).then_some(m)
    });
    for d in ["exp", "fallback"] {
        assert!(
            got.iter().any(|m| m.contains(&format!("u@{}", z(d)))),
            "{d}: {got:?}"
        );
    }
    let log = tx.log();
    let exp = attempt_line(&log, &z("alias1"));
    assert!(exp.contains("level=\"dane\""), "{exp}");
    assert!(
        exp.contains(&format!("TLSA records of {}", z("target1"))),
        "{exp}"
    );
    let fallback = attempt_line(&log, &z("alias2"));
    assert!(fallback.contains("level=\"dane\""), "{fallback}");
    assert!(
        fallback.contains(&format!("TLSA records of {}", z("alias2"))),
        "{fallback}"
    );
    // The receiver saw the TLSA base domain as SNI on each connection.
    let rx_log = rx.log();
    for sni in [z("target1"), z("alias2")] {
        assert!(
            rx_log
                .lines()
                .any(|l| l.contains("TLS established") && l.contains(&format!("sni=\"{sni}\""))),
            "no connection with SNI {sni}: {rx_log}"
        );
    }
    assert_eq!(rx.mailbox("u").len(), 2);
}

/// Signatures that expired (RFC 4035 §5.3.1: an RRSIG past its expiration does not
/// validate): an MX host in a zone whose signatures have expired, and TLSA records reached
/// through a CNAME into it, are bogus: the host is not used (4.7.324), never tried without
/// DANE, while the same records validate in time.
#[test]
fn expired_signatures_are_bogus() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, leaves) = make_certs(dir.path(), &["unrelated-name.example"]);
    let spki = spki_sha256(&leaves[0].0);
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.21.59",
        dir.path(),
        "dane.test",
        &[],
        &[
            (
                "secure.dane.test",
                Kind::Secure,
                vec![
                    // The MX host is in the zone whose signatures expired.
                    Srr::Mx(s("exp1.secure.dane.test"), 10, s("mx.expired.dane.test")),
                    // The TLSA records are reached through a CNAME into it.
                    Srr::Mx(s("exp2.secure.dane.test"), 10, s("mx2.secure.dane.test")),
                    Srr::A(s("mx2.secure.dane.test"), [127, 0, 21, 46]),
                    Srr::Cname(
                        s("_2525._tcp.mx2.secure.dane.test"),
                        s("_2525._tcp.mx.expired.dane.test"),
                    ),
                    // The control: the same kind of records, signed in time.
                    Srr::Mx(s("fresh.secure.dane.test"), 10, s("mx3.secure.dane.test")),
                    Srr::A(s("mx3.secure.dane.test"), [127, 0, 21, 46]),
                    Srr::Tlsa(s("_2525._tcp.mx3.secure.dane.test"), 3, 1, 1, spki.clone()),
                ],
            ),
            (
                "expired.dane.test",
                Kind::Expired,
                vec![
                    Srr::A(s("mx.expired.dane.test"), [127, 0, 21, 46]),
                    Srr::Tlsa(s("_2525._tcp.mx.expired.dane.test"), 3, 1, 1, spki.clone()),
                ],
            ),
            ("bogus.dane.test", Kind::Bogus, vec![]),
        ],
    );
    let domains = [
        "exp1.secure.dane.test",
        "exp2.secure.dane.test",
        "fresh.secure.dane.test",
    ];
    let rx = receiver("127.0.21.46", &domains, &leaves[0].0, &leaves[0].1);
    let tx = sender("127.0.21.7", &dns, "");
    wait_dane_available(&tx);
    // The expired zone's signatures are valid up to the second they were made.
    wait_for("the signatures to expire", Duration::from_secs(5), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now > dns.signed_at).then_some(())
    });
    let rcpts: Vec<String> = domains.iter().map(|d| format!("u@{d}")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    submit(&tx, "alice@moat.test", &rcpts, "expiry");
    let exp1 = wait_deferred(&tx, "u@exp1.secure.dane.test", "4.7.324");
    assert!(exp1.contains("mx.expired.dane.test"), "{exp1}");
    let exp2 = wait_deferred(&tx, "u@exp2.secure.dane.test", "4.7.324");
    assert!(exp2.contains("TLSA"), "{exp2}");
    let got = wait_for("the delivery in time", Duration::from_secs(30), || {
        let m = rx.mailbox("u");
        (!m.is_empty()).then_some(m)
    });
    assert!(got[0].contains("u@fresh.secure.dane.test"), "{got:?}");
    let log = tx.log();
    let fresh = attempt_line(&log, "mx3.secure.dane.test");
    assert!(fresh.contains("level=\"dane\""), "{fresh}");
    for host in ["mx.expired.dane.test", "mx2.secure.dane.test"] {
        assert!(
            !log.lines()
                .any(|l| l.contains("delivery attempt") && l.contains(&format!("host=\"{host}\""))),
            "{host} was tried: {log}"
        );
    }
    assert_eq!(rx.mailbox("u").len(), 1);
}
