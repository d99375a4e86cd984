//! Outbound delivery end to end: a sending Moat resolves MX records from a real DNS server
//! on loopback and delivers to real receivers (another Moat; a plaintext-only SMTP peer; a
//! closed port), under opportunistic and enforced TLS policies. Failures are deferred with
//! the right code, then bounced with a DSN that names the cause.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dns::{Rr, serve_zone};
use common::*;

/// Sender config: trusted loopback clients may relay; DNS and port point at the test world;
/// retries every second; lifetimes of a few seconds so bounces come quickly.
fn sender_extra(dns: SocketAddr, more: &str) -> String {
    format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\nconnect_timeout_secs = 3\ndns_timeout_secs = 2\n\n[queue]\nretry_schedule_secs = [1]\nsecurity_lifetime_secs = 3\nmax_lifetime_secs = 3\n\n{more}"
    )
}

#[test]
fn mx_delivery_with_opportunistic_tls() {
    let dns = serve_zone(
        "127.0.11.53",
        "far.test",
        &[
            Rr::Mx("far.test", 10, "mx.far.test"),
            Rr::A("mx.far.test", [127, 0, 11, 2]),
        ],
    );
    let receiver = Moat::start_with(
        "127.0.11.2",
        "[[domain]]\nname = \"far.test\"\nroute = \"maildir\"\n",
        "",
    );
    let sender = Moat::start_with("127.0.11.1", &sender_extra(dns, ""), "");
    submit(&sender, "alice@moat.test", &["bob@far.test"], "over-mx");
    let mail = wait_for("delivery to the MX", Duration::from_secs(20), || {
        let m = receiver.mailbox("bob");
        (!m.is_empty()).then_some(m)
    });
    let msg = &mail[0];
    // The receiver's stamp shows the sender used STARTTLS; the sender's own stamp is below it.
    let first = msg.find("Received: ").unwrap();
    let second = msg[first + 1..]
        .find("Received: ")
        .map(|i| i + first + 1)
        .expect("two Received headers");
    assert!(msg[first..second].contains("with ESMTPS"), "{msg}");
    assert!(
        msg[first..second].contains("(using TLSv1.3 with cipher "),
        "{msg}"
    );
    assert!(
        msg.ends_with("Subject: over-mx\r\n\r\nbody of over-mx\r\n"),
        "{msg}"
    );
    wait_for(
        "the sender's queue to empty",
        Duration::from_secs(10),
        || (sender.queue_len() == 0).then_some(()),
    );
}

#[test]
fn relay_route_forwards_to_a_fixed_host() {
    let receiver = Moat::start_with(
        "127.0.11.12",
        "[[domain]]\nname = \"inside.test\"\nroute = \"maildir\"\n",
        "",
    );
    let extra =
        "[[domain]]\nname = \"inside.test\"\nroute = \"relay\"\nrelay = \"127.0.11.12:2525\"\n";
    let sender = Moat::start_with(
        "127.0.11.11",
        &sender_extra("127.0.11.53:53".parse().unwrap(), extra),
        "",
    );
    // inside.test is a routed domain: accepted from anyone (a gateway for an internal server).
    let mut c = Client::connect(sender.addr(SMTP));
    c.ehlo();
    assert!(
        c.send_mail(
            "x@example.org",
            &["carol@inside.test"],
            "Subject: gw\r\n\r\nx\r\n"
        )
        .is("250 2.0.0")
    );
    let mail = wait_for("relay delivery", Duration::from_secs(20), || {
        let m = receiver.mailbox("carol");
        (!m.is_empty()).then_some(m)
    });
    assert!(mail[0].contains("Subject: gw"), "{}", mail[0]);
}

#[test]
fn may_policy_delivers_in_plaintext_when_starttls_is_missing() {
    let dns = serve_zone(
        "127.0.11.53",
        "plain.test",
        &[
            Rr::Mx("plain.test", 10, "mx.plain.test"),
            Rr::A("mx.plain.test", [127, 0, 11, 22]),
        ],
    );
    let peer = plain_peer("127.0.11.22");
    let sender = Moat::start_with("127.0.11.21", &sender_extra(dns, ""), "");
    submit(&sender, "alice@moat.test", &["u@plain.test"], "plain-ok");
    wait_for("plaintext delivery", Duration::from_secs(20), || {
        peer.lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.starts_with("MESSAGE ") && l.contains("Subject: plain-ok"))
            .then_some(())
    });
}

#[test]
fn encrypt_policy_never_sends_in_plaintext_and_bounces() {
    let dns = serve_zone(
        "127.0.11.53",
        "notls.test",
        &[
            Rr::Mx("notls.test", 10, "mx.notls.test"),
            Rr::A("mx.notls.test", [127, 0, 11, 32]),
        ],
    );
    let peer = plain_peer("127.0.11.32");
    let policy = "[[tls_policy]]\ndomains = [\"notls.test\"]\nlevel = \"encrypt\"\n";
    let sender = Moat::start_with("127.0.11.31", &sender_extra(dns, policy), "");
    submit(
        &sender,
        "alice@moat.test",
        &["u@notls.test"],
        "must-encrypt",
    );
    // After the (3 s) security lifetime the sender gets a DSN naming the cause.
    let dsn = wait_for("the bounce", Duration::from_secs(30), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(dsn.contains("Status: 5.4.317"), "{dsn}");
    assert!(dsn.contains("did not offer STARTTLS"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; u@notls.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("From: \"Mail Delivery System\" <MAILER-DAEMON@mx.moat.test>"),
        "{dsn}"
    );
    // Invariant 2: the plaintext peer never saw a transaction.
    let log = peer.lock().unwrap().clone();
    assert!(
        !log.iter()
            .any(|(_, l)| l.to_ascii_uppercase().starts_with("MAIL FROM")),
        "{log:?}"
    );
    wait_for("the queue to empty", Duration::from_secs(10), || {
        (sender.queue_len() == 0).then_some(())
    });
}

#[test]
fn verify_policy_rejects_an_untrusted_certificate() {
    // The receiver's certificate is self-signed: fine for `may`, not for `verify`.
    let dns = serve_zone(
        "127.0.11.53",
        "strict.test",
        &[
            Rr::Mx("strict.test", 10, "mx.strict.test"),
            Rr::A("mx.strict.test", [127, 0, 11, 42]),
        ],
    );
    let receiver = Moat::start_with(
        "127.0.11.42",
        "[[domain]]\nname = \"strict.test\"\nroute = \"maildir\"\n",
        "",
    );
    let policy = "[[tls_policy]]\ndomains = [\"strict.test\"]\nlevel = \"verify\"\n";
    let sender = Moat::start_with("127.0.11.41", &sender_extra(dns, policy), "");
    submit(
        &sender,
        "alice@moat.test",
        &["v@strict.test"],
        "must-verify",
    );
    let dsn = wait_for("the bounce", Duration::from_secs(30), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(dsn.contains("Status: 5.7.320"), "{dsn}");
    assert!(dsn.contains("mx.strict.test"), "{dsn}");
    assert!(
        receiver.mailbox("v").is_empty(),
        "delivered despite a failed verification"
    );
}

#[test]
fn verify_policy_with_private_ca_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(dir.path(), &["mx.trusted.test"]);
    let dns = serve_zone(
        "127.0.11.53",
        "trusted.test",
        &[
            Rr::Mx("trusted.test", 10, "mx.trusted.test"),
            Rr::A("mx.trusted.test", [127, 0, 11, 52]),
        ],
    );
    let receiver_extra = maildir_receiver("trusted.test", &leaves[0]);
    let receiver = Moat::start_with("127.0.11.52", &receiver_extra, "");
    let policy = format!(
        "[[tls_policy]]\ndomains = [\"trusted.test\"]\nlevel = \"verify\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let sender = Moat::start_with("127.0.11.51", &sender_extra(dns, &policy), "");
    submit(&sender, "alice@moat.test", &["w@trusted.test"], "verified");
    let mail = wait_for("verified delivery", Duration::from_secs(20), || {
        receiver.mailbox("w").into_iter().next()
    });
    assert!(mail.contains("with ESMTPS"), "{mail}");
    assert!(sender.log().contains("verified"), "{}", sender.log());
}

#[test]
fn refused_connection_defers_then_bounces_and_null_mx_fails_at_once() {
    let dns = serve_zone(
        "127.0.11.53",
        "down.test",
        &[
            Rr::Mx("down.test", 10, "mx.down.test"),
            Rr::A("mx.down.test", [127, 0, 11, 62]),
            Rr::Mx("nullmx.down.test", 0, "."),
        ],
    );
    let sender = Moat::start_with("127.0.11.61", &sender_extra(dns, ""), "");
    submit(
        &sender,
        "alice@moat.test",
        &["x@nullmx.down.test"],
        "to-null-mx",
    );
    let dsn = wait_for("the null MX bounce", Duration::from_secs(20), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
    submit(
        &sender,
        "alice@moat.test",
        &["y@down.test"],
        "to-closed-port",
    );
    let dsn = wait_for(
        "the refused-connection bounce",
        Duration::from_secs(30),
        || {
            sender
                .mailbox("alice")
                .into_iter()
                .find(|m| m.contains("y@down.test"))
        },
    );
    assert!(dsn.contains("Status: 5.4.316"), "{dsn}");
    assert!(dsn.contains("refused"), "{dsn}");
}

#[test]
fn queue_admin_list_show_retry_bounce_delete() {
    let dns = serve_zone(
        "127.0.11.53",
        "later.test",
        &[
            Rr::Mx("later.test", 10, "mx.later.test"),
            Rr::A("mx.later.test", [127, 0, 11, 72]),
            Rr::Mx("never.later.test", 10, "mx.never.later.test"),
            Rr::A("mx.never.later.test", [127, 0, 11, 73]),
        ],
    );
    // Retries only hourly: anything delivered within the test was pushed by `queue retry`.
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\nconnect_timeout_secs = 3\n\n[queue]\nretry_schedule_secs = [3600]\n"
    );
    let sender = Moat::start_with("127.0.11.71", &extra, "");
    submit(&sender, "alice@moat.test", &["x@later.test"], "waits");
    let listing = wait_for("a deferred entry", Duration::from_secs(20), || {
        let (ok, text) = moat_cli(&sender, &["queue", "list", "--state", "deferred"]);
        (ok && text.contains("4.4.316")).then_some(text)
    });
    assert!(
        listing.contains("x@later.test  deferred  attempts 1"),
        "{listing}"
    );
    assert!(listing.contains("refused"), "{listing}");
    let id = listing.split_whitespace().next().unwrap().to_string();
    let (ok, shown) = moat_cli(&sender, &["queue", "show", &id]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("later.test: route mx, TLS policy may"),
        "{shown}"
    );
    assert!(shown.contains("Subject: waits"), "{shown}");
    // The far side comes up; retry delivers now instead of in an hour.
    let receiver = Moat::start_with(
        "127.0.11.72",
        "[[domain]]\nname = \"later.test\"\nroute = \"maildir\"\n",
        "",
    );
    let (ok, text) = moat_cli(&sender, &["queue", "retry", &id]);
    assert!(ok && text.contains(&format!("retrying {id}")), "{text}");
    wait_for("delivery after retry", Duration::from_secs(20), || {
        receiver.mailbox("x").into_iter().next()
    });
    // Bounce: the sender gets a DSN saying so.
    submit(
        &sender,
        "alice@moat.test",
        &["y@never.later.test"],
        "give-up",
    );
    wait_for("a second deferral", Duration::from_secs(20), || {
        let (_, text) = moat_cli(&sender, &["queue", "list", "--domain", "never.later.test"]);
        text.contains("deferred").then_some(())
    });
    let (ok, text) = moat_cli(
        &sender,
        &["queue", "bounce", "--domain", "never.later.test"],
    );
    assert!(ok && text.contains("bounced"), "{text}");
    let dsn = wait_for("the bounce", Duration::from_secs(20), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(
        dsn.contains("returned to the sender by the administrator"),
        "{dsn}"
    );
    // Delete: gone without a trace.
    submit(
        &sender,
        "alice@moat.test",
        &["z@never.later.test"],
        "delete-me",
    );
    let listing = wait_for("a third deferral", Duration::from_secs(20), || {
        let (_, text) = moat_cli(&sender, &["queue", "list", "--domain", "never.later.test"]);
        text.contains("deferred").then_some(text)
    });
    let id = listing.split_whitespace().next().unwrap().to_string();
    let (ok, text) = moat_cli(&sender, &["queue", "delete", &id]);
    assert!(ok && text.contains("deleted"), "{text}");
    let (_, text) = moat_cli(&sender, &["queue", "list"]);
    assert!(text.contains("0 message(s)"), "{text}");
    let (ok, text) = moat_cli(&sender, &["queue", "show", "0000000000000000"]);
    assert!(!ok && text.contains("no message"), "{text}");
}

/// One message to a `verify` domain (untrusted certificate there) and an unmatched domain
/// whose server has no STARTTLS.
fn split_world(base: u8) -> (SocketAddr, Moat, PeerLog) {
    let strict_ip = [127, 0, 11, base + 2];
    let plain_ip = [127, 0, 11, base + 3];
    let dns = serve_zone(
        "127.0.11.53",
        "mix.test",
        &[
            Rr::Mx("strict.mix.test", 10, "mx.strict.mix.test"),
            Rr::A("mx.strict.mix.test", strict_ip),
            Rr::Mx("plain.mix.test", 10, "mx.plain.mix.test"),
            Rr::A("mx.plain.mix.test", plain_ip),
        ],
    );
    let receiver = Moat::start_with(
        &format!("127.0.11.{}", base + 2),
        "[[domain]]\nname = \"strict.mix.test\"\nroute = \"maildir\"\n",
        "",
    );
    let peer = plain_peer(&format!("127.0.11.{}", base + 3));
    (dns, receiver, peer)
}

#[test]
fn opportunistic_for_unmatched_splits_the_message() {
    let (dns, receiver, peer) = split_world(80);
    let policy = "[[tls_policy]]\ndomains = [\"strict.mix.test\"]\nlevel = \"verify\"\n";
    let sender = Moat::start_with("127.0.11.81", &sender_extra(dns, policy), "");
    submit(
        &sender,
        "alice@moat.test",
        &["a@strict.mix.test", "b@plain.mix.test"],
        "split-on",
    );
    // The unmatched recipient goes out (in plaintext: its server has no TLS)...
    wait_for("the unmatched copy", Duration::from_secs(20), || {
        peer.lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.contains("Subject: split-on"))
            .then_some(())
    });
    // ...the matched one is held to `verify` and bounced.
    let dsn = wait_for("the bounce", Duration::from_secs(30), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(
        dsn.contains("Final-Recipient: rfc822; a@strict.mix.test"),
        "{dsn}"
    );
    assert!(!dsn.contains("b@plain.mix.test"), "{dsn}");
    assert!(receiver.mailbox("a").is_empty());
}

#[test]
fn without_opportunistic_for_unmatched_every_recipient_needs_tls() {
    let (dns, _receiver, peer) = split_world(90);
    let extra = sender_extra(
        dns,
        "[[tls_policy]]\ndomains = [\"strict.mix.test\"]\nlevel = \"verify\"\n",
    )
    .replace(
        "dns_timeout_secs = 2\n",
        "dns_timeout_secs = 2\nopportunistic_for_unmatched = false\n",
    );
    let sender = Moat::start_with("127.0.11.91", &extra, "");
    submit(
        &sender,
        "alice@moat.test",
        &["a@strict.mix.test", "b@plain.mix.test"],
        "split-off",
    );
    let dsn = wait_for("the bounce for both", Duration::from_secs(30), || {
        sender
            .mailbox("alice")
            .into_iter()
            .find(|m| m.contains("b@plain.mix.test") && m.contains("a@strict.mix.test"))
    });
    assert!(
        dsn.contains("Status: 5.4.317"),
        "the plaintext-only server fails the lifted requirement: {dsn}"
    );
    let log = peer.lock().unwrap().clone();
    assert!(
        !log.iter()
            .any(|(_, l)| l.to_ascii_uppercase().starts_with("MAIL FROM")),
        "{log:?}"
    );
}

#[test]
fn kill_9_keeps_deferred_state_and_delivers_each_message_once() {
    let dns = serve_zone(
        "127.0.11.53",
        "crash.test",
        &[
            Rr::Mx("crash.test", 10, "mx.crash.test"),
            Rr::A("mx.crash.test", [127, 0, 11, 102]),
        ],
    );
    let extra = format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\nconnect_timeout_secs = 3\n\n[queue]\nretry_schedule_secs = [3600]\n"
    );
    let mut sender = Moat::start_with("127.0.11.101", &extra, "");
    for i in 0..10 {
        submit(
            &sender,
            "alice@moat.test",
            &[&format!("u{i}@crash.test")],
            &format!("crash-{i}"),
        );
    }
    let before = wait_for("ten deferred messages", Duration::from_secs(30), || {
        let (_, text) = moat_cli(&sender, &["queue", "list", "--state", "deferred"]);
        text.contains("10 message(s)").then_some(text)
    });
    assert_eq!(before.matches("attempts 1").count(), 10, "{before}");
    sender.kill9();
    sender.spawn();
    // After the crash: same messages, same attempt counts, next attempt still in the future.
    let (_, after) = moat_cli(&sender, &["queue", "list", "--state", "deferred"]);
    assert!(after.contains("10 message(s)"), "{after}");
    assert_eq!(after.matches("attempts 1").count(), 10, "{after}");
    assert!(
        after.contains("next in 59m") || after.contains("next in 60m"),
        "{after}"
    );
    let receiver = Moat::start_with(
        "127.0.11.102",
        "[[domain]]\nname = \"crash.test\"\nroute = \"maildir\"\n",
        "",
    );
    let (ok, text) = moat_cli(&sender, &["queue", "retry", "--all"]);
    assert!(ok, "{text}");
    for i in 0..10 {
        let mb = format!("u{i}");
        let mail = wait_for("delivery after the crash", Duration::from_secs(20), || {
            let m = receiver.mailbox(&mb);
            (!m.is_empty()).then_some(m)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            receiver.mailbox(&mb).len(),
            1,
            "{mb} got {} copies",
            mail.len()
        );
        assert!(mail[0].contains(&format!("Subject: crash-{i}")));
    }
    wait_for("an empty queue", Duration::from_secs(10), || {
        (sender.queue_len() == 0).then_some(())
    });
}

/// MAIL/RCPT with raw parameters, then a small message.
fn submit_raw(m: &Moat, mail: &str, rcpts: &[&str], subject: &str) {
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    let r = c.cmd(mail);
    assert_eq!(r.code, 250, "{mail}: {r}");
    for rc in rcpts {
        let r = c.cmd(rc);
        assert_eq!(r.code, 250, "{rc}: {r}");
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes());
    let r = c.read_reply();
    assert!(r.is("250 2.0.0"), "{r}");
}

#[test]
fn dsn_notify_never_success_and_pass_on() {
    let receiver = Moat::start_with(
        "127.0.11.112",
        "[[domain]]\nname = \"dsn.test\"\nroute = \"maildir\"\n",
        "",
    );
    let extra = "[[domain]]\nname = \"dsn.test\"\nroute = \"relay\"\nrelay = \"127.0.11.112:2525\"\n\n[[domain]]\nname = \"gone.test\"\nroute = \"relay\"\nrelay = \"127.0.11.113:2525\"\n";
    let sender = Moat::start_with(
        "127.0.11.111",
        &sender_extra("127.0.11.53:53".parse().unwrap(), extra),
        "",
    );
    let c = Client::connect(sender.addr(SMTP)).ehlo();
    assert!(c.lines.iter().any(|l| l == "DSN"), "{c}");
    // NOTIFY=NEVER: the failure is silent.
    submit_raw(
        &sender,
        "MAIL FROM:<alice@moat.test>",
        &["RCPT TO:<x@gone.test> NOTIFY=NEVER"],
        "never",
    );
    wait_for("the silent failure", Duration::from_secs(20), || {
        (sender.queue_len() == 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sender.mailbox("alice").is_empty(),
        "NOTIFY=NEVER produced a notice"
    );
    // NOTIFY=SUCCESS on local delivery: a "delivered" report.
    submit_raw(
        &sender,
        "MAIL FROM:<alice@moat.test> ENVID=env+2D1",
        &["RCPT TO:<bob@moat.test> NOTIFY=SUCCESS"],
        "local",
    );
    let report = wait_for("the success report", Duration::from_secs(20), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(
        report.contains("Subject: Successful Mail Delivery Report"),
        "{report}"
    );
    assert!(report.contains("Action: delivered"), "{report}");
    assert!(report.contains("Original-Envelope-Id: env-1"), "{report}");
    // Relayed to a DSN-capable server: the parameters go along, and the final hop reports.
    submit_raw(
        &sender,
        "MAIL FROM:<alice@moat.test> RET=HDRS ENVID=pass1",
        &["RCPT TO:<carol@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Carol@DSN.test"],
        "pass-on",
    );
    wait_for("relay delivery", Duration::from_secs(20), || {
        receiver.mailbox("carol").into_iter().next()
    });
    // The receiver's own `moat.test` mailbox for alice gets the report from the final hop.
    let report = wait_for("the final hop's report", Duration::from_secs(20), || {
        receiver.mailbox("alice").into_iter().next()
    });
    assert!(report.contains("Action: delivered"), "{report}");
    assert!(
        report.contains("Original-Recipient: rfc822; Carol@DSN.test"),
        "{report}"
    );
    assert!(report.contains("Original-Envelope-Id: pass1"), "{report}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sender.mailbox("alice").len(),
        1,
        "the first hop must not report a relay the next hop reports"
    );
}

#[test]
fn delay_warning_then_still_queued() {
    let extra =
        "[[domain]]\nname = \"slow.test\"\nroute = \"relay\"\nrelay = \"127.0.11.123:2525\"\n";
    let cfg = sender_extra("127.0.11.53:53".parse().unwrap(), extra).replace(
        "security_lifetime_secs = 3\nmax_lifetime_secs = 3\n",
        "max_lifetime_secs = 600\ndelay_warning_secs = 1\n",
    );
    let sender = Moat::start_with("127.0.11.121", &cfg, "");
    submit(&sender, "alice@moat.test", &["s@slow.test"], "slowly");
    let warning = wait_for("the delay warning", Duration::from_secs(20), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(
        warning.contains("Subject: Delayed Mail (still being retried)"),
        "{warning}"
    );
    assert!(warning.contains("Action: delayed"), "{warning}");
    assert!(warning.contains("Status: 4.4.316"), "{warning}");
    assert!(warning.contains("Will-Retry-Until: "), "{warning}");
    // Only one warning, and the message stays queued.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sender.mailbox("alice").len(), 1);
    let (_, text) = moat_cli(&sender, &["queue", "list"]);
    assert!(
        text.contains("1 message(s)") && text.contains("deferred"),
        "{text}"
    );
}

#[test]
fn sessions_are_reused_for_the_next_message() {
    let receiver = Moat::start_with(
        "127.0.11.132",
        "[[domain]]\nname = \"reuse.test\"\nroute = \"maildir\"\n",
        "",
    );
    let extra =
        "[[domain]]\nname = \"reuse.test\"\nroute = \"relay\"\nrelay = \"127.0.11.132:2525\"\n";
    let sender = Moat::start_with(
        "127.0.11.131",
        &sender_extra("127.0.11.53:53".parse().unwrap(), extra),
        "",
    );
    for i in 0..5 {
        submit(
            &sender,
            "alice@moat.test",
            &[&format!("r{i}@reuse.test")],
            &format!("reuse-{i}"),
        );
        let mb = format!("r{i}");
        wait_for("delivery", Duration::from_secs(20), || {
            receiver.mailbox(&mb).into_iter().next()
        });
    }
    let log = sender.log();
    assert!(log.contains("(session reused)"), "{log}");
    let tls_sessions = receiver.log().matches("TLS established").count();
    assert!(
        tls_sessions < 5,
        "5 messages took {tls_sessions} TLS sessions"
    );
    // Still opportunistic TLS on the reused session.
    assert!(receiver.mailbox("r4")[0].contains("with ESMTPS"));
}

#[test]
fn smarthost_with_auth_over_starttls_and_implicit_tls() {
    let receiver = Moat::start_with(
        "127.0.11.142",
        "[[domain]]\nname = \"far.test\"\nroute = \"maildir\"\n\n[[domain]]\nname = \"far2.test\"\nroute = \"maildir\"\n",
        "",
    );
    receiver.add_user("relayer", "pw-for-relay");
    let secrets = tempfile::tempdir().unwrap();
    let good = secrets.path().join("good");
    let bad = secrets.path().join("bad");
    std::fs::write(&good, "pw-for-relay\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();
    let extra = format!(
        "[[domain]]\nname = \"far.test\"\nroute = \"relay\"\nrelay = \"127.0.11.142:{SUBMISSION}\"\nrelay_auth_user = \"relayer\"\nrelay_auth_password_file = \"{g}\"\n\n\
         [[domain]]\nname = \"far2.test\"\nroute = \"relay\"\nrelay = \"127.0.11.142:{SMTPS}\"\nrelay_implicit_tls = true\nrelay_auth_user = \"relayer\"\nrelay_auth_password_file = \"{g}\"\n\n\
         [[domain]]\nname = \"far3.test\"\nroute = \"relay\"\nrelay = \"127.0.11.142:{SUBMISSION}\"\nrelay_auth_user = \"relayer\"\nrelay_auth_password_file = \"{b}\"\n",
        g = good.display(),
        b = bad.display()
    );
    let cfg = sender_extra("127.0.11.53:53".parse().unwrap(), &extra)
        .replace(
            "security_lifetime_secs = 3\nmax_lifetime_secs = 3\n",
            "max_lifetime_secs = 600\n",
        )
        .replace("retry_schedule_secs = [1]", "retry_schedule_secs = [3600]");
    let sender = Moat::start_with("127.0.11.141", &cfg, "");
    submit(
        &sender,
        "alice@moat.test",
        &["p@far.test"],
        "via-submission",
    );
    submit(&sender, "alice@moat.test", &["q@far2.test"], "via-smtps");
    let a = wait_for("submission relay", Duration::from_secs(20), || {
        receiver.mailbox("p").into_iter().next()
    });
    assert!(a.contains("with ESMTPSA"), "authenticated over TLS: {a}");
    let b = wait_for("implicit TLS relay", Duration::from_secs(20), || {
        receiver.mailbox("q").into_iter().next()
    });
    assert!(b.contains("with ESMTPSA"), "{b}");
    // Wrong credentials: deferred (fixable configuration), not bounced.
    submit(&sender, "alice@moat.test", &["r@far3.test"], "bad-password");
    let listing = wait_for("the deferral", Duration::from_secs(20), || {
        let (_, text) = moat_cli(&sender, &["queue", "list", "--domain", "far3.test"]);
        text.contains("deferred").then_some(text)
    });
    assert!(
        listing.contains("4.7.8") && listing.contains("refused the relay credentials"),
        "{listing}"
    );
    assert!(
        !sender.log().contains("pw-for-relay") && !sender.log().contains("wrong"),
        "password in the log"
    );
    assert!(sender.mailbox("alice").is_empty());
    assert!(
        receiver.mailbox("r").is_empty(),
        "delivered with the wrong credentials"
    );
}

#[test]
fn verify_policy_bounces_an_expired_certificate_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    // Valid for a year ending in 2021.
    let (ca, leaf) = make_cert_valid(dir.path(), "mx.old.test", 1_577_836_800, 1_609_459_200);
    let dns = serve_zone(
        "127.0.11.53",
        "old.test",
        &[
            Rr::Mx("old.test", 10, "mx.old.test"),
            Rr::A("mx.old.test", [127, 0, 11, 152]),
        ],
    );
    let receiver_extra = maildir_receiver("old.test", &leaf);
    let receiver = Moat::start_with("127.0.11.152", &receiver_extra, "");
    let policy = format!(
        "[[tls_policy]]\ndomains = [\"old.test\"]\nlevel = \"verify\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let sender = Moat::start_with("127.0.11.151", &sender_extra(dns, &policy), "");
    submit(&sender, "alice@moat.test", &["e@old.test"], "expired-cert");
    let dsn = wait_for("the bounce", Duration::from_secs(30), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(dsn.contains("Status: 5.7.320"), "{dsn}");
    assert!(
        dsn.contains("expired"),
        "the DSN must name the cause: {dsn}"
    );
    assert!(dsn.contains("mx.old.test"), "{dsn}");
    assert!(receiver.mailbox("e").is_empty());
}

#[test]
fn mx_pointing_at_our_own_address_is_a_loop() {
    let dns = serve_zone(
        "127.0.11.53",
        "loop.test",
        &[
            // Another name, but our own address and port: delivering there would loop.
            Rr::Mx("loop.test", 10, "alias.loop.test"),
            Rr::A("alias.loop.test", [127, 0, 11, 161]),
            // Ourselves first, a real host second: the real host gets the mail.
            Rr::Mx("mixed.loop.test", 10, "alias.loop.test"),
            Rr::Mx("mixed.loop.test", 20, "mx2.loop.test"),
            Rr::A("mx2.loop.test", [127, 0, 11, 162]),
        ],
    );
    let receiver = Moat::start_with(
        "127.0.11.162",
        "[[domain]]\nname = \"mixed.loop.test\"\nroute = \"maildir\"\n",
        "",
    );
    let sender = Moat::start_with("127.0.11.161", &sender_extra(dns, ""), "");
    submit(&sender, "alice@moat.test", &["l@loop.test"], "loops");
    let dsn = wait_for("the loop bounce", Duration::from_secs(20), || {
        sender.mailbox("alice").into_iter().next()
    });
    assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    assert!(dsn.contains("loops back to myself"), "{dsn}");
    submit(
        &sender,
        "alice@moat.test",
        &["m@mixed.loop.test"],
        "skips-self",
    );
    let mail = wait_for("delivery to the other MX", Duration::from_secs(20), || {
        receiver.mailbox("m").into_iter().next()
    });
    assert!(mail.contains("Subject: skips-self"), "{mail}");
}

/// Damage found at start-up is named where an operator looks: a journal record that cannot be
/// read appears in `moat queue list` with its queue id and sender, and a queued message file
/// that cannot be read is listed and counted, so `list` and `count` agree.
#[test]
fn damaged_spool_entries_are_named_in_queue_list() {
    // An MX that takes connections and never greets: the first delivery pass stays open, so
    // the messages are still in their journal records when the server is killed.
    let mx = HoldingMx::start("127.0.18.72");
    let dns = serve_zone(
        "127.0.18.53",
        "hold.test",
        &[
            Rr::Mx("hold.test", 10, "mx.hold.test"),
            Rr::A("mx.hold.test", [127, 0, 18, 72]),
        ],
    );
    let extra = relay_config(dns);
    let mut m = Moat::start_with("127.0.18.71", &extra, "");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            submit(
                &m,
                "alice@moat.test",
                &["x@hold.test"],
                &format!("held {i}"),
            )
        })
        .collect();
    wait_for(
        "three deliveries under way",
        Duration::from_secs(20),
        || (mx.held() >= 3).then_some(()),
    );
    m.kill9();

    // Flip a byte inside the second message's record.
    let journal = m.data().join("spool").join("journal");
    let mut damaged = false;
    for entry in std::fs::read_dir(&journal).unwrap() {
        let path = entry.unwrap().path();
        let mut data = std::fs::read(&path).unwrap();
        let scan = moat::queue::journal::scan(&data);
        if let Some(r) = scan.records.iter().find(|r| r.id == ids[1]) {
            let at = (r.offset + u64::from(r.len)) as usize - 5;
            data[at] ^= 0x20;
            std::fs::write(&path, &data).unwrap();
            damaged = true;
        }
    }
    assert!(damaged, "the second message's journal record was found");
    // And a queued message file that does not parse.
    let bogus = "0000000000000ABC";
    assert!(moat::util::is_queue_id(bogus));
    std::fs::write(m.data().join("spool").join("queue").join(bogus), b"garbage").unwrap();

    m.spawn();
    let (ok, list) = moat_cli(&m, &["queue", "list"]);
    assert!(ok, "{list}");
    assert!(list.contains(&ids[0]) && list.contains(&ids[2]), "{list}");
    assert!(list.contains("1 damaged journal record(s)"), "{list}");
    let lost_line = list
        .lines()
        .find(|l| l.contains(&ids[1]))
        .unwrap_or_else(|| panic!("the lost id is named: {list}"));
    assert!(lost_line.contains("from alice@moat.test"), "{lost_line}");
    assert!(lost_line.contains("journal/seg-"), "{lost_line}");
    assert!(
        list.lines()
            .any(|l| l.contains(bogus) && l.contains("unreadable")),
        "{list}"
    );
    let (ok, count) = moat_cli(&m, &["queue", "count"]);
    assert!(ok, "{count}");
    assert_eq!(count.trim(), "3", "count: {count}");
    assert!(
        list.contains("\n3 message(s)\n"),
        "list and count agree: {list}"
    );
}
