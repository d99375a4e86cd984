//! Byte-level tests of the outbound client state machine.

use super::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

fn params(starttls: StartTls) -> ClientParams {
    ClientParams {
        helo_name: "mx.moat.test".into(),
        starttls,
        implicit_tls: false,
        auth: None,
    }
}

fn msg(rcpts: &[&str]) -> Outgoing {
    Outgoing {
        sender: "a@moat.test".into(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
        message: b"Subject: t\r\n\r\n.dot\nbare\r\n".to_vec(),
        smtputf8: false,
        eight_bit: false,
        ret_full: None,
        envid: None,
        dsn: Vec::new(),
        requiretls: false,
    }
}

/// Feeds server text; returns (client output, events).
fn feed(c: &mut Client, server: &str) -> (String, Vec<Event>) {
    let mut events = Vec::new();
    let mut input = server.as_bytes();
    loop {
        let (n, ev) = c.process(input);
        input = &input[n..];
        match ev {
            Some(e) => events.push(e),
            None => break,
        }
        if input.is_empty() {
            break;
        }
    }
    (String::from_utf8(c.take_output()).unwrap(), events)
}

const EHLO_FULL: &str = "250-mx.far.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 STARTTLS\r\n";
const EHLO_TLS: &str =
    "250-mx.far.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

#[test]
fn opportunistic_starttls_then_pipelined_transaction() {
    let mut c = Client::new(params(StartTls::Opportunistic));
    let (out, ev) = feed(&mut c, "220 mx.far.test ESMTP\r\n");
    assert_eq!(out, "EHLO mx.moat.test\r\n");
    assert!(ev.is_empty());
    let (out, ev) = feed(&mut c, EHLO_FULL);
    assert_eq!(out, "STARTTLS\r\n");
    assert!(ev.is_empty());
    // CVE-2021-38371: a reply injected after the 220 must not be consumed.
    let server = b"220 2.0.0 go ahead\r\n250 injected\r\n";
    let (n, ev) = c.process(server);
    assert_eq!(n, "220 2.0.0 go ahead\r\n".len());
    assert_eq!(ev, Some(Event::StartTls));
    c.tls_established();
    assert!(c.is_tls());
    assert_eq!(
        String::from_utf8(c.take_output()).unwrap(),
        "EHLO mx.moat.test\r\n"
    );
    let (_, ev) = feed(&mut c, EHLO_TLS);
    assert_eq!(ev, vec![Event::Ready]);
    assert!(c.capabilities().pipelining && !c.capabilities().starttls);
    assert_eq!(c.send(msg(&["b@far.test", "c@far.test"])), None);
    let out = String::from_utf8(c.take_output()).unwrap();
    // One write: MAIL, both RCPTs and DATA.
    let size = msg(&[]).message.len();
    assert_eq!(
        out,
        format!(
            "MAIL FROM:<a@moat.test> SIZE={size}\r\nRCPT TO:<b@far.test>\r\nRCPT TO:<c@far.test>\r\nDATA\r\n"
        )
    );
    let (out, ev) = feed(
        &mut c,
        "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go\r\n",
    );
    assert!(ev.is_empty());
    // Dot-stuffed, bare LF normalised, terminated, in one buffer.
    assert_eq!(out, "Subject: t\r\n\r\n..dot\r\nbare\r\n.\r\n");
    let (_, ev) = feed(&mut c, "250 2.0.0 queued as X\r\n");
    let Event::Transaction(results) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert!(matches!(&results[0], RcptOutcome::Delivered(r) if r.code == 250));
    assert!(
        matches!(&results[1], RcptOutcome::Refused(r) if r.one_line() == "550 5.1.1 no such user")
    );
    c.quit();
    let (out, ev) = feed(&mut c, "221 2.0.0 bye\r\n");
    assert_eq!(out, "QUIT\r\n");
    assert_eq!(ev, vec![Event::Closed]);
}

#[test]
fn required_tls_without_starttls_sends_no_mail() {
    let mut c = Client::new(params(StartTls::Required));
    feed(&mut c, "220 hi\r\n");
    let (out, ev) = feed(&mut c, "250-mx\r\n250 PIPELINING\r\n");
    // No transaction, but a polite QUIT (RFC 5321 §4.1.1.10).
    assert_eq!(out, "QUIT\r\n");
    assert_eq!(ev, vec![Event::Failed(SessionError::StartTlsNotOffered)]);
}

#[test]
fn required_tls_refused_fails_but_opportunistic_continues() {
    let mut c = Client::new(params(StartTls::Required));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 STARTTLS\r\n");
    let (_, ev) = feed(&mut c, "454 4.7.0 TLS not available\r\n");
    assert!(matches!(&ev[0], Event::Failed(SessionError::StartTlsRefused(r)) if r.code == 454));
    let mut c = Client::new(params(StartTls::Opportunistic));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 STARTTLS\r\n");
    let (_, ev) = feed(&mut c, "454 4.7.0 TLS not available\r\n");
    assert_eq!(ev, vec![Event::Ready]);
    assert!(!c.is_tls());
}

#[test]
fn never_mode_ignores_starttls() {
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    let (out, ev) = feed(&mut c, "250-mx\r\n250 STARTTLS\r\n");
    assert_eq!(out, "");
    assert_eq!(ev, vec![Event::Ready]);
}

#[test]
fn sequential_without_pipelining() {
    let mut c = Client::new(params(StartTls::Opportunistic));
    feed(&mut c, "220 hi\r\n");
    let (_, ev) = feed(&mut c, "250-mx\r\n250 8BITMIME\r\n");
    assert_eq!(ev, vec![Event::Ready]);
    let mut m = msg(&["b@far.test", "c@far.test"]);
    m.eight_bit = true;
    c.send(m);
    assert_eq!(
        String::from_utf8(c.take_output()).unwrap(),
        "MAIL FROM:<a@moat.test> BODY=8BITMIME\r\n"
    );
    let (out, _) = feed(&mut c, "250 ok\r\n");
    assert_eq!(out, "RCPT TO:<b@far.test>\r\n");
    let (out, _) = feed(&mut c, "450 4.2.0 greylisted\r\n");
    assert_eq!(out, "RCPT TO:<c@far.test>\r\n");
    let (out, _) = feed(&mut c, "250 ok\r\n");
    assert_eq!(out, "DATA\r\n");
    let (out, _) = feed(&mut c, "354 go\r\n");
    assert!(out.ends_with("\r\n.\r\n"));
    let (_, ev) = feed(&mut c, "250 ok\r\n");
    let Event::Transaction(r) = &ev[0] else {
        panic!()
    };
    assert!(matches!(&r[0], RcptOutcome::Refused(x) if x.code == 450 && !x.is_permanent()));
    assert!(matches!(&r[1], RcptOutcome::Delivered(_)));
}

#[test]
fn helo_fallback_when_ehlo_refused() {
    let mut c = Client::new(params(StartTls::Opportunistic));
    feed(&mut c, "220 old server\r\n");
    let (out, _) = feed(&mut c, "502 5.5.1 what?\r\n");
    assert_eq!(out, "HELO mx.moat.test\r\n");
    let (_, ev) = feed(&mut c, "250 hello\r\n");
    assert_eq!(ev, vec![Event::Ready]);
    assert!(!c.capabilities().esmtp);
    // Required TLS cannot be had over HELO.
    let mut c = Client::new(params(StartTls::Required));
    feed(&mut c, "220 old server\r\n");
    feed(&mut c, "502 5.5.1 what?\r\n");
    let (_, ev) = feed(&mut c, "250 hello\r\n");
    assert_eq!(ev, vec![Event::Failed(SessionError::StartTlsNotOffered)]);
}

#[test]
fn refused_mail_fails_every_recipient_and_sends_no_content() {
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 PIPELINING\r\n");
    c.send(msg(&["b@far.test", "c@far.test"]));
    c.take_output();
    // A broken server even says 354 to DATA: we end the data empty, never send the message.
    let (out, ev) = feed(
        &mut c,
        "550 5.7.1 sender rejected\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n354 go\r\n",
    );
    assert_eq!(out, ".\r\n");
    assert!(ev.is_empty());
    let (_, ev) = feed(&mut c, "554 5.5.1 no valid recipients\r\n");
    let Event::Transaction(r) = &ev[0] else {
        panic!("{ev:?}")
    };
    for x in r {
        assert!(
            matches!(x, RcptOutcome::Refused(rep) if rep.one_line() == "550 5.7.1 sender rejected"),
            "{x:?}"
        );
    }
}

#[test]
fn all_recipients_refused_then_reuse_sends_rset() {
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 PIPELINING\r\n");
    c.send(msg(&["b@far.test"]));
    c.take_output();
    let (out, ev) = feed(
        &mut c,
        "250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n",
    );
    assert_eq!(out, "");
    assert!(
        matches!(&ev[0], Event::Transaction(r) if matches!(&r[0], RcptOutcome::Refused(x) if x.code == 550))
    );
    c.send(msg(&["c@far.test"]));
    let out = String::from_utf8(c.take_output()).unwrap();
    assert!(out.starts_with("RSET\r\nMAIL FROM:"), "{out}");
    let (out, _) = feed(&mut c, "250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    assert!(out.ends_with(".\r\n"));
    let (_, ev) = feed(&mut c, "250 ok\r\n");
    assert!(matches!(&ev[0], Event::Transaction(r) if matches!(r[0], RcptOutcome::Delivered(_))));
    // After a completed transaction no RSET is needed.
    c.send(msg(&["d@far.test"]));
    assert!(
        String::from_utf8(c.take_output())
            .unwrap()
            .starts_with("MAIL FROM:")
    );
}

#[test]
fn without_pipelining_rset_is_answered_before_mail() {
    // A server without PIPELINING that refuses the only recipient (as OpenSMTPD does).
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 8BITMIME\r\n");
    c.send(msg(&["b@far.test"]));
    assert_eq!(c.take_output(), b"MAIL FROM:<a@moat.test>\r\n");
    let (out, _) = feed(&mut c, "250 ok\r\n");
    assert_eq!(out, "RCPT TO:<b@far.test>\r\n");
    let (out, ev) = feed(&mut c, "550 5.1.1 unknown\r\n");
    assert_eq!(out, "");
    assert!(
        matches!(&ev[0], Event::Transaction(r) if matches!(&r[0], RcptOutcome::Refused(x) if x.code == 550))
    );
    // Reuse: RSET alone, MAIL only after its reply (RFC 5321 §4.3.1, RFC 2920 §3).
    assert_eq!(c.send(msg(&["c@far.test"])), None);
    assert_eq!(c.take_output(), b"RSET\r\n");
    let (out, ev) = feed(&mut c, "250 2.0.0 reset\r\n");
    assert!(ev.is_empty());
    assert_eq!(out, "MAIL FROM:<a@moat.test>\r\n");
    let (out, _) = feed(&mut c, "250 ok\r\n");
    assert_eq!(out, "RCPT TO:<c@far.test>\r\n");
    let (out, _) = feed(&mut c, "250 ok\r\n");
    assert_eq!(out, "DATA\r\n");
    let (out, _) = feed(&mut c, "354 go\r\n");
    assert!(out.ends_with("\r\n.\r\n"));
    let (_, ev) = feed(&mut c, "250 queued\r\n");
    assert!(matches!(&ev[0], Event::Transaction(r) if matches!(r[0], RcptOutcome::Delivered(_))));
}

#[test]
fn refused_rset_closes_the_session_instead_of_reusing_it() {
    for ehlo in ["250-mx\r\n250 8BITMIME\r\n", "250-mx\r\n250 PIPELINING\r\n"] {
        let mut c = Client::new(params(StartTls::Never));
        feed(&mut c, "220 hi\r\n");
        feed(&mut c, ehlo);
        c.send(msg(&["b@far.test"]));
        c.take_output();
        let refused = if ehlo.contains("PIPELINING") {
            "550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n"
        } else {
            "550 5.7.1 no\r\n"
        };
        let (_, ev) = feed(&mut c, refused);
        assert!(matches!(&ev[0], Event::Transaction(_)), "{ehlo}: {ev:?}");
        c.send(msg(&["c@far.test"]));
        c.take_output();
        let (out, ev) = feed(&mut c, "500 5.5.1 Pipelining not supported\r\n");
        assert!(
            matches!(&ev[..], [Event::Failed(SessionError::ResetRefused(r))] if r.code == 500),
            "{ehlo}: {ev:?}"
        );
        assert_eq!(out, "QUIT\r\n", "{ehlo}");
    }
}

#[test]
fn capability_gaps_refuse_locally() {
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 SIZE 10\r\n");
    let ev = c.send(msg(&["b@far.test"]));
    assert!(
        matches!(&ev, Some(Event::Transaction(r)) if matches!(&r[0], RcptOutcome::NotSent { permanent: true, enhanced: "5.3.4", .. }))
    );
    let mut m = msg(&["b@far.test"]);
    m.smtputf8 = true;
    let ev = c.send(m);
    assert!(
        matches!(&ev, Some(Event::Transaction(r)) if matches!(&r[0], RcptOutcome::NotSent { enhanced: "5.6.7", .. }))
    );
    assert!(c.take_output().is_empty());
}

#[test]
fn greeting_refused_and_421() {
    let mut c = Client::new(params(StartTls::Opportunistic));
    let (_, ev) = feed(&mut c, "554 5.7.1 go away\r\n");
    assert!(matches!(&ev[0], Event::Failed(SessionError::Greeting(r)) if r.code == 554));
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 PIPELINING\r\n");
    c.send(msg(&["b@far.test", "c@far.test"]));
    c.take_output();
    let (_, ev) = feed(&mut c, "250 ok\r\n421 4.3.2 shutting down\r\n");
    let Event::Transaction(r) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert!(
        r.iter()
            .all(|x| matches!(x, RcptOutcome::Refused(rep) if rep.code == 421))
    );
}

#[test]
fn hostile_replies_are_protocol_errors() {
    for bad in ["hello\r\n", "2\r\n", "999 x\r\n", "220x\r\n"] {
        let mut c = Client::new(params(StartTls::Opportunistic));
        let (_, ev) = feed(&mut c, bad);
        assert!(
            matches!(&ev[0], Event::Failed(SessionError::Protocol(_))),
            "{bad:?}: {ev:?}"
        );
    }
    let mut c = Client::new(params(StartTls::Opportunistic));
    let long = "220-".to_string() + &"x".repeat(10_000);
    let (_, ev) = feed(&mut c, &long);
    assert!(matches!(&ev[0], Event::Failed(SessionError::Protocol(_))));
    let mut c = Client::new(params(StartTls::Opportunistic));
    let many = "220-x\r\n".repeat(500);
    let (_, ev) = feed(&mut c, &many);
    assert!(matches!(&ev[0], Event::Failed(SessionError::Protocol(_))));
    // A reply nobody asked for.
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250 mx\r\n");
    let (_, ev) = feed(&mut c, "250 surprise\r\n");
    assert!(matches!(&ev[0], Event::Failed(SessionError::Protocol(_))));
}

#[test]
fn eof_handling() {
    let mut c = Client::new(params(StartTls::Never));
    assert_eq!(c.eof(), Event::Failed(SessionError::Closed(None)));
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250 mx\r\n");
    c.quit();
    assert_eq!(c.eof(), Event::Closed);
}

#[test]
fn dsn_parameters_passed_only_when_offered() {
    use crate::smtp::session::{NOTIFY_FAILURE, NOTIFY_SUCCESS, RcptDsn};
    let mut m = msg(&["b@far.test", "c@far.test"]);
    m.ret_full = Some(false);
    m.envid = Some("id 1".into());
    m.dsn = vec![RcptDsn {
        notify: NOTIFY_SUCCESS | NOTIFY_FAILURE,
        orcpt: Some("B@far.test".into()),
    }];
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250-PIPELINING\r\n250 DSN\r\n");
    c.send(m.clone());
    let out = String::from_utf8(c.take_output()).unwrap();
    assert_eq!(
        out,
        "MAIL FROM:<a@moat.test> RET=HDRS ENVID=id+201\r\nRCPT TO:<b@far.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@far.test\r\nRCPT TO:<c@far.test>\r\nDATA\r\n"
    );
    let mut c = Client::new(params(StartTls::Never));
    feed(&mut c, "220 hi\r\n");
    feed(&mut c, "250-mx\r\n250 PIPELINING\r\n");
    c.send(m);
    let out = String::from_utf8(c.take_output()).unwrap();
    assert!(
        !out.contains("NOTIFY") && !out.contains("RET=") && !out.contains("ORCPT"),
        "{out}"
    );
}

#[test]
fn auth_only_inside_tls() {
    let creds = Some(("relay-user".to_string(), "s3cret".to_string()));
    // Plaintext with credentials: fail without sending them.
    let mut c = Client::new(ClientParams {
        auth: creds.clone(),
        ..params(StartTls::Opportunistic)
    });
    feed(&mut c, "220 hi\r\n");
    let (out, ev) = feed(&mut c, "250-mx\r\n250 AUTH PLAIN LOGIN\r\n");
    assert!(!out.contains("AUTH"), "{out}");
    assert_eq!(ev, vec![Event::Failed(SessionError::AuthWithoutTls)]);
    // Inside TLS: AUTH PLAIN, then ready.
    let mut c = Client::new(ClientParams {
        auth: creds.clone(),
        implicit_tls: true,
        ..params(StartTls::Never)
    });
    feed(&mut c, "220 hi\r\n");
    let (out, _) = feed(&mut c, "250-mx\r\n250 AUTH LOGIN PLAIN\r\n");
    assert_eq!(
        out,
        format!("AUTH PLAIN {}\r\n", B64.encode("\0relay-user\0s3cret"))
    );
    let (_, ev) = feed(&mut c, "235 2.7.0 ok\r\n");
    assert_eq!(ev, vec![Event::Ready]);
    // LOGIN when that is all there is; a refusal fails the session.
    let mut c = Client::new(ClientParams {
        auth: creds,
        implicit_tls: true,
        ..params(StartTls::Never)
    });
    feed(&mut c, "220 hi\r\n");
    let (out, _) = feed(&mut c, "250-mx\r\n250 AUTH LOGIN\r\n");
    assert_eq!(out, "AUTH LOGIN\r\n");
    let (out, _) = feed(&mut c, "334 VXNlcm5hbWU6\r\n");
    assert_eq!(out, format!("{}\r\n", B64.encode("relay-user")));
    let (out, _) = feed(&mut c, "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(out, format!("{}\r\n", B64.encode("s3cret")));
    let (_, ev) = feed(&mut c, "535 5.7.8 nope\r\n");
    assert!(matches!(&ev[0], Event::Failed(SessionError::AuthFailed(r)) if r.code == 535));
}

#[test]
fn enhanced_codes() {
    let r = Reply {
        code: 550,
        lines: vec!["5.1.1 <x>: unknown".into()],
    };
    assert_eq!(r.enhanced(), Some("5.1.1"));
    let r = Reply {
        code: 451,
        lines: vec!["4.4.316 Connection refused".into()],
    };
    assert_eq!(r.enhanced(), Some("4.4.316"));
    let r = Reply {
        code: 550,
        lines: vec!["mailbox unavailable".into()],
    };
    assert_eq!(r.enhanced(), None);
    let r = Reply {
        code: 550,
        lines: vec!["1.2.3 nope".into()],
    };
    assert_eq!(r.enhanced(), None);
}
