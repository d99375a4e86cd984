//! The `moat` command. Every subcommand's `--help` is its manual.

#![forbid(unsafe_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use moat::config::Config;

/// Moat: a mail transfer agent built around transport security.
///
/// With no config file, `moat serve` runs an embedded default: SMTP with STARTTLS on
/// 127.0.0.1:2525, implicit TLS on 127.0.0.1:2465, submission (TLS and AUTH required) on
/// 127.0.0.1:2587, a self-signed certificate and a queue made under ./moat-data on first
/// start, and mail for `localhost` delivered to ./moat-data/mail/<mailbox>/new/.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct Source {
    /// Config file (TOML). Without it the embedded default is used; see examples/moat.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (queue, certificates, mailboxes, users); overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl Source {
    fn load(&self) -> Result<Config, String> {
        self.read().map(|(c, _)| c)
    }

    /// [`Source::load`], then the same file checks as `moat config check` (after the data dir
    /// override, which relative paths depend on). The embedded default names no files.
    fn load_checked(&self) -> Result<Config, String> {
        let (c, src) = self.read()?;
        if let Some(path) = &self.config {
            c.check_files(&src, &path.display().to_string())
                .map_err(|e| e.to_string())?;
        }
        Ok(c)
    }

    /// The config and its file's text (empty for the embedded default).
    fn read(&self) -> Result<(Config, String), String> {
        match &self.config {
            Some(path) => {
                let (mut c, src) = Config::read(path).map_err(|e| e.to_string())?;
                if let Some(d) = &self.data_dir {
                    c.data_dir = d.clone();
                }
                Ok((c, src))
            }
            None => Ok((
                Config::embedded_default(self.data_dir.clone()),
                String::new(),
            )),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the mail server (listeners, queue, delivery) until SIGTERM or SIGINT.
    ///
    /// SIGHUP reloads the TLS certificates; they are also reloaded when their files change.
    Serve(Source),
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage SMTP AUTH users (stored as argon2 hashes in the users file).
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect and act on the running server's queue (through its local admin socket).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Show the running server's health and headline figures: uptime, queue, last 24 hours
    /// of deliveries by TLS version and authentication, certificates near expiry.
    ///
    /// Asks the admin API (`[admin] listen`) with the token from the data dir. Exit status 1
    /// when the server cannot be reached or reports a problem.
    Status {
        #[command(flatten)]
        source: Source,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Test whether an SMTP server offers TLS with a certificate that verifies.
    ///
    /// Connects to HOST (each of its addresses in turn until one answers), reads the banner,
    /// sends EHLO, STARTTLS and, after the handshake, EHLO again, then QUIT; prints the
    /// transcript, the TLS version, cipher and key exchange, every certificate the server
    /// presented (subject, names, issuer, validity, key), whether the chain leads to a trusted
    /// root and the certificate is valid for the expected name, and a verdict: PASS, or FAIL
    /// with a cause per problem (connection refused or timed out, STARTTLS not offered,
    /// handshake failure, expired, not yet valid, untrusted issuer, wrong name). WARN lines
    /// flag a certificate expiring within 21 days, no TLS 1.3, no PIPELINING and AUTH offered
    /// before TLS. Bytes a server sends after its 220 to STARTTLS are reported and discarded.
    ///
    /// HOST is the server itself (an MX host), not a mail domain: MX records are not looked
    /// up. Trusted roots are the system's CA certificates plus --ca-file. Revocation is not
    /// checked.
    #[command(after_long_help = PROBE_EXAMPLES)]
    Probe(ProbeArgs),
    /// MTA-STS (RFC 8461) for domain owners: write a policy and its DNS records, or check a
    /// domain's whole setup as a sending server sees it.
    #[command(subcommand)]
    Sts(StsCommand),
    /// Check a domain's receiving side as a sending server sees it: MX, MTA-STS (TXT, policy
    /// fetch, syntax, MX coverage), each MX host's STARTTLS certificate, the TLS-RPT record,
    /// and with --dane the DNSSEC state and each host's TLSA records. The same as
    /// `moat sts check`.
    Check(CheckArgs),
    /// DANE (RFC 7672) for our own domains.
    #[command(subcommand)]
    Dane(DaneCommand),
    /// TLS-RPT (RFC 8460): the reports other organisations send about our domains.
    #[command(subcommand)]
    Tlsrpt(TlsrptCommand),
    /// DKIM (RFC 6376, RFC 8463): the key that signs the TLS-RPT reports Moat sends.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// The shared queue database (`[queue] store = "postgres"`).
    #[command(subcommand)]
    Db(DbCommand),
    /// Explain the outbound TLS decision for one recipient: run the real lookups (routes, MX,
    /// MTA-STS, DNSSEC, TLSA) and the real decision under the config, and print per MX host
    /// the requirement and every reason behind it, and what happens if the host refuses
    /// STARTTLS. Nothing is sent.
    Explain {
        /// The recipient address.
        address: String,
        /// The sender (sender-domain rules may apply).
        #[arg(long, default_value = "")]
        from: String,
        /// Decide for a message sent with REQUIRETLS (RFC 8689): only hosts authenticated
        /// by DANE or MTA-STS enforce may take it.
        #[arg(long)]
        requiretls: bool,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Debug, Subcommand)]
enum TlsrptCommand {
    /// Print what the running server has recorded of its own outbound TLS sessions for one
    /// UTC day, per policy (sts, tlsa, no-policy-found) and policy domain: successful and
    /// failed sessions and the failure details, i.e. what the reports it sends will say.
    Results {
        /// `YYYY-MM-DD`, `today` or `yesterday` (UTC).
        #[arg(long, default_value = "today")]
        day: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: Source,
    },
    /// Make the reports for one UTC day now (default yesterday), for the policy domains not
    /// yet reported for it, whatever the hour: each domain's `_smtp._tls` record is looked
    /// up and the report mailed (DKIM-signed, through the queue) or POSTed. Prints what
    /// became of each. Works whether or not `[tls_rpt] send_reports` is on.
    Send {
        /// `YYYY-MM-DD`, `today` or `yesterday` (UTC).
        #[arg(long, default_value = "yesterday")]
        day: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: Source,
    },
    /// Print TLS-RPT aggregate reports: from files (a whole report mail as saved from a
    /// mailbox: multipart/report, gzip or JSON parts, base64 or not; a `.json.gz` attachment;
    /// plain JSON), or with --days the ones received at `[tls_rpt] report_addresses` in the
    /// last N days (from the data dir). Reports are read leniently; what cannot be read is
    /// said. Exit status 1 when a file holds no readable report.
    Show {
        /// Files to read.
        #[arg(value_name = "FILE", required_unless_present = "days")]
        files: Vec<PathBuf>,
        /// The reports received in the last N days instead of files.
        #[arg(long, value_name = "N", conflicts_with = "files")]
        days: Option<u64>,
        /// Print the normalised reports as JSON (one document: a list of files or mails).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Create the schema in an empty database (the same as migrate; `moat serve` also does
    /// it at start).
    Init(Source),
    /// Bring the schema up to this version of Moat; refuses a database whose schema is newer.
    Migrate(Source),
    /// Print the schema version, the cluster's nodes with their last heartbeat and leased
    /// messages, and the queue's size.
    Status {
        #[command(flatten)]
        source: Source,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DkimCommand {
    /// Make a DKIM signing key: write the private key (PKCS#8 PEM, mode 0600) to FILE, print
    /// the TXT record to publish at `SELECTOR._domainkey.DOMAIN` (`s=tlsrpt`: the key signs
    /// TLS reports only, RFC 8460 §3), and on standard error the `[tls_rpt]` settings that
    /// use it. An existing FILE is kept unless --force.
    #[command(
        after_long_help = "Example:\n  moat dkim generate --domain example.com --selector tlsrpt1 --out /etc/moat/dkim.pem"
    )]
    Generate {
        /// The signing domain (`d=`), usually the mail domain the reports come from.
        #[arg(long)]
        domain: String,
        /// The selector (`s=`): a new one for each new key, so the old record can stay until
        /// mail signed with the old key has been delivered.
        #[arg(long)]
        selector: String,
        /// RSA (2048 bits) is verified everywhere; Ed25519 (RFC 8463) is small but not yet by
        /// every receiver.
        #[arg(long, value_enum, default_value_t = DkimKeyType::Rsa)]
        key_type: DkimKeyType,
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DkimKeyType {
    Rsa,
    Ed25519,
}

#[derive(Debug, Subcommand)]
enum DaneCommand {
    /// Print the TLSA records to publish for the certificates Moat serves on its SMTP
    /// listeners (`3 1 1` for each certificate's key, `2 1 1` for its issuing CA when the
    /// file holds it), under `_25._tcp.<name>` for every name the certificate covers; then
    /// look up what DNS publishes now (DNSSEC-validated, through `[outbound] nameservers`)
    /// and warn when the certificate on disk no longer matches it; and the rollover steps.
    /// Exit status 1 when a published record set does not match.
    Tlsa {
        #[command(flatten)]
        source: Source,
        /// The port the records are for (25; a test world may use another).
        #[arg(long, default_value_t = 25)]
        port: u16,
        /// Do not look anything up in DNS.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StsCommand {
    /// Print a policy file, the `_mta-sts` TXT record with a fresh id (UTC now, as
    /// yyyymmddhhmmssZ), a suggested TLS-RPT record, and the steps to publish them and to move
    /// from testing to enforce.
    ///
    /// Run it again whenever the policy changes: senders refetch a policy only when the TXT
    /// id changes.
    #[command(
        after_long_help = "Example:\n  moat sts generate --domain example.com --mx mx1.example.com --mx '*.mail.example.com'"
    )]
    Generate {
        /// The mail domain.
        #[arg(long)]
        domain: String,
        /// An MX host name or `*.suffix` pattern (a `*` covers exactly one label); repeat for
        /// each.
        #[arg(long, required = true, value_name = "PATTERN")]
        mx: Vec<String>,
        /// `testing` (deliver and report) first, `enforce` once reports are clean, or `none` to
        /// withdraw.
        #[arg(long, default_value = "testing")]
        mode: String,
        /// Seconds senders may cache the policy (at most 31557600).
        #[arg(long, default_value_t = moat::sts::generate::DEFAULT_MAX_AGE)]
        max_age: u32,
        /// Where TLS reports go (`mailto:` or `https:` URI); default mailto:tlsrpt@DOMAIN.
        #[arg(long, value_name = "URI")]
        rua: Option<String>,
    },
    /// Check DOMAIN's MTA-STS setup: the TXT record (syntax, exactly one), the policy fetch
    /// (certificate, status, content type, redirects, size, time), the policy's syntax, that
    /// every MX host is covered by an mx pattern, and each MX host's STARTTLS certificate.
    ///
    /// Prints one PASS/WARN/FAIL line per finding, with the fix under each problem. Exit status
    /// 0 when nothing failed (warnings allowed), 1 otherwise.
    #[command(
        after_long_help = "Examples:\n  moat sts check example.com\n  moat sts check example.com --json"
    )]
    Check(CheckArgs),
}

/// `moat check` / `moat sts check` arguments.
#[derive(Debug, Args)]
struct CheckArgs {
    /// The mail domain.
    domain: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Ask this DNS server (IP:PORT) instead of the system resolver.
    #[arg(long, value_name = "ADDR")]
    nameserver: Option<std::net::SocketAddr>,
    /// HTTPS port of the policy host.
    #[arg(long, default_value_t = 443)]
    policy_port: u16,
    /// SMTP port of the MX hosts.
    #[arg(long, default_value_t = 25)]
    smtp_port: u16,
    /// Also trust the CA certificates in this PEM file.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Limit for each network step, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Also check DNSSEC and DANE: the MX records' DNSSEC state, and each MX host's TLSA
    /// records against the certificate it presents.
    #[arg(long)]
    dane: bool,
    /// DNSKEY records to validate from (with --dane) instead of the root's trust anchors.
    #[arg(long, value_name = "FILE", requires = "dane")]
    trust_anchor: Option<PathBuf>,
    /// Trust the AD bit of the nameserver (a validating resolver on this host) instead of
    /// validating here, as `[dane] resolver_validates = true` does.
    #[arg(long, requires = "dane", conflicts_with = "trust_anchor")]
    resolver_validates: bool,
}

const PROBE_EXAMPLES: &str = "\
Examples:
  moat probe mx.example.com
  moat probe mx.example.com --json
  moat probe 192.0.2.1 --name mx.example.com
  moat probe smtp.example.com --implicit-tls              (port 465)
  moat probe '[2001:db8::25]:2525' --ca-file private-ca.pem --timeout 10

Exit status: 0 when TLS works and the certificate verifies for the name (warnings
allowed), 1 when the probe found a failure, 2 for a usage error.";

/// `moat probe` arguments.
#[derive(Debug, Args)]
struct ProbeArgs {
    /// The server: a host name or IP address, with an optional port (default 25, or 465
    /// with --implicit-tls). An IPv6 address with a port goes in brackets: [::1]:2525.
    #[arg(value_name = "HOST[:PORT]")]
    target: String,
    /// TLS from the first byte (RFC 8314, port 465) instead of STARTTLS.
    #[arg(long)]
    implicit_tls: bool,
    /// The name the certificate must be valid for (default HOST; without it an IP address
    /// skips the name check). Also sent as SNI when HOST is an IP address.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print the report as JSON (one object: every step, the chain, warnings, failures and
    /// the verdict) instead of text.
    #[arg(long)]
    json: bool,
    /// Limit for each step (resolving, connecting, each reply, the handshake); the whole
    /// probe stops after four times this.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Also trust the CA certificates in this PEM file (a private CA, a test CA).
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// The name to send with EHLO (default: this host's name if fully qualified, else
    /// moat-probe.invalid).
    #[arg(long, value_name = "NAME")]
    helo: Option<String>,
    /// DANE (RFC 7672): look up the TLSA records of `_PORT._tcp.NAME` (NAME: --name, else
    /// HOST) with DNSSEC validation, show each record with whether SMTP can use it and
    /// whether it matches the presented chain, and judge the certificate by them when they
    /// apply (as a DANE sender would: the CA check is then only reported).
    #[arg(long)]
    dane: bool,
    /// The DNS server for --dane lookups (default: the system's).
    #[arg(long, value_name = "IP:PORT", requires = "dane")]
    nameserver: Option<std::net::SocketAddr>,
    /// DNSKEY records to validate from instead of the root's built-in trust anchors.
    #[arg(long, value_name = "FILE", requires = "dane")]
    trust_anchor: Option<PathBuf>,
    /// Trust the AD bit of the nameserver (a validating resolver on this host) instead of
    /// validating here, as `[dane] resolver_validates = true` does.
    #[arg(long, requires = "dane", conflicts_with = "trust_anchor")]
    resolver_validates: bool,
}

/// Which messages a queue action applies to.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// One message, by queue id.
    id: Option<String>,
    /// Every message with a recipient in DOMAIN.
    #[arg(long)]
    domain: Option<String>,
    /// Every queued message.
    #[arg(long)]
    all: bool,
}

impl Selection {
    fn words(&self) -> String {
        match (&self.id, &self.domain) {
            (Some(id), _) => format!("id {id}"),
            (None, Some(d)) => format!("domain {d}"),
            _ => "all".into(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// List queued messages with each recipient's state, next attempt and last cause.
    List {
        /// Only messages with a recipient in DOMAIN.
        #[arg(long)]
        domain: Option<String>,
        /// Only messages with a recipient in STATE: pending, deferred, delivered, failed.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        source: Source,
    },
    /// Print the number of queued messages, and nothing else (for scripts and monitoring).
    Count {
        #[command(flatten)]
        source: Source,
    },
    /// Show one message: recipients, causes, route and TLS policy per domain, header.
    Show {
        id: String,
        #[command(flatten)]
        source: Source,
    },
    /// Make deferred recipients due now (e.g. after the far side fixed its certificate).
    Retry {
        #[command(flatten)]
        which: Selection,
        #[command(flatten)]
        source: Source,
    },
    /// Remove messages from the queue without notifying anyone.
    Delete {
        #[command(flatten)]
        which: Selection,
        #[command(flatten)]
        source: Source,
    },
    /// Fail every undelivered recipient now and send the sender a bounce (DSN).
    Bounce {
        #[command(flatten)]
        which: Selection,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Parse and validate FILE as `moat serve` would use it: syntax and types, values and
    /// limits, sockets that would collide, and the files it names (certificates and keys that
    /// parse and belong together, CA files, relay password files). Errors name the key and
    /// the line. Exits 1 on error.
    Check {
        /// The config file to check.
        file: PathBuf,
        /// Check the file alone, not the files it names (a config shipped before its
        /// certificates are in place).
        #[arg(long)]
        syntax_only: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add NAME, or change its password. The password is read from the first line of stdin.
    ///
    /// Example: `echo 's3cret' | moat user add alice`
    Add {
        /// User name as given in AUTH (no spaces or colons).
        name: String,
        #[command(flatten)]
        source: Source,
    },
    /// Remove NAME.
    Remove {
        name: String,
        #[command(flatten)]
        source: Source,
    },
    /// List user names.
    List {
        #[command(flatten)]
        source: Source,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a probe: exit status 0 (pass), 1 (a failure found) or 2 (bad arguments).
fn probe(args: ProbeArgs) -> ExitCode {
    let usage = |e: String| {
        eprintln!("moat probe: {e}");
        ExitCode::from(2)
    };
    let mut opts = match moat::probe::ProbeOptions::new(&args.target, args.implicit_tls) {
        Ok(o) => o,
        Err(e) => return usage(e),
    };
    if let Some(name) = &args.name {
        if rustls_pki_types::ServerName::try_from(name.trim_end_matches('.').to_string()).is_err() {
            return usage(format!("--name {name:?} is not a host name or IP address"));
        }
        opts.name = Some(name.clone());
    }
    if let Some(helo) = args.helo {
        if helo.is_empty() || helo.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return usage(format!(
                "--helo {helo:?}: one word without spaces is needed"
            ));
        }
        opts.helo = helo;
    }
    if let Some(path) = &args.ca_file {
        match moat::tls::load_roots(path) {
            Ok(roots) => opts.extra_roots = Some(roots),
            Err(e) => return usage(format!("--ca-file: {e}")),
        }
    }
    opts.step_timeout = std::time::Duration::from_secs(args.timeout);
    let runtime = match client_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("moat probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        if args.dane {
            let anchors = args.trust_anchor.as_deref();
            let limit = std::time::Duration::from_secs(args.timeout.min(10));
            let v = cli_validator(args.nameserver, limit, anchors, args.resolver_validates);
            opts.dane = Some(v.map_err(|e| format!("--dane: {e}"))?);
        }
        Ok::<_, String>(moat::probe::probe(&opts).await)
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("moat probe: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `moat tlsrpt show --days N`: the reports received in the last N days.
fn tlsrpt_received(source: &Source, days: u64, json: bool) -> Result<(), String> {
    let config = source.load()?;
    let dir = config.data_dir.join("tlsrpt").join("received");
    let stored = moat::tlsrpt::store::list_dir(&dir, moat::util::unix_now(), days.max(1));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&stored).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    if stored.is_empty() {
        println!(
            "no TLS-RPT reports received in the last {days} day(s) (in {})",
            dir.display()
        );
        return Ok(());
    }
    for s in &stored {
        println!(
            "{} received {} from {}{}:",
            s.queue_id,
            moat::util::utc_minutes(s.received),
            if s.sender.is_empty() { "<>" } else { &s.sender },
            s.report_domain
                .as_deref()
                .map(|d| format!(" about {d}"))
                .unwrap_or_default()
        );
        for r in &s.reports {
            print!("{}", moat::tlsrpt::render(r));
        }
        for p in &s.problems {
            println!("  problem: {p}");
        }
    }
    Ok(())
}

/// `moat tlsrpt show`: exit status 0 when every file held a readable report, else 1.
fn tlsrpt_show(files: &[PathBuf], json: bool) -> Result<(), String> {
    let mut all_ok = true;
    let mut docs = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let found = moat::tlsrpt::mail::reports_in_message(&bytes);
        all_ok &= !found.reports.is_empty();
        if json {
            docs.push(serde_json::json!({
                "file": f.display().to_string(),
                "report_domain": found.report_domain,
                "submitter": found.submitter,
                "reports": found.reports,
                "problems": found.problems,
            }));
            continue;
        }
        println!("{}:", f.display());
        for r in &found.reports {
            print!("{}", moat::tlsrpt::render(r));
        }
        for p in &found.problems {
            println!("  problem: {p}");
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&docs).map_err(|e| e.to_string())?
        );
    }
    if all_ok {
        Ok(())
    } else {
        Err("no readable report in some of the files".into())
    }
}

/// The validator of `--dane`: own validation (from `anchors`, else the root), or the AD bit of
/// the nameserver; through `nameserver`, else the system's.
fn cli_validator(
    nameserver: Option<std::net::SocketAddr>,
    limit: std::time::Duration,
    anchors: Option<&std::path::Path>,
    resolver_validates: bool,
) -> Result<moat::dns::Validator, moat::dns::DnsError> {
    match (nameserver, resolver_validates) {
        (Some(ns), true) => moat::dns::Validator::trusting(&[ns], limit, 1),
        (None, true) => moat::dns::Validator::trusting_system(),
        (Some(ns), false) => moat::dns::Validator::new(&[ns], limit, 1, anchors),
        (None, false) => moat::dns::Validator::system(anchors),
    }
}

/// `moat check` / `moat sts check`: exit status 0 (no failure), 1 (a failure found) or 2 (bad
/// arguments).
fn sts_check(cmd: CheckArgs) -> ExitCode {
    let CheckArgs {
        domain,
        json,
        nameserver,
        policy_port,
        smtp_port,
        ca_file,
        timeout,
        dane,
        trust_anchor,
        resolver_validates,
    } = cmd;
    let usage = |e: String| {
        eprintln!("moat sts check: {e}");
        ExitCode::from(2)
    };
    let extra_roots = match &ca_file {
        Some(p) => match moat::tls::load_roots(p) {
            Ok(r) => Some(r),
            Err(e) => return usage(format!("--ca-file: {e}")),
        },
        None => None,
    };
    let runtime = match client_runtime() {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let report = runtime.block_on(async {
        let resolver = match nameserver {
            Some(ns) => moat::dns::Resolver::with_nameservers_timeout(
                &[ns],
                std::time::Duration::from_secs(timeout.clamp(1, 10)),
                1,
            ),
            None => moat::dns::Resolver::system(),
        }
        .map_err(|e| e.to_string())?;
        let validator = if dane {
            let limit = std::time::Duration::from_secs(timeout.clamp(1, 10));
            Some(
                cli_validator(
                    nameserver,
                    limit,
                    trust_anchor.as_deref(),
                    resolver_validates,
                )
                .map_err(|e| format!("--dane: {e}"))?,
            )
        } else {
            None
        };
        let opts = moat::sts::check::CheckOptions {
            resolver,
            validator,
            extra_roots,
            policy_port,
            smtp_port,
            timeout: std::time::Duration::from_secs(timeout.max(1)),
        };
        Ok::<_, String>(moat::sts::check::check(&domain, &opts).await)
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => return usage(e.to_string()),
        }
    } else {
        print!("{}", report.render());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The single-threaded runtime of the client commands (probe, sts check, status).
fn client_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// One request to the running server's admin API (`[admin] listen`, with the token from the
/// data dir): the status and body.
fn admin_call(
    source: &Source,
    method: &str,
    path: &str,
    limit: std::time::Duration,
) -> Result<(u16, String), String> {
    let config = source.load()?;
    let addr = config
        .admin
        .listen
        .ok_or("no admin API in this config: set [admin] listen (e.g. \"127.0.0.1:2580\")")?;
    let token_file = moat::admin_api::token_path(&config);
    let token = std::fs::read_to_string(&token_file).map_err(|e| {
        format!(
            "{}: {e} (has moat serve run with this data dir?)",
            token_file.display()
        )
    })?;
    let runtime = client_runtime()?;
    runtime.block_on(moat::admin_api::request(
        addr,
        method,
        path,
        token.trim(),
        limit,
    ))
}

fn status(source: &Source, json: bool) -> Result<(), String> {
    let (code, body) = admin_call(
        source,
        "GET",
        "/api/health",
        std::time::Duration::from_secs(10),
    )?;
    if code != 200 {
        return Err(format!("the admin API answered {code}: {}", body.trim()));
    }
    let health: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("bad answer from the admin API: {e}"))?;
    if json {
        println!("{body}");
    } else {
        print!("{}", moat::admin_api::render_status(&health));
    }
    match health["status"].as_str() {
        Some("ok") => Ok(()),
        other => Err(format!("status {}", other.unwrap_or("unknown"))),
    }
}

/// `moat tlsrpt results|send`: one admin API call, its answer as text or JSON.
fn tlsrpt_admin(source: &Source, method: &str, path: &str, json: bool) -> Result<(), String> {
    let (code, body) = admin_call(source, method, path, std::time::Duration::from_secs(60))?;
    if code != 200 {
        return Err(format!("the admin API answered {code}: {}", body.trim()));
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("bad answer from the admin API: {e}"))?;
    print!("{}", moat::tlsrpt::render_admin(&v));
    Ok(())
}

/// `moat db`: the PostgreSQL queue store's schema and cluster.
fn db(cmd: DbCommand) -> Result<(), String> {
    use moat::queue::pg;
    let (source, migrate, json) = match &cmd {
        DbCommand::Init(s) | DbCommand::Migrate(s) => (s, true, false),
        DbCommand::Status { source, json } => (source, false, *json),
    };
    let config = source.load()?;
    if config.postgres.url.trim().is_empty() {
        return Err("no [postgres] url in the config".into());
    }
    let runtime = client_runtime()?;
    runtime.block_on(async {
        let (pool, target) = pg::pool(&config)?;
        if migrate {
            let (from, to) = pg::migrate(&pool)
                .await
                .map_err(|e| format!("{target}: {e}"))?;
            if from == to {
                println!("{target}: schema version {to}, up to date");
            } else {
                println!("{target}: schema migrated from version {from} to {to}");
            }
            return Ok(());
        }
        let version = pg::schema_version(&pool)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        if version == 0 {
            return Err(format!("{target}: no Moat schema yet (run `moat db init`)"));
        }
        let nodes = pg::nodes(&pool)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        let queued = pg::queued(&pool)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        if json {
            let v = serde_json::json!({
                "database": target,
                "schema_version": version,
                "this_version": pg::SCHEMA_VERSION,
                "queued_messages": queued,
                "nodes": nodes,
            });
            println!("{v:#}");
            return Ok(());
        }
        println!(
            "{target}: schema version {version} (this Moat: {}), {queued} queued message(s)",
            pg::SCHEMA_VERSION
        );
        for n in &nodes {
            println!(
                "  node {}  version {}  last heartbeat {} ago  {} leased",
                n.id,
                n.version,
                moat::util::human_duration(n.heartbeat_age_secs.max(0) as u64),
                n.leased
            );
        }
        Ok(())
    })
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(source) => {
            init_logging(cli.log_format);
            let config = source.load_checked()?;
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if config.worker_threads > 0 {
                builder.worker_threads(config.worker_threads);
            }
            let runtime = builder
                .enable_all()
                .build()
                .map_err(|e| format!("starting the runtime: {e}"))?;
            runtime.block_on(moat::server::serve(config))
        }
        Command::Config(ConfigCommand::Check { file, syntax_only }) => {
            let c = if syntax_only {
                Config::load(&file)
            } else {
                Config::load_checked(&file)
            }
            .map_err(|e| e.to_string())?;
            println!(
                "{}: OK ({} listener(s), {} domain(s), {} certificate(s){})",
                file.display(),
                c.listeners.len(),
                c.domains.len(),
                c.tls.certificates.len(),
                if c.tls.certificates.is_empty() {
                    ", self-signed on first start"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::User(cmd) => user(cmd),
        Command::Queue(cmd) => queue(cmd),
        Command::Status { source, json } => status(&source, json),
        Command::Tlsrpt(TlsrptCommand::Show {
            files,
            days: Some(days),
            json,
            source,
        }) if files.is_empty() => tlsrpt_received(&source, days, json),
        Command::Tlsrpt(TlsrptCommand::Show { files, json, .. }) => tlsrpt_show(&files, json),
        Command::Db(cmd) => db(cmd),
        Command::Dkim(DkimCommand::Generate {
            domain,
            selector,
            key_type,
            out,
            force,
        }) => dkim_generate(&domain, &selector, key_type, &out, force),
        Command::Tlsrpt(TlsrptCommand::Results { day, json, source }) => tlsrpt_admin(
            &source,
            "GET",
            &format!("/api/tlsrpt/results?day={day}"),
            json,
        ),
        Command::Tlsrpt(TlsrptCommand::Send { day, json, source }) => tlsrpt_admin(
            &source,
            "POST",
            &format!("/api/tlsrpt/send?day={day}"),
            json,
        ),
        Command::Dane(DaneCommand::Tlsa {
            source,
            port,
            offline,
        }) => {
            let (config, _) = source.read()?;
            let files = moat::server::certificate_files(&config)?;
            let certs = files
                .iter()
                .map(|(cert, _)| moat::dane::publish::for_chain_file(cert))
                .collect::<Result<Vec<_>, _>>()?;
            let runtime = client_runtime()?;
            let (text, ok) = runtime.block_on(async {
                let validator = if offline {
                    None
                } else {
                    moat::dane::validator(&config).ok()
                };
                moat::dane::publish::report(&certs, port, validator.as_ref()).await
            });
            print!("{text}");
            if ok {
                Ok(())
            } else {
                Err("a published TLSA record set does not match the certificate on disk".into())
            }
        }
        Command::Explain {
            address,
            from,
            requiretls,
            source,
        } => {
            let (config, _) = source.read()?;
            let runtime = client_runtime()?;
            let text =
                runtime.block_on(moat::explain::explain(&config, &address, &from, requiretls))?;
            print!("{text}");
            Ok(())
        }
        // Handled in `main`: they have their own exit statuses.
        Command::Probe(_) | Command::Sts(StsCommand::Check(_)) | Command::Check(_) => Ok(()),
        Command::Sts(StsCommand::Generate {
            domain,
            mx,
            mode,
            max_age,
            rua,
        }) => {
            let mode: moat::sts::policy::Mode = mode.parse().map_err(|e| format!("--mode: {e}"))?;
            let g = moat::sts::generate::generate(
                &domain,
                &mx,
                mode,
                max_age,
                moat::util::unix_now(),
                rua.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            print!("{}", moat::sts::generate::render(&g, &domain));
            Ok(())
        }
    }
}

/// `moat dkim generate`: the key to FILE (created 0600; replaced only with --force), the
/// record on stdout, the config hint on stderr.
fn dkim_generate(
    domain: &str,
    selector: &str,
    key_type: DkimKeyType,
    out: &std::path::Path,
    force: bool,
) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    moat::dkim::check_names(domain, selector)?;
    let kind = match key_type {
        DkimKeyType::Rsa => moat::dkim::KeyType::Rsa,
        DkimKeyType::Ed25519 => moat::dkim::KeyType::Ed25519,
    };
    let (pem, p) = moat::dkim::generate(kind)?;
    let fail = |e: std::io::Error| format!("{}: {e}", out.display());
    if force {
        // Removed first so that the new file is created 0600 whatever the old one's mode.
        match std::fs::remove_file(out) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists and is kept (--force replaces it; then publish the new record too)",
                    out.display()
                )
            } else {
                fail(e)
            }
        })?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(fail)?;
    println!("{}", moat::dkim::dns_record(selector, domain, kind, &p));
    let path = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    eprintln!(
        "moat: key written; in the config: [tls_rpt] dkim_key = \"{}\", dkim_selector = \"{selector}\", dkim_domain = \"{}\"",
        path.display(),
        domain.trim_end_matches('.')
    );
    Ok(())
}

fn queue(cmd: QueueCommand) -> Result<(), String> {
    let (source, line) = match &cmd {
        QueueCommand::List {
            domain,
            state,
            source,
        } => {
            let mut line = "list".to_string();
            if let Some(d) = domain {
                line.push_str(&format!(" domain={d}"));
            }
            if let Some(s) = state {
                line.push_str(&format!(" state={s}"));
            }
            (source, line)
        }
        QueueCommand::Count { source } => (source, "count".to_string()),
        QueueCommand::Show { id, source } => (source, format!("show {id}")),
        QueueCommand::Retry { which, source } => (source, format!("retry {}", which.words())),
        QueueCommand::Delete { which, source } => (source, format!("delete {}", which.words())),
        QueueCommand::Bounce { which, source } => (source, format!("bounce {}", which.words())),
    };
    if line.contains(['\n', '\r']) {
        return Err("arguments may not contain line breaks".into());
    }
    let config = source.load()?;
    let path = config.data_dir.join(moat::queue::admin::SOCKET);
    let body = moat::queue::admin::request(&path, &line)?;
    print!("{body}");
    Ok(())
}

fn user(cmd: UserCommand) -> Result<(), String> {
    use moat::inbound::auth::{hash_password, read_users, valid_username, write_users};
    let (source, name) = match &cmd {
        UserCommand::Add { name, source } | UserCommand::Remove { name, source } => {
            (source, Some(name.clone()))
        }
        UserCommand::List { source } => (source, None),
    };
    let config = source.load()?;
    let path = config.data_path(&config.auth.users_file);
    let mut users = read_users(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    match cmd {
        UserCommand::Add { .. } => {
            let name = name.unwrap_or_default();
            if !valid_username(&name) {
                return Err(format!(
                    "`{name}` is not a valid user name (no spaces, colons or control characters)"
                ));
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("reading the password: {e}"))?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err("empty password: give it on the first line of stdin".into());
            }
            let hash = hash_password(password)?;
            let existed = users.iter().any(|(u, _)| *u == name);
            users.retain(|(u, _)| *u != name);
            users.push((name.clone(), hash));
            write_users(&path, &users)?;
            println!(
                "{} {name} in {}",
                if existed { "updated" } else { "added" },
                path.display()
            );
        }
        UserCommand::Remove { .. } => {
            let name = name.unwrap_or_default();
            let before = users.len();
            users.retain(|(u, _)| *u != name);
            if users.len() == before {
                return Err(format!("no user `{name}` in {}", path.display()));
            }
            write_users(&path, &users)?;
            println!("removed {name} from {}", path.display());
        }
        UserCommand::List { .. } => {
            for (u, _) in &users {
                println!("{u}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli {
            command: Command::Probe(args),
            ..
        } => return probe(args),
        Cli {
            command: Command::Sts(StsCommand::Check(args)) | Command::Check(args),
            ..
        } => return sts_check(args),
        cli => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e}");
            ExitCode::FAILURE
        }
    }
}
