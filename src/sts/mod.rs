//! MTA-STS (RFC 8461): policy parsing, discovery, cache and enforcement when sending,
//! and the domain owner's tools (generate, host, check).

pub mod policy;
