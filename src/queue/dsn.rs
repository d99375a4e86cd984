//! Delivery status notifications: bounces and delay notices (RFC 3464 inside an RFC 6522
//! `multipart/report`).
//!
//! [`build_dsn`] is a pure function: it takes everything it needs (including the clock) in a
//! [`DsnInput`] and returns the complete notification as RFC 5322 bytes with CRLF line endings,
//! ready to be queued with a null reverse path (`MAIL FROM:<>`) to `input.sender`.
//!
//! The message has three parts:
//!
//! 1. `text/plain; charset=utf-8`: for each recipient, what failed, where, and what the receiving
//!    side must fix (the caller's `explanation`), with the status, remote host and last reply.
//! 2. `message/delivery-status`: the per-message fields (`Reporting-MTA`, `Original-Envelope-Id`,
//!    `Arrival-Date`), then one blank-line-separated group of per-recipient fields each.
//! 3. The returned message: `message/rfc822` (the whole message, when `RET=FULL` was asked for,
//!    it is at most [`MAX_RETURNED_MESSAGE`] octets and it can be carried as 7bit/8bit) or
//!    `text/rfc822-headers` (its header only).
//!
//! Safety of the output:
//!
//! - Every header and delivery-status field goes through one writer that replaces control
//!   characters (CR and LF included) with a space and folds at whitespace; a CR/LF in a recipient
//!   or a remote reply can never start a new field, part or boundary.
//! - Lines are folded at 78 octets where there is whitespace, and hard-split before 998 octets
//!   where there is none (such a split adds one space when the field is unfolded).
//! - The boundary is derived from a hash of the input and checked against every part's content.
//! - The returned message's line endings are normalised to CRLF.
//!
//! Internationalisation (RFC 6533): when an address, the envelope id, a remote MTA name or a
//! diagnostic contains non-ASCII characters, or the returned header does, the report becomes a
//! "global" one: `report-type=global-delivery-status`, a `message/global-delivery-status` part
//! (UTF-8 allowed, `Content-Transfer-Encoding: 8bit`), non-ASCII addresses typed `utf-8` instead of
//! `rfc822`, and the returned message as `message/global` or `message/global-headers`. Parts that
//! contain 8-bit octets are labelled `8bit` (the queue must then send with `BODY=8BITMIME`); a
//! non-ASCII sender address also appears raw in `To:` (RFC 6532), so the DSN then needs SMTPUTF8,
//! as its envelope does anyway.
//!
//! `original_envelope_id` and `original_recipient` are taken as already xtext-decoded (RFC 3461
//! §4): the values as the sender meant them, not as they appeared on the `MAIL`/`RCPT` line.

use crate::util::{compact_utc, rfc5322_date};

/// The largest message returned in full; larger ones are returned as headers only.
pub const MAX_RETURNED_MESSAGE: usize = 1024 * 1024;

/// Fold header lines at whitespace beyond this many octets.
const SOFT_WIDTH: usize = 78;
/// Hard-split a whitespace-free run so that no line exceeds this many octets.
const HARD_WIDTH: usize = 990;
/// RFC 5322 §2.1.1: the line limit, CRLF excluded.
const MAX_LINE: usize = 998;

/// What the notification reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// Delivery was given up for the listed recipients (a bounce).
    Failure,
    /// Delivery is still being retried (a delay warning).
    Delay,
    /// Delivered or relayed, reported because the sender asked with `NOTIFY=SUCCESS`.
    Success,
}

/// RFC 3464 §2.3.3 `Action` for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    /// The field value, as RFC 3464 spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }

    /// Status used when the caller's one is not a valid `class.subject.detail` code.
    fn fallback_status(self) -> &'static str {
        match self {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            Action::Delivered | Action::Relayed | Action::Expanded => "2.0.0",
        }
    }

    /// How the human-readable part describes the outcome.
    fn phrase(self) -> &'static str {
        match self {
            Action::Failed => "delivery failed",
            Action::Delayed => "delivery delayed, still trying",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed to a system that does not send delivery notices",
            Action::Expanded => "delivered and forwarded to further recipients",
        }
    }
}

/// Everything a notification is built from. No I/O happens in [`build_dsn`]: the clock is `now`.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our hostname (`Reporting-MTA`, `From: MAILER-DAEMON@…`, `Message-ID`).
    pub reporting_mta: &'a str,
    /// The `ENVID` given with `MAIL FROM`, xtext-decoded.
    pub original_envelope_id: Option<&'a str>,
    /// When the message was accepted, Unix seconds.
    pub arrival_date: u64,
    /// The current time, Unix seconds.
    pub now: u64,
    /// The original reverse path; the notification goes to it. Empty (or `<>`) means no DSN.
    pub sender: &'a str,
    /// One entry per recipient reported on; at least one is needed.
    pub recipients: Vec<RecipientStatus<'a>>,
    /// The message as spooled (header and body).
    pub original_message: &'a [u8],
    /// `RET=FULL` (true) or `RET=HDRS` / unspecified (false).
    pub return_full: bool,
    pub kind: DsnKind,
}

/// The outcome for one recipient.
#[derive(Debug, Clone)]
pub struct RecipientStatus<'a> {
    /// The address delivery was attempted to.
    pub final_recipient: &'a str,
    /// `ORCPT`, xtext-decoded, as `type;address` (e.g. `rfc822;x@y`); a bare address means `rfc822`.
    pub original_recipient: Option<&'a str>,
    pub action: Action,
    /// Enhanced status code, e.g. `5.7.320` or `4.4.317`.
    pub status: &'a str,
    /// The host last tried, e.g. `dns;mx.example.com` (a bare name is taken as `dns`).
    pub remote_mta: Option<&'a str>,
    /// The last reply or cause verbatim, e.g. `smtp; 550 5.1.1 user unknown`. Without a
    /// `type;` prefix, text starting with a reply code is typed `smtp`, anything else `X-Moat`.
    pub diagnostic_code: Option<&'a str>,
    pub last_attempt: Option<u64>,
    /// Only reported when `action` is [`Action::Delayed`].
    pub will_retry_until: Option<u64>,
    /// A sentence for a person: what failed, where, and what the receiving side must fix.
    pub explanation: &'a str,
}

/// Builds the notification, or `None` when none must be sent: a null sender (never bounce a
/// bounce) or no recipients to report on.
pub fn build_dsn(input: &DsnInput) -> Option<Vec<u8>> {
    let sender = clean_addr(input.sender);
    if sender.is_empty() || input.recipients.is_empty() {
        return None;
    }
    let host = safe_host(input.reporting_mta);
    let envid = input
        .original_envelope_id
        .map(|e| clean_text(e).trim().to_string())
        .filter(|e| !e.is_empty());
    let recipients: Vec<Rcpt> = input.recipients.iter().map(Rcpt::new).collect();

    let original = normalize_crlf(input.original_message);
    let header = header_block(&original);
    let global = !sender.is_ascii()
        || envid.as_deref().is_some_and(|e| !e.is_ascii())
        || recipients.iter().any(Rcpt::needs_global)
        || !header.is_ascii();

    let full = input.return_full
        && input.original_message.len() <= MAX_RETURNED_MESSAGE
        && !original.contains(&0)
        && max_line_len(&original) <= MAX_LINE;
    let returned: Vec<u8> = if full {
        original.clone()
    } else {
        headers_only(header, global)
    };

    let human = human_part(input, &host, &recipients, full);
    let status = status_part(&host, envid.as_deref(), input.arrival_date, &recipients);

    let seed = input_hash(input);
    let boundary = choose_boundary(seed, &[human.as_bytes(), status.as_bytes(), &returned]);

    let (report_type, status_type) = if global {
        ("global-delivery-status", "message/global-delivery-status")
    } else {
        ("delivery-status", "message/delivery-status")
    };
    // The returned part is labelled by what happened to the message: a success report
    // returns a delivered message, a delay report one still queued.
    let what = match input.kind {
        DsnKind::Failure => "Undelivered Message",
        DsnKind::Delay => "Delayed Message",
        DsnKind::Success => "Delivered Message",
    };
    let (returned_type, returned_desc) = match (global, full) {
        (true, true) => ("message/global", what.to_string()),
        (false, true) => ("message/rfc822", what.to_string()),
        (true, false) => ("message/global-headers", format!("{what} Headers")),
        (false, false) => ("text/rfc822-headers", format!("{what} Headers")),
    };
    let eight_bit = !human.is_ascii() || !status.is_ascii() || !returned.is_ascii();

    let mut head = String::new();
    push_field(
        &mut head,
        "From",
        &format!("\"Mail Delivery System\" <MAILER-DAEMON@{host}>"),
    );
    let to = sender.replace(['<', '>'], "?");
    push_field(&mut head, "To", &format!("<{to}>"));
    let subject = match input.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
        DsnKind::Success => "Successful Mail Delivery Report",
    };
    push_field(&mut head, "Subject", subject);
    push_field(&mut head, "Date", &rfc5322_date(input.now));
    push_field(
        &mut head,
        "Message-ID",
        &format!("<{}.{seed:016x}.dsn@{host}>", compact_utc(input.now)),
    );
    push_field(&mut head, "Auto-Submitted", "auto-replied");
    push_field(&mut head, "MIME-Version", "1.0");
    push_field(
        &mut head,
        "Content-Type",
        &format!("multipart/report; report-type={report_type}; boundary=\"{boundary}\""),
    );
    push_field(&mut head, "Content-Transfer-Encoding", cte(eight_bit));
    head.push_str("\r\n");
    head.push_str("This is a MIME-encapsulated delivery status notification.\r\n");

    let mut out = head.into_bytes();
    let mut part = |content_type: &str, description: &str, body: &[u8]| {
        let mut h = format!("\r\n--{boundary}\r\n");
        push_field(&mut h, "Content-Type", content_type);
        push_field(&mut h, "Content-Description", description);
        push_field(&mut h, "Content-Transfer-Encoding", cte(!body.is_ascii()));
        h.push_str("\r\n");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(body);
    };
    part(
        "text/plain; charset=utf-8",
        "Notification",
        human.as_bytes(),
    );
    part(status_type, "Delivery report", status.as_bytes());
    part(returned_type, &returned_desc, &returned);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Some(out)
}

/// One recipient with every value cleaned and typed.
struct Rcpt {
    final_type: &'static str,
    final_recipient: String,
    original: Option<(String, String)>,
    action: Action,
    status: String,
    remote_mta: Option<(String, String)>,
    diagnostic: Option<(String, String)>,
    last_attempt: Option<u64>,
    will_retry_until: Option<u64>,
    explanation: String,
}

impl Rcpt {
    fn new(r: &RecipientStatus) -> Rcpt {
        let final_recipient = clean_addr(r.final_recipient);
        let final_type = if final_recipient.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        let original = r.original_recipient.and_then(|o| {
            let o = clean_text(o);
            let (kind, addr) = match split_type(&o) {
                Some((kind, addr)) => (kind.to_string(), clean_addr(addr)),
                None => ("rfc822".to_string(), clean_addr(&o)),
            };
            if addr.is_empty() {
                return None;
            }
            let kind = if kind.eq_ignore_ascii_case("rfc822") && !addr.is_ascii() {
                "utf-8".to_string()
            } else {
                kind
            };
            Some((kind, addr))
        });
        let status = if valid_status(r.status.trim()) {
            r.status.trim().to_string()
        } else {
            r.action.fallback_status().to_string()
        };
        let remote_mta = r.remote_mta.and_then(|m| {
            let m = clean_text(m);
            let (kind, name) = split_type(&m).unwrap_or(("dns", m.trim()));
            (!name.is_empty()).then(|| (kind.to_string(), name.to_string()))
        });
        let diagnostic = r.diagnostic_code.and_then(|d| {
            let d = clean_text(d);
            let (kind, text) = split_type(&d).unwrap_or_else(|| {
                let t = d.trim();
                // An SMTP reply: a 2xx-5xx code followed by a space or dash (so a cause such
                // as "127.0.0.32 did not offer STARTTLS" is not mistaken for one).
                let b = t.as_bytes();
                let smtp = b.len() >= 4
                    && (b'2'..=b'5').contains(&b[0])
                    && b[1..3].iter().all(u8::is_ascii_digit)
                    && (b[3] == b' ' || b[3] == b'-');
                (if smtp { "smtp" } else { "X-Moat" }, t)
            });
            (!text.is_empty()).then(|| (kind.to_string(), text.to_string()))
        });
        Rcpt {
            final_type,
            final_recipient,
            original,
            action: r.action,
            status,
            remote_mta,
            diagnostic,
            last_attempt: r.last_attempt,
            will_retry_until: r.will_retry_until,
            explanation: clean_text(r.explanation).trim().to_string(),
        }
    }

    /// Whether a machine-readable value of this recipient needs a global (RFC 6533) report.
    fn needs_global(&self) -> bool {
        let pair = |p: &Option<(String, String)>| {
            p.as_ref()
                .is_some_and(|(a, b)| !a.is_ascii() || !b.is_ascii())
        };
        !self.final_recipient.is_ascii()
            || pair(&self.original)
            || pair(&self.remote_mta)
            || pair(&self.diagnostic)
    }
}

/// The `message/delivery-status` body: per-message fields, then one group per recipient, groups
/// separated by a blank line. Ends with CRLF.
fn status_part(host: &str, envid: Option<&str>, arrival: u64, recipients: &[Rcpt]) -> String {
    let mut s = String::new();
    push_field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    if let Some(envid) = envid {
        push_field(&mut s, "Original-Envelope-Id", envid);
    }
    push_field(&mut s, "Arrival-Date", &rfc5322_date(arrival));
    for r in recipients {
        s.push_str("\r\n");
        if let Some((kind, addr)) = &r.original {
            push_field(&mut s, "Original-Recipient", &format!("{kind}; {addr}"));
        }
        push_field(
            &mut s,
            "Final-Recipient",
            &format!("{}; {}", r.final_type, r.final_recipient),
        );
        push_field(&mut s, "Action", r.action.as_str());
        push_field(&mut s, "Status", &r.status);
        if let Some((kind, name)) = &r.remote_mta {
            push_field(&mut s, "Remote-MTA", &format!("{kind}; {name}"));
        }
        if let Some((kind, text)) = &r.diagnostic {
            push_field(&mut s, "Diagnostic-Code", &format!("{kind}; {text}"));
        }
        if let Some(t) = r.last_attempt {
            push_field(&mut s, "Last-Attempt-Date", &rfc5322_date(t));
        }
        if r.action == Action::Delayed
            && let Some(t) = r.will_retry_until
        {
            push_field(&mut s, "Will-Retry-Until", &rfc5322_date(t));
        }
    }
    s
}

/// The human-readable part. Ends with CRLF.
fn human_part(input: &DsnInput, host: &str, recipients: &[Rcpt], full: bool) -> String {
    let mut s = String::new();
    wrap(&mut s, &format!("This is the mail system at {host}."), "");
    s.push_str("\r\n");
    let intro = match input.kind {
        DsnKind::Failure => {
            "Your message could not be delivered to one or more of its recipients. \
             The mail system has given up on the recipients listed below; for each, it says \
             what failed, where, and what must be fixed. Sending the message again will not \
             help until the cause is fixed."
        }
        DsnKind::Delay => {
            "Your message has not yet been delivered to one or more of its recipients. \
             The mail system is still trying, so you do not need to send it again. For each \
             recipient listed below, it says what is failing, where, and what must be fixed. \
             You will be told again if delivery finally fails."
        }
        DsnKind::Success => {
            "Your message was delivered to the recipients listed below, or handed on to a \
             server that does not report delivery; you asked to be told (NOTIFY=SUCCESS)."
        }
    };
    wrap(&mut s, intro, "");
    s.push_str("\r\n");
    let returned = if full {
        "A copy of it is attached."
    } else if input.return_full {
        "Its header is attached (the whole message is too large, or cannot be returned intact)."
    } else {
        "Its header is attached."
    };
    wrap(
        &mut s,
        &format!(
            "The message arrived here on {}. {returned}",
            rfc5322_date(input.arrival_date)
        ),
        "",
    );
    for r in recipients {
        s.push_str("\r\n");
        wrap(
            &mut s,
            &format!("<{}>: {}", r.final_recipient, r.action.phrase()),
            "",
        );
        const IND: &str = "    ";
        if !r.explanation.is_empty() {
            wrap(&mut s, &r.explanation, IND);
        }
        wrap(&mut s, &format!("Status: {}", r.status), IND);
        if let Some((_, name)) = &r.remote_mta {
            wrap(&mut s, &format!("Remote server: {name}"), IND);
        }
        if let Some((kind, text)) = &r.diagnostic {
            let label = if kind.eq_ignore_ascii_case("smtp") {
                "Last reply from the remote server"
            } else {
                "Cause"
            };
            wrap(&mut s, &format!("{label}: {text}"), IND);
        }
        if let Some(t) = r.last_attempt {
            wrap(&mut s, &format!("Last attempt: {}", rfc5322_date(t)), IND);
        }
        if r.action == Action::Delayed
            && let Some(t) = r.will_retry_until
        {
            wrap(
                &mut s,
                &format!("Will keep trying until: {}", rfc5322_date(t)),
                IND,
            );
        }
    }
    s
}

/// Appends one header field, cleaned of control characters and folded. The value is trimmed;
/// folds are made before existing spaces (so unfolding restores the value exactly) past
/// [`SOFT_WIDTH`], and inside a space-free run only when it would pass [`HARD_WIDTH`].
fn push_field(out: &mut String, name: &str, value: &str) {
    let value = clean_text(value);
    out.push_str(name);
    out.push_str(": ");
    let start = name.len() + 2;
    let mut len = start;
    for (i, word) in value.trim().split(' ').enumerate() {
        if i > 0 {
            if !word.is_empty() && len > start && len + 1 + word.len() > SOFT_WIDTH {
                out.push_str("\r\n");
                len = 0;
            }
            out.push(' ');
            len += 1;
        }
        let mut rest = word;
        while len + rest.len() > HARD_WIDTH {
            let (head, tail) = split_at_most(rest, HARD_WIDTH.saturating_sub(len));
            out.push_str(head);
            out.push_str("\r\n ");
            len = 1;
            rest = tail;
        }
        out.push_str(rest);
        len += rest.len();
    }
    out.push_str("\r\n");
}

/// Appends `text` as lines of at most [`SOFT_WIDTH`] octets where whitespace allows (runs of
/// whitespace, CR and LF included, become one space), each prefixed by `indent`.
fn wrap(out: &mut String, text: &str, indent: &str) {
    let mut line = String::from(indent);
    for word in text.split_whitespace() {
        let mut rest = word;
        loop {
            let room = HARD_WIDTH - indent.len();
            let (head, tail) = split_at_most(rest, room);
            let sep = usize::from(line.len() > indent.len());
            if line.len() > indent.len() && line.len() + sep + head.len() > SOFT_WIDTH {
                out.push_str(&line);
                out.push_str("\r\n");
                line = String::from(indent);
            }
            if line.len() > indent.len() {
                line.push(' ');
            }
            line.push_str(head);
            if tail.is_empty() {
                break;
            }
            out.push_str(&line);
            out.push_str("\r\n");
            line = String::from(indent);
            rest = tail;
        }
    }
    if line.len() > indent.len() {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Splits `s` at the last char boundary at or before `max` octets (at least one char).
fn split_at_most(s: &str, max: usize) -> (&str, &str) {
    if s.len() <= max {
        return (s, "");
    }
    let mut cut = max;
    while cut > 0 && !s.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut == 0 {
        cut = s.chars().next().map_or(s.len(), char::len_utf8);
    }
    s.split_at(cut)
}

/// Replaces control characters (C0 including CR, LF and TAB, DEL, C1) and Unicode line
/// separators with a space.
fn clean_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// An address as given (`a@b` or `<a@b>`), trimmed, without angle brackets, control characters
/// replaced by `?`. `<>` becomes empty.
fn clean_addr(s: &str) -> String {
    let t = s.trim();
    let t = t
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(t)
        .trim();
    t.chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Our hostname reduced to LDH characters and dots (it goes into `From`, `Message-ID` and
/// `Reporting-MTA`).
fn safe_host(s: &str) -> String {
    let h: String = s
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    let h = h.trim_matches('.');
    if h.is_empty() {
        "localhost".to_string()
    } else {
        h.to_string()
    }
}

/// `type; value` with `type` an atom (`dns`, `smtp`, `rfc822`, `utf-8`, `X-…`).
fn split_type(s: &str) -> Option<(&str, &str)> {
    let (kind, rest) = s.split_once(';')?;
    let kind = kind.trim();
    let mut chars = kind.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    (first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')).then(|| (kind, rest.trim()))
}

/// RFC 3463 `class "." subject "." detail`.
fn valid_status(s: &str) -> bool {
    let mut it = s.split('.');
    let num = |p: Option<&str>| {
        p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(it.next(), Some("2" | "4" | "5"))
        && num(it.next())
        && num(it.next())
        && it.next().is_none()
}

/// Bare CR and bare LF become CRLF; a non-empty result ends with CRLF.
fn normalize_crlf(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + 2);
    let mut it = src.iter().copied().peekable();
    while let Some(b) = it.next() {
        match b {
            b'\r' => {
                if it.peek() == Some(&b'\n') {
                    it.next();
                }
                out.extend_from_slice(b"\r\n");
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The header section of a CRLF-normalised message, through the CRLF of its last field.
fn header_block(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &[];
    }
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => &msg[..pos + 2],
        None => msg,
    }
}

/// The header for a headers-only part: NULs become spaces, over-long lines are cut at
/// [`MAX_LINE`], and for a global report invalid UTF-8 becomes U+FFFD.
fn headers_only(header: &[u8], global: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len());
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let mut cut = line.len().min(MAX_LINE);
        while cut < line.len() && cut > 0 && (line[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        out.extend(line[..cut].iter().map(|&b| if b == 0 { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    if global {
        String::from_utf8_lossy(&out).into_owned().into_bytes()
    } else {
        out
    }
}

/// Longest line of a CRLF-normalised text, CRLF excluded.
fn max_line_len(msg: &[u8]) -> usize {
    msg.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0)
}

fn cte(eight_bit: bool) -> &'static str {
    if eight_bit { "8bit" } else { "7bit" }
}

/// FNV-1a over the values that distinguish one notification from another.
fn input_hash(input: &DsnInput) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    };
    feed(input.reporting_mta.as_bytes());
    feed(input.sender.as_bytes());
    feed(&input.now.to_be_bytes());
    feed(&input.arrival_date.to_be_bytes());
    feed(&[input.kind as u8, u8::from(input.return_full)]);
    feed(input.original_envelope_id.unwrap_or("").as_bytes());
    for r in &input.recipients {
        feed(r.final_recipient.as_bytes());
        feed(r.action.as_str().as_bytes());
        feed(r.status.as_bytes());
        feed(r.diagnostic_code.unwrap_or("").as_bytes());
    }
    feed(input.original_message);
    h
}

/// A boundary that occurs in none of `parts`.
fn choose_boundary(seed: u64, parts: &[&[u8]]) -> String {
    let mut n: u64 = 0;
    loop {
        let b = format!("moat-dsn-{seed:016x}-{n}");
        if !parts.iter().any(|p| contains(p, b.as_bytes())) {
            return b;
        }
        n += 1;
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] = b"From: Alice <alice@example.org>\r\n\
To: bob@example.net, carol@example.net\r\n\
Subject: Quarterly figures\r\n\
Message-ID: <m1@example.org>\r\n\
\r\n\
Hello Bob,\r\n\
the body text is here.\r\n";

    fn failed_bob<'a>() -> RecipientStatus<'a> {
        RecipientStatus {
            final_recipient: "bob@example.net",
            original_recipient: Some("rfc822;bob@example.net"),
            action: Action::Failed,
            status: "5.7.320",
            remote_mta: Some("dns;mx1.example.net"),
            diagnostic_code: Some(
                "X-Moat; certificate for mx1.example.net expired on Mon, 1 Jun 2026 00:00:00 +0000",
            ),
            last_attempt: Some(1_795_460_000),
            will_retry_until: None,
            explanation: "The receiving server mx1.example.net presented an expired TLS \
                          certificate, and a rule for example.net requires a verified one. \
                          The administrators of example.net must renew the certificate of \
                          mx1.example.net.",
        }
    }

    fn failed_carol<'a>() -> RecipientStatus<'a> {
        RecipientStatus {
            final_recipient: "carol@example.net",
            original_recipient: None,
            action: Action::Failed,
            status: "5.1.1",
            remote_mta: Some("mx2.example.net"),
            diagnostic_code: Some("550 5.1.1 <carol@example.net>: user unknown"),
            last_attempt: Some(1_795_460_100),
            will_retry_until: None,
            explanation: "The receiving server mx2.example.net says this mailbox does not \
                          exist. Check the address for typing mistakes.",
        }
    }

    #[test]
    fn only_real_replies_are_labelled_smtp() {
        let mut r = failed_carol();
        r.diagnostic_code = Some("127.0.0.32 did not offer STARTTLS");
        let out = String::from_utf8(build_dsn(&input(vec![r])).unwrap()).unwrap();
        assert!(
            out.contains("Diagnostic-Code: X-Moat; 127.0.0.32 did not offer STARTTLS"),
            "{out}"
        );
        let out = String::from_utf8(build_dsn(&input(vec![failed_carol()])).unwrap()).unwrap();
        assert!(out.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{out}");
    }

    fn input<'a>(recipients: Vec<RecipientStatus<'a>>) -> DsnInput<'a> {
        DsnInput {
            reporting_mta: "mail.example.org",
            original_envelope_id: Some("QQ314159"),
            arrival_date: 1_795_381_616,
            now: 1_795_468_016,
            sender: "alice@example.org",
            recipients,
            original_message: ORIGINAL,
            return_full: false,
            kind: DsnKind::Failure,
        }
    }

    /// A parsed notification: top-level header, boundary, and (header, body) of each part.
    struct Parsed {
        header: String,
        boundary: String,
        parts: Vec<(String, String)>,
    }

    impl Parsed {
        fn part_type(&self, i: usize) -> String {
            field(&self.parts[i].0, "Content-Type").unwrap_or_default()
        }
    }

    /// Unfolded value of the first field `name` in a header block.
    fn field(block: &str, name: &str) -> Option<String> {
        fields(block, name).into_iter().next()
    }

    fn fields(block: &str, name: &str) -> Vec<String> {
        let unfolded = block.replace("\r\n ", " ").replace("\r\n\t", " ");
        let prefix = format!("{}:", name.to_ascii_lowercase());
        unfolded
            .split("\r\n")
            .filter(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
            .collect()
    }

    fn parse(dsn: &[u8]) -> Parsed {
        let text = String::from_utf8_lossy(dsn).into_owned();
        // Every line ends in CRLF and stays within the RFC 5322 limit.
        assert!(text.ends_with("\r\n"));
        for (i, b) in dsn.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && dsn[i - 1] == b'\r', "bare LF at {i}");
            }
            if *b == b'\r' {
                assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in dsn.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line too long: {}", line.len());
        }
        let (header, body) = text.split_once("\r\n\r\n").expect("header/body separator");
        let header = format!("{header}\r\n");
        let ct = field(&header, "Content-Type").expect("Content-Type");
        let boundary = ct
            .split("boundary=\"")
            .nth(1)
            .and_then(|b| b.split('"').next())
            .expect("boundary parameter")
            .to_string();
        assert!(!boundary.is_empty() && boundary.len() <= 70);
        let delim = format!("\r\n--{boundary}");
        let body = format!("\r\n{body}");
        let mut chunks: Vec<&str> = body.split(&delim).collect();
        // Preamble first, then the parts, then the close delimiter's "--\r\n".
        assert_eq!(chunks.pop(), Some("--\r\n"), "close delimiter");
        let parts = chunks[1..]
            .iter()
            .map(|c| {
                let c = c.strip_prefix("\r\n").expect("CRLF after delimiter");
                let (h, b) = c.split_once("\r\n\r\n").expect("part header/body");
                (format!("{h}\r\n"), b.to_string())
            })
            .collect();
        Parsed {
            header,
            boundary,
            parts,
        }
    }

    /// Text with every run of whitespace (wrapping included) collapsed to one space.
    fn flat(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The blank-line-separated groups of a delivery-status body.
    fn groups(status_body: &str) -> Vec<String> {
        status_body
            .trim_end_matches("\r\n")
            .split("\r\n\r\n")
            .map(|g| format!("{g}\r\n"))
            .collect()
    }

    #[test]
    fn failure_structure() {
        let dsn = build_dsn(&input(vec![failed_bob(), failed_carol()])).expect("a DSN");
        let p = parse(&dsn);

        assert_eq!(
            field(&p.header, "From").as_deref(),
            Some("\"Mail Delivery System\" <MAILER-DAEMON@mail.example.org>")
        );
        assert_eq!(
            field(&p.header, "To").as_deref(),
            Some("<alice@example.org>")
        );
        assert_eq!(
            field(&p.header, "Subject").as_deref(),
            Some("Undelivered Mail Returned to Sender")
        );
        assert_eq!(
            field(&p.header, "Date").as_deref(),
            Some("Mon, 23 Nov 2026 21:06:56 +0000")
        );
        let mid = field(&p.header, "Message-ID").expect("Message-ID");
        assert!(mid.starts_with("<20261123210656.") && mid.ends_with("@mail.example.org>"));
        assert_eq!(
            field(&p.header, "Auto-Submitted").as_deref(),
            Some("auto-replied")
        );
        assert_eq!(field(&p.header, "MIME-Version").as_deref(), Some("1.0"));
        let ct = field(&p.header, "Content-Type").expect("Content-Type");
        assert!(ct.starts_with("multipart/report; report-type=delivery-status;"));

        assert_eq!(p.parts.len(), 3);
        assert_eq!(p.part_type(0), "text/plain; charset=utf-8");
        assert_eq!(p.part_type(1), "message/delivery-status");
        assert_eq!(p.part_type(2), "text/rfc822-headers");
        // All ASCII: every part and the whole message are 7bit.
        assert!(dsn.is_ascii());
        assert_eq!(
            field(&p.header, "Content-Transfer-Encoding").as_deref(),
            Some("7bit")
        );

        let human = &flat(&p.parts[0].1);
        assert!(human.contains("<bob@example.net>: delivery failed"));
        assert!(human.contains("<carol@example.net>: delivery failed"));
        assert!(human.contains("must renew the certificate"));
        assert!(human.contains("Status: 5.7.320"));
        assert!(human.contains("550 5.1.1 <carol@example.net>: user unknown"));

        let g = groups(&p.parts[1].1);
        assert_eq!(g.len(), 3, "per-message group + two recipients: {g:?}");
        assert_eq!(
            field(&g[0], "Reporting-MTA").as_deref(),
            Some("dns; mail.example.org")
        );
        assert_eq!(
            field(&g[0], "Original-Envelope-Id").as_deref(),
            Some("QQ314159")
        );
        assert_eq!(
            field(&g[0], "Arrival-Date").as_deref(),
            Some("Sun, 22 Nov 2026 21:06:56 +0000")
        );
        assert!(field(&g[0], "Final-Recipient").is_none());

        let bob = &g[1];
        assert_eq!(
            field(bob, "Original-Recipient").as_deref(),
            Some("rfc822; bob@example.net")
        );
        assert_eq!(
            field(bob, "Final-Recipient").as_deref(),
            Some("rfc822; bob@example.net")
        );
        assert_eq!(field(bob, "Action").as_deref(), Some("failed"));
        assert_eq!(field(bob, "Status").as_deref(), Some("5.7.320"));
        assert_eq!(
            field(bob, "Remote-MTA").as_deref(),
            Some("dns; mx1.example.net")
        );
        assert!(
            field(bob, "Diagnostic-Code")
                .expect("diagnostic")
                .starts_with("X-Moat; certificate for mx1.example.net expired")
        );
        assert!(field(bob, "Last-Attempt-Date").is_some());
        assert!(field(bob, "Will-Retry-Until").is_none());

        let carol = &g[2];
        assert!(field(carol, "Original-Recipient").is_none());
        assert_eq!(
            field(carol, "Final-Recipient").as_deref(),
            Some("rfc822; carol@example.net")
        );
        assert_eq!(
            field(carol, "Remote-MTA").as_deref(),
            Some("dns; mx2.example.net")
        );
        assert_eq!(
            field(carol, "Diagnostic-Code").as_deref(),
            Some("smtp; 550 5.1.1 <carol@example.net>: user unknown")
        );

        // The boundary occurs only as delimiters.
        let text = String::from_utf8_lossy(&dsn);
        assert_eq!(text.matches(p.boundary.as_str()).count(), 1 + 3 + 1);
    }

    #[test]
    fn no_dsn_for_null_sender_or_no_recipients() {
        let mut i = input(vec![failed_bob()]);
        i.sender = "";
        assert!(build_dsn(&i).is_none());
        i.sender = "<>";
        assert!(build_dsn(&i).is_none());
        i.sender = "  ";
        assert!(build_dsn(&i).is_none());
        let mut i = input(vec![]);
        i.sender = "alice@example.org";
        assert!(build_dsn(&i).is_none());
    }

    #[test]
    fn header_injection_is_neutralised() {
        let mut bob = failed_bob();
        bob.final_recipient = "bob@example.net\r\nBcc: victim@example.com";
        bob.diagnostic_code =
            Some("smtp; 550 no\r\n\r\nFinal-Recipient: rfc822; forged@x\r\nX-Evil: 1\n--fake");
        bob.remote_mta = Some("dns; mx\rX-Evil: 2");
        bob.explanation = "line one\r\n\r\n--fake\r\nContent-Type: text/html";
        let mut i = input(vec![bob]);
        i.sender = "alice@example.org>\r\nBcc: victim@example.com";
        let dsn = build_dsn(&i).expect("a DSN");
        let p = parse(&dsn);
        let text = String::from_utf8_lossy(&dsn);
        for line in text.split("\r\n") {
            assert!(!line.starts_with("Bcc:"), "injected line: {line}");
            assert!(!line.starts_with("X-Evil:"), "injected line: {line}");
            assert!(!line.starts_with("--fake"), "injected line: {line}");
            assert!(!line.starts_with("Content-Type: text/html"), "{line}");
        }
        assert_eq!(p.parts.len(), 3);
        let g = groups(&p.parts[1].1);
        assert_eq!(g.len(), 2);
        assert_eq!(fields(&g[1], "Final-Recipient").len(), 1);
        assert_eq!(
            field(&g[1], "Final-Recipient").as_deref(),
            Some("rfc822; bob@example.net??Bcc: victim@example.com")
        );
        assert_eq!(
            field(&p.header, "To").as_deref(),
            Some("<alice@example.org???Bcc: victim@example.com>")
        );
    }

    #[test]
    fn headers_only_or_full_message() {
        let dsn = build_dsn(&input(vec![failed_bob()])).expect("a DSN");
        let p = parse(&dsn);
        assert_eq!(p.part_type(2), "text/rfc822-headers");
        let returned = &p.parts[2].1;
        assert!(returned.starts_with("From: Alice <alice@example.org>\r\n"));
        assert!(returned.contains("Subject: Quarterly figures\r\n"));
        assert!(!returned.contains("the body text"));
        assert!(flat(&p.parts[0].1).contains("Its header is attached."));

        let mut i = input(vec![failed_bob()]);
        i.return_full = true;
        let p = parse(&build_dsn(&i).expect("a DSN"));
        assert_eq!(p.part_type(2), "message/rfc822");
        let returned = &p.parts[2].1;
        assert_eq!(returned.as_bytes(), ORIGINAL);
        assert!(flat(&p.parts[0].1).contains("A copy of it is attached."));

        // Too large for RET=FULL: headers only, and the human part says why.
        let mut big = ORIGINAL.to_vec();
        for _ in 0..(MAX_RETURNED_MESSAGE / 48 + 1) {
            big.extend_from_slice(b"0123456789012345678901234567890123456789012345\r\n");
        }
        let mut i = input(vec![failed_bob()]);
        i.return_full = true;
        i.original_message = &big;
        let dsn = build_dsn(&i).expect("a DSN");
        assert!(dsn.len() < 10_000);
        let p = parse(&dsn);
        assert_eq!(p.part_type(2), "text/rfc822-headers");
        assert!(flat(&p.parts[0].1).contains("too large"));
    }

    #[test]
    fn returned_message_line_endings_are_normalised() {
        let mut i = input(vec![failed_bob()]);
        i.return_full = true;
        i.original_message = b"Subject: bare\nFrom: a@b\n\nbody\rmore\n";
        let p = parse(&build_dsn(&i).expect("a DSN"));
        assert_eq!(p.part_type(2), "message/rfc822");
        assert_eq!(
            p.parts[2].1,
            "Subject: bare\r\nFrom: a@b\r\n\r\nbody\r\nmore\r\n"
        );
    }

    #[test]
    fn unreturnable_body_falls_back_to_headers() {
        let long = format!("Subject: long\r\n\r\n{}\r\n", "y".repeat(1500));
        let nul = b"Subject: nul\r\n\r\na\0b\r\n".to_vec();
        for msg in [long.as_bytes(), &nul] {
            let mut i = input(vec![failed_bob()]);
            i.return_full = true;
            i.original_message = msg;
            let p = parse(&build_dsn(&i).expect("a DSN"));
            assert_eq!(p.part_type(2), "text/rfc822-headers");
            assert!(p.parts[2].1.starts_with("Subject: "));
            assert!(flat(&p.parts[0].1).contains("cannot be returned intact"));
        }
        // No blank line: the whole message is its header.
        let mut i = input(vec![failed_bob()]);
        i.original_message = b"Subject: only a header\r\nFrom: a@b";
        let p = parse(&build_dsn(&i).expect("a DSN"));
        assert_eq!(p.parts[2].1, "Subject: only a header\r\nFrom: a@b\r\n");
    }

    #[test]
    fn delay_versus_failure() {
        let rcpt = RecipientStatus {
            final_recipient: "bob@example.net",
            original_recipient: None,
            action: Action::Delayed,
            status: "4.4.317",
            remote_mta: Some("dns; mx1.example.net"),
            diagnostic_code: Some("X-Moat; STARTTLS not offered by mx1.example.net"),
            last_attempt: Some(1_795_460_000),
            will_retry_until: Some(1_795_468_016 + 86_400),
            explanation: "mx1.example.net does not offer STARTTLS, and a rule requires TLS \
                          for example.net. Its administrators must enable STARTTLS.",
        };
        let mut i = input(vec![rcpt]);
        i.kind = DsnKind::Delay;
        let raw = build_dsn(&i).expect("a DSN");
        // The returned part is labelled by report kind, not always "Undelivered".
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.contains("Content-Description: Delayed Message Headers\r\n"),
            "{text}"
        );
        assert!(!text.contains("Undelivered"), "{text}");
        let mut ok = i.clone();
        ok.kind = DsnKind::Success;
        let text = String::from_utf8_lossy(&build_dsn(&ok).expect("a DSN")).into_owned();
        assert!(
            text.contains("Content-Description: Delivered Message Headers\r\n"),
            "{text}"
        );
        let failed =
            String::from_utf8_lossy(&build_dsn(&input(vec![failed_bob()])).expect("a DSN"))
                .into_owned();
        assert!(failed.contains("Content-Description: Undelivered Message Headers\r\n"));
        let p = parse(&raw);
        assert_eq!(
            field(&p.header, "Subject").as_deref(),
            Some("Delayed Mail (still being retried)")
        );
        let g = groups(&p.parts[1].1);
        assert_eq!(field(&g[1], "Action").as_deref(), Some("delayed"));
        assert_eq!(field(&g[1], "Status").as_deref(), Some("4.4.317"));
        assert_eq!(
            field(&g[1], "Will-Retry-Until").as_deref(),
            Some("Tue, 24 Nov 2026 21:06:56 +0000")
        );
        assert!(flat(&p.parts[0].1).contains("still trying"));
        assert!(
            p.parts[0]
                .1
                .contains("Will keep trying until: Tue, 24 Nov 2026")
        );

        // A failed recipient never carries Will-Retry-Until, even if given one.
        let mut bob = failed_bob();
        bob.will_retry_until = Some(1);
        let p = parse(&build_dsn(&input(vec![bob])).expect("a DSN"));
        let g = groups(&p.parts[1].1);
        assert_eq!(field(&g[1], "Action").as_deref(), Some("failed"));
        assert!(field(&g[1], "Will-Retry-Until").is_none());
        assert!(!flat(&p.parts[0].1).contains("still trying"));
    }

    #[test]
    fn long_diagnostic_is_folded() {
        let words: Vec<String> = (0..400).map(|n| format!("word{n}")).collect();
        let long = format!("smtp; 550 5.7.1 {}", words.join(" "));
        let mut bob = failed_bob();
        bob.diagnostic_code = Some(&long);
        let mut carol = failed_carol();
        let run = format!("X-Moat; {}", "x".repeat(2500));
        carol.diagnostic_code = Some(&run);
        let dsn = build_dsn(&input(vec![bob, carol])).expect("a DSN");
        let p = parse(&dsn); // checks every line <= 998
        let status = &p.parts[1].1;
        // Folded at whitespace within the soft limit; unfolding restores the value exactly.
        for line in status.split("\r\n") {
            if !line.contains("xxxx") {
                assert!(line.len() <= SOFT_WIDTH, "{}: {line}", line.len());
            }
        }
        let g = groups(status);
        assert_eq!(
            field(&g[1], "Diagnostic-Code").as_deref(),
            Some(long.as_str())
        );
        // A run without whitespace is hard-split under the 998 limit, content kept.
        let d = field(&g[2], "Diagnostic-Code").expect("diagnostic");
        assert_eq!(d.replace(' ', ""), run.replace(' ', ""));
        assert!(status.lines().count() > 5);
        // The human part wraps too.
        for line in p.parts[0].1.split("\r\n") {
            assert!(line.len() <= HARD_WIDTH);
        }
    }

    #[test]
    fn boundary_avoids_content() {
        let seed = 0x1234;
        let b0 = format!("moat-dsn-{seed:016x}-0");
        let b1 = format!("moat-dsn-{seed:016x}-1");
        assert_eq!(choose_boundary(seed, &[b"nothing"]), b0);
        let content = format!("--{b0}\r\n");
        assert_eq!(choose_boundary(seed, &[b"x", content.as_bytes()]), b1);
    }

    #[test]
    fn message_id_is_deterministic_and_distinct() {
        let a = build_dsn(&input(vec![failed_bob()])).expect("a DSN");
        let b = build_dsn(&input(vec![failed_bob()])).expect("a DSN");
        assert_eq!(a, b, "pure: same input, same bytes");
        let mut i = input(vec![failed_bob()]);
        i.now += 1;
        let c = build_dsn(&i).expect("a DSN");
        let d = build_dsn(&input(vec![failed_carol()])).expect("a DSN");
        let id = |m: &[u8]| field(&parse(m).header, "Message-ID").expect("Message-ID");
        assert_ne!(id(&a), id(&c));
        assert_ne!(id(&a), id(&d));
    }

    #[test]
    fn invalid_status_is_replaced() {
        let mut bob = failed_bob();
        bob.status = "550 oops";
        let p = parse(&build_dsn(&input(vec![bob])).expect("a DSN"));
        assert_eq!(
            field(&groups(&p.parts[1].1)[1], "Status").as_deref(),
            Some("5.0.0")
        );
        assert!(valid_status("4.7.321") && valid_status("2.0.0"));
        assert!(!valid_status("3.0.0") && !valid_status("5.1") && !valid_status("5.1.1.1"));
    }

    #[test]
    fn non_ascii_address_makes_a_global_report() {
        let mut bob = failed_bob();
        bob.final_recipient = "用户@example.net";
        bob.original_recipient = Some("rfc822;用户@example.net");
        bob.diagnostic_code = Some("smtp; 550 5.1.1 用户不存在");
        let mut i = input(vec![bob]);
        i.original_message = "Subject: Grüße\r\nFrom: a@b\r\n\r\nbody\r\n".as_bytes();
        let dsn = build_dsn(&i).expect("a DSN");
        let p = parse(&dsn);
        let ct = field(&p.header, "Content-Type").expect("Content-Type");
        assert!(ct.contains("report-type=global-delivery-status;"));
        assert_eq!(
            field(&p.header, "Content-Transfer-Encoding").as_deref(),
            Some("8bit")
        );
        assert_eq!(p.part_type(1), "message/global-delivery-status");
        assert_eq!(p.part_type(2), "message/global-headers");
        assert_eq!(
            field(&p.parts[1].0, "Content-Transfer-Encoding").as_deref(),
            Some("8bit")
        );
        let g = groups(&p.parts[1].1);
        assert_eq!(
            field(&g[1], "Final-Recipient").as_deref(),
            Some("utf-8; 用户@example.net")
        );
        assert_eq!(
            field(&g[1], "Original-Recipient").as_deref(),
            Some("utf-8; 用户@example.net")
        );
        assert!(p.parts[2].1.contains("Subject: Grüße\r\n"));
        assert!(std::str::from_utf8(&dsn).is_ok());

        // Full return of a global message is message/global.
        i.return_full = true;
        let p = parse(&build_dsn(&i).expect("a DSN"));
        assert_eq!(p.part_type(2), "message/global");
    }

    #[test]
    fn eight_bit_body_is_labelled() {
        let mut i = input(vec![failed_bob()]);
        i.return_full = true;
        i.original_message = "Subject: hi\r\n\r\ncafé\r\n".as_bytes();
        let p = parse(&build_dsn(&i).expect("a DSN"));
        assert_eq!(p.part_type(1), "message/delivery-status");
        assert_eq!(p.part_type(2), "message/rfc822");
        assert_eq!(
            field(&p.parts[2].0, "Content-Transfer-Encoding").as_deref(),
            Some("8bit")
        );
        assert_eq!(
            field(&p.header, "Content-Transfer-Encoding").as_deref(),
            Some("8bit")
        );
    }

    /// Prints a complete example; run with `--nocapture` to see it.
    #[test]
    fn example_output() {
        let mut i = input(vec![failed_bob(), failed_carol()]);
        i.return_full = true;
        let dsn = build_dsn(&i).expect("a DSN");
        println!("{}", String::from_utf8_lossy(&dsn));
        parse(&dsn);
    }
}
