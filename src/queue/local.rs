//! Local delivery: Maildir (crash-safe: write in `tmp/`, fsync, rename into `new/`, fsync
//! the directory) and discard.
//!
//! File names are derived from the queue id and the recipient's index, so delivering the same
//! queued message again after a crash replaces the same file instead of adding a copy.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::queue::spool::Spooled;
use crate::smtp::address::mailbox_name;

/// Delivers one recipient of `msg` into the Maildir root `root`.
/// Returns the path of the delivered file.
pub fn deliver_maildir(
    root: &Path,
    msg: &Spooled,
    index: usize,
    hostname: &str,
) -> io::Result<PathBuf> {
    let rcpt = msg
        .envelope
        .recipients
        .get(index)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such recipient"))?;
    let local = rcpt.rsplit_once('@').map_or(rcpt.as_str(), |(l, _)| l);
    let mailbox = mailbox_name(local).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsafe mailbox name in {rcpt}"),
        )
    })?;
    let dir = root.join(&mailbox);
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    let name = format!("{}.M{}R{}.{}", msg.arrived, msg.id, index, host);
    let tmp = dir.join("tmp").join(&name);
    let new = dir.join("new").join(&name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let mut head = format!(
        "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
        msg.envelope.sender, rcpt
    )
    .into_bytes();
    head.extend_from_slice(&msg.message);
    f.write_all(&head)?;
    f.sync_all()?;
    fs::rename(&tmp, &new)?;
    File::open(dir.join("new"))?.sync_all()?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::session::Envelope;

    #[test]
    fn delivers_once_even_when_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let msg = Spooled {
            id: "0123456789ABCDEF".into(),
            arrived: 7,
            envelope: Envelope {
                sender: "a@x.test".into(),
                recipients: vec!["Bob+tag@localhost".into()],
                smtputf8: false,
                eight_bit: false,
                ..Envelope::default()
            },
            message: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
        };
        let p1 = deliver_maildir(dir.path(), &msg, 0, "mx").unwrap();
        let p2 = deliver_maildir(dir.path(), &msg, 0, "mx").unwrap();
        assert_eq!(p1, p2);
        assert_eq!(fs::read_dir(dir.path().join("bob/new")).unwrap().count(), 1);
        assert_eq!(fs::read_dir(dir.path().join("bob/tmp")).unwrap().count(), 0);
        let text = fs::read_to_string(p1).unwrap();
        assert!(text.starts_with(
            "Return-Path: <a@x.test>\r\nDelivered-To: Bob+tag@localhost\r\nSubject: hi"
        ));
    }

    #[test]
    fn refuses_unsafe_names() {
        let dir = tempfile::tempdir().unwrap();
        let msg = Spooled {
            id: "0123456789ABCDEF".into(),
            arrived: 7,
            envelope: Envelope {
                sender: String::new(),
                recipients: vec!["../evil@localhost".into()],
                smtputf8: false,
                eight_bit: false,
                ..Envelope::default()
            },
            message: Vec::new(),
        };
        assert!(deliver_maildir(dir.path(), &msg, 0, "mx").is_err());
    }
}
