//! `moat probe`: does this SMTP server offer TLS, and does its certificate verify?
//!
//! One session, reported step by step the way an administrator would check by hand with
//! `openssl s_client -starttls smtp`: connect (each resolved address in turn until one
//! answers), banner, EHLO (HELO if EHLO is refused), STARTTLS, the handshake, EHLO again inside
//! TLS, QUIT. With implicit TLS (RFC 8314, port 465) the handshake comes first.
//!
//! The handshake is made by the delivery code's own [`Connector`] at level `may`, so it
//! completes whatever the certificate and the probe reports what delivery would conclude
//! ([`Verification`], [`CertFailure`]). The name is also checked on its own (webpki), so an
//! untrusted chain that is also issued to the wrong name shows both problems. Revocation is
//! not checked (neither CRLs nor OCSP are fetched), as in delivery.
//!
//! Bytes the server sends after its `220` to STARTTLS, in the same read, are reported and
//! discarded, never processed (CVE-2021-38371). Each step has a time limit; the probe as a whole
//! stops after [`TOTAL_STEPS`] times that. Nothing a server sends can panic the probe: replies are
//! bounded in size, and text is shown with control characters escaped.
//!
//! The result is a [`ProbeReport`], serialisable for `--json` and rendered for people by
//! [`ProbeReport::render`]. It passes only when TLS was established, the chain leads to a
//! trusted root and the certificate is valid for the expected name (when there is one).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::outbound::tls::{
    CertFailure, Connector, TlsFailure, TlsLevel, TlsRequirement, UntrustedChain, Verification,
};
use crate::smtp::client::{Reply, escape_bytes, escape_text, take_reply};
use crate::util::{compact_utc, rfc5322_date, unix_now};

/// SMTP with STARTTLS.
pub const SMTP_PORT: u16 = 25;
/// Implicit TLS (submissions, RFC 8314).
pub const SMTPS_PORT: u16 = 465;
/// The default limit for each step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole probe may take this many step limits.
pub const TOTAL_STEPS: u32 = 4;
/// A certificate expiring within this many days is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 21;
/// The EHLO name when the local host name is not a fully qualified domain name.
pub const FALLBACK_HELO: &str = "moat-probe.invalid";

/// At most this much of the bytes sent after the STARTTLS `220` is shown.
const INJECTION_PREVIEW: usize = 120;
/// The most a QUIT may take.
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// A host name, or an IP address without brackets.
    pub host: String,
    pub port: u16,
    /// TLS from the first byte instead of STARTTLS.
    pub implicit_tls: bool,
    /// The name the certificate must be valid for; default `host` when it is a name.
    pub name: Option<String>,
    /// The name sent with EHLO/HELO.
    pub helo: String,
    /// The limit for each step (resolving, connecting, each reply, the handshake).
    pub step_timeout: Duration,
    /// CA certificates trusted in addition to the system roots.
    pub extra_roots: Option<RootCertStore>,
    /// DANE (RFC 7672): look up the host's TLSA records through this validating resolver
    /// and judge the presented chain by them.
    pub dane: Option<crate::dns::Validator>,
}

impl ProbeOptions {
    /// Options for `HOST[:PORT]`: the port defaults to 25, or 465 with `implicit_tls`; the
    /// other fields get their defaults.
    pub fn new(target: &str, implicit_tls: bool) -> Result<ProbeOptions, String> {
        let (host, port) = parse_target(target)?;
        Ok(ProbeOptions {
            host,
            port: port.unwrap_or(if implicit_tls { SMTPS_PORT } else { SMTP_PORT }),
            implicit_tls,
            name: None,
            helo: default_helo(),
            step_timeout: DEFAULT_STEP_TIMEOUT,
            extra_roots: None,
            dane: None,
        })
    }

    fn host_ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The name the certificate is checked against; `None` for an IP address without `name`.
    pub fn expected_name(&self) -> Option<String> {
        match (&self.name, self.host_ip()) {
            (Some(n), _) => Some(normalize_name(n)),
            (None, None) => Some(normalize_name(&self.host)),
            (None, Some(_)) => None,
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn target(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `HOST`, `HOST:PORT`, `[IPv6]:PORT` or a bare IPv6 address into host and port.
pub fn parse_target(target: &str) -> Result<(String, Option<u16>), String> {
    let t = target.trim();
    let bad = |why: &str| {
        format!("{target:?}: {why}; expected HOST, HOST:PORT, an IP address or [IPv6]:PORT")
    };
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address inside the brackets"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
        };
        (inside, port)
    } else if t.matches(':').count() > 1 {
        if t.parse::<Ipv6Addr>().is_err() {
            return Err(bad(
                "not an IPv6 address (write [ADDRESS]:PORT to give a port)",
            ));
        }
        (t, None)
    } else {
        match t.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (t, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        ),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.parse::<IpAddr>().is_err()
        && !crate::smtp::address::valid_domain(host.trim_end_matches('.'), false)
    {
        return Err(bad("not a host name or IP address"));
    }
    Ok((host.to_string(), port))
}

/// The local host name when it is a fully qualified domain name, else [`FALLBACK_HELO`].
pub fn default_helo() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().trim_end_matches('.').to_ascii_lowercase())
        .find(|h| h.contains('.') && crate::smtp::address::valid_domain(h, false))
        .unwrap_or_else(|| FALLBACK_HELO.to_string())
}

/// Lowercase, without a trailing dot.
fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// PASS or FAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// What a finding is about, stable for scripts (`--json`). The first group are failures, the
/// second warnings; a failure kind is a warning when it did not stop the probe (one of several
/// addresses refusing the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    // Failures.
    DnsFailure,
    ConnectionRefused,
    Timeout,
    ConnectError,
    Banner,
    Hello,
    StarttlsNotOffered,
    StarttlsRefused,
    /// Bytes after the STARTTLS `220` (CVE-2021-38371).
    Injection,
    Handshake,
    Expired,
    NotYetValid,
    UntrustedIssuer,
    NameMismatch,
    Revoked,
    /// Any other certificate problem.
    Certificate,
    Protocol,
    Closed,
    /// DANE: the TLSA records were not met, or could not be looked up on a signed path.
    Dane,
    // Warnings.
    ExpiresSoon,
    NoTls13,
    NoPipelining,
    AuthInPlaintext,
    NameNotChecked,
}

/// What `--dane` found (RFC 7672 §2.2, §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaneReport {
    /// `_<port>._tcp.<name>`.
    pub query: String,
    /// DNSSEC state of the host's address records: `secure`, `insecure` or the failure.
    pub addresses: String,
    /// DNSSEC state of the TLSA answer, in words.
    pub tlsa: String,
    /// The name the records were found for, after CNAMEs.
    pub base: Option<String>,
    pub records: Vec<DaneRecordReport>,
    /// The judgement: `verified: …`, the failure, or why DANE does not apply.
    pub result: String,
    /// DANE decided the verdict (usable records on a secure path).
    pub applies: bool,
}

/// One TLSA record and how it compares with what the server presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaneRecordReport {
    pub record: String,
    /// Why SMTP cannot use it; `None` when usable.
    pub unusable: Option<String>,
    /// Whether it matches a presented certificate (the server's own for `3 x x`, any on the
    /// chain for `2 x x`).
    pub matches: bool,
}

/// One failure or warning, with its cause in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub message: String,
}

impl Finding {
    fn new(kind: Kind, message: impl Into<String>) -> Finding {
        Finding {
            kind,
            message: message.into(),
        }
    }
}

/// One server reply, its text escaped for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplyReport {
    pub code: u16,
    pub lines: Vec<String>,
}

impl ReplyReport {
    fn of(r: &Reply) -> ReplyReport {
        ReplyReport {
            code: r.code,
            lines: r.lines.clone(),
        }
    }

    /// `220 mx.example.com ESMTP` (lines joined by spaces).
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
    }
}

/// One TCP connection attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectAttempt {
    pub address: String,
    /// `ok`, `refused`, `timeout` or `error`.
    pub result: &'static str,
    pub ms: u64,
    pub error: Option<String>,
}

/// One certificate as the server presented it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertReport {
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    /// Whole days until `not_after`, negative once expired (-3: expired 3 to 4 days ago).
    pub days_left: i64,
    pub expired: bool,
    pub not_yet_valid: bool,
    /// e.g. `EC P-256`, `RSA 2048`, `Ed25519`.
    pub key: Option<String>,
    pub self_signed: bool,
    #[serde(skip)]
    not_after_unix: i64,
}

/// What the certificate proved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The delivery code's word: `verified`, `trusted` (chain good, name not) or `untrusted`.
    pub result: String,
    /// The chain leads to a trusted root and every certificate is within its dates.
    pub chain_trusted: bool,
    /// Why the chain does not verify.
    pub chain_problem: Option<String>,
    /// The name checked; `None` when the host is an IP address and no `--name` was given.
    pub name: Option<String>,
    /// Whether the certificate is valid for `name` (checked even when the chain is not).
    pub name_matches: Option<bool>,
}

/// The negotiated session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsReport {
    pub version: String,
    /// IANA name.
    pub cipher: String,
    pub bits: u16,
    pub key_exchange: Option<String>,
    /// The name sent as SNI (none for an IP address).
    pub sni: Option<String>,
    pub handshake_ms: u64,
    /// End-entity certificate first, then whatever else the server sent, in its order.
    pub chain: Vec<CertReport>,
    pub verification: VerifyReport,
}

/// Everything one probe found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// `host:port` as probed.
    pub target: String,
    pub host: String,
    pub port: u16,
    pub implicit_tls: bool,
    /// The name the certificate was checked against.
    pub expected_name: Option<String>,
    pub helo_name: String,
    /// Resolved addresses, in the order tried.
    pub addresses: Vec<String>,
    pub connect: Vec<ConnectAttempt>,
    /// The address of the session.
    pub address: Option<String>,
    pub banner: Option<ReplyReport>,
    /// EHLO before TLS (absent with implicit TLS).
    pub ehlo: Option<ReplyReport>,
    /// HELO, when EHLO was refused.
    pub helo: Option<ReplyReport>,
    /// Extensions before TLS, one per EHLO line (`SIZE 10240000`).
    pub capabilities: Vec<String>,
    pub starttls: Option<ReplyReport>,
    /// What the server sent after its STARTTLS `220` (escaped), if anything.
    pub after_starttls: Option<String>,
    pub tls: Option<TlsReport>,
    /// Why the handshake failed, in the delivery code's words.
    pub tls_error: Option<String>,
    pub ehlo_tls: Option<ReplyReport>,
    pub capabilities_tls: Vec<String>,
    pub quit: Option<ReplyReport>,
    /// With `--dane`: the TLSA lookup and how each record compares with the chain.
    pub dane: Option<DaneReport>,
    /// `C: ...` / `S: ...` lines and `-- ... --` markers.
    pub transcript: Vec<String>,
    pub notes: Vec<String>,
    pub warnings: Vec<Finding>,
    pub failures: Vec<Finding>,
    pub verdict: Verdict,
    pub elapsed_ms: u64,
}

impl ProbeReport {
    fn new(opts: &ProbeOptions) -> ProbeReport {
        ProbeReport {
            target: opts.target(),
            host: opts.host.clone(),
            port: opts.port,
            implicit_tls: opts.implicit_tls,
            expected_name: opts.expected_name(),
            helo_name: opts.helo.clone(),
            addresses: Vec::new(),
            connect: Vec::new(),
            address: None,
            banner: None,
            ehlo: None,
            helo: None,
            capabilities: Vec::new(),
            starttls: None,
            after_starttls: None,
            tls: None,
            tls_error: None,
            ehlo_tls: None,
            capabilities_tls: Vec::new(),
            quit: None,
            dane: None,
            transcript: Vec::new(),
            notes: Vec::new(),
            warnings: Vec::new(),
            failures: Vec::new(),
            verdict: Verdict::Fail,
            elapsed_ms: 0,
        }
    }

    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    fn fail(&mut self, kind: Kind, message: impl Into<String>) {
        self.failures.push(Finding::new(kind, message));
    }

    fn warn(&mut self, kind: Kind, message: impl Into<String>) {
        self.warnings.push(Finding::new(kind, message));
    }

    fn received(&mut self, r: &Reply) {
        let n = r.lines.len();
        for (i, line) in r.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.transcript.push(format!("S: {}{sep}{line}", r.code));
        }
    }

    /// Decides the verdict once every step has run.
    fn finish(&mut self, started: Instant) {
        if self.failures.is_empty() && self.tls.is_none() {
            self.fail(Kind::Protocol, "TLS was not established");
        }
        self.verdict = if self.failures.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        self.elapsed_ms = millis(started.elapsed());
    }

    /// The report for people: a transcript, labelled results, then WARN lines and the verdict.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mode = if self.implicit_tls {
            ", implicit TLS"
        } else {
            ""
        };
        let _ = match (&self.address, self.host_ip()) {
            (Some(a), None) => writeln!(o, "Probing {} ({a}){mode}", self.target),
            _ => writeln!(o, "Probing {}{mode}", self.target),
        };
        for line in &self.transcript {
            let _ = writeln!(o, "  {line}");
        }
        if !self.transcript.is_empty() {
            o.push('\n');
        }
        let mut field = |label: &str, value: &str| {
            let _ = writeln!(o, "  {label:<11} {value}");
        };
        if !self.addresses.is_empty() && self.host_ip().is_none() {
            field("resolve", &self.addresses.join(", "));
        }
        for a in &self.connect {
            let detail = match &a.error {
                Some(e) => format!("{} ({} ms): {e}", a.result, a.ms),
                None => format!("{} ({} ms)", a.result, a.ms),
            };
            field("connect", &format!("{} {detail}", a.address));
        }
        if self.implicit_tls {
            self.render_tls(&mut field);
        }
        if let Some(b) = &self.banner {
            field("banner", &b.one_line());
        }
        if let Some(e) = &self.ehlo {
            field("ehlo", &caps_or_reply(e, &self.capabilities));
        }
        if let Some(h) = &self.helo {
            field("helo", &h.one_line());
        }
        if let Some(s) = &self.starttls {
            field("starttls", &s.one_line());
        }
        if let Some(a) = &self.after_starttls {
            field("injected", a);
        }
        if !self.implicit_tls {
            self.render_tls(&mut field);
        }
        if let Some(e) = &self.ehlo_tls {
            field("ehlo (tls)", &caps_or_reply(e, &self.capabilities_tls));
        }
        if let Some(d) = &self.dane {
            field("dane", &format!("TLSA {}: {}", d.query, d.tlsa));
            if let Some(b) = d.base.as_ref().filter(|b| !d.query.ends_with(b.as_str())) {
                field("dane", &format!("found for {b} (through a CNAME)"));
            }
            field("dane", &format!("address records: {}", d.addresses));
            for r in &d.records {
                let how = match (&r.unusable, r.matches) {
                    (Some(u), _) => format!("unusable: {u}"),
                    (None, true) => "matches the presented chain".into(),
                    (None, false) => "matches nothing presented".into(),
                };
                field("tlsa", &format!("{} ({how})", r.record));
            }
            field("dane", &d.result);
        }
        for n in &self.notes {
            field("note", n);
        }
        for w in &self.warnings {
            let _ = writeln!(o, "WARN  {}", w.message);
        }
        if self.passed() {
            let how = if self.implicit_tls {
                "implicit TLS"
            } else {
                "STARTTLS"
            };
            let cert = match (&self.dane, &self.expected_name) {
                (Some(d), _) if d.applies => {
                    "a certificate its DANE TLSA records authenticate".into()
                }
                (_, Some(n)) => format!("a certificate valid for {n}"),
                (_, None) => "a certificate from a trusted CA (name not checked)".into(),
            };
            let _ = writeln!(o, "PASS  {} offers {how} with {cert}", self.target);
        } else {
            for f in &self.failures {
                let _ = writeln!(o, "FAIL  {}", f.message);
            }
        }
        o
    }

    fn render_tls(&self, field: &mut impl FnMut(&str, &str)) {
        if let Some(e) = &self.tls_error {
            field("tls", &format!("failed: {e}"));
        }
        let Some(t) = &self.tls else {
            return;
        };
        let kx = t
            .key_exchange
            .as_deref()
            .unwrap_or("(unknown key exchange)");
        field(
            "tls",
            &format!(
                "{} {} ({} bits) {kx}, {} ms",
                t.version, t.cipher, t.bits, t.handshake_ms
            ),
        );
        for (i, c) in t.chain.iter().enumerate() {
            let label = if i == 0 {
                "certificate".to_string()
            } else {
                format!("chain #{i}")
            };
            field(&label, &cert_line(c));
        }
        field(
            "verify",
            &verify_line(&t.verification, self.host_ip().is_some()),
        );
    }

    fn host_ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// The extensions, or the whole reply when it was not a 250.
fn caps_or_reply(reply: &ReplyReport, caps: &[String]) -> String {
    if reply.code != 250 {
        return reply.one_line();
    }
    if caps.is_empty() {
        "(no extensions)".into()
    } else {
        caps.join(", ")
    }
}

/// `CN=mx.example.com  SAN mx.example.com  issuer CN=R3  valid 2026-10-01 .. 2026-12-30 (37 days left)  EC P-256`
fn cert_line(c: &CertReport) -> String {
    let mut s = if c.subject.is_empty() {
        "(empty subject)".to_string()
    } else {
        c.subject.clone()
    };
    let sans: Vec<&str> = c
        .dns_names
        .iter()
        .chain(&c.ip_addresses)
        .map(String::as_str)
        .collect();
    if !sans.is_empty() {
        let _ = write!(s, "  SAN {}", sans.join(" "));
    }
    if c.self_signed {
        s.push_str("  self-signed");
    } else {
        let _ = write!(s, "  issuer {}", c.issuer);
    }
    let date = |d: &str| d.get(..10).unwrap_or(d).to_string();
    let left = match c.days_left {
        _ if c.not_yet_valid => "not yet valid".to_string(),
        0 if c.expired => "expired less than a day ago".to_string(),
        d if c.expired => format!("expired {} ago", days_words(-d)),
        d => format!("{} left", days_words(d)),
    };
    let _ = write!(
        s,
        "  valid {} .. {} ({left})",
        date(&c.not_before),
        date(&c.not_after)
    );
    if let Some(k) = &c.key {
        let _ = write!(s, "  {k}");
    }
    s
}

fn days_words(d: i64) -> String {
    if d == 1 {
        "1 day".into()
    } else {
        format!("{d} days")
    }
}

fn verify_line(v: &VerifyReport, ip_host: bool) -> String {
    let mut problems = Vec::new();
    if let Some(p) = &v.chain_problem {
        problems.push(p.clone());
    }
    match (&v.name, v.name_matches) {
        (Some(n), Some(false)) => problems.push(format!("not valid for {n}")),
        (Some(n), _) if !problems.is_empty() => problems.push(format!("name {n} matches")),
        _ => {}
    }
    if !problems.is_empty() {
        return format!("FAILED: {}", problems.join("; "));
    }
    match &v.name {
        Some(n) => format!("ok for {n} (chain to a trusted root, name matches)"),
        None if ip_host => {
            "chain ok; name not checked (the host is an IP address: give --name)".into()
        }
        None => "chain ok; name not checked".into(),
    }
}

/// Runs the probe; every outcome, failures included, is in the report.
pub async fn probe(opts: &ProbeOptions) -> ProbeReport {
    let started = Instant::now();
    let clock = Clock {
        step: opts.step_timeout,
        deadline: started + opts.step_timeout * TOTAL_STEPS,
    };
    let mut report = ProbeReport::new(opts);
    run(opts, &clock, &mut report).await;
    session_warnings(&mut report);
    report.finish(started);
    report
}

/// Step limits within the total limit.
struct Clock {
    step: Duration,
    deadline: Instant,
}

impl Clock {
    fn limit(&self) -> Duration {
        self.step
            .min(self.deadline.saturating_duration_since(Instant::now()))
    }

    /// Words for a step that ran out of time.
    fn timed_out(&self) -> String {
        if Instant::now() + Duration::from_millis(50) >= self.deadline {
            format!(
                "the probe's total limit of {} s ran out",
                (self.step * TOTAL_STEPS).as_secs()
            )
        } else {
            format!("no answer within {} s", self.step.as_secs())
        }
    }
}

async fn run(opts: &ProbeOptions, clock: &Clock, r: &mut ProbeReport) {
    let Some(addrs) = resolve(opts, clock, r).await else {
        return;
    };
    let Some(tcp) = connect(opts, &addrs, clock, r).await else {
        return;
    };
    let connector = Connector::new(true, opts.extra_roots.clone());
    if opts.implicit_tls {
        let Some(tls) = handshake(&connector, tcp, opts, clock, r).await else {
            return;
        };
        let mut conn = Conn::new(tls);
        if greet(&mut conn, clock, r).await
            && let Some(caps) = hello(&mut conn, opts, clock, r, true).await
        {
            r.capabilities_tls = caps;
        }
        conn.quit(clock, r).await;
    } else {
        let mut conn = Conn::new(tcp);
        let offered = greet(&mut conn, clock, r).await
            && match hello(&mut conn, opts, clock, r, false).await {
                Some(caps) => {
                    r.capabilities = caps;
                    if !has_cap(&r.capabilities, "STARTTLS") {
                        r.fail(
                            Kind::StarttlsNotOffered,
                            "STARTTLS not offered: TLS is not enabled on this MTA (its EHLO reply does not list STARTTLS)",
                        );
                    }
                    has_cap(&r.capabilities, "STARTTLS")
                }
                None => false,
            };
        if !offered || !starttls(&mut conn, clock, r).await {
            conn.quit(clock, r).await;
            return;
        }
        // CVE-2021-38371: whatever followed the 220 was reported and is never processed.
        let Conn { stream: tcp, .. } = conn;
        let Some(tls) = handshake(&connector, tcp, opts, clock, r).await else {
            return;
        };
        let mut conn = Conn::new(tls);
        if let Some(caps) = hello(&mut conn, opts, clock, r, true).await {
            r.capabilities_tls = caps;
        }
        conn.quit(clock, r).await;
    }
}

/// Warnings and notes about the extensions the server offered.
fn session_warnings(r: &mut ProbeReport) {
    let plain_auth = auth_line(&r.capabilities);
    let tls_auth = auth_line(&r.capabilities_tls);
    if let Some(a) = &plain_auth {
        r.warn(
            Kind::AuthInPlaintext,
            format!("{a} is offered before STARTTLS: clients may send passwords in the clear"),
        );
    } else if let Some(a) = tls_auth
        && !r.implicit_tls
    {
        r.notes.push(format!("{a} offered only inside TLS"));
    }
    let caps = if r.ehlo_tls.as_ref().is_some_and(|e| e.code == 250) {
        Some(&r.capabilities_tls)
    } else if r.ehlo.as_ref().is_some_and(|e| e.code == 250) {
        Some(&r.capabilities)
    } else {
        None
    };
    if let Some(caps) = caps
        && !has_cap(caps, "PIPELINING")
    {
        r.warn(
            Kind::NoPipelining,
            "no PIPELINING: every command costs the sender a round trip",
        );
    }
}

async fn resolve(
    opts: &ProbeOptions,
    clock: &Clock,
    r: &mut ProbeReport,
) -> Option<Vec<SocketAddr>> {
    if let Some(ip) = opts.host_ip() {
        let addr = SocketAddr::new(ip, opts.port);
        r.addresses.push(addr.to_string());
        return Some(vec![addr]);
    }
    let host = opts.host.as_str();
    // With DANE, the address comes from the validating resolver whose answers are judged
    // (`--nameserver`), not from the system's.
    if let Some(v) = &opts.dane {
        let ips = match tokio::time::timeout(clock.limit(), v.ips(host)).await {
            Ok(ips) => ips,
            Err(_) => {
                r.fail(
                    Kind::Timeout,
                    format!("timed out resolving {host}: {}", clock.timed_out()),
                );
                return None;
            }
        };
        if ips.is_empty() {
            r.fail(
                Kind::DnsFailure,
                format!("{host} does not resolve through the DANE resolver (no addresses)"),
            );
            return None;
        }
        let addrs: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, opts.port))
            .collect();
        r.addresses = addrs.iter().map(ToString::to_string).collect();
        return Some(addrs);
    }
    let found =
        tokio::time::timeout(clock.limit(), tokio::net::lookup_host((host, opts.port))).await;
    let addrs: Vec<SocketAddr> = match found {
        Err(_) => {
            r.fail(
                Kind::Timeout,
                format!("timed out resolving {host}: {}", clock.timed_out()),
            );
            return None;
        }
        Ok(Err(e)) => {
            r.fail(Kind::DnsFailure, format!("{host} does not resolve ({e})"));
            return None;
        }
        Ok(Ok(a)) => a.collect(),
    };
    if addrs.is_empty() {
        r.fail(
            Kind::DnsFailure,
            format!("{host} does not resolve (no addresses)"),
        );
        return None;
    }
    r.addresses = addrs.iter().map(ToString::to_string).collect();
    Some(addrs)
}

/// Tries each address in order. Each address that fails is reported: as a warning when a later
/// one answers (senders move on to it too), else as a failure.
async fn connect(
    opts: &ProbeOptions,
    addrs: &[SocketAddr],
    clock: &Clock,
    r: &mut ProbeReport,
) -> Option<TcpStream> {
    let mut failed = Vec::new();
    for addr in addrs {
        let started = Instant::now();
        let result = tokio::time::timeout(clock.limit(), TcpStream::connect(addr)).await;
        let ms = millis(started.elapsed());
        let mut attempt = ConnectAttempt {
            address: addr.to_string(),
            result: "ok",
            ms,
            error: None,
        };
        match result {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                r.connect.push(attempt);
                r.address = Some(addr.to_string());
                r.warnings.extend(failed);
                return Some(tcp);
            }
            Err(_) => {
                attempt.result = "timeout";
                failed.push(Finding::new(
                    Kind::Timeout,
                    format!(
                        "timed out connecting to {addr}: {} (a firewall dropping packets, or the host is down)",
                        clock.timed_out()
                    ),
                ));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                attempt.result = "refused";
                let hint = if opts.port == SMTP_PORT {
                    " (port 25 is often blocked by ISPs and cloud providers)"
                } else {
                    ""
                };
                failed.push(Finding::new(
                    Kind::ConnectionRefused,
                    format!(
                        "connection refused: nothing listens on {}, or a firewall rejects it{hint}",
                        addr_words(opts, addr)
                    ),
                ));
            }
            Ok(Err(e)) => {
                attempt.result = "error";
                attempt.error = Some(e.to_string());
                failed.push(Finding::new(
                    Kind::ConnectError,
                    format!("cannot connect to {addr}: {e}"),
                ));
            }
        }
        r.connect.push(attempt);
    }
    r.failures.extend(failed);
    None
}

/// `host:port`, plus the address when the host is a name.
fn addr_words(opts: &ProbeOptions, addr: &SocketAddr) -> String {
    match opts.host_ip() {
        Some(_) => opts.target(),
        None => format!("{} ({})", opts.target(), addr.ip()),
    }
}

/// Reads the banner; false (after reporting why) unless it is a 220.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    clock: &Clock,
    r: &mut ProbeReport,
) -> bool {
    match conn.read_reply(clock.limit()).await {
        Err(e) => {
            let hint = if r.implicit_tls || !matches!(e, StepError::Timeout) {
                ""
            } else {
                "; an implicit-TLS port such as 465 waits for the TLS handshake first (try --implicit-tls)"
            };
            let f = step_failure(&e, "the banner", clock);
            r.fail(f.kind, format!("{}{hint}", f.message));
            false
        }
        Ok(reply) => {
            r.received(&reply);
            r.banner = Some(ReplyReport::of(&reply));
            if reply.code != 220 {
                r.fail(
                    Kind::Banner,
                    format!(
                        "the server greeted with \"{}\" instead of 220: it refuses the session",
                        reply.one_line()
                    ),
                );
                return false;
            }
            true
        }
    }
}

/// EHLO, or HELO when EHLO is refused; the extensions (none after HELO), or `None` after
/// reporting the failure.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    opts: &ProbeOptions,
    clock: &Clock,
    r: &mut ProbeReport,
    tls: bool,
) -> Option<Vec<String>> {
    let what = if tls {
        "the reply to EHLO inside TLS"
    } else {
        "the reply to EHLO"
    };
    let ehlo = match conn.command(&format!("EHLO {}", opts.helo), clock, r).await {
        Ok(reply) => reply,
        Err(e) => {
            r.failures.push(step_failure(&e, what, clock));
            return None;
        }
    };
    let report = Some(ReplyReport::of(&ehlo));
    if tls {
        r.ehlo_tls = report;
    } else {
        r.ehlo = report;
    }
    if ehlo.code == 250 {
        return Some(capabilities(&ehlo));
    }
    if ehlo.code == 421 {
        r.fail(
            Kind::Closed,
            format!("the server closed the session at EHLO: {}", ehlo.one_line()),
        );
        return None;
    }
    let helo = match conn.command(&format!("HELO {}", opts.helo), clock, r).await {
        Ok(reply) => reply,
        Err(e) => {
            r.failures
                .push(step_failure(&e, "the reply to HELO", clock));
            return None;
        }
    };
    r.helo = Some(ReplyReport::of(&helo));
    if helo.code != 250 {
        r.fail(
            Kind::Hello,
            format!(
                "the server refused both EHLO (\"{}\") and HELO (\"{}\")",
                ehlo.one_line(),
                helo.one_line()
            ),
        );
        return None;
    }
    r.notes
        .push("EHLO refused; HELO accepted, so no extensions are known".into());
    Some(Vec::new())
}

/// STARTTLS; true when the server answered 220. Bytes after the 220 are reported.
async fn starttls(conn: &mut Conn<TcpStream>, clock: &Clock, r: &mut ProbeReport) -> bool {
    let reply = match conn.command("STARTTLS", clock, r).await {
        Ok(reply) => reply,
        Err(e) => {
            r.failures
                .push(step_failure(&e, "the reply to STARTTLS", clock));
            return false;
        }
    };
    r.starttls = Some(ReplyReport::of(&reply));
    if reply.code != 220 {
        r.fail(
            Kind::StarttlsRefused,
            format!(
                "the server offers STARTTLS but refused it: \"{}\" (TLS is misconfigured on this MTA, e.g. no certificate loaded)",
                reply.one_line()
            ),
        );
        return false;
    }
    if !conn.buf.is_empty() {
        let n = conn.buf.len();
        let shown = escape_bytes(conn.buf.get(..INJECTION_PREVIEW).unwrap_or(&conn.buf));
        let more = if n > INJECTION_PREVIEW { "..." } else { "" };
        r.after_starttls = Some(format!("{shown}{more}"));
        r.transcript.push(format!(
            "S: (plaintext after the 220, discarded) {shown}{more}"
        ));
        r.fail(
            Kind::Injection,
            format!(
                "the server sent {n} bytes after its 220 to STARTTLS, before the handshake: a correct server never does, so something on the path may be injecting replies (CVE-2021-38371); they were discarded"
            ),
        );
        conn.buf.clear();
    }
    true
}

/// The TLS handshake and everything the certificate shows; `None` after reporting a failure.
async fn handshake(
    connector: &Connector,
    tcp: TcpStream,
    opts: &ProbeOptions,
    clock: &Clock,
    r: &mut ProbeReport,
) -> Option<TlsStream<TcpStream>> {
    let expected = opts.expected_name();
    // SNI is the host when it is a name (as delivery sends the MX name), else `--name`.
    let sni_host = match (opts.host_ip(), &expected) {
        (None, _) => normalize_name(&opts.host),
        (Some(_), Some(name)) => name.clone(),
        (Some(ip), None) => ip.to_string(),
    };
    let req = TlsRequirement {
        level: TlsLevel::May,
        match_names: expected.iter().cloned().collect(),
        ..TlsRequirement::default()
    };
    let started = Instant::now();
    let result = connector
        .clone()
        .with_handshake_timeout(clock.limit())
        .handshake(tcp, &sni_host, &req)
        .await;
    let ms = millis(started.elapsed());
    let (stream, outcome) = match result {
        Ok(x) => x,
        Err(e) => {
            r.transcript
                .push(format!("-- TLS handshake failed after {ms} ms --"));
            let f = handshake_finding(&e, opts.implicit_tls, clock);
            r.tls_error = Some(e.to_string());
            r.failures.push(f);
            return None;
        }
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    let ders: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[CertificateDer<'static>]>::to_vec)
        .unwrap_or_default();
    let chain: Vec<CertReport> = ders.iter().map(|d| cert_report(d, now)).collect();
    let (verification, failures) = assess(
        &outcome.verification,
        &ders,
        &chain,
        expected.as_deref(),
        now,
    );
    r.transcript.push(format!(
        "-- TLS handshake: {} {} --",
        outcome.version, outcome.cipher
    ));
    r.tls = Some(TlsReport {
        version: outcome.version.clone(),
        cipher: outcome.cipher.clone(),
        bits: outcome.bits,
        key_exchange: outcome.key_exchange.clone(),
        sni: ServerName::try_from(sni_host.clone())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .map(|_| sni_host),
        handshake_ms: ms,
        chain,
        verification,
    });
    match &opts.dane {
        Some(v) => {
            let name = expected.clone().unwrap_or_else(|| sni_host_for_dane(opts));
            let report = dane_check(v, &name, opts.port, &ders).await;
            if report.applies {
                // DANE governs: the CA system's verdict is only reported.
                for f in failures {
                    r.notes
                        .push(format!("not needed under DANE: {}", f.message));
                }
                if !report.result.starts_with("verified") {
                    r.fail(Kind::Dane, format!("DANE: {}", report.result));
                }
            } else {
                r.failures.extend(failures);
                if report.result.starts_with("TLSA lookup failed") {
                    r.fail(Kind::Dane, format!("DANE: {}", report.result));
                }
            }
            r.dane = Some(report);
        }
        None => r.failures.extend(failures),
    }
    if outcome.version == "TLSv1.2" {
        r.warn(
            Kind::NoTls13,
            "the server negotiated TLS 1.2: it does not support TLS 1.3",
        );
    }
    if expected.is_none() {
        r.warn(
            Kind::NameNotChecked,
            "name not checked: the host is an IP address; give --name to check the certificate's name",
        );
    }
    let soon: Vec<Finding> = r
        .tls
        .iter()
        .flat_map(|t| t.chain.iter().enumerate())
        .filter_map(|(i, c)| expiry_warning(i, c))
        .collect();
    r.warnings.extend(soon);
    Some(stream)
}

fn sni_host_for_dane(opts: &ProbeOptions) -> String {
    normalize_name(&opts.host)
}

/// The TLSA lookup for `name` and the judgement of `ders` by it.
async fn dane_check(
    v: &crate::dns::Validator,
    name: &str,
    port: u16,
    ders: &[CertificateDer<'static>],
) -> DaneReport {
    use crate::dane::tlsa;
    use crate::policy::{Dnssec, TlsaLookup};
    let (addresses, expanded) = v.addresses_expanded(name).await;
    let lookup = v.tlsa_for_host(name, expanded.as_deref(), port).await;
    let mut rep = DaneReport {
        query: format!("_{port}._tcp.{name}"),
        addresses: match &addresses {
            Dnssec::Secure => "secure".into(),
            Dnssec::Insecure => "insecure".into(),
            Dnssec::Bogus(w) | Dnssec::Unanswered(w) => format!("failed: {w}"),
        },
        tlsa: String::new(),
        base: None,
        records: Vec::new(),
        result: String::new(),
        applies: false,
    };
    match lookup {
        TlsaLookup::NotLooked => {}
        TlsaLookup::NoRecords { secure } => {
            rep.tlsa = if secure {
                "no records (securely denied)".into()
            } else {
                "insecure (not signed or not validated)".into()
            };
            rep.result = "DANE does not apply: no secure TLSA records".into();
        }
        TlsaLookup::Failed(w) => {
            rep.tlsa = format!("lookup failed: {w}");
            rep.result = format!(
                "TLSA lookup failed on a signed path ({w}): a DANE sender defers mail to this host (4.7.324)"
            );
        }
        TlsaLookup::Unanswered(w) => {
            rep.tlsa = format!("no answer: {w}");
            rep.result = format!(
                "TLSA lookup failed on a signed path ({w}): a DANE sender defers mail to this host (4.4.312)"
            );
        }
        TlsaLookup::Records { records, base } => {
            rep.tlsa = "secure".into();
            rep.query = format!("_{port}._tcp.{base}");
            rep.base = Some(base.clone());
            for r in &records {
                let matches = match r.usage {
                    tlsa::DANE_EE | tlsa::PKIX_EE => {
                        ders.first().is_some_and(|d| r.matches(d.as_ref()))
                    }
                    _ => ders.iter().any(|d| r.matches(d.as_ref())),
                };
                rep.records.push(DaneRecordReport {
                    record: r.to_string(),
                    unusable: r.unusable_reason().map(|u| u.to_string()),
                    matches,
                });
            }
            if addresses != Dnssec::Secure {
                rep.result = format!(
                    "DANE does not apply: the address records of {name} are not secure ({})",
                    rep.addresses
                );
            } else if !records.iter().any(tlsa::Tlsa::usable_for_smtp) {
                rep.result = "all TLSA records are unusable for SMTP: a DANE sender requires TLS but does not authenticate it".into();
            } else {
                rep.applies = true;
                let mut names = vec![name.to_string()];
                if base != name {
                    names.push(base);
                }
                rep.result = match tlsa::verify(&records, ders, &names, UnixTime::now()) {
                    Ok(m) => format!("verified: {m}"),
                    Err(f) => format!("{f} ({})", f.code()),
                };
            }
        }
    }
    rep
}

/// The verification report and one failure per problem: the chain's, then the name's.
fn assess(
    v: &Verification,
    ders: &[CertificateDer<'_>],
    chain: &[CertReport],
    expected: Option<&str>,
    now: i64,
) -> (VerifyReport, Vec<Finding>) {
    let mut failures = Vec::new();
    let chain_problem = match v {
        Verification::Verified | Verification::Trusted | Verification::Dane(_) => None,
        Verification::Untrusted(f) => {
            let finding = cert_finding(f, ders, now);
            let words = finding.message.clone();
            failures.push(finding);
            Some(words)
        }
    };
    let name_matches = expected.map(|name| {
        ders.first()
            .is_some_and(|ee| certificate_valid_for(ee, name))
    });
    if let (Some(name), Some(false)) = (expected, name_matches) {
        let presented = chain.first().map(presented_names).unwrap_or_default();
        let why = CertFailure::NameMismatch {
            expected: vec![name.to_string()],
            presented,
        };
        failures.push(Finding::new(
            Kind::NameMismatch,
            format!("wrong name: {why}"),
        ));
    }
    let report = VerifyReport {
        result: v.word().to_ascii_lowercase(),
        chain_trusted: chain_problem.is_none(),
        chain_problem,
        name: expected.map(str::to_string),
        name_matches,
    };
    (report, failures)
}

/// Whether the end-entity certificate is valid for `name` (RFC 6125 rules, via webpki).
fn certificate_valid_for(ee: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    webpki::EndEntityCert::try_from(ee)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The names a certificate answers to: its SANs, or its subject when it has none.
fn presented_names(c: &CertReport) -> Vec<String> {
    let names: Vec<String> = c.dns_names.iter().chain(&c.ip_addresses).cloned().collect();
    if names.is_empty() && !c.subject.is_empty() {
        vec![c.subject.clone()]
    } else {
        names
    }
}

/// A chain failure in words a person can act on (the classification is the connector's);
/// `ders` is the chain the server sent, its own certificate first (empty when unknown).
fn cert_finding(f: &CertFailure, ders: &[CertificateDer<'_>], now: i64) -> Finding {
    match f {
        CertFailure::Expired { not_after } => {
            let days = (now - i64::try_from(*not_after).unwrap_or(i64::MAX)) / 86_400;
            let ago = if days < 1 {
                "less than a day ago".to_string()
            } else {
                format!("{} ago", days_words(days))
            };
            Finding::new(Kind::Expired, format!("expired: {f} ({ago})"))
        }
        CertFailure::NotYetValid { .. } => {
            Finding::new(Kind::NotYetValid, format!("not yet valid: {f}"))
        }
        CertFailure::UntrustedIssuer(_) if ders.is_empty() => {
            Finding::new(Kind::UntrustedIssuer, format!("untrusted issuer: {f}"))
        }
        CertFailure::UntrustedIssuer(_) => {
            Finding::new(Kind::UntrustedIssuer, untrusted_words(ders))
        }
        CertFailure::Revoked => Finding::new(Kind::Revoked, format!("revoked: {f}")),
        CertFailure::NameMismatch { .. } => {
            Finding::new(Kind::NameMismatch, format!("wrong name: {f}"))
        }
        CertFailure::PinMismatch | CertFailure::Other(_) => {
            Finding::new(Kind::Certificate, format!("certificate not valid: {f}"))
        }
        CertFailure::Dane(_) => Finding::new(Kind::Certificate, format!("DANE: {f}")),
    }
}

/// Why the chain the server sent is not trusted (the connector's words, which name the
/// certificate it ends at), and how to trust it for a probe when that is possible.
fn untrusted_words(ders: &[CertificateDer<'_>]) -> String {
    let why = UntrustedChain::of(ders);
    let hint = match &why {
        UntrustedChain::SelfSigned { ca: false, .. } => "; give it with --ca-file if you trust it",
        // A CA certificate is refused as a server's own even when it is trusted.
        UntrustedChain::SelfSigned { ca: true, .. }
        | UntrustedChain::Empty
        | UntrustedChain::Unreadable => "",
        UntrustedChain::MissingIntermediate { .. }
        | UntrustedChain::UntrustedRoot { .. }
        | UntrustedChain::UnknownIssuer { .. } => "; give the CA with --ca-file if you trust it",
    };
    format!("untrusted issuer: {why}{hint}")
}

fn expiry_warning(index: usize, c: &CertReport) -> Option<Finding> {
    if c.expired || c.days_left >= EXPIRY_WARNING_DAYS {
        return None;
    }
    let which = if index == 0 {
        "the certificate".to_string()
    } else {
        format!("chain certificate #{index} ({})", c.subject)
    };
    let when = if c.days_left == 0 {
        "within a day".to_string()
    } else {
        format!("in {}", days_words(c.days_left))
    };
    Some(Finding::new(
        Kind::ExpiresSoon,
        format!(
            "{which} expires {when} ({}): renew it",
            rfc5322_date(u64::try_from(c.not_after_unix).unwrap_or(0))
        ),
    ))
}

/// A handshake failure in words, with a likely cause where the error suggests one.
fn handshake_finding(e: &TlsFailure, implicit: bool, clock: &Clock) -> Finding {
    match e {
        TlsFailure::Timeout => Finding::new(
            Kind::Timeout,
            format!(
                "the TLS handshake timed out: {} (the server stopped answering mid-handshake)",
                clock.timed_out()
            ),
        ),
        TlsFailure::Certificate(f) => {
            cert_finding(f, &[], i64::try_from(unix_now()).unwrap_or(i64::MAX))
        }
        TlsFailure::Handshake(words) => {
            let message = match handshake_hint(words, implicit) {
                Some(hint) => format!("TLS handshake failed: {hint}. Detail: {words}"),
                None => format!("TLS handshake failed: {words}"),
            };
            Finding::new(Kind::Handshake, message)
        }
    }
}

/// A likely cause for the connector's description of a failed handshake.
fn handshake_hint(words: &str, implicit: bool) -> Option<&'static str> {
    if words.contains("(protocol version)")
        || words.contains("neither TLS 1.3 nor TLS 1.2")
        || words.contains("a TLS version Moat did not offer")
    {
        Some("the server offered no TLS version we accept (TLS 1.0/1.1 only?)")
    } else if words.contains("(handshake failure)")
        || words.contains("(insufficient security)")
        || words.contains("no cipher suite in common")
        || words.contains("no key exchange group in common")
        || words.contains("no signature algorithm in common")
    {
        Some("no cipher suite or key exchange in common (only old, weak ones configured?)")
    } else if words.contains("does not speak TLS") {
        Some(if implicit {
            "the server does not speak TLS on this port (plaintext or STARTTLS port? try without --implicit-tls)"
        } else {
            "the server does not speak TLS after its 220 to STARTTLS"
        })
    } else if words.contains("closed the connection") {
        Some(
            "the server hung up during the handshake (its TLS setup is broken, e.g. no usable certificate or key)",
        )
    } else {
        None
    }
}

/// One certificate's fields for the report; unparseable ones are marked as such.
fn cert_report(der: &CertificateDer<'_>, now: i64) -> CertReport {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return CertReport {
            subject: "(unparseable certificate)".into(),
            issuer: String::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            not_before: String::new(),
            not_after: String::new(),
            days_left: 0,
            expired: false,
            not_yet_valid: false,
            key: None,
            self_signed: false,
            not_after_unix: 0,
        };
    };
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns_names.push(escape_text(d)),
                GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        ip_addresses.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        ip_addresses.push(Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    let subject = escape_text(&cert.subject().to_string());
    let issuer = escape_text(&cert.issuer().to_string());
    CertReport {
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        subject,
        issuer,
        dns_names,
        ip_addresses,
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        days_left: not_after.saturating_sub(now) / 86_400,
        expired: not_after < now,
        not_yet_valid: not_before > now,
        key: key_type(cert.public_key()),
        not_after_unix: not_after,
    }
}

/// `RSA 2048`, `EC P-256`, `Ed25519`.
fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<String> {
    use x509_parser::public_key::PublicKey;
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.3.101.112" => return Some("Ed25519".into()),
        "1.3.101.113" => return Some("Ed448".into()),
        _ => {}
    }
    match spki.parsed().ok()? {
        PublicKey::RSA(k) => Some(format!("RSA {}", k.key_size())),
        PublicKey::EC(p) => Some(match p.key_size() {
            256 => "EC P-256".into(),
            384 => "EC P-384".into(),
            528 => "EC P-521".into(),
            n => format!("EC {n} bits"),
        }),
        _ => None,
    }
}

/// `2026-12-30T23:59:59Z`.
fn rfc3339(unix: i64) -> String {
    let c = compact_utc(u64::try_from(unix).unwrap_or(0));
    // yyyy..yymmddhhmmss: the year is everything before the last ten digits.
    let y = c.len().saturating_sub(10);
    let part = |from: usize, len: usize| c.get(from..from + len).unwrap_or("00");
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        c.get(..y).unwrap_or("0000"),
        part(y, 2),
        part(y + 2, 2),
        part(y + 4, 2),
        part(y + 6, 2),
        part(y + 8, 2)
    )
}

/// The extension lines of an EHLO reply (its first line is the server's greeting).
fn capabilities(ehlo: &Reply) -> Vec<String> {
    ehlo.lines
        .iter()
        .skip(1)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether an extension keyword is listed (case-insensitive, first word of a line).
fn has_cap(caps: &[String], keyword: &str) -> bool {
    caps.iter().any(|c| {
        c.split_ascii_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
    })
}

/// The AUTH line (`AUTH PLAIN LOGIN`, or the old `AUTH=` form), if offered.
fn auth_line(caps: &[String]) -> Option<String> {
    caps.iter()
        .find(|c| {
            let w = c.split_ascii_whitespace().next().unwrap_or("");
            w.eq_ignore_ascii_case("AUTH") || w.to_ascii_uppercase().starts_with("AUTH=")
        })
        .cloned()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a step did not produce a reply.
#[derive(Debug)]
enum StepError {
    Timeout,
    Closed,
    Io(String),
    Protocol(String),
}

fn step_failure(e: &StepError, waiting_for: &str, clock: &Clock) -> Finding {
    match e {
        StepError::Timeout => Finding::new(
            Kind::Timeout,
            format!("timed out waiting for {waiting_for}: {}", clock.timed_out()),
        ),
        StepError::Closed => Finding::new(
            Kind::Closed,
            format!("the server closed the connection instead of sending {waiting_for}"),
        ),
        StepError::Io(m) => Finding::new(
            Kind::Closed,
            format!("connection lost waiting for {waiting_for}: {m}"),
        ),
        StepError::Protocol(m) => Finding::new(
            Kind::Protocol,
            format!("the server broke the SMTP protocol in {waiting_for}: {m}"),
        ),
    }
}

/// One stream and the server bytes read but not yet used.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    /// A step failed: the session is not usable any more.
    dead: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::new(),
            dead: false,
        }
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Reply, StepError> {
        let read = async {
            loop {
                if let Some((reply, used)) = take_reply(&self.buf).map_err(StepError::Protocol)? {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return Err(StepError::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(StepError::Io(e.to_string())),
                }
            }
        };
        let result = tokio::time::timeout(limit, read)
            .await
            .unwrap_or(Err(StepError::Timeout));
        self.dead |= result.is_err();
        result
    }

    /// Sends `line` and reads the reply, both in the transcript.
    async fn command(
        &mut self,
        line: &str,
        clock: &Clock,
        r: &mut ProbeReport,
    ) -> Result<Reply, StepError> {
        self.command_within(line, clock.limit(), r).await
    }

    async fn command_within(
        &mut self,
        line: &str,
        limit: Duration,
        r: &mut ProbeReport,
    ) -> Result<Reply, StepError> {
        r.transcript.push(format!("C: {line}"));
        let started = Instant::now();
        let wire = format!("{line}\r\n");
        let sent = tokio::time::timeout(limit, async {
            self.stream.write_all(wire.as_bytes()).await?;
            self.stream.flush().await
        })
        .await;
        let failed = match sent {
            Err(_) => Some(StepError::Timeout),
            Ok(Err(e)) => Some(StepError::Io(e.to_string())),
            Ok(Ok(())) => None,
        };
        if let Some(e) = failed {
            self.dead = true;
            return Err(e);
        }
        let reply = self
            .read_reply(limit.saturating_sub(started.elapsed()))
            .await?;
        r.received(&reply);
        Ok(reply)
    }

    /// QUIT (waiting a few seconds at most) and a polite close; problems here are noted in
    /// the transcript, not failures. Nothing is sent on a connection that already failed.
    async fn quit(mut self, clock: &Clock, r: &mut ProbeReport) {
        if self.dead {
            return;
        }
        let limit = clock.limit().min(QUIT_LIMIT);
        match self.command_within("QUIT", limit, r).await {
            Ok(reply) => r.quit = Some(ReplyReport::of(&reply)),
            Err(e) => r
                .transcript
                .push(format!("-- no reply to QUIT: {} --", e.words())),
        }
        let _ = tokio::time::timeout(QUIT_LIMIT, self.stream.shutdown()).await;
    }
}

impl StepError {
    fn words(&self) -> String {
        match self {
            StepError::Timeout => "timed out".into(),
            StepError::Closed => "connection closed".into(),
            StepError::Io(m) | StepError::Protocol(m) => m.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply {
            code,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn clock() -> Clock {
        Clock {
            step: Duration::from_secs(30),
            deadline: Instant::now() + Duration::from_secs(120),
        }
    }

    #[test]
    fn targets() {
        let ok = |t: &str| parse_target(t).unwrap();
        assert_eq!(ok("mx.example.com"), ("mx.example.com".into(), None));
        assert_eq!(
            ok("mx.example.com.:2525"),
            ("mx.example.com.".into(), Some(2525))
        );
        assert_eq!(ok("192.0.2.1:25"), ("192.0.2.1".into(), Some(25)));
        assert_eq!(ok("[::1]:2525"), ("::1".into(), Some(2525)));
        assert_eq!(ok("[2001:db8::1]"), ("2001:db8::1".into(), None));
        assert_eq!(ok("2001:db8::1"), ("2001:db8::1".into(), None));
        for bad in [
            "",
            ":25",
            "mx:0",
            "mx:65536",
            "mx:x",
            "[::1",
            "[mx]:25",
            "[::1]x",
            "a b",
            "-mx.example",
            "1:2:3",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn options_defaults() {
        let o = ProbeOptions::new("MX.Example.com.", false).unwrap();
        assert_eq!(o.port, 25);
        assert_eq!(o.expected_name().as_deref(), Some("mx.example.com"));
        assert_eq!(o.target(), "MX.Example.com.:25");
        let mut o = ProbeOptions::new("2001:db8::1", true).unwrap();
        assert_eq!(o.port, 465);
        assert_eq!(o.target(), "[2001:db8::1]:465");
        assert_eq!(
            o.expected_name(),
            None,
            "an IP address has no name to check"
        );
        o.name = Some("Mx.Example.com".into());
        assert_eq!(o.expected_name().as_deref(), Some("mx.example.com"));
        assert!(!o.helo.is_empty() && !o.helo.contains(' '));
    }

    #[test]
    fn replies_are_taken_whole() {
        assert_eq!(take_reply(b"").unwrap(), None);
        assert_eq!(take_reply(b"250-mx\r\n250 PIPE").unwrap(), None);
        let (r, n) = take_reply(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n221 x\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r, reply(250, &["mx", "PIPELINING", "STARTTLS"]));
        assert_eq!(n, 38, "the next reply stays in the buffer");
        let (r, n) = take_reply(b"220 bare LF\n").unwrap().unwrap();
        assert_eq!((r, n), (reply(220, &["bare LF"]), 12));
        let (r, _) = take_reply(b"220\r\n").unwrap().unwrap();
        assert_eq!(r, reply(220, &[""]));
        let (r, _) = take_reply(b"220 hi\x1b[31m\r\n").unwrap().unwrap();
        assert_eq!(r.lines, ["hi\\u{1b}[31m"], "control characters are escaped");
        for bad in [
            &b"hello\r\n"[..],
            b"22 x\r\n",
            b"099 x\r\n",
            b"220_x\r\n",
            b"250-a\r\n251 b\r\n",
        ] {
            assert!(take_reply(bad).is_err(), "{bad:?}");
        }
        assert!(
            take_reply(&[b'2'; crate::smtp::client::MAX_REPLY_LINE + 1]).is_err(),
            "unbounded line"
        );
        let many = "250-x\r\n".repeat(crate::smtp::client::MAX_REPLY_LINES + 1);
        assert!(take_reply(many.as_bytes()).is_err(), "unbounded reply");
    }

    #[test]
    fn extensions() {
        let caps = capabilities(&reply(
            250,
            &["mx greets you", "pipelining", "SIZE 100", "AUTH=LOGIN", " "],
        ));
        assert_eq!(caps, ["pipelining", "SIZE 100", "AUTH=LOGIN"]);
        assert!(has_cap(&caps, "PIPELINING"));
        assert!(!has_cap(&caps, "STARTTLS"));
        assert!(!has_cap(&caps, "SIZ"));
        assert_eq!(auth_line(&caps).as_deref(), Some("AUTH=LOGIN"));
        assert_eq!(auth_line(&["AUTHX".into()]), None);
    }

    #[test]
    fn handshake_hints_follow_the_connector_words() {
        let hint = |w| handshake_hint(w, false).unwrap_or("");
        assert!(
            hint("the server ended the handshake with TLS alert 70 (protocol version)")
                .contains("TLS 1.0/1.1 only?")
        );
        assert!(
            hint("the server supports neither TLS 1.3 nor TLS 1.2")
                .contains("no TLS version we accept")
        );
        assert!(
            hint("the server ended the handshake with TLS alert 40 (handshake failure)")
                .contains("no cipher suite")
        );
        assert!(hint("no cipher suite in common with the server").contains("no cipher suite"));
        assert!(hint("no key exchange group in common with the server").contains("key exchange"));
        assert!(
            handshake_hint(
                "the server does not speak TLS here (what it sent is not a TLS record)",
                true
            )
            .unwrap_or("")
            .contains("does not speak TLS on this port")
        );
        assert_eq!(handshake_hint("something new", false), None);
        let f = handshake_finding(
            &TlsFailure::Handshake("the server closed the connection during the handshake".into()),
            false,
            &clock(),
        );
        assert_eq!(f.kind, Kind::Handshake);
        assert!(
            f.message
                .starts_with("TLS handshake failed: the server hung up"),
            "{}",
            f.message
        );
        let f = handshake_finding(&TlsFailure::Timeout, false, &clock());
        assert_eq!(f.kind, Kind::Timeout);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(days_words(1), "1 day");
        assert_eq!(days_words(3), "3 days");
    }

    /// A CA and a leaf for `names` valid from `from` to `to` (Unix seconds).
    fn chain(
        names: &[&str],
        from: i64,
        to: i64,
    ) -> (CertificateDer<'static>, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Probe Test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        leaf.not_before = epoch + Duration::from_secs(from as u64);
        leaf.not_after = epoch + Duration::from_secs(to as u64);
        let der = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap()
            .der()
            .clone();
        (der, ca_der)
    }

    use crate::outbound::tls::tests::self_signed;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    #[test]
    fn certificates_are_described() {
        let (leaf, ca) = chain(
            &["mx.example.com", "*.example.net"],
            NOW - 10 * DAY,
            NOW + 37 * DAY + 60,
        );
        let c = cert_report(&leaf, NOW);
        assert_eq!(c.subject, "CN=mx.example.com");
        assert_eq!(c.issuer, "CN=Probe Test CA");
        assert_eq!(c.dns_names, ["mx.example.com", "*.example.net"]);
        assert_eq!(c.days_left, 37);
        assert!(!c.expired && !c.not_yet_valid && !c.self_signed);
        assert_eq!(c.key.as_deref(), Some("EC P-256"));
        assert_eq!(
            cert_line(&c),
            format!(
                "CN=mx.example.com  SAN mx.example.com *.example.net  issuer CN=Probe Test CA  valid {} .. {} (37 days left)  EC P-256",
                &rfc3339(NOW - 10 * DAY)[..10],
                &rfc3339(NOW + 37 * DAY + 60)[..10]
            )
        );
        assert!(cert_report(&ca, NOW).self_signed);
        let junk = cert_report(&CertificateDer::from(vec![1, 2, 3]), NOW);
        assert_eq!(junk.subject, "(unparseable certificate)");

        let (old, _) = chain(&["mx.example.com"], NOW - 100 * DAY, NOW - 3 * DAY - 60);
        let c = cert_report(&old, NOW);
        assert!(c.expired);
        assert_eq!(c.days_left, -3);
        assert!(
            cert_line(&c).contains("(expired 3 days ago)"),
            "{}",
            cert_line(&c)
        );
        assert_eq!(
            expiry_warning(0, &c),
            None,
            "expired is a failure, not a warning"
        );

        let (soon, _) = chain(&["mx.example.com"], NOW - 80 * DAY, NOW + 5 * DAY + 60);
        let w = expiry_warning(0, &cert_report(&soon, NOW)).unwrap();
        assert_eq!(w.kind, Kind::ExpiresSoon);
        assert!(
            w.message.starts_with("the certificate expires in 5 days ("),
            "{}",
            w.message
        );
    }

    #[test]
    fn verification_findings() {
        let (leaf, ca) = chain(&["mx.example.com"], NOW - 10 * DAY, NOW + 90 * DAY);
        let ders = vec![leaf, ca];
        let reports: Vec<CertReport> = ders.iter().map(|d| cert_report(d, NOW)).collect();

        let (v, f) = assess(
            &Verification::Verified,
            &ders,
            &reports,
            Some("mx.example.com"),
            NOW,
        );
        assert!(f.is_empty() && v.chain_trusted && v.name_matches == Some(true));
        assert_eq!(v.result, "verified");
        assert!(verify_line(&v, false).starts_with("ok for mx.example.com"));

        let (v, f) = assess(
            &Verification::Trusted,
            &ders,
            &reports,
            Some("other.example"),
            NOW,
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, Kind::NameMismatch);
        assert_eq!(
            f[0].message,
            "wrong name: the certificate is issued to mx.example.com, not other.example"
        );
        assert_eq!(
            verify_line(&v, false),
            "FAILED: not valid for other.example"
        );

        let expired = Verification::Untrusted(CertFailure::Expired {
            not_after: (NOW - 4 * DAY - 5) as u64,
        });
        let (v, f) = assess(&expired, &ders, &reports, Some("mx.example.com"), NOW);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, Kind::Expired);
        assert!(
            f[0].message
                .starts_with("expired: the certificate expired on ")
        );
        assert!(f[0].message.ends_with("(4 days ago)"), "{}", f[0].message);
        assert!(!v.chain_trusted && v.name_matches == Some(true));
        assert!(verify_line(&v, false).ends_with("; name mx.example.com matches"));

        // Unknown CA, wrong name too: both are failures, the chain's first.
        let untrusted = Verification::Untrusted(CertFailure::UntrustedIssuer(None));
        let (_, f) = assess(
            &untrusted,
            &ders[..1],
            &reports[..1],
            Some("x.example"),
            NOW,
        );
        let kinds: Vec<Kind> = f.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [Kind::UntrustedIssuer, Kind::NameMismatch]);
        // Only the server's own certificate was sent: the intermediates may be missing.
        assert_eq!(
            f[0].message,
            "untrusted issuer: the certificate is issued by CN=Probe Test CA, which is not a \
             trusted root, and the server sends no intermediate certificates; the server must \
             send its intermediate certificates after its own (or, if CN=Probe Test CA is a \
             private CA, use a certificate from a CA that senders trust); give the CA with \
             --ca-file if you trust it"
        );
        // The server sent its root along: name it.
        let (_, f) = assess(&untrusted, &ders, &reports, None, NOW);
        assert_eq!(
            f[0].message,
            "untrusted issuer: the chain ends at the root CN=Probe Test CA, which is not a \
             trusted CA; the server needs a certificate from a CA that senders trust; give the \
             CA with --ca-file if you trust it"
        );
        // Self-signed and CA:TRUE (the CA sent as the server's certificate): --ca-file would
        // not help, so it is not suggested.
        let (_, f) = assess(&untrusted, &ders[1..], &reports[1..], None, NOW);
        assert_eq!(f[0].kind, Kind::UntrustedIssuer);
        assert_eq!(
            f[0].message,
            "untrusted issuer: the certificate is self-signed (CN=Probe Test CA) and marked as \
             a CA certificate (CA:TRUE), which is never accepted as a server's own \
             certificate, trusted or not; the server needs a certificate from a CA that \
             senders trust"
        );
        // Self-signed, CA:FALSE.
        let plain = self_signed("mx.example.com", false);
        let reports_plain = vec![cert_report(&plain, NOW)];
        let (_, f) = assess(
            &untrusted,
            std::slice::from_ref(&plain),
            &reports_plain,
            None,
            NOW,
        );
        assert_eq!(f[0].kind, Kind::UntrustedIssuer);
        assert_eq!(
            f[0].message,
            "untrusted issuer: the certificate is self-signed (CN=mx.example.com); the server \
             needs a certificate from a CA that senders trust; give it with --ca-file if you \
             trust it"
        );
        // The connector's words when the chain is not known.
        let f = cert_finding(&CertFailure::UntrustedIssuer(None), &[], NOW);
        assert_eq!(f.kind, Kind::UntrustedIssuer);
        assert_eq!(
            f.message,
            "untrusted issuer: the certificate chain does not lead to a trusted root (untrusted issuer)"
        );

        // An IP address without a name: only the chain counts.
        let (v, f) = assess(&Verification::Trusted, &ders, &reports, None, NOW);
        assert!(f.is_empty() && v.name_matches.is_none());
        assert!(verify_line(&v, true).starts_with("chain ok; name not checked"));
    }

    fn report() -> ProbeReport {
        let mut o = ProbeOptions::new("mx.example.com", false).unwrap();
        o.helo = "probe.example".into();
        ProbeReport::new(&o)
    }

    #[test]
    fn verdicts_and_rendering() {
        // Nothing happened and nothing failed: still not a pass.
        let mut r = report();
        r.finish(Instant::now());
        assert_eq!(r.verdict, Verdict::Fail);
        assert_eq!(r.failures[0].kind, Kind::Protocol);

        let mut r = report();
        r.address = Some("192.0.2.1:25".into());
        r.addresses = vec!["192.0.2.1:25".into()];
        r.received(&reply(220, &["mx.example.com ESMTP"]));
        r.banner = Some(ReplyReport::of(&reply(220, &["mx.example.com ESMTP"])));
        r.tls = Some(TlsReport {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            bits: 256,
            key_exchange: Some("X25519MLKEM768".into()),
            sni: Some("mx.example.com".into()),
            handshake_ms: 4,
            chain: Vec::new(),
            verification: VerifyReport {
                result: "verified".into(),
                chain_trusted: true,
                chain_problem: None,
                name: Some("mx.example.com".into()),
                name_matches: Some(true),
            },
        });
        r.warn(Kind::NoPipelining, "no PIPELINING: slow");
        r.finish(Instant::now());
        assert!(r.passed());
        let text = r.render();
        assert!(
            text.starts_with(
                "Probing mx.example.com:25 (192.0.2.1:25)\n  S: 220 mx.example.com ESMTP\n\n"
            ),
            "{text}"
        );
        assert!(text.contains("\n  resolve     192.0.2.1:25\n"), "{text}");
        assert!(
            text.contains(
                "\n  tls         TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits) X25519MLKEM768, 4 ms\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("WARN  no PIPELINING: slow\nPASS  mx.example.com:25 offers STARTTLS with a certificate valid for mx.example.com\n"), "{text}");

        let mut r = report();
        r.fail(Kind::ConnectionRefused, "connection refused: x");
        r.fail(Kind::Timeout, "timed out: y");
        r.finish(Instant::now());
        let text = r.render();
        assert!(text.starts_with("Probing mx.example.com:25\n"), "{text}");
        assert!(
            text.ends_with("FAIL  connection refused: x\nFAIL  timed out: y\n"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verdict"], "fail");
        assert_eq!(json["failures"][0]["kind"], "connection_refused");
        assert_eq!(json["helo_name"], "probe.example");
    }

    #[test]
    fn session_notes_and_warnings() {
        let mut r = report();
        r.ehlo = Some(ReplyReport::of(&reply(250, &["mx", "STARTTLS"])));
        r.capabilities = vec!["STARTTLS".into()];
        r.ehlo_tls = Some(ReplyReport::of(&reply(
            250,
            &["mx", "PIPELINING", "AUTH PLAIN"],
        )));
        r.capabilities_tls = vec!["PIPELINING".into(), "AUTH PLAIN".into()];
        session_warnings(&mut r);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.notes, ["AUTH PLAIN offered only inside TLS"]);

        let mut r = report();
        r.ehlo = Some(ReplyReport::of(&reply(250, &["mx", "AUTH LOGIN"])));
        r.capabilities = vec!["AUTH LOGIN".into()];
        session_warnings(&mut r);
        let kinds: Vec<Kind> = r.warnings.iter().map(|w| w.kind).collect();
        assert_eq!(kinds, [Kind::AuthInPlaintext, Kind::NoPipelining]);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_text("a\tb\u{7f}c"), "a\\tb\\u{7f}c");
        assert_eq!(escape_bytes(b"ok\xff"), "ok\u{fffd}");
    }
}
