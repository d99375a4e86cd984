//! A private PostgreSQL cluster for one test: `initdb` into a temporary directory, the
//! server on its own loopback address and port, run as the `postgres` user when the tests
//! run as root (PostgreSQL refuses root). Debian's `postgresql` package provides the
//! binaries (`scripts/test` installs it). Ready when the server's own child process says
//! so on its log; stopped (fast shutdown) when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: IpAddr,
    pub port: u16,
    child: Option<Child>,
    bin: PathBuf,
    /// TLS on (`ssl=on` with the certificate and key given to [`Cluster::start_tls`]).
    tls: bool,
}

/// The newest PostgreSQL server binaries Debian installed.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (Debian package postgresql; scripts/test installs it)")
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server under /usr/lib/postgresql/*/bin")
        .1
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program as the `postgres` user when we are root.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port(addr: IpAddr) -> u16 {
    TcpListener::bind((addr, 0))
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Creates and starts a cluster listening on `addr` (a 127.0.0.x of the test's own),
    /// with a database `moat` owned by user `moat` (trust authentication on loopback).
    pub fn start(addr: &str) -> Cluster {
        Cluster::start_with(addr, None)
    }

    /// [`Cluster::start`] with TLS offered, with this certificate chain and key (PEM).
    pub fn start_tls(addr: &str, cert: &Path, key: &Path) -> Cluster {
        Cluster::start_with(addr, Some((cert, key)))
    }

    fn start_with(addr: &str, tls: Option<(&Path, &Path)>) -> Cluster {
        let addr: IpAddr = addr.parse().unwrap();
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "moat", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(&data).unwrap();
            for (from, to, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
                let path = dir.path().join(to);
                std::fs::copy(from, &path).unwrap();
                std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        let port = free_port(addr);
        let mut cluster = Cluster {
            dir,
            addr,
            port,
            child: None,
            bin,
            tls: tls.is_some(),
        };
        cluster.run_server();
        let out = command(&cluster.bin.join("createdb"))
            .args([
                "-h",
                &addr.to_string(),
                "-p",
                &port.to_string(),
                "-U",
                "moat",
                "moat",
            ])
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    /// Starts the server and waits for its own "ready to accept connections" line.
    fn run_server(&mut self) {
        let data = self.dir.path().join("data");
        let mut server = command(&self.bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-h", &self.addr.to_string(), "-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "logging_collector=off", "-c", "fsync=on"]);
        if self.tls {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            server.args([
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", file("server.crt")),
                "-c".to_string(),
                format!("ssl_key_file={}", file("server.key")),
            ]);
        }
        let mut child = server
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to accept connections") {
                    let _ = tx.send(Ok(()));
                }
                log.push(line);
                if log.len() > 50 {
                    log.remove(0);
                }
            }
            let _ = tx.send(Err(log.join("\n")));
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("postgres exited before it was ready:\n{log}"),
            Err(_) => panic!("postgres did not become ready in 60 s"),
        }
        self.child = Some(child);
    }

    /// The `[postgres] url` for this cluster.
    pub fn url(&self) -> String {
        format!("postgresql://moat@{}:{}/moat", self.addr, self.port)
    }

    /// Stops the server (fast shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["stop", "-m", "fast", "-w"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run_server();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
