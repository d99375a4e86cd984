//! The queue: durable spool and the delivery worker.
//!
//! For now the worker delivers to local routes (Maildir, discard). Recipients in domains
//! without a local route stay queued until outbound delivery exists (issue 3).

pub mod dsn;
pub mod local;
pub mod spool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use spool::Spool;

/// Where one domain's mail goes.
#[derive(Debug, Clone)]
pub enum Route {
    Maildir(PathBuf),
    Discard,
}

/// Outcome of one delivery run over a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Every recipient was delivered; the message left the queue.
    All,
    /// Some recipients have no local route; the message stays queued.
    Kept(usize),
}

#[derive(Debug)]
pub struct Deliverer {
    pub spool: Spool,
    pub routes: HashMap<String, Route>,
    pub hostname: String,
}

impl Deliverer {
    /// Delivers every recipient with a local route; blocking (file I/O).
    pub fn deliver(&self, id: &str) -> std::io::Result<Delivered> {
        let msg = self.spool.load(id)?;
        let mut kept = 0;
        for (i, rcpt) in msg.envelope.recipients.iter().enumerate() {
            let domain = rcpt
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default();
            match self.routes.get(&domain) {
                Some(Route::Maildir(root)) => {
                    let path = local::deliver_maildir(root, &msg, i, &self.hostname)?;
                    tracing::info!(queue_id = id, to = %rcpt, path = %path.display(), "delivered to maildir");
                }
                Some(Route::Discard) => {
                    tracing::info!(queue_id = id, to = %rcpt, "discarded by route")
                }
                None => kept += 1,
            }
        }
        if kept > 0 {
            tracing::warn!(
                queue_id = id,
                recipients = kept,
                "no local route; kept in queue (remote delivery is not built yet)"
            );
            return Ok(Delivered::Kept(kept));
        }
        self.spool.remove(id)?;
        Ok(Delivered::All)
    }

    /// Starts the worker; queued ids are sent on the returned channel.
    pub fn spawn(self, existing: Vec<String>) -> mpsc::UnboundedSender<String> {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        for id in existing {
            let _ = tx.send(id);
        }
        let this = Arc::new(self);
        let retry_tx = tx.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(4));
            while let Some(id) = rx.recv().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let this = this.clone();
                let retry = retry_tx.clone();
                tokio::spawn(async move {
                    let id2 = id.clone();
                    let r = tokio::task::spawn_blocking(move || this.deliver(&id2)).await;
                    drop(permit);
                    match r {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(queue_id = %id, error = %e, "local delivery failed; retrying in 60s");
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            let _ = retry.send(id);
                        }
                        Err(e) => {
                            tracing::error!(queue_id = %id, error = %e, "delivery task failed")
                        }
                    }
                });
            }
        });
        tx
    }
}
