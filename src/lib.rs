//! Moat: a mail transfer agent built around transport security.
//!
//! `docs/ARCHITECTURE.md` describes the architecture (data flow, rooms, invariants, the TLS
//! requirement, status codes); each module's docs describe its room.

#![forbid(unsafe_code)]

pub mod admin_api;
pub mod config;
pub mod dane;
pub mod dkim;
pub mod dns;
pub mod domain;
pub mod explain;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod report;
pub mod server;
pub mod smtp;
pub mod sts;
pub mod tls;
pub mod tlsrpt;
pub mod util;
