//! The outbound TLS connector (`moat::outbound::tls`) against real rustls servers on loopback
//! (127.0.54.1, ephemeral ports), with certificates made by a test CA (rcgen): valid, expired,
//! not yet valid, from an unknown CA, for the wrong name, wildcard; every level, name
//! overrides, pins, a private CA per requirement, a peer that does not speak TLS, a timeout.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use moat::outbound::tls::{
    CertFailure, Connector, Pin, TlsFailure, TlsLevel, TlsOutcome, TlsRequirement, Verification,
};

const IP: &str = "127.0.54.1";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    /// What a server with a leaf from this CA sends after the leaf (intermediates).
    sends: Vec<CertificateDer<'static>>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        Ca::make(name, None)
    }

    fn intermediate(&self, name: &str) -> Ca {
        Ca::make(name, Some(self))
    }

    fn make(name: &str, parent: Option<&Ca>) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let (cert, sends) = match parent {
            None => (p.self_signed(&key).unwrap(), Vec::new()),
            Some(parent) => {
                let cert = p.signed_by(&key, &parent.issuer).unwrap();
                let mut sends = vec![cert.der().clone()];
                sends.extend(parent.sends.iter().cloned());
                (cert, sends)
            }
        };
        Ca {
            issuer: Issuer::new(p, key),
            der: cert.der().clone(),
            sends,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.der.clone()).unwrap();
        r
    }

    /// A leaf for `names` (the first is also the CN); `validity` as (year, year) bounds.
    fn leaf(&self, names: &[&str], validity: Option<(i32, i32)>) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        if let Some((from, to)) = validity {
            p.not_before = date_time_ymd(from, 1, 1);
            p.not_after = date_time_ymd(to, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            key: key.serialize_der(),
            intermediates: self.sends.clone(),
        }
    }
}

struct Leaf {
    der: CertificateDer<'static>,
    key: Vec<u8>,
    intermediates: Vec<CertificateDer<'static>>,
}

fn server_config(leaf: &Leaf, tls12_only: bool) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            [vec![leaf.der.clone()], leaf.intermediates.clone()].concat(),
            PrivateKeyDer::Pkcs8(leaf.key.clone().into()),
        )
        .unwrap();
    Arc::new(config)
}

/// Serves one TLS handshake with `leaf`; returns the connected client-side socket.
async fn tls_server(leaf: &Leaf, tls12_only: bool) -> TcpStream {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(leaf, tls12_only));
    let listener = TcpListener::bind((IP, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            // The outcome does not matter here; keep the session open briefly if it worked.
            if let Ok(mut tls) = acceptor.accept(s).await {
                let _ = tls.write_all(b"250 ok\r\n").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    TcpStream::connect(addr).await.unwrap()
}

/// A peer that answers with `reply` and then sits there.
async fn raw_server(reply: &'static [u8]) -> TcpStream {
    let listener = TcpListener::bind((IP, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(reply).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    TcpStream::connect(addr).await.unwrap()
}

fn req(level: TlsLevel) -> TlsRequirement {
    TlsRequirement::level(level)
}

async fn run(
    connector: &Connector,
    leaf: &Leaf,
    host: &str,
    req: &TlsRequirement,
) -> Result<TlsOutcome, TlsFailure> {
    let tcp = tls_server(leaf, false).await;
    connector.handshake(tcp, host, req).await.map(|(_, o)| o)
}

struct World {
    ca: Ca,
    other_ca: Ca,
    connector: Connector,
}

fn world() -> World {
    let ca = Ca::new("Moat Test CA");
    let other_ca = Ca::new("Unknown Test CA");
    let connector = Connector::new(false, Some(ca.roots()));
    World {
        ca,
        other_ca,
        connector,
    }
}

const JAN_1_2001: u64 = 978_307_200;
const JAN_1_2090: u64 = 3_786_912_000;

#[tokio::test]
async fn valid_certificate_is_verified_at_every_level() {
    let w = world();
    let leaf = w.ca.leaf(&["mx.good.test"], None);
    for level in [TlsLevel::May, TlsLevel::Encrypt, TlsLevel::Verify] {
        let o = run(&w.connector, &leaf, "mx.good.test", &req(level))
            .await
            .unwrap_or_else(|e| panic!("{level}: {e}"));
        assert_eq!(o.verification, Verification::Verified, "{level}");
        assert_eq!(o.version, "TLSv1.3");
        assert!(o.cipher.starts_with("TLS_"), "{}", o.cipher);
        assert!(o.bits == 128 || o.bits == 256);
        assert!(o.key_exchange.is_some());
        assert_eq!(o.peer_names, vec!["mx.good.test".to_string()]);
        assert!(o.not_after.unwrap() > 4_000_000_000);
        assert_eq!(o.pinned, None);
    }
    // The host name is compared case-insensitively and without a trailing dot.
    let o = run(&w.connector, &leaf, "MX.Good.Test.", &req(TlsLevel::Verify))
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);
}

#[tokio::test]
async fn chain_through_an_intermediate() {
    let w = world();
    let inter = w.ca.intermediate("Moat Test Intermediate");
    let leaf = inter.leaf(&["mx.good.test"], None);
    let o = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);
    // Pins are on the end-entity certificate, not on the intermediate.
    let inter_pin = Pin::cert_of(&inter.der);
    let pinned = TlsRequirement {
        pins: vec![inter_pin],
        ..req(TlsLevel::Verify)
    };
    let e = run(&w.connector, &leaf, "mx.good.test", &pinned)
        .await
        .unwrap_err();
    assert_eq!(e, TlsFailure::Certificate(CertFailure::PinMismatch));
    // Without the intermediate, the chain cannot be built.
    let orphan = Leaf {
        intermediates: Vec::new(),
        ..inter.leaf(&["mx.good.test"], None)
    };
    let e = run(
        &w.connector,
        &orphan,
        "mx.good.test",
        &req(TlsLevel::Verify),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &e,
            TlsFailure::Certificate(CertFailure::UntrustedIssuer(Some(_)))
        ),
        "{e:?}"
    );
    // The leaf was sent without its intermediate: the words say so.
    assert!(
        e.to_string()
            .contains("the server sends no intermediate certificates"),
        "{e}"
    );
}

#[tokio::test]
async fn tls12_only_server() {
    let w = world();
    let leaf = w.ca.leaf(&["mx.good.test"], None);
    let tcp = tls_server(&leaf, true).await;
    let (_, o) = w
        .connector
        .handshake(tcp, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap();
    assert_eq!(o.version, "TLSv1.2");
    assert!(
        o.cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{}",
        o.cipher
    );
    assert_eq!(o.verification, Verification::Verified);
}

#[tokio::test]
async fn expired_certificate() {
    let w = world();
    let leaf = w.ca.leaf(&["mx.good.test"], Some((2000, 2001)));
    for level in [TlsLevel::May, TlsLevel::Encrypt] {
        let o = run(&w.connector, &leaf, "mx.good.test", &req(level))
            .await
            .unwrap();
        assert_eq!(
            o.verification,
            Verification::Untrusted(CertFailure::Expired {
                not_after: JAN_1_2001
            })
        );
        assert_eq!(o.verification.word(), "Untrusted");
        assert_eq!(o.not_after, Some(JAN_1_2001));
    }
    let e = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TlsFailure::Certificate(CertFailure::Expired {
            not_after: JAN_1_2001
        })
    );
    assert_eq!(
        e.to_string(),
        "the certificate expired on Mon, 1 Jan 2001 00:00:00 +0000"
    );
    assert_eq!(e.enhanced_code(false), "4.7.320");
    assert_eq!(e.enhanced_code(true), "5.7.320");
    assert!(e.is_certificate());
}

#[tokio::test]
async fn not_yet_valid_certificate() {
    let w = world();
    let leaf = w.ca.leaf(&["mx.good.test"], Some((2090, 2091)));
    let o = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::May))
        .await
        .unwrap();
    assert_eq!(
        o.verification,
        Verification::Untrusted(CertFailure::NotYetValid {
            not_before: JAN_1_2090
        })
    );
    let e = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TlsFailure::Certificate(CertFailure::NotYetValid {
            not_before: JAN_1_2090
        })
    );
    assert!(
        e.to_string().contains("not valid until Sun, 1 Jan 2090"),
        "{e}"
    );
}

#[tokio::test]
async fn unknown_issuer_and_private_ca_per_requirement() {
    let w = world();
    let leaf = w.other_ca.leaf(&["mx.good.test"], None);
    for level in [TlsLevel::May, TlsLevel::Encrypt] {
        let o = run(&w.connector, &leaf, "mx.good.test", &req(level))
            .await
            .unwrap();
        assert!(matches!(
            o.verification,
            Verification::Untrusted(CertFailure::UntrustedIssuer(Some(_)))
        ));
    }
    let e = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            TlsFailure::Certificate(CertFailure::UntrustedIssuer(Some(_)))
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with(
            "the certificate chain does not lead to a trusted root (untrusted issuer): "
        ),
        "{e}"
    );

    // The same certificate verifies when the requirement trusts its CA.
    let private = TlsRequirement {
        extra_roots: Some(Arc::new(w.other_ca.roots())),
        ..req(TlsLevel::Verify)
    };
    let o = run(&w.connector, &leaf, "mx.good.test", &private)
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);
    // ... and the connector's own roots still count next to the extra ones.
    let ours = w.ca.leaf(&["mx.good.test"], None);
    let o = run(&w.connector, &ours, "mx.good.test", &private)
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);

    // An expired certificate from the private CA says "expired", not "untrusted issuer".
    let old = w.other_ca.leaf(&["mx.good.test"], Some((2000, 2001)));
    let e = run(&w.connector, &old, "mx.good.test", &private)
        .await
        .unwrap_err();
    assert!(
        matches!(e, TlsFailure::Certificate(CertFailure::Expired { .. })),
        "{e:?}"
    );

    // No roots at all: nothing verifies.
    let bare = Connector::new(false, None);
    assert_eq!(bare.root_count(), 0);
    let e = run(&bare, &ours, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            TlsFailure::Certificate(CertFailure::UntrustedIssuer(Some(_)))
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn wrong_name() {
    let w = world();
    let leaf = w.ca.leaf(&["a.test", "b.test"], None);
    for level in [TlsLevel::May, TlsLevel::Encrypt] {
        let o = run(&w.connector, &leaf, "mx.good.test", &req(level))
            .await
            .unwrap();
        assert_eq!(o.verification, Verification::Trusted);
        assert_eq!(o.verification.word(), "Trusted");
    }
    let e = run(&w.connector, &leaf, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .unwrap_err();
    let TlsFailure::Certificate(CertFailure::NameMismatch {
        expected,
        presented,
    }) = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(expected, &vec!["mx.good.test".to_string()]);
    assert!(presented.contains(&"a.test".to_string()) && presented.contains(&"b.test".to_string()));
    assert_eq!(
        e.to_string(),
        "the certificate is issued to a.test, b.test, not mx.good.test"
    );
    assert_eq!(e.enhanced_code(false), "4.7.320");
}

#[tokio::test]
async fn match_names_replace_the_mx_host() {
    let w = world();
    let leaf = w.ca.leaf(&["a.test", "b.test"], None);
    let by_name = TlsRequirement {
        match_names: vec!["zzz.test".into(), "B.test".into()],
        ..req(TlsLevel::Verify)
    };
    let o = run(&w.connector, &leaf, "mx.good.test", &by_name)
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);

    // A certificate for the MX host does not help when other names are required.
    let good = w.ca.leaf(&["mx.good.test"], None);
    let other = TlsRequirement {
        match_names: vec!["zzz.test".into(), "yyy.test".into()],
        ..req(TlsLevel::Verify)
    };
    let e = run(&w.connector, &good, "mx.good.test", &other)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TlsFailure::Certificate(CertFailure::NameMismatch {
            expected: vec!["zzz.test".into(), "yyy.test".into()],
            presented: vec!["mx.good.test".into()],
        })
    );
    assert_eq!(
        e.to_string(),
        "the certificate is issued to mx.good.test, not zzz.test or yyy.test"
    );
}

#[tokio::test]
async fn wildcard_covers_one_label() {
    let w = world();
    let leaf = w.ca.leaf(&["*.good.test"], None);
    let verify = req(TlsLevel::Verify);
    let o = run(&w.connector, &leaf, "mx.good.test", &verify)
        .await
        .unwrap();
    assert_eq!(o.verification, Verification::Verified);
    for host in ["a.mx.good.test", "good.test"] {
        let e = run(&w.connector, &leaf, host, &verify).await.unwrap_err();
        assert!(
            matches!(e, TlsFailure::Certificate(CertFailure::NameMismatch { .. })),
            "{host}: {e:?}"
        );
        let o = run(&w.connector, &leaf, host, &req(TlsLevel::May))
            .await
            .unwrap();
        assert_eq!(o.verification, Verification::Trusted, "{host}");
    }
}

#[tokio::test]
async fn pins() {
    let w = world();
    let leaf = w.ca.leaf(&["mx.good.test"], None);
    let cert_pin = Pin::cert_of(&leaf.der);
    let spki_pin = Pin::spki_of(&leaf.der).unwrap();
    let wrong = Pin::Spki([7; 32]);
    let with = |level, pins: Vec<Pin>| TlsRequirement { pins, ..req(level) };

    for pin in [cert_pin, spki_pin] {
        let o = run(
            &w.connector,
            &leaf,
            "mx.good.test",
            &with(TlsLevel::Verify, vec![wrong, pin]),
        )
        .await
        .unwrap();
        assert_eq!(o.pinned, Some(true));
        assert_eq!(o.verification, Verification::Verified);
    }
    let e = run(
        &w.connector,
        &leaf,
        "mx.good.test",
        &with(TlsLevel::Verify, vec![wrong]),
    )
    .await
    .unwrap_err();
    assert_eq!(e, TlsFailure::Certificate(CertFailure::PinMismatch));
    assert_eq!(
        e.to_string(),
        "the certificate matches none of the pinned fingerprints"
    );

    // Pins add to `verify`: a matching pin does not excuse a wrong name.
    let e = run(
        &w.connector,
        &leaf,
        "other.test",
        &with(TlsLevel::Verify, vec![cert_pin]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, TlsFailure::Certificate(CertFailure::NameMismatch { .. })),
        "{e:?}"
    );

    // Under `encrypt` a pin is enough (self-signed / unknown CA), and must match.
    let stranger = w.other_ca.leaf(&["whatever.test"], None);
    let spki = Pin::spki_of(&stranger.der).unwrap();
    let o = run(
        &w.connector,
        &stranger,
        "mx.good.test",
        &with(TlsLevel::Encrypt, vec![spki]),
    )
    .await
    .unwrap();
    assert_eq!(o.pinned, Some(true));
    assert!(matches!(
        o.verification,
        Verification::Untrusted(CertFailure::UntrustedIssuer(Some(_)))
    ));
    let e = run(
        &w.connector,
        &stranger,
        "mx.good.test",
        &with(TlsLevel::Encrypt, vec![cert_pin]),
    )
    .await
    .unwrap_err();
    assert_eq!(e, TlsFailure::Certificate(CertFailure::PinMismatch));

    // Under `may` a mismatch is only reported.
    let o = run(
        &w.connector,
        &stranger,
        "mx.good.test",
        &with(TlsLevel::May, vec![wrong]),
    )
    .await
    .unwrap();
    assert_eq!(o.pinned, Some(false));
}

#[tokio::test]
async fn peer_that_does_not_speak_tls() {
    let w = world();
    let tcp = raw_server(b"220 mx.good.test ESMTP not TLS at all\r\n").await;
    let e = w
        .connector
        .handshake(tcp, "mx.good.test", &req(TlsLevel::Verify))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, TlsFailure::Handshake(_)), "{e:?}");
    assert!(e.to_string().contains("does not speak TLS"), "{e}");
    assert!(!e.is_certificate());
    assert_eq!(e.enhanced_code(false), "4.7.0");
    assert_eq!(e.enhanced_code(true), "5.7.0");
}

#[tokio::test]
async fn peer_that_closes() {
    let w = world();
    let listener = TcpListener::bind((IP, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = listener.accept().await;
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = w
        .connector
        .handshake(tcp, "mx.good.test", &req(TlsLevel::May))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, TlsFailure::Handshake(_)), "{e:?}");
}

#[tokio::test]
async fn silent_peer_times_out() {
    let w = world();
    let connector = w
        .connector
        .clone()
        .with_handshake_timeout(Duration::from_millis(300));
    let tcp = raw_server(b"").await;
    let e = connector
        .handshake(tcp, "mx.good.test", &req(TlsLevel::Encrypt))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e, TlsFailure::Timeout);
    assert_eq!(e.enhanced_code(false), "4.7.0");
    assert_eq!(e.to_string(), "the TLS handshake timed out");
}

#[test]
fn pin_parsing() {
    let hex = "ab".repeat(32);
    assert_eq!(
        Pin::parse(&format!("sha256:cert:{hex}")),
        Ok(Pin::Cert([0xab; 32]))
    );
    let colons = ["AB"; 32].join(":");
    assert_eq!(
        Pin::parse(&format!("SHA256:SPKI:{colons}")),
        Ok(Pin::Spki([0xab; 32]))
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode([0x11u8; 32]);
    assert_eq!(
        Pin::parse(&format!("sha256:spki:{b64}")),
        Ok(Pin::Spki([0x11; 32]))
    );
    let p = Pin::Cert([0x0f; 32]);
    assert_eq!(p.to_string().parse::<Pin>(), Ok(p));
    assert_eq!(p.to_string(), format!("sha256:cert:{}", "0f".repeat(32)));
    for bad in [
        "",
        "sha256:cert",
        &format!("sha1:cert:{hex}"),
        &format!("sha256:key:{hex}"),
        "sha256:cert:abcd",
        &format!("sha256:cert:{}", "zz".repeat(32)),
    ] {
        assert!(Pin::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn levels_are_ordered_and_deserialize() {
    assert!(TlsLevel::None < TlsLevel::May);
    assert!(TlsLevel::May < TlsLevel::Encrypt);
    assert!(TlsLevel::Encrypt < TlsLevel::Verify);
    assert!(TlsLevel::Verify >= TlsLevel::Encrypt);
    assert_eq!(TlsLevel::default(), TlsLevel::May);
    #[derive(serde::Deserialize)]
    struct W {
        level: TlsLevel,
    }
    let w: W = toml::from_str("level = \"verify\"").unwrap();
    assert_eq!(w.level, TlsLevel::Verify);
    assert!(toml::from_str::<W>("level = \"Verify\"").is_err());
    assert_eq!(TlsLevel::Encrypt.to_string(), "encrypt");
}

#[test]
fn system_roots_load_or_fall_back() {
    assert!(Connector::new(true, None).root_count() > 0);
}
