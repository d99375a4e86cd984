//! The inbound SMTP session as a sans-IO state machine.
//!
//! The connection task feeds received bytes to [`Session::process`], writes whatever
//! [`Session::take_output`] returns, and performs the [`Action`]s the session asks for
//! (TLS handshake, credential check, spooling) before feeding more bytes. Nothing in here
//! touches a socket, the disk or a clock, so every rule is a unit test on bytes.
//!
//! Replies are queued in order, so pipelined commands (RFC 2920) are answered in one write.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use smtp_proto::{Error as ParseError, Request};

use super::address::{Address, mailbox_name};
use super::data::{BareNewline, ChunkChecker, DataReceiver};
use crate::domain::{Domain, DomainPattern, canonical_or_lower};

/// Negotiated TLS parameters, as stamped into the Received header and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// IANA cipher suite name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Symmetric key bits of the cipher.
    pub bits: u16,
    /// Key exchange group, e.g. `X25519MLKEM768`.
    pub key_exchange: Option<String>,
    /// Server name the client asked for (SNI).
    pub sni: Option<String>,
    /// Names (subject CN, DNS SANs) of the client certificate, when one was sent and verified.
    pub client_names: Vec<String>,
}

/// Where mail for a domain goes, as far as the session needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainKind {
    /// Delivered into local mailboxes; `mailboxes` empty means any safe name.
    Local { mailboxes: HashSet<String> },
    /// Accepted and routed elsewhere (relay, discard, …).
    Routed,
}

/// Listener-independent acceptance rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: usize,
    pub domains: std::collections::HashMap<String, DomainKind>,
    /// Domain whose `postmaster` receives mail sent to the bare `<postmaster>`.
    pub postmaster_domain: Option<String>,
    /// Sender domains that must use TLS (partner connectors).
    pub tls_required_sender_domains: Vec<DomainPattern>,
    /// Sender domain patterns whose clients must present a certificate issued to a name.
    pub sender_client_certs: Vec<(DomainPattern, String)>,
    /// TLS-RPT report addresses (lowercase): accepted whatever their domain's rules.
    pub report_addresses: std::collections::HashSet<String>,
}

/// Per-listener settings.
#[derive(Debug, Clone)]
pub struct ListenerRules {
    /// STARTTLS may be offered (a certificate is configured and the listener is not implicit TLS).
    pub starttls: bool,
    /// MAIL/RCPT/DATA/AUTH need TLS first.
    pub require_tls: bool,
    /// MAIL needs AUTH first (submission).
    pub require_auth: bool,
    /// AUTH can be offered (a users file exists).
    pub auth: bool,
    pub bare_newline: BareNewline,
    /// REQUIRETLS (RFC 8689) is offered inside TLS.
    pub requiretls: bool,
}

/// Facts about the peer known to the connection layer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// TLS already active (implicit TLS listener).
    pub tls: Option<TlsInfo>,
    /// Peer is in a trusted network and may relay.
    pub trusted: bool,
    /// An inbound rule requires TLS for this peer's network.
    pub tls_required_by_rule: bool,
    /// Inbound rules for this peer's network require a client certificate issued to these names.
    pub client_cert_required: Vec<String>,
}

/// The envelope of an accepted message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// DSN `RET` (RFC 3461): `Some(true)` FULL, `Some(false)` HDRS.
    pub ret_full: Option<bool>,
    /// DSN `ENVID`, decoded.
    pub envid: Option<String>,
    /// DSN parameters per recipient, parallel to `recipients` (may be shorter: defaults).
    pub dsn: Vec<RcptDsn>,
    /// `MAIL FROM:<…> REQUIRETLS` (RFC 8689): every hop must be authenticated TLS.
    pub requiretls: bool,
}

/// `NOTIFY` bits (RFC 3461 §4.1); 0 means not given.
pub const NOTIFY_NEVER: u8 = 1;
pub const NOTIFY_SUCCESS: u8 = 2;
pub const NOTIFY_FAILURE: u8 = 4;
pub const NOTIFY_DELAY: u8 = 8;

/// A recipient's DSN parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// `NOTIFY_*` bits; 0 = not given (failure and delay notices by default).
    pub notify: u8,
    /// `ORCPT=rfc822;…`, decoded address.
    pub orcpt: Option<String>,
}

impl RcptDsn {
    /// Whether a failure notice is wanted.
    pub fn wants_failure(&self) -> bool {
        self.notify == 0 || self.notify & NOTIFY_FAILURE != 0
    }
    pub fn wants_success(&self) -> bool {
        self.notify & NOTIFY_SUCCESS != 0
    }
}

impl Envelope {
    /// DSN parameters of recipient `i` (defaults when not given).
    pub fn dsn_of(&self, i: usize) -> RcptDsn {
        self.dsn.get(i).cloned().unwrap_or_default()
    }
}

/// What the Received header needs to say about the session.
#[derive(Debug, Clone)]
pub struct Trace {
    pub helo: String,
    pub ip: IpAddr,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPSA`, or the `UTF8…` forms (RFC 3848, RFC 6531).
    pub protocol: String,
    pub tls: Option<TlsInfo>,
    pub auth_user: Option<String>,
}

/// Work the connection layer must do before feeding more input.
// One action exists at a time and is moved straight to its handler: boxing the large
// variant would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    /// Flush output, discard any buffered input (CVE-2011-0411), do the TLS handshake, then
    /// call [`Session::tls_started`] (or drop the connection if it failed).
    StartTls,
    /// Check the credentials, then call [`Session::auth_result`].
    Authenticate { username: String, password: String },
    /// Write this much of the message content to the spool (starting the message's spool
    /// file on the first one, from [`Session::pending_message`]), then call
    /// [`Session::spilled`]. Content past [`SPILL_AT`] is handed out this way as it arrives,
    /// so that a session never holds a whole large message.
    /// `first`: the message's first chunk, which begins a new spool file (whatever file an
    /// earlier, refused message left open is dropped).
    Spill { chunk: Vec<u8>, first: bool },
    /// Make the message durable, then call [`Session::queued`]. With `spilled`, `body` is
    /// the rest after what [`Action::Spill`] handed out.
    Queue {
        envelope: Envelope,
        body: Vec<u8>,
        spilled: bool,
        trace: Trace,
    },
    /// Flush output and close the connection.
    Close,
}

/// Outcome of a credential check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Success(String),
    Failure,
    /// Too many failures (this connection or this address): reply 421 and close.
    Blocked,
    /// No capacity to check the password now: `454 4.7.0`, the client may try again.
    Busy,
}

#[derive(Debug)]
enum Mode {
    Command,
    /// Discarding an over-long command line up to its LF.
    DiscardLine,
    Data(DataReceiver),
    /// Inside a BDAT chunk: bytes still to read.
    Bdat {
        remaining: usize,
        last: bool,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
    /// Waiting for the connection layer to finish an action.
    Waiting,
    Closed,
}

/// BDAT content: the part held, what was handed out to the spool, and line-ending checks.
#[derive(Debug, Default)]
struct BdatContent {
    body: Vec<u8>,
    spilled: usize,
    checker: ChunkChecker,
}

impl BdatContent {
    fn len(&self) -> usize {
        self.spilled + self.body.len()
    }
}

/// Message content beyond this is handed out to the spool as it arrives ([`Action::Spill`]);
/// a message that never reaches it is stored in one piece (journal records hold messages up
/// to this size, so nothing the journal would take is ever spilled).
pub const SPILL_AT: usize = crate::queue::spool::LARGE;

#[derive(Debug, Default)]
struct Transaction {
    sender: String,
    recipients: Vec<String>,
    seen: HashSet<String>,
    smtputf8: bool,
    eight_bit: bool,
    ret_full: Option<bool>,
    envid: Option<String>,
    dsn: Vec<RcptDsn>,
    requiretls: bool,
    /// BDAT in progress: accumulated content and line-ending checks.
    bdat: Option<BdatContent>,
    /// Octets of BDAT content received so far (before any line-ending rewrite).
    bdat_octets: usize,
    bdat_failed: Option<&'static str>,
}

impl Transaction {
    fn envelope(&self) -> Envelope {
        Envelope {
            sender: self.sender.clone(),
            recipients: self.recipients.clone(),
            smtputf8: self.smtputf8,
            eight_bit: self.eight_bit,
            ret_full: self.ret_full,
            envid: self.envid.clone(),
            dsn: self.dsn.clone(),
            requiretls: self.requiretls,
        }
    }

    fn into_envelope(self) -> Envelope {
        Envelope {
            sender: self.sender,
            recipients: self.recipients,
            smtputf8: self.smtputf8,
            eight_bit: self.eight_bit,
            ret_full: self.ret_full,
            envid: self.envid,
            dsn: self.dsn,
            requiretls: self.requiretls,
        }
    }
}

/// Result of one call to [`Session::process`].
#[derive(Debug)]
pub struct Progress {
    /// Bytes of the input consumed; the caller drops them from its buffer.
    pub consumed: usize,
    pub action: Option<Action>,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    rules: Arc<Rules>,
    listener: Arc<ListenerRules>,
    peer: Peer,
    out: Vec<u8>,
    mode: Mode,
    helo: Option<(String, bool)>,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    errors: usize,
    /// A BDAT failed without a transaction; reported once its chunk has been read.
    pending_bdat_failure: Option<&'static str>,
}

const BDAT_MAX_CHUNK_NOTE: &str = "5.3.4 Message size exceeds fixed maximum message size";
const QUEUE_WRITE_FAILED: &str =
    "451 4.3.0 Temporary failure writing to the queue, try again later";

impl Session {
    pub fn new(rules: Arc<Rules>, listener: Arc<ListenerRules>, peer: Peer) -> Self {
        Session {
            rules,
            listener,
            peer,
            out: Vec::new(),
            mode: Mode::Command,
            helo: None,
            auth_user: None,
            tx: None,
            errors: 0,
            pending_bdat_failure: None,
        }
    }

    /// Queues the `220` greeting.
    pub fn greeting(&mut self) {
        let line = format!("220 {} ESMTP Moat\r\n", self.rules.hostname);
        self.out.extend_from_slice(line.as_bytes());
    }

    /// Replies produced so far; the caller writes them in one buffer.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// True while message content is being received (the caller applies the data timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.mode, Mode::Data(_) | Mode::Bdat { .. })
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.mode, Mode::Closed)
    }

    pub fn peer_ip(&self) -> IpAddr {
        self.peer.ip
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.peer.tls.as_ref()
    }

    /// Queues a `421` and closes, e.g. on timeout or shutdown.
    pub fn shutdown(&mut self, text: &str) {
        self.reply(&format!("421 4.4.2 {} {}", self.rules.hostname, text));
        self.mode = Mode::Closed;
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// An error reply; too many of them end the session.
    fn error(&mut self, line: &str) -> Option<Action> {
        self.reply(line);
        self.errors += 1;
        if self.errors >= self.rules.max_errors {
            self.reply("421 4.7.0 Too many errors, closing connection");
            self.mode = Mode::Closed;
            return Some(Action::Close);
        }
        None
    }

    /// Consumes as much of `input` as it can. Stops early when an action is needed.
    pub fn process(&mut self, input: &[u8]) -> Progress {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            if rest.is_empty() && !matches!(self.mode, Mode::Bdat { remaining: 0, .. }) {
                return Progress {
                    consumed: pos,
                    action: None,
                };
            }
            match &mut self.mode {
                Mode::Closed | Mode::Waiting => {
                    return Progress {
                        consumed: pos,
                        action: None,
                    };
                }
                Mode::DiscardLine => match rest.iter().position(|&b| b == b'\n') {
                    Some(n) => {
                        pos += n + 1;
                        self.mode = Mode::Command;
                        if let Some(a) = self.error("500 5.5.2 Line too long") {
                            return Progress {
                                consumed: pos,
                                action: Some(a),
                            };
                        }
                    }
                    None => {
                        return Progress {
                            consumed: input.len(),
                            action: None,
                        };
                    }
                },
                Mode::Data(receiver) => match receiver.feed(rest) {
                    Some(n) => {
                        pos += n;
                        let Mode::Data(receiver) = std::mem::replace(&mut self.mode, Mode::Command)
                        else {
                            unreachable!("mode checked above")
                        };
                        if let Some(a) = self.data_done(receiver) {
                            return Progress {
                                consumed: pos,
                                action: Some(a),
                            };
                        }
                    }
                    None => {
                        return Progress {
                            consumed: input.len(),
                            action: receiver
                                .take_spill(SPILL_AT)
                                .map(|(chunk, first)| Action::Spill { chunk, first }),
                        };
                    }
                },
                Mode::Bdat { remaining, last } => {
                    let last = *last;
                    let take = (*remaining).min(rest.len());
                    *remaining -= take;
                    let done = *remaining == 0;
                    self.bdat_chunk(&rest[..take]);
                    pos += take;
                    if let Some((chunk, first)) = self.take_bdat_spill() {
                        // The mode stays `Bdat`; a finished chunk is answered on the next call.
                        return Progress {
                            consumed: pos,
                            action: Some(Action::Spill { chunk, first }),
                        };
                    }
                    if done {
                        self.mode = Mode::Command;
                        if let Some(a) = self.bdat_done(last) {
                            return Progress {
                                consumed: pos,
                                action: Some(a),
                            };
                        }
                    }
                }
                _ => {
                    let Some(n) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() > self.rules.max_line_length {
                            self.mode = Mode::DiscardLine;
                            pos = input.len();
                        }
                        return Progress {
                            consumed: pos,
                            action: None,
                        };
                    };
                    let line = &rest[..=n];
                    pos += n + 1;
                    let action = if line.len() > self.rules.max_line_length {
                        self.mode = Mode::Command;
                        self.error("500 5.5.2 Line too long")
                    } else {
                        self.line(line)
                    };
                    if let Some(a) = action {
                        return Progress {
                            consumed: pos,
                            action: Some(a),
                        };
                    }
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) -> Option<Action> {
        let text = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::AuthPlain => return self.auth_plain(text),
            Mode::AuthLoginUser => {
                let Some(user) = self.decode_b64(text) else {
                    return self.auth_abort(text);
                };
                self.mode = Mode::AuthLoginPass(String::from_utf8_lossy(&user).into_owned());
                self.reply("334 UGFzc3dvcmQ6");
                return None;
            }
            Mode::AuthLoginPass(user) => {
                let Some(pass) = self.decode_b64(text) else {
                    return self.auth_abort(text);
                };
                self.mode = Mode::Waiting;
                return Some(Action::Authenticate {
                    username: user,
                    password: String::from_utf8_lossy(&pass).into_owned(),
                });
            }
            _ => {}
        }
        if text.trim_ascii().is_empty() {
            return self.error("500 5.5.2 Empty command");
        }
        if text
            .iter()
            .any(|&b| b == 0 || b == b'\r' || (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return self.error("500 5.5.2 Invalid character in command");
        }
        if !text.is_ascii() {
            let verb = text.get(..4).map(|v| v.to_ascii_uppercase());
            let utf8_allowed = matches!(verb.as_deref(), Some(b"MAIL" | b"RCPT"));
            if !utf8_allowed || std::str::from_utf8(text).is_err() {
                return self.error("500 5.5.2 8-bit characters not allowed in this command");
            }
        }
        if let Some(refused) = self.refuse_bdat_size(text) {
            return refused;
        }
        let mut owned = text.to_vec();
        owned.extend_from_slice(b"\r\n");
        let parsed = Request::parse(&mut owned.iter()).map(|r| r.into_owned());
        match parsed {
            Ok(req) => self.command(req, text),
            Err(ParseError::UnknownCommand) | Err(ParseError::NeedsMoreData { .. }) => {
                self.error("500 5.5.1 Command unrecognized")
            }
            Err(ParseError::InvalidSenderAddress) => {
                self.error("501 5.1.7 Bad sender address syntax")
            }
            Err(ParseError::InvalidRecipientAddress) => {
                self.error("501 5.1.3 Bad recipient address syntax")
            }
            Err(ParseError::SyntaxError { syntax }) => {
                self.error(&format!("501 5.5.4 Syntax: {syntax}"))
            }
            Err(ParseError::InvalidParameter { param }) => {
                self.error(&format!("501 5.5.4 Invalid parameter {param}"))
            }
            Err(ParseError::UnsupportedParameter { param }) => {
                let param: String = param
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(32)
                    .collect();
                self.error(&format!("555 5.5.4 Unsupported parameter {param}"))
            }
            Err(_) => self.error("500 5.5.2 Syntax error"),
        }
    }

    /// The first certificate name an inbound rule requires of this client that its verified
    /// client certificate does not carry.
    fn missing_client_cert(&self, sender: &str) -> Option<String> {
        let domain = sender
            .rsplit_once('@')
            .and_then(|(_, d)| Domain::parse(d).ok());
        let from_sender = self
            .rules
            .sender_client_certs
            .iter()
            .filter_map(|(pattern, name)| {
                domain
                    .as_ref()
                    .is_some_and(|d| pattern.matches(d))
                    .then_some(name)
            });
        let have = self
            .peer
            .tls
            .as_ref()
            .map(|t| t.client_names.as_slice())
            .unwrap_or(&[]);
        self.peer
            .client_cert_required
            .iter()
            .chain(from_sender)
            .find(|name| !have.iter().any(|h| h.eq_ignore_ascii_case(name)))
            .cloned()
    }

    fn tls_needed(&self) -> bool {
        self.peer.tls.is_none() && (self.listener.require_tls || self.peer.tls_required_by_rule)
    }

    fn command(&mut self, req: Request<String>, raw: &[u8]) -> Option<Action> {
        match req {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Lhlo { .. } => self.error("500 5.5.1 Command unrecognized"),
            Request::StartTls => self.starttls(raw),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Request::Mail { from } => {
                // smtp-proto maps <>, <postmaster>, <""> and <@route:> all to "".
                if from.address.is_empty() && raw_path(raw) != b"" {
                    return self.error("501 5.1.7 Bad sender address syntax");
                }
                self.mail(from, size_param(raw))
            }
            Request::Rcpt { to } => {
                // smtp-proto maps both <> and <postmaster> to "": only the raw line tells.
                if to.address.is_empty() && !raw_path(raw).eq_ignore_ascii_case(b"postmaster") {
                    return self.error(
                        "501 5.1.3 Bad recipient address syntax: the null path is not a recipient",
                    );
                }
                self.rcpt(to)
            }
            Request::Data => self.data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last),
            Request::Rset => {
                self.tx = None;
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Noop { .. } => {
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Vrfy { .. } => {
                self.reply(
                    "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                );
                None
            }
            Request::Expn { .. } => self.error("502 5.5.1 EXPN not supported"),
            Request::Help { .. } => {
                self.reply("214-2.0.0 Moat SMTP server. Commands:");
                self.reply("214-2.0.0   EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT");
                self.reply("214 2.0.0   RSET NOOP VRFY HELP QUIT");
                None
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                self.mode = Mode::Closed;
                Some(Action::Close)
            }
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.error("502 5.5.1 Command not implemented")
            }
        }
    }

    fn hello(&mut self, host: String, extended: bool) -> Option<Action> {
        if host.is_empty() || host.len() > 255 || host.contains(|c: char| c.is_whitespace()) {
            return self.error("501 5.5.4 Syntax: EHLO hostname");
        }
        self.tx = None;
        self.helo = Some((host, extended));
        if !extended {
            let line = format!("250 {}", self.rules.hostname);
            self.reply(&line);
            return None;
        }
        let mut lines = vec![
            self.rules.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.rules.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
            "DSN".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.listener.starttls && self.peer.tls.is_none() {
            lines.push("STARTTLS".to_string());
        }
        if self.listener.auth && self.peer.tls.is_some() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        // RFC 8689: offered only where this hop itself is protected.
        if self.listener.requiretls && self.peer.tls.is_some() {
            lines.push("REQUIRETLS".to_string());
        }
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let line = format!("250{sep}{l}");
            self.reply(&line);
        }
        None
    }

    fn starttls(&mut self, raw: &[u8]) -> Option<Action> {
        if raw.trim_ascii().len() != b"STARTTLS".len() {
            return self.error("501 5.5.4 Syntax: STARTTLS (no parameters)");
        }
        if self.peer.tls.is_some() {
            return self.error("503 5.5.1 TLS already active");
        }
        if !self.listener.starttls {
            return self.error("502 5.5.1 STARTTLS not available");
        }
        self.reply("220 2.0.0 Ready to start TLS");
        // RFC 3207 §4.2: forget everything learned before TLS.
        self.helo = None;
        self.tx = None;
        self.auth_user = None;
        self.mode = Mode::Waiting;
        Some(Action::StartTls)
    }

    /// The handshake succeeded: the session starts over inside TLS.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.peer.tls = Some(info);
        self.mode = Mode::Command;
    }

    fn auth(&mut self, mechanism: u64, initial: String) -> Option<Action> {
        if self.peer.tls.is_none() {
            // RFC 4954 §4: never look at credentials sent in the clear.
            return self
                .error("538 5.7.11 Encryption required for requested authentication mechanism");
        }
        if !self.listener.auth {
            return self.error("503 5.5.1 AUTH not available on this listener");
        }
        if self.helo.as_ref().is_none_or(|(_, ext)| !ext) {
            return self.error("503 5.5.1 Send EHLO first");
        }
        if self.auth_user.is_some() {
            return self.error("503 5.5.1 Already authenticated");
        }
        if self.tx.is_some() {
            return self.error("503 5.5.1 AUTH not permitted during a mail transaction");
        }
        match mechanism {
            smtp_proto::AUTH_PLAIN if initial.is_empty() => {
                self.mode = Mode::AuthPlain;
                self.reply("334 ");
                None
            }
            smtp_proto::AUTH_PLAIN => self.auth_plain(initial.as_bytes()),
            smtp_proto::AUTH_LOGIN if initial.is_empty() => {
                self.mode = Mode::AuthLoginUser;
                self.reply("334 VXNlcm5hbWU6");
                None
            }
            smtp_proto::AUTH_LOGIN => {
                let Some(user) = self.decode_b64(initial.as_bytes()) else {
                    return self.auth_abort(initial.as_bytes());
                };
                self.mode = Mode::AuthLoginPass(String::from_utf8_lossy(&user).into_owned());
                self.reply("334 UGFzc3dvcmQ6");
                None
            }
            _ => self.error("504 5.5.4 Unrecognized authentication mechanism"),
        }
    }

    fn decode_b64(&self, text: &[u8]) -> Option<Vec<u8>> {
        if text == b"*" {
            return None;
        }
        B64.decode(text.trim_ascii()).ok()
    }

    fn auth_abort(&mut self, text: &[u8]) -> Option<Action> {
        self.mode = Mode::Command;
        if text == b"*" {
            self.error("501 5.0.0 Authentication cancelled")
        } else {
            self.error("501 5.5.2 Invalid base64 data")
        }
    }

    fn auth_plain(&mut self, text: &[u8]) -> Option<Action> {
        let Some(decoded) = self.decode_b64(text) else {
            return self.auth_abort(text);
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authz), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error("501 5.5.2 Malformed AUTH PLAIN response");
        };
        if !authz.is_empty() && authz != user {
            return self.error("535 5.7.8 Authentication credentials invalid");
        }
        self.mode = Mode::Waiting;
        Some(Action::Authenticate {
            username: String::from_utf8_lossy(user).into_owned(),
            password: String::from_utf8_lossy(pass).into_owned(),
        })
    }

    /// The connection layer checked the credentials.
    pub fn auth_result(&mut self, outcome: AuthOutcome) -> Option<Action> {
        self.mode = Mode::Command;
        match outcome {
            AuthOutcome::Success(user) => {
                self.auth_user = Some(user);
                self.reply("235 2.7.0 Authentication successful");
                None
            }
            AuthOutcome::Failure => self.error("535 5.7.8 Authentication credentials invalid"),
            AuthOutcome::Busy => self.error(
                "454 4.7.0 Temporary authentication failure: too many logins in progress, try again later",
            ),
            AuthOutcome::Blocked => {
                self.reply("421 4.7.0 Too many failed authentication attempts, closing connection");
                self.mode = Mode::Closed;
                Some(Action::Close)
            }
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, raw_size: usize) -> Option<Action> {
        if self.helo.is_none() {
            return self.error("503 5.5.1 Send EHLO/HELO first");
        }
        if self.tls_needed() {
            return self.error("530 5.7.0 Must issue a STARTTLS command first");
        }
        if self.listener.require_auth && self.auth_user.is_none() {
            return self.error("530 5.7.0 Authentication required");
        }
        if self.tx.is_some() {
            return self.error("503 5.5.1 Nested MAIL command");
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.error("555 5.5.4 BODY=BINARYMIME not supported");
        }
        // RFC 8689: REQUIRETLS is taken only over TLS (and offered only there).
        let requiretls = from.flags & smtp_proto::MAIL_REQUIRETLS != 0;
        if requiretls && self.peer.tls.is_none() {
            return self.error(
                "530 5.7.10 REQUIRETLS needs this session to be encrypted: issue STARTTLS first",
            );
        }
        if requiretls && !self.listener.requiretls {
            return self.error("555 5.5.4 REQUIRETLS is not offered by this listener");
        }
        if from.size.max(raw_size) > self.rules.max_message_size {
            return self.error("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_ascii() && !smtputf8 {
            return self.error("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter");
        }
        if !from.address.is_empty() {
            let Some(addr) = Address::parse(&from.address, smtputf8) else {
                return self.error("501 5.1.7 Bad sender address syntax");
            };
            if self.peer.tls.is_none()
                && self
                    .rules
                    .tls_required_sender_domains
                    .iter()
                    .any(|p| p.matches_name(&addr.domain))
            {
                return self.error("530 5.7.0 Must issue a STARTTLS command first");
            }
        }
        if let Some(name) = self.missing_client_cert(&from.address) {
            return self.error(&format!(
                "530 5.7.0 A client certificate issued to {name} is required"
            ));
        }
        let reply = format!("250 2.1.0 Sender <{}> OK", from.address);
        let ret_full = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(true)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(false)
        } else {
            None
        };
        self.tx = Some(Transaction {
            sender: from.address,
            smtputf8,
            eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            ret_full,
            envid: from.env_id.filter(|e| !e.chars().any(char::is_control)),
            requiretls,
            ..Transaction::default()
        });
        self.reply(&reply);
        None
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) -> Option<Action> {
        if self.tls_needed() {
            return self.error("530 5.7.0 Must issue a STARTTLS command first");
        }
        let Some(tx) = self.tx.as_ref() else {
            return self.error("503 5.5.1 Need MAIL before RCPT");
        };
        if tx.bdat.is_some() {
            return self.error("503 5.5.1 RCPT not allowed during BDAT");
        }
        if tx.recipients.len() >= self.rules.max_recipients {
            // Not counted as an error: RFC 5321 §4.5.3.1.10 expects clients to retry the rest.
            self.reply("452 4.5.3 Too many recipients");
            return None;
        }
        let utf8 = tx.smtputf8;
        if !to.address.is_ascii() && !utf8 {
            return self.error("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter");
        }
        let address = if to.address.is_empty() {
            // `<postmaster>` (the null path was refused in `command`).
            match &self.rules.postmaster_domain {
                Some(d) => format!("postmaster@{d}"),
                None => return self.error("550 5.1.1 No postmaster mailbox here"),
            }
        } else {
            to.address
        };
        let Some(addr) = Address::parse(&address, utf8) else {
            return self.error("501 5.1.3 Bad recipient address syntax");
        };
        let may_relay = self.auth_user.is_some() || self.peer.trusted;
        let report_address = !self.rules.report_addresses.is_empty()
            && self
                .rules
                .report_addresses
                .contains(&addr.to_string().to_ascii_lowercase());
        let kind = if addr.is_literal() {
            None
        } else {
            self.rules.domains.get(&canonical_or_lower(&addr.domain))
        };
        match kind {
            _ if report_address => {}
            _ if addr.has_routing_chars() && !may_relay => {
                return self.error("554 5.7.1 Relay access denied");
            }
            Some(DomainKind::Local { mailboxes }) => {
                let name = mailbox_name(&addr.local);
                if name.is_none() && !addr.local.is_ascii() && mailboxes.is_empty() {
                    // RFC 6531 §3.7.4.1: a UTF-8 address this server cannot take.
                    return self.error(&format!(
                        "553 5.6.7 <{addr}>: This UTF-8 mailbox name has characters that cannot be delivered here"
                    ));
                }
                let known = name.is_some_and(|m| mailboxes.is_empty() || mailboxes.contains(&m));
                if !known {
                    return self.error(&format!(
                        "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
                    ));
                }
            }
            Some(DomainKind::Routed) => {}
            None if may_relay => {}
            None => return self.error("554 5.7.1 Relay access denied"),
        }
        let canonical = addr.to_string();
        let reply = format!("250 2.1.5 Recipient <{canonical}> OK");
        let notify = [
            (smtp_proto::RCPT_NOTIFY_NEVER, NOTIFY_NEVER),
            (smtp_proto::RCPT_NOTIFY_SUCCESS, NOTIFY_SUCCESS),
            (smtp_proto::RCPT_NOTIFY_FAILURE, NOTIFY_FAILURE),
            (smtp_proto::RCPT_NOTIFY_DELAY, NOTIFY_DELAY),
        ]
        .iter()
        .filter(|(flag, _)| to.flags & flag != 0)
        .fold(0u8, |acc, (_, bit)| acc | bit);
        if notify & NOTIFY_NEVER != 0 && notify != NOTIFY_NEVER {
            return self.error("501 5.5.4 NOTIFY=NEVER cannot be combined with other values");
        }
        let orcpt = to.orcpt.filter(|o| !o.chars().any(char::is_control));
        if let Some(tx) = self.tx.as_mut()
            && tx.seen.insert(canonical.to_ascii_lowercase())
        {
            tx.recipients.push(canonical);
            tx.dsn.push(RcptDsn { notify, orcpt });
        }
        self.reply(&reply);
        None
    }

    fn data(&mut self) -> Option<Action> {
        if self.tls_needed() {
            return self.error("530 5.7.0 Must issue a STARTTLS command first");
        }
        let Some(tx) = self.tx.as_ref() else {
            return self.error("503 5.5.1 Need MAIL command");
        };
        if tx.bdat.is_some() || tx.bdat_failed.is_some() {
            return self.error("503 5.5.1 DATA not allowed after BDAT");
        }
        if tx.recipients.is_empty() {
            return self.error("554 5.5.1 No valid recipients");
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.mode = Mode::Data(DataReceiver::new(
            self.listener.bare_newline,
            self.rules.max_message_size,
        ));
        None
    }

    fn data_done(&mut self, receiver: DataReceiver) -> Option<Action> {
        if receiver.failed {
            self.tx = None;
            // Our failure, not the client's: not counted towards max_errors.
            self.reply(QUEUE_WRITE_FAILED);
            return None;
        }
        if receiver.oversized {
            self.tx = None;
            return self.error("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        if receiver.bare_newline && self.listener.bare_newline == BareNewline::Reject {
            self.tx = None;
            return self.error("550 5.6.2 Bare <LF> or <CR> in message content is not allowed (RFC 5321 section 2.3.8)");
        }
        let spilled = receiver.spilled > 0;
        self.finish_message(receiver.body, spilled)
    }

    /// BDAT content to hand out to the spool, once enough is held.
    fn take_bdat_spill(&mut self) -> Option<(Vec<u8>, bool)> {
        let content = self.tx.as_mut()?.bdat.as_mut()?;
        if content.body.len() < SPILL_AT {
            return None;
        }
        let first = content.spilled == 0;
        content.spilled += content.body.len();
        Some((std::mem::take(&mut content.body), first))
    }

    /// Whether content of the current message has been handed out ([`Action::Spill`]) and
    /// is still wanted. When it turns false before an [`Action::Queue`] (the message was
    /// refused, reset or abandoned), the connection layer drops the spool file it began.
    pub fn spill_open(&self) -> bool {
        match &self.mode {
            Mode::Data(receiver) => receiver.spill_open(),
            _ => self
                .tx
                .as_ref()
                .and_then(|tx| tx.bdat.as_ref())
                .is_some_and(|c| c.spilled > 0),
        }
    }

    /// The connection layer wrote (`ok`) or failed to write what [`Action::Spill`] handed
    /// out. On a failure the rest of the content is read and dropped, and the message is
    /// answered `451 4.3.0` at its end.
    pub fn spilled(&mut self, ok: bool) {
        if ok {
            return;
        }
        match &mut self.mode {
            Mode::Data(receiver) => receiver.spill_failed(),
            _ => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.bdat = None;
                    tx.bdat_failed.get_or_insert(QUEUE_WRITE_FAILED);
                }
            }
        }
    }

    /// The envelope and trace of the message being received, for the spool file that
    /// [`Action::Spill`] begins; `None` outside a transaction.
    pub fn pending_message(&self) -> Option<(Envelope, Trace)> {
        let tx = self.tx.as_ref()?;
        Some((tx.envelope(), self.trace(tx.smtputf8)))
    }

    /// Checks a BDAT chunk size before the parser sees it (it would wrap a size that does not
    /// fit): one that is not a number, does not fit in 64 bits, or alone exceeds the message
    /// size limit is refused, and the session is closed, because the octets that follow can no
    /// longer be framed and must not be read as commands. `None`: not BDAT, or a size to take.
    fn refuse_bdat_size(&mut self, text: &[u8]) -> Option<Option<Action>> {
        let verb = text.get(..4)?;
        if !verb.eq_ignore_ascii_case(b"BDAT") || text.get(4).is_some_and(|&b| b != b' ') {
            return None;
        }
        let size = text[4..].split(|&b| b == b' ').find(|w| !w.is_empty())?;
        let reply = if !size.iter().all(u8::is_ascii_digit) {
            "501 5.5.4 BDAT needs a chunk size in octets; closing the connection"
        } else {
            let fits = std::str::from_utf8(size)
                .ok()
                .and_then(|d| d.parse::<u64>().ok());
            match fits {
                None => {
                    "501 5.5.4 BDAT chunk size is too large to be a size; closing the connection"
                }
                Some(n) if n > self.rules.max_message_size as u64 => {
                    "552 5.3.4 BDAT chunk exceeds the maximum message size; closing the connection"
                }
                Some(_) => return None,
            }
        };
        self.reply(reply);
        self.tx = None;
        self.mode = Mode::Closed;
        Some(Some(Action::Close))
    }

    fn bdat(&mut self, size: usize, last: bool) -> Option<Action> {
        let failure = if self.tls_needed() {
            Some("530 5.7.0 Must issue a STARTTLS command first")
        } else {
            match self.tx.as_mut() {
                None => Some("503 5.5.1 Need MAIL command"),
                Some(tx) if tx.recipients.is_empty() => Some("554 5.5.1 No valid recipients"),
                Some(tx) => {
                    if tx.bdat.is_none() {
                        tx.bdat = Some(BdatContent::default());
                    }
                    None
                }
            }
        };
        if let Some(f) = failure {
            match self.tx.as_mut() {
                Some(tx) => {
                    tx.bdat_failed.get_or_insert(f);
                }
                None => self.pending_bdat_failure = Some(f),
            }
        }
        // The chunk is read even when the command failed (RFC 3030 §2): its length is known.
        self.mode = Mode::Bdat {
            remaining: size,
            last,
        };
        None
    }

    fn bdat_chunk(&mut self, chunk: &[u8]) {
        let max = self.rules.max_message_size;
        let policy = self.listener.bare_newline;
        let Some(tx) = self.tx.as_mut() else { return };
        if tx.bdat_failed.is_some() {
            return;
        }
        let Some(content) = tx.bdat.as_mut() else {
            return;
        };
        tx.bdat_octets += chunk.len();
        if content.len() + chunk.len() > max {
            tx.bdat_failed = Some(BDAT_MAX_CHUNK_NOTE);
            tx.bdat = None;
            return;
        }
        content.checker.append(chunk, &mut content.body, policy);
        // Normalizing bare line endings can grow the content past the chunk's size.
        if content.len() > max {
            tx.bdat_failed = Some(BDAT_MAX_CHUNK_NOTE);
            tx.bdat = None;
        }
    }

    fn bdat_done(&mut self, last: bool) -> Option<Action> {
        if let Some(f) = self.pending_bdat_failure.take() {
            return self.error(f);
        }
        let Some(tx) = self.tx.as_mut() else {
            return self.error("503 5.5.1 Need MAIL command");
        };
        if let Some(f) = tx.bdat_failed {
            if last {
                self.tx = None;
            }
            if f == BDAT_MAX_CHUNK_NOTE {
                return self.error("552 5.3.4 Message size exceeds fixed maximum message size");
            }
            if f == QUEUE_WRITE_FAILED {
                // Our failure, not the client's: not counted towards max_errors.
                self.reply(f);
                return None;
            }
            return self.error(f);
        }
        if !last {
            let n = tx.bdat_octets;
            self.reply(&format!("250 2.0.0 {n} octets received"));
            return None;
        }
        let policy = self.listener.bare_newline;
        let Some(mut content) = tx.bdat.take() else {
            return self.error("503 5.5.1 Need MAIL command");
        };
        content.checker.finish(&mut content.body, policy);
        if content.len() > self.rules.max_message_size {
            self.tx = None;
            return self.error("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        if content.checker.bare_newline && policy == BareNewline::Reject {
            self.tx = None;
            return self.error("550 5.6.2 Bare <LF> or <CR> in message content is not allowed (RFC 5321 section 2.3.8)");
        }
        self.finish_message(content.body, content.spilled > 0)
    }

    fn finish_message(&mut self, body: Vec<u8>, spilled: bool) -> Option<Action> {
        let tx = self.tx.take()?;
        let trace = self.trace(tx.smtputf8);
        self.mode = Mode::Waiting;
        Some(Action::Queue {
            envelope: tx.into_envelope(),
            body,
            spilled,
            trace,
        })
    }

    /// How the message came: HELO name, address, RFC 3848 protocol, TLS and login.
    fn trace(&self, smtputf8: bool) -> Trace {
        let (helo, extended) = self.helo.clone().unwrap_or_default();
        let mut protocol = String::new();
        if smtputf8 {
            protocol.push_str("UTF8SMTP");
        } else if extended {
            protocol.push_str("ESMTP");
        } else {
            protocol.push_str("SMTP");
        }
        if self.peer.tls.is_some() {
            protocol.push('S');
        }
        if self.auth_user.is_some() {
            protocol.push('A');
        }
        if protocol == "SMTPS" || protocol == "SMTPSA" || protocol == "SMTPA" {
            // RFC 3848 only defines the ESMTP forms.
            protocol.insert(0, 'E');
        }
        Trace {
            helo,
            ip: self.peer.ip,
            protocol,
            tls: self.peer.tls.clone(),
            auth_user: self.auth_user.clone(),
        }
    }

    /// The connection layer spooled (or failed to spool) the message.
    pub fn queued(&mut self, result: Result<String, String>) -> Option<Action> {
        self.mode = Mode::Command;
        match result {
            Ok(id) => {
                self.reply(&format!("250 2.0.0 Ok: queued as {id}"));
                None
            }
            Err(_) => {
                // Our failure, not the client's: not counted towards max_errors.
                self.reply(QUEUE_WRITE_FAILED);
                None
            }
        }
    }
}

/// The path between the first `<` and the next `>` of a MAIL/RCPT line, as the client wrote it.
fn raw_path(raw: &[u8]) -> &[u8] {
    let Some(start) = raw.iter().position(|&b| b == b'<') else {
        return raw;
    };
    let rest = &raw[start + 1..];
    &rest[..rest.iter().position(|&b| b == b'>').unwrap_or(rest.len())]
}

/// The largest `SIZE=` value on a MAIL line, saturating. smtp-proto wraps values past
/// `usize::MAX` around to small numbers (`SIZE=99999999999999999999999` reads as 999).
fn size_param(raw: &[u8]) -> usize {
    raw.split(|b| b.is_ascii_whitespace())
        .filter_map(|p| {
            let (key, value) = p.split_at_checked(5)?;
            key.eq_ignore_ascii_case(b"SIZE=").then_some(())?;
            value.iter().try_fold(0usize, |n, &d| {
                d.is_ascii_digit()
                    .then(|| n.saturating_mul(10).saturating_add(usize::from(d - b'0')))
            })
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
