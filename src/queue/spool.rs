//! The durable spool: one file per message, synced before the `250` that accepts it.
//!
//! A message is written to `tmp/<id>` and `fdatasync`ed by the session's own blocking task
//! (so one slow sync never holds up the other sessions), then handed to the committer
//! thread, which renames every waiting file into `queue/` and syncs the directory once for the
//! whole batch (group commit). Only then does the session say `250`. After a crash, anything
//! in `tmp/` was never acknowledged and is removed; anything in `queue/` is complete.
//!
//! File format: a short text envelope, a blank line, then the message exactly as it will be
//! delivered (our Received header first).
//!
//! ```text
//! MOAT-SPOOL 1
//! arrived 1795381616
//! from alice@example.com
//! rcpt bob@localhost
//! utf8 0
//!
//! Received: ...
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

use crate::smtp::session::{Envelope, RcptDsn};
use crate::util::{xtext_decode, xtext_encode};

const MAGIC: &str = "MOAT-SPOOL 1";

/// A message read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    pub id: String,
    pub arrived: u64,
    pub envelope: Envelope,
    pub message: Vec<u8>,
}

struct Commit {
    id: String,
    done: oneshot::Sender<io::Result<()>>,
}

/// Handle to the spool directories and the committer thread.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    committer: std_mpsc::Sender<Commit>,
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Commit({})", self.id)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating) the spool under `root`, removes unacknowledged leftovers in `tmp/`,
    /// and returns the ids already queued, oldest first.
    pub fn open(root: &Path) -> io::Result<(Spool, Vec<String>)> {
        let tmp = root.join("tmp");
        let queue = root.join("queue");
        fs::create_dir_all(&tmp)?;
        fs::create_dir_all(&queue)?;
        fs::create_dir_all(root.join("state"))?;
        for entry in fs::read_dir(&tmp)? {
            let entry = entry?;
            tracing::info!(file = %entry.path().display(), "removing unacknowledged spool file");
            fs::remove_file(entry.path())?;
        }
        let ids = queued_ids(&queue)?;
        let (tx, rx) = std_mpsc::channel::<Commit>();
        let (tmp2, queue2) = (tmp.clone(), queue.clone());
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(rx, &tmp2, &queue2))?;
        Ok((
            Spool {
                root: root.to_path_buf(),
                committer: tx,
            },
            ids,
        ))
    }

    fn queue_path(&self, id: &str) -> PathBuf {
        self.root.join("queue").join(id)
    }

    /// Makes a message durable. Returns once it is synced and visible in `queue/`.
    pub async fn store(
        &self,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
        message: &[u8],
    ) -> io::Result<()> {
        check_id(id)?;
        let mut data = encode_header(arrived, envelope);
        data.extend_from_slice(message);
        let path = self.root.join("tmp").join(id);
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(&data)?;
            f.sync_data()
        })
        .await
        .map_err(io::Error::other)??;
        let (done, wait) = oneshot::channel();
        self.committer
            .send(Commit {
                id: id.to_string(),
                done,
            })
            .map_err(|_| io::Error::other("spool committer stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("spool committer stopped"))?
    }

    /// Reads a queued message.
    pub fn load(&self, id: &str) -> io::Result<Spooled> {
        check_id(id)?;
        let data = fs::read(self.queue_path(id))?;
        decode(id, &data).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt spool file {id}"),
            )
        })
    }

    /// Removes a message whose recipients are all final, and its state.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        check_id(id)?;
        fs::remove_file(self.queue_path(id))?;
        match fs::remove_file(self.state_dir().join(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The message is (still) queued.
    pub fn exists(&self, id: &str) -> bool {
        crate::util::is_queue_id(id) && self.queue_path(id).exists()
    }

    /// Directory of the per-recipient state files.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Ids currently queued, oldest first.
    pub fn list(&self) -> io::Result<Vec<String>> {
        queued_ids(&self.root.join("queue"))
    }
}

/// Queue ids of the files in `dir`, oldest first (ids sort by arrival).
fn queued_ids(dir: &Path) -> io::Result<Vec<String>> {
    let mut ids: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| crate::util::is_queue_id(n))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Refuses anything that is not a queue id, so ids never become arbitrary paths.
fn check_id(id: &str) -> io::Result<()> {
    if crate::util::is_queue_id(id) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "bad queue id"))
    }
}

/// Renames batches of synced files into `queue/` and syncs the directory once per batch.
fn committer(rx: std_mpsc::Receiver<Commit>, tmp: &Path, queue: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut results = Vec::with_capacity(batch.len());
        for c in &batch {
            results.push(fs::rename(tmp.join(&c.id), queue.join(&c.id)));
        }
        let synced = sync_dir(queue);
        for (c, r) in batch.into_iter().zip(results) {
            let r = match (&r, &synced) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), _) | (_, Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = c.done.send(r);
        }
    }
}

fn encode_header(arrived: u64, env: &Envelope) -> Vec<u8> {
    let mut h = format!("{MAGIC}\narrived {arrived}\nfrom {}\n", env.sender);
    for r in &env.recipients {
        h.push_str("rcpt ");
        h.push_str(r);
        h.push('\n');
    }
    h.push_str(&format!(
        "utf8 {}\n8bit {}\n",
        u8::from(env.smtputf8),
        u8::from(env.eight_bit)
    ));
    if let Some(full) = env.ret_full {
        h.push_str(if full { "ret full\n" } else { "ret hdrs\n" });
    }
    if let Some(id) = &env.envid {
        h.push_str(&format!("envid {}\n", xtext_encode(id)));
    }
    for (i, d) in env.dsn.iter().enumerate() {
        if *d != RcptDsn::default() {
            let orcpt = d
                .orcpt
                .as_deref()
                .map(xtext_encode)
                .unwrap_or_else(|| "-".into());
            h.push_str(&format!("dsn {i} {} {orcpt}\n", d.notify));
        }
    }
    h.push('\n');
    h.into_bytes()
}

fn decode(id: &str, data: &[u8]) -> Option<Spooled> {
    let end = data.windows(2).position(|w| w == b"\n\n")?;
    let header = std::str::from_utf8(&data[..end]).ok()?;
    let mut lines = header.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let mut env = Envelope::default();
    let mut arrived = 0;
    for line in lines {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "arrived" => arrived = v.parse().ok()?,
            "from" => env.sender = v.to_string(),
            "rcpt" => env.recipients.push(v.to_string()),
            "utf8" => env.smtputf8 = v == "1",
            "8bit" => env.eight_bit = v == "1",
            "ret" => env.ret_full = Some(v == "full"),
            "envid" => env.envid = xtext_decode(v),
            "dsn" => {
                let mut f = v.split(' ');
                let (Some(i), Some(notify), Some(orcpt)) = (f.next(), f.next(), f.next()) else {
                    return None;
                };
                let i: usize = i.parse().ok()?;
                if i >= 1000 {
                    return None;
                }
                if env.dsn.len() <= i {
                    env.dsn.resize(i + 1, RcptDsn::default());
                }
                env.dsn[i] = RcptDsn {
                    notify: notify.parse().ok()?,
                    orcpt: if orcpt == "-" {
                        None
                    } else {
                        xtext_decode(orcpt)
                    },
                };
            }
            _ => {}
        }
    }
    if env.recipients.is_empty() || env.dsn.len() > env.recipients.len() {
        return None;
    }
    // One entry per recipient, as the session records them.
    env.dsn.resize(env.recipients.len(), RcptDsn::default());
    Some(Spooled {
        id: id.to_string(),
        arrived,
        envelope: env,
        message: data[end + 2..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            sender: "a@example.test".into(),
            recipients: vec!["b@localhost".into(), "c@localhost".into()],
            smtputf8: false,
            eight_bit: true,
            ret_full: Some(false),
            envid: Some("QQ 3=14+".into()),
            dsn: vec![
                RcptDsn {
                    notify: 2 | 4,
                    orcpt: Some("B@Example.Test".into()),
                },
                RcptDsn::default(),
            ],
        }
    }

    #[tokio::test]
    async fn store_load_remove_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, ids) = Spool::open(dir.path()).unwrap();
        assert!(ids.is_empty());
        let id = crate::util::new_queue_id();
        spool
            .store(&id, 42, &env(), b"Subject: x\r\n\r\nbody\r\n")
            .await
            .unwrap();
        let m = spool.load(&id).unwrap();
        assert_eq!(m.envelope, env());
        assert_eq!(m.arrived, 42);
        assert_eq!(m.message, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(spool.list().unwrap(), vec![id.clone()]);
        spool.remove(&id).unwrap();
        assert!(spool.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_stores_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let s = spool.clone();
            tasks.push(tokio::spawn(async move {
                let id = crate::util::new_queue_id();
                s.store(&id, 1, &env(), b"x\r\n").await.map(|_| id)
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(spool.list().unwrap().len(), 50);
    }

    #[test]
    fn reopen_drops_tmp_leftovers_and_lists_queue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let _ = Spool::open(dir.path()).unwrap();
        }
        std::fs::write(dir.path().join("tmp/0000000000000001"), b"half").unwrap();
        std::fs::write(
            dir.path().join("queue/0000000000000002"),
            encode_header(1, &env()),
        )
        .unwrap();
        let (_, ids) = Spool::open(dir.path()).unwrap();
        assert_eq!(ids, vec!["0000000000000002".to_string()]);
        assert!(!dir.path().join("tmp/0000000000000001").exists());
    }

    #[test]
    fn corrupt_files_are_refused() {
        assert!(decode("X", b"garbage").is_none());
        assert!(
            decode("X", b"MOAT-SPOOL 1\nfrom a@b\n\nbody").is_none(),
            "no recipients"
        );
    }
}
