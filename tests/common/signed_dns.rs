//! DNSSEC-signed zones served in-process (hickory-server, keys generated at start, NSEC
//! proofs), for the DANE tests: an anchor zone whose key the sender trusts
//! (`[dane] trust_anchor_file`), with child zones that are signed with a matching DS
//! (secure), unsigned without DS (insecure), signed with a DS of another key (bogus), or
//! delegated securely to a server that answers SERVFAIL or nothing at all.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::dnssec::NxProofKind;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::dnssec::crypto::EcdsaSigningKey;
use hickory_server::proto::dnssec::rdata::{DNSKEY, DNSSECRData, DS};
use hickory_server::proto::dnssec::{Algorithm, DigestType, DnssecSigner, SigningKey};
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_server::proto::rr::rdata::{A, CNAME, MX, NS, SOA, TLSA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};

/// A record to serve (names relative to nothing: give them in full).
#[derive(Clone)]
pub enum Srr {
    Mx(String, u16, String),
    A(String, [u8; 4]),
    /// TLSA usage, selector, matching type, data.
    Tlsa(String, u8, u8, u8, Vec<u8>),
    Cname(String, String),
    Txt(String, String),
}

/// How a child zone is delegated from the anchor zone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Signed, DS in the parent.
    Secure,
    /// Unsigned, no DS.
    Insecure,
    /// Signed, but the parent's DS is of another key.
    Bogus,
    /// DS in the parent (so the path is signed), but every query in the zone gets SERVFAIL.
    Servfail,
    /// DS in the parent, but queries in the zone are never answered (a timeout).
    Silent,
    /// Signed, DS in the parent, but every signature expires the second it is made (valid
    /// "until now": expired from the next second on, see [`SignedDns::signed_at`]).
    Expired,
}

pub struct SignedDns {
    pub addr: SocketAddr,
    /// The anchor zone's DNSKEY, as `[dane] trust_anchor_file` reads it.
    pub anchor_file: PathBuf,
    /// When the zones were signed (Unix seconds): an `Expired` zone's signatures are bogus
    /// once the clock is past this second.
    pub signed_at: u64,
}

fn n(s: &str) -> Name {
    let s = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(&s).unwrap()
}

fn rec(name: &str, rdata: RData) -> Record {
    Record::from_rdata(n(name), 60, rdata)
}

struct Key {
    signer: DnssecSigner,
    dnskey: DNSKEY,
}

fn new_key(zone: &str) -> Key {
    key_valid_for(zone, Duration::from_secs(7 * 86400))
}

fn key_valid_for(zone: &str, valid: Duration) -> Key {
    let pkcs8 = EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256).unwrap();
    let key = EcdsaSigningKey::from_pkcs8(&pkcs8, Algorithm::ECDSAP256SHA256).unwrap();
    let dnskey = DNSKEY::from_key(&key.to_public_key().unwrap());
    let signer = DnssecSigner::new(dnskey.clone(), Box::new(key), n(zone), valid);
    Key { signer, dnskey }
}

fn ds_for(zone: &str, dnskey: &DNSKEY) -> Record {
    let ds = DS::from_key(dnskey.public_key(), &n(zone), DigestType::SHA256).unwrap();
    rec(zone, RData::DNSSEC(DNSSECRData::DS(ds)))
}

fn to_record(r: &Srr) -> Record {
    match r {
        Srr::Mx(name, pref, host) => rec(name, RData::MX(MX::new(*pref, n(host)))),
        Srr::A(name, ip) => rec(name, RData::A(A::new(ip[0], ip[1], ip[2], ip[3]))),
        Srr::Tlsa(name, u, s, m, data) => rec(
            name,
            RData::TLSA(TLSA::new(
                CertUsage::from(*u),
                Selector::from(*s),
                Matching::from(*m),
                data.clone(),
            )),
        ),
        Srr::Cname(name, target) => rec(name, RData::CNAME(CNAME(n(target)))),
        Srr::Txt(name, text) => rec(name, RData::TXT(TXT::new(vec![text.clone()]))),
    }
}

fn zone(
    origin: &str,
    records: Vec<Record>,
    key: Option<Key>,
) -> InMemoryZoneHandler<TokioRuntimeProvider> {
    // NSEC only: with NSEC3, hickory-server 0.26 adds NSEC3 records to positive answers and
    // hickory's validator then fails the zone's DNSKEY ("verification cycle"), so NSEC3
    // zones are left to a real signer (Knot) in the interop suite.
    let proof = NxProofKind::Nsec;
    let mut z = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        n(origin),
        ZoneType::Primary,
        AxfrPolicy::Deny,
        key.as_ref().map(|_| proof),
    );
    let ns = format!("ns.{origin}");
    let soa = SOA::new(
        n(&ns),
        n(&format!("hostmaster.{origin}")),
        1,
        3600,
        600,
        86400,
        60,
    );
    z.upsert_mut(rec(origin, RData::SOA(soa)), 1);
    z.upsert_mut(rec(origin, RData::NS(NS(n(&ns)))), 1);
    for r in records {
        z.upsert_mut(r, 1);
    }
    if let Some(key) = key {
        z.add_zone_signing_key_mut(key.signer).unwrap();
        z.secure_zone_mut().unwrap();
    }
    z
}

/// `Catalog::find` picks the longest matching zone, so a child would answer the DS query for
/// itself; DS queries go to a catalog holding only the anchor zone.
/// Queries in a `Servfail` or `Silent` zone (other than its DS, which the parent answers)
/// get SERVFAIL or nothing.
struct DsRouting {
    all: Catalog,
    parent: Catalog,
    servfail: Vec<LowerName>,
    silent: Vec<LowerName>,
}

#[async_trait::async_trait]
impl RequestHandler for DsRouting {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let (is_ds, qname) = match request.request_info() {
            Ok(i) => (
                i.query.query_type() == RecordType::DS,
                Some(i.query.name().clone()),
            ),
            Err(_) => (false, None),
        };
        if let Some(q) = qname.filter(|_| !is_ds) {
            let header = |code| {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = code;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            };
            if self.silent.iter().any(|z| z.zone_of(&q)) {
                return header(ResponseCode::ServFail);
            }
            if self.servfail.iter().any(|z| z.zone_of(&q)) {
                let mut handle = response_handle;
                let msg = MessageResponseBuilder::from_message_request(request)
                    .error_msg(&request.metadata, ResponseCode::ServFail);
                return match handle.send_response(msg).await {
                    Ok(info) => info,
                    Err(_) => header(ResponseCode::ServFail),
                };
            }
        }
        let c = if is_ds { &self.parent } else { &self.all };
        c.handle_request::<R, T>(request, response_handle).await
    }
}

/// Serves the signed anchor zone `apex` (with `apex_records`) and its `children` on `ip`,
/// and writes the anchor's DNSKEY to `dir/anchor.key`.
pub fn serve_signed(
    ip: &str,
    dir: &Path,
    apex: &str,
    apex_records: &[Srr],
    children: &[(&str, Kind, Vec<Srr>)],
) -> SignedDns {
    let apex_key = new_key(apex);
    let anchor = rec(
        apex,
        RData::DNSSEC(DNSSECRData::DNSKEY(apex_key.dnskey.clone())),
    );
    let anchor_file = dir.join("anchor.key");
    std::fs::write(&anchor_file, format!("{anchor}\n")).unwrap();

    let mut parent_records: Vec<Record> = apex_records.iter().map(to_record).collect();
    parent_records.push(rec(&format!("ns.{apex}"), RData::A(A::new(127, 0, 0, 1))));
    let mut child_zones = Vec::new();
    let (mut servfail, mut silent) = (Vec::new(), Vec::new());
    for (origin, kind, records) in children {
        parent_records.push(rec(origin, RData::NS(NS(n(&format!("ns.{apex}"))))));
        let key = match kind {
            Kind::Insecure => None,
            Kind::Secure => {
                let k = new_key(origin);
                parent_records.push(ds_for(origin, &k.dnskey));
                Some(k)
            }
            Kind::Expired => {
                let k = key_valid_for(origin, Duration::ZERO);
                parent_records.push(ds_for(origin, &k.dnskey));
                Some(k)
            }
            Kind::Bogus => {
                let other = new_key(origin);
                parent_records.push(ds_for(origin, &other.dnskey));
                Some(new_key(origin))
            }
            Kind::Servfail | Kind::Silent => {
                let k = new_key(origin);
                parent_records.push(ds_for(origin, &k.dnskey));
                let list = if *kind == Kind::Servfail {
                    &mut servfail
                } else {
                    &mut silent
                };
                list.push(LowerName::from(n(origin)));
                Some(k)
            }
        };
        child_zones.push((
            origin.to_string(),
            zone(origin, records.iter().map(to_record).collect(), key),
        ));
    }
    let signed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let parent: Arc<dyn ZoneHandler> = Arc::new(zone(apex, parent_records, Some(apex_key)));
    let mut all = Catalog::new();
    all.upsert(LowerName::from(n(apex)), vec![parent.clone()]);
    for (origin, z) in child_zones {
        all.upsert(LowerName::from(n(&origin)), vec![Arc::new(z)]);
    }
    let mut only_parent = Catalog::new();
    only_parent.upsert(LowerName::from(n(apex)), vec![parent]);
    let handler = DsRouting {
        all,
        parent: only_parent,
        servfail,
        silent,
    };

    let ip: std::net::IpAddr = ip.parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let udp = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
            let addr = udp.local_addr().unwrap();
            let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
            let mut server = Server::new(handler);
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(5), 64);
            tx.send(addr).unwrap();
            let _ = server.block_until_done().await;
        });
    });
    let addr = rx.recv().unwrap();
    SignedDns {
        addr,
        anchor_file,
        signed_at,
    }
}
