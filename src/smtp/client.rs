//! The outbound SMTP client as a sans-IO state machine.
//!
//! The delivery task connects, feeds server bytes to [`Client::process`], writes
//! [`Client::take_output`], and reacts to [`Event`]s: it does the TLS handshake on
//! [`Event::StartTls`] (first discarding every byte the server sent after its `220`, so a
//! man in the middle cannot inject replies: CVE-2021-38371), hands a message over on
//! [`Event::Ready`], and records per-recipient results on [`Event::Transaction`].
//!
//! With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC 2920); the message and
//! its terminating dot go out in one write too (a split write stalls about 40 ms against
//! Postfix/OpenSSL, which `tests/interop/` runs against). One recipient's rejection never fails the others.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::data::encode_for_data;

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// The enhanced status code (RFC 3463) at the start of the first line, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let parts: Vec<&str> = token.split('.').collect();
        let ok = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(token)
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// One line for logs and DSNs: `550 5.1.1 User unknown`.
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Extensions the server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    /// DSN (RFC 3461): NOTIFY, ORCPT, RET and ENVID may be passed on.
    pub dsn: bool,
    /// REQUIRETLS (RFC 8689): a message that demands it may be passed on.
    pub requiretls: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// `SIZE n`; 0 or absent means no fixed limit.
    pub size: Option<u64>,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut c = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "STARTTLS" => c.starttls = true,
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "CHUNKING" => c.chunking = true,
                "DSN" => c.dsn = true,
                "REQUIRETLS" => c.requiretls = true,
                "AUTH" => {
                    for m in words.by_ref() {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => c.auth_plain = true,
                            "LOGIN" => c.auth_login = true,
                            _ => {}
                        }
                    }
                }
                "SIZE" => c.size = words.next().and_then(|n| n.parse().ok()),
                _ => {}
            }
        }
        c
    }
}

/// Whether to use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    /// Never (plaintext retry after a failed opportunistic handshake, or policy `none`).
    Never,
    /// When offered; plaintext otherwise.
    Opportunistic,
    /// Required: missing STARTTLS or a refusal ends the session without sending mail.
    Required,
}

/// Settings for one connection.
#[derive(Debug, Clone)]
pub struct ClientParams {
    /// Our name for EHLO.
    pub helo_name: String,
    pub starttls: StartTls,
    /// The connection is already TLS (implicit TLS, port 465).
    pub implicit_tls: bool,
    /// Credentials for AUTH (smarthosts); only ever sent inside TLS.
    pub auth: Option<(String, String)>,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub sender: String,
    pub recipients: Vec<String>,
    /// The message, as stored (encoded for DATA when sent).
    pub message: Vec<u8>,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// DSN parameters (RFC 3461), passed on when the server supports DSN.
    pub ret_full: Option<bool>,
    pub envid: Option<String>,
    /// Per recipient, parallel to `recipients` (missing entries: none given).
    pub dsn: Vec<crate::smtp::session::RcptDsn>,
    /// Sent with `REQUIRETLS` (RFC 8689): only over TLS to a server that offers it.
    pub requiretls: bool,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The server accepted the message for this recipient (final reply after the data).
    Delivered(Reply),
    /// The server refused (at MAIL, RCPT, DATA or after the data): 4xx or 5xx.
    Refused(Reply),
    /// We did not send: the message demands REQUIRETLS and this session is not TLS or the
    /// server does not offer it (RFC 8689); another host may.
    NoRequireTls,
    /// We did not send: a capability the message needs is missing.
    NotSent {
        permanent: bool,
        enhanced: &'static str,
        text: String,
    },
}

/// Why a session ended before a message could be offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// Greeting was not 220 (e.g. `554 no service`).
    Greeting(Reply),
    /// EHLO and HELO were refused.
    Hello(Reply),
    /// TLS was required and the server did not offer STARTTLS.
    StartTlsNotOffered,
    /// TLS was required and the server refused STARTTLS.
    StartTlsRefused(Reply),
    /// The server broke the protocol (unparseable or oversized reply).
    Protocol(String),
    /// The server closed the connection (421 or EOF).
    Closed(Option<Reply>),
    /// Credentials are configured but TLS is not up: they are never sent in the clear.
    AuthWithoutTls,
    /// Credentials are configured but the server offers neither AUTH PLAIN nor LOGIN.
    AuthNotOffered,
    /// The server refused our credentials.
    AuthFailed(Reply),
    /// RSET before reusing the session was refused: the session is closed, not reused.
    ResetRefused(Reply),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Greeting(r) => write!(f, "greeting refused: {r}"),
            SessionError::Hello(r) => write!(f, "EHLO/HELO refused: {r}"),
            SessionError::StartTlsNotOffered => f.write_str("the server did not offer STARTTLS"),
            SessionError::StartTlsRefused(r) => write!(f, "STARTTLS refused: {r}"),
            SessionError::Protocol(m) => write!(f, "protocol error: {m}"),
            SessionError::Closed(Some(r)) => write!(f, "connection closed by the server: {r}"),
            SessionError::Closed(None) => f.write_str("connection closed by the server"),
            SessionError::AuthWithoutTls => {
                f.write_str("credentials are configured but TLS is not established; they are never sent in the clear")
            }
            SessionError::AuthNotOffered => f.write_str("the server offers neither AUTH PLAIN nor AUTH LOGIN"),
            SessionError::AuthFailed(r) => write!(f, "authentication refused: {r}"),
            SessionError::ResetRefused(r) => write!(f, "RSET refused: {r}"),
        }
    }
}

/// What the connection layer must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write the output, drop any unread server bytes, do the TLS handshake, then call
    /// [`Client::tls_established`].
    StartTls,
    /// The session is ready for a message: call [`Client::send`] or [`Client::quit`].
    Ready,
    /// A transaction finished; one outcome per recipient, in order.
    Transaction(Vec<RcptOutcome>),
    /// The session failed before or between transactions. Pending recipients were not tried.
    Failed(SessionError),
    /// QUIT was answered (or the server closed after it): close the connection.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt(usize),
    Data,
    DataEnd,
    Rset,
    Quit,
    AuthLoginUser,
    AuthLoginPass,
    Auth,
}

/// Most lines in one reply, and longest line, accepted from a server.
pub const MAX_REPLY_LINES: usize = 200;
pub const MAX_REPLY_LINE: usize = 4096;

/// The one SMTP reply parser (the client and `moat probe` both use it). Takes one complete
/// reply off the front of `buf`: `Ok(None)` until its last line has
/// arrived, else the reply and the bytes it used. Lines end in CRLF (a bare LF is tolerated);
/// text is decoded lossily with control characters escaped.
pub fn take_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_REPLY_LINE {
                return Err(format!("a reply line longer than {MAX_REPLY_LINE} bytes"));
            }
            return Ok(None);
        };
        let raw = rest.get(..n).unwrap_or_default();
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos += n + 1;
        if raw.len() > MAX_REPLY_LINE {
            return Err(format!("a reply line longer than {MAX_REPLY_LINE} bytes"));
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(format!("a reply of more than {MAX_REPLY_LINES} lines"));
        }
        let digits = raw.get(..3).unwrap_or_default();
        let this: u16 = std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.len() == 3 && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| format!("not a reply line: \"{}\"", preview(raw)))?;
        if code.is_some_and(|c| c != this) {
            return Err(format!(
                "a multi-line reply changes its code: \"{}\"",
                preview(raw)
            ));
        }
        code = Some(this);
        lines.push(escape_bytes(raw.get(4..).unwrap_or_default()));
        match raw.get(3) {
            None | Some(b' ') => return Ok(Some((Reply { code: this, lines }, pos))),
            Some(b'-') => {}
            Some(_) => return Err(format!("bad separator in \"{}\"", preview(raw))),
        }
    }
}

fn preview(raw: &[u8]) -> String {
    escape_bytes(raw.get(..80).unwrap_or(raw))
}

/// Text for display: UTF-8 (lossy) with control characters escaped.
pub fn escape_bytes(b: &[u8]) -> String {
    escape_text(&String::from_utf8_lossy(b))
}

/// Text from a peer, safe for a log line, a reply or a DSN: control characters escaped.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One outbound SMTP session.
#[derive(Debug)]
pub struct Client {
    params: ClientParams,
    caps: Capabilities,
    tls: bool,
    out: Vec<u8>,
    expect: VecDeque<Expect>,
    msg: Option<Outgoing>,
    results: Vec<Option<RcptOutcome>>,
    mail_reply: Option<Reply>,
    accepted: Vec<usize>,
    done: bool,
    /// The last transaction ended before its data was accepted: RSET before the next MAIL.
    needs_rset: bool,
    /// MAIL waiting for the reply to RSET (servers without PIPELINING: RFC 5321 §4.3.1,
    /// RFC 2920 §3, one command at a time).
    mail_after_rset: Option<String>,
    authenticated: bool,
}

impl Client {
    /// A new session, waiting for the server's greeting.
    pub fn new(params: ClientParams) -> Client {
        let tls = params.implicit_tls;
        Client {
            params,
            caps: Capabilities::default(),
            tls,
            out: Vec::new(),
            expect: VecDeque::from([Expect::Greeting]),
            msg: None,
            results: Vec::new(),
            mail_reply: None,
            accepted: Vec::new(),
            done: false,
            needs_rset: false,
            mail_after_rset: None,
            authenticated: false,
        }
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// How long to wait for the next reply (RFC 5321 §4.5.3.2).
    pub fn wait_limit(&self) -> Duration {
        match self.expect.front() {
            Some(Expect::Data) => Duration::from_secs(120),
            Some(Expect::DataEnd) => Duration::from_secs(600),
            _ => Duration::from_secs(300),
        }
    }

    fn command(&mut self, line: &str, expect: Expect) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.expect.push_back(expect);
    }

    /// The TLS handshake succeeded: start over with EHLO (RFC 3207 §4.2).
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.caps = Capabilities::default();
        let line = format!("EHLO {}", self.params.helo_name);
        self.command(&line, Expect::Ehlo);
    }

    /// Sends QUIT.
    pub fn quit(&mut self) {
        self.command("QUIT", Expect::Quit);
    }

    /// Offers a message (after [`Event::Ready`] or a finished transaction).
    /// Returns the outcome at once when the server lacks something the message needs.
    pub fn send(&mut self, msg: Outgoing) -> Option<Event> {
        let n = msg.recipients.len();
        if n == 0 {
            return Some(Event::Transaction(Vec::new()));
        }
        let refuse = |permanent, enhanced, text: &str| {
            Some(Event::Transaction(vec![
                RcptOutcome::NotSent {
                    permanent,
                    enhanced,
                    text: text.to_string()
                };
                n
            ]))
        };
        if msg.requiretls && !(self.tls && self.caps.requiretls) {
            return Some(Event::Transaction(vec![RcptOutcome::NoRequireTls; n]));
        }
        if msg.smtputf8 && !self.caps.smtputf8 {
            return refuse(
                true,
                "5.6.7",
                "the receiving server does not support SMTPUTF8 (RFC 6531)",
            );
        }
        // RFC 1870: the size of the message, without dot-stuffing or the final dot.
        let size = msg.message.len() as u64;
        if let Some(limit) = self.caps.size.filter(|l| *l > 0)
            && size > limit
        {
            return refuse(
                true,
                "5.3.4",
                &format!("message size exceeds the receiving server's limit of {limit} bytes"),
            );
        }
        let mut mail = format!("MAIL FROM:<{}>", msg.sender);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if msg.eight_bit && self.caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if msg.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if msg.requiretls {
            mail.push_str(" REQUIRETLS");
        }
        if self.caps.dsn {
            match msg.ret_full {
                Some(true) => mail.push_str(" RET=FULL"),
                Some(false) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(id) = &msg.envid {
                mail.push_str(&format!(" ENVID={}", crate::util::xtext_encode(id)));
            }
        }
        self.results = vec![None; n];
        self.accepted.clear();
        self.mail_reply = None;
        if std::mem::take(&mut self.needs_rset) {
            self.command("RSET", Expect::Rset);
            if !self.caps.pipelining {
                self.mail_after_rset = Some(mail);
                self.msg = Some(msg);
                return None;
            }
        }
        self.command(&mail, Expect::Mail);
        if self.caps.pipelining {
            for i in 0..msg.recipients.len() {
                let line = self.rcpt_line(&msg, i);
                self.command(&line, Expect::Rcpt(i));
            }
            self.command("DATA", Expect::Data);
        }
        self.msg = Some(msg);
        None
    }

    /// Feeds server bytes. Consumes up to and including the reply that produced the event;
    /// after [`Event::StartTls`] the caller must discard whatever it has not fed.
    pub fn process(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        let mut pos = 0;
        loop {
            match take_reply(&input[pos..]) {
                Ok(None) => return (pos, None),
                Ok(Some((reply, used))) => {
                    pos += used;
                    if let Some(ev) = self.on_reply(reply) {
                        return (pos, Some(ev));
                    }
                }
                Err(e) => return (input.len(), Some(self.fail(SessionError::Protocol(e)))),
            }
        }
    }

    /// The server closed the connection.
    pub fn eof(&mut self) -> Event {
        if self.done || self.expect.front() == Some(&Expect::Quit) {
            return Event::Closed;
        }
        self.fail(SessionError::Closed(None))
    }

    fn fail(&mut self, e: SessionError) -> Event {
        self.done = true;
        self.expect.clear();
        // RFC 5321 §4.1.1.10: say QUIT before closing, unless the server already went away.
        if !matches!(e, SessionError::Closed(_) | SessionError::Protocol(_)) {
            self.out.extend_from_slice(b"QUIT\r\n");
        }
        Event::Failed(e)
    }

    fn on_reply(&mut self, reply: Reply) -> Option<Event> {
        let Some(expect) = self.expect.pop_front() else {
            return Some(self.fail(SessionError::Protocol(format!("unexpected reply {reply}"))));
        };
        if reply.code == 421 && !matches!(expect, Expect::Quit) {
            // Service closing: whatever is in flight is not delivered (temporary).
            if self.msg.is_some() {
                let ev = self.finish_with(&reply);
                self.done = true;
                return Some(ev);
            }
            return Some(self.fail(SessionError::Closed(Some(reply))));
        }
        match expect {
            Expect::Greeting => {
                if reply.code != 220 {
                    return Some(self.fail(SessionError::Greeting(reply)));
                }
                let line = format!("EHLO {}", self.params.helo_name);
                self.command(&line, Expect::Ehlo);
                None
            }
            Expect::Ehlo => {
                if reply.code == 250 {
                    self.caps = Capabilities::from_ehlo(&reply);
                    return self.after_hello();
                }
                if reply.is_permanent() && !self.tls {
                    let line = format!("HELO {}", self.params.helo_name);
                    self.command(&line, Expect::Helo);
                    return None;
                }
                Some(self.fail(SessionError::Hello(reply)))
            }
            Expect::Helo => {
                if reply.code != 250 {
                    return Some(self.fail(SessionError::Hello(reply)));
                }
                self.caps = Capabilities::default();
                self.after_hello()
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    return Some(Event::StartTls);
                }
                if self.params.starttls == StartTls::Required {
                    return Some(self.fail(SessionError::StartTlsRefused(reply)));
                }
                self.authenticate()
            }
            Expect::AuthLoginUser => {
                if reply.code != 334 {
                    return Some(self.fail(SessionError::AuthFailed(reply)));
                }
                let user = self
                    .params
                    .auth
                    .as_ref()
                    .map(|(u, _)| B64.encode(u))
                    .unwrap_or_default();
                self.command(&user, Expect::AuthLoginPass);
                None
            }
            Expect::AuthLoginPass => {
                if reply.code != 334 {
                    return Some(self.fail(SessionError::AuthFailed(reply)));
                }
                let pass = self
                    .params
                    .auth
                    .as_ref()
                    .map(|(_, p)| B64.encode(p))
                    .unwrap_or_default();
                self.command(&pass, Expect::Auth);
                None
            }
            Expect::Auth => {
                if reply.code != 235 {
                    return Some(self.fail(SessionError::AuthFailed(reply)));
                }
                self.authenticated = true;
                Some(Event::Ready)
            }
            Expect::Mail => {
                if !reply.is_positive() {
                    self.mail_reply = Some(reply.clone());
                    if !self.caps.pipelining {
                        return Some(self.finish_with(&reply));
                    }
                } else if !self.caps.pipelining {
                    self.next_rcpt(0);
                }
                None
            }
            Expect::Rcpt(i) => {
                if reply.is_positive() && self.mail_reply.is_none() {
                    self.accepted.push(i);
                } else if let Some(slot) = self.results.get_mut(i) {
                    // After a failed MAIL, every RCPT reply (503) is noise: report MAIL's.
                    let r = self.mail_reply.clone().unwrap_or(reply);
                    *slot = Some(RcptOutcome::Refused(r));
                }
                if !self.caps.pipelining {
                    let next = i + 1;
                    if next < self.results.len() {
                        self.next_rcpt(next);
                    } else if self.accepted.is_empty() {
                        return Some(self.finish_transaction(None));
                    } else {
                        self.command("DATA", Expect::Data);
                    }
                }
                None
            }
            Expect::Data => {
                if reply.code == 354 {
                    if self.accepted.is_empty() {
                        // RFC 2920 §3.1: DATA accepted without recipients; end it empty.
                        self.out.extend_from_slice(b".\r\n");
                        self.expect.push_back(Expect::DataEnd);
                        return None;
                    }
                    let wire = self
                        .msg
                        .as_ref()
                        .map(|m| encode_for_data(&m.message))
                        .unwrap_or_default();
                    self.out.extend_from_slice(&wire);
                    self.expect.push_back(Expect::DataEnd);
                    return None;
                }
                if let Some(m) = self.mail_reply.clone() {
                    return Some(self.finish_with(&m));
                }
                if self.accepted.is_empty() {
                    return Some(self.finish_transaction(None));
                }
                Some(self.finish_transaction(Some(reply)))
            }
            Expect::DataEnd => {
                let ev = if self.accepted.is_empty() {
                    self.finish_transaction(None)
                } else {
                    self.finish_transaction(Some(reply))
                };
                // The data phase completed: the server's transaction is closed either way.
                self.needs_rset = false;
                Some(ev)
            }
            Expect::Rset => {
                if !reply.is_positive() {
                    // A server that refuses RSET is in a state we cannot know: close it
                    // (the message was not offered yet and goes over a new session).
                    self.msg = None;
                    self.results.clear();
                    self.mail_after_rset = None;
                    return Some(self.fail(SessionError::ResetRefused(reply)));
                }
                if let Some(mail) = self.mail_after_rset.take() {
                    self.command(&mail, Expect::Mail);
                }
                None
            }
            Expect::Quit => {
                self.done = true;
                Some(Event::Closed)
            }
        }
    }

    fn next_rcpt(&mut self, i: usize) {
        let line = match self.msg.as_ref() {
            Some(m) if i < m.recipients.len() => self.rcpt_line(m, i),
            _ => return,
        };
        self.command(&line, Expect::Rcpt(i));
    }

    /// `RCPT TO:<…>` with NOTIFY/ORCPT when the server takes them.
    fn rcpt_line(&self, msg: &Outgoing, i: usize) -> String {
        use crate::smtp::session::{NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS};
        let mut line = format!("RCPT TO:<{}>", msg.recipients[i]);
        if !self.caps.dsn {
            return line;
        }
        let d = msg.dsn.get(i).cloned().unwrap_or_default();
        if d.notify != 0 {
            let words: Vec<&str> = [
                (NOTIFY_NEVER, "NEVER"),
                (NOTIFY_SUCCESS, "SUCCESS"),
                (NOTIFY_FAILURE, "FAILURE"),
                (NOTIFY_DELAY, "DELAY"),
            ]
            .iter()
            .filter(|(bit, _)| d.notify & bit != 0)
            .map(|(_, w)| *w)
            .collect();
            line.push_str(&format!(" NOTIFY={}", words.join(",")));
        }
        if let Some(o) = &d.orcpt {
            line.push_str(&format!(" ORCPT=rfc822;{}", crate::util::xtext_encode(o)));
        }
        line
    }

    fn after_hello(&mut self) -> Option<Event> {
        if !self.tls && self.params.starttls != StartTls::Never && self.caps.starttls {
            self.command("STARTTLS", Expect::StartTls);
            return None;
        }
        if !self.tls && self.params.starttls == StartTls::Required {
            return Some(self.fail(SessionError::StartTlsNotOffered));
        }
        self.authenticate()
    }

    /// AUTH when credentials are configured (inside TLS only), else ready.
    fn authenticate(&mut self) -> Option<Event> {
        let Some((user, pass)) = self.params.auth.clone() else {
            return Some(Event::Ready);
        };
        if self.authenticated {
            return Some(Event::Ready);
        }
        if !self.tls {
            return Some(self.fail(SessionError::AuthWithoutTls));
        }
        if self.caps.auth_plain {
            let token = B64.encode(format!("\0{user}\0{pass}"));
            self.command(&format!("AUTH PLAIN {token}"), Expect::Auth);
            None
        } else if self.caps.auth_login {
            self.command("AUTH LOGIN", Expect::AuthLoginUser);
            None
        } else {
            Some(self.fail(SessionError::AuthNotOffered))
        }
    }

    /// Every recipient gets `reply` (a MAIL refusal or a 421).
    fn finish_with(&mut self, reply: &Reply) -> Event {
        for slot in self.results.iter_mut() {
            *slot = Some(RcptOutcome::Refused(reply.clone()));
        }
        self.expect.clear();
        self.collect()
    }

    /// Accepted recipients get the final reply (or stay refused when there is none).
    fn finish_transaction(&mut self, final_reply: Option<Reply>) -> Event {
        if let Some(reply) = final_reply {
            for &i in &self.accepted {
                if let Some(slot) = self.results.get_mut(i) {
                    *slot = Some(if reply.is_positive() {
                        RcptOutcome::Delivered(reply.clone())
                    } else {
                        RcptOutcome::Refused(reply.clone())
                    });
                }
            }
        }
        self.collect()
    }

    fn collect(&mut self) -> Event {
        self.msg = None;
        self.needs_rset = true;
        self.accepted.clear();
        let fallback = Reply {
            code: 451,
            lines: vec!["4.4.0 no reply received for this recipient".into()],
        };
        let results = std::mem::take(&mut self.results)
            .into_iter()
            .map(|r| r.unwrap_or_else(|| RcptOutcome::Refused(fallback.clone())))
            .collect();
        Event::Transaction(results)
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
