//! Outbound session reuse against a server without PIPELINING: after a refused transaction
//! Moat sends RSET alone and waits for its reply before MAIL (RFC 5321 §4.3.1, RFC 2920 §3).
//! The peer behaves as OpenSMTPD does: a client that sends a command before the previous
//! reply gets `500 5.5.1 Pipelining not supported` and the connection is closed.

mod common;

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A strict peer on `ip:2525`: no PIPELINING, refuses `RCPT TO:<nobody@…>`. Records
/// `(connection number, command)`, and `PIPELINING VIOLATION` when a command arrived early.
fn strict_peer(ip: &str) -> Arc<Mutex<Vec<(usize, String)>>> {
    let listener = std::net::TcpListener::bind((ip, SMTP))
        .unwrap_or_else(|e| panic!("strict peer: cannot listen on {ip}:{SMTP}: {e}"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { continue };
            let log = log2.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = std::io::BufReader::new(conn);
                let _ = w.write_all(b"220 strict.test ESMTP\r\n");
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    log.lock().unwrap().push((n, cmd.clone()));
                    if !r.buffer().is_empty() {
                        log.lock().unwrap().push((n, "PIPELINING VIOLATION".into()));
                        let _ = w.write_all(b"500 5.5.1 Pipelining not supported\r\n");
                        return;
                    }
                    let upper = cmd.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-strict.test\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("RCPT TO:<NOBODY@") {
                        b"550 5.1.1 no such user\r\n"
                    } else if upper == "DATA" {
                        let _ = w.write_all(b"354 go\r\n");
                        loop {
                            line.clear();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == ".\r\n" {
                                break;
                            }
                        }
                        log.lock().unwrap().push((n, "MESSAGE".into()));
                        b"250 2.0.0 accepted\r\n"
                    } else if upper == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n");
                        return;
                    } else if upper.starts_with("STARTTLS") {
                        b"502 5.5.1 not here\r\n"
                    } else {
                        b"250 2.0.0 ok\r\n"
                    };
                    let _ = w.write_all(reply);
                }
            });
        }
    });
    log
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
        log.iter().any(|(_, c)| c == "MESSAGE").then_some(())
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
        cmds.contains(&"MESSAGE"),
        "not delivered on the reused session: {shown}"
    );
}
