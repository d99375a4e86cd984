//! DNSSEC by a trusted validating resolver (`[dane] resolver_validates = true`): each query
//! asks for validation (AD and DO set, RFC 6840 §5.7) and the answer's AD bit is taken as the
//! resolver's verdict. Only sensible when the resolver is on this host (loopback), since
//! nothing protects the bit on the way; Moat says so when it is not.
//!
//! hickory's stub resolver neither sets AD in queries nor shows the bit of a non-validated
//! answer, so this is one query and its answer over UDP (TCP when truncated), with hickory's
//! message encoding.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::opt::EdnsOption;
use hickory_resolver::proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The largest UDP answer we ask for (the DNS flag day 2020 size).
const UDP_PAYLOAD: u16 = 1232;

/// Where a trusted resolver is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Trusted {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    /// Attempts after the first, over all servers.
    pub retries: usize,
}

/// What the resolver said about one question.
#[derive(Debug)]
pub enum Verdict {
    /// NOERROR or NXDOMAIN: the answer (answer and authority sections) and whether the
    /// resolver vouched for it (AD).
    Answer { message: Message, authentic: bool },
    /// SERVFAIL: the resolver could not validate the answer or got none; `dnssec` when its
    /// Extended DNS Error (RFC 8914) names a DNSSEC failure (codes 1-12).
    ServFail { dnssec: Option<u16> },
    /// No usable answer: every server timed out, refused or answered something else.
    Failed(String),
}

impl Trusted {
    /// Asks the servers in turn, `retries` more times after the first round fails.
    pub async fn query(&self, name: &Name, rtype: RecordType) -> Verdict {
        let mut last = String::from("no nameservers configured");
        for _ in 0..=self.retries {
            for server in &self.servers {
                match self.exchange(*server, name, rtype).await {
                    Ok(message) => match message.metadata.response_code {
                        ResponseCode::NoError | ResponseCode::NXDomain => {
                            return Verdict::Answer {
                                authentic: message.metadata.authentic_data,
                                message,
                            };
                        }
                        ResponseCode::ServFail => {
                            return Verdict::ServFail {
                                dnssec: dnssec_ede(&message),
                            };
                        }
                        other => last = format!("{server} answered {other}"),
                    },
                    Err(e) => last = format!("{server}: {e}"),
                }
            }
        }
        Verdict::Failed(last)
    }

    async fn exchange(
        &self,
        server: SocketAddr,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Message, String> {
        let (id, request) = request(name, rtype)?;
        let answer = tokio::time::timeout(self.timeout, udp(server, &request, id, name, rtype))
            .await
            .map_err(|_| format!("no answer within {} s", self.timeout.as_secs_f32()))??;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        tokio::time::timeout(self.timeout, tcp(server, &request, id, name, rtype))
            .await
            .map_err(|_| format!("no answer over TCP within {} s", self.timeout.as_secs_f32()))?
    }
}

/// A recursive query for `name`/`rtype` asking for validation: RD, AD and the DO bit.
fn request(name: &Name, rtype: RecordType) -> Result<(u16, Vec<u8>), String> {
    let mut id = [0u8; 2];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| "no random query id".to_string())?;
    let id = u16::from_be_bytes(id);
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.metadata.authentic_data = true;
    m.queries.push(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD).set_dnssec_ok(true);
    m.edns = Some(edns);
    let bytes = m
        .to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))?;
    Ok((id, bytes))
}

/// Whether `m` answers our question (same id, a response, the same name and type).
fn answers(m: &Message, id: u16, name: &Name, rtype: RecordType) -> bool {
    m.metadata.id == id
        && m.metadata.message_type == MessageType::Response
        && m.queries.len() == 1
        && m.queries[0].query_type() == rtype
        && m.queries[0].name().to_lowercase() == name.to_lowercase()
}

async fn udp(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    name: &Name,
    rtype: RecordType,
) -> Result<Message, String> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(request).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        // Anything that is not the answer to this query (a late answer to another, garbage)
        // is ignored; the caller's deadline ends the wait.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && answers(&m, id, name, rtype)
        {
            return Ok(m);
        }
    }
}

async fn tcp(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    name: &Name,
    rtype: RecordType,
) -> Result<Message, String> {
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(request.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(request);
    s.write_all(&framed).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let m = Message::from_vec(&buf).map_err(|e| format!("malformed answer: {e}"))?;
    if answers(&m, id, name, rtype) {
        Ok(m)
    } else {
        Err("the answer over TCP is for another query".into())
    }
}

/// The Extended DNS Error info code of `m` when it is a DNSSEC one (RFC 8914 §4: 1-12).
fn dnssec_ede(m: &Message) -> Option<u16> {
    let edns = m.edns.as_ref()?;
    edns.options().as_ref().iter().find_map(|(_, o)| match o {
        EdnsOption::Unknown(15, data) if data.len() >= 2 => {
            let code = u16::from_be_bytes([data[0], data[1]]);
            (1..=12).contains(&code).then_some(code)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::opt::EdnsCode;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn the_query_asks_for_validation() {
        let (id, bytes) = request(&name("mx.example."), RecordType::TLSA).unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, id);
        assert!(m.metadata.recursion_desired);
        assert!(m.metadata.authentic_data, "AD must be set (RFC 6840 §5.7)");
        assert!(!m.metadata.checking_disabled);
        let edns = m.edns.as_ref().unwrap();
        assert!(edns.flags().dnssec_ok, "DO must be set");
        assert_eq!(m.queries[0].query_type(), RecordType::TLSA);
    }

    #[test]
    fn only_the_answer_to_this_query_is_taken() {
        let (id, bytes) = request(&name("mx.example."), RecordType::A).unwrap();
        let mut m = Message::from_vec(&bytes).unwrap();
        // The query itself is not an answer.
        assert!(!answers(&m, id, &name("mx.example."), RecordType::A));
        m.metadata.message_type = MessageType::Response;
        assert!(answers(&m, id, &name("MX.Example."), RecordType::A));
        assert!(!answers(
            &m,
            id.wrapping_add(1),
            &name("mx.example."),
            RecordType::A
        ));
        assert!(!answers(&m, id, &name("other.example."), RecordType::A));
        assert!(!answers(&m, id, &name("mx.example."), RecordType::AAAA));
    }

    #[test]
    fn extended_dns_errors_of_dnssec_are_recognised() {
        let mut m = Message::query();
        assert_eq!(dnssec_ede(&m), None);
        let mut edns = Edns::new();
        // 6: DNSSEC Bogus; a second option before it must not hide it.
        edns.options_mut()
            .as_mut()
            .push((EdnsCode::Unknown(10), EdnsOption::Unknown(10, vec![1, 2])));
        edns.options_mut()
            .as_mut()
            .push((EdnsCode::Unknown(15), EdnsOption::Unknown(15, vec![0, 6])));
        m.edns = Some(edns.clone());
        assert_eq!(dnssec_ede(&m), Some(6));
        // 22: No Reachable Authority is not a DNSSEC error.
        let mut other = Edns::new();
        other
            .options_mut()
            .as_mut()
            .push((EdnsCode::Unknown(15), EdnsOption::Unknown(15, vec![0, 22])));
        m.edns = Some(other);
        assert_eq!(dnssec_ede(&m), None);
        // Truncated option data is ignored.
        let mut short = Edns::new();
        short
            .options_mut()
            .as_mut()
            .push((EdnsCode::Unknown(15), EdnsOption::Unknown(15, vec![6])));
        m.edns = Some(short);
        assert_eq!(dnssec_ede(&m), None);
    }
}
