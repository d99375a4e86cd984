//! Outbound delivery: where mail for a domain goes ([`route`]), and (to come) the connection
//! attempts and the delivery transaction.

pub mod deliver;
pub mod route;
pub mod tls;
