//! MX routing: from a recipient domain to the ordered list of hosts and addresses to try.
//!
//! The rules (RFC 5321 §5.1, RFC 7505):
//!
//! 1. Look up the domain's MX records.
//!    * NXDOMAIN: the domain does not exist, a permanent failure ([`RouteError::NoSuchDomain`]).
//!    * No MX records (NODATA): *implicit MX*, the domain itself is the only host, with
//!      preference 0.
//!    * A temporary failure (timeout, SERVFAIL, …): `451 4.4.312` ([`RouteError::Dns`]).
//! 2. Null MX: if the only exchanges are the root name `.` (RFC 7505: a single `0 .` record), the
//!    domain accepts no mail: `556 5.1.10` ([`RouteError::NullMx`]). A `.` among real exchanges is
//!    ignored.
//! 3. Loop detection: if one of our own names is an MX host, that record and every record with an
//!    equal or worse (higher) preference is discarded; if nothing is left the mail would loop
//!    back to us: `554 5.4.6` ([`RouteError::MxLoop`]). The same holds for an implicit MX on one
//!    of our names.
//! 4. The hosts are ordered by preference, equal preferences in random order (a fresh shuffle on
//!    every call, so that load spreads as the domain's owner intended).
//! 5. Every host's A and AAAA records are looked up (all hosts concurrently). A host that does
//!    not exist or has no address is skipped; a host whose lookup failed temporarily is skipped
//!    too, but if no host has an address the first such failure is reported as temporary
//!    (`451 4.4.312`), else the route fails permanently ([`RouteError::NoAddress`], `5.4.4`).
//!
//! Not done here: routing to address literals (`user@[192.0.2.1]`), relay/smarthost rules, and
//! recognising our own *addresses* among the MX hosts' addresses (only names are compared).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use crate::dns::{DnsError, MxAnswer, Resolver, canonical_name};

/// One host to try, with all its addresses (IPv4 first, then IPv6, as the DNS gave them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The MX exchange (or the domain itself for an implicit MX): lowercase ASCII, no trailing dot.
    pub host: String,
    /// The MX preference (0 for an implicit MX). Lower is tried first.
    pub preference: u16,
    /// The host's addresses; never empty.
    pub addrs: Vec<IpAddr>,
}

/// Why there is no route to a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The domain is not a valid domain name (permanent, `550 5.1.2`).
    InvalidDomain {
        /// The domain as given.
        domain: String,
        /// The parse failure.
        error: DnsError,
    },
    /// The domain does not exist, NXDOMAIN (permanent, `550 5.1.2`).
    NoSuchDomain {
        /// The domain.
        domain: String,
    },
    /// The domain publishes a null MX: it accepts no mail (RFC 7505; permanent, `556 5.1.10`).
    NullMx {
        /// The domain.
        domain: String,
    },
    /// The best MX host left is ourselves (permanent, `554 5.4.6`).
    MxLoop {
        /// The domain.
        domain: String,
        /// The MX host that is one of our names.
        host: String,
        /// Its preference; no other host has a lower one.
        preference: u16,
    },
    /// The domain has no MX records and no A/AAAA records (permanent, `550 5.4.4`).
    NoMailHost {
        /// The domain.
        domain: String,
    },
    /// None of the MX hosts has an address: each does not exist or has no A/AAAA records
    /// (permanent, `550 5.4.4`).
    NoAddress {
        /// The domain.
        domain: String,
        /// One lookup failure per MX host, most preferred first.
        errors: Vec<DnsError>,
    },
    /// A DNS lookup needed for the next hop failed temporarily (`451 4.4.312`; after the retry
    /// window the queue reports it as `5.4.312`).
    Dns {
        /// The domain.
        domain: String,
        /// The failed lookup (MX of the domain, or A/AAAA of the most preferred host that failed).
        error: DnsError,
    },
}

impl RouteError {
    /// Whether retrying later cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, RouteError::Dns { .. })
    }

    /// The SMTP reply code used in [`RouteError::reply`].
    pub fn reply_code(&self) -> u16 {
        match self {
            RouteError::InvalidDomain { .. }
            | RouteError::NoSuchDomain { .. }
            | RouteError::NoMailHost { .. }
            | RouteError::NoAddress { .. } => 550,
            RouteError::NullMx { .. } => 556,
            RouteError::MxLoop { .. } => 554,
            RouteError::Dns { .. } => 451,
        }
    }

    /// The enhanced status code (RFC 3463; docs/ARCHITECTURE.md, "Status codes").
    /// The cause, for the queue and the DSN.
    pub fn cause(&self) -> crate::policy::cause::Cause {
        use crate::policy::cause::Cause;
        match self {
            RouteError::InvalidDomain { .. } | RouteError::NoSuchDomain { .. } => {
                Cause::NoSuchDomain
            }
            RouteError::NullMx { .. } => Cause::NullMx,
            RouteError::MxLoop { .. } => Cause::MailLoop,
            RouteError::NoMailHost { .. } | RouteError::NoAddress { .. } => Cause::NoMailHost,
            RouteError::Dns { .. } => Cause::DnsFailure,
        }
    }

    pub fn enhanced_code(&self) -> &'static str {
        match self {
            RouteError::InvalidDomain { .. } | RouteError::NoSuchDomain { .. } => "5.1.2",
            RouteError::NullMx { .. } => "5.1.10",
            RouteError::MxLoop { .. } => "5.4.6",
            RouteError::NoMailHost { .. } | RouteError::NoAddress { .. } => "5.4.4",
            RouteError::Dns { .. } => "4.4.312",
        }
    }

    /// The reply as written to logs and DSNs, e.g.
    /// `556 5.1.10 example.com does not accept mail (null MX, RFC 7505)`.
    pub fn reply(&self) -> String {
        format!("{} {} {self}", self.reply_code(), self.enhanced_code())
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::InvalidDomain { domain: _, error } => write!(f, "bad destination: {error}"),
            RouteError::NoSuchDomain { domain } => {
                write!(f, "domain {domain} does not exist (DNS: NXDOMAIN)")
            }
            RouteError::NullMx { domain } => {
                write!(f, "{domain} does not accept mail (null MX, RFC 7505)")
            }
            RouteError::MxLoop {
                domain,
                host,
                preference,
            } => write!(
                f,
                "mail for {domain} loops back to myself (MX host {host} with preference \
                 {preference} is this server and no MX host is more preferred)"
            ),
            RouteError::NoMailHost { domain } => write!(
                f,
                "no mail host for {domain}: it has no MX records and no A/AAAA records"
            ),
            RouteError::NoAddress { domain, errors } => {
                write!(f, "no MX host of {domain} has an address: ")?;
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
            RouteError::Dns { domain, error } => {
                write!(f, "DNS query failed for the next hop of {domain}: {error}")
            }
        }
    }
}

impl std::error::Error for RouteError {}

/// The hosts to try for `domain`, most preferred first (see the module docs for the rules).
///
/// `our_names` are this server's host names (any case, trailing dot optional); an MX host among
/// them triggers loop detection.
pub async fn resolve_route(
    resolver: &Resolver,
    domain: &str,
    our_names: &[String],
) -> Result<Vec<Hop>, RouteError> {
    let shown = domain.strip_suffix('.').unwrap_or(domain).to_owned();
    let canonical = canonical_name(domain).map_err(|error| RouteError::InvalidDomain {
        domain: shown.clone(),
        error,
    })?;
    let ours: Vec<String> = our_names
        .iter()
        .map(|n| canonical_name(n).unwrap_or_else(|_| n.to_ascii_lowercase()))
        .collect();

    let records = match resolver.mx(&canonical).await {
        Ok(MxAnswer::Records(records)) => records,
        Ok(MxAnswer::NoRecords) => return implicit_mx(resolver, shown, canonical, &ours).await,
        Ok(MxAnswer::NxDomain) => return Err(RouteError::NoSuchDomain { domain: shown }),
        Err(error) if error.is_temporary() => {
            return Err(RouteError::Dns {
                domain: shown,
                error,
            });
        }
        Err(error) => {
            return Err(RouteError::InvalidDomain {
                domain: shown,
                error,
            });
        }
    };

    let hosts = order_mx(&shown, records, &ours, &mut Rng::seeded())?;

    let mut lookups = JoinSet::new();
    for (index, (_, host)) in hosts.iter().enumerate() {
        let resolver = resolver.clone();
        let host = host.clone();
        lookups.spawn(async move { (index, resolver.addresses(&host).await) });
    }
    let mut results: Vec<Option<Result<Vec<IpAddr>, DnsError>>> = vec![None; hosts.len()];
    // A lookup task that panicked leaves its host out (`None`).
    while let Some(joined) = lookups.join_next().await {
        if let Ok((index, result)) = joined {
            results[index] = Some(result);
        }
    }

    let mut hops = Vec::new();
    let mut temporary = None;
    let mut permanent = Vec::new();
    for ((preference, host), result) in hosts.into_iter().zip(results) {
        match result {
            Some(Ok(addrs)) => hops.push(Hop {
                host,
                preference,
                addrs,
            }),
            Some(Err(e)) if e.is_temporary() => {
                temporary.get_or_insert(e);
            }
            Some(Err(e)) => permanent.push(e),
            None => {}
        }
    }
    if !hops.is_empty() {
        return Ok(hops);
    }
    match temporary {
        Some(error) => Err(RouteError::Dns {
            domain: shown,
            error,
        }),
        None => Err(RouteError::NoAddress {
            domain: shown,
            errors: permanent,
        }),
    }
}

/// RFC 5321 §5.1: no MX records, so the domain itself is the mail host (preference 0).
async fn implicit_mx(
    resolver: &Resolver,
    shown: String,
    canonical: String,
    ours: &[String],
) -> Result<Vec<Hop>, RouteError> {
    if ours.contains(&canonical) {
        return Err(RouteError::MxLoop {
            domain: shown,
            host: canonical,
            preference: 0,
        });
    }
    match resolver.addresses(&canonical).await {
        Ok(addrs) => Ok(vec![Hop {
            host: canonical,
            preference: 0,
            addrs,
        }]),
        Err(DnsError::NxDomain { .. }) => Err(RouteError::NoSuchDomain { domain: shown }),
        Err(DnsError::NoRecords { .. }) => Err(RouteError::NoMailHost { domain: shown }),
        Err(error) if error.is_temporary() => Err(RouteError::Dns {
            domain: shown,
            error,
        }),
        Err(error) => Err(RouteError::InvalidDomain {
            domain: shown,
            error,
        }),
    }
}

/// Null MX, loop detection and ordering of MX records (steps 2–4 of the module docs).
///
/// `records` hold canonical exchange names (`""` is the root); `ours` canonical names.
fn order_mx(
    domain: &str,
    records: Vec<(u16, String)>,
    ours: &[String],
    rng: &mut Rng,
) -> Result<Vec<(u16, String)>, RouteError> {
    // Each host once, at its best preference; the root name is not a host.
    let mut best: HashMap<String, u16> = HashMap::new();
    for (preference, host) in records {
        if host.is_empty() {
            continue;
        }
        best.entry(host)
            .and_modify(|p| *p = (*p).min(preference))
            .or_insert(preference);
    }
    if best.is_empty() {
        return Err(RouteError::NullMx {
            domain: domain.to_owned(),
        });
    }

    let mut hosts: Vec<(u16, String)> = best.into_iter().map(|(h, p)| (p, h)).collect();
    // Sort by name first so the shuffle below does not depend on HashMap order.
    hosts.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));

    if let Some((our_pref, our_host)) = hosts.iter().find(|(_, h)| ours.contains(h)).cloned() {
        hosts.retain(|(p, _)| *p < our_pref);
        if hosts.is_empty() {
            return Err(RouteError::MxLoop {
                domain: domain.to_owned(),
                host: our_host,
                preference: our_pref,
            });
        }
    }

    // Shuffle each run of equal preferences (Fisher–Yates).
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].0;
        let end = start
            + hosts[start..]
                .iter()
                .take_while(|(p, _)| *p == pref)
                .count();
        let run = &mut hosts[start..end];
        for i in (1..run.len()).rev() {
            run.swap(i, rng.below(i + 1));
        }
        start = end;
    }
    Ok(hosts)
}

/// A tiny SplitMix64 generator: enough to spread load over equal-preference MX hosts, not for
/// anything secret.
struct Rng(u64);

impl Rng {
    /// Seeded from the clock and a process-wide counter, so calls in the same nanosecond differ.
    fn seeded() -> Self {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let calls = CALLS.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng(nanos ^ calls.rotate_left(32));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`); the modulo bias is irrelevant for a handful of hosts.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(records: &[(u16, &str)]) -> Vec<(u16, String)> {
        records.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    fn ours() -> Vec<String> {
        vec!["mx.moat.test".to_owned()]
    }

    #[test]
    fn orders_by_preference_and_merges_duplicates() {
        let got = order_mx(
            "d.test",
            mx(&[
                (20, "b.test"),
                (10, "a.test"),
                (30, "a.test"),
                (5, "c.test"),
            ]),
            &ours(),
            &mut Rng(1),
        )
        .unwrap();
        assert_eq!(got, mx(&[(5, "c.test"), (10, "a.test"), (20, "b.test")]));
    }

    #[test]
    fn null_mx() {
        let e = order_mx("d.test", mx(&[(0, "")]), &ours(), &mut Rng(1)).unwrap_err();
        assert_eq!(
            e.reply(),
            "556 5.1.10 d.test does not accept mail (null MX, RFC 7505)"
        );
        assert!(e.is_permanent());
        // A root exchange among real ones is ignored.
        let got = order_mx(
            "d.test",
            mx(&[(0, ""), (10, "a.test")]),
            &ours(),
            &mut Rng(1),
        );
        assert_eq!(got.unwrap(), mx(&[(10, "a.test")]));
    }

    #[test]
    fn loop_keeps_only_strictly_better_hosts() {
        let got = order_mx(
            "d.test",
            mx(&[
                (10, "a.test"),
                (20, "mx.moat.test"),
                (20, "b.test"),
                (30, "c.test"),
            ]),
            &ours(),
            &mut Rng(1),
        );
        assert_eq!(got.unwrap(), mx(&[(10, "a.test")]));

        for records in [
            mx(&[(10, "mx.moat.test"), (20, "b.test")]),
            mx(&[(10, "mx.moat.test"), (10, "b.test")]),
        ] {
            let e = order_mx("d.test", records, &ours(), &mut Rng(1)).unwrap_err();
            assert_eq!(e.enhanced_code(), "5.4.6");
            assert!(
                e.reply()
                    .starts_with("554 5.4.6 mail for d.test loops back to myself")
            );
        }
    }

    #[test]
    fn shuffles_equal_preferences() {
        let records = mx(&[
            (10, "a.test"),
            (10, "b.test"),
            (10, "c.test"),
            (20, "z.test"),
        ]);
        let mut firsts = std::collections::HashSet::new();
        for seed in 0..64 {
            let got = order_mx("d.test", records.clone(), &ours(), &mut Rng(seed)).unwrap();
            assert_eq!(got.last().unwrap().1, "z.test");
            firsts.insert(got[0].1.clone());
        }
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn dns_failure_is_temporary_4_4_312() {
        let e = RouteError::Dns {
            domain: "d.test".to_owned(),
            error: DnsError::Timeout {
                query: crate::dns::DnsQuery {
                    kind: crate::dns::RecordKind::Mx,
                    name: "d.test".to_owned(),
                },
            },
        };
        assert!(!e.is_permanent());
        assert_eq!(
            e.reply(),
            "451 4.4.312 DNS query failed for the next hop of d.test: \
             DNS lookup of MX for d.test timed out (no nameserver answered)"
        );
    }
}
