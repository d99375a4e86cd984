//! TLS session resumption per listener: `smtp` listeners send no TLS 1.3 session tickets and
//! keep no session cache by default (Exchange Online's senders abort STARTTLS with receivers
//! that send tickets); `tls_session_tickets = true` turns them back on; `smtps` and
//! `submission` keep them. Tickets are counted by a real rustls client's session store.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;

/// A session store that counts the TLS 1.3 tickets (NewSessionTicket messages) it is given.
#[derive(Debug)]
struct Counting {
    inner: ClientSessionMemoryCache,
    tickets: AtomicUsize,
    tls12: AtomicUsize,
}

impl ClientSessionStore for Counting {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.tls12.fetch_add(1, Ordering::SeqCst);
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// Handshakes with `versions` on `port` (STARTTLS unless `implicit`), runs a command inside
/// TLS so post-handshake messages are read, and returns (TLS 1.3 tickets, TLS 1.2 sessions).
fn tickets(
    m: &Moat,
    port: u16,
    implicit: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (usize, usize) {
    let store = Arc::new(Counting {
        inner: ClientSessionMemoryCache::new(16),
        tickets: AtomicUsize::new(0),
        tls12: AtomicUsize::new(0),
    });
    let mut config = (*client_config(versions)).clone();
    config.resumption = Resumption::store(store.clone());
    let mut c = if implicit {
        let mut c = Client::connect_raw(m.addr(port));
        c.handshake_with("mx.moat.test", Arc::new(config)).unwrap();
        assert_eq!(c.read_reply().code, 220);
        c
    } else {
        let mut c = Client::connect(m.addr(port));
        c.ehlo();
        assert!(c.cmd("STARTTLS").is("220 2.0.0"));
        c.handshake_with("mx.moat.test", Arc::new(config)).unwrap();
        c
    };
    assert!(c.cmd("EHLO client.test").is("250"));
    assert!(c.cmd("NOOP").is("250"));
    assert!(c.cmd("QUIT").is("221"));
    (
        store.tickets.load(Ordering::SeqCst),
        store.tls12.load(Ordering::SeqCst),
    )
}

#[test]
fn smtp_listeners_send_no_session_tickets_by_default() {
    let m = Moat::start_with(
        "127.0.14.2",
        "[[listener]]\nname = \"smtp-tickets\"\naddress = \"127.0.14.2:2526\"\nmode = \"smtp\"\ntls_session_tickets = true\n",
        "",
    );
    let tls13 = [&rustls::version::TLS13];
    let tls12 = [&rustls::version::TLS12];
    // Port 25 mode: no NewSessionTicket, and no TLS 1.2 session to resume either.
    assert_eq!(tickets(&m, SMTP, false, &tls13), (0, 0));
    assert_eq!(tickets(&m, SMTP, false, &tls12), (0, 0));
    // Opted back in: tickets arrive (so the count above could have been non-zero).
    assert!(tickets(&m, 2526, false, &tls13).0 >= 1);
    // Implicit TLS and submission keep resumption for mail clients.
    assert!(tickets(&m, SMTPS, true, &tls13).0 >= 1);
    assert!(tickets(&m, SUBMISSION, false, &tls13).0 >= 1);
}
