//! MTA-STS policy and TXT record parsing (RFC 8461 §3).
