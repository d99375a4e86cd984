//! What nodes sharing a queue in PostgreSQL share besides the queue: the MTA-STS policy
//! cache ([`crate::sts::share`]), in `moat_sts_policy` (schema version 2).

use std::io;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use super::pg::{NOW, db_err};
use crate::sts::share::{Share, SharedPolicy};

/// The cluster's MTA-STS policies.
#[derive(Clone)]
pub struct PgShare {
    pub(super) pool: Pool,
    pub(super) node: String,
}

impl std::fmt::Debug for PgShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgShare").field("node", &self.node).finish()
    }
}

/// How long (seconds) a change is re-read by later pulls.
const OVERLAP_SECS: i64 = 60;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl Share for PgShare {
    async fn put(&self, p: &SharedPolicy) -> io::Result<()> {
        let client = self.pool.get().await.map_err(db_err)?;
        // The newest fetch wins.
        client
            .execute(
                &format!(
                    "INSERT INTO moat_sts_policy (domain, id, fetched, expires, policy, node, changed)
                     VALUES ($1, $2, $3, $4, $5, $6, {NOW})
                     ON CONFLICT (domain) DO UPDATE SET id = EXCLUDED.id,
                        fetched = EXCLUDED.fetched, expires = EXCLUDED.expires,
                        policy = EXCLUDED.policy, node = EXCLUDED.node, changed = EXCLUDED.changed
                     WHERE moat_sts_policy.fetched < EXCLUDED.fetched"
                ),
                &[
                    &p.domain,
                    &p.id,
                    &to_i64(p.fetched),
                    &to_i64(p.expires),
                    &p.policy,
                    &self.node,
                ],
            )
            .await
            .map_err(db_err)?;
        // Policies past their max_age protect nobody (a day's grace for clocks).
        client
            .execute(
                &format!("DELETE FROM moat_sts_policy WHERE expires < {NOW} - 86400"),
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn since(&self, after: i64) -> io::Result<(Vec<SharedPolicy>, i64)> {
        let client = self.pool.get().await.map_err(db_err)?;
        // Changes are re-read for a while after the mark: a write whose commit landed after
        // a pull that read later ones is not missed.
        let rows = client
            .query(
                &format!(
                    "SELECT domain, id, fetched, expires, policy, {NOW} FROM moat_sts_policy
                     WHERE changed >= $1::bigint - {OVERLAP_SECS} AND expires > {NOW}"
                ),
                &[&after],
            )
            .await
            .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut mark = after;
        for r in &rows {
            mark = mark.max(r.try_get(5).map_err(db_err)?);
            let fetched: i64 = r.try_get(2).map_err(db_err)?;
            let expires: i64 = r.try_get(3).map_err(db_err)?;
            out.push(SharedPolicy {
                domain: r.try_get(0).map_err(db_err)?,
                id: r.try_get(1).map_err(db_err)?,
                fetched: u64::try_from(fetched).unwrap_or(0),
                expires: u64::try_from(expires).unwrap_or(0),
                policy: r.try_get(4).map_err(db_err)?,
            });
        }
        Ok((out, mark))
    }
}
