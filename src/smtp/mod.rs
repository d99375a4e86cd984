//! The SMTP wire protocol, sans-IO: command parsing (on `smtp-proto`), message content
//! receiving, and the server session state machine.

pub mod address;
pub mod client;
pub mod data;
pub mod session;
