//! Test harness: runs the real `moat` binary on its own loopback address with a config in a
//! temp dir, and a small synchronous SMTP client (plain, STARTTLS, implicit TLS) to talk to it.
#![allow(dead_code)]

pub mod chromium;
pub mod dns;
pub mod https;
pub mod postgres;
pub mod signed_dns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

pub const SMTP: u16 = 2525;
pub const SMTPS: u16 = 2465;
pub const SUBMISSION: u16 = 2587;

pub struct Moat {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub ip: String,
    pub config: PathBuf,
    /// The running child's output files (from where this child started writing).
    output: Option<ChildOutput>,
    /// A command that runs the server (its path and arguments are appended), e.g. one that
    /// mounts a small file system for the spool first. Empty: the server itself.
    pub launcher: Vec<String>,
}

/// Where a spawned server's stdout and stderr go (files in a directory of the test's own),
/// and how long each file was when the child started, so that the lines of this child are
/// told apart from those of an earlier run appended to the same file.
#[derive(Debug, Clone)]
pub struct ChildOutput {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    stdout_from: u64,
    stderr_from: u64,
}

impl ChildOutput {
    /// Files `<name>.out` (stdout) and `<name>.log` (stderr) in `dir`, appended to.
    pub fn new(dir: &Path, name: &str) -> ChildOutput {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.log"));
        ChildOutput {
            stdout_from: len(&stdout),
            stderr_from: len(&stderr),
            stdout,
            stderr,
        }
    }

    /// Points `cmd`'s stdout and stderr at the files.
    pub fn attach(&self, cmd: &mut Command) {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        cmd.stdout(open(&self.stdout)).stderr(open(&self.stderr));
    }

    /// What this child has written to stdout so far.
    pub fn stdout_text(&self) -> String {
        since(&self.stdout, self.stdout_from)
    }

    /// What this child has written to stderr so far.
    pub fn stderr_text(&self) -> String {
        since(&self.stderr, self.stderr_from)
    }

    /// The last `n` lines of this child's stderr and its whole stdout, for a panic message.
    pub fn tails(&self, n: usize) -> String {
        let err = self.stderr_text();
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!(
            "--- stderr ({}, last {n} lines) ---\n{tail}\n--- stdout ({}) ---\n{}",
            self.stderr.display(),
            self.stdout.display(),
            self.stdout_text()
        )
    }
}

fn since(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = (from as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// The line `moat serve` prints once every listener, its admin socket and its signal handlers
/// are in place (`src/server.rs`).
pub fn ready_line(pid: u32) -> String {
    format!("moat: ready (pid {pid})")
}

/// Why a server exited before it was ready, from its stderr: for a listener that could not
/// bind, "address in use: another process already listens on ADDR".
pub fn exit_reason(stderr: &str) -> Option<String> {
    let line = stderr.lines().find(|l| l.contains("cannot listen on "))?;
    let rest = &line[line.find("cannot listen on ")? + "cannot listen on ".len()..];
    let addr = rest.split_whitespace().next().unwrap_or(rest);
    let what = rest
        .split_once(" (")
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(label, _)| format!(" ({label})"))
        .unwrap_or_default();
    Some(if line.contains("in use") || line.contains("os error 98") {
        format!("address in use: another process already listens on {addr}{what}")
    } else {
        format!("cannot listen on {addr}{what}: {line}")
    })
}

/// Waits until `child` prints its own [`ready_line`] on stdout and returns the stdout lines
/// it printed until then (its `moat: listening on …` lines among them). Panics at once, with
/// the reason and the tail of its output, when the child exits first, and after `limit`.
/// Nothing here connects to a port: a port that answers may belong to another process.
pub fn wait_ready(
    child: &mut Child,
    what: &str,
    out: &ChildOutput,
    limit: Duration,
) -> Vec<String> {
    let want = ready_line(child.id());
    let deadline = Instant::now() + limit;
    loop {
        let text = out.stdout_text();
        if text.lines().any(|l| l == want) {
            return text.lines().map(str::to_string).collect();
        }
        if let Some(status) = child.try_wait().unwrap() {
            let reason = exit_reason(&out.stderr_text())
                .unwrap_or_else(|| "it never said it was ready".to_string());
            panic!(
                "{what} exited ({status}) before it was ready: {reason}\n{}",
                out.tails(40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} (pid {}) did not print {want:?} within {limit:?}\n{}",
            child.id(),
            out.tails(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `lines` (from [`wait_ready`]) say the child itself listens on `addr`.
pub fn assert_listening(lines: &[String], addr: &str, what: &str) {
    let prefix = format!("moat: listening on {addr} (");
    assert!(
        lines.iter().any(|l| l.starts_with(&prefix)),
        "{what} did not report listening on {addr}; its stdout:\n{}",
        lines.join("\n")
    );
}

/// A config with the three standard listeners on `ip`, plus `extra` TOML appended.
pub fn config_text(ip: &str, data: &Path, extra: &str, limits: &str) -> String {
    format!(
        r#"hostname = "mx.moat.test"
data_dir = "{data}"

[[listener]]
name = "smtp"
address = "{ip}:{SMTP}"
mode = "smtp"

[[listener]]
name = "smtps"
address = "{ip}:{SMTPS}"
mode = "smtps"

[[listener]]
name = "submission"
address = "{ip}:{SUBMISSION}"
mode = "submission"

[[domain]]
name = "moat.test"
route = "maildir"

[[domain]]
name = "sink.test"
route = "discard"

[limits]
auth_failure_delay_ms = 0
shutdown_grace_secs = 5
{limits}

{extra}
"#,
        data = data.display()
    )
}

impl Moat {
    /// Starts moat with the standard config on `ip`.
    pub fn start(ip: &str) -> Moat {
        Moat::start_with(ip, "", "")
    }

    pub fn start_with(ip: &str, extra: &str, limits: &str) -> Moat {
        let mut m = Moat::configured(ip, extra, limits);
        m.spawn();
        m
    }

    /// Writes the config and data directory as [`Moat::start_with`] does, without starting.
    pub fn configured(ip: &str, extra: &str, limits: &str) -> Moat {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = dir.path().join("moat.toml");
        std::fs::write(&config, config_text(ip, &data, extra, limits)).unwrap();
        Moat {
            child: None,
            dir,
            ip: ip.to_string(),
            config,
            output: None,
            launcher: Vec::new(),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.ip).parse().unwrap()
    }

    /// (Re)starts the process and waits for its own `moat: ready (pid N)` line; checks that
    /// it reports listening on the three standard addresses. A child that exits first (another
    /// process holds one of its addresses, a bad config) fails the test at once, with its
    /// stderr. The log (stderr) is `moat.log`, stdout `moat.out`, both appended across restarts.
    pub fn spawn(&mut self) {
        let out = ChildOutput::new(self.dir.path(), "moat");
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_moat"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_moat")),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("MOAT_LOG", "debug");
        out.attach(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", env!("CARGO_BIN_EXE_moat")));
        self.child = Some(child);
        self.output = Some(out.clone());
        let what = format!("moat serve --config {}", self.config.display());
        let lines = wait_ready(
            self.child.as_mut().unwrap(),
            &what,
            &out,
            Duration::from_secs(20),
        );
        for port in [SMTP, SMTPS, SUBMISSION] {
            assert_listening(&lines, &self.addr(port).to_string(), &what);
        }
    }

    /// The running (or last) child's output files.
    pub fn output(&self) -> &ChildOutput {
        self.output.as_ref().expect("moat was never started")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moat.log")).unwrap_or_default()
    }

    pub fn add_user(&self, name: &str, password: &str) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["user", "add", name, "--config"])
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        assert!(child.wait().unwrap().success());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        unsafe_kill(c.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "moat did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe_kill(self.child.as_ref().unwrap().id(), sig);
    }

    /// Files in `<data>/mail/<mailbox>/new`.
    pub fn mailbox(&self, mailbox: &str) -> Vec<String> {
        let dir = self.data().join("mail").join(mailbox).join("new");
        let mut out: Vec<String> = match std::fs::read_dir(dir) {
            Ok(d) => d
                .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        out.sort();
        out
    }

    /// Waits until `mailbox` holds at least `n` messages.
    pub fn wait_mailbox(&self, mailbox: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let m = self.mailbox(mailbox);
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages in the running server's queue, as `moat queue count` tells
    /// (`usize::MAX` when it cannot be asked).
    pub fn queue_len(&self) -> usize {
        let (ok, text) = moat_cli(self, &["queue", "count"]);
        text.trim()
            .parse()
            .ok()
            .filter(|_| ok)
            .unwrap_or(usize::MAX)
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

impl Drop for Moat {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Accepts any server certificate: these tests check Moat's behaviour, not PKIX (the interop
/// suite verifies chains and names with openssl, swaks and Postfix).
#[derive(Debug)]
pub struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

pub fn client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    client_config_with(versions, None)
}

/// As [`client_config`], presenting the client certificate `(cert.pem, key.pem)` if given.
pub fn client_config_with(
    versions: &[&'static rustls::SupportedProtocolVersion],
    identity: Option<&(PathBuf, PathBuf)>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert));
    Arc::new(match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    })
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    None,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::None => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::None => Ok(0),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::None => Ok(()),
        }
    }
}

/// A blocking SMTP client for tests.
pub struct Client {
    reader: BufReader<Stream>,
    pub peer_cert: Option<Vec<u8>>,
    pub tls_version: Option<rustls::ProtocolVersion>,
}

/// One reply: code and the text of each line (after `NNN-`/`NNN `).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
    /// `"550 5.1.1"` style check of code and enhanced code.
    pub fn is(&self, code_and_enhanced: &str) -> bool {
        let full = format!(
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        );
        full.starts_with(code_and_enhanced)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text())
    }
}

impl Client {
    /// Connects and reads the greeting (which must be 220).
    pub fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::connect_raw(addr);
        let r = c.read_reply();
        assert_eq!(r.code, 220, "greeting: {r}");
        c
    }

    /// Connects without reading anything.
    pub fn connect_raw(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            reader: BufReader::new(Stream::Plain(s)),
            peer_cert: None,
            tls_version: None,
        }
    }

    /// Connects from `local` (another loopback address acting as another client host)
    /// without reading anything.
    pub fn connect_raw_from(local: std::net::IpAddr, addr: SocketAddr) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let s = rt
            .block_on(async {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(SocketAddr::new(local, 0))?;
                sock.connect(addr).await
            })
            .unwrap_or_else(|e| panic!("connect {local} -> {addr}: {e}"));
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            reader: BufReader::new(Stream::Plain(s)),
            peer_cert: None,
            tls_version: None,
        }
    }

    /// Implicit TLS from `local`: handshake first, then the greeting.
    pub fn connect_tls_from(local: std::net::IpAddr, addr: SocketAddr, sni: &str) -> Client {
        let mut c = Client::connect_raw_from(local, addr);
        c.handshake(sni, &[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap();
        let r = c.read_reply();
        assert_eq!(r.code, 220, "greeting: {r}");
        c
    }

    /// Implicit TLS: handshake first, then the greeting.
    pub fn connect_tls(addr: SocketAddr, sni: &str) -> Client {
        let mut c = Client::connect_raw(addr);
        c.handshake(sni, &[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap();
        let r = c.read_reply();
        assert_eq!(r.code, 220, "greeting: {r}");
        c
    }

    pub fn handshake(
        &mut self,
        sni: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<(), rustls::Error> {
        self.handshake_with(sni, client_config(versions))
    }

    /// STARTTLS presenting a client certificate.
    pub fn starttls_with_cert(&mut self, sni: &str, identity: &(PathBuf, PathBuf)) {
        let r = self.cmd("STARTTLS");
        assert!(r.is("220 2.0.0"), "STARTTLS: {r}");
        let config = client_config_with(&[&rustls::version::TLS13], Some(identity));
        self.handshake_with(sni, config).unwrap();
    }

    pub fn handshake_with(
        &mut self,
        sni: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<(), rustls::Error> {
        let tcp = match std::mem::replace(self.reader.get_mut(), Stream::None) {
            Stream::Plain(s) => s,
            _ => panic!("already TLS"),
        };
        assert!(
            self.reader.buffer().is_empty(),
            "unread plaintext before TLS"
        );
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        let mut tcp = tcp;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok(_) => {}
                Err(e) => {
                    return Err(rustls::Error::General(e.to_string()));
                }
            }
        }
        self.peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        self.tls_version = conn.protocol_version();
        *self.reader.get_mut() = Stream::Tls(Box::new(StreamOwned::new(conn, tcp)));
        Ok(())
    }

    /// STARTTLS (expects 220) and the handshake; does not send EHLO.
    pub fn starttls(&mut self, sni: &str) {
        let r = self.cmd("STARTTLS");
        assert!(r.is("220 2.0.0"), "STARTTLS: {r}");
        self.handshake(sni, &[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
        self.reader.get_mut().flush().unwrap();
    }

    /// Reads one (possibly multi-line) reply. Panics on EOF.
    pub fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .expect("connection closed while waiting for a reply")
    }

    /// Reads one reply, or None on EOF / reset.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end();
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3].parse().unwrap();
            let sep = line.as_bytes().get(3).copied().unwrap_or(b' ');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if sep == b' ' {
                return Some(Reply { code, lines });
            }
        }
    }

    /// True when the server closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    pub fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test");
        assert_eq!(r.code, 250, "EHLO: {r}");
        r
    }

    /// MAIL, RCPTs, DATA with `body` (already dot-stuffed, CRLF): returns the final reply.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        if r.code != 250 {
            return r;
        }
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            if r.code != 250 {
                return r;
            }
        }
        let r = self.cmd("DATA");
        if r.code != 354 {
            return r;
        }
        self.send(format!("{body}.\r\n").as_bytes());
        self.read_reply()
    }
}

/// `extra` for a Moat receiving `domain` into Maildir and serving the certificate `identity`
/// (cert, key), e.g. from [`make_certs`].
pub fn maildir_receiver(domain: &str, identity: &(PathBuf, PathBuf)) -> String {
    format!(
        "[[domain]]\nname = \"{domain}\"\nroute = \"maildir\"\n\n[tls]\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
        identity.0.display(),
        identity.1.display()
    )
}

/// Writes a CA and leaf certificates (for `names`) signed by it; returns (ca_pem, [(cert, key)]).
pub fn make_certs(dir: &Path, leaves: &[&str]) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    make_certs_named(dir, "Moat Test CA", leaves)
}

/// Like [`make_certs`] with the CA's common name given (CAs with distinct names are distinct
/// issuers to a verifier; same-named ones look like a forged signature).
pub fn make_certs_named(
    dir: &Path,
    ca_name: &str,
    leaves: &[&str],
) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut out = Vec::new();
    for (i, name) in leaves.iter().enumerate() {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let c = dir.join(format!("leaf{i}.pem"));
        let k = dir.join(format!("leaf{i}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        out.push((c, k));
    }
    (ca_path, out)
}

/// Like [`make_certs`] for one leaf, valid only from `not_before` to `not_after` (Unix time).
pub fn make_cert_valid(
    dir: &Path,
    name: &str,
    not_before: i64,
    not_after: i64,
) -> (PathBuf, (PathBuf, PathBuf)) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Moat Test CA (validity)");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let ca_path = dir.join("ca-validity.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_before =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_before as u64);
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after as u64);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let c = dir.join("leaf-validity.pem");
    let k = dir.join("leaf-validity.key");
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (ca_path, (c, k))
}

/// DER of the first certificate in a PEM file.
pub fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// What a scripted peer was sent: `(connection number, command)` and `MESSAGE <body>` lines.
pub type PeerLog = std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>;

/// What a scripted SMTP peer does differently from the default (`plain_peer`).
#[derive(Debug, Clone, Copy)]
pub struct PeerScript {
    /// The EHLO reply.
    pub ehlo: &'static [u8],
    /// `RCPT TO:<…>` whose address starts with this (case-insensitive) gets `550 5.1.1`.
    pub refuse_rcpt: Option<&'static str>,
    /// Like OpenSMTPD without PIPELINING: a command sent before the previous reply gets
    /// `500 5.5.1 Pipelining not supported` and the connection is closed (logged as
    /// `PIPELINING VIOLATION`).
    pub strict_pipelining: bool,
}

impl Default for PeerScript {
    fn default() -> Self {
        PeerScript {
            ehlo: b"250-plain.test\r\n250 PIPELINING\r\n",
            refuse_rcpt: None,
            strict_pipelining: false,
        }
    }
}

/// A plaintext-only SMTP peer (no STARTTLS) on `ip:2525` that follows `script` and records
/// `(connection number, command)`, and `MESSAGE <body>` for each message it takes.
pub fn scripted_peer(
    ip: &str,
    script: PeerScript,
) -> std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>> {
    // Bound here, before this returns: whoever connects to ip:2525 afterwards reaches this peer.
    let listener = std::net::TcpListener::bind((ip, SMTP)).unwrap_or_else(|e| {
        panic!("plaintext peer: cannot listen on {ip}:{SMTP} (another process already listens there?): {e}")
    });
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { continue };
            let log = log2.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = std::io::BufReader::new(conn);
                let _ = w.write_all(b"220 plain.test ESMTP\r\n");
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    log.lock().unwrap().push((n, cmd.clone()));
                    if script.strict_pipelining && !r.buffer().is_empty() {
                        log.lock().unwrap().push((n, "PIPELINING VIOLATION".into()));
                        let _ = w.write_all(b"500 5.5.1 Pipelining not supported\r\n");
                        return;
                    }
                    let upper = cmd.to_ascii_uppercase();
                    let refused = script.refuse_rcpt.is_some_and(|p| {
                        upper.starts_with(&format!("RCPT TO:<{}", p.to_ascii_uppercase()))
                    });
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        script.ehlo
                    } else if refused {
                        b"550 5.1.1 no such user\r\n"
                    } else if upper == "DATA" {
                        let _ = w.write_all(b"354 go\r\n");
                        let mut body = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == ".\r\n" {
                                break;
                            }
                            body.push_str(&line);
                        }
                        log.lock().unwrap().push((n, format!("MESSAGE {body}")));
                        b"250 2.0.0 accepted\r\n"
                    } else if upper == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n");
                        return;
                    } else if upper.starts_with("STARTTLS") {
                        b"502 5.5.1 not here\r\n"
                    } else {
                        b"250 2.0.0 ok\r\n"
                    };
                    let _ = w.write_all(reply);
                }
            });
        }
    });
    log
}

/// A plaintext-only SMTP peer (no STARTTLS, PIPELINING offered): [`scripted_peer`] by default.
pub fn plain_peer(ip: &str) -> PeerLog {
    scripted_peer(ip, PeerScript::default())
}

pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Submits one message; returns its queue id.
pub fn submit(m: &Moat, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = Client::connect(m.addr(SMTP));
    c.ehlo();
    let r = c.send_mail(
        from,
        to,
        &format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n"),
    );
    assert!(r.is("250 2.0.0"), "submit: {r}");
    r.text().rsplit(' ').next().unwrap().trim().to_string()
}

/// Runs `moat ARGS --config <m.config>`; returns success and stdout+stderr.
pub fn moat_cli(m: &Moat, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .arg("--config")
        .arg(&m.config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Reads one reply on a plain socket (the last line of a multi-line one).
pub fn raw_reply(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tcp.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => panic!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
        if got.ends_with(b"\r\n") {
            let text = String::from_utf8_lossy(&got).to_string();
            let last = text
                .trim_end()
                .rsplit("\r\n")
                .next()
                .unwrap_or("")
                .to_string();
            if last.as_bytes().get(3) == Some(&b' ') {
                return last;
            }
        }
    }
}

/// Sends a command line on a plain socket and reads its reply.
pub fn raw_cmd(tcp: &mut TcpStream, line: &str) -> String {
    tcp.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    raw_reply(tcp)
}

/// An MX that takes connections and never greets, until released: delivery passes stay open.
pub struct HoldingMx {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HoldingMx {
    pub fn start(ip: &str) -> HoldingMx {
        let listener = std::net::TcpListener::bind((ip, SMTP)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, h) = (stop.clone(), held.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => h.lock().unwrap().push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HoldingMx {
            stop,
            held,
            thread: Some(thread),
        }
    }

    /// Connections taken so far.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Closes every held connection and the listening socket.
    pub fn release(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.held.lock().unwrap().clear();
    }
}

/// A plain connection to `addr` with EHLO, MAIL and RCPT done (each must be positive), ready
/// for DATA or BDAT.
pub fn raw_envelope(addr: SocketAddr, from: &str, rcpt: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert!(raw_reply(&mut tcp).starts_with("220 "));
    assert!(raw_cmd(&mut tcp, "EHLO client.test").starts_with("250 "));
    assert!(raw_cmd(&mut tcp, &format!("MAIL FROM:<{from}>")).starts_with("250 "));
    assert!(raw_cmd(&mut tcp, &format!("RCPT TO:<{rcpt}>")).starts_with("250 "));
    tcp
}

/// Config that relays loopback clients to MX hosts found through `dns` on port 2525 and
/// retries only hourly (so nothing is retried within a test unless asked).
pub fn relay_config(dns: SocketAddr) -> String {
    format!(
        "[relay]\ntrusted_networks = [\"127.0.0.0/8\"]\n\n[outbound]\nport = 2525\nnameservers = [\"{dns}\"]\n\n[queue]\nretry_schedule_secs = [3600]\n"
    )
}

/// One HTTP/1.1 request to the admin API (`token` as a bearer token); status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
