//! A scriptable HTTPS server on loopback (tokio-rustls on its own runtime thread) for MTA-STS
//! policy fetches: it answers every request with the raw response it was given, so tests can
//! serve good policies, redirects, wrong media types, oversized or malformed bodies.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct PolicyServer {
    pub addr: SocketAddr,
    response: Arc<Mutex<Vec<u8>>>,
    hits: Arc<AtomicUsize>,
    hang: Arc<std::sync::atomic::AtomicBool>,
    /// The request heads received, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

/// A 200 `text/plain` response with `body`.
pub fn ok_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl PolicyServer {
    /// Serves HTTPS on `addr` with the certificate `identity` (cert, key PEM files).
    pub fn start(addr: &str, identity: &(PathBuf, PathBuf)) -> PolicyServer {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&identity.0)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(&identity.1).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        // Bound before this returns: a fetch from `addr` afterwards reaches this server.
        let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| {
            panic!("policy server: cannot listen on {addr} (another process already listens there?): {e}")
        });
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let response = Arc::new(Mutex::new(ok_response("")));
        let hits = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, h, q, g) = (
            response.clone(),
            hits.clone(),
            requests.clone(),
            hang.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, r, h, q, g) =
                        (acceptor.clone(), r.clone(), h.clone(), q.clone(), g.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut buf = Vec::new();
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                        q.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf).into_owned());
                        if g.load(Ordering::SeqCst) {
                            // Never answer; hold the connection.
                            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                            return;
                        }
                        let out = r.lock().unwrap().clone();
                        let _ = tls.write_all(&out).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
        });
        PolicyServer {
            addr,
            response,
            hits,
            hang,
            requests,
        }
    }

    /// From now on every request gets `raw` (a whole HTTP response).
    pub fn set_response(&self, raw: Vec<u8>) {
        *self.response.lock().unwrap() = raw;
    }

    /// From now on every request gets `policy` as a 200 `text/plain` body.
    pub fn set_policy(&self, policy: &str) {
        self.set_response(ok_response(policy));
    }

    /// From now on requests are read and never answered.
    pub fn hang(&self) {
        self.hang.store(true, Ordering::SeqCst);
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}
