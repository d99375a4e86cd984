//! A TLS-capable SMTP sink for `scripts/bench-relay.sh`: Postfix's `smtp-sink` plus STARTTLS.
//! It accepts every command, keeps nothing, and counts messages, connections and TLS
//! handshakes, so that a relay benchmark over TLS measures the relays rather than a receiver
//! that queues every message.
//!
//!   cargo run --release --example tls_sink -- 127.0.0.42:2601 /tmp/sink.state
//!
//!   cargo run --release --example tls_sink -- 127.0.0.42:2601 /tmp/sink.state --sync /tmp/sink.ring
//!
//! With `--sync FILE` it is the smallest durable server instead: each message is written into
//! a preallocated 64 MiB ring in FILE and synced (`fdatasync`, one per batch of messages that
//! end together, on a thread of its own) before its 250, as a queue would, but nothing is parsed,
//! indexed or delivered. `scripts/bench.sh` runs both as the ceilings of each row.
//!
//! The state file always holds one line, `messages connections tls`, each field padded to 12
//! characters and rewritten in place every 20 ms (the format the benchmark's counters use).
//! STARTTLS uses a fresh self-signed ECDSA P-256 certificate (TLS 1.2 and 1.3, the rustls
//! defaults); bytes pipelined after STARTTLS are discarded, as RFC 3207 requires.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
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

/// Size of the `--sync` ring.
const RING: u64 = 64 << 20;

type Commit = (Vec<u8>, tokio::sync::oneshot::Sender<std::io::Result<()>>);

/// The `--sync` committer: writes every message waiting, syncs once, answers them all.
fn committer(file: std::fs::File, rx: mpsc::Receiver<Commit>) {
    let mut at = 0u64;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut written = Ok(());
        for (data, _) in &batch {
            if at + data.len() as u64 > RING {
                at = 0;
            }
            written = written.and_then(|()| file.write_all_at(data, at));
            at += data.len() as u64;
        }
        let synced = written.and_then(|()| file.sync_data());
        for (_, done) in batch {
            let _ = done.send(match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

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
    durable: Option<&mpsc::Sender<Commit>>,
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
                let mut message = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(End::Closed);
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    if durable.is_some() {
                        message.extend_from_slice(&line);
                    }
                }
                let stored = match durable {
                    None => Ok(()),
                    Some(tx) => {
                        let (done, wait) = tokio::sync::oneshot::channel();
                        match tx.send((message, done)) {
                            Ok(()) => wait
                                .await
                                .unwrap_or_else(|_| Err(std::io::Error::other("committer gone"))),
                            Err(_) => Err(std::io::Error::other("committer gone")),
                        }
                    }
                };
                if stored.is_ok() {
                    counts.messages.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(if durable.is_some() {
                        b"250 2.0.0 Ok: synced\r\n"
                    } else {
                        b"250 2.0.0 Ok: discarded\r\n"
                    });
                } else {
                    out.extend_from_slice(b"451 4.3.0 Not stored\r\n");
                }
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
    durable: Option<mpsc::Sender<Commit>>,
) -> std::io::Result<()> {
    counts.connections.fetch_add(1, Ordering::Relaxed);
    tcp.set_nodelay(true)?;
    tcp.write_all(b"220 sink.bench.test ESMTP\r\n").await?;
    if let End::StartTls = smtp(&mut tcp, true, &counts, durable.as_ref()).await? {
        // Whatever the client pipelined after STARTTLS was in the dropped reader's buffer.
        let mut tls = acceptor.accept(tcp).await?;
        counts.tls.fetch_add(1, Ordering::Relaxed);
        smtp(&mut tls, false, &counts, durable.as_ref()).await?;
        let _ = tls.shutdown().await;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (addr, state, ring) = match args.as_slice() {
        [_, addr, state] => (addr, state, None),
        [_, addr, state, flag, ring] if flag == "--sync" => (addr, state, Some(ring)),
        _ => return Err("usage: tls_sink ADDR STATE-FILE [--sync RING-FILE]".into()),
    };
    let durable = match ring {
        None => None,
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(true)
                .open(path)?;
            // Allocated and written once, so that a sync writes data blocks and no metadata.
            let zeros = vec![0u8; 1 << 20];
            for i in 0..RING / (1 << 20) {
                file.write_all_at(&zeros, i << 20)?;
            }
            file.sync_all()?;
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("sink-commit".into())
                .spawn(move || committer(file, rx))?;
            Some(tx)
        }
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
            tokio::spawn(session(
                tcp,
                acceptor.clone(),
                counts.clone(),
                durable.clone(),
            ));
        }
    });
    Ok(served?)
}
