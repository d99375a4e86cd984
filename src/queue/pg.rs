//! The PostgreSQL store: several Moat nodes share one queue in one database.
//!
//! A message is one row of `moat_message` (envelope, body in `bytea`) and one row per
//! recipient in `moat_rcpt`, written by one statement: the `250` follows its commit, and
//! PostgreSQL's synchronous commit makes that durable (concurrent sessions share WAL
//! flushes, so there is no batching of our own).
//!
//! Work is handed out by lease. The node that accepts a message holds its lease from the
//! insert on and makes the first delivery pass at once; a message that waits for a retry is
//! released, and whichever node is free when it is due claims it (`FOR UPDATE SKIP LOCKED`).
//! A live node renews the leases it holds every third of `lease_secs`; a node that dies
//! loses them when they run out and the others deliver its mail. Lease times are the
//! database's clock, so nodes' clocks do not decide who holds what. A node whose lease ran
//! out while it was still delivering (a long database outage) finds so when it finishes,
//! logs it and counts it: the other node may deliver the same recipients a second time,
//! the window every at-least-once queue has.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::spool::{self, Incoming, Spooled};
use super::state::{MessageState, RcptState};
use super::store::Store;
use crate::config::Config;
use crate::policy::cause::Cause;
use crate::smtp::session::Envelope;

/// The schema, one migration per version; each runs in one transaction.
const MIGRATIONS: &[&str] = &[
    // 1: messages, recipients, nodes.
    "CREATE TABLE moat_message (
        id text PRIMARY KEY,
        arrived bigint NOT NULL,
        sender text NOT NULL,
        envelope text NOT NULL,
        body bytea NOT NULL,
        next_due bigint NOT NULL DEFAULT 0,
        lease_node text,
        lease_until bigint,
        node text NOT NULL
    );
    CREATE INDEX moat_message_due ON moat_message (next_due);
    CREATE INDEX moat_message_lease ON moat_message (lease_node) WHERE lease_node IS NOT NULL;
    CREATE TABLE moat_rcpt (
        message_id text NOT NULL REFERENCES moat_message (id) ON DELETE CASCADE,
        idx integer NOT NULL,
        address text NOT NULL,
        domain text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        attempts integer NOT NULL DEFAULT 0,
        next_attempt bigint NOT NULL DEFAULT 0,
        security boolean NOT NULL DEFAULT false,
        flags integer NOT NULL DEFAULT 0,
        cause text,
        status text NOT NULL DEFAULT '',
        remote text,
        reason text NOT NULL DEFAULT '',
        PRIMARY KEY (message_id, idx)
    );
    CREATE INDEX moat_rcpt_domain ON moat_rcpt (domain, message_id);
    CREATE TABLE moat_node (
        id text PRIMARY KEY,
        started bigint NOT NULL,
        heartbeat bigint NOT NULL,
        version text NOT NULL
    );",
    // 2: the cluster's MTA-STS policy cache (crate::sts::share); `changed` (the database's
    // clock) tells the nodes' pulls what is new.
    "CREATE TABLE moat_sts_policy (
        domain text PRIMARY KEY,
        id text NOT NULL,
        fetched bigint NOT NULL,
        expires bigint NOT NULL,
        policy text NOT NULL,
        node text NOT NULL,
        changed bigint NOT NULL
    );
    CREATE INDEX moat_sts_policy_changed ON moat_sts_policy (changed);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Advisory lock key held while migrating, so that nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6d6f_6174_5f6d_6967;

/// The database's clock, in Unix seconds.
pub(super) const NOW: &str = "extract(epoch from clock_timestamp())::bigint";

/// The queue in PostgreSQL (see the module documentation).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    node: String,
    lease_secs: i64,
    /// Messages this node holds the lease of.
    held: Arc<Mutex<HashSet<String>>>,
    /// Where messages being received are written until their commit.
    spill_dir: PathBuf,
    /// Why the database cannot be used yet (`None` once the schema is in place).
    not_ready: Arc<Mutex<Option<String>>>,
    /// What the database is, for logs.
    target: String,
    /// Messages this node just wrote, kept until their first pass reads them: that pass is
    /// then no round trip to the database (bounded by [`FRESH_MAX`] and [`FRESH_BYTES`]).
    fresh: Arc<Mutex<Fresh>>,
}

/// Messages kept for their first pass at most, and their bytes at most.
const FRESH_MAX: usize = 4096;
const FRESH_BYTES: usize = 64 << 20;

#[derive(Debug, Default)]
struct Fresh {
    messages: std::collections::HashMap<String, Spooled>,
    bytes: usize,
}

impl Fresh {
    fn put(&mut self, m: Spooled) {
        if self.messages.len() < FRESH_MAX && self.bytes + m.message.len() <= FRESH_BYTES {
            self.bytes += m.message.len();
            self.messages.insert(m.id.clone(), m);
        }
    }

    fn take(&mut self, id: &str) -> Option<Spooled> {
        let m = self.messages.remove(id)?;
        self.bytes -= m.message.len();
        Some(m)
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("node", &self.node)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

pub(super) fn db_err(e: impl std::error::Error) -> io::Error {
    io::Error::other(format!("queue database: {}", chain(&e)))
}

/// An error with every cause under it (a TLS handshake failure says why, not only that it
/// failed), without repeating a cause its parent already printed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The connection settings of `[postgres]`, with the password from its file.
pub fn pg_config(config: &Config) -> Result<tokio_postgres::Config, String> {
    let pc = &config.postgres;
    let mut pg: tokio_postgres::Config =
        pc.url.parse().map_err(|e| format!("[postgres] url: {e}"))?;
    if let Some(p) = &pc.password_file {
        let path = config.data_path(p);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("[postgres] password_file {}: {e}", path.display()))?;
        pg.password(text.lines().next().unwrap_or("").trim_end());
    }
    pg.connect_timeout(Duration::from_secs(pc.timeout_secs));
    pg.application_name("moat");
    Ok(pg)
}

/// A short description of where the database is (hosts, ports, name), for logs.
pub fn describe(pg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{} port {} database {}",
        hosts.join(","),
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        },
        pg.get_dbname().unwrap_or("(default)")
    )
}

/// A pool of connections to the database.
pub fn pool(config: &Config) -> Result<(Pool, String), String> {
    let pg = pg_config(config)?;
    let target = describe(&pg);
    let manager = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // TLS when the url asks for it (`sslmode=require`), always verified (chain and name).
    let mgr = if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        let ca = config
            .postgres
            .ca_file
            .as_ref()
            .map(|p| config.data_path(p));
        let tls = super::pg_tls::RustlsMake::from_ca_file(ca.as_deref())?;
        Manager::from_config(pg, tls, manager)
    } else {
        Manager::from_config(pg, NoTls, manager)
    };
    let wait = Duration::from_secs(config.postgres.timeout_secs);
    let pool = Pool::builder(mgr)
        .max_size(config.postgres.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .build()
        .map_err(|e| format!("[postgres]: {e}"))?;
    Ok((pool, target))
}

/// This node's name: `[postgres] node_id`, else the hostname.
pub fn node_id(config: &Config) -> String {
    config
        .postgres
        .node_id
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| config.hostname.clone())
}

/// Brings the schema up to [`SCHEMA_VERSION`]; refuses a database whose schema is newer.
/// Returns the version found and the version now.
pub async fn migrate(pool: &Pool) -> Result<(i32, i32), String> {
    let mut client = pool.get().await.map_err(|e| chain(&e))?;
    let tx = client.transaction().await.map_err(|e| chain(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| chain(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS moat_schema (version integer NOT NULL, applied bigint NOT NULL)",
    )
    .await
    .map_err(|e| chain(&e))?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM moat_schema", &[])
        .await
        .map_err(|e| chain(&e))?
        .try_get(0)
        .map_err(|e| chain(&e))?;
    if found > SCHEMA_VERSION {
        return Err(format!(
            "the database's schema is version {found}, newer than this Moat's ({SCHEMA_VERSION}): upgrade Moat on this node before starting it"
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("migration {version}: {e}"))?;
        tx.execute(
            &format!("INSERT INTO moat_schema (version, applied) VALUES ($1, {NOW})"),
            &[&version],
        )
        .await
        .map_err(|e| chain(&e))?;
    }
    tx.commit().await.map_err(|e| chain(&e))?;
    Ok((found, SCHEMA_VERSION))
}

/// The schema version of the database (0: none yet).
pub async fn schema_version(pool: &Pool) -> Result<i32, String> {
    let client = pool.get().await.map_err(|e| chain(&e))?;
    let exists: bool = client
        .query_one("SELECT to_regclass('moat_schema') IS NOT NULL", &[])
        .await
        .map_err(|e| chain(&e))?
        .try_get(0)
        .map_err(|e| chain(&e))?;
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM moat_schema", &[])
        .await
        .map_err(|e| chain(&e))?;
    row.try_get(0).map_err(|e| chain(&e))
}

/// One node of the cluster as the database knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub started: i64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: i64,
    pub version: String,
    /// Messages whose lease it holds now.
    pub leased: i64,
}

/// The cluster's nodes, most recently seen first.
pub async fn nodes(pool: &Pool) -> Result<Vec<NodeInfo>, String> {
    let client = pool.get().await.map_err(|e| chain(&e))?;
    let rows = client
        .query(
            &format!(
                "SELECT n.id, n.started, {NOW} - n.heartbeat, n.version,
                    (SELECT count(*) FROM moat_message m WHERE m.lease_node = n.id AND m.lease_until > {NOW})
                 FROM moat_node n ORDER BY n.heartbeat DESC, n.id"
            ),
            &[],
        )
        .await
        .map_err(|e| chain(&e))?;
    let e = |e: tokio_postgres::Error| chain(&e);
    rows.iter()
        .map(|r| {
            Ok(NodeInfo {
                id: r.try_get(0).map_err(e)?,
                started: r.try_get(1).map_err(e)?,
                heartbeat_age_secs: r.try_get(2).map_err(e)?,
                version: r.try_get(3).map_err(e)?,
                leased: r.try_get(4).map_err(e)?,
            })
        })
        .collect()
}

/// Messages in the queue.
pub async fn queued(pool: &Pool) -> Result<i64, String> {
    let client = pool.get().await.map_err(|e| chain(&e))?;
    let row = client
        .query_one("SELECT count(*) FROM moat_message", &[])
        .await
        .map_err(|e| chain(&e))?;
    row.try_get(0).map_err(|e| chain(&e))
}

impl PgStore {
    /// Connects, brings the schema up to date and starts the lease renewer. When the
    /// database cannot be reached the store still opens: every operation fails with the
    /// reason (so listeners answer 451 and deliveries pause) while it keeps trying, with
    /// backoff, until it can.
    pub async fn open(config: &Config) -> Result<PgStore, String> {
        let (pool, target) = pool(config)?;
        let spill_dir = config.data_dir.join("spool-pg").join("tmp");
        std::fs::create_dir_all(&spill_dir).map_err(|e| format!("{}: {e}", spill_dir.display()))?;
        // Unacknowledged leftovers of a crash: never committed, so never acknowledged.
        if let Ok(dir) = std::fs::read_dir(&spill_dir) {
            for entry in dir.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let store = PgStore {
            pool,
            node: node_id(config),
            lease_secs: config.postgres.lease_secs as i64,
            held: Arc::default(),
            spill_dir,
            not_ready: Arc::new(Mutex::new(Some("connecting".into()))),
            target,
            fresh: Arc::default(),
        };
        match store.prepare().await {
            Ok(()) => {}
            Err(e) if e.starts_with("the database's schema is version") => return Err(e),
            Err(e) => {
                tracing::error!(database = %store.target, error = %e,
                    "queue database unreachable: mail is refused with 451 4.3.0 and deliveries wait until it answers; retrying");
                *lock(&store.not_ready) = Some(e);
                let s = store.clone();
                tokio::spawn(async move { s.retry_prepare().await });
            }
        }
        let s = store.clone();
        tokio::spawn(async move { s.renew_loop().await });
        Ok(store)
    }

    /// Migrates and registers this node.
    async fn prepare(&self) -> Result<(), String> {
        let (from, to) = migrate(&self.pool).await?;
        if from != to {
            tracing::info!(database = %self.target, from, to, "queue database schema migrated");
        }
        self.heartbeat(true).await.map_err(|e| chain(&e))?;
        // Leases this node id holds from before its restart are stale (its passes ended
        // with the process): released now rather than after they run out. A node id is one
        // node's: two running nodes must never share one.
        let client = self.pool.get().await.map_err(|e| chain(&e))?;
        let held: Vec<String> = lock(&self.held).iter().cloned().collect();
        let released = client
            .execute(
                "UPDATE moat_message SET lease_node = NULL, lease_until = NULL
                 WHERE lease_node = $1 AND NOT (id = ANY($2))",
                &[&self.node, &held],
            )
            .await
            .map_err(|e| chain(&e))?;
        if released > 0 {
            tracing::info!(node = %self.node, messages = released,
                "released this node's leases from before its restart; they are delivered again");
        }
        *lock(&self.not_ready) = None;
        tracing::info!(database = %self.target, node = %self.node, schema = to, "queue database ready");
        Ok(())
    }

    async fn retry_prepare(&self) {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            match self.prepare().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(database = %self.target, error = %e, retry_in_secs = wait.as_secs(), "queue database still unreachable");
                    *lock(&self.not_ready) = Some(e);
                }
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// Renews this node's leases and heartbeat every third of the lease time.
    async fn renew_loop(&self) {
        let every = Duration::from_secs((self.lease_secs as u64 / 3).max(1));
        let mut failing = false;
        loop {
            tokio::time::sleep(every).await;
            if lock(&self.not_ready).is_some() {
                continue;
            }
            match self.renew().await {
                Ok(()) => {
                    if failing {
                        tracing::info!(node = %self.node, "queue database reachable again; leases renewed");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(node = %self.node, error = %e, "cannot renew leases in the queue database");
                        failing = true;
                    }
                }
            }
        }
    }

    async fn renew(&self) -> io::Result<()> {
        self.heartbeat(false).await?;
        let held: Vec<String> = lock(&self.held).iter().cloned().collect();
        if held.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE moat_message SET lease_until = {NOW} + $3
                     WHERE id = ANY($1) AND lease_node = $2"
                ),
                &[&held, &self.node, &self.lease_secs],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn heartbeat(&self, starting: bool) -> io::Result<()> {
        let client = self.pool.get().await.map_err(db_err)?;
        let sql = if starting {
            format!(
                "INSERT INTO moat_node (id, started, heartbeat, version) VALUES ($1, {NOW}, {NOW}, $2)
                 ON CONFLICT (id) DO UPDATE SET started = {NOW}, heartbeat = {NOW}, version = $2"
            )
        } else {
            format!(
                "INSERT INTO moat_node (id, started, heartbeat, version) VALUES ($1, {NOW}, {NOW}, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat = {NOW}, version = $2"
            )
        };
        client
            .execute(&sql, &[&self.node, &env!("CARGO_PKG_VERSION")])
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// A pooled connection, or why the database cannot be used.
    async fn client(&self) -> io::Result<deadpool_postgres::Object> {
        if let Some(why) = lock(&self.not_ready).clone() {
            return Err(io::Error::other(format!("queue database not ready: {why}")));
        }
        self.pool.get().await.map_err(db_err)
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The connection pool (status, admin).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn insert(&self, m: &Spooled) -> io::Result<()> {
        spool::check_id(&m.id)?;
        let header = String::from_utf8(spool::encode_header(m.arrived, &m.envelope))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "envelope is not UTF-8"))?;
        let n = m.envelope.recipients.len();
        let idx: Vec<i32> = (0..n as i32).collect();
        let domains: Vec<String> = m
            .envelope
            .recipients
            .iter()
            .map(|r| super::domain_of(r))
            .collect();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "WITH m AS (
                    INSERT INTO moat_message (id, arrived, sender, envelope, body, next_due, lease_node, lease_until, node)
                    VALUES ($1, $2, $3, $4, $5, 0, $6, {NOW} + $7, $6)
                    RETURNING id)
                 INSERT INTO moat_rcpt (message_id, idx, address, domain)
                 SELECT m.id, u.idx, u.address, u.domain
                 FROM m, unnest($8::int4[], $9::text[], $10::text[]) AS u(idx, address, domain)"
            ))
            .await
            .map_err(db_err)?;
        // Held before the commit: the renewer must never miss a lease this node has.
        lock(&self.held).insert(m.id.clone());
        let r = client
            .execute(
                &stmt,
                &[
                    &m.id,
                    &(m.arrived as i64),
                    &m.envelope.sender,
                    &header,
                    &m.message.as_slice(),
                    &self.node,
                    &self.lease_secs,
                    &idx,
                    &m.envelope.recipients,
                    &domains,
                ],
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                // The outcome of a commit that lost its connection is unknown: it is never
                // acknowledged (the client gets 451 and sends again; at worst a copy more).
                lock(&self.held).remove(&m.id);
                Err(db_err(e))
            }
        }
    }

    /// Writes the per-recipient state and the message's due time; with `release`, gives
    /// up the lease too. Whether this node still held the lease; `None` when the message is
    /// gone.
    async fn write_state(
        &self,
        id: &str,
        st: &MessageState,
        release: bool,
    ) -> io::Result<Option<bool>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let n = st.rcpts.len();
        let mut idx = Vec::with_capacity(n);
        let mut state = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        let mut security = Vec::with_capacity(n);
        let mut flags = Vec::with_capacity(n);
        let mut cause: Vec<Option<String>> = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut remote: Vec<Option<String>> = Vec::with_capacity(n);
        let mut reason = Vec::with_capacity(n);
        for (i, r) in st.rcpts.iter().enumerate() {
            idx.push(i as i32);
            state.push(r.state.as_str().to_string());
            attempts.push(r.attempts as i32);
            next.push(r.next_attempt as i64);
            security.push(r.security);
            flags.push(i32::from(r.notified) | (i32::from(r.warned) << 1));
            cause.push(r.cause.map(Cause::label));
            status.push(r.status.clone());
            remote.push(r.remote.clone());
            reason.push(r.reason.clone());
        }
        tx.execute(
            "UPDATE moat_rcpt r SET state = u.state, attempts = u.attempts, next_attempt = u.next,
                security = u.security, flags = u.flags, cause = u.cause, status = u.status,
                remote = u.remote, reason = u.reason
             FROM unnest($2::int4[], $3::text[], $4::int4[], $5::int8[], $6::bool[], $7::int4[],
                         $8::text[], $9::text[], $10::text[], $11::text[])
                  AS u(idx, state, attempts, next, security, flags, cause, status, remote, reason)
             WHERE r.message_id = $1 AND r.idx = u.idx",
            &[
                &id, &idx, &state, &attempts, &next, &security, &flags, &cause, &status, &remote,
                &reason,
            ],
        )
        .await
        .map_err(db_err)?;
        let due = st.next_due().unwrap_or(0) as i64;
        // Whether the lease is still ours, read (and the row locked) before it is changed.
        let Some(row) = tx
            .query_opt(
                &format!(
                    "SELECT coalesce(lease_node = $2 AND lease_until >= {NOW}, false)
                     FROM moat_message WHERE id = $1 FOR UPDATE"
                ),
                &[&id, &self.node],
            )
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let held: bool = row.try_get(0).map_err(db_err)?;
        if release {
            tx.execute(
                "UPDATE moat_message SET next_due = $2,
                    lease_node = CASE WHEN lease_node = $3 THEN NULL ELSE lease_node END,
                    lease_until = CASE WHEN lease_node = $3 THEN NULL ELSE lease_until END
                 WHERE id = $1",
                &[&id, &due, &self.node],
            )
            .await
            .map_err(db_err)?;
        } else {
            tx.execute(
                "UPDATE moat_message SET next_due = $2 WHERE id = $1",
                &[&id, &due],
            )
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Some(held))
    }
}

/// The first column of each row, as queue ids.
fn ids(rows: &[tokio_postgres::Row]) -> io::Result<Vec<String>> {
    rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn location(&self) -> String {
        format!("PostgreSQL ({}), node {}", self.target, self.node)
    }

    fn shared(&self) -> bool {
        true
    }

    fn sts_share(&self) -> Option<Arc<dyn crate::sts::share::Share>> {
        Some(Arc::new(super::pg_share::PgShare {
            pool: self.pool.clone(),
            node: self.node.clone(),
        }))
    }

    async fn store(
        &self,
        id: &str,
        arrived: u64,
        envelope: &Envelope,
        message: &[u8],
    ) -> io::Result<()> {
        // Borrowed fields would do, but a Spooled keeps one insert path for both entries.
        let m = Spooled {
            id: id.to_string(),
            arrived,
            envelope: envelope.clone(),
            message: message.to_vec(),
        };
        self.insert(&m).await?;
        lock(&self.fresh).put(m);
        Ok(())
    }

    fn begin(&self, id: &str, arrived: u64, envelope: &Envelope) -> io::Result<Incoming> {
        Incoming::create(&self.spill_dir, id, arrived, envelope)
    }

    async fn commit(&self, incoming: Incoming, tail: Vec<u8>) -> io::Result<()> {
        let read = tokio::task::spawn_blocking(move || {
            let mut incoming = incoming;
            incoming.append(&tail)?;
            let data = std::fs::read(incoming.path())?;
            // Dropped uncommitted: the local file goes; the database holds the message.
            Ok::<_, io::Error>((incoming.id().to_string(), data))
        })
        .await
        .map_err(io::Error::other)??;
        let (id, data) = read;
        let m = spool::decode(&id, &data).ok_or_else(|| spool::corrupt(&id))?;
        drop(data);
        self.insert(&m).await?;
        lock(&self.fresh).put(m);
        Ok(())
    }

    async fn load(&self, id: &str) -> io::Result<(Spooled, MessageState)> {
        // Its first pass: every recipient is still pending (anything that changes its state
        // first, an administrator's retry, bounce or delete, drops it from here).
        if let Some(m) = lock(&self.fresh).take(id) {
            let st = MessageState::new(m.envelope.recipients.len());
            return Ok((m, st));
        }
        let client = self.client().await?;
        let m = client
            .query_opt(
                "SELECT envelope, body FROM moat_message WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_err)?
            .ok_or_else(|| spool::gone(id))?;
        let header: &str = m.try_get(0).map_err(db_err)?;
        let body: Vec<u8> = m.try_get(1).map_err(db_err)?;
        let (arrived, envelope) =
            spool::decode_header(header.as_bytes()).ok_or_else(|| spool::corrupt(id))?;
        let rows = client
            .query(
                "SELECT idx, state, attempts, next_attempt, security, flags, cause, status, remote, reason
                 FROM moat_rcpt WHERE message_id = $1 ORDER BY idx",
                &[&id],
            )
            .await
            .map_err(db_err)?;
        let mut st = MessageState::new(envelope.recipients.len());
        for row in rows {
            let i: i32 = row.try_get(0).map_err(db_err)?;
            let Some(r) = usize::try_from(i).ok().and_then(|i| st.rcpts.get_mut(i)) else {
                continue;
            };
            let state: &str = row.try_get(1).map_err(db_err)?;
            r.state = RcptState::parse(state).unwrap_or(RcptState::Pending);
            r.attempts = row.try_get::<_, i32>(2).map_err(db_err)?.max(0) as u32;
            r.next_attempt = row.try_get::<_, i64>(3).map_err(db_err)?.max(0) as u64;
            r.security = row.try_get(4).map_err(db_err)?;
            let flags: i32 = row.try_get(5).map_err(db_err)?;
            r.notified = flags & 1 != 0;
            r.warned = flags & 2 != 0;
            let cause: Option<&str> = row.try_get(6).map_err(db_err)?;
            r.status = row.try_get(7).map_err(db_err)?;
            r.remote = row.try_get(8).map_err(db_err)?;
            r.reason = row.try_get(9).map_err(db_err)?;
            r.cause = cause.map(|l| {
                Cause::from_label(l)
                    .unwrap_or_else(|| Cause::from_legacy_status(&r.status, &r.reason))
            });
        }
        Ok((
            Spooled {
                id: id.to_string(),
                arrived,
                envelope,
                message: body,
            },
            st,
        ))
    }

    async fn save_state(&self, id: &str, st: &MessageState) -> io::Result<()> {
        lock(&self.fresh).take(id);
        match self.write_state(id, st, false).await? {
            Some(_) => Ok(()),
            None => Err(spool::gone(id)),
        }
    }

    async fn finish(&self, id: &str, st: MessageState) -> io::Result<()> {
        lock(&self.fresh).take(id);
        let ours = if st.all_final() {
            let client = self.client().await?;
            client
                .query_opt(
                    &format!(
                        "DELETE FROM moat_message WHERE id = $1
                         RETURNING coalesce(lease_node = $2 AND lease_until >= {NOW}, false)"
                    ),
                    &[&id, &self.node],
                )
                .await
                .map_err(db_err)?
                .map(|r| r.try_get::<_, bool>(0))
                .transpose()
                .map_err(db_err)?
        } else {
            self.write_state(id, &st, true).await?
        };
        lock(&self.held).remove(id);
        // `None`: deleted by the administrator during the pass.
        if ours == Some(false) {
            crate::metrics::inc(crate::metrics::Metric::LeaseLostTotal, &[]);
            tracing::warn!(queue_id = id, node = %self.node,
                "this node's lease on the message ran out during the delivery pass: another node may have delivered it too");
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> io::Result<()> {
        spool::check_id(id)?;
        lock(&self.fresh).take(id);
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM moat_message WHERE id = $1", &[&id])
            .await
            .map_err(db_err)?;
        lock(&self.held).remove(id);
        if n == 0 {
            return Err(spool::gone(id));
        }
        Ok(())
    }

    async fn exists(&self, id: &str) -> io::Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT 1 FROM moat_message WHERE id = $1", &[&id])
            .await
            .map_err(db_err)?;
        Ok(row.is_some())
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT id FROM moat_message ORDER BY id", &[])
            .await
            .map_err(db_err)?;
        ids(&rows)
    }

    async fn count(&self) -> io::Result<usize> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM moat_message", &[])
            .await
            .map_err(db_err)?
            .try_get(0)
            .map_err(db_err)?;
        Ok(n.max(0) as usize)
    }

    async fn by_state(&self) -> io::Result<Option<(usize, Vec<(RcptState, u64, u64)>)>> {
        let client = self.client().await?;
        // One snapshot for both counts.
        let rows = client
            .query(
                &format!(
                    "SELECT r.state, count(*), max({NOW} - m.arrived),
                        (SELECT count(*) FROM moat_message)
                     FROM moat_rcpt r JOIN moat_message m ON m.id = r.message_id
                     GROUP BY r.state"
                ),
                &[],
            )
            .await
            .map_err(db_err)?;
        let mut messages = 0;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let state: String = r.try_get(0).map_err(db_err)?;
            let n: i64 = r.try_get(1).map_err(db_err)?;
            let oldest: Option<i64> = r.try_get(2).map_err(db_err)?;
            let m: i64 = r.try_get(3).map_err(db_err)?;
            messages = usize::try_from(m).unwrap_or(0);
            if let Some(state) = RcptState::parse(&state) {
                out.push((
                    state,
                    u64::try_from(n).unwrap_or(0),
                    u64::try_from(oldest.unwrap_or(0)).unwrap_or(0),
                ));
            }
        }
        Ok(Some((messages, out)))
    }

    async fn with_domain(&self, domain: &str) -> io::Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT DISTINCT message_id FROM moat_rcpt WHERE domain = $1 ORDER BY message_id",
                &[&domain],
            )
            .await
            .map_err(db_err)?;
        ids(&rows)
    }

    async fn cluster(&self) -> Option<serde_json::Value> {
        let nodes = nodes(&self.pool).await;
        Some(match nodes {
            Ok(n) => serde_json::json!({
                "store": "postgres", "database": self.target, "node": self.node, "nodes": n,
            }),
            Err(e) => serde_json::json!({
                "store": "postgres", "database": self.target, "node": self.node,
                "error": format!("queue database: {e}"),
            }),
        })
    }

    fn hot(&self, id: &str) -> bool {
        lock(&self.fresh).messages.contains_key(id)
    }

    async fn release(&self, id: &str) {
        lock(&self.fresh).take(id);
        // No longer renewed: even when the update fails, the lease runs out by itself.
        lock(&self.held).remove(id);
        if let Ok(client) = self.client().await {
            let _ = client
                .execute(
                    "UPDATE moat_message SET lease_node = NULL, lease_until = NULL
                     WHERE id = $1 AND lease_node = $2",
                    &[&id, &self.node],
                )
                .await;
        }
    }

    async fn take(&self, id: &str) -> io::Result<bool> {
        if lock(&self.held).contains(id) {
            return Ok(true);
        }
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE moat_message SET lease_node = $2, lease_until = {NOW} + $3
                     WHERE id = $1 AND (lease_node IS NULL OR lease_node = $2 OR lease_until < {NOW})
                     RETURNING id"
                ),
                &[&id, &self.node, &self.lease_secs],
            )
            .await
            .map_err(db_err)?;
        if row.is_some() {
            lock(&self.held).insert(id.to_string());
        }
        Ok(row.is_some())
    }

    async fn claim_due(&self, max: usize) -> io::Result<Vec<String>> {
        let room = max.saturating_sub(lock(&self.held).len());
        if room == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let now = crate::util::unix_now() as i64;
        let rows = client
            .query(
                &format!(
                    "UPDATE moat_message SET lease_node = $1, lease_until = {NOW} + $2
                     WHERE id IN (
                        SELECT id FROM moat_message
                        WHERE next_due <= $3 AND (lease_node IS NULL OR lease_until < {NOW})
                        ORDER BY next_due
                        LIMIT $4
                        FOR UPDATE SKIP LOCKED)
                     RETURNING id"
                ),
                &[&self.node, &self.lease_secs, &now, &(room as i64)],
            )
            .await
            .map_err(db_err)?;
        let ids = ids(&rows)?;
        lock(&self.held).extend(ids.iter().cloned());
        Ok(ids)
    }
}
