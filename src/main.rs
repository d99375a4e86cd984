//! The `moat` command. Every subcommand's `--help` is its manual.

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
        match &self.config {
            Some(path) => {
                let mut c = Config::load(path).map_err(|e| e.to_string())?;
                if let Some(d) = &self.data_dir {
                    c.data_dir = d.clone();
                }
                Ok(c)
            }
            None => Ok(Config::embedded_default(self.data_dir.clone())),
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
    /// Parse and validate FILE; errors name the key and the line. Exits 1 on error.
    Check {
        /// The config file to check.
        file: PathBuf,
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

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(source) => {
            init_logging(cli.log_format);
            let config = source.load()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting the runtime: {e}"))?;
            runtime.block_on(moat::server::serve(config))
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let c = Config::load(&file).map_err(|e| e.to_string())?;
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
    }
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
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e}");
            ExitCode::FAILURE
        }
    }
}
