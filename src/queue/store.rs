//! The queue's storage boundary: what the server needs from wherever queued mail lives.
//!
//! Two stores implement it: the embedded journal ([`Spool`], one node, the default) and
//! PostgreSQL ([`super::pg::PgStore`], several nodes sharing one queue). Every store keeps
//! the same promise: [`Store::store`] and [`Store::commit`] return only once the message is
//! durable, so the `250` that follows can never be for a message a crash could lose.
//!
//! A shared store hands out work by lease: a node delivers a message only while it holds
//! the message's lease ([`Store::take`], [`Store::claim_due`]), renews it while it works, and
//! gives it up with [`Store::finish`]. The embedded store has one node, which always holds
//! every lease.

use std::io;

use async_trait::async_trait;

use super::spool::{Incoming, Lost, Spool, Spooled};
use super::state::{MessageState, RcptState};
use crate::smtp::session::Envelope;

/// Where queued mail is kept (see the module documentation).
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `embedded` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Where the queue is, for the start-up line.
    fn location(&self) -> String;

    /// Shared with other nodes: due work is claimed from the store, not kept in memory.
    fn shared(&self) -> bool {
        false
    }

    /// The cluster's MTA-STS policy cache, for a store shared with other nodes.
    fn sts_share(&self) -> Option<std::sync::Arc<dyn crate::sts::share::Share>> {
        None
    }

    /// Makes a message durable; returns once it is (and it can be loaded).
    async fn store(
        &self,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
        message: &[u8],
    ) -> io::Result<()>;

    /// Starts a message written as it arrives (a local file beginning with its envelope).
    /// Blocking: call it from a blocking thread, as [`Incoming::append`].
    fn begin(&self, id: &str, arrived: u64, envelope: &Envelope) -> io::Result<Incoming>;

    /// Appends the last part of a message begun with [`Store::begin`] and makes it durable
    /// as [`Store::store`] does. On an error nothing is queued.
    async fn commit(&self, incoming: Incoming, tail: Vec<u8>) -> io::Result<()>;

    /// A queued message and its per-recipient state.
    async fn load(&self, id: &str) -> io::Result<(Spooled, MessageState)>;

    /// Saves the per-recipient state of a queued message (the lease, if any, is kept).
    async fn save_state(&self, id: &str, st: &MessageState) -> io::Result<()>;

    /// Ends a delivery pass: removes the message when every recipient is final, else saves
    /// its state for the next attempt; a shared store releases the lease.
    async fn finish(&self, id: &str, st: MessageState) -> io::Result<()>;

    /// Removes a message and its state.
    async fn remove(&self, id: &str) -> io::Result<()>;

    /// The message is (still) queued.
    async fn exists(&self, id: &str) -> io::Result<bool>;

    /// Ids currently queued, oldest first.
    async fn list(&self) -> io::Result<Vec<String>>;

    /// How many messages are queued.
    async fn count(&self) -> io::Result<usize> {
        Ok(self.list().await?.len())
    }

    /// The number of messages, and per recipient state the recipients in it and the age
    /// (seconds) of the oldest message with one, counted by the store itself; `None`: the
    /// store cannot, and the caller counts by loading every message.
    async fn by_state(&self) -> io::Result<Option<(usize, Vec<(RcptState, u64, u64)>)>> {
        Ok(None)
    }

    /// Ids of queued messages with a recipient in `domain` (canonical form), oldest first.
    async fn with_domain(&self, domain: &str) -> io::Result<Vec<String>>;

    /// The messages to schedule when the server starts, with the time each is due.
    async fn recovered(&self) -> Vec<(u64, String)> {
        Vec::new()
    }

    /// Damaged records found when the store was opened.
    fn lost(&self) -> Vec<Lost> {
        Vec::new()
    }

    /// Makes pending removals durable (at shutdown).
    async fn flush(&self) {}

    /// The message's first pass follows its write and its data is most likely in memory:
    /// the pass can read it on the runtime's thread.
    fn hot(&self, _id: &str) -> bool {
        false
    }

    /// Takes the lease of `id` for this node; false when another node holds it.
    async fn take(&self, _id: &str) -> io::Result<bool> {
        Ok(true)
    }

    /// The nodes sharing the store, for `/api/health` and `moat status` (`None`: one node).
    async fn cluster(&self) -> Option<serde_json::Value> {
        None
    }

    /// Gives up the lease of `id` after a pass that failed before [`Store::finish`] (the
    /// store could not be read or written): another node, or this one, claims it again.
    async fn release(&self, _id: &str) {}

    /// Leases up to `max` due messages no node holds (or whose holder's lease ran out).
    async fn claim_due(&self, _max: usize) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl Store for Spool {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn location(&self) -> String {
        self.root().display().to_string()
    }

    async fn store(
        &self,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
        message: &[u8],
    ) -> io::Result<()> {
        Spool::store(self, id, arrived, envelope, message).await
    }

    fn begin(&self, id: &str, arrived: u64, envelope: &Envelope) -> io::Result<Incoming> {
        Spool::begin(self, id, arrived, envelope)
    }

    async fn commit(&self, incoming: Incoming, tail: Vec<u8>) -> io::Result<()> {
        Spool::commit(self, incoming, tail).await
    }

    async fn load(&self, id: &str) -> io::Result<(Spooled, MessageState)> {
        let spool = self.clone();
        let id = id.to_string();
        let hot = self.in_journal(&id);
        let load = move || -> io::Result<_> {
            let msg = spool.load(&id)?;
            let st = spool.load_state(&id, msg.envelope.recipients.len())?;
            Ok((msg, st))
        };
        // A message on its first pass was just written to the journal and is read back from
        // the page cache: done here, as two thread hand-offs would cost more than the read.
        if hot {
            load()
        } else {
            tokio::task::spawn_blocking(load)
                .await
                .map_err(io::Error::other)?
        }
    }

    async fn save_state(&self, id: &str, st: &MessageState) -> io::Result<()> {
        let (spool, id, st) = (self.clone(), id.to_string(), st.clone());
        tokio::task::spawn_blocking(move || spool.save_state(&id, &st))
            .await
            .map_err(io::Error::other)?
    }

    async fn finish(&self, id: &str, st: MessageState) -> io::Result<()> {
        let done = st.all_final();
        // The common end, a message delivered on its first pass: a one-byte dead mark, done
        // here. Parking a message into a file and saving its state take longer.
        if done && self.in_journal(id) {
            return Spool::remove(self, id);
        }
        let (spool, id) = (self.clone(), id.to_string());
        let finish = move || {
            if done {
                spool.remove(&id)
            } else if !spool.exists(&id) {
                // Deleted by the administrator during this pass.
                Ok(())
            } else {
                spool.save_state(&id, &st)?;
                // It waits for a retry: out of the journal, into a file of its own. If that
                // fails (a full disk), it simply stays in the journal a while longer.
                if let Err(e) = spool.park(&id) {
                    tracing::warn!(queue_id = %id, error = %e, "could not move a deferred message out of the journal");
                }
                Ok(())
            }
        };
        tokio::task::spawn_blocking(finish)
            .await
            .map_err(io::Error::other)?
    }

    async fn remove(&self, id: &str) -> io::Result<()> {
        let (spool, id) = (self.clone(), id.to_string());
        tokio::task::spawn_blocking(move || spool.remove(&id))
            .await
            .map_err(io::Error::other)?
    }

    async fn exists(&self, id: &str) -> io::Result<bool> {
        Ok(Spool::exists(self, id))
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Spool::list(self)
    }

    async fn with_domain(&self, domain: &str) -> io::Result<Vec<String>> {
        let (spool, domain) = (self.clone(), domain.to_string());
        tokio::task::spawn_blocking(move || {
            Ok(spool
                .list()?
                .into_iter()
                .filter(|id| spool.load(id).is_ok_and(|m| m.has_recipient_in(&domain)))
                .collect())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn recovered(&self) -> Vec<(u64, String)> {
        let spool = self.clone();
        let scan = move || {
            let mut due = Vec::new();
            for id in spool.list().unwrap_or_default() {
                let next = match spool.load(&id) {
                    Ok(m) => spool
                        .load_state(&id, m.envelope.recipients.len())
                        .ok()
                        .and_then(|s| s.next_due()),
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot read queued message; left in place");
                        continue;
                    }
                };
                due.push((next.unwrap_or(0), id));
            }
            due
        };
        tokio::task::spawn_blocking(scan).await.unwrap_or_default()
    }

    fn lost(&self) -> Vec<Lost> {
        Spool::lost(self)
    }

    async fn flush(&self) {
        Spool::flush(self);
    }

    fn hot(&self, id: &str) -> bool {
        self.in_journal(id)
    }
}
