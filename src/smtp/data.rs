//! Message content receiving for DATA (dot-terminated) and BDAT (counted chunks).
//!
//! Only the exact sequence `<CR><LF>.<CR><LF>` ends DATA. Bare LF and bare CR never end a line
//! for the purpose of end-of-data detection, so `\n.\n`, `\r.\r`, `\n.\r\n` and friends stay
//! inside the message and cannot smuggle a second message past us (SMTP smuggling, 2023).
//! Whether a message containing them is accepted is the listener's [`BareNewline`] policy.

/// What to do with a bare `<LF>` or a bare `<CR>` found in message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// Reject the whole message with `550 5.6.2` (the default, as Postfix's
    /// `smtpd_forbid_bare_newline = reject`).
    Reject,
    /// Accept it and rewrite each bare `<LF>` / bare `<CR>` to `<CR><LF>`.
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Just after `<CR><LF>` (or at the start of the content).
    LineStart,
    /// Inside a line.
    Mid,
    /// Inside a line, the previous byte was `<CR>`.
    SeenCr,
    /// At line start we saw `.`.
    Dot,
    /// At line start we saw `.<CR>`.
    DotCr,
}

/// Incremental receiver for content sent after `354`, with dot-unstuffing.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    policy: BareNewline,
    max_size: usize,
    /// Unstuffed content, `<CR><LF>` line endings: what has not been handed out by
    /// [`DataReceiver::take_spill`].
    pub body: Vec<u8>,
    /// Octets of content handed out by [`DataReceiver::take_spill`].
    pub spilled: usize,
    /// Content exceeded `max_size`; the rest is counted but not stored.
    pub oversized: bool,
    /// What was handed out could not be stored; the rest is read and dropped.
    pub failed: bool,
    /// A bare `<CR>` or `<LF>` was seen.
    pub bare_newline: bool,
}

impl DataReceiver {
    pub fn new(policy: BareNewline, max_size: usize) -> Self {
        DataReceiver {
            state: State::LineStart,
            policy,
            max_size,
            body: Vec::new(),
            spilled: 0,
            oversized: false,
            failed: false,
            bare_newline: false,
        }
    }

    /// Whether content has been handed out and is still wanted: its spool file must be kept.
    pub fn spill_open(&self) -> bool {
        self.spilled > 0 && !self.oversized && !self.failed
    }

    /// Once `at` octets of content are held, hands them out to be written to the spool, so
    /// that a session holds at most about `at` octets however large the message.
    /// Returns the content and whether it is the message's first chunk.
    pub fn take_spill(&mut self, at: usize) -> Option<(Vec<u8>, bool)> {
        if self.body.len() < at || self.oversized || self.failed {
            return None;
        }
        let first = self.spilled == 0;
        self.spilled += self.body.len();
        Some((std::mem::take(&mut self.body), first))
    }

    /// What was handed out could not be stored: drop the content and read the rest to its end.
    pub fn spill_failed(&mut self) {
        self.failed = true;
        self.body = Vec::new();
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.oversized || self.failed {
            return;
        }
        if self.spilled + self.body.len() + bytes.len() > self.max_size {
            self.oversized = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    fn bare(&mut self) {
        self.bare_newline = true;
        if self.policy == BareNewline::Normalize {
            self.push(b"\r\n");
        }
    }

    /// Feeds bytes; returns `Some(n)` when the end-of-data sequence was found after consuming
    /// `n` bytes of `input`, `None` when all of `input` was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            // Fast path: copy a run of ordinary bytes in one go.
            if self.state == State::Mid {
                let run = input[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(input.len() - i);
                if run > 0 {
                    self.push(&input[i..i + run]);
                    i += run;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            match (self.state, b) {
                (State::LineStart, b'.') => self.state = State::Dot,
                (State::Dot, b'\r') => self.state = State::DotCr,
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Some(i);
                }
                (State::DotCr, _) => {
                    // ".<CR>x": the dot was stuffing, the CR is bare.
                    self.bare();
                    self.state = State::Mid;
                    i -= 1;
                }
                (State::Dot, _) => {
                    // A stuffed dot: drop it and treat the byte as line content.
                    self.state = State::Mid;
                    i -= 1;
                }
                (State::LineStart | State::Mid, b'\r') => self.state = State::SeenCr,
                (State::LineStart | State::Mid, b'\n') => {
                    self.bare();
                    self.state = State::Mid;
                }
                (State::LineStart | State::Mid, _) => {
                    self.push(&[b]);
                    self.state = State::Mid;
                }
                (State::SeenCr, b'\n') => {
                    self.push(b"\r\n");
                    self.state = State::LineStart;
                }
                (State::SeenCr, b'\r') => self.bare(),
                (State::SeenCr, _) => {
                    self.bare();
                    self.state = State::Mid;
                    i -= 1;
                }
            }
        }
        None
    }
}

/// Checks (and under `Normalize` rewrites) line endings of BDAT content, which carries no
/// dot-stuffing. `pending_cr` carries a trailing `<CR>` across chunk boundaries.
#[derive(Debug, Default)]
pub struct ChunkChecker {
    pending_cr: bool,
    pub bare_newline: bool,
}

impl ChunkChecker {
    /// Appends `chunk` to `out`, flagging bare CR/LF and normalising them when asked.
    pub fn append(&mut self, chunk: &[u8], out: &mut Vec<u8>, policy: BareNewline) {
        for &b in chunk {
            match (self.pending_cr, b) {
                (true, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    self.pending_cr = false;
                }
                (true, b'\r') => self.bare_cr(out, policy),
                (true, _) => {
                    self.bare_cr(out, policy);
                    self.pending_cr = false;
                    out.push(b);
                }
                (false, b'\r') => self.pending_cr = true,
                (false, b'\n') => {
                    self.bare_newline = true;
                    out.extend_from_slice(if policy == BareNewline::Normalize {
                        b"\r\n"
                    } else {
                        b"\n"
                    });
                }
                (false, _) => out.push(b),
            }
        }
    }

    fn bare_cr(&mut self, out: &mut Vec<u8>, policy: BareNewline) {
        self.bare_newline = true;
        out.extend_from_slice(if policy == BareNewline::Normalize {
            b"\r\n"
        } else {
            b"\r"
        });
    }

    /// Called after the last chunk: a dangling `<CR>` is bare.
    pub fn finish(&mut self, out: &mut Vec<u8>, policy: BareNewline) {
        if self.pending_cr {
            self.pending_cr = false;
            self.bare_cr(out, policy);
        }
    }
}

/// Encodes a message for DATA: every bare `<CR>` or `<LF>` becomes `<CR><LF>`, lines starting
/// with `.` are dot-stuffed, the content ends in `<CR><LF>`, and `.<CR><LF>` is appended.
/// Whatever the stored message holds, the output contains exactly one end-of-data sequence,
/// at its end, so no smuggling sequence ever leaves Moat.
pub fn encode_for_data(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        i += 1;
        match b {
            b'\r' | b'\n' => {
                if b == b'\r' && body.get(i) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: BareNewline, input: &[u8]) -> (Option<usize>, DataReceiver) {
        let mut r = DataReceiver::new(policy, 1 << 20);
        let end = r.feed(input);
        (end, r)
    }

    #[test]
    fn ends_only_on_crlf_dot_crlf() {
        let (end, r) = run(BareNewline::Reject, b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL");
        assert_eq!(end, Some(24));
        assert_eq!(r.body, b"Subject: x\r\n\r\nhello\r\n");
        assert!(!r.bare_newline);
    }

    #[test]
    fn empty_message() {
        let (end, r) = run(BareNewline::Reject, b".\r\n");
        assert_eq!(end, Some(3));
        assert!(r.body.is_empty());
    }

    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for seq in [
            &b"a\r\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
        ] {
            let (end, r) = run(BareNewline::Reject, seq);
            assert_eq!(end, None, "{:?}", String::from_utf8_lossy(seq));
            assert!(r.bare_newline, "{:?}", String::from_utf8_lossy(seq));
        }
    }

    #[test]
    fn dot_unstuffing() {
        let (end, r) = run(BareNewline::Reject, b"..hidden\r\n...\r\n.\r\n");
        assert!(end.is_some());
        assert_eq!(r.body, b".hidden\r\n..\r\n");
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"x\r\n..y\r\nz\r\n.\r\n";
        let mut r = DataReceiver::new(BareNewline::Reject, 1 << 20);
        let mut ended = false;
        for (n, b) in input.iter().enumerate() {
            if let Some(k) = r.feed(std::slice::from_ref(b)) {
                assert_eq!(k, 1);
                assert_eq!(n, input.len() - 1);
                ended = true;
            }
        }
        assert!(ended);
        assert_eq!(r.body, b"x\r\n.y\r\nz\r\n");
    }

    #[test]
    fn normalize_rewrites_bare_endings() {
        let (end, r) = run(BareNewline::Normalize, b"a\nb\rc\r\n.\r\n");
        assert!(end.is_some());
        assert_eq!(r.body, b"a\r\nb\r\nc\r\n");
        assert!(r.bare_newline);
    }

    #[test]
    fn oversize_is_flagged_not_stored() {
        let mut r = DataReceiver::new(BareNewline::Reject, 4);
        assert!(r.feed(b"123456\r\n.\r\n").is_some());
        assert!(r.oversized);
        assert!(r.body.is_empty());
    }

    #[test]
    fn encoding_normalises_and_stuffs() {
        assert_eq!(encode_for_data(b""), b".\r\n");
        assert_eq!(encode_for_data(b"a"), b"a\r\n.\r\n");
        assert_eq!(encode_for_data(b".x\r\n..\r\n"), b"..x\r\n...\r\n.\r\n");
        assert_eq!(
            encode_for_data(b"a\n.\nb\r.\r\n"),
            b"a\r\n..\r\nb\r\n..\r\n.\r\n"
        );
    }

    #[test]
    fn encoding_roundtrips_through_the_receiver() {
        // Whatever goes out is received back as one message with CRLF line endings.
        for body in [
            &b"x\r\n.\r\nMAIL FROM:<a@b>\r\n"[..],
            b"a\n.\nb",
            b"\r\r\n.",
            b"..\r\n.",
        ] {
            let wire = encode_for_data(body);
            let mut r = DataReceiver::new(BareNewline::Reject, 1 << 20);
            assert_eq!(r.feed(&wire), Some(wire.len()), "{body:?}");
            assert!(!r.bare_newline, "{body:?}");
        }
    }

    #[test]
    fn chunk_checker_across_boundary() {
        let mut c = ChunkChecker::default();
        let mut out = Vec::new();
        c.append(b"a\r", &mut out, BareNewline::Reject);
        c.append(b"\nb", &mut out, BareNewline::Reject);
        c.finish(&mut out, BareNewline::Reject);
        assert!(!c.bare_newline);
        assert_eq!(out, b"a\r\nb");
        let mut c = ChunkChecker::default();
        let mut out = Vec::new();
        c.append(b"a\nb\r", &mut out, BareNewline::Normalize);
        c.finish(&mut out, BareNewline::Normalize);
        assert!(c.bare_newline);
        assert_eq!(out, b"a\r\nb\r\n");
    }
}
