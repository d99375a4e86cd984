//! An authoritative DNS server (hickory-server, in-process, on its own runtime thread) serving
//! one zone on a loopback address, for tests that send mail through MX lookups.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::rdata::{A, MX, NS, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// A record to serve.
pub enum Rr<'a> {
    Mx(&'a str, u16, &'a str),
    A(&'a str, [u8; 4]),
    /// A TXT record (TTL 1 s, so changes are seen at once), its text as one string.
    Txt(&'a str, &'a str),
}

fn n(s: &str) -> Name {
    let s = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_str(&s).unwrap()
}

fn catalog(origin: &str, records: &[Rr]) -> Catalog {
    let origin_name = n(origin);
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin_name.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
        None,
    );
    let soa = SOA::new(
        n(&format!("ns.{origin}")),
        n(&format!("hostmaster.{origin}")),
        1,
        3600,
        600,
        86400,
        1,
    );
    let mut rrs = vec![
        Record::from_rdata(origin_name.clone(), 60, RData::SOA(soa)),
        Record::from_rdata(
            origin_name.clone(),
            60,
            RData::NS(NS(n(&format!("ns.{origin}")))),
        ),
    ];
    for r in records {
        rrs.push(match r {
            Rr::Mx(name, pref, host) => {
                Record::from_rdata(n(name), 60, RData::MX(MX::new(*pref, n(host))))
            }
            Rr::A(name, ip) => {
                Record::from_rdata(n(name), 60, RData::A(A::new(ip[0], ip[1], ip[2], ip[3])))
            }
            Rr::Txt(name, text) => {
                Record::from_rdata(n(name), 1, RData::TXT(TXT::new(vec![text.to_string()])))
            }
        });
    }
    for rr in rrs {
        let serial = 1;
        zone.upsert_mut(rr, serial);
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin_name), vec![Arc::new(zone)]);
    catalog
}

/// Serves `origin` with `records` on `ip` (UDP and TCP, same ephemeral port); returns the address.
pub fn serve_zone(ip: &str, origin: &str, records: &[Rr]) -> SocketAddr {
    serve_dynamic(ip, origin, records).addr
}

/// A zone whose TXT answers can be changed or made to fail while it runs.
pub struct DynDns {
    pub addr: SocketAddr,
    origin: String,
    txt: Arc<std::sync::RwLock<Arc<Catalog>>>,
}

impl DynDns {
    /// TXT queries are answered from `records` from now on (other types are unchanged).
    pub fn set_txt(&self, records: &[Rr]) {
        *self.txt.write().unwrap() = Arc::new(catalog(&self.origin, records));
    }

    /// TXT queries are refused from now on (a DNS failure for TXT only).
    pub fn fail_txt(&self) {
        *self.txt.write().unwrap() = Arc::new(Catalog::new());
    }
}

struct Split {
    main: Arc<Catalog>,
    txt: Arc<std::sync::RwLock<Arc<Catalog>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Split {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let is_txt = request
            .request_info()
            .map(|i| i.query.query_type() == RecordType::TXT)
            .unwrap_or(false);
        let catalog = if is_txt {
            self.txt.read().unwrap().clone()
        } else {
            self.main.clone()
        };
        catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// Like [`serve_zone`], with TXT answers that [`DynDns`] can change.
pub fn serve_dynamic(ip: &str, origin: &str, records: &[Rr]) -> DynDns {
    let handler = Split {
        main: Arc::new(catalog(origin, records)),
        txt: Arc::new(std::sync::RwLock::new(Arc::new(catalog(origin, records)))),
    };
    let txt = handler.txt.clone();
    // An ephemeral port that is free for both UDP and TCP: no other process answers on it.
    let (udp, tcp) = (0..50)
        .find_map(|_| {
            let udp = std::net::UdpSocket::bind((ip, 0))
                .unwrap_or_else(|e| panic!("DNS server: cannot bind UDP on {ip}: {e}"));
            let port = udp.local_addr().unwrap().port();
            let tcp = std::net::TcpListener::bind((ip, port)).ok()?;
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            Some((udp, tcp))
        })
        .unwrap_or_else(|| panic!("DNS server: no port on {ip} free for both UDP and TCP"));
    let addr = udp.local_addr().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut server = Server::new(handler);
            server.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
            server.register_listener(
                tokio::net::TcpListener::from_std(tcp).unwrap(),
                Duration::from_secs(10),
                64,
            );
            ready_tx.send(()).unwrap();
            let _ = server.block_until_done().await;
        });
    });
    ready_rx.recv().unwrap();
    DynDns {
        addr,
        origin: origin.to_string(),
        txt,
    }
}
