//! A TLS-capable SMTP sink for `scripts/bench-relay.sh`: Postfix's `smtp-sink` plus STARTTLS.
//! It accepts every command, keeps nothing, and counts messages, connections and TLS
//! handshakes, so that a relay benchmark over TLS measures the relays rather than a receiver
//! that queues every message.
//!
//!   cargo run --release --example tls_sink -- 127.0.0.42:2601 /tmp/sink.state
//!
//! The state file always holds one line, `messages connections tls`, each field padded to 12
//! characters and rewritten in place every 20 ms (the format the benchmark's counters use).
//! STARTTLS uses a fresh self-signed ECDSA P-256 certificate (TLS 1.2 and 1.3, the rustls
//! defaults); bytes pipelined after STARTTLS are discarded, as RFC 3207 requires.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    messages: AtomicU64,
    connections: AtomicU64,
    tls: AtomicU64,
}

const EHLO_PLAIN: &[u8] = b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";
const EHLO_TLS: &[u8] = b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n";

/// What a session phase ended with.
enum End {
    Closed,
    StartTls,
}

/// Runs SMTP on `stream` until QUIT, EOF or (when `tls_offered`) STARTTLS.
async fn smtp<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    tls_offered: bool,
    counts: &Counts,
) -> std::io::Result<End> {
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(End::Closed);
        }
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(u8::to_ascii_uppercase)
            .collect();
        match verb.as_slice() {
            b"EHLO" => out.extend_from_slice(if tls_offered { EHLO_PLAIN } else { EHLO_TLS }),
            b"HELO" => out.extend_from_slice(b"250 sink.bench.test\r\n"),
            b"STARTTLS" if tls_offered => {
                r.get_mut()
                    .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                    .await?;
                return Ok(End::StartTls);
            }
            b"DATA" => {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                r.get_mut().write_all(&out).await?;
                out.clear();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(End::Closed);
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                counts.messages.fetch_add(1, Ordering::Relaxed);
                out.extend_from_slice(b"250 2.0.0 Ok: discarded\r\n");
            }
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                r.get_mut().write_all(&out).await?;
                return Ok(End::Closed);
            }
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            _ => out.extend_from_slice(b"502 5.5.1 Not implemented\r\n"),
        }
        // Answer a pipelined group in one write, once nothing more is waiting.
        if r.buffer().is_empty() {
            r.get_mut().write_all(&out).await?;
            out.clear();
        }
    }
}

async fn session(
    mut tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    counts: Arc<Counts>,
) -> std::io::Result<()> {
    counts.connections.fetch_add(1, Ordering::Relaxed);
    tcp.set_nodelay(true)?;
    tcp.write_all(b"220 sink.bench.test ESMTP\r\n").await?;
    if let End::StartTls = smtp(&mut tcp, true, &counts).await? {
        // Whatever the client pipelined after STARTTLS was in the dropped reader's buffer.
        let mut tls = acceptor.accept(tcp).await?;
        counts.tls.fetch_add(1, Ordering::Relaxed);
        smtp(&mut tls, false, &counts).await?;
        let _ = tls.shutdown().await;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, state] = args.as_slice() else {
        return Err("usage: tls_sink ADDR STATE-FILE".into());
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert =
        rcgen::CertificateParams::new(vec!["sink.bench.test".to_string()])?.self_signed(&key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let state = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(state)?;
    let counts = Arc::new(Counts::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served: std::io::Result<()> = runtime.block_on(async move {
        let listener = TcpListener::bind(addr.as_str()).await?;
        let c = counts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let line = format!(
                    "{:<12} {:<12} {:<12}\n",
                    c.messages.load(Ordering::Relaxed),
                    c.connections.load(Ordering::Relaxed),
                    c.tls.load(Ordering::Relaxed)
                );
                let _ = state.write_all_at(line.as_bytes(), 0);
            }
        });
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(session(tcp, acceptor.clone(), counts.clone()));
        }
    });
    Ok(served?)
}
