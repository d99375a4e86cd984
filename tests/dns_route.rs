//! The DNS facade (`moat::dns`) and MX routing (`moat::outbound::route`) against a real,
//! in-process authoritative DNS server (hickory-server) on loopback, over UDP and TCP.
//!
//! Addresses: 127.0.53.1 serves the zone `route.test.`; 127.0.53.2 answers SERVFAIL to
//! everything; 127.0.53.3 swallows queries (timeouts); 127.0.53.4 has nothing listening. Ports
//! are ephemeral, so this file can run next to other tests and other engineers' servers.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, NS, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

use moat::dns::{DnsError, MxAnswer, RecordKind, Resolver};
use moat::outbound::route::{Hop, RouteError, resolve_route};

const ZONE_IP: &str = "127.0.53.1";
const SERVFAIL_IP: &str = "127.0.53.2";
const BLACKHOLE_IP: &str = "127.0.53.3";
const CLOSED_IP: &str = "127.0.53.4";

/// Short enough that the failure tests are quick, long enough for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_millis(700);

fn n(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_str(s).unwrap())
}

/// The zone `route.test.`; each case of the tests below has its own names.
fn zone() -> InMemoryZoneHandler<TokioRuntimeProvider> {
    let origin = n("route.test.");
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
        None,
    );
    let serial = 1;
    let soa = SOA::new(
        n("ns.route.test."),
        n("hostmaster.route.test."),
        serial,
        3600,
        600,
        86400,
        60,
    );
    let mut records = vec![
        Record::from_rdata(origin.clone(), 60, RData::SOA(soa)),
        Record::from_rdata(origin, 60, RData::NS(NS(n("ns.route.test.")))),
        Record::from_rdata(n("ns.route.test."), 60, RData::A(A::new(127, 0, 53, 1))),
    ];
    let mut mx = |domain: &str, preference: u16, exchange: &str| {
        records.push(Record::from_rdata(
            n(domain),
            60,
            RData::MX(MX::new(preference, n(exchange))),
        ));
    };
    // Preference ordering (published worst first).
    mx("ordered.route.test.", 20, "b.route.test.");
    mx("ordered.route.test.", 10, "a.route.test.");
    // Equal preferences.
    mx("equal.route.test.", 10, "a.route.test.");
    mx("equal.route.test.", 10, "b.route.test.");
    // A host with two A records and an AAAA record.
    mx("dual.route.test.", 10, "dual-host.route.test.");
    // Mixed case exchange.
    mx("case.route.test.", 10, "Mixed.ROUTE.Test.");
    // Null MX (RFC 7505).
    mx("nullmx.route.test.", 0, ".");
    // MX hosts without addresses: missing (NXDOMAIN) and txtonly (NODATA).
    mx("noaddr.route.test.", 10, "missing.route.test.");
    mx("noaddr.route.test.", 20, "txtonly.route.test.");
    mx("partial.route.test.", 10, "missing.route.test.");
    mx("partial.route.test.", 20, "b.route.test.");
    // Loops: we are mx.moat.route.test.
    mx("loop-first.route.test.", 10, "mx.moat.route.test.");
    mx("loop-first.route.test.", 20, "b.route.test.");
    mx("loop-equal.route.test.", 10, "mx.moat.route.test.");
    mx("loop-equal.route.test.", 10, "b.route.test.");
    mx("loop-second.route.test.", 20, "mx.moat.route.test.");
    mx("loop-second.route.test.", 10, "a.route.test.");
    mx("loop-second.route.test.", 30, "c.route.test.");
    // A host outside any zone we serve: the server answers REFUSED, a temporary failure.
    mx("tempaddr.route.test.", 10, "mx.elsewhere.test.");
    mx("tempaddr.route.test.", 20, "b.route.test.");
    mx("temponly.route.test.", 10, "mx.elsewhere.test.");

    let mut a = |name: &str, ip: [u8; 4]| {
        records.push(Record::from_rdata(
            n(name),
            60,
            RData::A(A::new(ip[0], ip[1], ip[2], ip[3])),
        ));
    };
    a("a.route.test.", [192, 0, 2, 1]);
    a("b.route.test.", [192, 0, 2, 2]);
    a("c.route.test.", [192, 0, 2, 3]);
    a("mixed.route.test.", [192, 0, 2, 4]);
    a("dual-host.route.test.", [192, 0, 2, 10]);
    a("dual-host.route.test.", [192, 0, 2, 11]);
    a("mx.moat.route.test.", [192, 0, 2, 99]);
    // Implicit MX: only an A record.
    a("implicit.route.test.", [192, 0, 2, 20]);
    // Too many addresses for a UDP answer: the resolver must retry over TCP.
    for i in 0..100u8 {
        a("big.route.test.", [198, 51, 100, i]);
    }
    records.push(Record::from_rdata(
        n("dual-host.route.test."),
        60,
        RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::10").unwrap())),
    ));
    records.push(Record::from_rdata(
        n("v6only.route.test."),
        60,
        RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::20").unwrap())),
    ));
    records.push(Record::from_rdata(
        n("txtonly.route.test."),
        60,
        RData::TXT(TXT::new(vec!["no mail here".to_owned()])),
    ));

    for record in records {
        assert!(zone.upsert_mut(record, serial), "record rejected");
    }
    zone
}

/// Binds a UDP socket and a TCP listener on the same ephemeral port of `ip`.
fn bind_pair(ip: &str) -> (std::net::UdpSocket, std::net::TcpListener) {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = std::net::TcpListener::bind((ip, port)) {
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            return (udp, tcp);
        }
    }
    panic!("no free UDP+TCP port pair on {ip}");
}

struct Servers {
    zone: SocketAddr,
    servfail: SocketAddr,
    blackhole: SocketAddr,
    closed: SocketAddr,
}

/// Starts the servers once, on a runtime of their own that outlives every test's runtime.
fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let (zone_udp, zone_tcp) = bind_pair(ZONE_IP);
        let (servfail_udp, servfail_tcp) = bind_pair(SERVFAIL_IP);
        let blackhole = std::net::UdpSocket::bind((BLACKHOLE_IP, 0)).unwrap();
        blackhole.set_nonblocking(true).unwrap();
        let closed = std::net::UdpSocket::bind((CLOSED_IP, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let servers = Servers {
            zone: zone_udp.local_addr().unwrap(),
            servfail: servfail_udp.local_addr().unwrap(),
            blackhole: blackhole.local_addr().unwrap(),
            closed,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut catalog = Catalog::new();
                catalog.upsert(LowerName::from(n("route.test.")), vec![Arc::new(zone())]);
                let mut server = Server::new(catalog);
                server.register_socket(tokio::net::UdpSocket::from_std(zone_udp).unwrap());
                server.register_listener(
                    tokio::net::TcpListener::from_std(zone_tcp).unwrap(),
                    Duration::from_secs(10),
                    64,
                );
                tokio::spawn(servfail_udp_server(
                    tokio::net::UdpSocket::from_std(servfail_udp).unwrap(),
                ));
                tokio::spawn(servfail_tcp_server(
                    tokio::net::TcpListener::from_std(servfail_tcp).unwrap(),
                ));
                // Swallow every query sent to the black hole.
                let blackhole = tokio::net::UdpSocket::from_std(blackhole).unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while blackhole.recv_from(&mut buf).await.is_ok() {}
                });
                ready_tx.send(()).unwrap();
                let _ = server.block_until_done().await;
            });
        });
        ready_rx.recv().unwrap();
        servers
    })
}

/// A SERVFAIL answer to the query in `request`, if it parses.
fn servfail(request: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(request).ok()?;
    let mut answer = Message::error_msg(
        query.metadata.id,
        query.metadata.op_code,
        ResponseCode::ServFail,
    );
    answer.metadata.recursion_desired = query.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.queries = query.queries;
    answer.to_vec().ok()
}

async fn servfail_udp_server(socket: tokio::net::UdpSocket) {
    let mut buf = [0u8; 4096];
    while let Ok((len, from)) = socket.recv_from(&mut buf).await {
        if let Some(answer) = servfail(&buf[..len]) {
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

async fn servfail_tcp_server(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            loop {
                let Ok(len) = stream.read_u16().await else {
                    return;
                };
                let mut request = vec![0u8; usize::from(len)];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let Some(answer) = servfail(&request) else {
                    return;
                };
                let Ok(len) = u16::try_from(answer.len()) else {
                    return;
                };
                let _ = stream.write_u16(len).await;
                let _ = stream.write_all(&answer).await;
            }
        });
    }
}

fn resolver() -> Resolver {
    Resolver::with_nameservers_timeout(&[servers().zone], Duration::from_secs(3), 1).unwrap()
}

fn resolver_at(addr: SocketAddr) -> Resolver {
    Resolver::with_nameservers_timeout(&[addr], TIMEOUT, 0).unwrap()
}

fn ours() -> Vec<String> {
    vec!["MX.Moat.Route.Test.".to_owned()]
}

async fn route(domain: &str) -> Result<Vec<Hop>, RouteError> {
    resolve_route(&resolver(), domain, &ours()).await
}

fn hosts(hops: &[Hop]) -> Vec<(u16, &str)> {
    hops.iter()
        .map(|h| (h.preference, h.host.as_str()))
        .collect()
}

// ---- the facade -------------------------------------------------------------------------------

#[tokio::test]
async fn mx_answers_distinguish_records_nodata_nxdomain() {
    let r = resolver();
    let MxAnswer::Records(mut records) = r.mx("ordered.route.test").await.unwrap() else {
        panic!("expected records");
    };
    records.sort();
    assert_eq!(
        records,
        vec![
            (10, "a.route.test".to_owned()),
            (20, "b.route.test".to_owned())
        ]
    );
    assert_eq!(
        r.mx("case.route.test.").await.unwrap(),
        MxAnswer::Records(vec![(10, "mixed.route.test".to_owned())])
    );
    assert_eq!(
        r.mx("nullmx.route.test").await.unwrap(),
        MxAnswer::Records(vec![(0, String::new())])
    );
    assert_eq!(
        r.mx("implicit.route.test").await.unwrap(),
        MxAnswer::NoRecords
    );
    assert_eq!(
        r.mx("nonexistent.route.test").await.unwrap(),
        MxAnswer::NxDomain
    );
}

#[tokio::test]
async fn addresses_a_then_aaaa_and_negative_answers() {
    let r = resolver();
    let mut addrs = r.addresses("dual-host.route.test").await.unwrap();
    assert_eq!(addrs.len(), 3, "{addrs:?}");
    assert_eq!(
        addrs[2],
        IpAddr::V6(Ipv6Addr::from_str("2001:db8::10").unwrap())
    );
    addrs[..2].sort();
    assert_eq!(addrs[..2], [v4("192.0.2.10"), v4("192.0.2.11")]);

    assert_eq!(
        r.addresses("v6only.route.test").await.unwrap(),
        [IpAddr::V6(Ipv6Addr::from_str("2001:db8::20").unwrap())]
    );

    let e = r.addresses("missing.route.test").await.unwrap_err();
    assert!(matches!(e, DnsError::NxDomain { .. }), "{e:?}");
    assert!(!e.is_temporary());
    assert_eq!(
        e.to_string(),
        "DNS lookup of A/AAAA for missing.route.test: missing.route.test does not exist (NXDOMAIN)"
    );

    let e = r.addresses("txtonly.route.test").await.unwrap_err();
    assert!(matches!(e, DnsError::NoRecords { .. }), "{e:?}");
    assert!(!e.is_temporary());
    assert_eq!(
        e.to_string(),
        "DNS lookup of A/AAAA for txtonly.route.test: txtonly.route.test has no A/AAAA records (NODATA)"
    );

    let e = r.addresses("bad..name").await.unwrap_err();
    assert!(matches!(e, DnsError::InvalidName { .. }), "{e:?}");
}

#[tokio::test]
async fn truncated_udp_answer_is_retried_over_tcp() {
    // The server truncates the UDP answer (as the resolver would ask: EDNS, 1232 bytes)...
    let mut query = Message::query();
    query.metadata.id = 4711;
    query.add_query(Query::query(n("big.route.test."), RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    query.set_edns(edns);
    let socket = tokio::net::UdpSocket::bind((ZONE_IP, 0)).await.unwrap();
    socket
        .send_to(&query.to_vec().unwrap(), servers().zone)
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = Message::from_vec(&buf[..len]).unwrap();
    assert!(answer.metadata.truncation, "UDP answer not truncated");

    // ...so getting all 100 addresses means the resolver asked again over TCP.
    let addrs = resolver().addresses("big.route.test").await.unwrap();
    let set: HashSet<IpAddr> = addrs.iter().copied().collect();
    assert_eq!(set.len(), 100);
    assert!(set.contains(&v4("198.51.100.99")));
}

#[tokio::test]
async fn servfail_is_temporary() {
    let r = resolver_at(servers().servfail);
    let e = r.mx("example.route.test").await.unwrap_err();
    assert!(e.is_temporary());
    assert!(
        matches!(&e, DnsError::ServerFailure { rcode, .. } if rcode == "SERVFAIL"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "DNS lookup of MX for example.route.test failed: the nameserver answered SERVFAIL"
    );
    let e = r.addresses("host.route.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
}

#[tokio::test]
async fn unanswered_query_times_out_quickly_and_is_temporary() {
    let r = resolver_at(servers().blackhole);
    let start = Instant::now();
    let e = r.mx("example.route.test").await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(e.is_temporary());
    assert_eq!(
        e,
        DnsError::Timeout {
            query: moat::dns::DnsQuery {
                kind: RecordKind::Mx,
                name: "example.route.test".to_owned()
            }
        }
    );
    assert_eq!(
        e.to_string(),
        "DNS lookup of MX for example.route.test timed out (no nameserver answered)"
    );
}

#[tokio::test]
async fn nothing_listening_is_temporary() {
    let r = resolver_at(servers().closed);
    let start = Instant::now();
    let e = r.mx("example.route.test").await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(e.is_temporary(), "{e:?}");
    let e = r.addresses("example.route.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
}

// ---- routing ----------------------------------------------------------------------------------

#[tokio::test]
async fn mx_preference_order() {
    let hops = route("ordered.route.test").await.unwrap();
    assert_eq!(hosts(&hops), [(10, "a.route.test"), (20, "b.route.test")]);
    assert_eq!(hops[0].addrs, [v4("192.0.2.1")]);
    assert_eq!(hops[1].addrs, [v4("192.0.2.2")]);
}

#[tokio::test]
async fn equal_preferences_are_shuffled() {
    let r = resolver();
    let mut orders = HashSet::new();
    for _ in 0..40 {
        let hops = resolve_route(&r, "equal.route.test", &ours())
            .await
            .unwrap();
        assert_eq!(hops.len(), 2);
        assert!(hops.iter().all(|h| h.preference == 10));
        orders.insert(hops.iter().map(|h| h.host.clone()).collect::<Vec<_>>());
    }
    assert_eq!(
        orders.len(),
        2,
        "only one order seen in 40 tries: {orders:?}"
    );
}

#[tokio::test]
async fn every_address_of_a_host() {
    let hops = route("dual.route.test").await.unwrap();
    assert_eq!(hosts(&hops), [(10, "dual-host.route.test")]);
    let addrs: HashSet<IpAddr> = hops[0].addrs.iter().copied().collect();
    let want: HashSet<IpAddr> = [
        v4("192.0.2.10"),
        v4("192.0.2.11"),
        IpAddr::V6(Ipv6Addr::from_str("2001:db8::10").unwrap()),
    ]
    .into();
    assert_eq!(addrs, want);
}

#[tokio::test]
async fn mixed_case_exchange_is_lowercased() {
    let hops = route("CASE.Route.Test.").await.unwrap();
    assert_eq!(hosts(&hops), [(10, "mixed.route.test")]);
}

#[tokio::test]
async fn implicit_mx_uses_the_domain_itself() {
    let hops = route("implicit.route.test").await.unwrap();
    assert_eq!(
        hops,
        [Hop {
            host: "implicit.route.test".to_owned(),
            preference: 0,
            addrs: vec![v4("192.0.2.20")],
        }]
    );
}

#[tokio::test]
async fn null_mx_is_556_5_1_10() {
    let e = route("nullmx.route.test").await.unwrap_err();
    assert!(matches!(e, RouteError::NullMx { .. }), "{e:?}");
    assert!(e.is_permanent());
    assert_eq!(e.enhanced_code(), "5.1.10");
    assert_eq!(
        e.reply(),
        "556 5.1.10 nullmx.route.test does not accept mail (null MX, RFC 7505)"
    );
}

#[tokio::test]
async fn nonexistent_domain_is_permanent() {
    let e = route("nonexistent.route.test").await.unwrap_err();
    assert!(matches!(e, RouteError::NoSuchDomain { .. }), "{e:?}");
    assert!(e.is_permanent());
    assert_eq!(
        e.reply(),
        "550 5.1.2 domain nonexistent.route.test does not exist (DNS: NXDOMAIN)"
    );
}

#[tokio::test]
async fn domain_without_mx_or_address_is_permanent() {
    let e = route("txtonly.route.test").await.unwrap_err();
    assert!(matches!(e, RouteError::NoMailHost { .. }), "{e:?}");
    assert!(e.is_permanent());
    assert_eq!(e.enhanced_code(), "5.4.4");
}

#[tokio::test]
async fn mx_host_without_address() {
    // The only hosts do not exist / have no address: permanent, each failure named.
    let e = route("noaddr.route.test").await.unwrap_err();
    assert!(e.is_permanent());
    let RouteError::NoAddress { errors, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(matches!(errors[0], DnsError::NxDomain { .. }), "{errors:?}");
    assert!(
        matches!(errors[1], DnsError::NoRecords { .. }),
        "{errors:?}"
    );
    let reply = e.reply();
    assert!(
        reply.starts_with("550 5.4.4 no MX host of noaddr.route.test has an address: "),
        "{reply}"
    );
    assert!(
        reply.contains("missing.route.test does not exist (NXDOMAIN)"),
        "{reply}"
    );
    assert!(
        reply.contains("txtonly.route.test has no A/AAAA records (NODATA)"),
        "{reply}"
    );

    // A more preferred host without address is skipped.
    let hops = route("partial.route.test").await.unwrap();
    assert_eq!(hosts(&hops), [(20, "b.route.test")]);
}

#[tokio::test]
async fn loop_detection() {
    // We are the best MX: nothing better to hand the mail to.
    for domain in ["loop-first.route.test", "loop-equal.route.test"] {
        let e = route(domain).await.unwrap_err();
        assert!(matches!(e, RouteError::MxLoop { .. }), "{domain}: {e:?}");
        assert!(e.is_permanent());
        assert_eq!(e.enhanced_code(), "5.4.6");
        assert!(
            e.reply()
                .starts_with(&format!("554 5.4.6 mail for {domain} loops back to myself")),
            "{}",
            e.reply()
        );
    }
    // A better MX than us exists: only it is used (not us, not the worse ones).
    let hops = route("loop-second.route.test").await.unwrap();
    assert_eq!(hosts(&hops), [(10, "a.route.test")]);
    // Implicit MX on our own name.
    let e = route("mx.moat.route.test").await.unwrap_err();
    assert!(matches!(e, RouteError::MxLoop { .. }), "{e:?}");
}

#[tokio::test]
async fn temporary_host_failure_is_reported_only_if_nothing_works() {
    let hops = route("tempaddr.route.test").await.unwrap();
    assert_eq!(hosts(&hops), [(20, "b.route.test")]);

    let e = route("temponly.route.test").await.unwrap_err();
    assert!(!e.is_permanent());
    assert_eq!(e.enhanced_code(), "4.4.312");
    let RouteError::Dns { error, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(
        matches!(error, DnsError::ServerFailure { rcode, .. } if rcode == "REFUSED"),
        "{error:?}"
    );
    assert!(
        e.reply().starts_with(
            "451 4.4.312 DNS query failed for the next hop of temponly.route.test: \
             DNS lookup of"
        ),
        "{}",
        e.reply()
    );
}

#[tokio::test]
async fn dns_failure_for_the_domain_is_451_4_4_312() {
    for addr in [servers().servfail, servers().blackhole, servers().closed] {
        let e = resolve_route(&resolver_at(addr), "example.route.test", &ours())
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{addr}: {e:?}");
        assert!(matches!(e, RouteError::Dns { .. }), "{addr}: {e:?}");
        assert!(e.reply().starts_with("451 4.4.312 "), "{}", e.reply());
    }
}

#[tokio::test]
async fn invalid_domain_is_permanent() {
    let e = route("bad..domain").await.unwrap_err();
    assert!(matches!(e, RouteError::InvalidDomain { .. }), "{e:?}");
    assert!(e.is_permanent());
}
