//! The transport-security report: a record of how each delivery attempt travelled, and the page
//! the admin listener serves from it.
//!
//! Three parts, each usable on its own:
//!
//! - [`EventLog`] keeps [`DeliveryEvent`]s: in memory (bounded, oldest dropped first) and in
//!   `<data>/report/events.jsonl`, one JSON object per line, so the report survives restarts.
//!   Only the last [`KEEP_SECS`] (8 days) are kept; the file is rewritten (temp file + rename)
//!   when it holds much more than that.
//! - [`summarize`] folds events of one [`Window`] (last day or week) into a [`Summary`]: counts
//!   per destination and per sender domain by TLS version and by how the peer was
//!   authenticated, deferrals and bounces by cause, totals. The busiest [`TOP_N`] domains keep
//!   their own row, the rest share one `(other)` row. A `Summary` serialises to JSON as it is.
//! - [`render_page`] turns a summary and the certificate list into one self-contained HTML
//!   document: inline CSS and inline SVG bar charts, no script and nothing fetched, so it reads
//!   the same offline, in a mail client's preview or in a text browser's table mode.
//!
//! Everything in an event that came from the network (domains, causes) is HTML-escaped when the
//! page is written; nothing in the page is trusted to have been cleaned earlier.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::util::{unix_now, utc_day, utc_minutes};

/// How long events are kept, in memory and on disk: 8 days (the week window plus a margin).
pub const KEEP_SECS: u64 = 8 * 86_400;
/// At most this many events are held in memory; beyond it the oldest are dropped.
pub const MAX_EVENTS: usize = 200_000;
/// Domains (and causes) with their own row in a summary; the rest are folded into `(other)`.
pub const TOP_N: usize = 15;
/// Longest cause kept in an event, in characters.
pub const MAX_CAUSE_CHARS: usize = 80;
/// Certificates with fewer days left than this are highlighted on the page.
pub const WARN_DAYS: i64 = 21;
/// Certificates with fewer days left than this are listed under "expiring soon".
pub const NEAR_EXPIRY_DAYS: i64 = 30;
/// Name of the events file inside the report directory.
pub const EVENTS_FILE: &str = "events.jsonl";
/// Row label that stands for every domain (or cause) outside the top [`TOP_N`].
pub const OTHER: &str = "(other)";

/// Longest domain kept in an event, in bytes (the DNS limit; longer is hostile input).
const MAX_DOMAIN_BYTES: usize = 255;
/// Lines the file may hold beyond twice the kept events before it is rewritten.
const COMPACT_SLACK: usize = 1024;
/// How far past [`KEEP_SECS`] the oldest line in the file may be before it is rewritten, so a
/// rewrite for age happens at most about twice a day.
const AGE_SLACK_SECS: u64 = 12 * 3600;

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// What became of one recipient at one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The next hop accepted the message (or it was stored locally).
    Delivered,
    /// A temporary failure; the queue will try again.
    Deferred,
    /// A permanent failure (or the retry window ran out); a DSN goes to the sender.
    Bounced,
}

/// The transport of an attempt: the TLS version negotiated, or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsClass {
    /// TLS 1.3.
    Tls13,
    /// TLS 1.2.
    Tls12,
    /// An SMTP session without TLS.
    Plaintext,
    /// No network hop: maildir delivery or discard.
    Local,
    /// No session was established (refused, timed out, DNS failure, ...).
    None,
}

impl TlsClass {
    /// Every class, in the order the page shows them.
    pub const ALL: [TlsClass; 5] = [
        TlsClass::Tls13,
        TlsClass::Tls12,
        TlsClass::Plaintext,
        TlsClass::Local,
        TlsClass::None,
    ];

    /// Words for people.
    pub fn label(self) -> &'static str {
        match self {
            TlsClass::Tls13 => "TLS 1.3",
            TlsClass::Tls12 => "TLS 1.2",
            TlsClass::Plaintext => "plaintext",
            TlsClass::Local => "local",
            TlsClass::None => "no connection",
        }
    }

    /// The colour of this class on the page (Okabe–Ito palette, readable with the common
    /// colour-vision deficiencies).
    pub fn colour(self) -> &'static str {
        match self {
            TlsClass::Tls13 => "#009e73",
            TlsClass::Tls12 => "#0072b2",
            TlsClass::Plaintext => "#d55e00",
            TlsClass::Local => "#999999",
            TlsClass::None => "#cccccc",
        }
    }
}

/// How the receiving server was authenticated on an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthClass {
    /// TLS with a certificate verified against trusted roots under a `verify` rule.
    Verified,
    /// TLS verified under an MTA-STS `enforce` policy.
    MtaSts,
    /// TLS authenticated by DANE TLSA records.
    Dane,
    /// TLS whose certificate was not verified or not required.
    Opportunistic,
    /// No TLS.
    Plaintext,
    /// No network hop.
    Local,
    /// No session was established.
    None,
}

impl AuthClass {
    /// Every class, in the order the page shows them.
    pub const ALL: [AuthClass; 7] = [
        AuthClass::Verified,
        AuthClass::MtaSts,
        AuthClass::Dane,
        AuthClass::Opportunistic,
        AuthClass::Plaintext,
        AuthClass::Local,
        AuthClass::None,
    ];

    /// Words for people.
    pub fn label(self) -> &'static str {
        match self {
            AuthClass::Verified => "verified",
            AuthClass::MtaSts => "MTA-STS",
            AuthClass::Dane => "DANE",
            AuthClass::Opportunistic => "opportunistic",
            AuthClass::Plaintext => "plaintext",
            AuthClass::Local => "local",
            AuthClass::None => "no connection",
        }
    }

    /// The colour of this class on the page (Okabe–Ito palette).
    pub fn colour(self) -> &'static str {
        match self {
            AuthClass::Verified => "#009e73",
            AuthClass::MtaSts => "#0072b2",
            AuthClass::Dane => "#56b4e9",
            AuthClass::Opportunistic => "#e69f00",
            AuthClass::Plaintext => "#d55e00",
            AuthClass::Local => "#999999",
            AuthClass::None => "#cccccc",
        }
    }
}

/// Colour of deferrals in the causes chart.
pub const DEFERRED_COLOUR: &str = "#e69f00";
/// Colour of bounces in the causes chart.
pub const BOUNCED_COLOUR: &str = "#cc79a7";

/// One delivery attempt for one recipient, as the queue reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// When the attempt ended, Unix seconds.
    pub time: u64,
    /// The message's queue id.
    pub queue_id: String,
    /// The envelope sender's domain; empty for the null sender (`MAIL FROM:<>`).
    pub sender_domain: String,
    /// The recipient's domain.
    pub rcpt_domain: String,
    /// What happened.
    pub outcome: Outcome,
    /// The transport used (or [`TlsClass::None`] when no session was made).
    pub tls: TlsClass,
    /// How the peer was authenticated.
    pub auth: AuthClass,
    /// For deferrals and bounces: the enhanced status code and a few words, e.g.
    /// `4.4.316 connection refused`. Cut to [`MAX_CAUSE_CHARS`] when recorded.
    pub cause: Option<String>,
}

/// `s` cut to at most `max` characters.
fn truncate_chars(s: &mut String, max: usize) {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_bytes(s: &mut String, max: usize) {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

/// Bounds the sizes of the network-supplied fields of an event.
fn bound(mut ev: DeliveryEvent) -> DeliveryEvent {
    truncate_bytes(&mut ev.sender_domain, MAX_DOMAIN_BYTES);
    truncate_bytes(&mut ev.rcpt_domain, MAX_DOMAIN_BYTES);
    truncate_bytes(&mut ev.queue_id, 64);
    if let Some(c) = ev.cause.as_mut() {
        truncate_chars(c, MAX_CAUSE_CHARS);
    }
    ev
}

// ---------------------------------------------------------------------------------------------
// Event log
// ---------------------------------------------------------------------------------------------

/// The store of delivery events: a bounded in-memory list, mirrored to an append-only JSON
/// lines file when opened with [`EventLog::open`].
///
/// Thread-safe (one mutex inside); share it with `Arc<EventLog>`. Disk errors never reach the
/// caller: they are logged (once per run of failures) and the in-memory list carries on.
pub struct EventLog {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Kept events, oldest first (by the time they were recorded).
    events: VecDeque<DeliveryEvent>,
    file: Option<LogFile>,
}

struct LogFile {
    dir: PathBuf,
    /// Append handle; `None` after a failed reopen (retried at the next record).
    handle: Option<File>,
    /// Lines in the file (good or bad).
    lines: usize,
    /// Oldest event time in the file.
    oldest: u64,
    /// True while writes fail, so a broken disk logs one warning, not one per event.
    failing: bool,
}

impl LogFile {
    fn path(&self) -> PathBuf {
        self.dir.join(EVENTS_FILE)
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("EventLog")
            .field("events", &inner.events.len())
            .field("dir", &inner.file.as_ref().map(|l| l.dir.clone()))
            .finish()
    }
}

impl EventLog {
    /// Opens (creating it if needed) the report directory `dir`, normally `<data>/report`,
    /// and loads the events of the last [`KEEP_SECS`] from its `events.jsonl`. Lines that do
    /// not parse are skipped (and logged); if there were any, or old events, or a torn last
    /// line, the file is rewritten with just the kept events.
    pub fn open(dir: &Path) -> Result<EventLog, String> {
        EventLog::open_at(dir, unix_now())
    }

    fn open_at(dir: &Path, now: u64) -> Result<EventLog, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(EVENTS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let cutoff = now.saturating_sub(KEEP_SECS);
        let (mut lines, mut bad, mut old) = (0usize, 0usize, 0usize);
        let mut oldest = u64::MAX;
        let mut events = Vec::new();
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            lines += 1;
            match serde_json::from_slice::<DeliveryEvent>(line) {
                Ok(ev) if ev.time < cutoff => old += 1,
                Ok(ev) => {
                    oldest = oldest.min(ev.time);
                    events.push(bound(ev));
                }
                Err(_) => bad += 1,
            }
        }
        if bad > 0 {
            tracing::warn!(file = %path.display(), bad, "report: skipped unreadable event lines");
        }
        events.sort_by_key(|e| e.time);
        let dropped = events.len().saturating_sub(MAX_EVENTS);
        let events: VecDeque<DeliveryEvent> = events.into_iter().skip(dropped).collect();
        let torn = !bytes.is_empty() && bytes.last() != Some(&b'\n');
        let mut file = LogFile {
            dir: dir.to_path_buf(),
            handle: None,
            lines,
            oldest,
            failing: false,
        };
        if bad > 0 || old > 0 || torn || lines > 2 * events.len() + COMPACT_SLACK {
            rewrite(&mut file, &events).map_err(|e| format!("{}: {e}", path.display()))?;
        } else {
            file.handle = Some(open_append(&path).map_err(|e| format!("{}: {e}", path.display()))?);
        }
        Ok(EventLog {
            inner: Mutex::new(Inner {
                events,
                file: Some(file),
            }),
        })
    }

    /// An event log without a file (tests, or when the data directory is read-only).
    pub fn memory() -> EventLog {
        EventLog {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                file: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent list (every step is a push or a
        // pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the next [`EventLog::record`] may rewrite the whole file (long; callers on
    /// the async runtime then record from a blocking thread).
    pub fn rewrite_due(&self) -> bool {
        let inner = self.lock();
        // As the next record will see it: one line and one event more.
        inner.file.as_ref().is_some_and(|f| {
            rewrite_needed(f.lines + 1, f.oldest, inner.events.len() + 1, unix_now())
        })
    }

    /// Records one event: kept in memory and appended to the file as one line (one `write`
    /// per event, no fsync: losing the last events in a crash only thins the report). Events
    /// older than [`KEEP_SECS`] and those beyond [`MAX_EVENTS`] are dropped, oldest first. Now
    /// and then the file is rewritten to drop what memory no longer holds.
    pub fn record(&self, ev: DeliveryEvent) {
        self.record_at(ev, unix_now());
    }

    fn record_at(&self, ev: DeliveryEvent, now: u64) {
        let ev = bound(ev);
        let mut guard = self.lock();
        let inner = &mut *guard;
        let cutoff = now.saturating_sub(KEEP_SECS);
        if let Some(file) = inner.file.as_mut() {
            append(file, &ev);
        }
        inner.events.push_back(ev);
        while inner.events.len() > MAX_EVENTS
            || inner.events.front().is_some_and(|e| e.time < cutoff)
        {
            inner.events.pop_front();
        }
        if let Some(file) = inner.file.as_mut()
            && rewrite_needed(file.lines, file.oldest, inner.events.len(), now)
            && let Err(e) = rewrite(file, &inner.events)
        {
            tracing::warn!(file = %file.path().display(), error = %e, "report: rewriting the events file failed");
        }
    }

    /// The kept events with `time >= t`, oldest first.
    pub fn since(&self, t: u64) -> Vec<DeliveryEvent> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.time >= t)
            .cloned()
            .collect()
    }

    /// The summary of `window` ending at `now` (shorthand for [`summarize`] over
    /// [`EventLog::since`]).
    pub fn summary(&self, now: u64, window: Window) -> Summary {
        let events = self.since(now.saturating_sub(window.secs()));
        summarize(&events, now, window)
    }

    /// Number of events held in memory.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// True when no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The file is rewritten when it holds more than twice the lines memory keeps (plus slack), or
/// its oldest line is well past [`KEEP_SECS`].
fn rewrite_needed(lines: usize, oldest: u64, kept: usize, now: u64) -> bool {
    lines > 2 * kept + COMPACT_SLACK || oldest.saturating_add(KEEP_SECS + AGE_SLACK_SECS) < now
}

/// Appends one event line; logs the first failure of a run of failures.
fn append(file: &mut LogFile, ev: &DeliveryEvent) {
    let result = (|| -> std::io::Result<()> {
        let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if file.handle.is_none() {
            file.handle = Some(open_append(&file.path())?);
        }
        match file.handle.as_mut() {
            Some(h) => h.write_all(&line),
            None => Ok(()),
        }
    })();
    match result {
        Ok(()) => {
            file.lines += 1;
            file.oldest = file.oldest.min(ev.time);
            if file.failing {
                tracing::info!(file = %file.path().display(), "report: writing events works again");
                file.failing = false;
            }
        }
        Err(e) => {
            if !file.failing {
                tracing::warn!(file = %file.path().display(), error = %e, "report: cannot append event");
                file.failing = true;
            }
            // A half-written line may be left; the next open skips it and rewrites the file.
            file.handle = None;
        }
    }
}

/// Replaces the file with exactly `events` (temp file, fsync, rename, fsync of the directory).
fn rewrite(file: &mut LogFile, events: &VecDeque<DeliveryEvent>) -> std::io::Result<()> {
    let path = file.path();
    let tmp = file.dir.join(format!("{EVENTS_FILE}.tmp"));
    {
        let mut w = std::io::BufWriter::new(File::create(&tmp)?);
        for ev in events {
            serde_json::to_writer(&mut w, ev).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    file.handle = None;
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = File::open(&file.dir) {
        let _ = d.sync_all();
    }
    file.lines = events.len();
    file.oldest = events.iter().map(|e| e.time).min().unwrap_or(u64::MAX);
    file.handle = Some(open_append(&path)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

/// The span a report covers, ending now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// The last 24 hours.
    Day,
    /// The last 7 days.
    Week,
}

impl Window {
    /// Parses the `window` query parameter: `day` or `week` (case-insensitive).
    pub fn from_query(s: &str) -> Option<Window> {
        if s.eq_ignore_ascii_case("day") {
            Some(Window::Day)
        } else if s.eq_ignore_ascii_case("week") {
            Some(Window::Week)
        } else {
            None
        }
    }

    /// The query value, `day` or `week`.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Week => "week",
        }
    }

    /// Length in seconds.
    pub fn secs(self) -> u64 {
        match self {
            Window::Day => 86_400,
            Window::Week => 7 * 86_400,
        }
    }

    /// Words for people: `last 24 hours` or `last 7 days`.
    pub fn label(self) -> &'static str {
        match self {
            Window::Day => "last 24 hours",
            Window::Week => "last 7 days",
        }
    }
}

/// Counts by [`TlsClass`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCounts {
    /// TLS 1.3.
    pub tls13: u64,
    /// TLS 1.2.
    pub tls12: u64,
    /// No TLS.
    pub plaintext: u64,
    /// Local delivery.
    pub local: u64,
    /// No connection.
    pub none: u64,
}

impl TlsCounts {
    /// The count of `class`.
    pub fn get(&self, class: TlsClass) -> u64 {
        match class {
            TlsClass::Tls13 => self.tls13,
            TlsClass::Tls12 => self.tls12,
            TlsClass::Plaintext => self.plaintext,
            TlsClass::Local => self.local,
            TlsClass::None => self.none,
        }
    }

    fn slot(&mut self, class: TlsClass) -> &mut u64 {
        match class {
            TlsClass::Tls13 => &mut self.tls13,
            TlsClass::Tls12 => &mut self.tls12,
            TlsClass::Plaintext => &mut self.plaintext,
            TlsClass::Local => &mut self.local,
            TlsClass::None => &mut self.none,
        }
    }

    fn merge(&mut self, o: &TlsCounts) {
        for c in TlsClass::ALL {
            *self.slot(c) += o.get(c);
        }
    }
}

/// Counts by [`AuthClass`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthCounts {
    /// Verified against trusted roots.
    pub verified: u64,
    /// Verified under MTA-STS `enforce`.
    pub mta_sts: u64,
    /// Authenticated by DANE.
    pub dane: u64,
    /// TLS without authentication.
    pub opportunistic: u64,
    /// No TLS.
    pub plaintext: u64,
    /// Local delivery.
    pub local: u64,
    /// No connection.
    pub none: u64,
}

impl AuthCounts {
    /// The count of `class`.
    pub fn get(&self, class: AuthClass) -> u64 {
        match class {
            AuthClass::Verified => self.verified,
            AuthClass::MtaSts => self.mta_sts,
            AuthClass::Dane => self.dane,
            AuthClass::Opportunistic => self.opportunistic,
            AuthClass::Plaintext => self.plaintext,
            AuthClass::Local => self.local,
            AuthClass::None => self.none,
        }
    }

    fn slot(&mut self, class: AuthClass) -> &mut u64 {
        match class {
            AuthClass::Verified => &mut self.verified,
            AuthClass::MtaSts => &mut self.mta_sts,
            AuthClass::Dane => &mut self.dane,
            AuthClass::Opportunistic => &mut self.opportunistic,
            AuthClass::Plaintext => &mut self.plaintext,
            AuthClass::Local => &mut self.local,
            AuthClass::None => &mut self.none,
        }
    }

    fn merge(&mut self, o: &AuthCounts) {
        for c in AuthClass::ALL {
            *self.slot(c) += o.get(c);
        }
    }
}

/// One domain's line in a summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRow {
    /// The domain, lowercased, without a trailing dot; empty for the null sender; [`OTHER`]
    /// for the folded row.
    pub domain: String,
    /// For the [`OTHER`] row, how many domains it stands for; 0 for a real domain.
    pub folded: usize,
    /// Messages delivered (one per recipient).
    pub delivered: u64,
    /// Deferred attempts.
    pub deferred: u64,
    /// Bounces.
    pub bounced: u64,
    /// Delivered, by transport.
    pub tls: TlsCounts,
    /// Delivered, by authentication.
    pub auth: AuthCounts,
}

impl DomainRow {
    /// Every event counted in this row.
    pub fn volume(&self) -> u64 {
        self.delivered + self.deferred + self.bounced
    }

    fn add(&mut self, ev: &DeliveryEvent) {
        match ev.outcome {
            Outcome::Delivered => {
                self.delivered += 1;
                *self.tls.slot(ev.tls) += 1;
                *self.auth.slot(ev.auth) += 1;
            }
            Outcome::Deferred => self.deferred += 1,
            Outcome::Bounced => self.bounced += 1,
        }
    }

    fn merge(&mut self, o: &DomainRow) {
        self.delivered += o.delivered;
        self.deferred += o.deferred;
        self.bounced += o.bounced;
        self.tls.merge(&o.tls);
        self.auth.merge(&o.auth);
    }
}

/// Deferrals and bounces sharing one cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseRow {
    /// The cause as recorded (`(no cause recorded)` when there was none), or [`OTHER`].
    pub cause: String,
    /// For the [`OTHER`] row, how many causes it stands for; 0 otherwise.
    pub folded: usize,
    /// Deferred attempts with this cause.
    pub deferred: u64,
    /// Bounces with this cause.
    pub bounced: u64,
}

impl CauseRow {
    /// Deferred plus bounced.
    pub fn total(&self) -> u64 {
        self.deferred + self.bounced
    }
}

/// Totals over the whole window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Messages delivered (one per recipient), local ones included.
    pub delivered: u64,
    /// Deferred attempts.
    pub deferred: u64,
    /// Bounces.
    pub bounced: u64,
    /// Delivered, by transport.
    pub tls: TlsCounts,
    /// Delivered, by authentication.
    pub auth: AuthCounts,
    /// Distinct destination domains.
    pub destinations: usize,
    /// Distinct sender domains.
    pub sources: usize,
}

impl Totals {
    /// Delivered over the network (everything but local delivery and the odd event without a
    /// connection): the base of the percentages on the page.
    pub fn remote_delivered(&self) -> u64 {
        self.tls.tls13 + self.tls.tls12 + self.tls.plaintext
    }
}

/// What [`summarize`] found in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The window.
    pub window: Window,
    /// Start of the window, Unix seconds (events at or after it are counted).
    pub from: u64,
    /// End of the window (the `now` given to [`summarize`]).
    pub to: u64,
    /// Totals.
    pub totals: Totals,
    /// Per recipient domain, busiest first, at most [`TOP_N`] plus [`OTHER`].
    pub destinations: Vec<DomainRow>,
    /// Per sender domain, likewise.
    pub sources: Vec<DomainRow>,
    /// Deferrals and bounces by cause, most frequent first, at most [`TOP_N`] plus [`OTHER`].
    pub causes: Vec<CauseRow>,
}

/// A domain as compared and shown: lowercase, no trailing dot.
fn norm_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Sorts rows busiest first (then by name, for a stable page) and folds all past [`TOP_N`]
/// into one [`OTHER`] row at the end.
fn top_domains(map: HashMap<String, DomainRow>) -> Vec<DomainRow> {
    let mut rows: Vec<DomainRow> = map.into_values().collect();
    rows.sort_by(|a, b| {
        b.volume()
            .cmp(&a.volume())
            .then_with(|| a.domain.cmp(&b.domain))
    });
    if rows.len() > TOP_N {
        let rest = rows.split_off(TOP_N);
        let mut other = DomainRow {
            domain: OTHER.to_string(),
            folded: rest.len(),
            ..DomainRow::default()
        };
        for r in &rest {
            other.merge(r);
        }
        rows.push(other);
    }
    rows
}

/// Counts the events of `window` ending at `now` (those with `time >= now - window`; events
/// stamped a little in the future, from a clock step, are counted too).
pub fn summarize(events: &[DeliveryEvent], now: u64, window: Window) -> Summary {
    let from = now.saturating_sub(window.secs());
    let mut totals = Totals::default();
    let mut dest: HashMap<String, DomainRow> = HashMap::new();
    let mut src: HashMap<String, DomainRow> = HashMap::new();
    let mut causes: HashMap<String, CauseRow> = HashMap::new();
    for ev in events.iter().filter(|e| e.time >= from) {
        match ev.outcome {
            Outcome::Delivered => {
                totals.delivered += 1;
                *totals.tls.slot(ev.tls) += 1;
                *totals.auth.slot(ev.auth) += 1;
            }
            Outcome::Deferred | Outcome::Bounced => {
                if ev.outcome == Outcome::Deferred {
                    totals.deferred += 1;
                } else {
                    totals.bounced += 1;
                }
                let key = match ev.cause.as_deref().map(str::trim) {
                    Some(c) if !c.is_empty() => c.to_string(),
                    _ => "(no cause recorded)".to_string(),
                };
                let row = causes.entry(key).or_insert_with_key(|k| CauseRow {
                    cause: k.clone(),
                    ..CauseRow::default()
                });
                if ev.outcome == Outcome::Deferred {
                    row.deferred += 1;
                } else {
                    row.bounced += 1;
                }
            }
        }
        for (map, domain) in [(&mut dest, &ev.rcpt_domain), (&mut src, &ev.sender_domain)] {
            map.entry(norm_domain(domain))
                .or_insert_with_key(|k| DomainRow {
                    domain: k.clone(),
                    ..DomainRow::default()
                })
                .add(ev);
        }
    }
    totals.destinations = dest.len();
    totals.sources = src.len();

    let mut causes: Vec<CauseRow> = causes.into_values().collect();
    causes.sort_by(|a, b| {
        b.total()
            .cmp(&a.total())
            .then_with(|| a.cause.cmp(&b.cause))
    });
    if causes.len() > TOP_N {
        let rest = causes.split_off(TOP_N);
        causes.push(CauseRow {
            cause: OTHER.to_string(),
            folded: rest.len(),
            deferred: rest.iter().map(|r| r.deferred).sum(),
            bounced: rest.iter().map(|r| r.bounced).sum(),
        });
    }
    Summary {
        window,
        from,
        to: now,
        totals,
        destinations: top_domains(dest),
        sources: top_domains(src),
        causes,
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A certificate whose expiry the page shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertStatus {
    /// The names it is valid for.
    pub names: Vec<String>,
    /// End of validity, Unix seconds.
    pub not_after: u64,
    /// Whole days from now to `not_after`, rounded down (negative once expired).
    pub days_left: i64,
    /// Where it comes from: a file path, `mta-sts host`, ...
    pub source: String,
}

impl CertStatus {
    /// A status with `days_left` computed from `now`.
    pub fn new(names: Vec<String>, not_after: u64, source: impl Into<String>, now: u64) -> Self {
        let secs =
            i64::try_from(not_after).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(i64::MAX);
        CertStatus {
            names,
            not_after,
            days_left: secs.div_euclid(86_400),
            source: source.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

/// Escapes text for HTML content and (double- or single-quoted) attribute values. Control
/// characters, which have no place in a page, become U+FFFD.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `s` shortened to `max` characters with an ellipsis.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `part` as a percentage of `whole`, one decimal, or `–` when `whole` is 0.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".to_string()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// A series (one colour) of a stacked bar chart.
struct Series {
    label: &'static str,
    colour: &'static str,
}

/// One bar: a label, one value per series, and a note written after the bar.
struct Bar {
    label: String,
    values: Vec<u64>,
    note: String,
}

/// Geometry of a chart.
struct Layout {
    width: u32,
    label_width: u32,
    bar_width: u32,
    label_chars: usize,
}

const HALF: Layout = Layout {
    width: 590,
    label_width: 170,
    bar_width: 210,
    label_chars: 26,
};

const FULL: Layout = Layout {
    width: 1200,
    label_width: 520,
    bar_width: 480,
    label_chars: 80,
};

const ROW_HEIGHT: u32 = 22;
const BAR_HEIGHT: u32 = 16;

/// A horizontal stacked bar chart as an inline `<svg class="chart">`, preceded by its legend
/// (outside the SVG, so the chart's area holds only data marks and their labels).
fn stacked_chart(
    out: &mut String,
    id: &str,
    title: &str,
    layout: &Layout,
    series: &[Series],
    bars: &[Bar],
) {
    let max_total = bars
        .iter()
        .map(|b| b.values.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let _ = write!(out, "<ul class=\"legend\" aria-hidden=\"true\">");
    for s in series {
        let _ = write!(
            out,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{}</li>",
            s.colour,
            html_escape(s.label)
        );
    }
    out.push_str("</ul>\n");
    if max_total == 0 {
        let _ = writeln!(
            out,
            "<svg class=\"chart\" id=\"{id}\" role=\"img\" aria-label=\"{t}: no data in this window\" \
             width=\"{w}\" height=\"40\" viewBox=\"0 0 {w} 40\">\
             <text class=\"empty\" x=\"{x}\" y=\"25\" text-anchor=\"middle\">no data in this window</text></svg>",
            t = html_escape(title),
            w = layout.width,
            x = layout.width / 2,
        );
        return;
    }
    let height = bars.len() as u32 * ROW_HEIGHT + 6;
    let _ = writeln!(
        out,
        "<svg class=\"chart\" id=\"{id}\" role=\"img\" aria-label=\"{t}\" width=\"{w}\" \
         height=\"{height}\" viewBox=\"0 0 {w} {height}\">",
        t = html_escape(title),
        w = layout.width,
    );
    let bar_x = layout.label_width + 6;
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{bar_x}\" y1=\"0\" x2=\"{bar_x}\" y2=\"{height}\"/>"
    );
    for (row, bar) in bars.iter().enumerate() {
        let y = row as u32 * ROW_HEIGHT + 3;
        let text_y = y + BAR_HEIGHT - 4;
        let label = html_escape(&shorten(&bar.label, layout.label_chars));
        let _ = writeln!(
            out,
            "<text class=\"label\" x=\"{lx}\" y=\"{text_y}\" text-anchor=\"end\">{label}<title>{full}</title></text>",
            lx = layout.label_width,
            full = html_escape(&bar.label),
        );
        let mut x = f64::from(bar_x);
        for (s, &v) in series.iter().zip(&bar.values) {
            if v == 0 {
                continue;
            }
            // Small counts stay visible: at least 2 px.
            let w = (v as f64 * f64::from(layout.bar_width) / max_total as f64).max(2.0);
            let _ = writeln!(
                out,
                "<rect class=\"bar\" x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"{BAR_HEIGHT}\" \
                 fill=\"{c}\"><title>{d} — {l}: {v}</title></rect>",
                c = s.colour,
                d = html_escape(&bar.label),
                l = html_escape(s.label),
            );
            x += w;
        }
        let _ = writeln!(
            out,
            "<text class=\"note\" x=\"{nx:.1}\" y=\"{text_y}\">{note}</text>",
            nx = x + 6.0,
            note = html_escape(&bar.note),
        );
    }
    out.push_str("</svg>\n");
}

/// The label of a domain row: the null sender and the folded row get words.
fn domain_label(row: &DomainRow, null_name: &str) -> String {
    if row.folded > 0 {
        format!("{OTHER} {} domains", row.folded)
    } else if row.domain.is_empty() {
        null_name.to_string()
    } else {
        row.domain.clone()
    }
}

/// The note after a domain's bar: delivered, deferred and bounced, leaving out zeros (but
/// never saying nothing).
fn domain_note(row: &DomainRow) -> String {
    let mut parts = Vec::new();
    if row.delivered > 0 || row.volume() == 0 {
        parts.push(row.delivered.to_string());
    }
    if row.deferred > 0 {
        parts.push(format!("{} deferred", row.deferred));
    }
    if row.bounced > 0 {
        parts.push(format!("{} bounced", row.bounced));
    }
    parts.join(" · ")
}

const TLS_SHOWN: [TlsClass; 4] = [
    TlsClass::Tls13,
    TlsClass::Tls12,
    TlsClass::Plaintext,
    TlsClass::Local,
];
const AUTH_SHOWN: [AuthClass; 6] = [
    AuthClass::Verified,
    AuthClass::MtaSts,
    AuthClass::Dane,
    AuthClass::Opportunistic,
    AuthClass::Plaintext,
    AuthClass::Local,
];

fn tls_chart(out: &mut String, id: &str, title: &str, rows: &[DomainRow], null_name: &str) {
    let series: Vec<Series> = TLS_SHOWN
        .iter()
        .map(|c| Series {
            label: c.label(),
            colour: c.colour(),
        })
        .collect();
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: domain_label(r, null_name),
            values: TLS_SHOWN.iter().map(|&c| r.tls.get(c)).collect(),
            note: domain_note(r),
        })
        .collect();
    stacked_chart(out, id, title, &HALF, &series, &bars);
}

fn auth_chart(out: &mut String, id: &str, title: &str, rows: &[DomainRow]) {
    let series: Vec<Series> = AUTH_SHOWN
        .iter()
        .map(|c| Series {
            label: c.label(),
            colour: c.colour(),
        })
        .collect();
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: domain_label(r, "(null sender)"),
            values: AUTH_SHOWN.iter().map(|&c| r.auth.get(c)).collect(),
            note: domain_note(r),
        })
        .collect();
    stacked_chart(out, id, title, &HALF, &series, &bars);
}

fn causes_chart(out: &mut String, causes: &[CauseRow]) {
    let series = [
        Series {
            label: "deferred",
            colour: DEFERRED_COLOUR,
        },
        Series {
            label: "bounced",
            colour: BOUNCED_COLOUR,
        },
    ];
    let bars: Vec<Bar> = causes
        .iter()
        .map(|c| {
            let label = if c.folded > 0 {
                format!("{OTHER} {} causes", c.folded)
            } else {
                c.cause.clone()
            };
            let mut note = String::new();
            if c.deferred > 0 {
                let _ = write!(note, "{} deferred", c.deferred);
            }
            if c.bounced > 0 {
                if !note.is_empty() {
                    note.push_str(" · ");
                }
                let _ = write!(note, "{} bounced", c.bounced);
            }
            Bar {
                label,
                values: vec![c.deferred, c.bounced],
                note,
            }
        })
        .collect();
    stacked_chart(
        out,
        "chart-causes",
        "Deferrals and bounces by cause",
        &FULL,
        &series,
        &bars,
    );
}

/// "How others see us": the TLS-RPT reports received, per reporter and day (sessions that
/// succeeded and failed, a chart), failures by result type (a chart) and by our MX host.
fn others_section(out: &mut String, o: &OthersView<'_>) {
    let _ = writeln!(
        out,
        "<section id=\"others\"><h2>How others see us: TLS-RPT reports received in the last {} days</h2>",
        o.days
    );
    if o.rows.is_empty() {
        let why = if o.receiving {
            "No reports received yet."
        } else {
            "Not receiving reports: set [tls_rpt] report_addresses to the rua of your _smtp._tls records."
        };
        let _ = writeln!(out, "<p class=\"muted\">{}</p></section>", html_escape(why));
        return;
    }
    let series = [
        Series {
            label: "successful sessions",
            colour: RPT_OK_COLOUR,
        },
        Series {
            label: "failed sessions",
            colour: RPT_FAILED_COLOUR,
        },
    ];
    let bars: Vec<Bar> = o
        .rows
        .iter()
        .map(|r| Bar {
            label: format!("{} {}", r.day, r.organization),
            values: vec![r.successful, r.failed],
            note: format!(
                "{} ok · {} failed ({})",
                r.successful,
                r.failed,
                percent(r.failed, r.successful.saturating_add(r.failed))
            ),
        })
        .collect();
    out.push_str("<figure class=\"wide\"><h3>Sessions per reporter and day</h3>\n");
    stacked_chart(
        out,
        "chart-others",
        "TLS sessions others report, per reporter and day",
        &FULL,
        &series,
        &bars,
    );
    out.push_str("</figure>\n");
    let mut by_result: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut by_mx: std::collections::BTreeMap<&str, u64> = Default::default();
    for r in o.rows {
        for (k, v) in &r.by_result {
            *by_result.entry(k).or_default() += v;
        }
        for (k, v) in &r.by_mx {
            *by_mx.entry(k).or_default() += v;
        }
    }
    if !by_result.is_empty() {
        let mut results: Vec<(&str, u64)> = by_result.into_iter().collect();
        results.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let fail = [Series {
            label: "failed sessions",
            colour: RPT_FAILED_COLOUR,
        }];
        let bars: Vec<Bar> = results
            .iter()
            .map(|(k, v)| Bar {
                label: (*k).to_string(),
                values: vec![*v],
                note: v.to_string(),
            })
            .collect();
        out.push_str("<figure class=\"wide\"><h3>Failures by result type</h3>\n");
        stacked_chart(
            out,
            "chart-others-results",
            "Failures others report, by result type",
            &FULL,
            &fail,
            &bars,
        );
        out.push_str("</figure>\n<table id=\"others-mx\"><thead><tr><th>our MX host</th><th>failed sessions</th></tr></thead><tbody>\n");
        let mut mx: Vec<(&str, u64)> = by_mx.into_iter().collect();
        mx.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (host, n) in mx {
            let _ = writeln!(out, "<tr><td>{}</td><td>{n}</td></tr>", html_escape(host));
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n");
}

fn cert_table(out: &mut String, certs: &[&CertStatus], now: u64) {
    out.push_str(
        "<table class=\"certs\"><thead><tr><th>Days left</th><th>Expires (UTC)</th>\
         <th>Names</th><th>Source</th></tr></thead><tbody>\n",
    );
    for c in certs {
        let expired = c.not_after <= now;
        let (class, days) = if expired {
            ("expired", format!("expired {} d ago", -c.days_left.min(0)))
        } else if c.days_left < WARN_DAYS {
            ("soon", c.days_left.to_string())
        } else {
            ("ok", c.days_left.to_string())
        };
        let _ = writeln!(
            out,
            "<tr class=\"{class}\"><td class=\"num\">{days}</td><td>{date}</td><td>{names}</td><td>{src}</td></tr>",
            date = utc_day(c.not_after),
            names = html_escape(&c.names.join(", ")),
            src = html_escape(&c.source),
        );
    }
    out.push_str("</tbody></table>\n");
}

const STYLE: &str = "\
:root{color-scheme:light}
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:12px;color:#1a1a1a;background:#fff}
h1{font-size:20px;margin:0 0 4px}
h2{font-size:15px;margin:0 0 6px}
.sub{color:#555;margin:0 0 10px}
nav a{margin-right:10px}
nav a.current{font-weight:bold;text-decoration:none;color:#1a1a1a}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 14px}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:120px}
.tile .n{font-size:22px;font-weight:bold}
.tile .k{color:#555;font-size:12px}
.tile ul{list-style:none;margin:0;padding:0;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(610px,1fr));gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;overflow-x:auto}
figure.wide{grid-column:1/-1}
.legend{list-style:none;margin:0 0 4px;padding:0;display:flex;flex-wrap:wrap;gap:12px;font-size:12px}
.swatch{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
svg.chart{display:block;font-size:11px}
svg.chart rect.bar{shape-rendering:crispEdges}
svg.chart .label{fill:#1a1a1a}
svg.chart .note{fill:#444}
svg.chart .empty{fill:#777;font-style:italic;font-size:13px}
svg.chart .axis{stroke:#bbb;stroke-width:1}
section{margin-top:16px}
table.certs{border-collapse:collapse;font-size:13px;margin-bottom:10px}
table.certs th,table.certs td{border:1px solid #ddd;padding:3px 8px;text-align:left}
table.certs td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.soon td{background:#fff0c2}
tr.expired td{background:#ffd6d6;color:#8a0000;font-weight:bold}
.muted{color:#666}
footer{margin-top:18px;color:#777;font-size:12px}
";

/// Writes the report page: one HTML document with everything inline (CSS, SVG charts; no
/// script, nothing fetched).
///
/// `token_query` is added to the page's own links so an admin token survives switching the
/// window: empty, or a query fragment such as `token=abc` (already percent-encoded; a leading
/// `?` or `&` is ignored). Links come out as `?window=week&token=abc`, HTML-escaped.
///
/// The page shows the window and its totals, four charts (`<svg class="chart">` with ids
/// `chart-dest-tls`, `chart-dest-auth`, `chart-src-tls`, `chart-causes`; each data mark a
/// `<rect class="bar">` with a `<title>`), and the certificates: those expiring within
/// [`NEAR_EXPIRY_DAYS`], then all of them (fewer than [`WARN_DAYS`] left highlighted, expired
/// in red).
pub fn render_page(
    summary: &Summary,
    certs: &[CertStatus],
    now: u64,
    window: Window,
    token_query: &str,
) -> String {
    render_page_with(summary, certs, None, now, window, token_query)
}

/// What others report about us (TLS-RPT) for the page: per reporter and day, and the days
/// the page covers.
pub struct OthersView<'a> {
    pub days: u64,
    pub receiving: bool,
    pub rows: &'a [crate::tlsrpt::store::DaySummary],
}

/// Colour of successful sessions in the TLS-RPT charts.
pub const RPT_OK_COLOUR: &str = "#009e73";
/// Colour of failed sessions in the TLS-RPT charts.
pub const RPT_FAILED_COLOUR: &str = "#d55e00";

/// [`render_page`] with the "how others see us" section (TLS-RPT reports received).
pub fn render_page_with(
    summary: &Summary,
    certs: &[CertStatus],
    others: Option<&OthersView<'_>>,
    now: u64,
    window: Window,
    token_query: &str,
) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let t = &summary.totals;
    let extra = token_query.trim_start_matches(['?', '&']);
    let link = |w: Window| {
        let mut q = format!("?window={}", w.as_str());
        if !extra.is_empty() {
            q.push('&');
            q.push_str(extra);
        }
        html_escape(&q)
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>Moat transport security — {label}</title><style>{STYLE}</style></head><body>\n",
        label = window.label(),
    );
    let _ = writeln!(
        out,
        "<header><h1>Transport security</h1>\
         <p class=\"sub\">How mail left this server in the {label}: {from} to {to} UTC.</p>\
         <nav aria-label=\"window\"><a href=\"{day}\"{dc}>Last 24 h</a><a href=\"{week}\"{wc}>Last 7 days</a></nav>",
        label = window.label(),
        from = utc_minutes(summary.from),
        to = utc_minutes(summary.to),
        day = link(Window::Day),
        week = link(Window::Week),
        dc = if window == Window::Day {
            " class=\"current\" aria-current=\"page\""
        } else {
            ""
        },
        wc = if window == Window::Week {
            " class=\"current\" aria-current=\"page\""
        } else {
            ""
        },
    );

    // Totals.
    let remote = t.remote_delivered();
    out.push_str("<div class=\"tiles\">\n");
    for (id, n, k) in [
        ("total-delivered", t.delivered, "delivered"),
        ("total-deferred", t.deferred, "deferred"),
        ("total-bounced", t.bounced, "bounced"),
    ] {
        let _ = writeln!(
            out,
            "<div class=\"tile\"><div class=\"n\" id=\"{id}\">{n}</div><div class=\"k\">{k}</div></div>"
        );
    }
    let _ = write!(
        out,
        "<div class=\"tile\"><div class=\"k\">transport, of {remote} sent over the network{local}</div><ul>",
        local = if t.tls.local > 0 {
            format!(" (+{} local)", t.tls.local)
        } else {
            String::new()
        },
    );
    for c in [TlsClass::Tls13, TlsClass::Tls12, TlsClass::Plaintext] {
        let _ = write!(
            out,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{}: <b>{}</b></li>",
            c.colour(),
            c.label(),
            percent(t.tls.get(c), remote)
        );
    }
    out.push_str("</ul></div>\n<div class=\"tile\"><div class=\"k\">authentication of the receiving server</div><ul>");
    for c in [
        AuthClass::Verified,
        AuthClass::MtaSts,
        AuthClass::Dane,
        AuthClass::Opportunistic,
        AuthClass::Plaintext,
    ] {
        if c == AuthClass::Dane && t.auth.dane == 0 {
            continue;
        }
        let _ = write!(
            out,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{}: <b>{}</b></li>",
            c.colour(),
            c.label(),
            percent(t.auth.get(c), remote)
        );
    }
    out.push_str("</ul></div>\n</div></header>\n");

    // Charts.
    out.push_str("<main><div class=\"grid\">\n");
    out.push_str("<figure><h2>Delivered per destination domain, by TLS version</h2>\n");
    tls_chart(
        &mut out,
        "chart-dest-tls",
        "Delivered messages per destination domain by TLS version",
        &summary.destinations,
        "(empty domain)",
    );
    out.push_str(
        "</figure>\n<figure><h2>Delivered per destination domain, by authentication</h2>\n",
    );
    auth_chart(
        &mut out,
        "chart-dest-auth",
        "Delivered messages per destination domain by authentication of the receiving server",
        &summary.destinations,
    );
    out.push_str("</figure>\n<figure><h2>Delivered per sender domain, by TLS version</h2>\n");
    tls_chart(
        &mut out,
        "chart-src-tls",
        "Delivered messages per sender domain by TLS version",
        &summary.sources,
        "(null sender)",
    );
    out.push_str("</figure>\n<figure class=\"wide\"><h2>Deferrals and bounces by cause</h2>\n");
    causes_chart(&mut out, &summary.causes);
    out.push_str("</figure>\n</div>\n");

    // Certificates.
    let mut sorted: Vec<&CertStatus> = certs.iter().collect();
    sorted.sort_by(|a, b| a.not_after.cmp(&b.not_after).then(a.names.cmp(&b.names)));
    let near: Vec<&CertStatus> = sorted
        .iter()
        .copied()
        .filter(|c| c.not_after <= now || c.days_left < NEAR_EXPIRY_DAYS)
        .collect();
    let _ = writeln!(
        out,
        "<section id=\"certs-near\"><h2>Certificates expiring within {NEAR_EXPIRY_DAYS} days</h2>"
    );
    if near.is_empty() {
        out.push_str("<p class=\"muted\">None.</p>\n");
    } else {
        cert_table(&mut out, &near, now);
    }
    out.push_str("</section>\n<section id=\"certs-all\"><h2>All certificates</h2>\n");
    if sorted.is_empty() {
        out.push_str("<p class=\"muted\">No certificates known.</p>\n");
    } else {
        cert_table(&mut out, &sorted, now);
    }
    out.push_str("</section>\n");
    if let Some(o) = others {
        others_section(&mut out, o);
    }
    let _ = writeln!(
        out,
        "</main>\n<footer>Generated {gen} UTC by Moat. One count per recipient and \
         attempt; percentages are of messages sent over the network. Events are kept for {keep} \
         days.</footer>\n</body></html>",
        gen = utc_minutes(now),
        keep = KEEP_SECS / 86_400,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_468_016; // 2026-11-23 21:06:56 UTC

    fn ev(
        age: u64,
        from: &str,
        to: &str,
        outcome: Outcome,
        tls: TlsClass,
        auth: AuthClass,
        cause: Option<&str>,
    ) -> DeliveryEvent {
        DeliveryEvent {
            time: NOW - age,
            queue_id: "0123456789ABCDEF".into(),
            sender_domain: from.into(),
            rcpt_domain: to.into(),
            outcome,
            tls,
            auth,
            cause: cause.map(str::to_string),
        }
    }

    fn delivered(age: u64, from: &str, to: &str, tls: TlsClass, auth: AuthClass) -> DeliveryEvent {
        ev(age, from, to, Outcome::Delivered, tls, auth, None)
    }

    fn deferred(age: u64, to: &str, cause: &str) -> DeliveryEvent {
        ev(
            age,
            "moat.test",
            to,
            Outcome::Deferred,
            TlsClass::None,
            AuthClass::None,
            Some(cause),
        )
    }

    /// The `<svg>` element with id `id` in `html`.
    fn chart<'a>(html: &'a str, id: &str) -> &'a str {
        let start = html
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no {id}"));
        let start = html[..start].rfind("<svg").unwrap();
        let end = start + html[start..].find("</svg>").unwrap();
        &html[start..end]
    }

    #[test]
    fn window_query() {
        assert_eq!(Window::from_query("day"), Some(Window::Day));
        assert_eq!(Window::from_query("WEEK"), Some(Window::Week));
        assert_eq!(Window::from_query("month"), None);
        assert_eq!(Window::from_query(""), None);
        assert_eq!(Window::Week.secs(), 7 * 86_400);
    }

    #[test]
    fn summarize_counts_and_window() {
        let events = vec![
            delivered(10, "a.test", "x.test", TlsClass::Tls13, AuthClass::Verified),
            delivered(
                20,
                "a.test",
                "X.Test.",
                TlsClass::Tls12,
                AuthClass::Opportunistic,
            ),
            delivered(30, "", "y.test", TlsClass::Plaintext, AuthClass::Plaintext),
            delivered(
                40,
                "b.test",
                "local.test",
                TlsClass::Local,
                AuthClass::Local,
            ),
            deferred(50, "x.test", "4.4.316 connection refused"),
            deferred(60, "y.test", "4.4.316 connection refused"),
            ev(
                70,
                "b.test",
                "y.test",
                Outcome::Bounced,
                TlsClass::Tls13,
                AuthClass::MtaSts,
                Some("5.7.5 certificate failed MTA-STS validation"),
            ),
            ev(
                80,
                "b.test",
                "z.test",
                Outcome::Deferred,
                TlsClass::None,
                AuthClass::None,
                None,
            ),
            // Two days old: only in the week.
            delivered(
                2 * 86_400,
                "a.test",
                "x.test",
                TlsClass::Tls13,
                AuthClass::MtaSts,
            ),
            // Exactly at the day's edge: counted.
            delivered(86_400, "a.test", "x.test", TlsClass::Tls13, AuthClass::Dane),
            // Eight days old: in neither.
            delivered(
                8 * 86_400,
                "a.test",
                "x.test",
                TlsClass::Tls13,
                AuthClass::Dane,
            ),
        ];
        let s = summarize(&events, NOW, Window::Day);
        assert_eq!(s.from, NOW - 86_400);
        assert_eq!(s.totals.delivered, 5);
        assert_eq!(s.totals.deferred, 3);
        assert_eq!(s.totals.bounced, 1);
        assert_eq!(s.totals.tls.tls13, 2);
        assert_eq!(s.totals.tls.local, 1);
        assert_eq!(s.totals.remote_delivered(), 4);
        assert_eq!(s.totals.auth.dane, 1);
        assert_eq!(s.totals.destinations, 4);
        assert_eq!(s.totals.sources, 4); // a, b, moat.test, null sender

        // x.test: 3 delivered (case and trailing dot folded) + 1 deferred: busiest first.
        let x = &s.destinations[0];
        assert_eq!(x.domain, "x.test");
        assert_eq!((x.delivered, x.deferred, x.bounced), (3, 1, 0));
        assert_eq!((x.tls.tls13, x.tls.tls12), (2, 1));
        assert_eq!(
            (x.auth.verified, x.auth.opportunistic, x.auth.dane),
            (1, 1, 1)
        );
        let y = s
            .destinations
            .iter()
            .find(|r| r.domain == "y.test")
            .unwrap();
        assert_eq!((y.delivered, y.deferred, y.bounced), (1, 1, 1));
        assert_eq!(y.tls.plaintext, 1);
        assert_eq!(y.tls.tls13, 0, "TLS of a bounce is not a delivery");
        let null = s.sources.iter().find(|r| r.domain.is_empty()).unwrap();
        assert_eq!(null.delivered, 1);

        assert_eq!(s.causes.len(), 3);
        assert_eq!(s.causes[0].cause, "4.4.316 connection refused");
        assert_eq!((s.causes[0].deferred, s.causes[0].bounced), (2, 0));
        let mta = s
            .causes
            .iter()
            .find(|c| c.cause.starts_with("5.7.5"))
            .unwrap();
        assert_eq!((mta.deferred, mta.bounced), (0, 1));
        assert!(s.causes.iter().any(|c| c.cause == "(no cause recorded)"));

        let w = summarize(&events, NOW, Window::Week);
        assert_eq!(w.totals.delivered, 6);
        assert_eq!(w.destinations[0].tls.tls13, 3);

        // The summary is JSON as it is.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["window"], "day");
        assert_eq!(json["destinations"][0]["tls"]["tls13"], 2);
    }

    #[test]
    fn summarize_folds_beyond_top_n() {
        let mut events = Vec::new();
        // d00 gets 40 events, d01 39, ... d19 21: twenty domains.
        for i in 0..20u64 {
            for k in 0..(40 - i) {
                events.push(delivered(
                    k,
                    &format!("s{i:02}.test"),
                    &format!("d{i:02}.test"),
                    TlsClass::Tls13,
                    AuthClass::Verified,
                ));
            }
        }
        for i in 0..20 {
            for _ in 0..(20 - i) {
                events.push(deferred(5, "d00.test", &format!("4.4.{i} cause {i}")));
            }
        }
        let s = summarize(&events, NOW, Window::Day);
        assert_eq!(s.destinations.len(), TOP_N + 1);
        assert_eq!(s.destinations[0].domain, "d00.test");
        assert_eq!(s.destinations[0].deferred, (1..=20).sum::<u64>());
        assert_eq!(s.destinations[TOP_N - 1].domain, "d14.test");
        let other = &s.destinations[TOP_N];
        assert_eq!(other.domain, OTHER);
        assert_eq!(other.folded, 5);
        assert_eq!(other.delivered, (21..=25).sum::<u64>());
        assert_eq!(other.tls.tls13, other.delivered);
        let total: u64 = s.destinations.iter().map(|r| r.delivered).sum();
        assert_eq!(total, s.totals.delivered);
        // Sources: the null-sender-free "moat.test" row from deferrals joins the ranking.
        assert_eq!(s.sources.len(), TOP_N + 1);
        assert_eq!(s.sources[0].domain, "moat.test");

        assert_eq!(s.causes.len(), TOP_N + 1);
        assert_eq!(s.causes[0].cause, "4.4.0 cause 0");
        assert_eq!(s.causes[0].deferred, 20);
        let oc = &s.causes[TOP_N];
        assert_eq!((oc.cause.as_str(), oc.folded), (OTHER, 5));
        assert_eq!(oc.deferred, 5 + 4 + 3 + 2 + 1);
    }

    #[test]
    fn page_escapes_hostile_text() {
        let hostile = "<script>alert('x')</script>\"><img src=x onerror=1>.evil";
        let events = vec![
            delivered(1, hostile, hostile, TlsClass::Tls13, AuthClass::Verified),
            deferred(2, hostile, &format!("4.4.316 {hostile}")),
        ];
        let s = summarize(&events, NOW, Window::Day);
        let certs = [CertStatus::new(
            vec![hostile.to_string()],
            NOW + 3 * 86_400,
            format!("/etc/{hostile}"),
            NOW,
        )];
        let html = render_page(&s, &certs, NOW, Window::Day, "token=a\"b<c>&x='1'");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("'x'"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&gt;"));
        assert!(
            html.contains("href=\"?window=week&amp;token=a&quot;b&lt;c&gt;&amp;x=&#39;1&#39;\"")
        );
        // Only our own tags: every '<' opens a known element.
        for part in html.split('<').skip(1) {
            let name: String = part
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '!')
                .collect();
            assert!(
                [
                    "!DOCTYPE", "html", "head", "meta", "title", "style", "body", "header", "h1",
                    "h2", "p", "nav", "a", "div", "ul", "li", "span", "b", "main", "figure", "svg",
                    "line", "text", "rect", "section", "table", "thead", "tbody", "tr", "th", "td",
                    "footer"
                ]
                .contains(&name.as_str()),
                "unexpected tag {name:?}"
            );
        }
        assert_eq!(html_escape("a\u{0}b\u{1b}c"), "a\u{fffd}b\u{fffd}c");
    }

    #[test]
    fn page_with_data_has_bars_and_certs() {
        let events = vec![
            delivered(1, "a.test", "x.test", TlsClass::Tls13, AuthClass::Verified),
            delivered(2, "a.test", "x.test", TlsClass::Tls12, AuthClass::MtaSts),
            delivered(
                3,
                "b.test",
                "y.test",
                TlsClass::Plaintext,
                AuthClass::Plaintext,
            ),
            deferred(4, "z.test", "4.4.315 connection timed out"),
        ];
        let s = summarize(&events, NOW, Window::Week);
        let certs = vec![
            CertStatus::new(
                vec!["mx.moat.test".into()],
                NOW + 5 * 86_400,
                "certs/mx.pem",
                NOW,
            ),
            CertStatus::new(
                vec!["old.moat.test".into()],
                NOW - 86_400,
                "certs/old.pem",
                NOW,
            ),
            CertStatus::new(
                vec!["far.moat.test".into()],
                NOW + 90 * 86_400,
                "certs/far.pem",
                NOW,
            ),
        ];
        let html = render_page(&s, &certs, NOW, Window::Week, "");
        assert_eq!(
            chart(&html, "chart-dest-tls")
                .matches("class=\"bar\"")
                .count(),
            3
        );
        assert_eq!(
            chart(&html, "chart-dest-auth")
                .matches("class=\"bar\"")
                .count(),
            3
        );
        assert_eq!(
            chart(&html, "chart-src-tls")
                .matches("class=\"bar\"")
                .count(),
            3
        );
        assert_eq!(
            chart(&html, "chart-causes")
                .matches("class=\"bar\"")
                .count(),
            1
        );
        assert!(html.contains("<title>x.test — TLS 1.3: 1</title>"));
        assert!(html.contains("href=\"?window=day\""));
        assert!(html.contains("class=\"current\" aria-current=\"page\">Last 7 days"));
        assert!(!html.contains("no data in this window"));
        // Near-expiry lists the 5-day and the expired certificate, not the far one.
        let near_start = html.find("id=\"certs-near\"").unwrap();
        let near_end = html.find("id=\"certs-all\"").unwrap();
        let near = &html[near_start..near_end];
        assert!(near.contains("mx.moat.test") && near.contains("old.moat.test"));
        assert!(!near.contains("far.moat.test"));
        assert!(near.contains("<tr class=\"expired\"><td class=\"num\">expired 1 d ago"));
        assert!(near.contains("<tr class=\"soon\"><td class=\"num\">5<"));
        assert!(html[near_end..].contains("far.moat.test"));
        assert_eq!(certs[1].days_left, -1);
        assert!(html.contains("<div class=\"n\" id=\"total-delivered\">3</div>"));
        assert!(html.contains("TLS 1.3: <b>33.3%</b>"));
    }

    #[test]
    fn page_without_data() {
        let s = summarize(&[], NOW, Window::Day);
        let html = render_page(&s, &[], NOW, Window::Day, "?token=t");
        for id in [
            "chart-dest-tls",
            "chart-dest-auth",
            "chart-src-tls",
            "chart-causes",
        ] {
            let c = chart(&html, id);
            assert!(c.contains("no data in this window"), "{id}");
            assert!(!c.contains("class=\"bar\""), "{id}");
            assert!(c.contains("role=\"img\""));
        }
        assert!(html.contains("No certificates known."));
        assert!(html.contains("href=\"?window=week&amp;token=t\""));
        assert!(html.contains("transport, of 0 sent over the network"));
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn cert_days_left() {
        assert_eq!(CertStatus::new(vec![], NOW + 86_399, "", NOW).days_left, 0);
        assert_eq!(CertStatus::new(vec![], NOW + 86_400, "", NOW).days_left, 1);
        assert_eq!(CertStatus::new(vec![], NOW - 1, "", NOW).days_left, -1);
    }

    #[test]
    fn record_bounds_fields() {
        let log = EventLog::memory();
        let mut e = deferred(0, &"d".repeat(400), &"c".repeat(200));
        e.cause = Some("é".repeat(200));
        log.record_at(e, NOW);
        let got = log.since(0);
        assert_eq!(got[0].rcpt_domain.len(), 255);
        assert_eq!(
            got[0].cause.as_ref().unwrap().chars().count(),
            MAX_CAUSE_CHARS
        );
    }

    #[test]
    fn log_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join("report");
        let events: Vec<DeliveryEvent> = (0..50)
            .map(|i| {
                delivered(
                    100 - i,
                    "a.test",
                    "b.test",
                    TlsClass::Tls13,
                    AuthClass::Verified,
                )
            })
            .chain([deferred(10, "c.test", "4.4.312 DNS failure for \"c\" <x>")])
            .collect();
        {
            let log = EventLog::open_at(&rd, NOW).unwrap();
            assert!(log.is_empty());
            for e in &events {
                log.record_at(e.clone(), NOW);
            }
            assert_eq!(log.len(), 51);
        }
        let text = std::fs::read_to_string(rd.join(EVENTS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 51);
        let log = EventLog::open_at(&rd, NOW).unwrap();
        let mut expect = events.clone();
        expect.sort_by_key(|e| e.time);
        assert_eq!(log.since(0), expect);
        assert_eq!(log.since(NOW - 60).len(), 11);
        // Appending after a reopen continues the same file.
        log.record_at(deferred(0, "d.test", "4.4.315 timed out"), NOW);
        drop(log);
        let log = EventLog::open_at(&rd, NOW).unwrap();
        assert_eq!(log.len(), 52);
    }

    #[test]
    fn log_skips_bad_lines_and_drops_old_events() {
        let dir = tempfile::tempdir().unwrap();
        let keep = delivered(
            3600,
            "a.test",
            "b.test",
            TlsClass::Tls12,
            AuthClass::Opportunistic,
        );
        let old = delivered(
            9 * 86_400,
            "a.test",
            "b.test",
            TlsClass::Tls13,
            AuthClass::Verified,
        );
        let mut text = String::new();
        text.push_str(&serde_json::to_string(&old).unwrap());
        text.push_str("\nnot json\n\n{\"time\":5}\n\u{0}\u{ff}garbage\n");
        text.push_str(&serde_json::to_string(&keep).unwrap());
        text.push('\n');
        // A torn last line, as a crash mid-append leaves it.
        text.push_str(&serde_json::to_string(&keep).unwrap()[..20]);
        std::fs::write(dir.path().join(EVENTS_FILE), &text).unwrap();

        let log = EventLog::open_at(dir.path(), NOW).unwrap();
        assert_eq!(log.since(0), vec![keep.clone()]);
        // The file was rewritten with only the kept event, and appends stay line-aligned.
        let after = std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
        assert_eq!(
            after,
            format!("{}\n", serde_json::to_string(&keep).unwrap())
        );
        assert!(!dir.path().join("events.jsonl.tmp").exists());
        log.record_at(keep.clone(), NOW);
        drop(log);
        let log = EventLog::open_at(dir.path(), NOW).unwrap();
        assert_eq!(log.len(), 2);
        // Eight days later, both have aged out.
        let later = EventLog::open_at(dir.path(), NOW + KEEP_SECS).unwrap();
        assert!(later.is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap(),
            ""
        );
    }

    #[test]
    fn log_compacts_while_recording() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_at(dir.path(), NOW).unwrap();
        let path = dir.path().join(EVENTS_FILE);
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        // Events recorded over ten days, one every 10 minutes: the file is rewritten as the
        // oldest age out, so it never holds much more than 8 days (+ the 12 h slack).
        let step = 600;
        let n = 10 * 86_400 / step;
        let start = NOW - 10 * 86_400;
        let mut max_lines = 0;
        for i in 0..n {
            let t = start + i * step;
            let mut e = delivered(0, "a.test", "b.test", TlsClass::Tls13, AuthClass::Verified);
            e.time = t;
            log.record_at(e, t);
            max_lines = max_lines.max(lines());
        }
        let per_day = (86_400 / step) as usize;
        assert!(max_lines <= 8 * per_day + per_day / 2 + 2, "{max_lines}");
        assert!(log.len() <= 8 * per_day + 1);
        assert!(lines() < max_lines);
        let end = start + (n - 1) * step;
        assert!(log.since(0).iter().all(|e| e.time >= end - KEEP_SECS));

        // Many more lines in the file than kept events (here: the memory cap is simulated by
        // a file stuffed with duplicates of an old-but-kept event) also triggers a rewrite.
        drop(log);
        let e = delivered(
            3600,
            "a.test",
            "b.test",
            TlsClass::Tls13,
            AuthClass::Verified,
        );
        let line = format!("{}\n", serde_json::to_string(&e).unwrap());
        std::fs::write(&path, line.repeat(10)).unwrap();
        let log = EventLog::open_at(dir.path(), NOW).unwrap();
        assert_eq!(log.len(), 10);
        {
            let mut inner = log.lock();
            inner.events.truncate(1);
        }
        log.record_at(e.clone(), NOW);
        assert_eq!(lines(), 11, "below the slack: no rewrite yet");
        {
            let mut inner = log.lock();
            inner.file.as_mut().unwrap().lines = 2 * 3 + COMPACT_SLACK;
        }
        log.record_at(e, NOW);
        assert_eq!(lines(), 3);
    }
    #[test]
    fn others_section_charts_reporters_results_and_hosts() {
        use crate::tlsrpt::store::DaySummary;
        let row = |day: &str, org: &str, ok: u64, failed: u64| DaySummary {
            day: day.into(),
            organization: org.into(),
            successful: ok,
            failed,
            by_result: [("certificate-expired".to_string(), failed)].into(),
            by_mx: [("mx1.moat.test".to_string(), failed)].into(),
        };
        let rows = vec![
            row("2026-12-01", "Big <Mail>", 90, 10),
            row("2026-12-02", "Other", 5, 0),
        ];
        let s = summarize(&[], NOW, Window::Week);
        let view = OthersView {
            days: 7,
            receiving: true,
            rows: &rows,
        };
        let html = render_page_with(&s, &[], Some(&view), NOW, Window::Week, "");
        assert!(html.contains("How others see us: TLS-RPT reports received in the last 7 days"));
        assert!(html.contains("id=\"chart-others\""), "{html}");
        assert!(html.contains("2026-12-01 Big &lt;Mail&gt;"), "{html}");
        assert!(html.contains("90 ok · 10 failed (10.0%)"), "{html}");
        assert!(html.contains("id=\"chart-others-results\""));
        assert!(html.contains("<td>mx1.moat.test</td><td>10</td>"));
        assert!(html.contains(RPT_FAILED_COLOUR));
        assert_eq!(
            html.matches("<section").count(),
            html.matches("</section>").count()
        );
        // Not receiving: the page says how to start.
        let none = OthersView {
            days: 1,
            receiving: false,
            rows: &[],
        };
        let html = render_page_with(&s, &[], Some(&none), NOW, Window::Day, "");
        assert!(html.contains("set [tls_rpt] report_addresses"), "{html}");
        // The page without the section is what it was.
        assert!(!render_page(&s, &[], NOW, Window::Day, "").contains("id=\"others\""));
    }
}
