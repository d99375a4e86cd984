//! Byte-for-byte tests of the SMTP session state machine.
//!
//! The harness [`H`] plays the connection layer: it keeps the unconsumed input in a buffer
//! (as the real caller does), loops on [`Session::process`], completes the actions the session
//! asks for (configurably) and returns the replies as one string.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::*;
use crate::smtp::data::BareNewline;

const HOST: &str = "mx.example.test";
const MAX_SIZE: usize = 1000;
const MAX_LINE: usize = 512;
const MAX_RCPT: usize = 3;
const MAX_ERRORS: usize = 10;

const EHLO_CAPS: &str = "250-mx.example.test\r\n\
                         250-PIPELINING\r\n\
                         250-SIZE 1000\r\n\
                         250-8BITMIME\r\n\
                         250-ENHANCEDSTATUSCODES\r\n\
                         250-SMTPUTF8\r\n\
                         250-DSN\r\n\
                         250-CHUNKING\r\n";

const OK: &str = "250 2.0.0 Ok\r\n";
const DATA_GO: &str = "354 End data with <CR><LF>.<CR><LF>\r\n";
const RELAY_DENIED: &str = "554 5.7.1 Relay access denied\r\n";
const NEED_TLS: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";
const NO_EHLO: &str = "503 5.5.1 Send EHLO/HELO first\r\n";
const TOO_BIG: &str = "552 5.3.4 Message size exceeds fixed maximum message size\r\n";
const BARE_LF: &str =
    "550 5.6.2 Bare <LF> or <CR> in message content is not allowed (RFC 5321 section 2.3.8)\r\n";
const BAD_RCPT: &str = "501 5.1.3 Bad recipient address syntax\r\n";
const BAD_SENDER: &str = "501 5.1.7 Bad sender address syntax\r\n";
const AUTH_OK: &str = "235 2.7.0 Authentication successful\r\n";
const AUTH_BAD: &str = "535 5.7.8 Authentication credentials invalid\r\n";
const TOO_MANY_ERRORS: &str = "421 4.7.0 Too many errors, closing connection\r\n";

fn rules() -> Rules {
    let mut domains = HashMap::new();
    domains.insert(
        "example.test".to_string(),
        DomainKind::Local {
            mailboxes: HashSet::new(),
        },
    );
    domains.insert(
        "mbox.test".to_string(),
        DomainKind::Local {
            mailboxes: ["alice".to_string()].into_iter().collect(),
        },
    );
    domains.insert("routed.test".to_string(), DomainKind::Routed);
    // Configured as `café.test`: keys are canonical (A-label) names.
    domains.insert("xn--caf-dma.test".to_string(), DomainKind::Routed);
    Rules {
        hostname: HOST.to_string(),
        max_message_size: MAX_SIZE,
        max_recipients: MAX_RCPT,
        max_line_length: MAX_LINE,
        max_errors: MAX_ERRORS,
        domains,
        postmaster_domain: Some("example.test".to_string()),
        tls_required_sender_domains: vec![
            DomainPattern::parse("partner.test").unwrap(),
            DomainPattern::parse("*.corp.test").unwrap(),
        ],
        sender_client_certs: vec![(
            DomainPattern::parse("certified.test").unwrap(),
            "relay.certified.test".to_string(),
        )],
        report_addresses: Default::default(),
    }
}

/// Port 25: STARTTLS offered, AUTH possible inside TLS, nothing required.
fn mx() -> ListenerRules {
    ListenerRules {
        starttls: true,
        require_tls: false,
        require_auth: false,
        auth: true,
        bare_newline: BareNewline::Reject,
        requiretls: true,
    }
}

/// Port 587: TLS and AUTH required.
fn submission() -> ListenerRules {
    ListenerRules {
        starttls: true,
        require_tls: true,
        require_auth: true,
        auth: true,
        bare_newline: BareNewline::Reject,
        requiretls: true,
    }
}

fn peer() -> Peer {
    Peer {
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        tls: None,
        trusted: false,
        tls_required_by_rule: false,
        client_cert_required: Vec::new(),
    }
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".to_string(),
        cipher: "TLS_AES_256_GCM_SHA384".to_string(),
        bits: 256,
        key_exchange: Some("X25519MLKEM768".to_string()),
        sni: Some(HOST.to_string()),
        client_names: Vec::new(),
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// An action the harness saw (and completed, unless configured not to).
#[derive(Debug)]
enum Done {
    StartTls {
        discarded: Vec<u8>,
    },
    Auth {
        username: String,
        password: String,
    },
    Queue(Box<(Envelope, Vec<u8>, Trace)>),
    /// Content handed out with `Action::Spill`: its length, and whether the session had its
    /// envelope ready for the spool file.
    Spill {
        len: usize,
        pending: bool,
    },
    Close,
}

/// The connection layer, simulated.
struct H {
    s: Session,
    /// Received but not yet consumed input, as the real caller keeps it.
    buf: Vec<u8>,
    done: Vec<Done>,
    greeting: String,
    /// Complete `StartTls` by calling `tls_started` (else the session stays waiting).
    auto_tls: bool,
    /// Fixed outcome for every credential check; `None` accepts exactly `user` / `secret`.
    auth_outcome: Option<AuthOutcome>,
    /// Make every spool attempt fail with this cause.
    queue_error: Option<String>,
    /// Fail writing handed-out content after this many chunks.
    spill_fails_after: Option<usize>,
    /// Content handed out so far for the current message, as the spool file holds it.
    spilled: Vec<u8>,
    next_id: u32,
    /// Largest caller buffer seen after a `process` call.
    max_buffered: usize,
}

impl H {
    fn with(rules: Rules, listener: ListenerRules, peer: Peer) -> H {
        let mut s = Session::new(Arc::new(rules), Arc::new(listener), peer);
        s.greeting();
        let greeting = String::from_utf8(s.take_output()).expect("greeting is UTF-8");
        H {
            s,
            buf: Vec::new(),
            done: Vec::new(),
            greeting,
            auto_tls: true,
            auth_outcome: None,
            queue_error: None,
            spill_fails_after: None,
            spilled: Vec::new(),
            next_id: 0,
            max_buffered: 0,
        }
    }

    fn mx() -> H {
        H::with(rules(), mx(), peer())
    }

    fn listener(listener: ListenerRules) -> H {
        H::with(rules(), listener, peer())
    }

    fn peer(peer: Peer) -> H {
        H::with(rules(), mx(), peer)
    }

    fn send(&mut self, input: &str) -> String {
        self.send_bytes(input.as_bytes())
    }

    fn send_bytes(&mut self, input: &[u8]) -> String {
        self.buf.extend_from_slice(input);
        loop {
            let before = self.buf.len();
            let p = self.s.process(&self.buf);
            assert!(p.consumed <= before, "consumed {} of {before}", p.consumed);
            self.buf.drain(..p.consumed);
            self.max_buffered = self.max_buffered.max(self.buf.len());
            let Some(action) = p.action else { break };
            if !self.complete(action) {
                break;
            }
        }
        String::from_utf8(self.s.take_output()).expect("replies are UTF-8")
    }

    /// Completes `action` (and any action its completion produces). False when the session
    /// should not be fed any more input now.
    fn complete(&mut self, action: Action) -> bool {
        let mut next = Some(action);
        while let Some(action) = next.take() {
            match action {
                Action::StartTls => {
                    // CVE-2011-0411: whatever was pipelined behind STARTTLS is dropped.
                    let discarded = std::mem::take(&mut self.buf);
                    self.done.push(Done::StartTls { discarded });
                    if !self.auto_tls {
                        return false;
                    }
                    self.s.tls_started(tls_info());
                }
                Action::Authenticate { username, password } => {
                    let outcome = match &self.auth_outcome {
                        Some(o) => o.clone(),
                        None if username == "user" && password == "secret" => {
                            AuthOutcome::Success(username.clone())
                        }
                        None => AuthOutcome::Failure,
                    };
                    self.done.push(Done::Auth { username, password });
                    next = self.s.auth_result(outcome);
                }
                Action::Spill { chunk, first } => {
                    if first {
                        // As the connection layer: a new spool file for a new message.
                        self.spilled.clear();
                    }
                    let pending = self.s.pending_message().is_some();
                    let chunks = self
                        .done
                        .iter()
                        .filter(|d| matches!(d, Done::Spill { .. }))
                        .count();
                    self.done.push(Done::Spill {
                        len: chunk.len(),
                        pending,
                    });
                    let ok = self.spill_fails_after.is_none_or(|n| chunks < n);
                    if ok {
                        self.spilled.extend_from_slice(&chunk);
                    }
                    self.s.spilled(ok);
                }
                Action::Queue {
                    envelope,
                    body,
                    spilled,
                    trace,
                } => {
                    let mut whole = std::mem::take(&mut self.spilled);
                    assert_eq!(
                        spilled,
                        !whole.is_empty(),
                        "spilled flag and handed-out content"
                    );
                    whole.extend_from_slice(&body);
                    self.done
                        .push(Done::Queue(Box::new((envelope, whole, trace))));
                    let result = match &self.queue_error {
                        Some(e) => Err(e.clone()),
                        None => {
                            self.next_id += 1;
                            Ok(format!("Q{}", self.next_id))
                        }
                    };
                    next = self.s.queued(result);
                }
                Action::Close => {
                    self.done.push(Done::Close);
                    return false;
                }
            }
        }
        true
    }

    fn queued(&self) -> Vec<(&Envelope, &[u8], &Trace)> {
        self.done
            .iter()
            .filter_map(|d| match d {
                Done::Queue(q) => Some((&q.0, q.1.as_slice(), &q.2)),
                _ => None,
            })
            .collect()
    }

    fn auths(&self) -> Vec<(&str, &str)> {
        self.done
            .iter()
            .filter_map(|d| match d {
                Done::Auth { username, password } => Some((username.as_str(), password.as_str())),
                _ => None,
            })
            .collect()
    }

    fn closed(&self) -> bool {
        matches!(self.done.last(), Some(Done::Close))
    }

    fn starttls_count(&self) -> usize {
        self.done
            .iter()
            .filter(|d| matches!(d, Done::StartTls { .. }))
            .count()
    }

    fn ehlo(&mut self) -> String {
        self.send("EHLO client.test\r\n")
    }

    /// EHLO, STARTTLS, EHLO again.
    fn tls(&mut self) {
        let out = self.send("EHLO client.test\r\nSTARTTLS\r\n");
        assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{out}");
        assert!(self.s.tls().is_some());
        let out = self.ehlo();
        assert!(out.starts_with("250-mx.example.test\r\n"), "{out}");
    }

    /// TLS, then AUTH PLAIN as `user`.
    fn login(&mut self) {
        self.tls();
        let out = self.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret")));
        assert_eq!(out, AUTH_OK);
    }

    /// A complete transaction; returns all replies.
    fn message(&mut self, from: &str, to: &str, body: &str) -> String {
        self.send(&format!(
            "MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n{body}.\r\n"
        ))
    }
}

fn rcpt_ok(addr: &str) -> String {
    format!("250 2.1.5 Recipient <{addr}> OK\r\n")
}

fn sender_ok(addr: &str) -> String {
    format!("250 2.1.0 Sender <{addr}> OK\r\n")
}

// ---------------------------------------------------------------------------------------------
// Greeting, EHLO, HELO

#[test]
fn greeting_is_220() {
    let h = H::mx();
    assert_eq!(h.greeting, "220 mx.example.test ESMTP Moat\r\n");
}

#[test]
fn ehlo_in_plaintext_offers_starttls_but_not_auth() {
    let mut h = H::mx();
    assert_eq!(h.ehlo(), format!("{EHLO_CAPS}250 STARTTLS\r\n"));
}

#[test]
fn ehlo_without_starttls_listener() {
    let mut h = H::listener(ListenerRules {
        starttls: false,
        ..mx()
    });
    assert_eq!(h.ehlo(), EHLO_CAPS.replace("250-CHUNKING", "250 CHUNKING"));
}

#[test]
fn ehlo_inside_tls_offers_auth_not_starttls() {
    let mut h = H::mx();
    h.send("EHLO client.test\r\nSTARTTLS\r\n");
    assert_eq!(
        h.ehlo(),
        format!("{EHLO_CAPS}250-AUTH PLAIN LOGIN\r\n250 REQUIRETLS\r\n")
    );
}

#[test]
fn ehlo_inside_tls_without_auth_listener() {
    let mut h = H::listener(ListenerRules {
        auth: false,
        ..mx()
    });
    h.send("EHLO client.test\r\nSTARTTLS\r\n");
    assert_eq!(h.ehlo(), format!("{EHLO_CAPS}250 REQUIRETLS\r\n"));
}

#[test]
fn ehlo_on_implicit_tls_offers_auth() {
    let mut h = H::with(
        rules(),
        ListenerRules {
            starttls: false,
            ..submission()
        },
        Peer {
            tls: Some(tls_info()),
            ..peer()
        },
    );
    assert_eq!(
        h.ehlo(),
        format!("{EHLO_CAPS}250-AUTH PLAIN LOGIN\r\n250 REQUIRETLS\r\n")
    );
}

#[test]
fn ehlo_after_auth_no_longer_offers_auth() {
    let mut h = H::mx();
    h.login();
    assert_eq!(h.ehlo(), format!("{EHLO_CAPS}250 REQUIRETLS\r\n"));
}

#[test]
fn helo_has_one_line() {
    let mut h = H::mx();
    assert_eq!(h.send("HELO client.test\r\n"), "250 mx.example.test\r\n");
}

#[test]
fn ehlo_helo_need_a_host() {
    let mut h = H::mx();
    assert_eq!(h.send("EHLO\r\n"), "501 5.5.4 Syntax: EHLO domain\r\n");
    assert_eq!(h.send("HELO\r\n"), "501 5.5.4 Syntax: HELO domain\r\n");
    assert_eq!(h.send("MAIL FROM:<a@example.test>\r\n"), NO_EHLO);
}

#[test]
fn lhlo_is_not_smtp() {
    let mut h = H::mx();
    assert_eq!(
        h.send("LHLO client.test\r\n"),
        "500 5.5.1 Command unrecognized\r\n"
    );
}

#[test]
fn ehlo_resets_the_transaction() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@example.test>\r\n");
    h.ehlo();
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
}

// ---------------------------------------------------------------------------------------------
// STARTTLS

#[test]
fn starttls_stops_consuming_after_its_line() {
    let mut s = Session::new(Arc::new(rules()), Arc::new(mx()), peer());
    s.greeting();
    s.take_output();
    let head = "EHLO client.test\r\nSTARTTLS\r\n";
    let tail = "MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\n";
    let input = format!("{head}{tail}");
    let p = s.process(input.as_bytes());
    assert_eq!(p.consumed, head.len());
    assert!(matches!(p.action, Some(Action::StartTls)), "{:?}", p.action);
    let out = String::from_utf8(s.take_output()).unwrap();
    assert_eq!(
        out,
        format!("{EHLO_CAPS}250 STARTTLS\r\n220 2.0.0 Ready to start TLS\r\n")
    );
    // Until the handshake is done nothing more is consumed.
    let p = s.process(tail.as_bytes());
    assert_eq!(p.consumed, 0);
    assert!(p.action.is_none());
    assert!(!s.has_output());
}

#[test]
fn starttls_pipelined_commands_are_never_executed() {
    let mut h = H::mx();
    let tail = "MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\n";
    let out = h.send(&format!("EHLO client.test\r\nSTARTTLS\r\n{tail}"));
    assert_eq!(
        out,
        format!("{EHLO_CAPS}250 STARTTLS\r\n220 2.0.0 Ready to start TLS\r\n")
    );
    match &h.done[..] {
        [Done::StartTls { discarded }] => assert_eq!(discarded, tail.as_bytes()),
        other => panic!("{other:?}"),
    }
    // The smuggled transaction does not exist inside TLS.
    h.ehlo();
    assert_eq!(
        h.send("RCPT TO:<victim@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
}

#[test]
fn starttls_forgets_ehlo() {
    let mut h = H::mx();
    h.send("EHLO client.test\r\nSTARTTLS\r\n");
    assert_eq!(h.send("MAIL FROM:<a@example.test>\r\n"), NO_EHLO);
    assert_eq!(h.send("AUTH PLAIN\r\n"), "503 5.5.1 Send EHLO first\r\n");
}

#[test]
fn starttls_forgets_the_transaction() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
    h.send("STARTTLS\r\n");
    h.ehlo();
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
}

#[test]
fn second_starttls_is_refused() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(h.send("STARTTLS\r\n"), "503 5.5.1 TLS already active\r\n");
    assert_eq!(h.starttls_count(), 1);
}

#[test]
fn starttls_with_parameters_is_refused() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(
        h.send("STARTTLS now\r\n"),
        "501 5.5.4 Syntax: STARTTLS (no parameters)\r\n"
    );
    assert_eq!(h.starttls_count(), 0);
    assert!(h.s.tls().is_none());
}

#[test]
fn starttls_not_available_without_certificate() {
    let mut h = H::listener(ListenerRules {
        starttls: false,
        ..mx()
    });
    h.ehlo();
    assert_eq!(
        h.send("STARTTLS\r\n"),
        "502 5.5.1 STARTTLS not available\r\n"
    );
    assert_eq!(h.starttls_count(), 0);
}

#[test]
fn starttls_waits_for_the_handshake() {
    let mut h = H::mx();
    h.auto_tls = false;
    h.ehlo();
    assert_eq!(h.send("STARTTLS\r\n"), "220 2.0.0 Ready to start TLS\r\n");
    // Input arriving before the handshake completes is not consumed.
    assert_eq!(h.send("NOOP\r\n"), "");
    assert_eq!(h.buf, b"NOOP\r\n");
    h.buf.clear();
    h.s.tls_started(tls_info());
    assert_eq!(h.s.tls(), Some(&tls_info()));
    assert_eq!(h.send("NOOP\r\n"), OK);
}

#[test]
fn requiretls_is_offered_and_taken_only_inside_tls() {
    let mut h = H::mx();
    assert!(!h.send("EHLO c.test\r\n").contains("REQUIRETLS"));
    assert!(
        h.send("MAIL FROM:<a@example.test> REQUIRETLS\r\n")
            .starts_with("530 5.7.10 ")
    );
    h.tls();
    let ehlo = h.send("EHLO c.test\r\n");
    assert!(
        ehlo.contains("250-REQUIRETLS\r\n") || ehlo.contains("250 REQUIRETLS\r\n"),
        "{ehlo}"
    );
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> REQUIRETLS\r\n"),
        sender_ok("a@example.test")
    );
    h.send("RCPT TO:<b@example.test>\r\n");
    assert_eq!(h.send("DATA\r\n"), DATA_GO);
    h.send("hi\r\n.\r\n");
    // A message without the parameter on the same session is not flagged.
    h.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    h.send("hi\r\n.\r\n");
    let q = h.queued();
    assert_eq!(q.len(), 2);
    assert!(q[0].0.requiretls);
    assert!(!q[1].0.requiretls);
}

// ---------------------------------------------------------------------------------------------
// TLS required

#[test]
fn require_tls_listener_refuses_mail_rcpt_data_before_tls() {
    let mut h = H::listener(ListenerRules {
        require_auth: false,
        ..submission()
    });
    h.ehlo();
    assert_eq!(h.send("MAIL FROM:<a@example.test>\r\n"), NEED_TLS);
    assert_eq!(h.send("RCPT TO:<b@example.test>\r\n"), NEED_TLS);
    assert_eq!(h.send("DATA\r\n"), NEED_TLS);
    // BDAT fails too, and its chunk is swallowed rather than run as commands.
    assert_eq!(h.send("BDAT 6 LAST\r\nQUIT\r\n"), NEED_TLS);
    assert!(!h.closed());
    assert!(h.queued().is_empty());
    h.tls();
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        rcpt_ok("b@example.test")
    );
    assert_eq!(h.send("DATA\r\n"), DATA_GO);
    assert_eq!(h.send("hi\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
}

#[test]
fn tls_required_by_rule_for_peer() {
    let mut h = H::peer(Peer {
        tls_required_by_rule: true,
        client_cert_required: Vec::new(),
        ..peer()
    });
    h.ehlo();
    assert_eq!(h.send("MAIL FROM:<a@example.test>\r\n"), NEED_TLS);
    h.tls();
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
}

#[test]
fn tls_required_for_sender_domain() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(h.send("MAIL FROM:<a@partner.test>\r\n"), NEED_TLS);
    assert_eq!(h.send("MAIL FROM:<a@PARTNER.test>\r\n"), NEED_TLS);
    assert_eq!(h.send("MAIL FROM:<a@x.corp.test>\r\n"), NEED_TLS);
    // `*.corp.test` does not cover the apex.
    assert_eq!(
        h.send("MAIL FROM:<a@corp.test>\r\n"),
        sender_ok("a@corp.test")
    );
    h.send("RSET\r\n");
    h.tls();
    assert_eq!(
        h.send("MAIL FROM:<a@partner.test>\r\n"),
        sender_ok("a@partner.test")
    );
}

#[test]
fn domain_patterns() {
    let corp = DomainPattern::parse("*.corp.test").unwrap();
    assert!(corp.matches_name("a.corp.test"));
    assert!(corp.matches_name("b.a.corp.test"));
    assert!(!corp.matches_name("corp.test"));
    assert!(!corp.matches_name("xcorp.test"));
    let partner = DomainPattern::parse("partner.test").unwrap();
    assert!(partner.matches_name("Partner.Test"));
    assert!(!partner.matches_name("sub.partner.test"));
}

#[test]
fn auth_in_plaintext_is_refused_without_evaluating_credentials() {
    let mut h = H::listener(ListenerRules {
        require_auth: false,
        ..submission()
    });
    h.ehlo();
    let cred = b64("\0user\0secret");
    assert_eq!(
        h.send(&format!("AUTH PLAIN {cred}\r\n")),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    // A continuation line after a refused AUTH is just an unknown command.
    assert_eq!(
        h.send(&format!("AUTH LOGIN\r\n{}\r\n", b64("user"))),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n\
         500 5.5.1 Command unrecognized\r\n"
    );
    assert!(h.auths().is_empty());
}

#[test]
fn auth_in_plaintext_on_port_25_is_refused_too() {
    let mut h = H::mx();
    h.ehlo();
    let out = h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret")));
    assert_eq!(
        out,
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    assert!(h.auths().is_empty());
}

// ---------------------------------------------------------------------------------------------
// AUTH

#[test]
fn auth_plain_initial_response() {
    let mut h = H::mx();
    h.tls();
    let out = h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret")));
    assert_eq!(out, AUTH_OK);
    assert_eq!(h.auths(), [("user", "secret")]);
    assert_eq!(
        h.send("AUTH PLAIN\r\n"),
        "503 5.5.1 Already authenticated\r\n"
    );
}

#[test]
fn auth_plain_continuation() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(h.send("AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(h.send(&format!("{}\r\n", b64("\0user\0secret"))), AUTH_OK);
    assert_eq!(h.auths(), [("user", "secret")]);
}

#[test]
fn auth_plain_with_matching_authzid() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("user\0user\0secret"))),
        AUTH_OK
    );
}

#[test]
fn auth_plain_with_other_authzid_is_refused() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("admin\0user\0secret"))),
        AUTH_BAD
    );
    assert!(h.auths().is_empty());
}

#[test]
fn auth_plain_malformed() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("user\0secret"))),
        "501 5.5.2 Malformed AUTH PLAIN response\r\n"
    );
    assert!(h.auths().is_empty());
}

#[test]
fn auth_login_two_steps() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(h.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(
        h.send(&format!("{}\r\n", b64("user"))),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert!(h.auths().is_empty());
    assert_eq!(h.send(&format!("{}\r\n", b64("secret"))), AUTH_OK);
    assert_eq!(h.auths(), [("user", "secret")]);
}

#[test]
fn auth_login_with_initial_username() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH LOGIN {}\r\n", b64("user"))),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(h.send(&format!("{}\r\n", b64("secret"))), AUTH_OK);
}

#[test]
fn auth_login_pipelined_in_one_buffer() {
    let mut h = H::mx();
    h.tls();
    let out = h.send(&format!(
        "AUTH LOGIN\r\n{}\r\n{}\r\nNOOP\r\n",
        b64("user"),
        b64("secret")
    ));
    assert_eq!(
        out,
        format!("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n{AUTH_OK}{OK}")
    );
}

#[test]
fn auth_cancelled_with_star() {
    let mut h = H::mx();
    h.tls();
    h.send("AUTH PLAIN\r\n");
    assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
    h.send("AUTH LOGIN\r\n");
    assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
    h.send(&format!("AUTH LOGIN {}\r\n", b64("user")));
    assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
    assert!(h.auths().is_empty());
    // Back in command mode.
    assert_eq!(h.send("NOOP\r\n"), OK);
}

#[test]
fn auth_bad_base64() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send("AUTH PLAIN !!!!\r\n"),
        "501 5.5.2 Invalid base64 data\r\n"
    );
    h.send("AUTH PLAIN\r\n");
    assert_eq!(
        h.send("not base64!\r\n"),
        "501 5.5.2 Invalid base64 data\r\n"
    );
    h.send("AUTH LOGIN\r\n");
    assert_eq!(h.send("%%%\r\n"), "501 5.5.2 Invalid base64 data\r\n");
    h.send(&format!("AUTH LOGIN {}\r\n", b64("user")));
    assert_eq!(h.send("%%%\r\n"), "501 5.5.2 Invalid base64 data\r\n");
    assert!(h.auths().is_empty());
    assert_eq!(h.send("NOOP\r\n"), OK);
}

#[test]
fn auth_failure_then_success() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0wrong"))),
        AUTH_BAD
    );
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret"))),
        AUTH_OK
    );
    assert_eq!(h.auths(), [("user", "wrong"), ("user", "secret")]);
}

#[test]
fn auth_blocked_closes() {
    let mut h = H::mx();
    h.tls();
    h.auth_outcome = Some(AuthOutcome::Blocked);
    let out = h.send(&format!("AUTH PLAIN {}\r\nNOOP\r\n", b64("\0user\0secret")));
    assert_eq!(
        out,
        "421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
    );
    assert!(h.closed());
    assert!(h.s.is_closed());
    assert_eq!(h.send("NOOP\r\n"), "");
}

#[test]
fn auth_busy_is_temporary() {
    let mut h = H::mx();
    h.tls();
    h.auth_outcome = Some(AuthOutcome::Busy);
    let out = h.send(&format!("AUTH PLAIN {}\r\nNOOP\r\n", b64("\0user\0secret")));
    assert_eq!(
        out,
        format!(
            "454 4.7.0 Temporary authentication failure: too many logins in progress, try again later\r\n{OK}"
        )
    );
    assert!(!h.closed());
}

#[test]
fn auth_unknown_mechanism() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(
        h.send("AUTH CRAM-MD5\r\n"),
        "504 5.5.4 Unrecognized authentication mechanism\r\n"
    );
    assert_eq!(
        h.send("AUTH FOOBAR\r\n"),
        "504 5.5.4 Unrecognized authentication mechanism\r\n"
    );
}

#[test]
fn auth_not_on_listener_without_users() {
    let mut h = H::listener(ListenerRules {
        auth: false,
        ..mx()
    });
    h.tls();
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret"))),
        "503 5.5.1 AUTH not available on this listener\r\n"
    );
    assert!(h.auths().is_empty());
}

#[test]
fn auth_needs_ehlo_not_helo() {
    let mut h = H::mx();
    h.send("EHLO client.test\r\nSTARTTLS\r\n");
    h.send("HELO client.test\r\n");
    assert_eq!(h.send("AUTH PLAIN\r\n"), "503 5.5.1 Send EHLO first\r\n");
}

#[test]
fn auth_not_during_a_transaction() {
    let mut h = H::mx();
    h.tls();
    h.send("MAIL FROM:<a@example.test>\r\n");
    assert_eq!(
        h.send("AUTH PLAIN\r\n"),
        "503 5.5.1 AUTH not permitted during a mail transaction\r\n"
    );
}

#[test]
fn submission_requires_auth_for_mail() {
    let mut h = H::listener(submission());
    h.tls();
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        "530 5.7.0 Authentication required\r\n"
    );
    assert_eq!(
        h.send(&format!("AUTH PLAIN {}\r\n", b64("\0user\0secret"))),
        AUTH_OK
    );
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
    // Authenticated users may relay.
    assert_eq!(
        h.send("RCPT TO:<x@remote.test>\r\n"),
        rcpt_ok("x@remote.test")
    );
}

// ---------------------------------------------------------------------------------------------
// Relay control and recipient addresses

fn in_tx(h: &mut H) {
    h.ehlo();
    assert_eq!(
        h.send("MAIL FROM:<a@sender.test>\r\n"),
        sender_ok("a@sender.test")
    );
}

#[test]
fn local_and_routed_domains_from_anyone() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<alice@example.test>\r\n"),
        rcpt_ok("alice@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<bob@routed.test>\r\n"),
        rcpt_ok("bob@routed.test")
    );
}

#[test]
fn unknown_domain_from_untrusted_is_relay_denied() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(h.send("RCPT TO:<x@remote.test>\r\n"), RELAY_DENIED);
    assert_eq!(h.send("DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
}

#[test]
fn trusted_peer_may_relay() {
    let mut h = H::peer(Peer {
        trusted: true,
        ..peer()
    });
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<x@remote.test>\r\n"),
        rcpt_ok("x@remote.test")
    );
    assert_eq!(h.send("RCPT TO:<x@remote.test.>\r\n"), BAD_RCPT);
    // Address literals are refused by the parser, even for trusted peers.
    assert_eq!(h.send("RCPT TO:<x@[192.0.2.1]>\r\n"), BAD_RCPT);
}

#[test]
fn authenticated_user_may_relay() {
    let mut h = H::mx();
    h.login();
    h.send("MAIL FROM:<user@example.test>\r\n");
    assert_eq!(
        h.send("RCPT TO:<x@remote.test>\r\n"),
        rcpt_ok("x@remote.test")
    );
}

#[test]
fn relay_tricks_do_not_open_relay() {
    for (rcpt, expected) in [
        ("<\"user@remote.test\"@example.test>", RELAY_DENIED),
        ("<user%remote.test@example.test>", RELAY_DENIED),
        ("<remote.test!user@example.test>", RELAY_DENIED),
        ("<user%remote.test@routed.test>", RELAY_DENIED),
        ("<\"user@remote.test\"@routed.test>", RELAY_DENIED),
        ("<@example.test:user@remote.test>", RELAY_DENIED),
        (
            "<@example.test,@routed.test:user@remote.test>",
            RELAY_DENIED,
        ),
        // smtp-proto refuses address literals outright.
        ("<user@[127.0.0.1]>", BAD_RCPT),
        ("<user@[IPv6:::1]>", BAD_RCPT),
        ("<user@example.test.>", BAD_RCPT),
        ("<user@remote.test.example.test.>", BAD_RCPT),
        ("<user@example.test@remote.test>", BAD_RCPT),
    ] {
        let mut h = H::mx();
        in_tx(&mut h);
        assert_eq!(h.send(&format!("RCPT TO:{rcpt}\r\n")), expected, "{rcpt}");
        assert_eq!(
            h.send("DATA\r\n"),
            "554 5.5.1 No valid recipients\r\n",
            "{rcpt}"
        );
        assert!(h.queued().is_empty());
    }
}

#[test]
fn source_route_to_local_is_ignored() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<@remote.test:user@example.test>\r\n"),
        rcpt_ok("user@example.test")
    );
}

#[test]
fn domain_is_case_insensitive() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<user@EXAMPLE.TEST>\r\n"),
        rcpt_ok("user@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<Bob@Routed.Test>\r\n"),
        rcpt_ok("Bob@routed.test")
    );
    // The same recipient twice is accepted but delivered once.
    assert_eq!(
        h.send("RCPT TO:<USER@example.test>\r\n"),
        rcpt_ok("USER@example.test")
    );
    assert_eq!(
        h.send("DATA\r\nx\r\n.\r\n"),
        format!("{DATA_GO}250 2.0.0 Ok: queued as Q1\r\n")
    );
    let q = h.queued();
    assert_eq!(q[0].0.recipients, ["user@example.test", "Bob@routed.test"]);
}

#[test]
fn postmaster_without_domain() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<postmaster>\r\n"),
        rcpt_ok("postmaster@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<PostMaster>\r\n"),
        rcpt_ok("postmaster@example.test")
    );
    let mut h = H::with(
        Rules {
            postmaster_domain: None,
            ..rules()
        },
        mx(),
        peer(),
    );
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<postmaster>\r\n"),
        "550 5.1.1 No postmaster mailbox here\r\n"
    );
}

#[test]
fn null_recipient_is_rejected() {
    let mut h = H::mx();
    in_tx(&mut h);
    for rcpt in ["<>", "<\"\">", " <>", "<@routed.test:>"] {
        let out = h.send(&format!("RCPT TO:{rcpt}\r\n"));
        assert!(
            out.starts_with("501 5.1.3 Bad recipient address syntax"),
            "{rcpt}: {out}"
        );
        assert_eq!(out.lines().count(), 1);
    }
    assert_eq!(h.send("DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
}

#[test]
fn null_sender_is_accepted_but_postmaster_is_not_a_null_sender() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(h.send("MAIL FROM:<>\r\n"), sender_ok(""));
    h.send("RSET\r\n");
    // `<postmaster>` without a domain is not a valid reverse-path, and must not become `<>`.
    assert_eq!(h.send("MAIL FROM:<postmaster>\r\n"), BAD_SENDER);
    assert_eq!(h.send("MAIL FROM:<\"\">\r\n"), BAD_SENDER);
    assert_eq!(
        h.send("MAIL FROM:<>\r\nRCPT TO:<a@example.test>\r\nDATA\r\nx\r\n.\r\n"),
        format!(
            "{}{}{DATA_GO}250 2.0.0 Ok: queued as Q1\r\n",
            sender_ok(""),
            rcpt_ok("a@example.test")
        )
    );
    assert_eq!(h.queued()[0].0.sender, "");
}

#[test]
fn unsafe_mailbox_names_are_rejected() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(h.send("RCPT TO:<../x@example.test>\r\n"), BAD_RCPT);
    assert_eq!(h.send("RCPT TO:<.x@example.test>\r\n"), BAD_RCPT);
    assert_eq!(h.send("RCPT TO:<x/../../etc@example.test>\r\n"), BAD_RCPT);
    for (rcpt, shown) in [
        ("\"../x\"@example.test", "../x@example.test"),
        ("\"a/b\"@example.test", "a/b@example.test"),
        ("x/y@example.test", "x/y@example.test"),
        ("\"a b\"@example.test", "a b@example.test"),
    ] {
        assert_eq!(
            h.send(&format!("RCPT TO:<{rcpt}>\r\n")),
            format!("550 5.1.1 <{shown}>: Recipient address rejected: User unknown\r\n"),
            "{rcpt}"
        );
    }
    assert_eq!(h.send("DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
}

#[test]
fn local_domain_with_mailbox_list() {
    let mut h = H::mx();
    in_tx(&mut h);
    assert_eq!(
        h.send("RCPT TO:<alice@mbox.test>\r\n"),
        rcpt_ok("alice@mbox.test")
    );
    assert_eq!(
        h.send("RCPT TO:<Alice+tag@mbox.test>\r\n"),
        rcpt_ok("Alice+tag@mbox.test")
    );
    assert_eq!(
        h.send("RCPT TO:<bob@mbox.test>\r\n"),
        "550 5.1.1 <bob@mbox.test>: Recipient address rejected: User unknown\r\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits and syntax

#[test]
fn line_of_max_length_is_fine_one_more_is_too_long() {
    let mut h = H::mx();
    let ok = format!("NOOP {}\r\n", "a".repeat(MAX_LINE - 7));
    assert_eq!(ok.len(), MAX_LINE);
    assert_eq!(h.send(&ok), OK);
    let long = format!("NOOP {}\r\n", "a".repeat(MAX_LINE - 6));
    assert_eq!(h.send(&long), "500 5.5.2 Line too long\r\n");
    assert_eq!(h.send("NOOP\r\n"), OK);
}

#[test]
fn long_line_in_one_buffer_is_not_executed() {
    let mut h = H::mx();
    h.ehlo();
    let long = format!(
        "MAIL FROM:<a@example.test> {}\r\nNOOP\r\n",
        "X".repeat(1000)
    );
    assert_eq!(h.send(&long), format!("500 5.5.2 Line too long\r\n{OK}"));
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
}

#[test]
fn long_line_in_small_pieces_is_bounded() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@example.test>\r\n");
    let piece = "RCPT TO:<".to_string() + &"y".repeat(7);
    for _ in 0..500 {
        assert_eq!(h.send(&piece), "");
        assert!(h.buf.len() <= MAX_LINE, "buffered {}", h.buf.len());
    }
    assert!(h.max_buffered <= MAX_LINE);
    // The tail of the long line (which looks like a command) is not executed.
    assert_eq!(
        h.send("@example.test>\r\nNOOP\r\n"),
        format!("500 5.5.2 Line too long\r\n{OK}")
    );
    assert!(h.buf.is_empty());
}

#[test]
fn long_line_without_lf_is_consumed() {
    let mut s = Session::new(Arc::new(rules()), Arc::new(mx()), peer());
    // Up to the limit the caller keeps the partial line.
    let p = s.process(&[b'a'; MAX_LINE]);
    assert_eq!(p.consumed, 0);
    // Past it, everything is consumed and discarded.
    let p = s.process(&[b'a'; MAX_LINE + 1]);
    assert_eq!(p.consumed, MAX_LINE + 1);
    for _ in 0..100 {
        let p = s.process(&[b'b'; 100]);
        assert_eq!(p.consumed, 100);
        assert!(p.action.is_none());
    }
    assert!(!s.has_output());
    let p = s.process(b"tail\r\nNOOP\r\n");
    assert_eq!(p.consumed, 12);
    assert_eq!(
        s.take_output(),
        b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn long_auth_continuation_line_is_refused() {
    let mut h = H::mx();
    h.tls();
    h.send("AUTH PLAIN\r\n");
    let long = "A".repeat(2 * MAX_LINE);
    assert_eq!(
        h.send(&format!("{long}\r\n")),
        "500 5.5.2 Line too long\r\n"
    );
    assert!(h.auths().is_empty());
    assert_eq!(h.send("NOOP\r\n"), OK);
}

#[test]
fn size_parameter_over_maximum() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(h.send("MAIL FROM:<a@example.test> SIZE=1001\r\n"), TOO_BIG);
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> SIZE=99999999999999999999999\r\n"),
        TOO_BIG
    );
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> SIZE=1000\r\n"),
        sender_ok("a@example.test")
    );
}

#[test]
fn content_over_maximum() {
    let mut h = H::mx();
    h.ehlo();
    let body = format!("{}\r\n", "x".repeat(MAX_SIZE));
    let out = h.message("a@example.test", "b@example.test", &body);
    assert!(out.ends_with(&format!("{DATA_GO}{TOO_BIG}")), "{out}");
    assert!(h.queued().is_empty());
    // The transaction is over; the next one works.
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    let out = h.message("a@example.test", "b@example.test", "small\r\n");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
}

#[test]
fn content_of_exactly_maximum_is_accepted() {
    let mut h = H::mx();
    h.ehlo();
    let body = format!("{}\r\n", "x".repeat(MAX_SIZE - 2));
    let out = h.message("a@example.test", "b@example.test", &body);
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
    assert_eq!(h.queued()[0].1.len(), MAX_SIZE);
}

#[test]
fn too_many_recipients() {
    let mut h = H::mx();
    in_tx(&mut h);
    for i in 0..MAX_RCPT {
        let a = format!("r{i}@example.test");
        assert_eq!(h.send(&format!("RCPT TO:<{a}>\r\n")), rcpt_ok(&a));
    }
    for _ in 0..MAX_ERRORS + 2 {
        // Not counted as an error (the client is expected to retry them later).
        assert_eq!(
            h.send("RCPT TO:<late@example.test>\r\n"),
            "452 4.5.3 Too many recipients\r\n"
        );
    }
    assert!(!h.closed());
    h.send("DATA\r\nx\r\n.\r\n");
    assert_eq!(h.queued()[0].0.recipients.len(), MAX_RCPT);
}

#[test]
fn bad_sender_syntax() {
    let mut h = H::mx();
    h.ehlo();
    for from in [
        "<user@>",
        "<nodomain>",
        "<a@b..c>",
        "<a@-x.test>",
        "<a@example.test.>",
        "<a@[1.2.3]>",
        "<@example.test>",
    ] {
        assert_eq!(
            h.send(&format!("MAIL FROM:{from}\r\n")),
            BAD_SENDER,
            "{from}"
        );
    }
    assert_eq!(
        h.send("MAIL FROM:a@example.test\r\n"),
        "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"
    );
}

#[test]
fn out_of_sequence_commands() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Need MAIL command\r\n");
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
    assert_eq!(h.send("DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        "503 5.5.1 Nested MAIL command\r\n"
    );
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        rcpt_ok("b@example.test")
    );
    assert_eq!(h.send("DATA\r\n"), DATA_GO);
}

#[test]
fn mail_before_helo() {
    let mut h = H::mx();
    assert_eq!(h.send("MAIL FROM:<a@example.test>\r\n"), NO_EHLO);
}

#[test]
fn unknown_and_unsupported_commands() {
    let mut h = H::mx();
    assert_eq!(h.send("FOO\r\n"), "500 5.5.1 Command unrecognized\r\n");
    assert_eq!(
        h.send("MAILX FROM:<a@b.test>\r\n"),
        "500 5.5.1 Command unrecognized\r\n"
    );
    assert_eq!(h.send("EXPN staff\r\n"), "502 5.5.1 EXPN not supported\r\n");
    assert_eq!(
        h.send("ETRN example.test\r\n"),
        "502 5.5.1 Command not implemented\r\n"
    );
    h.ehlo();
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> BODY=BINARYMIME\r\n"),
        "555 5.5.4 BODY=BINARYMIME not supported\r\n"
    );
    // Outside TLS REQUIRETLS is neither offered nor taken (RFC 8689): 5.7.10.
    assert!(!h.send("EHLO c.test\r\n").contains("REQUIRETLS"));
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> REQUIRETLS\r\n"),
        "530 5.7.10 REQUIRETLS needs this session to be encrypted: issue STARTTLS first\r\n"
    );
    assert_eq!(
        h.send("MAIL FROM:<a@example.test> BODY=9BIT\r\n"),
        "501 5.5.4 Invalid parameter BODY\r\n"
    );
    let out = h.send("MAIL FROM:<a@example.test> X-FOO=1\r\n");
    assert!(out.starts_with("555 5.5.4 Unsupported parameter "), "{out}");
}

#[test]
fn nul_bare_cr_and_8bit_in_commands() {
    let mut h = H::mx();
    h.ehlo();
    let invalid = "500 5.5.2 Invalid character in command\r\n";
    assert_eq!(h.send_bytes(b"NOOP a\0b\r\n"), invalid);
    assert_eq!(h.send_bytes(b"MAIL FROM:<a@example.test>\0\r\n"), invalid);
    assert_eq!(h.send_bytes(b"NOOP a\rb\r\n"), invalid);
    assert_eq!(h.send_bytes(b"NOOP\r\r\n"), invalid);
    assert_eq!(h.send_bytes(b"NOOP \x1b[1m\r\n"), invalid);
    assert_eq!(h.send_bytes(b"NOOP \x7f\r\n"), invalid);
    // None of these started a transaction.
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    assert!(!h.closed());
    // A fresh session (the error budget is spent).
    let mut h = H::mx();
    h.ehlo();
    let eight = "500 5.5.2 8-bit characters not allowed in this command\r\n";
    assert_eq!(h.send_bytes("NOOP café\r\n".as_bytes()), eight);
    assert_eq!(h.send_bytes("EHLO bücher.test\r\n".as_bytes()), eight);
    assert_eq!(h.send_bytes(b"MAIL FROM:<\xff@example.test>\r\n"), eight);
    // None of these started a transaction.
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    // A plain tab is fine.
    assert_eq!(h.send("NOOP\ta\r\n"), OK);
}

#[test]
fn bare_lf_ends_a_command_line() {
    let mut h = H::mx();
    assert_eq!(h.send("NOOP\nNOOP\r\n"), format!("{OK}{OK}"));
}

#[test]
fn utf8_address_needs_smtputf8() {
    let mut h = H::mx();
    h.ehlo();
    let need = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter\r\n";
    assert_eq!(h.send("MAIL FROM:<jörg@example.test>\r\n"), need);
    assert_eq!(
        h.send("MAIL FROM:<a@example.test>\r\n"),
        sender_ok("a@example.test")
    );
    assert_eq!(h.send("RCPT TO:<jörg@routed.test>\r\n"), need);
    h.send("RSET\r\n");
    assert_eq!(
        h.send("MAIL FROM:<jörg@example.test> SMTPUTF8\r\n"),
        sender_ok("jörg@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<jörg@routed.test>\r\n"),
        rcpt_ok("jörg@routed.test")
    );
    assert_eq!(h.send("RCPT TO:<x@bücher.test>\r\n"), RELAY_DENIED);
    h.send("DATA\r\nx\r\n.\r\n");
    let q = h.queued();
    assert!(q[0].0.smtputf8);
    assert_eq!(q[0].0.sender, "jörg@example.test");
    assert_eq!(q[0].0.recipients, ["jörg@routed.test"]);
}

#[test]
fn domains_match_in_either_label_form() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@example.test> SMTPUTF8\r\n");
    for rcpt in [
        "x@café.test",
        "x@CAFÉ.test",
        "x@xn--caf-dma.test",
        "x@XN--CAF-DMA.TEST",
        "x@café。test",
    ] {
        h.send("RSET\r\nMAIL FROM:<a@example.test> SMTPUTF8\r\n");
        let reply = h.send(&format!("RCPT TO:<{rcpt}>\r\n"));
        assert!(reply.starts_with("250 2.1.5"), "{rcpt}: {reply}");
    }
}

#[test]
fn utf8_local_parts_at_local_domains() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@example.test> SMTPUTF8\r\n");
    // Any safe name (mailboxes empty): delivered, not "User unknown".
    assert_eq!(
        h.send("RCPT TO:<Jörg@example.test>\r\n"),
        rcpt_ok("Jörg@example.test")
    );
    assert_eq!(
        h.send("RCPT TO:<jö/rg@example.test>\r\n"),
        "553 5.6.7 <jö/rg@example.test>: This UTF-8 mailbox name has characters that cannot be delivered here\r\n"
    );
    // Listed mailboxes: a name that is not listed does not exist.
    assert_eq!(
        h.send("RCPT TO:<jörg@mbox.test>\r\n"),
        "550 5.1.1 <jörg@mbox.test>: Recipient address rejected: User unknown\r\n"
    );
}

#[test]
fn too_many_errors_close_the_session() {
    let mut h = H::mx();
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(h.send("FOO\r\n"), "500 5.5.1 Command unrecognized\r\n");
    }
    assert!(!h.closed());
    let out = h.send("FOO\r\nNOOP\r\n");
    assert_eq!(
        out,
        format!("500 5.5.1 Command unrecognized\r\n{TOO_MANY_ERRORS}")
    );
    assert!(h.closed());
    assert!(h.s.is_closed());
    assert_eq!(h.buf, b"NOOP\r\n");
    assert_eq!(h.send("NOOP\r\n"), "");
}

#[test]
fn too_many_errors_counts_all_kinds() {
    let mut h = H::mx();
    h.ehlo();
    let mut out = String::new();
    for _ in 0..MAX_ERRORS / 2 {
        out += &h.send("RCPT TO:<b@example.test>\r\n");
        out += &h.send("NOOP \0\r\n");
    }
    assert!(out.ends_with(TOO_MANY_ERRORS), "{out}");
    assert!(h.closed());
}

// ---------------------------------------------------------------------------------------------
// DATA

#[test]
fn data_is_unstuffed_and_queued() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@sender.test> BODY=8BITMIME\r\nRCPT TO:<b@example.test>\r\n");
    assert_eq!(h.send("DATA\r\n"), DATA_GO);
    assert!(h.s.in_data());
    assert_eq!(h.send("Subject: t\r\n\r\n..leading dot\r\n"), "");
    assert_eq!(h.send("...\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert!(!h.s.in_data());
    let q = h.queued();
    assert_eq!(q.len(), 1);
    let (env, body, trace) = q[0];
    assert_eq!(body, b"Subject: t\r\n\r\n.leading dot\r\n..\r\n");
    assert_eq!(
        *env,
        Envelope {
            sender: "a@sender.test".to_string(),
            recipients: vec!["b@example.test".to_string()],
            smtputf8: false,
            eight_bit: true,
            dsn: vec![RcptDsn::default()],
            ..Envelope::default()
        }
    );
    assert_eq!(trace.helo, "client.test");
    assert_eq!(trace.ip, peer().ip);
    assert_eq!(trace.protocol, "ESMTP");
    assert!(trace.tls.is_none());
    assert!(trace.auth_user.is_none());
}

#[test]
fn data_byte_by_byte() {
    let mut h = H::mx();
    h.ehlo();
    let input = "MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nl1\r\n..\r\n.\r\nNOOP\r\n";
    let mut out = String::new();
    for b in input.bytes() {
        out += &h.send_bytes(&[b]);
    }
    assert_eq!(
        out,
        format!(
            "{}{}{DATA_GO}250 2.0.0 Ok: queued as Q1\r\n{OK}",
            sender_ok("a@sender.test"),
            rcpt_ok("b@example.test")
        )
    );
    assert_eq!(h.queued()[0].1, b"l1\r\n.\r\n");
}

#[test]
fn empty_message() {
    let mut h = H::mx();
    h.ehlo();
    let out = h.message("a@sender.test", "b@example.test", "");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
    assert!(h.queued()[0].1.is_empty());
}

#[test]
fn queue_failure_is_temporary() {
    let mut h = H::mx();
    h.ehlo();
    h.queue_error = Some("disk full".to_string());
    let out = h.message("a@sender.test", "b@example.test", "x\r\n");
    assert!(
        out.ends_with("451 4.3.0 Temporary failure writing to the queue, try again later\r\n"),
        "{out}"
    );
    assert_eq!(h.queued().len(), 1);
    // The transaction is over.
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    h.queue_error = None;
    let out = h.message("a@sender.test", "b@example.test", "x\r\n");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
}

#[test]
fn queue_waits_for_the_caller() {
    let mut s = Session::new(Arc::new(rules()), Arc::new(mx()), peer());
    let input = b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n";
    let p = s.process(input);
    assert_eq!(p.consumed, input.len() - 6);
    assert!(matches!(p.action, Some(Action::Queue { .. })));
    let p = s.process(b"NOOP\r\n");
    assert_eq!(p.consumed, 0);
    assert!(s.queued(Ok("ID".to_string())).is_none());
    let p = s.process(b"NOOP\r\n");
    assert_eq!(p.consumed, 6);
    let out = String::from_utf8(s.take_output()).unwrap();
    assert!(
        out.ends_with(&format!("{DATA_GO}250 2.0.0 Ok: queued as ID\r\n{OK}")),
        "{out}"
    );
}

const SMUGGLE_TAIL: &str =
    "MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n";

#[test]
fn bare_lf_smuggling_is_rejected_and_not_executed() {
    for end in ["\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\r.\r"] {
        let mut h = H::mx();
        h.ehlo();
        let input = format!(
            "MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhello{end}{SMUGGLE_TAIL}"
        );
        let out = h.send(&input);
        assert_eq!(
            out,
            format!(
                "{}{}{DATA_GO}{BARE_LF}",
                sender_ok("a@sender.test"),
                rcpt_ok("b@example.test")
            ),
            "{end:?}"
        );
        assert!(h.queued().is_empty(), "{end:?}");
        assert!(h.buf.is_empty());
        // The session is back in command mode with no transaction.
        assert_eq!(
            h.send("RCPT TO:<b@example.test>\r\n"),
            "503 5.5.1 Need MAIL before RCPT\r\n"
        );
    }
}

#[test]
fn bare_lf_normalized_is_one_message() {
    let mut h = H::listener(ListenerRules {
        bare_newline: BareNewline::Normalize,
        ..mx()
    });
    h.ehlo();
    let input = format!(
        "MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhello\n.\n{SMUGGLE_TAIL}"
    );
    let out = h.send(&input);
    assert_eq!(
        out,
        format!(
            "{}{}{DATA_GO}250 2.0.0 Ok: queued as Q1\r\n",
            sender_ok("a@sender.test"),
            rcpt_ok("b@example.test")
        )
    );
    let q = h.queued();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].0.sender, "a@sender.test");
    assert_eq!(q[0].0.recipients, ["b@example.test"]);
    assert_eq!(
        q[0].1,
        b"hello\r\n.\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"
    );
}

#[test]
fn bare_lf_normalized_to_crlf() {
    let mut h = H::listener(ListenerRules {
        bare_newline: BareNewline::Normalize,
        ..mx()
    });
    h.ehlo();
    let out = h.message("a@sender.test", "b@example.test", "a\nb\rc\r\n");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
    assert_eq!(h.queued()[0].1, b"a\r\nb\r\nc\r\n");
}

// ---------------------------------------------------------------------------------------------
// BDAT

fn bdat_tx(h: &mut H) {
    h.ehlo();
    h.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\n");
}

#[test]
fn bdat_chunks() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(
        h.send("BDAT 7\r\nhello\r\n"),
        "250 2.0.0 7 octets received\r\n"
    );
    assert_eq!(
        h.send("BDAT 8 LAST\r\n.world\r\n"),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    // No dot-unstuffing in BDAT.
    assert_eq!(h.queued()[0].1, b"hello\r\n.world\r\n");
    assert_eq!(h.queued()[0].2.protocol, "ESMTP");
}

#[test]
fn bdat_zero_last() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    let out = h.send("BDAT 4\r\nab\r\nBDAT 0 LAST\r\nNOOP\r\n");
    assert_eq!(
        out,
        format!("250 2.0.0 4 octets received\r\n250 2.0.0 Ok: queued as Q1\r\n{OK}")
    );
    assert_eq!(h.queued()[0].1, b"ab\r\n");
}

#[test]
fn bdat_split_across_reads() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(h.send("BDAT 12 LAST\r\nabc"), "");
    assert!(h.s.in_data());
    assert_eq!(h.send("de\r"), "");
    assert_eq!(h.send("\nfgh"), "");
    assert_eq!(h.send("\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued()[0].1, b"abcde\r\nfgh\r\n");
}

#[test]
fn bdat_crlf_across_chunks_is_not_bare() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    let out = h.send("BDAT 2\r\na\rBDAT 2 LAST\r\n\nb");
    assert_eq!(
        out,
        "250 2.0.0 2 octets received\r\n250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert_eq!(h.queued()[0].1, b"a\r\nb");
}

#[test]
fn bdat_without_mail_swallows_the_chunk() {
    let mut h = H::mx();
    h.ehlo();
    let chunk = "MAIL FROM:<evil@attacker.test>\r\n";
    let out = h.send(&format!("BDAT {} LAST\r\n{chunk}NOOP\r\n", chunk.len()));
    assert_eq!(out, format!("503 5.5.1 Need MAIL command\r\n{OK}"));
    let out = h.send(&format!("BDAT {}\r\n{chunk}", chunk.len()));
    assert_eq!(out, "503 5.5.1 Need MAIL command\r\n");
    assert_eq!(
        h.send("RCPT TO:<b@example.test>\r\n"),
        "503 5.5.1 Need MAIL before RCPT\r\n"
    );
    assert!(h.queued().is_empty());
}

#[test]
fn bdat_without_recipients() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@sender.test>\r\n");
    let chunk = "RCPT TO:<b@example.test>\r\n";
    let out = h.send(&format!("BDAT {} LAST\r\n{chunk}", chunk.len()));
    assert_eq!(out, "554 5.5.1 No valid recipients\r\n");
    assert!(h.queued().is_empty());
}

#[test]
fn data_after_bdat_and_rcpt_during_bdat() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(h.send("BDAT 3\r\nabc"), "250 2.0.0 3 octets received\r\n");
    assert_eq!(
        h.send("DATA\r\n"),
        "503 5.5.1 DATA not allowed after BDAT\r\n"
    );
    assert!(!h.s.in_data());
    assert_eq!(
        h.send("RCPT TO:<c@example.test>\r\n"),
        "503 5.5.1 RCPT not allowed during BDAT\r\n"
    );
    assert_eq!(h.send("BDAT 0 LAST\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued()[0].1, b"abc");
    assert_eq!(h.queued()[0].0.recipients, ["b@example.test"]);
}

#[test]
fn bdat_oversize_in_one_chunk() {
    // A chunk that alone exceeds the limit is refused before its octets are read, and the
    // session is closed: what follows can no longer be framed.
    let mut h = H::mx();
    bdat_tx(&mut h);
    let chunk = format!("MAIL FROM:<x@y.test>\r\n{}", "z".repeat(MAX_SIZE));
    assert_eq!(
        h.send(&format!("BDAT {} LAST\r\n{chunk}", chunk.len())),
        "552 5.3.4 BDAT chunk exceeds the maximum message size; closing the connection\r\n"
    );
    assert!(h.closed());
    assert!(h.queued().is_empty());
}

#[test]
fn bdat_sizes_at_every_boundary() {
    let closing = |reply: &str| format!("{reply}; closing the connection\r\n");
    let not_number = closing("501 5.5.4 BDAT needs a chunk size in octets");
    let too_large = closing("501 5.5.4 BDAT chunk size is too large to be a size");
    let over_limit = closing("552 5.3.4 BDAT chunk exceeds the maximum message size");
    for (size, want) in [
        ("99999999999999999999999", too_large.as_str()),
        ("18446744073709551616", too_large.as_str()),
        ("18446744073709551615", over_limit.as_str()),
        ("4294967296", over_limit.as_str()),
        (&(MAX_SIZE + 1).to_string(), over_limit.as_str()),
        ("-1", not_number.as_str()),
        ("+5", not_number.as_str()),
        ("0x10", not_number.as_str()),
        ("1e3", not_number.as_str()),
    ] {
        let mut h = H::mx();
        bdat_tx(&mut h);
        // The octets after the command must never be read as commands.
        let out = h.send(&format!("BDAT {size} LAST\r\n{}NOOP\r\n", "z".repeat(999)));
        assert_eq!(out, want, "BDAT {size}");
        assert!(h.closed(), "BDAT {size}");
        assert!(h.queued().is_empty(), "BDAT {size}");
    }
    // Exactly the limit is taken.
    let mut h = H::mx();
    bdat_tx(&mut h);
    let chunk = "z".repeat(MAX_SIZE);
    assert_eq!(
        h.send(&format!("BDAT {MAX_SIZE} LAST\r\n{chunk}")),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    // Leading zeros are still a number.
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(
        h.send("BDAT 0003 LAST\r\nabc"),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
}

#[test]
fn bdat_oversize_over_several_chunks() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    let chunk = "z".repeat(600);
    assert_eq!(
        h.send(&format!("BDAT 600\r\n{chunk}")),
        "250 2.0.0 600 octets received\r\n"
    );
    assert_eq!(h.send(&format!("BDAT 600\r\n{chunk}")), TOO_BIG);
    // Once failed, the transaction stays failed until LAST.
    assert_eq!(h.send("BDAT 1\r\nz"), TOO_BIG);
    assert_eq!(h.send("BDAT 0 LAST\r\n"), TOO_BIG);
    assert!(h.queued().is_empty());
    let out = h.message("a@sender.test", "b@example.test", "ok\r\n");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
}

#[test]
fn bdat_bare_lf_rejected_or_normalized() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(h.send("BDAT 4 LAST\r\na\nb\n"), BARE_LF);
    assert!(h.queued().is_empty());
    let mut h = H::mx();
    bdat_tx(&mut h);
    // A CR dangling at the very end is bare as well.
    assert_eq!(h.send("BDAT 2 LAST\r\na\r"), BARE_LF);
    let mut h = H::listener(ListenerRules {
        bare_newline: BareNewline::Normalize,
        ..mx()
    });
    bdat_tx(&mut h);
    assert_eq!(
        h.send("BDAT 4 LAST\r\na\nb\r"),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert_eq!(h.queued()[0].1, b"a\r\nb\r\n");
}

#[test]
fn bdat_normalized_content_stays_within_maximum() {
    let mut h = H::listener(ListenerRules {
        bare_newline: BareNewline::Normalize,
        ..mx()
    });
    bdat_tx(&mut h);
    // Each bare LF becomes CRLF: 600 octets received, 1200 would be stored.
    let chunk = "\n".repeat(600);
    assert_eq!(h.send(&format!("BDAT 600 LAST\r\n{chunk}")), TOO_BIG);
    assert!(h.queued().is_empty());
    // And a dangling CR at the end may not push it over either.
    bdat_tx(&mut h);
    let chunk = format!("{}\r", "x".repeat(MAX_SIZE - 1));
    assert_eq!(
        h.send(&format!("BDAT {} LAST\r\n{chunk}", chunk.len())),
        TOO_BIG
    );
    assert!(h.queued().is_empty());
}

#[test]
fn bdat_bad_size_is_a_syntax_error() {
    let mut h = H::mx();
    bdat_tx(&mut h);
    // Without a size the chunk cannot be framed: the session ends rather than reading its
    // octets as commands.
    assert_eq!(
        h.send("BDAT x\r\nNOOP\r\n"),
        "501 5.5.4 BDAT needs a chunk size in octets; closing the connection\r\n"
    );
    assert!(h.closed());
    // No size at all: a plain syntax error (no chunk follows).
    let mut h = H::mx();
    bdat_tx(&mut h);
    assert_eq!(
        h.send("BDAT\r\n"),
        "501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n"
    );
    assert_eq!(h.send("NOOP\r\n"), OK);
}

// ---------------------------------------------------------------------------------------------
// Pipelining

#[test]
fn pipelined_replies_in_order_in_one_output() {
    let mut h = H::mx();
    let out = h.send(
        "EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\n\
         RCPT TO:<x@remote.test>\r\nRCPT TO:<c@routed.test>\r\nDATA\r\n",
    );
    assert_eq!(
        out,
        format!(
            "{EHLO_CAPS}250 STARTTLS\r\n{}{}{RELAY_DENIED}{}{DATA_GO}",
            sender_ok("a@sender.test"),
            rcpt_ok("b@example.test"),
            rcpt_ok("c@routed.test")
        )
    );
    assert_eq!(
        h.send("body\r\n.\r\nQUIT\r\n"),
        "250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(
        h.queued()[0].0.recipients,
        ["b@example.test", "c@routed.test"]
    );
    assert!(h.closed());
}

#[test]
fn pipelined_two_messages_in_one_buffer() {
    let mut h = H::mx();
    h.ehlo();
    let one = "MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\none\r\n.\r\n";
    let two = "MAIL FROM:<c@sender.test>\r\nRCPT TO:<d@routed.test>\r\nBDAT 5 LAST\r\ntwo\r\n";
    let out = h.send(&format!("{one}{two}"));
    assert_eq!(
        out,
        format!(
            "{}{}{DATA_GO}250 2.0.0 Ok: queued as Q1\r\n{}{}250 2.0.0 Ok: queued as Q2\r\n",
            sender_ok("a@sender.test"),
            rcpt_ok("b@example.test"),
            sender_ok("c@sender.test"),
            rcpt_ok("d@routed.test")
        )
    );
    let q = h.queued();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].1, b"one\r\n");
    assert_eq!(q[1].1, b"two\r\n");
    assert_eq!(q[1].0.sender, "c@sender.test");
}

// ---------------------------------------------------------------------------------------------
// Trace

fn protocol_of(h: &mut H, mail_params: &str) -> String {
    let out = h.send(&format!(
        "MAIL FROM:<a@sender.test>{mail_params}\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n"
    ));
    assert!(out.ends_with(" Ok: queued as Q1\r\n"), "{out}");
    h.queued()[0].2.protocol.clone()
}

#[test]
fn trace_protocol_esmtp() {
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(protocol_of(&mut h, ""), "ESMTP");
}

#[test]
fn trace_protocol_smtp_for_helo() {
    let mut h = H::mx();
    h.send("HELO old.test\r\n");
    assert_eq!(protocol_of(&mut h, ""), "SMTP");
    assert_eq!(h.queued()[0].2.helo, "old.test");
}

#[test]
fn trace_protocol_esmtps() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(protocol_of(&mut h, ""), "ESMTPS");
    assert_eq!(h.queued()[0].2.tls, Some(tls_info()));
}

#[test]
fn trace_protocol_esmtpsa() {
    let mut h = H::mx();
    h.login();
    assert_eq!(protocol_of(&mut h, ""), "ESMTPSA");
    assert_eq!(h.queued()[0].2.auth_user.as_deref(), Some("user"));
}

#[test]
fn trace_protocol_utf8smtps() {
    let mut h = H::mx();
    h.tls();
    assert_eq!(protocol_of(&mut h, " SMTPUTF8"), "UTF8SMTPS");
    let mut h = H::mx();
    h.login();
    assert_eq!(protocol_of(&mut h, " SMTPUTF8"), "UTF8SMTPSA");
    let mut h = H::mx();
    h.ehlo();
    assert_eq!(protocol_of(&mut h, " SMTPUTF8"), "UTF8SMTP");
}

#[test]
fn trace_protocol_for_bdat() {
    let mut h = H::mx();
    h.tls();
    h.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 1 LAST\r\nx");
    assert_eq!(h.queued()[0].2.protocol, "ESMTPS");
}

// ---------------------------------------------------------------------------------------------
// Simple commands

#[test]
fn rset_clears_the_transaction() {
    let mut h = H::mx();
    h.ehlo();
    h.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\n");
    assert_eq!(h.send("RSET\r\n"), OK);
    assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Need MAIL command\r\n");
    assert_eq!(
        h.send("MAIL FROM:<a@sender.test>\r\n"),
        sender_ok("a@sender.test")
    );
}

#[test]
fn noop_vrfy_help() {
    let mut h = H::mx();
    assert_eq!(h.send("NOOP\r\n"), OK);
    assert_eq!(h.send("noop hello\r\n"), OK);
    assert_eq!(
        h.send("VRFY postmaster\r\n"),
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    );
    assert_eq!(
        h.send("HELP\r\n"),
        "214-2.0.0 Moat SMTP server. Commands:\r\n\
         214-2.0.0   EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT\r\n\
         214 2.0.0   RSET NOOP VRFY HELP QUIT\r\n"
    );
}

#[test]
fn quit_closes() {
    let mut h = H::mx();
    assert_eq!(h.send("QUIT\r\nNOOP\r\n"), "221 2.0.0 Bye\r\n");
    assert!(h.closed());
    assert!(h.s.is_closed());
    assert_eq!(h.buf, b"NOOP\r\n");
}

#[test]
fn quit_consumed_stops_after_quit() {
    let mut s = Session::new(Arc::new(rules()), Arc::new(mx()), peer());
    let p = s.process(b"QUIT\r\nNOOP\r\n");
    assert_eq!(p.consumed, 6);
    assert!(matches!(p.action, Some(Action::Close)));
    let p = s.process(b"NOOP\r\n");
    assert_eq!(p.consumed, 0);
    assert!(p.action.is_none());
}

#[test]
fn lowercase_commands() {
    let mut h = H::mx();
    h.send("ehlo client.test\r\n");
    let out = h.send("mail from:<a@sender.test>\r\nrcpt to:<b@example.test>\r\ndata\r\nx\r\n.\r\n");
    assert!(out.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{out}");
}

#[test]
fn shutdown_sends_421() {
    let mut h = H::mx();
    h.s.shutdown("Service shutting down");
    assert_eq!(
        String::from_utf8(h.s.take_output()).unwrap(),
        "421 4.4.2 mx.example.test Service shutting down\r\n"
    );
    assert!(h.s.is_closed());
    assert_eq!(h.send("NOOP\r\n"), "");
}

#[test]
fn peer_accessors() {
    let h = H::mx();
    assert_eq!(h.s.peer_ip(), peer().ip);
    assert!(h.s.tls().is_none());
    assert!(!h.s.has_output());
    assert!(!h.s.in_data());
    assert!(!h.s.is_closed());
}

// ---------------------------------------------------------------------------------------------
// Robustness

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const FRAGMENTS: &[&[u8]] = &[
    b"EHLO fuzz.test\r\n",
    b"HELO fuzz.test\r\n",
    b"MAIL FROM:<a@example.test>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n",
    b"MAIL FROM:<postmaster>\r\n",
    b"RCPT TO:<b@example.test>\r\n",
    b"RCPT TO:<x@remote.test>\r\n",
    b"RCPT TO:<\"a@b\"@routed.test>\r\n",
    b"RCPT TO:<>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<j\xc3\xb6rg@routed.test>\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 5 LAST\r\n",
    b"BDAT 18446744073709551615\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\0",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
    b"AUTH LOGIN\r\n",
    b"dXNlcg==\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"HELP\r\n",
    b"QUIT\r\n",
    b"\xff\xfe\xc3",
];

/// Counts of actions seen, to show the random input reaches deep states.
#[derive(Default)]
struct Seen {
    tls: usize,
    auth: usize,
    queue: usize,
    close: usize,
}

fn fuzz_session(seed: u64, listener: ListenerRules, peer: Peer, seen: &mut Seen) {
    let mut rng = XorShift(seed);
    let mut rules = rules();
    rules.max_line_length = 64;
    rules.max_message_size = 200;
    rules.max_errors = 1000;
    let max_line = rules.max_line_length;
    let mut s = Session::new(Arc::new(rules), Arc::new(listener), peer);
    s.greeting();
    let mut buf: Vec<u8> = Vec::new();
    let mut id = 0;
    for _ in 0..60 {
        // Build one read's worth of input.
        for _ in 0..1 + rng.below(4) {
            if rng.below(3) == 0 {
                let n = rng.below(40);
                buf.extend((0..n).map(|_| rng.next() as u8));
            } else {
                buf.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
            }
        }
        loop {
            let p = s.process(&buf);
            assert!(
                p.consumed <= buf.len(),
                "seed {seed}: consumed {} of {}",
                p.consumed,
                buf.len()
            );
            buf.drain(..p.consumed);
            let mut next = p.action;
            let mut stop = next.is_none();
            while let Some(action) = next.take() {
                next = match action {
                    Action::StartTls => {
                        seen.tls += 1;
                        buf.clear();
                        s.tls_started(tls_info());
                        None
                    }
                    Action::Authenticate { .. } => {
                        seen.auth += 1;
                        s.auth_result(match rng.below(4) {
                            0 => AuthOutcome::Failure,
                            1 if rng.below(4) == 0 => AuthOutcome::Blocked,
                            _ => AuthOutcome::Success("user".to_string()),
                        })
                    }
                    Action::Spill { chunk, .. } => panic!("seed {seed}: spilled {}", chunk.len()),
                    Action::Queue { body, .. } => {
                        seen.queue += 1;
                        assert!(body.len() <= 200, "seed {seed}: body of {}", body.len());
                        id += 1;
                        s.queued(if rng.below(5) == 0 {
                            Err("x".into())
                        } else {
                            Ok(format!("Q{id}"))
                        })
                    }
                    Action::Close => {
                        seen.close += 1;
                        stop = true;
                        None
                    }
                };
            }
            if s.is_closed() {
                break;
            }
            if stop {
                // Waiting for more input: only a partial command line may stay buffered.
                if !s.in_data() {
                    assert!(
                        buf.len() <= max_line,
                        "seed {seed}: {} bytes buffered",
                        buf.len()
                    );
                }
                break;
            }
        }
        let out = s.take_output();
        // Every reply line ends in CRLF and starts with a three-digit code.
        assert!(out.is_empty() || out.ends_with(b"\r\n"), "seed {seed}");
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(
                line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit),
                "seed {seed}: {line:?}"
            );
        }
        if s.is_closed() {
            break;
        }
    }
}

#[test]
fn random_input_never_panics() {
    let listeners = [
        mx(),
        submission(),
        ListenerRules {
            bare_newline: BareNewline::Normalize,
            ..mx()
        },
        ListenerRules {
            starttls: false,
            ..mx()
        },
    ];
    let peers = [
        peer(),
        Peer {
            trusted: true,
            ..peer()
        },
        Peer {
            tls: Some(tls_info()),
            ..peer()
        },
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut seen = Seen::default();
    for i in 0..800 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1;
        fuzz_session(
            seed,
            listeners[i % listeners.len()].clone(),
            peers[i % peers.len()].clone(),
            &mut seen,
        );
    }
    assert!(seen.tls > 10, "STARTTLS reached {} times", seen.tls);
    assert!(seen.auth > 10, "AUTH reached {} times", seen.auth);
    assert!(seen.queue > 10, "queueing reached {} times", seen.queue);
    assert!(seen.close > 10, "close reached {} times", seen.close);
}

#[test]
fn random_bytes_byte_by_byte() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for _ in 0..100 {
        let mut s = Session::new(
            Arc::new(rules()),
            Arc::new(mx()),
            Peer {
                trusted: true,
                ..peer()
            },
        );
        let mut input = Vec::new();
        for _ in 0..20 {
            input.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
        }
        let mut buf = Vec::new();
        for &b in &input {
            buf.push(b);
            let p = s.process(&buf);
            assert!(p.consumed <= buf.len());
            buf.drain(..p.consumed);
            match p.action {
                Some(Action::StartTls) => {
                    buf.clear();
                    s.tls_started(tls_info());
                }
                Some(Action::Authenticate { .. }) => {
                    s.auth_result(AuthOutcome::Failure);
                }
                Some(Action::Spill { .. }) => s.spilled(true),
                Some(Action::Queue { .. }) => {
                    s.queued(Ok("Q".into()));
                }
                Some(Action::Close) | None => {}
            }
            if s.is_closed() {
                break;
            }
        }
        s.take_output();
    }
}

#[test]
fn sender_rule_requires_client_certificate() {
    // The harness rules say: senders at certified.test need a certificate for relay.certified.test.
    let mut h = H::mx();
    let out = h.send("EHLO c\r\nMAIL FROM:<a@certified.test>\r\n");
    assert!(
        out.ends_with(
            "530 5.7.0 A client certificate issued to relay.certified.test is required\r\n"
        ),
        "{out}"
    );
    let mut with_cert = tls_info();
    with_cert.client_names = vec!["other.test".into()];
    let mut h = H::peer(Peer {
        tls: Some(with_cert.clone()),
        ..peer()
    });
    let out = h.send("EHLO c\r\nMAIL FROM:<a@certified.test>\r\nMAIL FROM:<a@elsewhere.test>\r\n");
    assert!(
        out.contains("530 5.7.0 A client certificate issued to relay.certified.test"),
        "{out}"
    );
    assert!(
        out.ends_with("250 2.1.0 Sender <a@elsewhere.test> OK\r\n"),
        "{out}"
    );
    with_cert.client_names = vec!["Relay.Certified.Test".into()];
    let mut h = H::peer(Peer {
        tls: Some(with_cert),
        ..peer()
    });
    let out = h.send("EHLO c\r\nMAIL FROM:<a@certified.test>\r\n");
    assert!(
        out.ends_with("250 2.1.0 Sender <a@certified.test> OK\r\n"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Large messages: content past SPILL_AT is handed out as it arrives

const BIG_LIMIT: usize = 8 * SPILL_AT;

fn big_session() -> H {
    let mut r = rules();
    r.max_message_size = BIG_LIMIT;
    let mut h = H::with(r, mx(), peer());
    h.ehlo();
    h.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\n");
    h
}

/// `n` octets of message, in lines of 78 characters and CRLF (some starting with a dot).
fn big_body(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n + 80);
    let mut line = 0usize;
    while body.len() < n {
        if line.is_multiple_of(7) {
            body.push(b'.');
        }
        body.extend(std::iter::repeat_n(b'a' + (line % 26) as u8, 77));
        body.extend_from_slice(b"\r\n");
        line += 1;
    }
    body
}

/// Sends `wire` in reads of 64 KiB, as the connection layer does, and returns the replies.
fn send_in_reads(h: &mut H, wire: &[u8]) -> String {
    let mut out = String::new();
    for part in wire.chunks(64 << 10) {
        out.push_str(&h.send_bytes(part));
    }
    out
}

fn spills(h: &H) -> Vec<(usize, bool)> {
    h.done
        .iter()
        .filter_map(|d| match d {
            Done::Spill { len, pending } => Some((*len, *pending)),
            _ => None,
        })
        .collect()
}

#[test]
fn large_data_is_handed_out_as_it_arrives() {
    let mut h = big_session();
    let body = big_body(3 * SPILL_AT + 12345);
    assert!(h.send("DATA\r\n").starts_with("354"));
    let wire = crate::smtp::data::encode_for_data(&body);
    assert_eq!(
        send_in_reads(&mut h, &wire),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    let spills = spills(&h);
    assert!(spills.len() >= 2, "{spills:?}");
    for (len, pending) in &spills {
        // Never more held than one read past the threshold.
        assert!(*len >= SPILL_AT && *len < SPILL_AT + (64 << 10), "{len}");
        assert!(pending, "the envelope is known when content is handed out");
    }
    assert_eq!(h.queued()[0].1, &body[..], "content reassembled intact");
    assert!(!h.s.spill_open());
}

#[test]
fn small_messages_are_never_handed_out() {
    let mut h = big_session();
    let body = big_body(SPILL_AT - 200);
    h.send("DATA\r\n");
    let wire = crate::smtp::data::encode_for_data(&body);
    assert_eq!(
        send_in_reads(&mut h, &wire),
        "250 2.0.0 Ok: queued as Q1\r\n"
    );
    assert!(spills(&h).is_empty());
    assert_eq!(h.queued()[0].1, &body[..]);
}

#[test]
fn large_bdat_is_handed_out_as_it_arrives() {
    let mut h = big_session();
    let body = big_body(3 * SPILL_AT + 999);
    let (first, second) = body.split_at(SPILL_AT + SPILL_AT / 2);
    let mut wire = format!("BDAT {}\r\n", first.len()).into_bytes();
    wire.extend_from_slice(first);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    wire.extend_from_slice(second);
    let out = send_in_reads(&mut h, &wire);
    assert_eq!(
        out,
        format!(
            "250 2.0.0 {} octets received\r\n250 2.0.0 Ok: queued as Q1\r\n",
            first.len()
        )
    );
    let spills = spills(&h);
    assert!(spills.len() >= 2, "{spills:?}");
    assert!(
        spills
            .iter()
            .all(|(len, p)| *len < SPILL_AT + (64 << 10) && *p)
    );
    assert_eq!(h.queued()[0].1, &body[..]);
}

#[test]
fn oversized_after_handing_out_closes_the_spill() {
    let mut h = big_session();
    h.send("DATA\r\n");
    let wire = crate::smtp::data::encode_for_data(&big_body(BIG_LIMIT + 100));
    let (head, rest) = wire.split_at(2 * SPILL_AT);
    send_in_reads(&mut h, head);
    assert!(h.s.spill_open(), "content handed out and still wanted");
    let out = send_in_reads(&mut h, rest);
    assert_eq!(
        out,
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    assert!(!h.s.spill_open(), "the spool file is to be dropped");
    assert!(h.queued().is_empty());
    assert!(spills(&h).iter().map(|s| s.0).sum::<usize>() <= BIG_LIMIT);
}

#[test]
fn a_failed_spill_refuses_the_message_with_451_and_the_session_goes_on() {
    let mut h = big_session();
    h.spill_fails_after = Some(1);
    h.send("DATA\r\n");
    let wire = crate::smtp::data::encode_for_data(&big_body(3 * SPILL_AT));
    let out = send_in_reads(&mut h, &wire);
    assert_eq!(
        out,
        "451 4.3.0 Temporary failure writing to the queue, try again later\r\n"
    );
    assert!(!h.s.spill_open());
    assert!(h.queued().is_empty());
    // Nothing is handed out after the failure, and the next message is taken.
    assert_eq!(spills(&h).len(), 2);
    h.spill_fails_after = None;
    h.spilled.clear();
    h.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
    assert_eq!(h.send("hello\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
}

#[test]
fn a_failed_bdat_spill_answers_451() {
    let mut h = big_session();
    h.spill_fails_after = Some(0);
    let chunk = big_body(SPILL_AT + 10);
    let mut wire = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    wire.extend_from_slice(&chunk);
    assert_eq!(
        send_in_reads(&mut h, &wire),
        "451 4.3.0 Temporary failure writing to the queue, try again later\r\n"
    );
    assert!(!h.s.spill_open());
    assert!(h.queued().is_empty());
}

#[test]
fn reset_during_bdat_closes_the_spill() {
    let mut h = big_session();
    let chunk = big_body(SPILL_AT + 10);
    let mut wire = format!("BDAT {}\r\n", chunk.len()).into_bytes();
    wire.extend_from_slice(&chunk);
    send_in_reads(&mut h, &wire);
    assert!(h.s.spill_open());
    assert_eq!(h.send("RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert!(!h.s.spill_open());
    assert!(h.s.pending_message().is_none());
}

#[test]
fn a_refused_spilled_message_never_leaks_into_the_next_in_the_same_read() {
    let mut h = big_session();
    // Message 1 spills, then carries a bare LF and is refused at its end; in the same read
    // message 2 begins and reaches the spill threshold before its end.
    assert!(h.send("DATA\r\n").starts_with("354"));
    let one = crate::smtp::data::encode_for_data(&big_body(2 * SPILL_AT));
    send_in_reads(&mut h, &one[..SPILL_AT + 200_000]);
    assert!(h.s.spill_open(), "message 1 handed out content");
    let mut wire =
        b"\r\nbare\nlf\r\n.\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
            .to_vec();
    let second = big_body(2 * SPILL_AT + 77);
    let encoded = crate::smtp::data::encode_for_data(&second);
    let (start, rest) = encoded.split_at(SPILL_AT + 100_000);
    wire.extend_from_slice(start);
    let out = h.send_bytes(&wire);
    assert!(out.contains("550 5.6.2"), "{out}");
    let spills_so_far = spills(&h).len();
    assert!(
        spills_so_far >= 2,
        "message 2 handed out content in the same read"
    );
    let out = send_in_reads(&mut h, rest);
    assert_eq!(out, "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued().len(), 1);
    assert_eq!(h.queued()[0].1, &second[..], "only message 2's content");
}
