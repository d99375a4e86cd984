//! Inbound SMTP over real sockets against the real binary: STARTTLS, implicit TLS, AUTH,
//! require-TLS, relay control, limits, pipelining, STARTTLS injection, smuggling, SNI,
//! certificate reload, SIGTERM and kill -9 durability.
//!
//! Each test runs its own server on its own 127.0.x.y address, so they run in parallel.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn starttls_then_delivery_with_received_stamp() {
    let m = Moat::start("127.0.10.1");
    let mut c = Client::connect(m.addr(SMTP));
    let r = c.ehlo();
    assert!(r.lines.iter().any(|l| l == "STARTTLS"), "{r}");
    assert!(
        !r.lines.iter().any(|l| l.starts_with("AUTH")),
        "AUTH offered in plaintext: {r}"
    );
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(r.lines.iter().any(|l| l == ext), "{ext} missing: {r}");
    }
    c.starttls("mx.moat.test");
    assert_eq!(c.tls_version, Some(rustls::ProtocolVersion::TLSv1_3));
    let r = c.ehlo();
    assert!(
        !r.lines.iter().any(|l| l == "STARTTLS"),
        "STARTTLS offered inside TLS: {r}"
    );
    assert!(r.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{r}");
    let r = c.send_mail(
        "alice@example.org",
        &["bob@moat.test"],
        "Subject: t1\r\n\r\nhello\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}");
    let mail = m.wait_mailbox("bob", 1);
    assert_eq!(mail.len(), 1);
    let msg = &mail[0];
    assert!(msg.starts_with("Return-Path: <alice@example.org>\r\nDelivered-To: bob@moat.test\r\nReceived: from client.test ([127.0.0.1])\r\n\t(using TLSv1.3 with cipher TLS_"), "{msg}");
    assert!(msg.contains(" bits) key-exchange "), "{msg}");
    assert!(
        msg.contains("by mx.moat.test (Moat) with ESMTPS id "),
        "{msg}"
    );
    assert!(msg.contains("\tfor <bob@moat.test>; "), "{msg}");
    assert!(msg.ends_with("Subject: t1\r\n\r\nhello\r\n"), "{msg}");
    assert_eq!(c.cmd("STARTTLS").code, 503);
    assert!(c.cmd("QUIT").is("221 2.0.0"));
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    // CVE-2011-0411: commands sent in the same packet as STARTTLS must not be executed.
    let m = Moat::start("127.0.10.2");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n");
    let r = c.read_reply();
    assert!(r.is("220 2.0.0"), "{r}");
    c.handshake("mx.moat.test", &[&rustls::version::TLS13])
        .unwrap();
    // The first reply inside TLS must answer our EHLO, not the injected RSET.
    let r = c.cmd("EHLO client.test");
    assert_eq!(r.code, 250);
    assert!(r.lines.len() > 1, "expected the EHLO reply, got {r}");
    // And no transaction was started by the injected MAIL.
    assert!(c.cmd("RCPT TO:<bob@moat.test>").is("503 5.5.1"));
}

#[test]
fn starttls_forgets_earlier_state() {
    let m = Moat::start("127.0.10.3");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    c.starttls("mx.moat.test");
    // EHLO must be sent again; the earlier transaction is gone.
    assert!(c.cmd("MAIL FROM:<a@example.org>").is("503 5.5.1"));
    c.ehlo();
    assert!(c.cmd("RCPT TO:<bob@moat.test>").is("503 5.5.1"));
}

#[test]
fn implicit_tls_listener() {
    let m = Moat::start("127.0.10.4");
    let mut c = Client::connect_tls(m.addr(SMTPS), "mx.moat.test");
    let r = c.ehlo();
    assert!(!r.lines.iter().any(|l| l == "STARTTLS"), "{r}");
    assert!(r.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{r}");
    assert!(
        c.send_mail("", &["carol@moat.test"], "Subject: t\r\n\r\nx\r\n")
            .is("250 2.0.0")
    );
    let mail = m.wait_mailbox("carol", 1);
    assert!(mail[0].contains("with ESMTPS id"), "{}", mail[0]);
    // TLS 1.2 is accepted too.
    let mut c = Client::connect_raw(m.addr(SMTPS));
    c.handshake("mx.moat.test", &[&rustls::version::TLS12])
        .unwrap();
    assert_eq!(c.tls_version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(c.read_reply().code, 220);
}

#[test]
fn submission_requires_tls_then_auth() {
    let m = Moat::start("127.0.10.5");
    m.add_user("alice", "correct horse");
    let mut c = Client::connect(m.addr(SUBMISSION));
    c.ehlo();
    assert!(c.cmd("MAIL FROM:<alice@moat.test>").is("530 5.7.0"));
    assert!(c.cmd("RCPT TO:<bob@moat.test>").is("530 5.7.0"));
    assert!(
        c.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            .is("538 5.7.11")
    );
    c.starttls("mx.moat.test");
    c.ehlo();
    let r = c.cmd("MAIL FROM:<alice@moat.test>");
    assert!(
        r.is("530 5.7.0") && r.text().contains("Authentication required"),
        "{r}"
    );
    // AUTH LOGIN, two steps.
    assert!(c.cmd("AUTH LOGIN").is("334 VXNlcm5hbWU6"));
    assert!(c.cmd("YWxpY2U=").is("334 UGFzc3dvcmQ6"));
    assert!(c.cmd("Y29ycmVjdCBob3JzZQ==").is("235 2.7.0"));
    // Authenticated: relaying to another domain is allowed.
    let r = c.send_mail(
        "alice@moat.test",
        &["someone@remote.example"],
        "Subject: r\r\n\r\nx\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}");
    let r = c.send_mail(
        "alice@moat.test",
        &["bob@moat.test"],
        "Subject: l\r\n\r\nx\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}");
    let mail = m.wait_mailbox("bob", 1);
    assert!(mail[0].contains("with ESMTPSA id"), "{}", mail[0]);
}

#[test]
fn auth_plain_in_the_clear_is_refused_without_checking() {
    let m = Moat::start("127.0.10.6");
    m.add_user("alice", "pw");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    for _ in 0..5 {
        // Never evaluated, so never counted as failures either.
        assert!(c.cmd("AUTH PLAIN AGFsaWNlAHB3").is("538 5.7.11"));
    }
    assert!(!m.log().contains("AUTH failed") && !m.log().contains("AUTH succeeded"));
}

#[test]
fn auth_failures_end_in_421() {
    let m = Moat::start("127.0.10.7");
    m.add_user("alice", "pw");
    let mut c = Client::connect_tls(m.addr(SMTPS), "mx.moat.test");
    c.ehlo();
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").is("535 5.7.8"));
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").is("535 5.7.8"));
    let r = c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n");
    assert!(r.is("421 4.7.0"), "{r}");
    assert!(c.closed());
    // Correct credentials on a new connection still work (3 < per-address limit of 10).
    let mut c = Client::connect_tls(m.addr(SMTPS), "mx.moat.test");
    c.ehlo();
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHB3").is("235 2.7.0"));
}

#[test]
fn auth_failures_per_address_are_limited() {
    let m = Moat::start_with(
        "127.0.10.8",
        "",
        "auth_ip_max_failures = 2\nauth_max_failures = 5",
    );
    m.add_user("alice", "pw");
    let mut c = Client::connect_tls(m.addr(SMTPS), "mx.moat.test");
    c.ehlo();
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").is("535 5.7.8"));
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").is("421 4.7.0"));
    let mut c = Client::connect_tls(m.addr(SMTPS), "mx.moat.test");
    c.ehlo();
    // Even the right password is refused from this address for now.
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHB3").is("421 4.7.0"));
}

#[test]
fn relay_control_and_address_tricks() {
    let m = Moat::start_with("127.0.10.9", "", "max_errors = 100");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<x@example.org>").code, 250);
    let cases = [
        ("<bob@moat.test>", "250 2.1.5"),
        ("<BOB@MOAT.TEST>", "250 2.1.5"),
        ("<anyone@sink.test>", "250 2.1.5"),
        ("<postmaster>", "250 2.1.5"),
        ("<x@remote.example>", "554 5.7.1"),
        ("<\"x@remote.example\"@moat.test>", "554 5.7.1"),
        ("<x%remote.example@moat.test>", "554 5.7.1"),
        ("<remote.example!x@moat.test>", "554 5.7.1"),
        ("<@moat.test:x@remote.example>", "554 5.7.1"),
        ("<@moat.test,@moat.test:x@remote.example>", "554 5.7.1"),
        // smtp-proto refuses address literals as syntax (501); either way not a relay.
        ("<x@[127.0.0.1]>", "5"),
        ("<x@moat.test.>", "501 5.1.3"),
        ("<x@remote.example.>", "501 5.1.3"),
        ("<x@moat.test@remote.example>", "501 5.1.3"),
        ("<../../etc@moat.test>", "501 5.1.3"),
        ("<etc/passwd@moat.test>", "550 5.1.1"),
        ("<>", "501"),
    ];
    for (rcpt, want) in cases {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert!(r.is(want), "RCPT TO:{rcpt}: want {want}, got {r}");
    }
    drop(c);
    // A trusted network may relay.
    let m2 = Moat::start_with(
        "127.0.10.10",
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]",
        "",
    );
    let mut c = Client::connect(m2.addr(SMTP));
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<x@example.org>").code, 250);
    assert!(c.cmd("RCPT TO:<x@remote.example>").is("250 2.1.5"));
}

#[test]
fn limits_line_size_recipients_errors() {
    let m = Moat::start_with(
        "127.0.10.11",
        "",
        "max_message_size = 1000\nmax_recipients = 3\nmax_errors = 5\nmax_line_length = 600",
    );
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    let long = format!("NOOP {}", "x".repeat(700));
    assert!(c.cmd(&long).is("500 5.5.2"));
    assert!(c.cmd("MAIL FROM:<a@example.org> SIZE=5000").is("552 5.3.4"));
    assert_eq!(c.cmd("MAIL FROM:<a@example.org> SIZE=500").code, 250);
    for i in 0..3 {
        assert_eq!(c.cmd(&format!("RCPT TO:<u{i}@moat.test>")).code, 250);
    }
    assert!(c.cmd("RCPT TO:<u9@moat.test>").is("452 4.5.3"));
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(format!("Subject: big\r\n\r\n{}\r\n.\r\n", "y".repeat(2000)).as_bytes());
    assert!(c.read_reply().is("552 5.3.4"));
    // Errors so far: line, SIZE, DATA size = 3. Two more end the session.
    assert!(c.cmd("FOO").is("500 5.5.1"));
    let r = c.cmd("RCPT TO:<a@moat.test>");
    assert!(r.is("503 5.5.1"), "{r}");
    let r = c.read_reply();
    assert!(r.is("421 4.7.0"), "{r}");
    assert!(c.closed());
}

#[test]
fn bad_bytes_in_commands() {
    let m = Moat::start("127.0.10.12");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    c.send(b"NOOP \x00x\r\n");
    assert!(c.read_reply().is("500 5.5.2"));
    c.send(b"NOOP a\rb\r\n");
    assert!(c.read_reply().is("500 5.5.2"));
    c.send(b"NOOP \xff\xfe\r\n");
    assert!(c.read_reply().is("500 5.5.2"));
    c.send("MAIL FROM:<jösé@example.org>\r\n".as_bytes());
    assert!(c.read_reply().is("553 5.6.7"));
    c.send("MAIL FROM:<jösé@example.org> SMTPUTF8\r\n".as_bytes());
    assert!(c.read_reply().is("250 2.1.0"));
}

#[test]
fn pipelined_transaction_in_one_write() {
    let m = Moat::start("127.0.10.13");
    let mut c = Client::connect(m.addr(SMTP));
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@moat.test>\r\nRCPT TO:<nobody@remote.example>\r\nRCPT TO:<carol@moat.test>\r\nDATA\r\n");
    assert_eq!(c.read_reply().code, 250);
    assert!(c.read_reply().is("250 2.1.0"));
    assert!(c.read_reply().is("250 2.1.5"));
    assert!(c.read_reply().is("554 5.7.1"));
    assert!(c.read_reply().is("250 2.1.5"));
    assert_eq!(c.read_reply().code, 354);
    c.send(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n");
    assert!(c.read_reply().is("250 2.0.0"));
    assert!(c.read_reply().is("221 2.0.0"));
    assert_eq!(m.wait_mailbox("bob", 1).len(), 1);
    assert_eq!(m.wait_mailbox("carol", 1).len(), 1);
    // One recipient was refused; the other two got the message (per-recipient outcomes).
    let bob = &m.mailbox("bob")[0];
    assert!(
        !bob.contains("\tfor <"),
        "multi-recipient stamp must not name a recipient: {bob}"
    );
}

#[test]
fn smuggling_sequences_never_split_a_message() {
    let m = Moat::start("127.0.10.14");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    for smuggle in [
        &b"\r\n.\n"[..],
        b"\n.\r\n",
        b"\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
    ] {
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@moat.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        let mut data = b"Subject: outer\r\n\r\nhello".to_vec();
        data.extend_from_slice(smuggle);
        data.extend_from_slice(b"MAIL FROM:<admin@moat.test>\r\nRCPT TO:<carol@moat.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n");
        c.send(&data);
        // Exactly one reply: the whole thing is one message, rejected for its bare line ending.
        let r = c.read_reply();
        assert!(
            r.is("550 5.6.2"),
            "{:?}: {r}",
            String::from_utf8_lossy(smuggle)
        );
        assert_eq!(c.cmd("NOOP").code, 250, "no smuggled replies pending");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(m.mailbox("carol").is_empty() && m.mailbox("bob").is_empty());
}

#[test]
fn bare_newline_normalize_listener() {
    let extra = "[[listener]]\nname = \"lenient\"\naddress = \"127.0.10.15:2526\"\nmode = \"smtp\"\nbare_newline = \"normalize\"";
    let m = Moat::start_with("127.0.10.15", extra, "");
    let mut c = Client::connect("127.0.10.15:2526".parse().unwrap());
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@moat.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: n\r\n\r\nline1\nline2\n.\nstill data\r\n.\r\n");
    assert!(c.read_reply().is("250 2.0.0"));
    let mail = m.wait_mailbox("bob", 1);
    assert!(
        mail[0].ends_with("Subject: n\r\n\r\nline1\r\nline2\r\n.\r\nstill data\r\n"),
        "{:?}",
        mail[0]
    );
}

#[test]
fn bdat_chunks() {
    let m = Moat::start("127.0.10.16");
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@moat.test>").code, 250);
    let part1 = b"Subject: chunky\r\n\r\n";
    let part2 = b"MAIL FROM:<x@y>\r\n.\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert!(c.read_reply().is("250 2.0.0"));
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    assert!(c.read_reply().is("250 2.0.0"));
    let mail = m.wait_mailbox("bob", 1);
    assert!(
        mail[0].ends_with("Subject: chunky\r\n\r\nMAIL FROM:<x@y>\r\n.\r\n"),
        "{}",
        mail[0]
    );
    // BDAT without a transaction: its bytes are still read, not run as commands.
    c.send(b"BDAT 6 LAST\r\nRSET\r\n");
    assert!(c.read_reply().is("503 5.5.1"));
    assert_eq!(c.cmd("NOOP").code, 250);
}

#[test]
fn idle_client_times_out() {
    let m = Moat::start_with(
        "127.0.10.17",
        "",
        "command_timeout_secs = 1\nhandshake_timeout_secs = 1",
    );
    let mut c = Client::connect(m.addr(SMTP));
    let start = Instant::now();
    let r = c.read_reply();
    assert!(r.is("421 4.4.2"), "{r}");
    assert!(c.closed());
    assert!(start.elapsed() < Duration::from_secs(10));
    // A client that never starts its TLS handshake is dropped too.
    let mut c = Client::connect_raw(m.addr(SMTPS));
    assert!(c.closed());
}

#[test]
fn connection_limit_per_address() {
    let m = Moat::start_with("127.0.10.18", "", "max_connections_per_ip = 2");
    // The harness never connects to see whether the server is up (it waits for the server's
    // ready line), so both slots are free from the start.
    let connect = || {
        let mut c = Client::connect_raw(m.addr(SMTP));
        let r = c.read_reply();
        assert_eq!(r.code, 220, "{r}");
        c
    };
    let _a = connect();
    let _b = connect();
    let mut c = Client::connect_raw(m.addr(SMTP));
    let r = c.read_reply();
    assert!(r.is("421 4.7.0"), "{r}");
    assert!(c.closed());
    drop(_a);
    // The slot is released once the server sees the close, which takes a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let _d = loop {
        let mut c = Client::connect_raw(m.addr(SMTP));
        let r = c.read_reply();
        if r.code == 220 {
            break c;
        }
        assert!(Instant::now() < deadline, "slot not released: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
}

#[test]
fn sni_picks_certificate_and_files_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, leaves) = make_certs(dir.path(), &["a.moat.test", "b.moat.test"]);
    let extra = format!(
        "[tls]\nreload_interval_secs = 1\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
        leaves[0].0.display(),
        leaves[0].1.display(),
        leaves[1].0.display(),
        leaves[1].1.display()
    );
    let m = Moat::start_with("127.0.10.19", &extra, "");
    let a = pem_der(&leaves[0].0);
    let b = pem_der(&leaves[1].0);
    let c = Client::connect_tls(m.addr(SMTPS), "b.moat.test");
    assert_eq!(c.peer_cert.as_deref(), Some(&b[..]));
    let c = Client::connect_tls(m.addr(SMTPS), "unknown.moat.test");
    assert_eq!(
        c.peer_cert.as_deref(),
        Some(&a[..]),
        "default is the first certificate"
    );
    // Replace b's files with a new certificate for the same name: picked up without restart.
    let dir2 = tempfile::tempdir().unwrap();
    let (_ca2, new) = make_certs(dir2.path(), &["b.moat.test"]);
    std::fs::copy(&new[0].1, &leaves[1].1).unwrap();
    std::fs::copy(&new[0].0, &leaves[1].0).unwrap();
    let fresh = pem_der(&new[0].0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = Client::connect_tls(m.addr(SMTPS), "b.moat.test");
        if c.peer_cert.as_deref() == Some(&fresh[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "certificate not reloaded: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken file keeps the old certificate in use.
    std::fs::write(&leaves[1].0, "garbage").unwrap();
    m.signal(1);
    std::thread::sleep(Duration::from_millis(500));
    let c = Client::connect_tls(m.addr(SMTPS), "b.moat.test");
    assert_eq!(c.peer_cert.as_deref(), Some(&fresh[..]));
}

#[test]
fn sigterm_answers_421_and_keeps_acknowledged_mail() {
    let mut m = Moat::start("127.0.10.20");
    let mut idle = Client::connect(m.addr(SMTP));
    idle.ehlo();
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    assert!(
        c.send_mail(
            "a@example.org",
            &["x@remote.example"],
            "Subject: q\r\n\r\nx\r\n"
        )
        .is("554 5.7.1")
    );
    assert_eq!(c.cmd("RSET").code, 250);
    assert!(
        c.send_mail(
            "a@example.org",
            &["bob@moat.test"],
            "Subject: q\r\n\r\nx\r\n"
        )
        .is("250 2.0.0")
    );
    let status = m.terminate();
    assert!(status.success(), "exit status {status}");
    let r = idle.read_reply();
    assert!(r.is("421 4.4.2"), "{r}");
    m.spawn();
    assert_eq!(m.wait_mailbox("bob", 1).len(), 1);
}

#[test]
fn kill_9_loses_no_acknowledged_message() {
    let mut m = Moat::start("127.0.10.21");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for t in 0..4 {
        let addr = m.addr(SMTP);
        let acked = acked.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..1000 {
                let tag = format!("T{t}-{i}");
                let Ok(s) = std::net::TcpStream::connect(addr) else {
                    return;
                };
                drop(s);
                let result = std::panic::catch_unwind(|| {
                    let mut c = Client::connect(addr);
                    c.ehlo();
                    c.send_mail(
                        "a@example.org",
                        &["bob@moat.test"],
                        &format!("Subject: {tag}\r\n\r\nbody {tag}\r\n"),
                    )
                });
                match result {
                    Ok(r) if r.code == 250 => acked.lock().unwrap().push(tag),
                    _ => return,
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(700));
    m.kill9();
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "too few messages before the kill: {}",
        acked.len()
    );
    m.spawn();
    let mail = m.wait_mailbox("bob", acked.len());
    std::thread::sleep(Duration::from_millis(300));
    let mail_now = m.mailbox("bob");
    assert!(mail_now.len() >= mail.len());
    for tag in &acked {
        let n = mail_now
            .iter()
            .filter(|m| m.contains(&format!("Subject: {tag}\r\n")))
            .count();
        assert_eq!(n, 1, "acknowledged message {tag} delivered {n} times");
    }
    for msg in &mail_now {
        // Every delivered file is whole: its body names the same tag as its Subject.
        let tag = msg
            .split("Subject: ")
            .nth(1)
            .and_then(|s| s.split("\r\n").next())
            .unwrap_or("?");
        assert!(
            msg.ends_with(&format!("\r\n\r\nbody {tag}\r\n")),
            "partial message: {msg:?}"
        );
    }
    assert!(
        std::fs::read_dir(m.data().join("spool/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn config_check_reports_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "hostname = \"mx.test\"\n[[listener]]\naddress = \"127.0.0.1:25\"\nmode = \"smtp\"\n[limits]\nmax_recipients = 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:6: limits[0].max_recipients: must be greater than 0"),
        "{err}"
    );
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[listener]]\naddress = \"127.0.0.1:25\"\nmode = \"smtp\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn embedded_default_runs_without_config() {
    // The README's first command: no config, no root, a fresh data dir. Its addresses are the
    // embedded default's (127.0.0.1:2525, :2465, :2587, admin :2580), which another server on
    // this machine may hold, so the test never trusts a port that merely answers: it waits for
    // its own child's ready line (failing at once, with the reason, if the child exits), and
    // after connecting it checks that the server it reached is that child.
    let dir = tempfile::tempdir().unwrap();
    let out = ChildOutput::new(dir.path(), "moat");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moat"));
    cmd.arg("serve").current_dir(dir.path());
    out.attach(&mut cmd);
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.spawn().unwrap());
    let what = "`moat serve` (embedded default config)";
    let lines = wait_ready(&mut child.0, what, &out, Duration::from_secs(20));
    for addr in ["127.0.0.1:2525", "127.0.0.1:2465", "127.0.0.1:2587"] {
        assert_listening(&lines, addr, what);
    }
    let pid = child.0.id();
    let addr: std::net::SocketAddr = "127.0.0.1:2525".parse().unwrap();
    let not_ours = |why: String| -> String {
        format!(
            "connected to {addr}, but the server there is not the moat this test started \
             (pid {pid}, data dir {}/moat-data): {why}\n{}",
            dir.path().display(),
            out.tails(40)
        )
    };
    let mut c = Client::connect_raw(addr);
    let greeting = c.read_reply();
    assert!(
        greeting.code == 220 && greeting.text() == "localhost ESMTP Moat",
        "{}",
        not_ours(format!("greeting {greeting}"))
    );
    c.ehlo();
    c.starttls("localhost");
    // The self-signed certificate our child made in our fresh data dir: no other server has it.
    let own = pem_der(&dir.path().join("moat-data/tls/cert.pem"));
    assert!(
        c.peer_cert.as_deref() == Some(&own[..]),
        "{}",
        not_ours("its certificate is not the one in our data dir".into())
    );
    c.ehlo();
    let r = c.send_mail(
        "a@example.org",
        &["dave@localhost"],
        "Subject: d\r\n\r\nx\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}\n{}", out.tails(40));
    let new = dir.path().join("moat-data/mail/dave/new");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 0 {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "moat (pid {pid}) exited ({status}) after accepting the message\n{}",
                out.tails(40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "our own moat (pid {pid}) accepted the message ({r}) but did not deliver it to {}\n{}",
            new.display(),
            out.tails(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn partner_rule_requires_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaves) = make_certs(
        dir.path(),
        &["mx.moat.test", "partner.moat.test", "other.moat.test"],
    );
    let extra = format!(
        "[tls]\nclient_ca = \"{}\"\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n\n[[inbound_rule]]\nnetworks = [\"127.0.0.1/32\"]\nclient_cert = \"partner.moat.test\"\n",
        ca.display(),
        leaves[0].0.display(),
        leaves[0].1.display()
    );
    let m = Moat::start_with("127.0.10.22", &extra, "");
    // Plaintext: TLS first.
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    assert!(c.cmd("MAIL FROM:<a@partner.moat.test>").is("530 5.7.0"));
    // TLS without a client certificate, and with one issued to another name: refused.
    c.starttls("mx.moat.test");
    c.ehlo();
    let r = c.cmd("MAIL FROM:<a@partner.moat.test>");
    assert!(
        r.is("530 5.7.0") && r.text().contains("partner.moat.test"),
        "{r}"
    );
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    c.starttls_with_cert("mx.moat.test", &leaves[2]);
    c.ehlo();
    assert!(c.cmd("MAIL FROM:<a@partner.moat.test>").is("530 5.7.0"));
    // The partner's certificate: accepted.
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    c.starttls_with_cert("mx.moat.test", &leaves[1]);
    c.ehlo();
    let r = c.send_mail(
        "a@partner.moat.test",
        &["bob@moat.test"],
        "Subject: p\r\n\r\nx\r\n",
    );
    assert!(r.is("250 2.0.0"), "{r}");
    assert_eq!(m.wait_mailbox("bob", 1).len(), 1);
}

#[test]
fn client_that_never_reads_is_dropped() {
    // Pipelines NOOPs without reading a reply: once the socket buffers fill, the server's
    // write waits at most the command timeout, then it drops the connection.
    let m = Moat::start_with("127.0.10.23", "", "command_timeout_secs = 1");
    let mut s = std::net::TcpStream::connect(m.addr(SMTP)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let chunk = b"NOOP\r\n".repeat(10_000);
    let start = Instant::now();
    let mut sent = 0usize;
    let dropped = loop {
        use std::io::Write;
        match s.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            // Our own write timing out means the server is still holding the connection.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false;
            }
            Err(_) => break true,
        }
        if start.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(dropped, "still connected after {sent} bytes");
}
