//! Per-recipient delivery state, kept beside each spooled message in `state/<id>` and
//! replaced atomically (write, fsync, rename) after every attempt, so due times, attempt
//! counts and the last cause survive restarts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::policy::cause::Cause;

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    Pending,
    Delivered,
    Deferred,
    Failed,
}

impl RcptState {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Deferred => "deferred",
            RcptState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<RcptState> {
        Some(match s {
            "pending" => RcptState::Pending,
            "delivered" => RcptState::Delivered,
            "deferred" => RcptState::Deferred,
            "failed" => RcptState::Failed,
            _ => return None,
        })
    }
    /// Delivered or failed: nothing more to do.
    pub fn is_final(self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Failed)
    }
}

/// One recipient's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptStatus {
    pub state: RcptState,
    pub attempts: u32,
    /// Unix time of the next attempt (deferred) or 0.
    pub next_attempt: u64,
    /// The last failure was a transport-security one (shorter lifetime).
    pub security: bool,
    /// Enhanced status code of the last outcome, e.g. `4.4.317`.
    pub status: String,
    /// Why the last attempt failed (`None` while pending and once delivered).
    pub cause: Option<Cause>,
    /// Host that gave the last outcome, if any.
    pub remote: Option<String>,
    /// The cause in words (or the remote reply verbatim).
    pub reason: String,
    /// A failure DSN was already sent for this recipient.
    pub notified: bool,
    /// A delay warning was already sent for this recipient.
    pub warned: bool,
}

impl RcptStatus {
    pub fn pending() -> RcptStatus {
        RcptStatus {
            state: RcptState::Pending,
            attempts: 0,
            next_attempt: 0,
            security: false,
            status: String::new(),
            cause: None,
            remote: None,
            reason: String::new(),
            notified: false,
            warned: false,
        }
    }
}

/// The state of every recipient of one message, in envelope order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageState {
    pub rcpts: Vec<RcptStatus>,
}

/// Version 2 added the cause label after the flags; version 1 files are read too (their
/// cause is recovered from the status code: [`Cause::from_legacy_status`]).
const MAGIC: &str = "MOAT-STATE 2";
const MAGIC_V1: &str = "MOAT-STATE 1";

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl MessageState {
    pub fn new(recipients: usize) -> MessageState {
        MessageState {
            rcpts: vec![RcptStatus::pending(); recipients],
        }
    }

    /// Earliest time a recipient is due, if any is not final.
    pub fn next_due(&self) -> Option<u64> {
        self.rcpts
            .iter()
            .filter(|r| !r.state.is_final())
            .map(|r| r.next_attempt)
            .min()
    }

    pub fn all_final(&self) -> bool {
        self.rcpts.iter().all(|r| r.state.is_final())
    }

    fn encode(&self) -> String {
        let mut s = format!("{MAGIC}\n");
        for (i, r) in self.rcpts.iter().enumerate() {
            s.push_str(&format!(
                "{i}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                r.state.as_str(),
                r.attempts,
                r.next_attempt,
                u8::from(r.security),
                u8::from(r.notified) | (u8::from(r.warned) << 1),
                r.cause.map_or_else(|| "-".to_string(), |c| c.label()),
                if r.status.is_empty() {
                    "-".to_string()
                } else {
                    clean(&r.status)
                },
                r.remote.as_deref().map(clean).unwrap_or_else(|| "-".into()),
                clean(&r.reason),
            ));
        }
        s
    }

    fn decode(text: &str, recipients: usize) -> Option<MessageState> {
        let mut lines = text.lines();
        let v1 = match lines.next()? {
            MAGIC => false,
            MAGIC_V1 => true,
            _ => return None,
        };
        let mut st = MessageState::new(recipients);
        for line in lines {
            let n = if v1 { 9 } else { 10 };
            let mut f: Vec<&str> = line.splitn(n, '\t').collect();
            if f.len() != n {
                return None;
            }
            let cause = if v1 { None } else { Some(f.remove(6)) };
            let i: usize = f[0].parse().ok()?;
            let r = st.rcpts.get_mut(i)?;
            r.state = RcptState::parse(f[1])?;
            r.attempts = f[2].parse().ok()?;
            r.next_attempt = f[3].parse().ok()?;
            r.security = f[4] == "1";
            let flags: u8 = f[5].parse().ok()?;
            r.notified = flags & 1 != 0;
            r.warned = flags & 2 != 0;
            r.status = if f[6] == "-" {
                String::new()
            } else {
                f[6].to_string()
            };
            r.remote = (f[7] != "-").then(|| f[7].to_string());
            r.reason = f[8].to_string();
            r.cause = match cause {
                Some("-") => None,
                // A label from a newer version: its code still says enough.
                Some(l) => Some(
                    Cause::from_label(l)
                        .unwrap_or_else(|| Cause::from_legacy_status(&r.status, &r.reason)),
                ),
                None if r.status.is_empty() || r.state == RcptState::Delivered => None,
                None => Some(Cause::from_legacy_status(&r.status, &r.reason)),
            };
        }
        Some(st)
    }

    /// Reads `dir/<id>`; a missing file means every recipient is pending.
    pub fn load(dir: &Path, id: &str, recipients: usize) -> io::Result<MessageState> {
        match fs::read_to_string(dir.join(id)) {
            Ok(t) => MessageState::decode(&t, recipients).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt state file {id}"),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MessageState::new(recipients)),
            Err(e) => Err(e),
        }
    }

    /// Replaces `dir/<id>` atomically and durably.
    pub fn save(&self, dir: &Path, id: &str) -> io::Result<()> {
        let tmp = dir.join(format!("{id}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(self.encode().as_bytes())?;
        f.sync_data()?;
        fs::rename(&tmp, dir.join(id))?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_due() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = MessageState::new(3);
        st.rcpts[0].state = RcptState::Delivered;
        st.rcpts[1] = RcptStatus {
            state: RcptState::Deferred,
            attempts: 2,
            next_attempt: 500,
            security: true,
            status: "4.4.317".into(),
            cause: Some(Cause::StartTlsNotOffered),
            remote: Some("mx.far.test".into()),
            reason: "STARTTLS\tnot\noffered".into(),
            notified: false,
            warned: true,
        };
        st.rcpts[2].next_attempt = 100;
        st.save(dir.path(), "0000000000000001").unwrap();
        let back = MessageState::load(dir.path(), "0000000000000001", 3).unwrap();
        assert_eq!(back.rcpts[1].reason, "STARTTLS not offered");
        assert_eq!(back.rcpts[1].remote.as_deref(), Some("mx.far.test"));
        assert_eq!(back.rcpts[0].state, RcptState::Delivered);
        assert!(back.rcpts[1].warned && !back.rcpts[1].notified);
        assert_eq!(back.next_due(), Some(100));
        assert!(!back.all_final());
        let missing = MessageState::load(dir.path(), "0000000000000002", 2).unwrap();
        assert_eq!(missing, MessageState::new(2));
        std::fs::write(dir.path().join("0000000000000003"), "junk").unwrap();
        assert!(MessageState::load(dir.path(), "0000000000000003", 1).is_err());
        assert_eq!(back.rcpts[1].cause, Some(Cause::StartTlsNotOffered));
        assert_eq!(back.rcpts[0].cause, None);
    }

    #[test]
    fn version_1_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = "MOAT-STATE 1\n0\tdeferred\t3\t900\t1\t0\t5.7.5\tmx.far.test\tRemote certificate failed MTA-STS validation. Reason: expired (x)\n1\tdelivered\t1\t0\t0\t0\t2.0.0\tmx.far.test\t250 ok\n";
        std::fs::write(dir.path().join("0000000000000004"), v1).unwrap();
        let st = MessageState::load(dir.path(), "0000000000000004", 2).unwrap();
        use crate::policy::cause::{CertProblem, StsProblem};
        assert_eq!(
            st.rcpts[0].cause,
            Some(Cause::StsValidation(StsProblem::Certificate(
                CertProblem::Expired
            )))
        );
        assert_eq!(st.rcpts[0].attempts, 3);
        assert_eq!(st.rcpts[1].cause, None);
        // Saved again, it is a version 2 file that reads back the same.
        st.save(dir.path(), "0000000000000004").unwrap();
        let text = std::fs::read_to_string(dir.path().join("0000000000000004")).unwrap();
        assert!(text.starts_with("MOAT-STATE 2\n"), "{text}");
        assert_eq!(
            MessageState::load(dir.path(), "0000000000000004", 2).unwrap(),
            st
        );
    }
}
