//! `loadgen`: an SMTP load client with STARTTLS, for benchmarks (scripts/bench.sh).
//!
//! Build: `cargo build --release --example loadgen`
//!
//! ```text
//! loadgen 127.0.0.20:2525 --starttls --per-message -n 10000 -s 4096 -c 10
//! loadgen 127.0.0.20:2525 --starttls --idle 1000 --hold-secs 600
//! ```
//!
//! Each session: banner, EHLO, optionally STARTTLS + a new EHLO, then MAIL/RCPT/DATA per
//! message, one command at a time (no PIPELINING, like `smtp-source`). With `--per-message`
//! every message gets its own connection (and so its own full TLS handshake: resumption is
//! off unless `--resume`); otherwise a session sends messages until the count runs out.
//!
//! Every command, and the whole message plus the final `.\r\n`, goes out in ONE write: a
//! command split over several small writes stalls about 40 ms per write after a TLS 1.3
//! handshake with Postfix/OpenSSL (Nagle and delayed ACKs around the session tickets).
//!
//! Output ends with one machine-readable line:
//! `RESULT sent=.. failed=.. secs=.. rate=.. cpu_secs=..` (or `IDLE_READY ...` in idle mode).
//!
//! THIS IS A BENCHMARK TOOL: it accepts ANY server certificate. Never use it to send real mail.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// SMTP load generator (benchmark only: accepts any TLS certificate).
#[derive(Debug, Parser)]
#[command(name = "loadgen", max_term_width = 100)]
struct Args {
    /// Server address, HOST:PORT (an IP address).
    target: SocketAddr,
    /// Number of messages to send.
    #[arg(short = 'n', long, default_value_t = 1000)]
    messages: usize,
    /// Message body size in bytes (headers come on top, like `smtp-source -l`).
    #[arg(short = 's', long, default_value_t = 4096)]
    size: usize,
    /// Concurrent sessions.
    #[arg(short = 'c', long, default_value_t = 1)]
    concurrency: usize,
    /// Use STARTTLS (and a new EHLO) on every connection.
    #[arg(long)]
    starttls: bool,
    /// One connection (and so one handshake) per message instead of reusing connections.
    #[arg(long)]
    per_message: bool,
    /// Idle mode: open this many connections (STARTTLS + EHLO if --starttls), print
    /// `IDLE_READY`, then hold them until SIGTERM/SIGINT or --hold-secs.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Idle mode: the longest time to hold the connections.
    #[arg(long, default_value_t = 600)]
    hold_secs: u64,
    /// Allow TLS session resumption (off by default, so each handshake is a full one).
    #[arg(long)]
    resume: bool,
    /// Offer only X25519 for key exchange (default: rustls' default groups, which prefer
    /// X25519MLKEM768 and also send an X25519 share).
    #[arg(long)]
    x25519_only: bool,
    /// SNI / name for the TLS handshake (the certificate is NOT checked).
    #[arg(long, default_value = "localhost")]
    sni: String,
    #[arg(long, default_value = "loadgen.x.test")]
    ehlo: String,
    #[arg(short = 'f', long, default_value = "a@x.test")]
    from: String,
    #[arg(short = 't', long, default_value = "b@bench.test")]
    to: String,
    /// Local address to connect from (e.g. 127.0.0.30).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Timeout for each step (connect, reply, handshake), in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Do not set TCP_QUICKACK before each reply (shows the 40 ms delayed-ACK stall that
    /// Postfix's TLS session tickets cause; see `quickack`).
    #[arg(long)]
    no_quickack: bool,
    /// Print the time of every step of every connection to stderr (for debugging stalls).
    #[arg(long)]
    trace: bool,
    /// Runtime worker threads (1: a single-threaded runtime, like one smtp-source process).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

// ---------------------------------------------------------------------------------------
// BENCHMARK ONLY: a certificate verifier that accepts every certificate.
//
// The load client has to talk to servers with self-signed certificates under any name, so it
// skips certificate (chain and name) validation entirely. The handshake signature IS still
// checked, so the client does the same CPU work as a real one. Never copy this into code that
// sends real mail: it gives no protection against an active attacker.
// ---------------------------------------------------------------------------------------
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Benchmark only: no chain, name or validity check.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector(args: &Args) -> Result<TlsConnector, String> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if args.x25519_only {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let provider = Arc::new(provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    if !args.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Any byte stream: plain TCP before STARTTLS, TLS after.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Ctx {
    args: Args,
    tls: Option<TlsConnector>,
    sni: ServerName<'static>,
    /// The whole DATA payload: headers, body and the final ".\r\n".
    payload: Vec<u8>,
    mail: Vec<u8>,
    rcpt: Vec<u8>,
    ehlo: Vec<u8>,
    step: Duration,
    next: AtomicUsize,
    sent: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<BTreeMap<String, usize>>,
}

impl Ctx {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.errors.lock().unwrap().entry(why).or_default() += 1;
    }
}

/// One SMTP connection with a buffered reader for replies.
struct Conn {
    io: BufReader<Box<dyn Io>>,
    line: String,
    /// With --trace: when the connection started, for step timings.
    t0: Option<Instant>,
    /// The TCP socket, for TCP_QUICKACK; -1 when not wanted.
    quickack_fd: i32,
}

impl Conn {
    fn mark(&self, what: &str) {
        if let Some(t0) = self.t0 {
            eprintln!(
                "trace: {:8.3} ms  {what} done",
                t0.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    /// Reads a whole (possibly multi-line) reply; returns the code and the full text.
    async fn reply(&mut self, ctx: &Ctx) -> Result<(u16, String), String> {
        if self.quickack_fd >= 0 {
            quickack(self.quickack_fd);
        }
        let mut text = String::new();
        loop {
            self.line.clear();
            let n = timeout(ctx.step, self.io.read_line(&mut self.line))
                .await
                .map_err(|_| "timeout waiting for a reply".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed by the server".into());
            }
            text.push_str(&self.line);
            let l = self.line.as_bytes();
            if l.len() < 4 || !l[..3].iter().all(u8::is_ascii_digit) {
                return Err(format!("malformed reply: {:?}", self.line.trim_end()));
            }
            if l[3] != b'-' {
                let code = self.line[..3].parse().unwrap_or(0);
                return Ok((code, text));
            }
        }
    }

    /// Sends one buffer in one write, then reads the reply and checks its code.
    async fn cmd(
        &mut self,
        ctx: &Ctx,
        what: &str,
        data: &[u8],
        want: u16,
    ) -> Result<String, String> {
        let w = self.io.get_mut();
        timeout(ctx.step, async {
            w.write_all(data).await?;
            w.flush().await
        })
        .await
        .map_err(|_| format!("{what}: write timeout"))?
        .map_err(|e| format!("{what}: write: {e}"))?;
        self.expect(ctx, what, want).await
    }

    async fn expect(&mut self, ctx: &Ctx, what: &str, want: u16) -> Result<String, String> {
        let (code, text) = self.reply(ctx).await.map_err(|e| format!("{what}: {e}"))?;
        self.mark(what);
        if code != want {
            let first = text.lines().next().unwrap_or("").to_string();
            return Err(format!("{what}: {first}"));
        }
        Ok(text)
    }
}

/// Connects, reads the banner, EHLO, and STARTTLS + EHLO when asked.
async fn open(ctx: &Ctx) -> Result<Conn, String> {
    let a = &ctx.args;
    let stream = timeout(ctx.step, async {
        match a.bind {
            Some(ip) => {
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(a.target).await
            }
            None => TcpStream::connect(a.target).await,
        }
    })
    .await
    .map_err(|_| "connect: timeout".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let t0 = a.trace.then(Instant::now);
    let quickack_fd = if a.no_quickack {
        -1
    } else {
        std::os::fd::AsRawFd::as_raw_fd(&stream)
    };
    let mut c = Conn {
        io: BufReader::new(Box::new(stream) as Box<dyn Io>),
        line: String::new(),
        t0,
        quickack_fd,
    };
    c.mark("connect");
    c.expect(ctx, "banner", 220).await?;
    let caps = c.cmd(ctx, "EHLO", &ctx.ehlo, 250).await?;
    if let Some(tls) = &ctx.tls {
        if !caps.lines().any(|l| {
            l.get(4..)
                .is_some_and(|k| k.trim().eq_ignore_ascii_case("STARTTLS"))
        }) {
            return Err("STARTTLS not offered".into());
        }
        c.cmd(ctx, "STARTTLS", b"STARTTLS\r\n", 220).await?;
        if !c.io.buffer().is_empty() {
            return Err("server sent data after 220 to STARTTLS".into());
        }
        let plain = c.io.into_inner();
        let stream = timeout(ctx.step, tls.connect(ctx.sni.clone(), plain))
            .await
            .map_err(|_| "TLS handshake: timeout".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        c = Conn {
            io: BufReader::new(Box::new(stream) as Box<dyn Io>),
            line: String::new(),
            t0,
            quickack_fd,
        };
        c.mark("TLS handshake");
        c.cmd(ctx, "EHLO after STARTTLS", &ctx.ehlo, 250).await?;
    }
    Ok(c)
}

async fn send_one(c: &mut Conn, ctx: &Ctx) -> Result<(), String> {
    c.cmd(ctx, "MAIL", &ctx.mail, 250).await?;
    c.cmd(ctx, "RCPT", &ctx.rcpt, 250).await?;
    c.cmd(ctx, "DATA", b"DATA\r\n", 354).await?;
    c.cmd(ctx, "end of data", &ctx.payload, 250).await?;
    Ok(())
}

async fn close(mut c: Conn, ctx: &Ctx) {
    let _ = c.cmd(ctx, "QUIT", b"QUIT\r\n", 221).await;
    let _ = timeout(ctx.step, c.io.get_mut().shutdown()).await;
}

/// One client session: takes message numbers until none are left.
async fn worker(ctx: Arc<Ctx>) {
    let mut conn: Option<Conn> = None;
    while ctx.next.fetch_add(1, Ordering::Relaxed) < ctx.args.messages {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match open(&ctx).await {
                Ok(c) => c,
                Err(e) => {
                    ctx.fail(e);
                    continue;
                }
            },
        };
        match send_one(&mut c, &ctx).await {
            Ok(()) => {
                ctx.sent.fetch_add(1, Ordering::Relaxed);
                if ctx.args.per_message {
                    close(c, &ctx).await;
                } else {
                    conn = Some(c);
                }
            }
            // The connection is in an unknown state: drop it, the next message reconnects.
            Err(e) => ctx.fail(e),
        }
    }
    if let Some(c) = conn {
        close(c, &ctx).await;
    }
}

/// Re-arms TCP_QUICKACK (the kernel drops it again by itself), so every segment from the
/// server is ACKed at once. Without it, after a TLS 1.3 handshake with Postfix/OpenSSL the
/// server's reply sits behind its own Nagle until our delayed ACK of its session ticket fires:
/// a 40 ms stall per connection that measures TCP timers, not the server (see --no-quickack).
fn quickack(fd: i32) {
    let one: libc::c_int = 1;
    // SAFETY: fd is a live socket owned by this connection; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn build_payload(args: &Args) -> Vec<u8> {
    let mut p = format!(
        "From: <{}>\r\nTo: <{}>\r\nSubject: loadgen benchmark\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
         Message-ID: <loadgen.{}@x.test>\r\n\r\n",
        args.from,
        args.to,
        std::process::id()
    )
    .into_bytes();
    // Body: lines of at most 78 characters + CRLF, exactly `size` bytes in all.
    let mut left = args.size;
    let mut n = 0u8;
    while left > 0 {
        if left <= 2 {
            p.extend(std::iter::repeat_n(b'x', left));
            p.extend_from_slice(b"\r\n");
            break;
        }
        let text = (left - 2).min(78);
        p.extend((0..text).map(|i| b'a' + ((i as u8).wrapping_add(n) % 26)));
        p.extend_from_slice(b"\r\n");
        left -= text + 2;
        n = n.wrapping_add(1);
    }
    p.extend_from_slice(b".\r\n");
    p
}

fn print_errors(ctx: &Ctx) {
    for (e, n) in ctx.errors.lock().unwrap().iter() {
        eprintln!("loadgen: {n} x {e}");
    }
}

async fn run_load(ctx: Arc<Ctx>) {
    let a = &ctx.args;
    let t0 = Instant::now();
    let cpu0 = cpu_secs();
    let tasks: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| tokio::spawn(worker(ctx.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let sent = ctx.sent.load(Ordering::Relaxed);
    let failed = ctx.failed.load(Ordering::Relaxed);
    print_errors(&ctx);
    let rate = sent as f64 / secs;
    println!(
        "loadgen: {} {} message(s) of {} bytes, {} session(s), {}: {sent} sent, {failed} failed in {secs:.2} s = {rate:.1} msg/s (client CPU {cpu:.2} s)",
        a.target,
        a.messages,
        a.size,
        a.concurrency,
        match (a.starttls, a.per_message) {
            (true, true) => "STARTTLS, one connection per message",
            (true, false) => "STARTTLS, connections reused",
            (false, true) => "plaintext, one connection per message",
            (false, false) => "plaintext, connections reused",
        }
    );
    println!("RESULT sent={sent} failed={failed} secs={secs:.3} rate={rate:.1} cpu_secs={cpu:.3}");
}

async fn run_idle(ctx: Arc<Ctx>, n: usize) {
    let a = &ctx.args;
    let t0 = Instant::now();
    let (release_tx, release_rx) = watch::channel(false);
    // Bound the handshakes in flight so the server's accept queue does not overflow.
    let gate = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (ctx, gate, ready) = (ctx.clone(), gate.clone(), ready.clone());
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let c = open(&ctx).await;
            drop(permit);
            match c {
                Ok(c) => {
                    ready.fetch_add(1, Ordering::Relaxed);
                    let _ = release.wait_for(|r| *r).await;
                    close(c, &ctx).await;
                    true
                }
                Err(e) => {
                    ctx.fail(e);
                    false
                }
            }
        }));
    }
    // Wait for every connection to be up or failed.
    while ready.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    print_errors(&ctx);
    let up = ready.load(Ordering::Relaxed);
    let failed = ctx.failed.load(Ordering::Relaxed);
    println!(
        "IDLE_READY established={up} failed={failed} secs={:.3}",
        t0.elapsed().as_secs_f64()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(a.hold_secs)) => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(_) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
    }
    let _ = release_tx.send(true);
    let mut still_open = 0;
    for t in tasks {
        if let Ok(true) = t.await {
            still_open += 1;
        }
    }
    println!("IDLE_DONE closed={still_open}");
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let tls = if args.starttls {
        match tls_connector(&args) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("loadgen: TLS setup: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let sni = match ServerName::try_from(args.sni.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: --sni: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let ctx = Arc::new(Ctx {
        payload: build_payload(&args),
        mail: format!("MAIL FROM:<{}>\r\n", args.from).into_bytes(),
        rcpt: format!("RCPT TO:<{}>\r\n", args.to).into_bytes(),
        ehlo: format!("EHLO {}\r\n", args.ehlo).into_bytes(),
        step: Duration::from_secs(args.timeout_secs.max(1)),
        tls,
        sni,
        next: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        errors: Mutex::new(BTreeMap::new()),
        args,
    });
    let runtime = if ctx.args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(ctx.args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let failed = runtime.block_on(async {
        match ctx.args.idle {
            Some(n) => run_idle(ctx.clone(), n).await,
            None => run_load(ctx.clone()).await,
        }
        ctx.failed.load(Ordering::Relaxed)
    });
    if failed > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
