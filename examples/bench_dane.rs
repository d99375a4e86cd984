//! What DANE costs a delivery (RFC 7672), against a verified one without DANE: a benchmark,
//! not a test. Run with `scripts/bench-dane.sh` (release build).
//!
//! Signed zones are served in-process (hickory-server, the tests' `signed_dns` helper) on
//! 127.0.0.75; one MX host has a `3 1 1` record for a generated certificate. Printed, as
//! medians over `BENCH_ROUNDS` rounds of `BENCH_CALLS` calls:
//!
//! 1. the DANE facts of one host with a warm cache (MX state, address state, TLSA records:
//!    what a delivery looks up before connecting) and the policy judgement of the host;
//! 2. the certificate check of one handshake: DANE-EE matching of the presented chain, against
//!    the CA path (webpki chain to a root and the name check) a `verify` rule makes;
//! 3. the same lookups cold (validation of every answer from the trust anchor), once.

#[path = "../tests/common/signed_dns.rs"]
mod signed_dns;

use std::hint::black_box;
use std::time::{Duration, Instant};

use moat::dane::tlsa::Tlsa;
use moat::dns::Validator;
use moat::policy::{Dnssec, Facts, HostFacts, TlsPolicy, TlsaLookup};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median nanoseconds per call of `f` over `rounds` rounds of `calls` calls.
async fn time_ns<F, Fut>(calls: usize, rounds: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut per = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..calls {
            f().await;
        }
        per.push(t.elapsed().as_nanos() as f64 / calls as f64);
    }
    median(per)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls = env("BENCH_CALLS", 20_000);
    let rounds = env("BENCH_ROUNDS", 5);
    let dir = tempfile::tempdir().expect("temp dir");

    // A CA and a server certificate for the MX host, and its 3 1 1 record.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["mx.secure.bench.test".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let chain = vec![
        CertificateDer::from(leaf.der().to_vec()),
        CertificateDer::from(ca.der().to_vec()),
    ];
    let record = Tlsa::for_certificate(3, 1, 1, leaf.der()).expect("record");

    let s = |x: &str| x.to_string();
    let dns = signed_dns::serve_signed(
        "127.0.0.75",
        dir.path(),
        "bench.test",
        &[],
        &[(
            "secure.bench.test",
            signed_dns::Kind::Secure,
            vec![
                signed_dns::Srr::Mx(s("secure.bench.test"), 10, s("mx.secure.bench.test")),
                signed_dns::Srr::A(s("mx.secure.bench.test"), [127, 0, 0, 76]),
                signed_dns::Srr::Tlsa(
                    s("_25._tcp.mx.secure.bench.test"),
                    3,
                    1,
                    1,
                    record.data.clone(),
                ),
            ],
        )],
    );
    let validator = Validator::new(
        &[dns.addr],
        Duration::from_secs(2),
        1,
        Some(&dns.anchor_file),
    )
    .expect("validator");

    println!("== DANE cost per delivery (medians of {rounds} rounds x {calls} calls) ==");
    // 3 first: cold lookups validate from the anchor.
    let t = Instant::now();
    let mx = validator.mx("secure.bench.test").await;
    let addrs = validator.addresses("mx.secure.bench.test").await;
    let tlsa = validator.tlsa("mx.secure.bench.test", 25).await;
    let cold = t.elapsed();
    assert_eq!(mx, Dnssec::Secure, "MX not secure");
    assert_eq!(addrs, Dnssec::Secure, "A not secure");
    assert!(matches!(tlsa, TlsaLookup::Records { .. }), "{tlsa:?}");

    let v = &validator;
    let lookups = time_ns(calls, rounds, || async move {
        let mx = v.mx(black_box("secure.bench.test")).await;
        let a = v.addresses(black_box("mx.secure.bench.test")).await;
        let t = v.tlsa(black_box("mx.secure.bench.test"), 25).await;
        black_box((mx, a, t));
    })
    .await;

    let rules = TlsPolicy::default();
    let none = |r: Option<&std::sync::Arc<rustls::RootCertStore>>| r.cloned();
    let rcpts = vec!["u@secure.bench.test".to_string()];
    let decision = moat::policy::decide(&Facts {
        rules: &rules,
        sender: "a@b.test",
        domain: "secure.bench.test",
        recipients: &rcpts,
        mta_sts: None,
        sts_roots: &none,
        requiretls: false,
        tls_required_no: false,
        dane_unavailable: None,
    });
    let (d, tl) = (&decision, &tlsa);
    let judge = time_ns(calls, rounds, || async move {
        let v = d.for_host(&HostFacts {
            host: black_box("mx.secure.bench.test"),
            mx: &Dnssec::Secure,
            addresses: &Dnssec::Secure,
            tlsa: tl,
        });
        black_box(v);
    })
    .await;

    let now = UnixTime::now();
    let (rec, ch) = (&record, &chain);
    let names = vec!["mx.secure.bench.test".to_string()];
    let nm = &names;
    let dane_check = time_ns(calls, rounds, || async move {
        let r = moat::dane::tlsa::verify(std::slice::from_ref(rec), black_box(ch), nm, now);
        assert!(r.is_ok());
        black_box(r.is_ok());
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(chain[1].clone()).expect("root");
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let sn = ServerName::try_from("mx.secure.bench.test").expect("name");
    let (roots, sn) = (&roots, &sn);
    let pkix_check = time_ns(calls, rounds, || async move {
        let parsed = rustls::server::ParsedCertificate::try_from(&ch[0]).expect("parse");
        let r = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            &ch[1..],
            now,
            algs.all,
        )
        .and_then(|()| rustls::client::verify_server_name(&parsed, sn));
        assert!(r.is_ok());
        black_box(r.is_ok());
    })
    .await;

    println!(
        "  1. DANE facts of one host, warm (MX + A/AAAA + TLSA states)   {:>9.2} µs",
        lookups / 1000.0
    );
    println!(
        "     the policy room's judgement of the host                     {:>9.2} µs",
        judge / 1000.0
    );
    println!(
        "  2. certificate check: DANE-EE 3 1 1 match of the chain          {:>9.2} µs",
        dane_check / 1000.0
    );
    println!(
        "     certificate check: CA path + name (a verify rule, no DANE)   {:>9.2} µs   ratio DANE/verify {:.2}",
        pkix_check / 1000.0,
        dane_check / pkix_check
    );
    println!(
        "  3. the same lookups cold (validated from the trust anchor)      {:>9.2} ms",
        cold.as_secs_f64() * 1000.0
    );
    println!(
        "  per delivery, warm: DANE {:.2} µs (lookups + judgement + DANE check) vs verify {:.2} µs (CA check); ratio {:.2}",
        (lookups + judge + dane_check) / 1000.0,
        pkix_check / 1000.0,
        (lookups + judge + dane_check) / pkix_check
    );
}
