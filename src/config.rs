//! Typed configuration: parsed once from TOML (`deny_unknown_fields`), defaults filled in,
//! then validated with errors that name the key and the line.
//!
//! With no file at all, [`Config::embedded_default`] gives the "just run it" setup: loopback
//! listeners on high ports, a self-signed certificate and local Maildir delivery for `localhost`.

use crate::domain::{Domain, DomainPattern};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::smtp::data::BareNewline;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name used in the banner, EHLO reply, Received headers and the self-signed certificate.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Where the spool, generated certificate, mailboxes and users file live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Threads running sessions and deliveries; 0 (the default) means one per CPU core.
    #[serde(default)]
    pub worker_threads: usize,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainConfig>,
    #[serde(default, rename = "inbound_rule")]
    pub inbound_rules: Vec<InboundRule>,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default, rename = "tls_policy")]
    pub tls_policies: Vec<TlsPolicyConfig>,
    #[serde(default)]
    pub mta_sts: MtaStsConfig,
    #[serde(default)]
    pub dane: DaneConfig,
    #[serde(default)]
    pub tls_rpt: TlsRptConfig,
    /// The shared queue store, with `[queue] store = "postgres"`.
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The file this config was read from (set by [`Config::load`]; used by reload).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The admin listener: HTTP+JSON API, `/metrics` and the report page. Every request needs the
/// token (`Authorization: Bearer …`, or `?token=` for a browser).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; none = no admin listener. Loopback only unless `allow_remote`.
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback `listen` address (the token is still required).
    pub allow_remote: bool,
    /// The token file; default `<data_dir>/admin.token`, made (mode 0600) on first start.
    pub token_file: Option<PathBuf>,
}

/// MTA-STS (RFC 8461): honouring recipient domains' policies when sending, and hosting
/// policies for our own domains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look up and apply recipient domains' policies when delivering by MX.
    pub enabled: bool,
    /// HTTPS port of the policy hosts `mta-sts.<domain>` (443; tests use a high port).
    pub fetch_port: u16,
    /// Limit for one policy fetch (RFC 8461 asks senders to allow about a minute).
    pub fetch_timeout_secs: u64,
    /// Extra trusted CA certificates (PEM) for policy hosts and for MX certificates checked
    /// under a policy, in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// How often cached policies past half their max_age are refreshed in the background.
    pub refresh_interval_secs: u64,
    /// Addresses the built-in policy host listens on (HTTPS); empty: no policy host.
    pub listen: Vec<SocketAddr>,
    /// Policies the built-in host publishes, one per domain.
    #[serde(rename = "policy")]
    pub policies: Vec<HostedPolicyConfig>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            fetch_port: 443,
            fetch_timeout_secs: 60,
            ca_file: None,
            refresh_interval_secs: 3600,
            listen: Vec::new(),
            policies: Vec::new(),
        }
    }
}

/// DANE when sending (RFC 7672): DNSSEC validation in-process, TLSA lookups per MX host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaneConfig {
    /// Authenticate MX hosts by their DNSSEC-validated TLSA records when they publish them.
    pub enabled: bool,
    /// DNSKEY records (`NAME TTL IN DNSKEY 257 3 ALG KEY`) to validate from instead of the
    /// root's built-in trust anchors.
    pub trust_anchor_file: Option<PathBuf>,
    /// A name that must validate (its SOA) for DANE to be used: the self-check.
    pub check_secure: String,
    /// A name signed wrongly on purpose that validation must refuse; empty: not checked.
    pub check_bogus: String,
    /// How often the self-check runs.
    pub check_interval_secs: u64,
    /// Trust the AD bit of the configured nameservers instead of validating here (RFC 6840
    /// §5.7): only for a validating resolver on this host (loopback).
    pub resolver_validates: bool,
}

impl Default for DaneConfig {
    fn default() -> Self {
        DaneConfig {
            enabled: true,
            trust_anchor_file: None,
            check_secure: ".".into(),
            check_bogus: "dnssec-failed.org".into(),
            check_interval_secs: 3600,
            resolver_validates: false,
        }
    }
}

/// TLS-RPT (RFC 8460). Receiving: mail to `report_addresses` (the `rua=mailto:` of our
/// domains' `_smtp._tls` records) is read as aggregate reports and kept under
/// `<data_dir>/tlsrpt/received` for `keep_days`; it is accepted whatever the domain's other
/// rules and not delivered further.
///
/// Sending: the results of our own MX sessions are always counted (per UTC day and policy,
/// under `<data_dir>/tlsrpt/results`); with `send_reports` the previous day's are reported
/// after midnight UTC to each policy domain that publishes `_smtp._tls` (RFC 8460 §3), by
/// DKIM-signed mail (`dkim_key`) or HTTPS POST.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsRptConfig {
    pub report_addresses: Vec<String>,
    pub keep_days: u64,
    /// Take reports POSTed to `https://mta-sts.<domain>/tlsrpt` on the policy host's
    /// listeners (`[mta_sts] listen`).
    pub https_endpoint: bool,
    /// Send aggregate reports about our outbound sessions.
    pub send_reports: bool,
    /// Also report days without a failed session (by default only days with one).
    pub send_always: bool,
    /// `organization-name` and `TLS-Report-Submitter` (default: the hostname).
    pub submitter: Option<String>,
    /// `contact-info` (default: `mailto:postmaster@<hostname>`).
    pub contact: Option<String>,
    /// The From and envelope sender of report mails (default: `noreply-tlsrpt@<hostname>`).
    pub from: Option<String>,
    /// PKCS#8 PEM key (RSA or Ed25519) that signs report mails (`moat dkim generate`);
    /// without it no report goes by mail (RFC 8460 §5.3 requires DKIM).
    pub dkim_key: Option<PathBuf>,
    pub dkim_selector: String,
    /// `d=` of the signature (default: the domain of `from`).
    pub dkim_domain: Option<String>,
    /// Reports sent per hour at most, over all domains; the rest wait.
    pub max_reports_per_hour: u32,
    /// Reports are spread over this many seconds after midnight UTC (plus ten minutes).
    pub spread_secs: u64,
    /// Days of recorded results kept.
    pub results_keep_days: u64,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            report_addresses: Vec::new(),
            keep_days: 90,
            https_endpoint: false,
            send_reports: false,
            send_always: false,
            submitter: None,
            contact: None,
            from: None,
            dkim_key: None,
            dkim_selector: "moat".into(),
            dkim_domain: None,
            max_reports_per_hour: 1000,
            spread_secs: 4 * 3600,
            results_keep_days: 8,
        }
    }
}

/// One published policy, served at `https://mta-sts.<domain>/.well-known/mta-sts.txt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedPolicyConfig {
    /// The mail domain (the policy host is `mta-sts.<domain>`).
    pub domain: String,
    /// `testing` (the default), `enforce` or `none`.
    #[serde(default = "default_sts_mode")]
    pub mode: String,
    /// MX patterns; default: the names Moat serves (hostname and its certificates' names).
    #[serde(default)]
    pub mx: Vec<String>,
    /// Seconds senders may cache the policy (default one week, at most 31557600).
    #[serde(default = "default_sts_max_age")]
    pub max_age: u32,
    /// Certificate and key (PEM) for `mta-sts.<domain>`; default: the `[tls]` certificates,
    /// chosen by SNI.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn default_sts_mode() -> String {
    "testing".into()
}

fn default_sts_max_age() -> u32 {
    604_800
}

/// Outbound TLS requirement for recipient domains (docs/ARCHITECTURE.md, "Outbound TLS requirement").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPolicyConfig {
    /// Recipient domains: exact or `*.suffix`.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Sender domains: a message from one of these gets this level for all its recipients.
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// `none`, `may` (the default for everything else), `encrypt` or `verify`.
    pub level: crate::outbound::tls::TlsLevel,
    /// Names the certificate must carry instead of the MX host name (`verify`).
    #[serde(default)]
    pub match_names: Vec<String>,
    /// `sha256:cert:HEX` or `sha256:spki:HEX`; one must match when given.
    #[serde(default)]
    pub pins: Vec<String>,
    /// Extra trusted CA certificates (PEM) for this destination, e.g. a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `"off"` stops DANE for these recipient domains (an emergency switch for a domain
    /// whose TLSA records are wrong; every use is logged). Default `"on"`.
    #[serde(default)]
    pub dane: DaneSwitch,
}

/// A rule's `dane` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DaneSwitch {
    #[default]
    On,
    Off,
}

/// Retry schedule and lifetimes of queued mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Delays between attempts; the last one repeats.
    pub retry_schedule_secs: Vec<u64>,
    /// A message still undelivered after this long is bounced.
    pub max_lifetime_secs: u64,
    /// Shorter lifetime for transport-security failures (TLS required but not available).
    pub security_lifetime_secs: u64,
    /// Deliveries in progress at once.
    pub max_concurrent_deliveries: usize,
    /// Deliveries in progress at once to one destination (domain, or relay host).
    pub max_per_destination: usize,
    /// Send a "still trying" DSN once a recipient has been deferred this long; 0 = never.
    pub delay_warning_secs: u64,
    /// Where queued mail is kept: `embedded` (the journal under the data dir, one node) or
    /// `postgres` (a database several nodes share, see `[postgres]`).
    pub store: StoreKind,
}

/// Which store holds the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Postgres,
}

/// The PostgreSQL store (`[queue] store = "postgres"`): several nodes share one queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgresql://user@host:port/dbname` (or `host=... user=...`); no password in it.
    pub url: String,
    /// File holding the database password (first line), relative to the data dir.
    pub password_file: Option<PathBuf>,
    /// Connections this node keeps open at most.
    pub pool_size: usize,
    /// How long a node's claim on a message lasts unless renewed: a node that dies loses its
    /// messages to the others this long after its last renewal.
    pub lease_secs: u64,
    /// This node's name in the cluster, unique to it (two running nodes must never share
    /// one); default the hostname.
    pub node_id: Option<String>,
    /// Seconds to wait for a connection (pool, connect) before an operation fails.
    pub timeout_secs: u64,
    /// CA certificates (PEM) the database's certificate must chain to when the url says
    /// `sslmode=require`; default the system's. The name is always checked too.
    pub ca_file: Option<PathBuf>,
    /// Seconds between pulls of what other nodes shared (MTA-STS policies): how long a
    /// policy one node fetched takes at most to protect the others.
    pub sync_interval_secs: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            password_file: None,
            pool_size: 16,
            lease_secs: 60,
            node_id: None,
            timeout_secs: 5,
            ca_file: None,
            sync_interval_secs: 10,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_schedule_secs: vec![60, 300, 900, 1800, 3600],
            max_lifetime_secs: 5 * 86_400,
            security_lifetime_secs: 86_400,
            max_concurrent_deliveries: 20,
            max_per_destination: 10,
            delay_warning_secs: 0,
            store: StoreKind::Embedded,
        }
    }
}

/// How Moat connects to other servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// SMTP port used for MX hosts (25; tests use a high port).
    pub port: u16,
    /// DNS servers for MX and address lookups; empty uses the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Name sent in EHLO; default `hostname`.
    pub helo_name: Option<String>,
    pub connect_timeout_secs: u64,
    pub dns_timeout_secs: u64,
    /// With a `[[tls_policy]]` matching some recipients of a message: true delivers only those
    /// under the enforced level and the others opportunistically (the message is split);
    /// false lifts every recipient of that message to the strictest matched level.
    pub opportunistic_for_unmatched: bool,
    /// REQUIRETLS (RFC 8689): a `[[tls_policy]]` rule at `verify` (or with pins) counts as
    /// authenticating a host, as DANE and MTA-STS `enforce` do. Off: only those two count.
    pub requiretls_rules_count: bool,
    /// RFC 8689 `TLS-Required: No` in a message (without REQUIRETLS): deliver it without
    /// applying MTA-STS and DANE (the rules still apply). Off: the header is ignored.
    pub honour_tls_required_no: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            port: 25,
            nameservers: Vec::new(),
            helo_name: None,
            connect_timeout_secs: 30,
            dns_timeout_secs: 5,
            opportunistic_for_unmatched: true,
            requiretls_rules_count: false,
            honour_tls_required_no: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Plain SMTP with STARTTLS offered (port 25).
    Smtp,
    /// Implicit TLS (RFC 8314, port 465).
    Smtps,
    /// Message submission (port 587): TLS and AUTH required unless overridden.
    Submission,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub address: SocketAddr,
    pub mode: ListenerMode,
    /// Default: true for `submission`, false otherwise.
    #[serde(default)]
    pub require_tls: Option<bool>,
    /// Default: true for `submission`, false otherwise.
    #[serde(default)]
    pub require_auth: Option<bool>,
    #[serde(default = "default_bare_newline")]
    pub bare_newline: BareNewline,
    /// Offer SMTP AUTH (always only inside TLS). Default true.
    #[serde(default = "default_true")]
    pub auth: bool,
    /// TLS session resumption (TLS 1.3 tickets, TLS 1.2 session cache). Default false for
    /// `smtp` (Exchange Online aborts STARTTLS with receivers that send tickets), true for
    /// `smtps` and `submission` (mail clients reconnect often).
    #[serde(default)]
    pub tls_session_tickets: Option<bool>,
    /// Offer REQUIRETLS (RFC 8689) inside TLS. Default true; switch it off where mail goes
    /// on to a next hop that cannot be authenticated (it would only bounce).
    #[serde(default = "default_true")]
    pub requiretls: bool,
}

impl ListenerConfig {
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{:?}", self.mode).to_lowercase())
    }
    pub fn requires_tls(&self) -> bool {
        self.require_tls
            .unwrap_or(self.mode == ListenerMode::Submission)
    }
    pub fn session_tickets(&self) -> bool {
        self.tls_session_tickets
            .unwrap_or(self.mode != ListenerMode::Smtp)
    }
    pub fn requires_auth(&self) -> bool {
        self.require_auth
            .unwrap_or(self.mode == ListenerMode::Submission)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chains and keys; the first is the default, the others are chosen by
    /// SNI from the names in each certificate. Empty: a self-signed certificate for
    /// `hostname` is created in the data dir on first start.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
    /// How often certificate files are checked for changes (SIGHUP reloads at once).
    #[serde(default = "default_reload_secs")]
    pub reload_interval_secs: u64,
    /// PEM CA certificates for client certificates. When set, clients are asked for a
    /// certificate (optional; inbound rules may require one) that must chain to these.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: usize,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    pub handshake_timeout_secs: u64,
    pub session_timeout_secs: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub auth_max_failures: u32,
    pub auth_ip_max_failures: u32,
    pub auth_ip_window_secs: u64,
    /// Delay after each failed AUTH, multiplied by the failures so far on the connection.
    pub auth_failure_delay_ms: u64,
    /// How long SIGTERM waits for sessions in flight before exiting.
    pub shutdown_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 2048,
            max_errors: 10,
            command_timeout_secs: 300,
            data_timeout_secs: 600,
            handshake_timeout_secs: 30,
            session_timeout_secs: 3600,
            max_connections: 1000,
            max_connections_per_ip: 50,
            auth_max_failures: 3,
            auth_ip_max_failures: 10,
            auth_ip_window_secs: 900,
            auth_failure_delay_ms: 1000,
            shutdown_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Networks (CIDR) whose clients may relay without AUTH.
    #[serde(default)]
    pub trusted_networks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `name:argon2-hash` lines, managed by `moat user`. Relative to the data dir.
    #[serde(default = "default_users_file")]
    pub users_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: default_users_file(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// Deliver into `<path>/<mailbox>/new/`.
    Maildir,
    /// Accept and drop (for tests, sinks and benchmarks).
    Discard,
    /// Accept and forward to a fixed next hop (`relay = "host:port"`), e.g. an internal server.
    Relay,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    pub route: RouteKind,
    /// Maildir root for `maildir`, relative to the data dir. Default `mail`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Accepted mailbox names for `maildir`; empty accepts any safe name.
    #[serde(default)]
    pub mailboxes: Vec<String>,
    /// Next hop for `relay`: `host:port` or `[ip]:port`.
    #[serde(default)]
    pub relay: Option<String>,
    /// `relay` over implicit TLS (RFC 8314, port 465) instead of STARTTLS.
    #[serde(default)]
    pub relay_implicit_tls: bool,
    /// AUTH user for the relay (smarthost); sent only inside TLS.
    #[serde(default)]
    pub relay_auth_user: Option<String>,
    /// File whose first line is the relay password (kept out of the config file).
    #[serde(default)]
    pub relay_auth_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundRule {
    /// Client networks (CIDR) this rule applies to.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Sender domains (exact or `*.suffix`) this rule applies to.
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// Clients matched by this rule must use TLS before MAIL.
    #[serde(default)]
    pub require_tls: bool,
    /// Clients matched by this rule must present a certificate (chaining to `tls.client_ca`)
    /// issued to this name (subject CN or DNS SAN). Implies `require_tls`.
    #[serde(default)]
    pub client_cert: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_hostname() -> String {
    "localhost".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("moat-data")
}
fn default_bare_newline() -> BareNewline {
    BareNewline::Reject
}
fn default_reload_secs() -> u64 {
    5
}
fn default_users_file() -> PathBuf {
    PathBuf::from("users")
}

/// A configuration error that points at the key (and line, when known).
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// An error about `key` of the `index`-th `[table]` (or a top-level key when `table` is
    /// empty), with the line found in `src`.
    fn at(src: &str, file: &str, table: &str, index: usize, key: &str, message: String) -> Self {
        ConfigError {
            file: file.to_string(),
            line: locate(src, table, index, key),
            key: if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}[{index}].{key}")
            },
            message,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}: {}", self.file, l, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or(format!("bad prefix in `{s}`"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl Config {
    /// The built-in setup used when no config file is given.
    pub fn embedded_default(data_dir: Option<PathBuf>) -> Config {
        let mut c: Config = match toml::from_str(EMBEDDED) {
            Ok(c) => c,
            // The embedded text is a constant checked by a unit test.
            Err(e) => panic!("embedded default config is invalid: {e}"),
        };
        if let Some(d) = data_dir {
            c.data_dir = d;
        }
        c
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::read(path).map(|(c, _)| c)
    }

    /// [`Config::load`], also returning the file's text (for [`Config::check_files`]).
    pub fn read(path: &Path) -> Result<(Config, String), ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            key: "(file)".into(),
            message: e.to_string(),
        })?;
        let mut c = Config::parse(&src, &file)?;
        c.source = Some(path.to_path_buf());
        Ok((c, src))
    }

    /// [`Config::load`], then [`Config::check_files`]: what `moat config check` and `moat serve`
    /// run, so that the check finds what serving would trip on.
    pub fn load_checked(path: &Path) -> Result<Config, ConfigError> {
        let (c, src) = Config::read(path)?;
        c.check_files(&src, &path.display().to_string())?;
        Ok(c)
    }

    /// Checks the files the config names, as `moat serve` would use them: certificate chains
    /// and keys parse and each key matches its certificate, CA files hold certificates, relay
    /// password files are readable and not empty. Each error names the key and line.
    pub fn check_files(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let err = |table: &str, index: usize, key: &str, message: String| {
            ConfigError::at(src, file, table, index, key, message)
        };
        for (i, c) in self.tls.certificates.iter().enumerate() {
            crate::tls::check_pair(&self.data_path(&c.cert), &self.data_path(&c.key))
                .map_err(|m| err("tls.certificate", i, "cert", m))?;
        }
        if let Some(ca) = &self.tls.client_ca {
            crate::tls::load_roots(&self.data_path(ca))
                .map_err(|m| err("tls", 0, "client_ca", m))?;
        }
        for (i, p) in self.tls_policies.iter().enumerate() {
            if let Some(ca) = &p.ca_file {
                crate::tls::load_roots(&self.data_path(ca))
                    .map_err(|m| err("tls_policy", i, "ca_file", m))?;
            }
        }
        if let Some(ca) = &self.mta_sts.ca_file {
            crate::tls::load_roots(&self.data_path(ca))
                .map_err(|m| err("mta_sts", 0, "ca_file", m))?;
        }
        for (i, p) in self.mta_sts.policies.iter().enumerate() {
            if let (Some(c), Some(k)) = (&p.cert, &p.key) {
                crate::tls::check_pair(&self.data_path(c), &self.data_path(k))
                    .map_err(|m| err("mta_sts.policy", i, "cert", m))?;
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            if let Some(f) = &d.relay_auth_password_file {
                let path = self.data_path(f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    err(
                        "domain",
                        i,
                        "relay_auth_password_file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
                if text.lines().next().unwrap_or_default().is_empty() {
                    return Err(err(
                        "domain",
                        i,
                        "relay_auth_password_file",
                        format!("{}: the first line (the password) is empty", path.display()),
                    ));
                }
            }
        }
        if let (StoreKind::Postgres, Some(ca)) = (self.queue.store, &self.postgres.ca_file) {
            crate::tls::load_roots(&self.data_path(ca))
                .map_err(|m| err("postgres", 0, "ca_file", m))?;
        }
        if let (StoreKind::Postgres, Some(f)) = (self.queue.store, &self.postgres.password_file) {
            let path = self.data_path(f);
            std::fs::read_to_string(&path).map_err(|e| {
                err(
                    "postgres",
                    0,
                    "password_file",
                    format!("{}: {e}", path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(src, s.start));
            let raw = e.message().trim().to_string();
            let at = e.span().and_then(|s| key_at(src, s.start));
            let key = raw
                .split('`')
                .nth(1)
                .filter(|_| raw.starts_with("unknown field"))
                .map(|k| match at.as_deref().and_then(|a| a.rsplit_once('.')) {
                    Some((table, _)) => format!("{table}.{k}"),
                    None => k.to_string(),
                })
                .or(at)
                .unwrap_or_else(|| "(syntax)".to_string());
            let message = plain_type_error(&raw);
            ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
            }
        })?;
        config.validate(src, file)?;
        Ok(config)
    }

    fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let err = |table: &str, index: usize, key: &str, message: String| {
            ConfigError::at(src, file, table, index, key, message)
        };
        if !crate::smtp::address::valid_domain(&self.hostname, false)
            || self.hostname.starts_with('[')
        {
            return Err(err(
                "",
                0,
                "hostname",
                format!("`{}` is not a host name", self.hostname),
            ));
        }
        if self.worker_threads > 1024 {
            return Err(err(
                "",
                0,
                "worker_threads",
                format!("{} is more than 1024", self.worker_threads),
            ));
        }
        if self.listeners.is_empty() {
            return Err(err(
                "",
                0,
                "listener",
                "at least one [[listener]] is needed".into(),
            ));
        }
        if self.tls_rpt.https_endpoint && self.mta_sts.listen.is_empty() {
            return Err(err(
                "tls_rpt",
                0,
                "https_endpoint",
                "reports are taken on the MTA-STS policy host: set [mta_sts] listen too".into(),
            ));
        }
        if let Some(a) = &self.tls_rpt.from
            && crate::smtp::address::Address::parse(a, true).is_none_or(|p| p.is_literal())
        {
            return Err(err(
                "tls_rpt",
                0,
                "from",
                format!("{a:?} is not a mail address (local@domain)"),
            ));
        }
        if self.tls_rpt.send_reports
            && let Some(k) = &self.tls_rpt.dkim_key
        {
            let path = self.data_path(k);
            if let Err(e) = crate::dkim::Signer::from_pem_file(&path, "check.invalid", "check") {
                return Err(err("tls_rpt", 0, "dkim_key", e));
            }
        }
        for a in &self.tls_rpt.report_addresses {
            if crate::smtp::address::Address::parse(a, true).is_none_or(|p| p.is_literal()) {
                return Err(err(
                    "tls_rpt",
                    0,
                    "report_addresses",
                    format!("{a:?} is not a mail address (local@domain)"),
                ));
            }
        }
        // Every socket Moat binds, in order; two that overlap cannot both be bound.
        let mut sockets: Vec<(SocketAddr, String, &str, usize, &str)> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            sockets.push((
                l.address,
                format!("listener {}", l.label()),
                "listener",
                i,
                "address",
            ));
        }
        for a in &self.mta_sts.listen {
            sockets.push((*a, "the MTA-STS policy host".into(), "mta_sts", 0, "listen"));
        }
        if let Some(a) = self.admin.listen {
            sockets.push((a, "the admin API".into(), "admin", 0, "listen"));
        }
        for (n, (addr, what, table, index, key)) in sockets.iter().enumerate() {
            if let Some((other, other_what, ..)) = sockets[..n]
                .iter()
                .find(|(o, ..)| sockets_overlap(*o, *addr))
            {
                return Err(err(
                    table,
                    *index,
                    key,
                    if other == addr {
                        format!("{addr} ({what}) is already used by {other_what}")
                    } else {
                        format!(
                            "{addr} ({what}) overlaps {other} ({other_what}): the same port on a wildcard address"
                        )
                    },
                ));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.requires_auth() && !l.requires_tls() && l.mode != ListenerMode::Smtps {
                return Err(err(
                    "listener",
                    i,
                    "require_auth",
                    "AUTH is only accepted inside TLS: set require_tls = true too".into(),
                ));
            }
        }
        for (i, n) in self.relay.trusted_networks.iter().enumerate() {
            n.parse::<IpNet>()
                .map_err(|m| err("relay", 0, "trusted_networks", format!("entry {i}: {m}")))?;
        }
        for (i, d) in self.domains.iter().enumerate() {
            let name =
                Domain::parse(&d.name).map_err(|e| err("domain", i, "name", e.to_string()))?;
            if self.domains[..i]
                .iter()
                .any(|o| Domain::parse(&o.name).is_ok_and(|o| o == name))
            {
                return Err(err(
                    "domain",
                    i,
                    "name",
                    format!("`{}` is configured twice", d.name),
                ));
            }
            for m in &d.mailboxes {
                if crate::smtp::address::mailbox_name(m).as_deref() != Some(m.as_str()) {
                    return Err(err(
                        "domain",
                        i,
                        "mailboxes",
                        format!("`{m}` is not a valid lowercase mailbox name"),
                    ));
                }
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            match (d.route, &d.relay) {
                (RouteKind::Relay, None) => {
                    return Err(err(
                        "domain",
                        i,
                        "relay",
                        "route = \"relay\" needs relay = \"host:port\"".into(),
                    ));
                }
                (RouteKind::Relay, Some(hop)) if parse_hop(hop).is_none() => {
                    return Err(err(
                        "domain",
                        i,
                        "relay",
                        format!("`{hop}` is not host:port"),
                    ));
                }
                _ if d.relay_auth_user.is_some() != d.relay_auth_password_file.is_some() => {
                    return Err(err(
                        "domain",
                        i,
                        "relay_auth_user",
                        "relay_auth_user and relay_auth_password_file go together".into(),
                    ));
                }
                (RouteKind::Maildir | RouteKind::Discard, Some(_)) => {
                    return Err(err(
                        "domain",
                        i,
                        "relay",
                        "only used with route = \"relay\"".into(),
                    ));
                }
                _ => {}
            }
        }
        for (i, p) in self.tls_policies.iter().enumerate() {
            if p.domains.is_empty() && p.sender_domains.is_empty() {
                return Err(err(
                    "tls_policy",
                    i,
                    "domains",
                    "needs domains or sender_domains".into(),
                ));
            }
            for (key, list) in [
                ("domains", &p.domains),
                ("sender_domains", &p.sender_domains),
            ] {
                for d in list {
                    DomainPattern::parse(d)
                        .map_err(|e| err("tls_policy", i, key, e.to_string()))?;
                }
            }
            for pin in &p.pins {
                crate::outbound::tls::Pin::parse(pin)
                    .map_err(|m| err("tls_policy", i, "pins", m))?;
            }
        }
        if let Some(a) = self.admin.listen
            && !a.ip().is_loopback()
            && !self.admin.allow_remote
        {
            return Err(err(
                "admin",
                0,
                "listen",
                format!(
                    "{a} is not a loopback address; the admin API stays on loopback unless allow_remote = true"
                ),
            ));
        }
        let sts = &self.mta_sts;
        if sts.fetch_timeout_secs == 0 {
            return Err(err(
                "mta_sts",
                0,
                "fetch_timeout_secs",
                "must be greater than 0".into(),
            ));
        }
        if sts.refresh_interval_secs == 0 {
            return Err(err(
                "mta_sts",
                0,
                "refresh_interval_secs",
                "must be greater than 0".into(),
            ));
        }
        if !sts.policies.is_empty() && sts.listen.is_empty() {
            return Err(err(
                "mta_sts",
                0,
                "listen",
                "policies are published only with a listen address for the policy host".into(),
            ));
        }
        for (i, p) in sts.policies.iter().enumerate() {
            let t = "mta_sts.policy";
            let domain =
                Domain::parse(&p.domain).map_err(|e| err(t, i, "domain", e.to_string()))?;
            if sts.policies[..i]
                .iter()
                .any(|o| Domain::parse(&o.domain).is_ok_and(|o| o == domain))
            {
                return Err(err(t, i, "domain", format!("{} is listed twice", p.domain)));
            }
            if p.mode.parse::<crate::sts::policy::Mode>().is_err() {
                return Err(err(
                    t,
                    i,
                    "mode",
                    format!("`{}`: use testing, enforce or none", p.mode),
                ));
            }
            for m in &p.mx {
                crate::sts::policy::MxPattern::parse(m)
                    .map_err(|e| err(t, i, "mx", format!("`{m}`: {e}")))?;
            }
            if p.max_age == 0 || p.max_age > crate::sts::policy::MAX_AGE_LIMIT {
                return Err(err(
                    t,
                    i,
                    "max_age",
                    format!("must be 1 to {}", crate::sts::policy::MAX_AGE_LIMIT),
                ));
            }
            if p.cert.is_some() != p.key.is_some() {
                return Err(err(t, i, "cert", "cert and key go together".into()));
            }
        }
        if self.queue.retry_schedule_secs.is_empty() || self.queue.retry_schedule_secs.contains(&0)
        {
            return Err(err(
                "queue",
                0,
                "retry_schedule_secs",
                "needs one or more delays above 0".into(),
            ));
        }
        if self.queue.max_per_destination == 0 {
            return Err(err(
                "queue",
                0,
                "max_per_destination",
                "must be greater than 0".into(),
            ));
        }
        if self.queue.store == StoreKind::Postgres {
            if self.postgres.url.trim().is_empty() {
                return Err(err(
                    "postgres",
                    0,
                    "url",
                    "store = \"postgres\" needs [postgres] url".into(),
                ));
            }
            if let Err(e) = self.postgres.url.parse::<tokio_postgres::Config>() {
                return Err(err(
                    "postgres",
                    0,
                    "url",
                    format!("not a PostgreSQL address: {e}"),
                ));
            }
            if self.postgres.pool_size == 0 || self.postgres.pool_size > 1000 {
                return Err(err("postgres", 0, "pool_size", "must be 1 to 1000".into()));
            }
            if self.postgres.lease_secs < 10 || self.postgres.lease_secs > 86_400 {
                return Err(err(
                    "postgres",
                    0,
                    "lease_secs",
                    "must be 10 to 86400".into(),
                ));
            }
            if self.postgres.sync_interval_secs == 0 || self.postgres.sync_interval_secs > 3600 {
                return Err(err(
                    "postgres",
                    0,
                    "sync_interval_secs",
                    "must be 1 to 3600".into(),
                ));
            }
            if self.postgres.timeout_secs == 0 || self.postgres.timeout_secs > 600 {
                return Err(err(
                    "postgres",
                    0,
                    "timeout_secs",
                    "must be 1 to 600".into(),
                ));
            }
        }
        if self.queue.max_concurrent_deliveries == 0 {
            return Err(err(
                "queue",
                0,
                "max_concurrent_deliveries",
                "must be greater than 0".into(),
            ));
        }
        for (i, r) in self.inbound_rules.iter().enumerate() {
            for n in &r.networks {
                n.parse::<IpNet>()
                    .map_err(|m| err("inbound_rule", i, "networks", m))?;
            }
            for d in &r.sender_domains {
                DomainPattern::parse(d)
                    .map_err(|e| err("inbound_rule", i, "sender_domains", e.to_string()))?;
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("max_message_size", l.max_message_size as u64),
            ("max_recipients", l.max_recipients as u64),
            ("max_line_length", l.max_line_length as u64),
            ("max_errors", l.max_errors as u64),
            ("command_timeout_secs", l.command_timeout_secs),
            ("data_timeout_secs", l.data_timeout_secs),
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("max_connections", l.max_connections as u64),
            ("max_connections_per_ip", l.max_connections_per_ip as u64),
            ("session_timeout_secs", l.session_timeout_secs),
        ] {
            if v == 0 {
                return Err(err("limits", 0, key, "must be greater than 0".into()));
            }
        }
        if l.max_line_length < 512 {
            return Err(err(
                "limits",
                0,
                "max_line_length",
                "RFC 5321 needs at least 512".into(),
            ));
        }
        Ok(())
    }

    /// A path from the config, taken relative to the data dir.
    pub fn data_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    pub fn trusted_networks(&self) -> Vec<IpNet> {
        self.relay
            .trusted_networks
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}

/// Splits `host:port` / `[ip]:port` into host and port.
pub fn parse_hop(hop: &str) -> Option<(String, u16)> {
    let (host, port) = hop.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty() && !host.contains(char::is_whitespace)).then(|| (host.to_string(), port))
}

/// True when two sockets cannot both be bound: the same port, and the same address or a
/// wildcard (`0.0.0.0`, `[::]`) on either side. (`[::]` may also take IPv4, depending on
/// `net.ipv6.bindv6only`, so it is taken to overlap IPv4 addresses too.)
fn sockets_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (x, y) = (a.ip(), b.ip());
    x == y
        || (x.is_unspecified() && (x.is_ipv6() || y.is_ipv4()))
        || (y.is_unspecified() && (y.is_ipv6() || x.is_ipv4()))
}

/// The dotted key (`limits.max_message_size`) whose value starts at or contains `offset`:
/// the key on that line, under the nearest table header above it.
fn key_at(src: &str, offset: usize) -> Option<String> {
    let before = src.get(..offset.min(src.len()))?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = src[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = before[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// serde's "invalid type: string \"x\", expected usize" as "expected an integer, found a
/// string \"x\""; other messages unchanged.
fn plain_type_error(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected.trim() {
        "usize" | "u64" | "u32" | "u16" | "u8" | "i64" | "i32" => "an integer",
        "a boolean" | "bool" => "true or false",
        "a string" | "string" => "a string",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// 1-based line of a byte offset.
fn line_of_offset(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of `key` inside the `index`-th `[table]`/`[[table]]` (or the top level when
/// `table` is empty); falls back to the table header's line.
fn locate(src: &str, table: &str, index: usize, key: &str) -> Option<usize> {
    let mut in_table = table.is_empty();
    let mut seen = 0usize;
    let mut header_line = None;
    for (n, raw) in src.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            if in_table && header_line.is_some() {
                break;
            }
            in_table = false;
            if !table.is_empty() && name == table {
                if seen == index {
                    in_table = true;
                    header_line = Some(n + 1);
                }
                seen += 1;
            } else if table.is_empty() {
                break;
            }
            continue;
        }
        if in_table
            && let Some(rest) = line.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(n + 1);
        }
    }
    header_line
}

/// The embedded default configuration (also shipped, commented, as `examples/moat.toml`).
pub const EMBEDDED: &str = r#"
hostname = "localhost"
data_dir = "moat-data"

[[listener]]
name = "smtp"
address = "127.0.0.1:2525"
mode = "smtp"

[[listener]]
name = "smtps"
address = "127.0.0.1:2465"
mode = "smtps"

[[listener]]
name = "submission"
address = "127.0.0.1:2587"
mode = "submission"

[[domain]]
name = "localhost"
route = "maildir"
path = "mail"

[admin]
listen = "127.0.0.1:2580"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED, "embedded").unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert!(c.listeners[2].requires_tls() && c.listeners[2].requires_auth());
        assert!(!c.listeners[0].requires_tls());
    }

    #[test]
    fn example_config_is_valid() {
        let src = include_str!("../examples/moat.toml");
        Config::parse(src, "examples/moat.toml").unwrap();
        let gw = Config::parse(include_str!("../examples/gateway.toml"), "gateway.toml").unwrap();
        assert_eq!(
            gw.tls_policies[0].level,
            crate::outbound::tls::TlsLevel::Verify
        );
        assert!(gw.admin.listen.is_some_and(|a| a.ip().is_loopback()));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let src = "hostname = \"mx.test\"\n\n[limits]\nmax_recipents = 5\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.key, "limits.max_recipents");
    }

    #[test]
    fn type_errors_name_the_key() {
        let src = "hostname = \"mx.test\"\n\n[limits]\nmax_message_size = \"big\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.line),
            ("limits.max_message_size", Some(4)),
            "{e}"
        );
        assert_eq!(
            e.message, "expected an integer, found string \"big\"",
            "{e}"
        );
        let src = "[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\nauth = \"yes\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(e.key, "listener.auth", "{e}");
        assert!(e.message.starts_with("expected true or false"), "{e}");
    }

    #[test]
    fn sockets_that_collide_are_refused() {
        let base = "[[listener]]\naddress = \"0.0.0.0:2525\"\nmode = \"smtp\"\n\n";
        for (extra, key) in [
            (
                "[[listener]]\naddress = \"127.0.0.1:2525\"\nmode = \"smtps\"\n",
                "listener[1].address",
            ),
            (
                "[mta_sts]\nlisten = [\"127.0.0.2:2525\"]\n",
                "mta_sts[0].listen",
            ),
            ("[admin]\nlisten = \"127.0.0.1:2525\"\n", "admin[0].listen"),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), "t.toml").unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains("overlaps 0.0.0.0:2525"), "{e}");
        }
        // Different ports, or two specific addresses: fine.
        let ok = format!("{base}[[listener]]\naddress = \"127.0.0.1:2465\"\nmode = \"smtps\"\n");
        assert!(Config::parse(&ok, "t.toml").is_ok());
        assert!(!sockets_overlap(
            "127.0.0.1:25".parse().unwrap(),
            "127.0.0.2:25".parse().unwrap()
        ));
        assert!(sockets_overlap(
            "[::]:25".parse().unwrap(),
            "127.0.0.2:25".parse().unwrap()
        ));
        let zero = format!("{base}[limits]\nsession_timeout_secs = 0\n");
        assert_eq!(
            Config::parse(&zero, "t.toml").unwrap_err().key,
            "limits[0].session_timeout_secs"
        );
        let post = format!("{base}[tls_rpt]\nhttps_endpoint = true\n");
        assert_eq!(
            Config::parse(&post, "t.toml").unwrap_err().key,
            "tls_rpt[0].https_endpoint"
        );
        let bad = format!("{base}[tls_rpt]\nreport_addresses = [\"no-at-sign\"]\n");
        let e = Config::parse(&bad, "t.toml").unwrap_err();
        assert_eq!(e.key, "tls_rpt[0].report_addresses");
        let good = format!("{base}[tls_rpt]\nreport_addresses = [\"tlsrpt@example.com\"]\n");
        assert!(Config::parse(&good, "t.toml").is_ok());
    }

    #[test]
    fn file_checks_find_what_serve_would_trip_on() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pair = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let (c, k) = (d.join(format!("{name}.pem")), d.join(format!("{name}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (c1, k1) = pair("a.test");
        let (_c2, k2) = pair("b.test");
        std::fs::write(d.join("empty-password"), "\n").unwrap();
        let head = format!(
            "data_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\n\n",
            d.display()
        );
        let check = |extra: String| {
            let src = format!("{head}{extra}");
            let c = Config::parse(&src, "t.toml").unwrap();
            c.check_files(&src, "t.toml").map(|_| ())
        };
        let cert = |c: &Path, k: &Path| {
            format!(
                "[tls]\n[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
                c.display(),
                k.display()
            )
        };
        assert!(check(cert(&c1, &k1)).is_ok());
        for (extra, key, words) in [
            (cert(&d.join("missing.pem"), &k1), "tls.certificate[0].cert", "missing.pem"),
            (cert(&c1, &k2), "tls.certificate[0].cert", "a.test.pem"),
            (cert(&k1, &k1), "tls.certificate[0].cert", "no certificate"),
            (
                "[[tls_policy]]\ndomains = [\"x.test\"]\nlevel = \"verify\"\nca_file = \"nope.pem\"\n".into(),
                "tls_policy[0].ca_file",
                "nope.pem",
            ),
            (
                "[[domain]]\nname = \"r.test\"\nroute = \"relay\"\nrelay = \"h.test:25\"\nrelay_auth_user = \"u\"\nrelay_auth_password_file = \"no-such-file\"\n".into(),
                "domain[0].relay_auth_password_file",
                "no-such-file",
            ),
            (
                "[[domain]]\nname = \"r.test\"\nroute = \"relay\"\nrelay = \"h.test:25\"\nrelay_auth_user = \"u\"\nrelay_auth_password_file = \"empty-password\"\n".into(),
                "domain[0].relay_auth_password_file",
                "is empty",
            ),
        ] {
            let e = check(extra).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.line.is_some(), "{e}");
            assert!(e.to_string().contains(words), "{words}: {e}");
        }
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let src = "[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\n\n[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtps\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(e.key, "listener[1].address");
        assert_eq!(e.line, Some(6), "{e}");
        let src =
            "[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\n[limits]\nmax_errors = 0\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let src = "hostname = \"mx.test\"\nworker_threads = 5000\n[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("worker_threads", Some(2)), "{e}");
        let ok = "worker_threads = 3\n[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\n";
        assert_eq!(Config::parse(ok, "t.toml").unwrap().worker_threads, 3);
    }

    #[test]
    fn auth_without_tls_is_refused() {
        let src = "[[listener]]\naddress = \"127.0.0.1:1\"\nmode = \"smtp\"\nrequire_auth = true\n";
        let e = Config::parse(src, "t.toml").unwrap_err();
        assert_eq!(e.key, "listener[0].require_auth");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn cidr_matching() {
        let n: IpNet = "127.0.0.0/8".parse().unwrap();
        assert!(n.contains("127.4.5.6".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("128.0.0.1".parse().unwrap()));
        let n: IpNet = "::1".parse().unwrap();
        assert!(n.contains("::1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
    }
}
