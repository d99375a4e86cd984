//! The durable spool: every message is on disk and synced before the `250` that accepts it.
//!
//! Small messages (up to [`LARGE`]) go into journal segments (see [`super::journal`]): the
//! session appends its record to the active segment itself (a write into the page cache) and
//! hands the committer thread only the sync, which it does once for every record written
//! since its last one (group commit). A delivered message is marked dead in place; a
//! segment with no live record left is cleared and reused. A message that has to wait for a
//! retry is moved into a file of its own ([`Spool::park`]) so that it never pins a segment.
//!
//! Large messages, and parked ones, live one per file: written to `tmp/<id>` and
//! `fdatasync`ed, then renamed into `queue/` by the committer, which syncs the directory once
//! per batch. After a crash, anything in `tmp/` was never acknowledged and is removed.
//!
//! Dead marks are synced about once a second rather than on every delivery, as Postfix does
//! not sync the unlink of a delivered queue file either: a crash can bring back a message
//! delivered in the last second, which is then delivered again (at least once, never lost).
//!
//! Payload format (the same in records and files): a short text envelope, a blank line, then
//! the message exactly as it will be delivered (our Received header first).
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::journal::{self, DEAD, SEG_HEADER, STATE_AT};
use super::state::MessageState;
use crate::smtp::session::{Envelope, RcptDsn};
use crate::util::{xtext_decode, xtext_encode};

const MAGIC: &str = "MOAT-SPOOL 1";

/// Messages larger than this (envelope included) get a file of their own.
pub const LARGE: usize = 1 << 20;
/// A segment takes records until it reaches this size.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Free segments kept for reuse; more are deleted.
const KEEP_FREE: usize = 2;
/// How often dead marks are synced.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Segment files are named `seg-000000` to `seg-999999`.
const MAX_SEGMENT: u32 = 999_999;

/// A message read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    pub id: String,
    pub arrived: u64,
    pub envelope: Envelope,
    pub message: Vec<u8>,
}

impl Spooled {
    /// A recipient's domain is `domain` (canonical form, as [`super::domain_of`] gives).
    pub fn has_recipient_in(&self, domain: &str) -> bool {
        self.envelope
            .recipients
            .iter()
            .any(|r| super::domain_of(r) == domain)
    }
}

/// A message being written to the spool as it arrives ([`Spool::begin`]). Dropped before
/// [`Spool::commit`] succeeds, its file is removed: nothing in it was acknowledged (and a
/// crash leaves it in `tmp/`, which is cleared at start-up).
#[derive(Debug)]
pub struct Incoming {
    id: String,
    path: PathBuf,
    file: File,
    /// Message bytes written (the envelope not counted).
    len: u64,
    committed: bool,
}

impl Incoming {
    /// Creates `dir/<id>` and writes the envelope. Blocking.
    pub(crate) fn create(
        dir: &Path,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
    ) -> io::Result<Incoming> {
        check_id(id)?;
        let path = dir.join(id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut incoming = Incoming {
            id: id.to_string(),
            path,
            file,
            len: 0,
            committed: false,
        };
        incoming.file.write_all(&encode_header(arrived, envelope))?;
        Ok(incoming)
    }

    /// The file it is written to.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Message bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends message bytes (into the page cache; [`Spool::commit`] syncs). Blocking.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A journal record found damaged at start-up: its message cannot be read, and is lost if it
/// was acknowledged. What could still be read of it, for the log and `moat queue list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub id: Option<String>,
    pub sender: Option<String>,
    /// The payload length its header claims (envelope and message).
    pub size: u32,
    /// The journal segment file it was in (a copy is kept beside it as `<name>.damaged-<time>`).
    pub segment: String,
    pub offset: u64,
}

/// Where a queued message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Seg { seg: u32, off: u64, len: u32 },
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegState {
    /// Taking new records.
    Active,
    /// Full, or from before a restart; some records still live.
    Sealed,
    /// No live record left; the committer is clearing its header.
    Freeing,
    /// Header cleared and synced; ready to be reused.
    Free,
    /// New, being filled with zeros by a helper thread.
    Preparing,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    generation: u64,
    /// Live records, including ones written but not yet synced.
    live: usize,
    /// Where the next record goes.
    end: u64,
    state: SegState,
    /// Created since the journal directory was last synced.
    fresh: bool,
    /// A sync of it failed: what was written since may not be on disk, and the kernel may
    /// not report it again, so no later sync of it is trusted and it takes no new records.
    poisoned: bool,
    /// Read at start-up (its records are not in the page cache).
    recovered: bool,
}

#[derive(Debug)]
struct Inner {
    segs: BTreeMap<u32, Segment>,
    active: Option<u32>,
    index: HashMap<String, Loc>,
    /// Messages stored since start whose state was never saved: they have no file in
    /// `state/`, so loading their state and removing them skip the file system.
    stateless: HashSet<String>,
    /// Segments with dead marks not yet synced.
    dirty: BTreeSet<u32>,
    /// Damaged journal records found at start-up.
    lost: Vec<Lost>,
}

enum Job {
    /// Sync a segment: the records written to it before this job was sent are then durable.
    Sync {
        seg: u32,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Rename a synced file from `tmp/` into `queue/`, then sync the directory.
    Rename {
        id: String,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Clear the header of a segment with no live record and make it reusable.
    Free { seg: u32 },
}

/// Handle to the spool: directories, segment index and the committer thread.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    inner: Arc<Mutex<Inner>>,
    committer: std_mpsc::Sender<Job>,
    /// Holds the spool's lock for as long as any handle lives.
    _lock: Arc<File>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Sync { seg, .. } => write!(f, "Sync({seg})"),
            Job::Rename { id, .. } => write!(f, "Rename({id})"),
            Job::Free { seg } => write!(f, "Free({seg})"),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_path(journal: &Path, n: u32) -> PathBuf {
    journal.join(format!("seg-{n:06}"))
}

/// The number of a segment file name: exactly `seg-` and six digits.
fn segment_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("seg-")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn copy_err(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Drops one live record of `seg`; a sealed segment left empty goes to the committer.
    fn release(&mut self, seg: u32, committer: &std_mpsc::Sender<Job>) {
        if let Some(s) = self.segs.get_mut(&seg) {
            s.live = s.live.saturating_sub(1);
            if s.live == 0 && s.state == SegState::Sealed {
                s.state = SegState::Freeing;
                let _ = committer.send(Job::Free { seg });
            }
        }
    }

    /// Marks the record at `off` of `seg` dead and releases it.
    fn kill(&mut self, seg: u32, off: u64, committer: &std_mpsc::Sender<Job>) {
        if let Some(s) = self.segs.get(&seg)
            && let Err(e) = s.file.write_all_at(&[DEAD], off + STATE_AT)
        {
            tracing::warn!(segment = seg, error = %e, "spool: marking a record dead failed");
        }
        self.dirty.insert(seg);
        self.release(seg, committer);
    }

    /// A generation for a segment being (re)used: 64 random bits, so that it never repeats
    /// one whose records are still in a file (which makes records of an earlier use of the
    /// segment unreadable) and cannot be guessed by whoever sends a message (so a record forged
    /// inside a message body is never taken for a real one). No random numbers, no segment.
    fn next_generation(&mut self) -> io::Result<u64> {
        let mut bytes = [0u8; 8];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| io::Error::other("no random numbers for a spool segment"))?;
        Ok(u64::from_le_bytes(bytes).max(1))
    }

    /// Creates the next segment file, empty.
    fn new_segment(&mut self, journal: &Path, state: SegState) -> io::Result<(u32, Arc<File>)> {
        let mut n = self
            .segs
            .keys()
            .next_back()
            .map_or(Some(0), |n| n.checked_add(1));
        let mut tries = 0;
        let file = loop {
            let Some(number) = n.filter(|n| *n <= MAX_SEGMENT) else {
                return Err(io::Error::other("no spool segment number left"));
            };
            // A file left aside (unreadable at start-up) keeps its number.
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(segment_path(journal, number))
            {
                Ok(f) => break Arc::new(f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => {
                    tries += 1;
                    n = number.checked_add(1);
                }
                Err(e) => return Err(e),
            }
        };
        let n = n.unwrap_or_default();
        self.segs.insert(
            n,
            Segment {
                file: file.clone(),
                generation: 0,
                live: 0,
                end: SEG_HEADER,
                state,
                fresh: true,
                poisoned: false,
                recovered: false,
            },
        );
        Ok((n, file))
    }

    /// When no segment is free or being prepared, creates one for [`prepare`] to fill.
    fn want_spare(&mut self, journal: &Path) -> Option<(u32, Arc<File>)> {
        let ready = self
            .segs
            .values()
            .any(|s| matches!(s.state, SegState::Free | SegState::Preparing));
        if ready {
            return None;
        }
        self.new_segment(journal, SegState::Preparing)
            .map_err(|e| tracing::warn!(error = %e, "spool: cannot create a spare segment"))
            .ok()
    }

    /// Reserves `len` bytes for a record, rolling to a new segment when the active one is
    /// full. Returns the segment, the offset, its generation and file.
    fn reserve(
        &mut self,
        len: u64,
        journal: &Path,
        committer: &std_mpsc::Sender<Job>,
    ) -> io::Result<(u32, u64, u64, Arc<File>)> {
        let need = journal::aligned(len);
        if need > SEGMENT_BYTES - SEG_HEADER {
            return Err(io::Error::other("record larger than a segment"));
        }
        if let Some(a) = self.active
            && let Some(s) = self.segs.get_mut(&a)
        {
            if s.end + need <= SEGMENT_BYTES && !s.poisoned {
                let off = s.end;
                s.end += need;
                s.live += 1;
                return Ok((a, off, s.generation, s.file.clone()));
            }
            s.state = SegState::Sealed;
            self.active = None;
            if s.live == 0 {
                s.state = SegState::Freeing;
                let _ = committer.send(Job::Free { seg: a });
            }
        }
        let generation = self.next_generation()?;
        let header = journal::segment_header(generation);
        let reuse = self
            .segs
            .iter()
            .find(|(_, s)| s.state == SegState::Free && !s.poisoned)
            .map(|(n, _)| *n);
        let n = match reuse {
            Some(n) => n,
            // No spare ready (the helper is still filling one, or the queue is growing fast):
            // a plain new file, whose syncs also write its size until it is full.
            None => self.new_segment(journal, SegState::Free)?.0,
        };
        let Some(s) = self.segs.get_mut(&n) else {
            return Err(io::Error::other("spool segment vanished"));
        };
        s.file.write_all_at(&header, 0)?;
        s.generation = generation;
        s.recovered = false;
        s.state = SegState::Active;
        s.end = SEG_HEADER + need;
        s.live = 1;
        self.active = Some(n);
        Ok((n, SEG_HEADER, generation, s.file.clone()))
    }
}

impl Spool {
    /// Opens (creating) the spool under `root`, removes unacknowledged leftovers in `tmp/`,
    /// reads the journal, and returns the ids already queued, oldest first.
    pub fn open(root: &Path) -> io::Result<(Spool, Vec<String>)> {
        let tmp = root.join("tmp");
        let queue = root.join("queue");
        let journal_dir = root.join("journal");
        for d in [&tmp, &queue, &journal_dir, &root.join("state")] {
            fs::create_dir_all(d)?;
        }
        // One server per spool: a second one would clear the first one's segments and remove
        // its files in tmp/ while it acknowledges messages into them.
        let lock_file = lock_spool(&root.join("lock"))?;
        for entry in fs::read_dir(&tmp)? {
            let entry = entry?;
            tracing::info!(file = %entry.path().display(), "removing unacknowledged spool file");
            fs::remove_file(entry.path())?;
        }
        let mut index: HashMap<String, Loc> = queued_ids(&queue)?
            .into_iter()
            .map(|id| (id, Loc::File))
            .collect();
        let mut segs = BTreeMap::new();
        let mut dirty = BTreeSet::new();
        let mut names: Vec<(u32, PathBuf)> = Vec::new();
        let mut lost = Vec::new();
        for entry in fs::read_dir(&journal_dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".del") {
                // A spare segment deleted just before a stop.
                let _ = fs::remove_file(&path);
            } else if let Some(n) = segment_number(name) {
                names.push((n, path));
            }
        }
        names.sort();
        for (n, path) in names {
            match recover_segment(n, &path, &mut index, &mut lost) {
                Ok((segment, marked)) => {
                    if marked {
                        dirty.insert(n);
                    }
                    segs.insert(n, segment);
                }
                Err(e) => {
                    // Left as it is, out of use, for someone to look at; the rest of the spool
                    // still starts.
                    tracing::error!(file = %path.display(), error = %e,
                        "spool: cannot read a journal segment; its messages are not queued until it can be read");
                }
            }
        }
        let mut inner = Inner {
            segs,
            active: None,
            index,
            stateless: HashSet::new(),
            dirty,
            lost,
        };
        // Spares beyond what is kept, left by a burst before the restart.
        let free: Vec<u32> = inner
            .segs
            .iter()
            .filter(|(_, s)| s.state == SegState::Free)
            .map(|(n, _)| *n)
            .skip(KEEP_FREE)
            .collect();
        for n in free {
            inner.segs.remove(&n);
            let _ = fs::remove_file(segment_path(&journal_dir, n));
        }
        let mut ids: Vec<String> = inner.index.keys().cloned().collect();
        ids.sort();
        let spare = inner.want_spare(&journal_dir);
        let inner = Arc::new(Mutex::new(inner));
        // The lock is held by every handle and by the helper threads, which may still write
        // into the journal after the last handle is gone: the spool is not free until they end.
        let lock = Arc::new(lock_file);
        if let Some(spare) = spare {
            prepare(inner.clone(), spare, journal_dir.clone(), lock.clone());
        }
        let (tx, rx) = std_mpsc::channel::<Job>();
        let shared = inner.clone();
        let dirs = (tmp, queue, journal_dir);
        let held = lock.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || {
                committer(rx, &shared, &dirs.0, &dirs.1, &dirs.2);
                drop(held);
            })?;
        Ok((
            Spool {
                root: root.to_path_buf(),
                inner,
                committer: tx,
                _lock: lock,
            },
            ids,
        ))
    }

    fn queue_path(&self, id: &str) -> PathBuf {
        self.root.join("queue").join(id)
    }

    fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Makes a message durable. Returns once it is synced and can be loaded.
    pub async fn store(
        &self,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
        message: &[u8],
    ) -> io::Result<()> {
        check_id(id)?;
        let header = encode_header(arrived, envelope);
        if header.len() + message.len() > LARGE {
            return self.store_file(id, header, message).await;
        }
        let mut draft = journal::draft(id, &[&header, message]);
        let len = draft.bytes.len() as u64;
        let journal_dir = self.journal_dir();
        let ((seg, off, generation, file), spare) = {
            let mut inner = self.inner();
            let reserved = inner.reserve(len, &journal_dir, &self.committer)?;
            (reserved, inner.want_spare(&journal_dir))
        };
        if let Some(spare) = spare {
            prepare(self.inner.clone(), spare, journal_dir, self._lock.clone());
        }
        draft.seal(generation);
        // A write of a few KiB into the page cache: done here rather than on another thread,
        // which would cost two context switches per message for microseconds of work.
        if let Err(e) = file.write_all_at(&draft.bytes, off) {
            self.inner().kill(seg, off, &self.committer);
            return Err(e);
        }
        let (done, wait) = oneshot::channel();
        let sent = self.committer.send(Job::Sync { seg, done });
        let synced = match sent {
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err(io::Error::other("spool committer stopped"))),
            Err(_) => Err(io::Error::other("spool committer stopped")),
        };
        let mut inner = self.inner();
        match synced {
            Ok(()) => {
                inner.index.insert(
                    id.to_string(),
                    Loc::Seg {
                        seg,
                        off,
                        len: len as u32,
                    },
                );
                inner.stateless.insert(id.to_string());
                Ok(())
            }
            Err(e) => {
                inner.kill(seg, off, &self.committer);
                Err(e)
            }
        }
    }

    /// Stores a message in a file of its own: `tmp/`, `fdatasync`, then renamed into `queue/`
    /// by the committer.
    async fn store_file(&self, id: &str, header: Vec<u8>, message: &[u8]) -> io::Result<()> {
        let mut data = header;
        data.extend_from_slice(message);
        let path = self.root.join("tmp").join(id);
        tokio::task::spawn_blocking(move || write_synced(&path, &data))
            .await
            .map_err(io::Error::other)??;
        self.publish_file(id).await
    }

    /// Starts a message that is written as it arrives, in a file of its own (`tmp/<id>`),
    /// beginning with its envelope. Blocking (it creates and writes a file): call it from a
    /// blocking thread, as [`Incoming::append`].
    pub fn begin(&self, id: &str, arrived: u64, envelope: &Envelope) -> io::Result<Incoming> {
        Incoming::create(&self.root.join("tmp"), id, arrived, envelope)
    }

    /// Appends the last part of a message begun with [`Spool::begin`] and makes it durable
    /// as [`Spool::store`] does: synced, renamed into `queue/`, then loadable. On an error
    /// nothing is queued and the file is removed.
    pub async fn commit(&self, incoming: Incoming, tail: Vec<u8>) -> io::Result<()> {
        let mut incoming = tokio::task::spawn_blocking(move || {
            let mut incoming = incoming;
            incoming.append(&tail)?;
            incoming.file.sync_data()?;
            Ok::<_, io::Error>(incoming)
        })
        .await
        .map_err(io::Error::other)??;
        self.publish_file(&incoming.id).await?;
        incoming.committed = true;
        Ok(())
    }

    /// Moves a synced file from `tmp/` into `queue/` (the committer syncs the directory) and
    /// indexes it.
    async fn publish_file(&self, id: &str) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.committer
            .send(Job::Rename {
                id: id.to_string(),
                done,
            })
            .map_err(|_| io::Error::other("spool committer stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("spool committer stopped"))??;
        let mut inner = self.inner();
        inner.index.insert(id.to_string(), Loc::File);
        inner.stateless.insert(id.to_string());
        Ok(())
    }

    /// Damaged journal records found when the spool was opened.
    pub fn lost(&self) -> Vec<Lost> {
        self.inner().lost.clone()
    }

    /// The payload bytes of a queued message.
    fn payload(&self, id: &str) -> io::Result<Vec<u8>> {
        check_id(id)?;
        let record = {
            let inner = self.inner();
            match inner.index.get(id) {
                None => return Err(gone(id)),
                Some(Loc::File) => None,
                Some(&Loc::Seg { seg, off, len }) => {
                    let s = inner.segs.get(&seg).ok_or_else(|| gone(id))?;
                    Some((s.file.clone(), s.generation, off, len))
                }
            }
        };
        let Some((file, generation, off, len)) = record else {
            return fs::read(self.queue_path(id));
        };
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off)?;
        match journal::check_record(&buf, generation) {
            Some((_, found, true)) if found == id => {}
            // Removed while we read it.
            Some((_, _, false)) => return Err(gone(id)),
            _ => return Err(corrupt(id)),
        }
        buf.drain(..journal::REC_HEADER);
        Ok(buf)
    }

    /// Reads a queued message.
    pub fn load(&self, id: &str) -> io::Result<Spooled> {
        let data = self.payload(id)?;
        decode(id, &data).ok_or_else(|| corrupt(id))
    }

    /// Removes a message whose recipients are all final, and its state.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        check_id(id)?;
        let (loc, stateless) = {
            let mut inner = self.inner();
            let loc = inner.index.remove(id).ok_or_else(|| gone(id))?;
            if let Loc::Seg { seg, off, .. } = loc {
                inner.kill(seg, off, &self.committer);
            }
            (loc, inner.stateless.remove(id))
        };
        if loc == Loc::File {
            fs::remove_file(self.queue_path(id))?;
        }
        if stateless {
            return Ok(());
        }
        match fs::remove_file(self.state_dir().join(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The per-recipient state of a queued message (all recipients pending when it has none).
    pub fn load_state(&self, id: &str, recipients: usize) -> io::Result<MessageState> {
        check_id(id)?;
        if self.inner().stateless.contains(id) {
            return Ok(MessageState::new(recipients));
        }
        match MessageState::load(&self.state_dir(), id, recipients) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                // The message is intact; only its per-recipient progress is not. Delivering to
                // every recipient again beats never delivering: at least once, not lost. The
                // damaged file is kept beside for inspection.
                let dir = self.state_dir();
                let aside = dir.join(format!("{id}.damaged"));
                let _ = fs::rename(dir.join(id), &aside);
                tracing::warn!(queue_id = id, kept = %aside.display(),
                    "the message's state file is damaged; every recipient is taken as pending (delivered ones may get a second copy)");
                Ok(MessageState::new(recipients))
            }
            other => other,
        }
    }

    /// Saves the per-recipient state of a queued message (its file in `state/`).
    pub fn save_state(&self, id: &str, st: &MessageState) -> io::Result<()> {
        check_id(id)?;
        // Before the write: a failed write may still leave a file behind.
        self.inner().stateless.remove(id);
        st.save(&self.state_dir(), id)
    }

    /// Moves a message that has to wait for a retry out of the journal into a file of its
    /// own, so that its segment can be reused. Blocking; a no-op for a message in a file.
    pub fn park(&self, id: &str) -> io::Result<()> {
        check_id(id)?;
        let before = match self.inner().index.get(id) {
            Some(loc @ Loc::Seg { .. }) => *loc,
            _ => return Ok(()),
        };
        let data = self.payload(id)?;
        let tmp = self.root.join("tmp").join(id);
        let copied = write_synced(&tmp, &data)
            .and_then(|()| fs::rename(&tmp, self.queue_path(id)))
            .and_then(|()| sync_dir(&self.root.join("queue")));
        if let Err(e) = copied {
            // Nothing lost: the journal record is still the message. Try again next time.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let mut inner = self.inner();
        if inner.index.get(id) == Some(&before) {
            inner.index.insert(id.to_string(), Loc::File);
            if let Loc::Seg { seg, off, .. } = before {
                inner.kill(seg, off, &self.committer);
            }
            Ok(())
        } else {
            // Removed meanwhile.
            drop(inner);
            fs::remove_file(self.queue_path(id))
        }
    }

    /// Syncs the dead marks written since the last sync (at shutdown; the committer also
    /// does it every second).
    pub fn flush(&self) {
        flush_dead(&self.inner);
    }

    /// The message is a record in a journal segment written since start-up (so most likely
    /// still in the page cache), not in a file of its own.
    pub fn in_journal(&self, id: &str) -> bool {
        let inner = self.inner();
        match inner.index.get(id) {
            Some(Loc::Seg { seg, .. }) => inner.segs.get(seg).is_some_and(|s| !s.recovered),
            _ => false,
        }
    }

    /// The message is (still) queued.
    pub fn exists(&self, id: &str) -> bool {
        self.inner().index.contains_key(id)
    }

    /// The spool's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the per-recipient state files.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Ids currently queued, oldest first.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = self.inner().index.keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }
}

/// How long opening waits for the spool's lock.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Takes the spool's exclusive lock (`flock`), or says which process holds it.
fn lock_spool(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // flock(2) on Unix: released when the process exits, whatever way it ends. A predecessor
    // still exiting (a restart), or a spool of this process whose helper threads are finishing,
    // is waited for briefly.
    let deadline = Instant::now() + LOCK_WAIT;
    let locked = loop {
        match f.try_lock() {
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    if let Err(e) = locked {
        let e = match e {
            fs::TryLockError::WouldBlock => io::Error::from(io::ErrorKind::WouldBlock),
            fs::TryLockError::Error(e) => e,
        };
        let holder = fs::read_to_string(path).unwrap_or_default();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "{} is in use by another moat (pid {}): {e}",
                path.parent().unwrap_or(path).display(),
                holder.trim()
            ),
        ));
    }
    f.set_len(0)?;
    f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)?;
    Ok(f)
}

/// Reads one segment at start-up: indexes its live records (a record whose message is also in
/// a file of its own is marked dead: the file is the copy that counts) and clears it if none
/// is left. Returns the segment and whether dead marks were written.
fn recover_segment(
    n: u32,
    path: &Path,
    index: &mut HashMap<String, Loc>,
    lost: &mut Vec<Lost>,
) -> io::Result<(Segment, bool)> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let data = fs::read(path)?;
    let (scan, damaged) = match journal::read_segment_header(&data) {
        Some(g) => (journal::scan_records(&data, g), false),
        None if journal::header_is_clear(&data) => (journal::Scan::default(), false),
        None => {
            // Not cleared, yet not a valid header: damage. Its records still carry their
            // generation; read them with it, and never reuse the file.
            let g = journal::first_record_generation(&data).unwrap_or(0);
            let scan = journal::scan_records(&data, g);
            tracing::error!(file = %path.display(), records = scan.records.len(),
                "spool: damaged journal segment header; its records were read with their own generation");
            (scan, true)
        }
    };
    if scan.skipped > 0 {
        tracing::warn!(file = %path.display(), bytes = scan.skipped, records = scan.records.len(),
            "spool: damaged bytes in a journal segment skipped; the records around them were kept");
    }
    for d in &scan.damaged {
        let queued_elsewhere = d.id.as_ref().is_some_and(|id| index.contains_key(id));
        if !queued_elsewhere {
            tracing::error!(file = %path.display(), offset = d.offset,
                queue_id = d.id.as_deref().unwrap_or("(unreadable)"),
                sender = d.sender.as_deref().unwrap_or("(unreadable)"), size = d.len,
                "spool: a journal record is damaged or torn and cannot be read; if its message was acknowledged, it is lost");
            lost.push(Lost {
                id: d.id.clone(),
                sender: d.sender.clone(),
                size: d.len,
                segment: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                offset: d.offset,
            });
        }
    }
    let damaged = damaged || scan.skipped > 0;
    if damaged {
        keep_damaged_copy(path, &data);
    }
    let mut live = 0;
    let mut marked = false;
    for r in scan.records.iter().filter(|r| r.live) {
        if index.contains_key(&r.id) {
            if let Err(e) = file.write_all_at(&[DEAD], r.offset + STATE_AT) {
                tracing::warn!(file = %path.display(), error = %e, "spool: marking a record dead failed");
            }
            marked = true;
            continue;
        }
        index.insert(
            r.id.clone(),
            Loc::Seg {
                seg: n,
                off: r.offset,
                len: r.len,
            },
        );
        live += 1;
    }
    let state = if live > 0 || damaged {
        // A damaged segment is never reused; once its live records are gone it is cleared.
        SegState::Sealed
    } else {
        if scan.generation.is_some() {
            file.write_all_at(&[0u8; SEG_HEADER as usize], 0)
                .and_then(|()| file.sync_data())?;
        }
        SegState::Free
    };
    let segment = Segment {
        file: Arc::new(file),
        generation: scan.generation.unwrap_or(0),
        live,
        end: scan.end,
        state,
        fresh: false,
        poisoned: false,
        recovered: true,
    };
    Ok((segment, marked))
}

/// Keeps the evidence of a damaged segment: one copy beside it (`seg-N.damaged-<time>`, not
/// one per restart), since the segment itself is cleared and reused once its records are gone.
fn keep_damaged_copy(path: &Path, data: &[u8]) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    let prefix = format!("{name}.damaged-");
    let kept_before = path
        .parent()
        .and_then(|d| fs::read_dir(d).ok())
        .is_some_and(|mut entries| {
            entries.any(|e| {
                e.ok()
                    .and_then(|e| e.file_name().into_string().ok())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
        });
    if kept_before {
        return;
    }
    let aside = path.with_file_name(format!("{prefix}{}", crate::util::unix_now()));
    match fs::write(&aside, data) {
        Ok(()) => tracing::warn!(file = %path.display(), copy = %aside.display(),
            "spool: a copy of the damaged segment was kept for inspection"),
        Err(e) => tracing::warn!(file = %path.display(), error = %e,
            "spool: cannot keep a copy of the damaged segment"),
    }
}

pub(crate) fn gone(id: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{id} is not queued"))
}

pub(crate) fn corrupt(id: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt spool record {id}"),
    )
}

/// Writes a new file and syncs its data; on failure, the file is removed.
fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    let written = f.write_all(data).and_then(|()| f.sync_data());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
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
pub(crate) fn check_id(id: &str) -> io::Result<()> {
    if crate::util::is_queue_id(id) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "bad queue id"))
    }
}

/// Syncs every segment with unsynced dead marks.
fn flush_dead(inner: &Mutex<Inner>) {
    let files: Vec<(u32, Arc<File>)> = {
        let mut inner = lock(inner);
        let dirty = std::mem::take(&mut inner.dirty);
        dirty
            .into_iter()
            .filter_map(|n| inner.segs.get(&n).map(|s| (n, s.file.clone())))
            .collect()
    };
    for (n, f) in files {
        if let Err(e) = f.sync_data() {
            // The error may belong to records waiting for their sync: they must not be
            // acknowledged on the strength of a later one.
            poison(inner, n, &e);
        }
    }
}

/// The committer thread: syncs segments and renames files in batches, clears emptied
/// segments, and syncs dead marks every [`FLUSH_EVERY`].
fn committer(
    rx: std_mpsc::Receiver<Job>,
    inner: &Mutex<Inner>,
    tmp: &Path,
    queue: &Path,
    journal_dir: &Path,
) {
    let mut last_flush = Instant::now();
    loop {
        let first = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(job) => Some(job),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                flush_dead(inner);
                return;
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        // One sync per segment touched, whatever the number of records.
        let mut synced: BTreeMap<u32, io::Result<()>> = BTreeMap::new();
        let mut renamed = false;
        for job in &batch {
            match job {
                Job::Sync { seg, .. } if !synced.contains_key(seg) => {
                    synced.insert(*seg, sync_segment(inner, *seg, journal_dir));
                }
                Job::Rename { .. } => renamed = true,
                _ => {}
            }
        }
        let mut renames: Vec<io::Result<()>> = Vec::new();
        for job in &batch {
            if let Job::Rename { id, .. } = job {
                renames.push(fs::rename(tmp.join(id), queue.join(id)));
            }
        }
        let dir_synced = if renamed { sync_dir(queue) } else { Ok(()) };
        let mut renames = renames.into_iter();
        for job in batch {
            match job {
                Job::Sync { seg, done } => {
                    let r = match synced.get(&seg) {
                        Some(Ok(())) => Ok(()),
                        Some(Err(e)) => Err(copy_err(e)),
                        None => Err(io::Error::other("spool segment not synced")),
                    };
                    let _ = done.send(r);
                }
                Job::Rename { done, .. } => {
                    let r = match (renames.next(), &dir_synced) {
                        (Some(Ok(())), Ok(())) => Ok(()),
                        (Some(Err(e)), _) => Err(e),
                        (Some(Ok(())), Err(e)) => Err(copy_err(e)),
                        (None, _) => Err(io::Error::other("spool rename lost")),
                    };
                    let _ = done.send(r);
                }
                Job::Free { seg } => free_segment(inner, seg, journal_dir),
            }
        }
        if last_flush.elapsed() >= FLUSH_EVERY {
            flush_dead(inner);
            last_flush = Instant::now();
        }
    }
}

/// Fills a new segment with zeros and syncs it, on a thread of its own, so that the records
/// later written into it overwrite allocated blocks and their syncs write no metadata.
fn prepare(
    inner: Arc<Mutex<Inner>>,
    (seg, file): (u32, Arc<File>),
    journal_dir: PathBuf,
    spool_lock: Arc<File>,
) {
    let shared = inner.clone();
    let work = move || {
        let _held = spool_lock;
        let zeros = vec![0u8; 1 << 20];
        let mut filled = Ok(());
        let mut at = 0;
        while at < SEGMENT_BYTES && filled.is_ok() {
            filled = file.write_all_at(&zeros, at);
            at += zeros.len() as u64;
        }
        let done = filled
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&journal_dir));
        let mut guard = lock(&inner);
        match done {
            Ok(()) => {
                if let Some(s) = guard.segs.get_mut(&seg) {
                    s.state = SegState::Free;
                    s.fresh = false;
                }
            }
            Err(e) => {
                tracing::warn!(segment = seg, error = %e, "spool: preparing a segment failed");
                guard.segs.remove(&seg);
                let _ = fs::remove_file(segment_path(&journal_dir, seg));
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("spool-prepare".into())
        .spawn(work)
    {
        tracing::warn!(error = %e, "spool: cannot start the segment helper");
        // Used unfilled then.
        if let Some(s) = lock(&shared).segs.get_mut(&seg) {
            s.state = SegState::Free;
        }
    }
}

/// Syncs one segment's data, and the journal directory if the segment's file is new.
fn sync_segment(inner: &Mutex<Inner>, seg: u32, journal_dir: &Path) -> io::Result<()> {
    let (file, fresh) = {
        let mut guard = lock(inner);
        // Dead marks written before this sync are covered by it.
        guard.dirty.remove(&seg);
        let s = guard
            .segs
            .get_mut(&seg)
            .ok_or_else(|| io::Error::other("spool segment vanished"))?;
        if s.poisoned {
            return Err(io::Error::other("spool segment failed an earlier sync"));
        }
        (s.file.clone(), std::mem::take(&mut s.fresh))
    };
    let result = file
        .sync_data()
        .and_then(|()| if fresh { sync_dir(journal_dir) } else { Ok(()) });
    if let Err(e) = &result {
        poison(inner, seg, e);
    }
    result
}

/// A sync of `seg` failed. Linux reports a writeback error once per open file and then forgets
/// the pages that failed, so a later sync of the same file could succeed without them: the
/// segment takes no more records, every record still waiting for a sync in it fails, and its
/// dead marks are retried at the next flush.
fn poison(inner: &Mutex<Inner>, seg: u32, e: &io::Error) {
    tracing::error!(segment = seg, error = %e,
        "spool: syncing a journal segment failed; it takes no more messages");
    let mut guard = lock(inner);
    if guard.active == Some(seg) {
        guard.active = None;
    }
    guard.dirty.insert(seg);
    if let Some(s) = guard.segs.get_mut(&seg) {
        s.poisoned = true;
        if s.state == SegState::Active {
            s.state = SegState::Sealed;
        }
    }
}

/// Clears the header of a segment with no live record (synced, so that none of its old
/// records can come back), then keeps it for reuse or deletes it.
fn free_segment(inner: &Mutex<Inner>, seg: u32, journal_dir: &Path) {
    let Some(file) = lock(inner).segs.get(&seg).map(|s| s.file.clone()) else {
        return;
    };
    let cleared = file
        .write_all_at(&[0u8; SEG_HEADER as usize], 0)
        .and_then(|()| file.sync_data());
    if let Err(e) = cleared {
        // Left as it is; the next start reads it again.
        tracing::warn!(segment = seg, error = %e, "spool: clearing an empty segment failed");
        return;
    }
    let mut guard = lock(inner);
    // A spare still being filled counts: it becomes free later, without passing through here.
    let free = guard
        .segs
        .values()
        .filter(|s| matches!(s.state, SegState::Free | SegState::Preparing))
        .count();
    let poisoned = guard.segs.get(&seg).is_some_and(|s| s.poisoned);
    if free >= KEEP_FREE || poisoned {
        // Renamed under the lock (so a new segment never meets its name), unlinked after.
        guard.segs.remove(&seg);
        guard.dirty.remove(&seg);
        let path = segment_path(journal_dir, seg);
        let doomed = path.with_extension("del");
        let renamed = fs::rename(&path, &doomed);
        drop(guard);
        if let Err(e) = renamed.and_then(|()| fs::remove_file(&doomed)) {
            tracing::warn!(segment = seg, error = %e, "spool: deleting a spare segment failed");
        }
    } else if let Some(s) = guard.segs.get_mut(&seg) {
        s.state = SegState::Free;
        s.live = 0;
        s.end = SEG_HEADER;
    }
}

pub(crate) fn encode_header(arrived: u64, env: &Envelope) -> Vec<u8> {
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
    if env.requiretls {
        h.push_str("requiretls 1\n");
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

pub(crate) fn decode(id: &str, data: &[u8]) -> Option<Spooled> {
    let end = data.windows(2).position(|w| w == b"\n\n")?;
    let (arrived, envelope) = decode_header(&data[..end])?;
    Some(Spooled {
        id: id.to_string(),
        arrived,
        envelope,
        message: data[end + 2..].to_vec(),
    })
}

/// Reads an envelope written by [`encode_header`] (with or without its blank line).
pub(crate) fn decode_header(header: &[u8]) -> Option<(u64, Envelope)> {
    let header = std::str::from_utf8(header).ok()?;
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
            "requiretls" => env.requiretls = v == "1",
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
    Some((arrived, env))
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
            requiretls: true,
        }
    }

    #[tokio::test]
    async fn state_files_only_once_saved_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = |id: &str| dir.path().join("state").join(id);
        let (a, b) = (crate::util::new_queue_id(), crate::util::new_queue_id());
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            for id in [&a, &b] {
                spool.store(id, 1, &env(), b"x\r\n").await.unwrap();
                let st = spool.load_state(id, 2).unwrap();
                assert!(st.rcpts.iter().all(|r| r.attempts == 0));
            }
            assert!(!state_file(&a).exists());
            let mut st = spool.load_state(&a, 2).unwrap();
            st.rcpts[0].attempts = 3;
            spool.save_state(&a, &st).unwrap();
            assert!(state_file(&a).exists());
            assert_eq!(spool.load_state(&a, 2).unwrap().rcpts[0].attempts, 3);
            spool.remove(&b).unwrap();
            spool.flush();
        }
        // After a restart nothing is assumed: the saved state is read back, and removing the
        // message removes its state file.
        let (spool, ids) = Spool::open(dir.path()).unwrap();
        assert_eq!(ids, vec![a.clone()]);
        assert_eq!(spool.load_state(&a, 2).unwrap().rcpts[0].attempts, 3);
        spool.remove(&a).unwrap();
        assert!(!state_file(&a).exists());
    }

    #[tokio::test]
    async fn a_damaged_state_file_means_every_recipient_pending() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::util::new_queue_id();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            spool.store(&id, 1, &env(), b"x\r\n").await.unwrap();
            let mut st = spool.load_state(&id, 2).unwrap();
            st.rcpts[0].attempts = 3;
            spool.save_state(&id, &st).unwrap();
            spool.flush();
        }
        std::fs::write(dir.path().join("state").join(&id), b"\x00garbage\xff").unwrap();
        let (spool, ids) = Spool::open(dir.path()).unwrap();
        assert_eq!(ids, vec![id.clone()]);
        let st = spool.load_state(&id, 2).unwrap();
        assert!(
            st.rcpts
                .iter()
                .all(|r| r.attempts == 0 && !r.state.is_final())
        );
        assert!(
            dir.path()
                .join("state")
                .join(format!("{id}.damaged"))
                .exists()
        );
        assert_eq!(spool.load(&id).unwrap().message, b"x\r\n");
    }

    #[tokio::test]
    async fn messages_written_as_they_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let id = crate::util::new_queue_id();
        let mut incoming = spool.begin(&id, 7, &env()).unwrap();
        incoming.append(b"Received: x\r\n").unwrap();
        incoming.append(&vec![b'a'; 3 << 20]).unwrap();
        assert_eq!(incoming.len(), (3 << 20) + 13);
        assert!(spool.list().unwrap().is_empty(), "not queued before commit");
        spool
            .commit(incoming, b"\r\nend\r\n".to_vec())
            .await
            .unwrap();
        assert!(std::fs::read_dir(&tmp).unwrap().next().is_none());
        let m = spool.load(&id).unwrap();
        assert_eq!(m.envelope, env());
        assert_eq!(m.arrived, 7);
        assert_eq!(m.message.len(), (3 << 20) + 13 + 7);
        assert!(m.message.starts_with(b"Received: x\r\naaa"));
        assert!(m.message.ends_with(b"a\r\nend\r\n"));
        // Abandoned before commit: the file goes, nothing is queued.
        let other = crate::util::new_queue_id();
        let mut abandoned = spool.begin(&other, 8, &env()).unwrap();
        abandoned.append(b"partial").unwrap();
        assert!(tmp.join(&other).exists());
        drop(abandoned);
        assert!(!tmp.join(&other).exists());
        assert_eq!(spool.list().unwrap(), vec![id.clone()]);
        // What a crash leaves in tmp/ was never acknowledged, and the next start clears it.
        let crashed = crate::util::new_queue_id();
        let mut left = spool.begin(&crashed, 9, &env()).unwrap();
        left.append(b"partial").unwrap();
        std::mem::forget(left);
        drop(spool);
        let (spool, ids) = Spool::open(dir.path()).unwrap();
        assert_eq!(ids, vec![id.clone()]);
        assert!(!tmp.join(&crashed).exists());
        assert_eq!(spool.load(&id).unwrap().message.len(), (3 << 20) + 20);
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

    /// Polls for up to five seconds (the committer works in the background).
    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The segment file that holds a record of `id`.
    fn holding(dir: &Path, id: &str) -> PathBuf {
        fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let data = fs::read(p).unwrap();
                journal::scan(&data).records.iter().any(|r| r.id == id)
            })
            .unwrap()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn journal_survives_reopen_and_dead_records_stay_dead() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            for i in 0..3 {
                let id = crate::util::new_queue_id();
                spool
                    .store(&id, i, &env(), format!("body {i}\r\n").as_bytes())
                    .await
                    .unwrap();
                ids.push(id);
            }
            spool.remove(&ids[1]).unwrap();
            assert!(matches!(spool.remove(&ids[1]), Err(e) if e.kind() == io::ErrorKind::NotFound));
            assert!(matches!(spool.load(&ids[1]), Err(e) if e.kind() == io::ErrorKind::NotFound));
            spool.flush();
        }
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, vec![ids[0].clone(), ids[2].clone()]);
        assert_eq!(spool.load(&ids[2]).unwrap().message, b"body 2\r\n");
        let old = holding(dir.path(), &ids[0]);
        // Recovered records live in a sealed segment; new ones go elsewhere.
        let id = crate::util::new_queue_id();
        spool.store(&id, 9, &env(), b"new\r\n").await.unwrap();
        assert_ne!(holding(dir.path(), &id), old);
        // Once the old segment is empty, it is cleared for reuse: reopening finds nothing in it.
        spool.remove(&ids[0]).unwrap();
        spool.remove(&ids[2]).unwrap();
        wait_until(|| fs::read(&old).unwrap()[..8] == [0u8; 8]);
        spool.flush();
        drop(spool);
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, vec![id.clone()]);
        assert_eq!(spool.load(&id).unwrap().message, b"new\r\n");
    }

    #[tokio::test]
    async fn torn_tail_is_ignored_and_never_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::util::new_queue_id();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            spool.store(&id, 1, &env(), b"whole\r\n").await.unwrap();
        }
        // A record that was being written when the machine stopped.
        let seg = holding(dir.path(), &id);
        let mut data = fs::read(&seg).unwrap();
        let len = data.len();
        let mut torn = journal::draft("00000000000000AA", &[b"half a message"]);
        torn.seal(journal::read_segment_header(&data).unwrap());
        data.resize(journal::aligned(len as u64) as usize, 0);
        data.extend_from_slice(&torn.bytes[..torn.bytes.len() - 3]);
        fs::write(&seg, &data).unwrap();
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, vec![id.clone()]);
        let next = crate::util::new_queue_id();
        spool.store(&next, 2, &env(), b"after\r\n").await.unwrap();
        assert_eq!(
            fs::read(&seg).unwrap(),
            data,
            "a segment read at start-up is never written to again"
        );
        assert_eq!(spool.load(&next).unwrap().message, b"after\r\n");
    }

    #[tokio::test]
    async fn segments_are_reused_and_spares_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let body = vec![b'x'; 900 * 1024];
        // Nine messages fill a segment; write four segments' worth, then deliver them.
        let mut ids = Vec::new();
        for i in 0..40 {
            let id = crate::util::new_queue_id();
            spool.store(&id, i, &env(), &body).await.unwrap();
            ids.push(id);
        }
        assert!(segments(dir.path()).len() >= 4);
        for id in &ids {
            spool.remove(id).unwrap();
        }
        // All sealed segments are cleared; at most two spares are kept besides the active one.
        wait_until(|| segments(dir.path()).len() <= 1 + KEEP_FREE);
        let before = segments(dir.path());
        for i in 0..30 {
            let id = crate::util::new_queue_id();
            spool.store(&id, i, &env(), &body).await.unwrap();
            spool.remove(&id).unwrap();
        }
        wait_until(|| segments(dir.path()).len() <= 1 + KEEP_FREE);
        let after = segments(dir.path());
        assert!(
            after.last() <= before.last(),
            "emptied segments are reused, not new files made: {before:?} -> {after:?}"
        );
        drop(spool);
        let (_, listed) = Spool::open(dir.path()).unwrap();
        assert!(
            listed.is_empty(),
            "delivered messages came back: {listed:?}"
        );
    }

    #[tokio::test]
    async fn large_and_parked_messages_live_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let big = vec![b'y'; LARGE + 1];
        let large = crate::util::new_queue_id();
        spool.store(&large, 1, &env(), &big).await.unwrap();
        assert!(dir.path().join("queue").join(&large).exists());
        assert_eq!(spool.load(&large).unwrap().message, big);
        let small = crate::util::new_queue_id();
        spool.store(&small, 2, &env(), b"wait\r\n").await.unwrap();
        assert!(!dir.path().join("queue").join(&small).exists());
        spool.park(&small).unwrap();
        spool.park(&small).unwrap();
        assert!(dir.path().join("queue").join(&small).exists());
        assert_eq!(spool.load(&small).unwrap().message, b"wait\r\n");
        drop(spool);
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed.len(), 2);
        spool.remove(&small).unwrap();
        spool.remove(&large).unwrap();
        assert!(spool.list().unwrap().is_empty());
        assert!(
            fs::read_dir(dir.path().join("queue"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn crash_while_parking_keeps_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::util::new_queue_id();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            spool.store(&id, 1, &env(), b"twice?\r\n").await.unwrap();
            // The file copy was made and synced, but the journal record was not yet marked.
            let data = spool.payload(&id).unwrap();
            fs::write(dir.path().join("queue").join(&id), data).unwrap();
        }
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, vec![id.clone()]);
        spool.remove(&id).unwrap();
        drop(spool);
        let (_, listed) = Spool::open(dir.path()).unwrap();
        assert!(listed.is_empty());
    }

    #[test]
    fn one_server_per_spool() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path()).unwrap();
        let e = Spool::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("in use by another moat"), "{e}");
        drop(first);
        Spool::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn a_damaged_segment_header_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..2).map(|_| crate::util::new_queue_id()).collect();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            for id in &ids {
                spool.store(id, 1, &env(), b"kept\r\n").await.unwrap();
            }
        }
        let seg = holding(dir.path(), &ids[0]);
        let mut data = fs::read(&seg).unwrap();
        data[3] ^= 0x40; // the header no longer checks out, and is not clear either
        fs::write(&seg, &data).unwrap();
        let (spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, ids);
        assert_eq!(spool.load(&ids[1]).unwrap().message, b"kept\r\n");
        // Never reused while its messages are queued.
        let id = crate::util::new_queue_id();
        spool.store(&id, 2, &env(), b"new\r\n").await.unwrap();
        assert_eq!(fs::read(&seg).unwrap(), data);
    }

    #[tokio::test]
    async fn a_damaged_record_is_named_and_its_segment_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..3).map(|_| crate::util::new_queue_id()).collect();
        {
            let (spool, _) = Spool::open(dir.path()).unwrap();
            for id in &ids {
                spool.store(id, 1, &env(), b"body\r\n").await.unwrap();
            }
            spool.flush();
        }
        let seg = holding(dir.path(), &ids[1]);
        let mut data = fs::read(&seg).unwrap();
        let s = journal::scan(&data);
        let r = s.records.iter().find(|r| r.id == ids[1]).unwrap();
        data[(r.offset + u64::from(r.len)) as usize - 3] ^= 0x01;
        fs::write(&seg, &data).unwrap();
        let scan = journal::scan(&data);
        assert_eq!(scan.damaged.len(), 1);
        assert_eq!(scan.damaged[0].id.as_deref(), Some(ids[1].as_str()));
        assert_eq!(
            scan.damaged[0].sender.as_deref(),
            Some(env().sender.as_str())
        );
        // The records around the damaged one survive; the evidence is copied aside.
        let (_spool, listed) = Spool::open(dir.path()).unwrap();
        assert_eq!(listed, vec![ids[0].clone(), ids[2].clone()]);
        let lost = _spool.lost();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].id.as_deref(), Some(ids[1].as_str()));
        assert_eq!(lost[0].sender.as_deref(), Some(env().sender.as_str()));
        assert_eq!(lost[0].offset, r.offset);
        let copies: Vec<_> = fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".damaged-"))
            .collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        drop(_spool);
        // A restart keeps the one copy, not one more per start.
        let _ = Spool::open(dir.path()).unwrap();
        let again = fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert_eq!(again, 1);
    }

    #[test]
    fn segment_names_and_spares_at_start() {
        assert_eq!(segment_number("seg-000042"), Some(42));
        for bad in [
            "seg-1",
            "seg-+00001",
            "seg-0000001",
            "seg-00000a",
            "seg-000001.del",
            "x",
        ] {
            assert_eq!(segment_number(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("journal")).unwrap();
        for n in 10..16 {
            fs::write(segment_path(&dir.path().join("journal"), n), [0u8; 4096]).unwrap();
        }
        fs::write(dir.path().join("journal/seg-000003.del"), b"x").unwrap();
        let (_spool, _) = Spool::open(dir.path()).unwrap();
        let left = segments(dir.path());
        assert!(left.len() <= KEEP_FREE, "{left:?}");
        assert!(!left.iter().any(|n| n.ends_with(".del")));
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
