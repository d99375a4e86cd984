//! `moat serve`: builds every part from the config, binds the listeners, and runs until
//! SIGTERM/SIGINT. SIGHUP reloads certificates; they are also reloaded when their files change.
//!
//! Shutdown: listeners stop accepting at once; sessions waiting for a command get `421` and
//! close; a message being spooled is finished and acknowledged first; a message still being
//! received is abandoned unacknowledged (the client keeps it). Nothing acknowledged is lost.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{Config, ListenerMode, RouteKind};
use crate::dns::Resolver;
use crate::domain::{DomainPattern, canonical_or_lower};
use crate::inbound::ConnCounter;
use crate::inbound::auth::{AuthLimiter, Authenticator};
use crate::inbound::connection::{ListenerCtx, Shared, handle};
use crate::outbound::deliver::Outbound;
use crate::outbound::tls::{Connector, Pin, TlsLevel, TlsRequirement};
use crate::queue::spool::Spool;
use crate::queue::store::Store;
use crate::queue::{Queue, Route, TlsPolicy};
use crate::smtp::session::{DomainKind, ListenerRules, Rules};
use crate::tls::CertStore;

fn rules_from(config: &Config) -> Rules {
    let mut domains = HashMap::new();
    let mut postmaster_domain = None;
    for d in &config.domains {
        let kind = match d.route {
            RouteKind::Maildir => {
                postmaster_domain.get_or_insert_with(|| canonical_or_lower(&d.name));
                DomainKind::Local {
                    mailboxes: d.mailboxes.iter().cloned().collect::<HashSet<_>>(),
                }
            }
            RouteKind::Discard | RouteKind::Relay => DomainKind::Routed,
        };
        domains.insert(canonical_or_lower(&d.name), kind);
    }
    let l = &config.limits;
    Rules {
        hostname: config.hostname.clone(),
        max_message_size: l.max_message_size,
        max_recipients: l.max_recipients,
        max_line_length: l.max_line_length,
        max_errors: l.max_errors,
        domains,
        postmaster_domain,
        tls_required_sender_domains: config
            .inbound_rules
            .iter()
            .filter(|r| r.require_tls || r.client_cert.is_some())
            .flat_map(|r| {
                r.sender_domains
                    .iter()
                    .filter_map(|d| DomainPattern::parse(d).ok())
            })
            .collect(),
        sender_client_certs: client_cert_rules(config, |r| {
            r.sender_domains
                .iter()
                .filter_map(|d| DomainPattern::parse(d).ok())
                .collect()
        }),
        report_addresses: config
            .tls_rpt
            .report_addresses
            .iter()
            .map(|a| a.to_ascii_lowercase())
            .collect(),
    }
}

/// `(item, certificate name)` for the items (`pick`) of every inbound rule that requires a
/// client certificate.
fn client_cert_rules<T>(
    config: &Config,
    pick: impl Fn(&crate::config::InboundRule) -> Vec<T>,
) -> Vec<(T, String)> {
    config
        .inbound_rules
        .iter()
        .filter_map(|r| {
            r.client_cert
                .as_ref()
                .map(|name| (r, name.to_ascii_lowercase()))
        })
        .flat_map(|(r, name)| pick(r).into_iter().map(move |item| (item, name.clone())))
        .collect()
}

/// Where each configured domain's mail goes; relay passwords are read from their files here.
fn routes_from(config: &Config) -> Result<HashMap<String, Route>, String> {
    let mut routes = HashMap::new();
    for d in &config.domains {
        let route = match d.route {
            RouteKind::Maildir => {
                Route::Maildir(config.data_path(d.path.as_deref().unwrap_or("mail".as_ref())))
            }
            RouteKind::Discard => Route::Discard,
            RouteKind::Relay => {
                let (host, port) = d
                    .relay
                    .as_deref()
                    .and_then(crate::config::parse_hop)
                    .unwrap_or_default();
                let auth = match (&d.relay_auth_user, &d.relay_auth_password_file) {
                    (Some(user), Some(file)) => {
                        let path = config.data_path(file);
                        let text = std::fs::read_to_string(&path).map_err(|e| {
                            format!("relay password for {} ({}): {e}", d.name, path.display())
                        })?;
                        let password = text.lines().next().unwrap_or_default().to_string();
                        if password.is_empty() {
                            return Err(format!("relay password file {} is empty", path.display()));
                        }
                        Some((user.clone(), password))
                    }
                    _ => None,
                };
                Route::Relay {
                    host,
                    port,
                    implicit_tls: d.relay_implicit_tls,
                    auth,
                }
            }
        };
        routes.insert(canonical_or_lower(&d.name), route);
    }
    Ok(routes)
}

/// Certificate files from the config, or the self-signed pair in the data dir.
pub fn certificate_files(config: &Config) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    if config.tls.certificates.is_empty() {
        let pair = crate::tls::ensure_self_signed(&config.data_dir.join("tls"), &config.hostname)?;
        return Ok(vec![pair]);
    }
    Ok(config
        .tls
        .certificates
        .iter()
        .map(|c| (config.data_path(&c.cert), config.data_path(&c.key)))
        .collect())
}

fn outbound_from(config: &Config) -> Result<Outbound, String> {
    let o = &config.outbound;
    let resolver = if o.nameservers.is_empty() {
        Resolver::system()
    } else {
        Resolver::with_nameservers_timeout(
            &o.nameservers,
            Duration::from_secs(o.dns_timeout_secs),
            1,
        )
    }
    .map_err(|e| format!("DNS resolver: {e}"))?;
    let helo = o
        .helo_name
        .clone()
        .unwrap_or_else(|| config.hostname.clone());
    Ok(Outbound {
        resolver,
        connector: Connector::new(true, None),
        our_names: vec![
            config.hostname.to_ascii_lowercase(),
            helo.to_ascii_lowercase(),
        ],
        helo_name: helo,
        port: o.port,
        connect_timeout: Duration::from_secs(o.connect_timeout_secs.max(1)),
        pool: Default::default(),
        our_addrs: config.listeners.iter().map(|l| l.address).collect(),
        dane: dane_from(config)?,
        tlsrpt: None,
    })
}

/// The validating resolver for DANE (same nameservers as routing), when enabled.
fn dane_from(config: &Config) -> Result<Option<Arc<crate::dane::Dane>>, String> {
    let d = &config.dane;
    if !d.enabled {
        return Ok(None);
    }
    let validator = crate::dane::validator(config).map_err(|e| format!("DANE resolver: {e}"))?;
    let remote = validator.remote_trusted_servers();
    if !remote.is_empty() {
        tracing::warn!(servers = ?remote,
            "[dane] resolver_validates trusts the AD bit of nameservers that are not on this host: anyone on the path can forge it; use a validating resolver on loopback");
    }
    Ok(Some(Arc::new(crate::dane::Dane::new(
        validator,
        &d.check_secure,
        &d.check_bogus,
    ))))
}

/// What `moat explain` needs to make the server's own decision: the outbound settings, MTA-STS
/// discovery (its cache in memory only: the server's cache files are not touched), the rules
/// and the routes.
pub struct ExplainParts {
    pub outbound: Outbound,
    pub sts: Option<Arc<crate::sts::Sts>>,
    pub rules: TlsPolicy,
    pub routes: HashMap<String, Route>,
}

pub fn explain_parts(config: &Config) -> Result<ExplainParts, String> {
    let outbound = outbound_from(config)?;
    let sts = sts_with_cache(config, &outbound, None)?;
    Ok(ExplainParts {
        sts,
        rules: policy_from(config)?,
        routes: routes_from(config)?,
        outbound,
    })
}

/// MTA-STS discovery for the sending side, sharing the outbound resolver and TLS connector.
fn sts_from(config: &Config, outbound: &Outbound) -> Result<Option<Arc<crate::sts::Sts>>, String> {
    sts_with_cache(config, outbound, Some(config.data_dir.join("sts")))
}

/// The HTTPS client of the MTA-STS fetch (and of TLS-RPT POSTs, under the same trust):
/// system roots plus `[mta_sts] ca_file`, `fetch_port`, `fetch_timeout_secs`.
fn fetcher_from(
    config: &Config,
    outbound: &Outbound,
) -> Result<crate::sts::fetch::Fetcher, String> {
    let c = &config.mta_sts;
    let extra_roots = match &c.ca_file {
        Some(f) => Some(Arc::new(crate::tls::load_roots(&config.data_path(f))?)),
        None => None,
    };
    Ok(crate::sts::fetch::Fetcher {
        resolver: outbound.resolver.clone(),
        connector: outbound.connector.clone(),
        extra_roots,
        port: c.fetch_port,
        timeout: Duration::from_secs(c.fetch_timeout_secs),
    })
}

fn sts_with_cache(
    config: &Config,
    outbound: &Outbound,
    cache: Option<PathBuf>,
) -> Result<Option<Arc<crate::sts::Sts>>, String> {
    let c = &config.mta_sts;
    if !c.enabled {
        return Ok(None);
    }
    let sts = crate::sts::Sts::new(fetcher_from(config, outbound)?, cache)?;
    Ok(Some(Arc::new(sts)))
}

/// The TLS-RPT report sender: its DKIM key and the HTTPS client of the MTA-STS fetch (same
/// trust: system roots plus `[mta_sts] ca_file`).
fn report_sender(
    config: &Config,
    queue: &Arc<Queue>,
    requeue: &tokio::sync::mpsc::UnboundedSender<String>,
    results: &Arc<crate::tlsrpt::results::Results>,
) -> Result<crate::tlsrpt::send::Sender, String> {
    let t = &config.tls_rpt;
    let from = t
        .from
        .clone()
        .unwrap_or_else(|| format!("noreply-tlsrpt@{}", config.hostname));
    let signer = match (&t.dkim_key, t.send_reports) {
        (Some(k), true) => {
            let domain = t
                .dkim_domain
                .clone()
                .unwrap_or_else(|| crate::policy::domain_of(&from));
            Some(crate::dkim::Signer::from_pem_file(
                &config.data_path(k),
                &domain,
                &t.dkim_selector,
            )?)
        }
        (None, true) => {
            tracing::warn!(
                "[tls_rpt] send_reports without dkim_key: reports go only to https: rua, not by mail (RFC 8460 §5.3 requires DKIM)"
            );
            None
        }
        _ => None,
    };
    let fetcher = fetcher_from(config, &queue.outbound)?;
    Ok(crate::tlsrpt::send::Sender::new(
        queue.clone(),
        requeue.clone(),
        results.clone(),
        t.clone(),
        config.hostname.clone(),
        signer,
        fetcher,
    ))
}

/// Starts the MTA-STS policy host on each `[mta_sts] listen` address; returns its certificate
/// store (the policies' own certificates first, then the SMTP ones) for reloading.
async fn policy_host(config: &Config, smtp_store: &CertStore) -> Result<Arc<CertStore>, String> {
    let mut files: Vec<(PathBuf, PathBuf)> = config
        .mta_sts
        .policies
        .iter()
        .filter_map(|p| {
            Some((
                config.data_path(p.cert.as_ref()?),
                config.data_path(p.key.as_ref()?),
            ))
        })
        .collect();
    files.extend(certificate_files(config)?);
    let store = Arc::new(CertStore::load(&files)?);
    let mut served = vec![config.hostname.to_ascii_lowercase()];
    for name in smtp_store.names() {
        // Only host names make MX patterns (a subject CN may be any text).
        if !served.contains(&name)
            && !name.starts_with("mta-sts.")
            && crate::sts::policy::MxPattern::parse(&name).is_ok()
        {
            served.push(name);
        }
    }
    let mut policies = crate::sts::host::Policies::from_config(config, &served)?;
    if config.tls_rpt.https_endpoint {
        policies.reports = Some(Arc::new(crate::tlsrpt::store::Received::new(
            &config.data_dir,
            &config.tls_rpt.report_addresses,
            config.tls_rpt.keep_days,
        )));
    }
    let policies = Arc::new(policies);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(crate::tls::server_config(store.clone(), None, true)?);
    for addr in &config.mta_sts.listen {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (MTA-STS policy host): {e}"))?;
        println!(
            "moat: MTA-STS policy host on https://{} for {}",
            socket.local_addr().map_err(|e| e.to_string())?,
            policies.hosts().join(", ")
        );
        tokio::spawn(crate::sts::host::serve(
            socket,
            acceptor.clone(),
            policies.clone(),
        ));
    }
    Ok(store)
}

pub fn policy_from(config: &Config) -> Result<TlsPolicy, String> {
    let mut rules = Vec::new();
    let mut sender_rules = Vec::new();
    let mut dane_off = Vec::new();
    for p in &config.tls_policies {
        let pins = p
            .pins
            .iter()
            .map(|s| Pin::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let extra_roots = match &p.ca_file {
            Some(f) => Some(Arc::new(crate::tls::load_roots(&config.data_path(f))?)),
            None => None,
        };
        let req = TlsRequirement {
            level: p.level,
            match_names: p.match_names.clone(),
            pins,
            extra_roots,
            mta_sts: false,
            dane: None,
        };
        // `Config::load` checked every pattern; a hand-built config with a bad one fails here.
        let pattern = |d: &String| DomainPattern::parse(d).map_err(|e| e.to_string());
        for d in &p.domains {
            rules.push((pattern(d)?, req.clone()));
            if p.dane == crate::config::DaneSwitch::Off {
                dane_off.push(pattern(d)?);
            }
        }
        for d in &p.sender_domains {
            sender_rules.push((pattern(d)?, req.clone()));
        }
    }
    Ok(TlsPolicy {
        rules,
        sender_rules,
        opportunistic_for_unmatched: config.outbound.opportunistic_for_unmatched,
        default: TlsRequirement::level(TlsLevel::May),
        dane_off,
        requiretls_rules_count: config.outbound.requiretls_rules_count,
        honour_tls_required_no: config.outbound.honour_tls_required_no,
    })
}

/// Opens the queue's store: the embedded journal under the data dir, or the shared database.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, String> {
    match config.queue.store {
        crate::config::StoreKind::Embedded => {
            let (spool, existing) = Spool::open(&config.data_dir.join("spool"))
                .map_err(|e| format!("opening the spool: {e}"))?;
            if !existing.is_empty() {
                tracing::info!(messages = existing.len(), "recovered queued messages");
            }
            Ok(Arc::new(spool))
        }
        crate::config::StoreKind::Postgres => {
            let pg = crate::queue::pg::PgStore::open(config).await?;
            Ok(Arc::new(pg))
        }
    }
}

/// Runs the server until a termination signal.
pub async fn serve(config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
    let store = Arc::new(CertStore::load(&certificate_files(&config)?)?);
    let client_roots = match &config.tls.client_ca {
        Some(p) => Some(crate::tls::load_roots(&config.data_path(p))?),
        None => None,
    };
    let spool = open_store(&config).await?;
    let routes = routes_from(&config)?;
    let mut outbound = outbound_from(&config)?;
    let results = Arc::new(crate::tlsrpt::results::Results::open(
        &config.data_dir,
        config.tls_rpt.results_keep_days,
        crate::util::unix_now(),
    ));
    outbound.tlsrpt = Some(results.clone());
    if let Some(d) = &outbound.dane {
        // Before the queue starts: no delivery is decided before DANE's state is known.
        d.check().await;
        d.spawn_checker(Duration::from_secs(config.dane.check_interval_secs.max(60)));
    }
    let policy = policy_from(&config)?;
    let sts = sts_from(&config, &outbound)?;
    if let Some(s) = &sts {
        s.spawn_refresher(Duration::from_secs(config.mta_sts.refresh_interval_secs));
        if let Some(share) = spool.sts_share() {
            s.share_through(
                share,
                Duration::from_secs(config.postgres.sync_interval_secs),
            );
        }
    }
    let (deliver, queue) = Queue {
        store: spool.clone(),
        routes,
        hostname: config.hostname.clone(),
        outbound,
        policy: std::sync::RwLock::new(Arc::new(policy)),
        events: Arc::new(
            crate::report::EventLog::open(&config.data_dir.join("report"))
                .map_err(|e| format!("report event log: {e}"))?,
        ),
        sts,
        config: config.queue.clone(),
        dest_slots: Default::default(),
        tlsrpt: (!config.tls_rpt.report_addresses.is_empty()).then(|| {
            Arc::new(crate::tlsrpt::store::Received::new(
                &config.data_dir,
                &config.tls_rpt.report_addresses,
                config.tls_rpt.keep_days,
            ))
        }),
    }
    .spawn();
    let reports = Arc::new(report_sender(&config, &queue, &deliver, &results)?);
    tokio::spawn(reports.clone().run());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let l = &config.limits;
    let shared = Arc::new(Shared {
        rules: Arc::new(rules_from(&config)),
        limits: l.clone(),
        spool,
        deliver: deliver.clone(),
        auth: Authenticator {
            users_file: config.data_path(&config.auth.users_file),
            limiter: AuthLimiter::new(
                l.auth_ip_max_failures,
                Duration::from_secs(l.auth_ip_window_secs),
            ),
            max_failures_per_connection: l.auth_max_failures,
            pool: crate::inbound::auth::HashPool::new(0, 2, Duration::from_secs(5)),
        },
        trusted: config.trusted_networks(),
        tls_required_networks: config
            .inbound_rules
            .iter()
            .filter(|r| r.require_tls || r.client_cert.is_some())
            .flat_map(|r| r.networks.iter().filter_map(|n| n.parse().ok()))
            .collect(),
        client_cert_networks: client_cert_rules(&config, |r| {
            r.networks.iter().filter_map(|n| n.parse().ok()).collect()
        }),
        shutdown: shutdown_rx.clone(),
    });
    let counter = Arc::new(ConnCounter::default());

    let mut bound = Vec::new();
    for lc in &config.listeners {
        let socket = TcpListener::bind(lc.address)
            .await
            .map_err(|e| format!("cannot listen on {} ({}): {e}", lc.address, lc.label()))?;
        let tls_config =
            crate::tls::server_config(store.clone(), client_roots.clone(), lc.session_tickets())?;
        let ctx = Arc::new(ListenerCtx {
            name: lc.label(),
            acceptor: tokio_rustls::TlsAcceptor::from(tls_config),
            rules: Arc::new(ListenerRules {
                starttls: lc.mode != ListenerMode::Smtps,
                require_tls: lc.requires_tls(),
                require_auth: lc.requires_auth(),
                auth: lc.auth,
                bare_newline: lc.bare_newline,
                requiretls: lc.requiretls,
            }),
            implicit_tls: lc.mode == ListenerMode::Smtps,
        });
        let what = match lc.mode {
            ListenerMode::Smtp => "SMTP, STARTTLS offered",
            ListenerMode::Smtps => "implicit TLS",
            ListenerMode::Submission => "submission",
        };
        let extra = match (lc.requires_tls(), lc.requires_auth()) {
            (true, true) => ", TLS and AUTH required",
            (true, false) => ", TLS required",
            _ => "",
        };
        println!(
            "moat: listening on {} ({}: {what}{extra})",
            socket.local_addr().map_err(|e| e.to_string())?,
            lc.label()
        );
        bound.push((socket, ctx));
    }
    for d in &config.domains {
        match d.route {
            RouteKind::Maildir => {
                let root = config.data_path(d.path.as_deref().unwrap_or("mail".as_ref()));
                println!(
                    "moat: mail for {} goes to {}/<mailbox>/new/",
                    d.name,
                    root.display()
                );
            }
            RouteKind::Discard => println!("moat: mail for {} is discarded", d.name),
            RouteKind::Relay => println!(
                "moat: mail for {} is relayed to {}",
                d.name,
                d.relay.as_deref().unwrap_or("?")
            ),
        }
    }
    println!("moat: queue in {}", shared.spool.location());
    let admin_path = config.data_dir.join(crate::queue::admin::SOCKET);
    let admin = crate::queue::admin::bind(&admin_path)
        .map_err(|e| format!("admin socket {}: {e}", admin_path.display()))?;
    tokio::spawn(crate::queue::admin::serve(
        admin,
        queue.clone(),
        deliver.clone(),
    ));

    for (socket, ctx) in bound {
        let shared = shared.clone();
        let counter = counter.clone();
        let mut stop = shutdown_rx.clone();
        let (max_total, max_ip) = (l.max_connections, l.max_connections_per_ip);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = socket.accept() => a,
                    _ = stop.changed() => break,
                };
                let (mut stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match counter.acquire(peer.ip(), max_total, max_ip) {
                    Ok(guard) => {
                        let (ctx, shared) = (ctx.clone(), shared.clone());
                        tokio::spawn(async move {
                            handle(stream, peer, ctx, shared).await;
                            drop(guard);
                        });
                    }
                    Err(why) => {
                        tracing::warn!(%peer, listener = %ctx.name, why, "connection refused");
                        crate::metrics::inc(
                            crate::metrics::Metric::ConnectionsRefusedTotal,
                            &[("listener", &ctx.name)],
                        );
                        if !ctx.implicit_tls {
                            let host = shared.rules.hostname.clone();
                            tokio::spawn(async move {
                                let line = format!("421 4.7.0 {host} {why}\r\n");
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(5),
                                    stream.write_all(line.as_bytes()),
                                )
                                .await;
                                let _ = stream.shutdown().await;
                            });
                        }
                    }
                }
            }
        });
    }

    let mut stores = vec![store.clone()];
    let mut named = vec![("smtp".to_string(), store.clone())];
    if !config.mta_sts.listen.is_empty() {
        let host_store = policy_host(&config, &store).await?;
        stores.push(host_store.clone());
        named.push(("mta-sts host".to_string(), host_store));
    }
    if let Some(addr) = config.admin.listen {
        let token_file = crate::admin_api::token_path(&config);
        let token = crate::admin_api::ensure_token(&token_file)?;
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (admin API): {e}"))?;
        println!(
            "moat: admin API, metrics and report on http://{}/ (token in {})",
            socket.local_addr().map_err(|e| e.to_string())?,
            token_file.display()
        );
        let ctx = Arc::new(crate::admin_api::AdminCtx {
            queue: queue.clone(),
            requeue: deliver.clone(),
            token,
            stores: named,
            started: std::time::Instant::now(),
            config: config.clone(),
            refusals: crate::http::gate::LogLimit::new(5, Duration::from_secs(60)),
            reports: reports.clone(),
        });
        tokio::spawn(crate::admin_api::serve(socket, ctx));
    }
    let reload_stores = stores;
    let interval = Duration::from_secs(config.tls.reload_interval_secs.max(1));
    // Registered here, not in the task, so that SIGHUP is handled once `ready` is printed.
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::spawn(async move {
        loop {
            let forced = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            for reload_store in &reload_stores {
                let result = if forced {
                    Some(reload_store.reload())
                } else {
                    reload_store.reload_if_changed()
                };
                match result {
                    Some(Ok(n)) => tracing::info!(certificates = n, "certificates reloaded"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "certificate reload failed; keeping the old ones")
                    }
                    None => {}
                }
            }
        }
    });

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    // Every listener, the admin socket and the signal handlers are in place. Tests and scripts
    // wait for this line, with this process's id, before they connect.
    println!("moat: ready (pid {})", std::process::id());
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(
        sessions = counter.total(),
        "shutting down: no new connections"
    );
    let _ = shutdown_tx.send(true);
    let grace = tokio::time::Instant::now() + Duration::from_secs(l.shutdown_grace_secs);
    while counter.total() > 0 && tokio::time::Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deliveries since the last second: their dead marks on disk, so none comes back.
    shared.spool.flush().await;
    if let Err(e) = results.flush(crate::util::unix_now()) {
        tracing::warn!(error = %e, "TLS-RPT results could not be written at shutdown");
    }
    tracing::info!(sessions_left = counter.total(), "stopped");
    Ok(())
}
