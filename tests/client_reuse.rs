//! Outbound session reuse against a server without PIPELINING: after a refused transaction
//! Moat sends RSET alone and waits for its reply before MAIL (RFC 5321 §4.3.1, RFC 2920 §3).
//! The peer behaves as OpenSMTPD does: a client that sends a command before the previous
//! reply gets `500 5.5.1 Pipelining not supported` and the connection is closed.

mod common;

use std::time::Duration;

use common::*;

/// A strict peer on `ip:2525`: no PIPELINING, refuses `RCPT TO:<nobody@…>`.
fn strict_peer(ip: &str) -> PeerLog {
    scripted_peer(
        ip,
        PeerScript {
            ehlo: b"250-strict.test\r\n250 8BITMIME\r\n",
            refuse_rcpt: Some("nobody@"),
            strict_pipelining: true,
        },
    )
}

#[test]
fn reused_session_without_pipelining_waits_for_rset() {
    let peer = strict_peer("127.0.14.20");
    let sender = Moat::start_with(
        "127.0.14.10",
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[[domain]]\nname = \"far.test\"\nroute = \"relay\"\nrelay = \"127.0.14.20:2525\"\n",
        "",
    );
    submit(&sender, "alice@moat.test", &["nobody@far.test"], "refused");
    wait_for("the refused RCPT", Duration::from_secs(20), || {
        let log = peer.lock().unwrap();
        log.iter()
            .any(|(_, c)| c.starts_with("RCPT TO:<nobody@"))
            .then_some(())
    });
    submit(&sender, "alice@moat.test", &["ok@far.test"], "delivered");
    wait_for("the second message", Duration::from_secs(20), || {
        let log = peer.lock().unwrap();
        log.iter()
            .any(|(_, c)| c.starts_with("MESSAGE"))
            .then_some(())
    });
    let log = peer.lock().unwrap().clone();
    let shown = format!("{log:#?}\n{}", sender.log());
    assert!(
        !log.iter().any(|(_, c)| c == "PIPELINING VIOLATION"),
        "{shown}"
    );
    // The second message went over the same session, after an answered RSET.
    let (first, _) = log[0];
    let cmds: Vec<&str> = log
        .iter()
        .filter(|(n, _)| *n == first)
        .map(|(_, c)| c.as_str())
        .collect();
    let rset = cmds.iter().position(|c| *c == "RSET");
    assert!(rset.is_some(), "no RSET on the reused session: {shown}");
    assert!(
        cmds[rset.unwrap_or(0) + 1].starts_with("MAIL FROM:<alice@moat.test>"),
        "{shown}"
    );
    assert!(
        cmds.iter().any(|c| c.starts_with("MESSAGE")),
        "not delivered on the reused session: {shown}"
    );
}
