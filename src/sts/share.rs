//! MTA-STS policies shared between the nodes of one cluster (`[queue] store = "postgres"`).
//!
//! A policy one node fetched protects the whole cluster: RFC 8461 trusts a policy from its
//! first fetch on (§10.2), so a node that never saw a domain must not be the weak point an
//! attacker who blocks the TXT lookup or the policy host aims at. Each node keeps its own
//! cache ([`super::Sts`]: memory and `<data>/sts/`) and mirrors the shared one:
//! - a policy it fetches is saved to the shared store ([`Share::put`], newest fetch wins);
//! - it pulls what other nodes saved every few seconds ([`Share::since`]), and once more
//!   before it would fetch a policy itself, so a cluster fetches a new policy about once;
//! - at start it offers its own cache, so policies cached before the node joined are shared.
//!
//! The shared store is a mirror, never a dependency: with the database unreachable every node
//! goes on with its own cache, exactly as a single node does.

use std::io;

use async_trait::async_trait;

/// One policy as the shared store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPolicy {
    /// Canonical domain (A-labels, lowercase, no trailing dot).
    pub domain: String,
    /// The TXT record's `id` it was fetched under.
    pub id: String,
    /// When it was fetched (Unix seconds, the fetching node's clock).
    pub fetched: u64,
    /// When it stops applying (`fetched + max_age`).
    pub expires: u64,
    /// The body as served.
    pub policy: String,
}

/// Where the cluster's policies are kept.
#[async_trait]
pub trait Share: Send + Sync + std::fmt::Debug {
    /// Saves a policy unless the store holds one for the domain fetched at the same time or
    /// later.
    async fn put(&self, p: &SharedPolicy) -> io::Result<()>;

    /// Unexpired policies saved after the store's mark `after` (0: all), and the mark to give
    /// next time.
    async fn since(&self, after: i64) -> io::Result<(Vec<SharedPolicy>, i64)>;
}
