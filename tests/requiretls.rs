//! REQUIRETLS (RFC 8689) end to end on loopback: a sending Moat takes a message with
//! `MAIL FROM:<…> REQUIRETLS` (inside TLS only) and passes it on only to hosts authenticated
//! by DANE (real signed zones, in-process validation) or an MTA-STS `enforce` policy (served
//! over HTTPS with a test CA) that offer REQUIRETLS themselves. A host without REQUIRETLS is
//! deferred with 4.7.30 and the message bounced with 5.7.30 at the end of the retry window;
//! a destination with no authenticated host (unsigned zone, MTA-STS `testing`) bounces with
//! 5.7.30 at once, and nothing is sent to a plaintext host. The notices travel under
//! REQUIRETLS and carry the original header only. `TLS-Required: No` lets a message without
//! REQUIRETLS past an MTA-STS failure.

mod common;

use std::path::Path;
use std::time::Duration;

use common::https::PolicyServer;
use common::signed_dns::{Kind, SignedDns, Srr, serve_signed};
use common::*;

const POLICY_PORT: u16 = 8443;

/// SHA-256 of a certificate's SubjectPublicKeyInfo (the data of a `3 1 1` record), computed
/// here from the certificate, not by Moat's DANE code.
fn spki_sha256(pem: &Path) -> Vec<u8> {
    let der = pem_der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert.tbs_certificate.subject_pki.raw,
    )
    .as_ref()
    .to_vec()
}

/// A receiving Moat for `domain`, presenting `identity`; `requiretls = false` on its port-25
/// listener when `offer` is false.
fn receiver(
    ip: &str,
    domain: &str,
    identity: &(std::path::PathBuf, std::path::PathBuf),
    offer: bool,
) -> Moat {
    let extra = maildir_receiver(domain, identity);
    let mut m = Moat::configured(ip, &extra, "");
    if !offer {
        let text = std::fs::read_to_string(&m.config).unwrap();
        let text = text.replacen(
            "mode = \"smtp\"\n",
            "mode = \"smtp\"\nrequiretls = false\n",
            1,
        );
        std::fs::write(&m.config, text).unwrap();
    }
    m.spawn();
    m
}

fn sender(ip: &str, dns: &SignedDns, ca: &Path) -> Moat {
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = {SMTP}\nnameservers = [\"{}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [1]\nsecurity_lifetime_secs = 4\nmax_lifetime_secs = 4\n\n[mta_sts]\nfetch_port = {POLICY_PORT}\nfetch_timeout_secs = 5\nca_file = \"{}\"\n\n[dane]\ntrust_anchor_file = \"{}\"\ncheck_secure = \"rt.test\"\ncheck_bogus = \"\"\n",
        dns.addr,
        ca.display(),
        dns.anchor_file.display()
    );
    let m = Moat::start_with(ip, &extra, "");
    wait_for("DANE self-check", Duration::from_secs(20), || {
        m.log().contains("DANE available").then_some(())
    });
    m
}

/// Sends one message over STARTTLS; with `requiretls` the MAIL command carries REQUIRETLS.
/// Returns the queue id.
fn send(m: &Moat, to: &str, subject: &str, requiretls: bool, header: &str) -> String {
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    c.starttls("mx.moat.test");
    let ehlo = c.ehlo();
    assert!(ehlo.text().contains("REQUIRETLS"), "{ehlo}");
    let param = if requiretls { " REQUIRETLS" } else { "" };
    let r = c.cmd(&format!("MAIL FROM:<alice@moat.test>{param}"));
    assert!(r.is("250 2.1.0"), "{r}");
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    assert!(r.is("250 2.1.5"), "{r}");
    let r = c.cmd("DATA");
    assert_eq!(r.code, 354, "{r}");
    c.send(
        format!("Subject: {subject}\r\n{header}\r\nsecret body of {subject}\r\n.\r\n").as_bytes(),
    );
    let r = c.read_reply();
    assert!(r.is("250 2.0.0"), "{r}");
    r.text().rsplit(' ').next().unwrap().trim().to_string()
}

/// The notice in alice's mailbox about `subject`.
fn wait_notice(tx: &Moat, subject: &str) -> String {
    wait_for(
        &format!("a notice about {subject}"),
        Duration::from_secs(40),
        || {
            tx.mailbox("alice")
                .into_iter()
                .find(|m| m.contains(&format!("Subject: {subject}")))
        },
    )
}

#[test]
fn requiretls_goes_only_to_authenticated_hosts_that_offer_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(
        dir.path(),
        &[
            "mx1.dane.rt.test",
            "mx2.norq.rt.test",
            "mx4.sts.rt.test",
            "mx5.testing.rt.test",
            "mta-sts.sts.rt.test",
            "mta-sts.testing.rt.test",
        ],
    );
    let s = |x: &str| x.to_string();
    let sts_txt = s("v=STSv1; id=20261204000000Z");
    let dns = serve_signed(
        "127.0.24.53",
        dir.path(),
        "rt.test",
        &[],
        &[
            (
                "dane.rt.test",
                Kind::Secure,
                vec![
                    Srr::Mx(s("dane.rt.test"), 10, s("mx1.dane.rt.test")),
                    Srr::A(s("mx1.dane.rt.test"), [127, 0, 24, 11]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx1.dane.rt.test"),
                        3,
                        1,
                        1,
                        spki_sha256(&leaves[0].0),
                    ),
                ],
            ),
            (
                "norq.rt.test",
                Kind::Secure,
                vec![
                    Srr::Mx(s("norq.rt.test"), 10, s("mx2.norq.rt.test")),
                    Srr::A(s("mx2.norq.rt.test"), [127, 0, 24, 12]),
                    Srr::Tlsa(
                        s("_2525._tcp.mx2.norq.rt.test"),
                        3,
                        1,
                        1,
                        spki_sha256(&leaves[1].0),
                    ),
                ],
            ),
            (
                "plain.rt.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("plain.rt.test"), 10, s("mx3.plain.rt.test")),
                    Srr::A(s("mx3.plain.rt.test"), [127, 0, 24, 13]),
                ],
            ),
            (
                "sts.rt.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("sts.rt.test"), 10, s("mx4.sts.rt.test")),
                    Srr::A(s("mx4.sts.rt.test"), [127, 0, 24, 14]),
                    Srr::Txt(s("_mta-sts.sts.rt.test"), sts_txt.clone()),
                    Srr::A(s("mta-sts.sts.rt.test"), [127, 0, 24, 24]),
                ],
            ),
            (
                "testing.rt.test",
                Kind::Insecure,
                vec![
                    Srr::Mx(s("testing.rt.test"), 10, s("mx5.testing.rt.test")),
                    Srr::A(s("mx5.testing.rt.test"), [127, 0, 24, 15]),
                    Srr::Txt(s("_mta-sts.testing.rt.test"), sts_txt.clone()),
                    Srr::A(s("mta-sts.testing.rt.test"), [127, 0, 24, 25]),
                ],
            ),
        ],
    );
    let sts_policy = PolicyServer::start(&format!("127.0.24.24:{POLICY_PORT}"), &leaves[4]);
    sts_policy
        .set_policy("version: STSv1\r\nmode: enforce\r\nmx: mx4.sts.rt.test\r\nmax_age: 86400\r\n");
    let testing_policy = PolicyServer::start(&format!("127.0.24.25:{POLICY_PORT}"), &leaves[5]);
    testing_policy.set_policy(
        "version: STSv1\r\nmode: testing\r\nmx: mx5.testing.rt.test\r\nmax_age: 86400\r\n",
    );
    let rx_dane = receiver("127.0.24.11", "dane.rt.test", &leaves[0], true);
    let rx_norq = receiver("127.0.24.12", "norq.rt.test", &leaves[1], false);
    let plain = plain_peer("127.0.24.13");
    let rx_sts = receiver("127.0.24.14", "sts.rt.test", &leaves[2], true);
    let rx_testing = receiver("127.0.24.15", "testing.rt.test", &leaves[3], true);
    let tx = sender("127.0.24.1", &dns, &ca);

    // Outside TLS the parameter is refused with 5.7.10.
    let mut c = Client::connect(tx.addr(SMTP));
    let ehlo = c.ehlo();
    assert!(!ehlo.text().contains("REQUIRETLS"), "{ehlo}");
    let r = c.cmd("MAIL FROM:<alice@moat.test> REQUIRETLS");
    assert!(r.is("530 5.7.10"), "{r}");

    let ok_dane = send(&tx, "u@dane.rt.test", "rt-dane", true, "");
    send(&tx, "u@sts.rt.test", "rt-sts", true, "");
    let norq = send(&tx, "u@norq.rt.test", "rt-norq", true, "");
    send(&tx, "u@plain.rt.test", "rt-plain", true, "");
    send(&tx, "u@testing.rt.test", "rt-testing", true, "");

    // DANE and MTA-STS enforce: delivered, REQUIRETLS passed on (the receiver's Received
    // header says it took the message with REQUIRETLS).
    for (rx, subject) in [(&rx_dane, "rt-dane"), (&rx_sts, "rt-sts")] {
        let got = wait_for(subject, Duration::from_secs(30), || {
            rx.mailbox("u").into_iter().next()
        });
        assert!(got.contains(&format!("Subject: {subject}")), "{got}");
        // Two hops stamped it as taken with REQUIRETLS: the sender's and the receiver's.
        assert_eq!(got.matches("(REQUIRETLS)").count(), 2, "{got}");
    }
    let log = tx.log();
    let attempt = log
        .lines()
        .find(|l| l.contains("delivery attempt") && l.contains("mx1.dane.rt.test"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(attempt.contains("level=\"dane\""), "{attempt}");
    assert!(!ok_dane.is_empty());

    // No authenticated host: bounced at once with 5.7.30, nothing sent in clear.
    for (subject, domain) in [
        ("rt-plain", "plain.rt.test"),
        ("rt-testing", "testing.rt.test"),
    ] {
        let notice = wait_notice(&tx, subject);
        assert!(notice.contains("5.7.30"), "{subject}: {notice}");
        assert!(notice.contains("REQUIRETLS"), "{subject}: {notice}");
        assert!(notice.contains(domain), "{subject}: {notice}");
        assert!(
            !notice.contains(&format!("secret body of {subject}")),
            "the notice returned the body: {notice}"
        );
    }
    assert!(
        !plain
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c)| c.starts_with("MAIL") || c.starts_with("MESSAGE")),
        "a REQUIRETLS message was offered to a plaintext host"
    );
    assert!(
        rx_testing.mailbox("u").is_empty(),
        "delivered under MTA-STS testing"
    );

    // Authenticated by DANE but no REQUIRETLS offered: deferred with 4.7.30 (queue show says
    // REQUIRETLS), then bounced with 5.7.30.
    let deferred = wait_for("4.7.30 deferral", Duration::from_secs(30), || {
        tx.log()
            .lines()
            .find(|l| l.contains("not delivered") && l.contains("to=u@norq.rt.test"))
            .map(str::to_string)
    });
    assert!(deferred.contains("status=4.7.30"), "{deferred}");
    assert!(deferred.contains("does not offer REQUIRETLS"), "{deferred}");
    let (_, show) = moat_cli(&tx, &["queue", "show", &norq]);
    assert!(
        show.contains("REQUIRETLS: only to hosts authenticated"),
        "{show}"
    );
    let notice = wait_notice(&tx, "rt-norq");
    assert!(notice.contains("5.7.30"), "{notice}");
    assert!(!notice.contains("secret body of rt-norq"), "{notice}");
    assert!(rx_norq.mailbox("u").is_empty());
    let rx_log = rx_norq.log();
    assert!(
        !rx_log.contains("REQUIRETLS is not offered"),
        "the sender offered REQUIRETLS to a host that does not offer it: {rx_log}"
    );
}

#[test]
fn tls_required_no_sets_mta_sts_aside_for_a_message_without_requiretls() {
    let dir = tempfile::tempdir().unwrap();
    // The receiver's certificate is for another name: MTA-STS enforce would refuse it.
    let (ca, leaves) = make_certs(dir.path(), &["wrong.example", "mta-sts.enf.rt2.test"]);
    let s = |x: &str| x.to_string();
    let dns = serve_signed(
        "127.0.24.54",
        dir.path(),
        "rt2.test",
        &[],
        &[(
            "enf.rt2.test",
            Kind::Insecure,
            vec![
                Srr::Mx(s("enf.rt2.test"), 10, s("mx.enf.rt2.test")),
                Srr::A(s("mx.enf.rt2.test"), [127, 0, 24, 31]),
                Srr::Txt(s("_mta-sts.enf.rt2.test"), s("v=STSv1; id=1")),
                Srr::A(s("mta-sts.enf.rt2.test"), [127, 0, 24, 32]),
            ],
        )],
    );
    let policy = PolicyServer::start(&format!("127.0.24.32:{POLICY_PORT}"), &leaves[1]);
    policy
        .set_policy("version: STSv1\r\nmode: enforce\r\nmx: mx.enf.rt2.test\r\nmax_age: 86400\r\n");
    let rx = receiver("127.0.24.31", "enf.rt2.test", &leaves[0], true);
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = {SMTP}\nnameservers = [\"{}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 1\n\n[queue]\nretry_schedule_secs = [1]\n\n[mta_sts]\nfetch_port = {POLICY_PORT}\nfetch_timeout_secs = 5\nca_file = \"{}\"\n\n[dane]\nenabled = false\n",
        dns.addr,
        ca.display()
    );
    let tx = Moat::start_with("127.0.24.2", &extra, "");
    send(&tx, "u@enf.rt2.test", "rt2-held", false, "");
    send(
        &tx,
        "u@enf.rt2.test",
        "rt2-free",
        false,
        "TLS-Required: No\r\n",
    );
    let got = wait_for(
        "the TLS-Required: No message",
        Duration::from_secs(30),
        || rx.mailbox("u").into_iter().next(),
    );
    assert!(got.contains("Subject: rt2-free"), "{got}");
    // The other is held by the policy (4.7.5), never delivered.
    wait_for("the MTA-STS deferral", Duration::from_secs(30), || {
        tx.log()
            .lines()
            .find(|l| l.contains("not delivered") && l.contains("status=4.7.5"))
            .map(str::to_string)
    });
    assert_eq!(rx.mailbox("u").len(), 1);
    let log = tx.log();
    assert!(
        log.contains("TLS-Required: No: the message is delivered without MTA-STS"),
        "{log}"
    );
}
