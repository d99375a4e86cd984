//! Feeds arbitrary bytes to the inbound session, split at arbitrary points, completing every
//! action it asks for. The session must never panic, never consume more than it was given,
//! and every reply line must be CRLF-terminated with a 3-digit code.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat::domain::DomainPattern;
use moat::smtp::data::BareNewline;
use moat::smtp::session::{
    Action, AuthOutcome, DomainKind, ListenerRules, Peer, Rules, Session, TlsInfo,
};

fn session(flags: u8) -> Session {
    let mut domains = HashMap::new();
    domains.insert(
        "example.test".to_string(),
        DomainKind::Local {
            mailboxes: HashSet::new(),
        },
    );
    domains.insert("routed.test".to_string(), DomainKind::Routed);
    let rules = Rules {
        hostname: "mx.example.test".into(),
        max_message_size: 4096,
        max_recipients: 5,
        max_line_length: 512,
        max_errors: 1000,
        domains,
        postmaster_domain: Some("example.test".into()),
        tls_required_sender_domains: vec![DomainPattern::parse("partner.test").unwrap()],
        sender_client_certs: vec![(
            DomainPattern::parse("certified.test").unwrap(),
            "relay.certified.test".into(),
        )],
        report_addresses: Default::default(),
    };
    let listener = ListenerRules {
        starttls: flags & 1 != 0,
        require_tls: flags & 2 != 0,
        require_auth: flags & 4 != 0,
        auth: true,
        bare_newline: if flags & 8 != 0 {
            BareNewline::Normalize
        } else {
            BareNewline::Reject
        },
        requiretls: flags & 64 != 0,
    };
    let peer = Peer {
        ip: "127.0.0.1".parse().unwrap(),
        tls: None,
        trusted: flags & 16 != 0,
        tls_required_by_rule: false,
        client_cert_required: Vec::new(),
    };
    Session::new(Arc::new(rules), Arc::new(listener), peer)
}

fn check_output(out: &[u8]) {
    for line in out.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF");
        assert!(
            line.len() >= 5 && line[..3].iter().all(u8::is_ascii_digit),
            "bad reply line"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&step, input)) = rest.split_first() else {
        return;
    };
    let step = usize::from(step.max(1));
    let mut s = session(flags);
    s.greeting();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut rounds = 0;
    while fed < input.len() || !buf.is_empty() {
        rounds += 1;
        if rounds > 100_000 {
            break;
        }
        if fed < input.len() {
            let end = (fed + step).min(input.len());
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
        }
        let mut pending: Option<Action> = None;
        loop {
            let action = match pending.take() {
                Some(a) => Some(a),
                None => {
                    let p = s.process(&buf);
                    assert!(p.consumed <= buf.len());
                    buf.drain(..p.consumed);
                    p.action
                }
            };
            match action {
                None => break,
                Some(Action::StartTls) => {
                    buf.clear();
                    s.tls_started(TlsInfo {
                        version: "TLSv1.3".into(),
                        cipher: "TLS_AES_128_GCM_SHA256".into(),
                        bits: 128,
                        key_exchange: None,
                        sni: None,
                        client_names: vec!["relay.certified.test".into()],
                    });
                }
                Some(Action::Authenticate { username, .. }) => {
                    let outcome = if username == "ok" {
                        AuthOutcome::Success(username)
                    } else {
                        AuthOutcome::Failure
                    };
                    pending = s.auth_result(outcome);
                }
                Some(Action::Spill { chunk, .. }) => {
                    // Content is handed out only past SPILL_AT (1 MiB), far above the
                    // fuzzed size limit: content past the limit must never be kept.
                    panic!("{} octets handed out past a 4096-octet limit", chunk.len());
                }
                Some(Action::Queue { envelope, body, .. }) => {
                    assert!(!envelope.recipients.is_empty());
                    assert!(body.len() <= 4096 + 2);
                    pending = s.queued(Ok("0000000000000001".into()));
                }
                Some(Action::Close) => {
                    check_output(&s.take_output());
                    return;
                }
            }
        }
        check_output(&s.take_output());
        if s.is_closed() {
            return;
        }
        if fed >= input.len() && !buf.is_empty() {
            // Nothing more will come; what is left is an incomplete line.
            let before = buf.len();
            let p = s.process(&buf);
            buf.drain(..p.consumed);
            if buf.len() == before {
                break;
            }
        }
    }
});
