//! The `cactl` command line. Errors are mapped to exit codes in one place ([`exit_code`]):
//! 0 success, 1 operation failed, 2 usage or configuration error, 3 a verification verdict
//! was negative, 4 the state is locked or changed concurrently.

/// Prints a line to stdout, ignoring a closed pipe (`cactl ... | head` must not panic).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// Prints to stdout, ignoring a closed pipe.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

mod output;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use time::OffsetDateTime;

use crate::backend::RootAuthority;
use crate::config::{self, ClusterConfig, Config, Loaded};
use crate::pki::spiffe::SpiffeId;
use crate::state::{self, State, StateStore};
use crate::{ca, cacerts, fsutil, pki};

/// Certificate authority and trust-bundle distribution for multi-cluster Istio meshes.
#[derive(Debug, Parser)]
#[command(name = "cactl", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "CACTL_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Log verbosity (error, warn, info, debug, trace, or a tracing filter); logs go to stderr.
    #[arg(long, global = true, env = "CACTL_LOG", default_value = "warn")]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the mesh root (and a starter config if none exists).
    Init(InitArgs),
    /// Manage member clusters.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Mint a new intermediate CA for a cluster (the previous one is kept as history).
    Issue {
        /// Cluster name.
        cluster: String,
    },
    /// Write a cluster's `cacerts` files (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).
    Export {
        /// Cluster name.
        cluster: String,
        /// Output directory; files go to OUT/CLUSTER/.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the trust bundle.
    Bundle {
        /// Bundle format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Sign a workload CSR with a cluster's intermediate.
    Sign(SignArgs),
    /// Run istiod's plug-in CA load checks on a cacerts directory.
    Verify {
        /// Directory holding the four cacerts files.
        dir: PathBuf,
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Describe every certificate and CSR in a PEM file.
    Inspect {
        /// PEM file.
        file: PathBuf,
    },
    /// Run the workload signing service (Istio's CreateCertificate over gRPC).
    Serve(ServeArgs),
    /// Mint a development service-account token (trusted by clusters with `auth.dev_issuer`).
    DevToken(DevTokenArgs),
    /// Request a workload certificate from a running `cactl serve` (a gRPC client).
    Request(RequestArgs),
    /// Make every cluster hold exactly what it should (cacerts, trust bundles, istio-ca-root-cert).
    Push(PushArgs),
    /// Rotate intermediates on schedule and the mesh root in phases (see `--plan`).
    Rotate(RotateArgs),
    /// Benchmark the signing service against the raw crypto cost of this machine.
    Bench(BenchArgs),
    /// Show roots and every cluster's intermediate.
    Status {
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
}

/// `cactl rotate` arguments.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Only these clusters' intermediates (default: every cluster, and the root phases).
    pub clusters: Vec<String>,
    /// Show what is due and why, per cluster; change nothing.
    #[arg(long, conflicts_with_all = ["now", "root"])]
    pub plan: bool,
    /// With --plan: evaluate at this time (RFC 3339) instead of now.
    #[arg(long, requires = "plan")]
    pub at: Option<String>,
    /// Emergency: replace the named cluster's intermediate immediately.
    #[arg(long, conflicts_with = "root")]
    pub now: bool,
    /// Start a root rotation (later runs, or `cactl serve`, advance its phases).
    #[arg(long)]
    pub root: bool,
    /// With --root: new intermediates also carry the new root cross-signed by the old one.
    #[arg(long, requires = "root", conflicts_with = "abort")]
    pub cross_sign: bool,
    /// With --root: back out of the root rotation in progress.
    #[arg(long, requires = "root")]
    pub abort: bool,
}

/// `cactl init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Adopt this existing root certificate (PEM) instead of generating one.
    #[arg(long, requires = "import_key")]
    pub import_cert: Option<PathBuf>,
    /// The private key of --import-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, requires = "import_cert")]
    pub import_key: Option<PathBuf>,
    /// Trust domain for a newly written config.
    #[arg(long)]
    pub trust_domain: Option<String>,
}

/// `cactl serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC (TLS) listen address; overrides `serve.listen`.
    #[arg(long)]
    pub listen: Option<String>,
    /// Metrics/health listen address; overrides `serve.metrics_listen`.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Also serve plaintext h2c here (tests only).
    #[arg(long)]
    pub plaintext_listen: Option<String>,
}

/// `cactl dev-token` arguments.
#[derive(Debug, Args)]
pub struct DevTokenArgs {
    /// Namespace of the service account.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Service account name.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// Audience.
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Node name claim (as projected tokens of pods carry on Kubernetes 1.30+).
    #[arg(long)]
    pub node: Option<String>,
}

/// `cactl request` arguments.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub addr: String,
    /// Root bundle (PEM) to verify the server with; default: this cactl's trust bundle.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// TLS server name to expect; default: the first of `serve.dns_names`.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Bearer token.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// `clusterid` header.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Identity for the CSR's URI SAN (must be the token's service account).
    #[arg(long)]
    pub identity: String,
    /// Key type of the workload key: p256 (ztunnel style) or rsa2048 (istio-agent style).
    #[arg(long, default_value = "p256")]
    pub key_type: String,
    /// Requested TTL in seconds (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub ttl_seconds: i64,
    /// Write key.pem, cert-chain.pem and root-cert.pem here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `cactl push` arguments.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Clusters to push to (default: all).
    pub clusters: Vec<String>,
    /// Compare only; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Take over objects cactl did not create (they are never overwritten otherwise).
    #[arg(long)]
    pub adopt: bool,
}

/// `cactl bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrency levels (in-flight requests), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub concurrency: Vec<usize>,
    /// Measuring time per level.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Warm-up per level.
    #[arg(long, default_value = "2s")]
    pub warmup: String,
    /// Client styles in the request mix: ztunnel (P-256 CSRs) and/or agent (RSA-2048, O=).
    #[arg(long, value_delimiter = ',', default_value = "ztunnel")]
    pub styles: Vec<String>,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Distinct workload identities (one token each).
    #[arg(long, default_value_t = 64)]
    pub identities: usize,
    /// How the server checks issued chains: structural or full.
    #[arg(long, default_value = "structural")]
    pub verify_issued: String,
    /// Pin the server to these CPUs (taskset syntax).
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Run the server this much nicer than the load generator (0-19). The load generator
    /// shares the machine with the server; at the same priority it often waits a scheduler
    /// slice (milliseconds) behind a busy server thread when answers arrive, a delay that
    /// remote clients never see. It needs a few percent of one core.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub server_nice: u8,
    /// Time for each raw crypto measurement (before the first level and after each level).
    #[arg(long, default_value = "2s")]
    pub raw_budget: String,
    /// The server's log level (JSON logs, as deployed: `info` logs every certificate).
    #[arg(long, default_value = "info")]
    pub server_log_level: String,
    /// Where the server's logs go.
    #[arg(long, value_enum, default_value_t = ServerLogSink::Pipe)]
    pub server_log_sink: ServerLogSink,
}

/// Where `cactl bench` sends its server's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServerLogSink {
    /// A pipe the bench reads and discards, as a log collector would.
    Pipe,
    /// `/dev/null`: no reader to wake.
    Null,
}

/// `cactl cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Declare a member cluster.
    Add {
        /// Cluster name.
        name: String,
    },
    /// List member clusters.
    List,
}

/// `cactl sign` arguments.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// Cluster whose intermediate signs.
    #[arg(long)]
    pub cluster: String,
    /// CSR file (PEM).
    #[arg(long)]
    pub csr: PathBuf,
    /// Requested lifetime (e.g. 24h); default and maximum come from the config.
    #[arg(long)]
    pub ttl: Option<String>,
    /// The identity the CSR must carry (or gets, if it carries none).
    #[arg(long)]
    pub identity: Option<String>,
    /// Write the certificate chain (leaf, then intermediates) here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Trust bundle formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM certificates.
    Pem,
    /// SPIFFE trust bundle (JWKS).
    Spiffe,
}

/// A negative verification verdict (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerdictFailed(String);

/// Parses arguments, runs the command and returns the process exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let log_guard = init_logging(&cli.log_level, cli.log_format);
    let result = execute(&cli);
    // Flushes the log lines still queued, so they come before the final error.
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Logs go to stderr through a writer thread: a line is formatted where it is logged and
/// handed over (in batches from the signing workers, see `crate::logging`), and the thread
/// writes whatever has queued up in one go. `cactl serve` logs every certificate it issues,
/// and a write(2) per line would cost the signing path more than the line itself. Nothing is
/// dropped while it runs: when the thread falls far behind, loggers wait. Dropping the writer
/// writes what is left, giving up after `logging::SHUTDOWN_WAIT` if stderr takes nothing.
/// Should the thread not start, lines are written where they are logged.
fn init_logging(level: &str, format: LogFormat) -> Option<crate::logging::Output> {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let output =
        crate::logging::Output::start(std::io::stderr(), crate::logging::DRAIN_INTERVAL).ok();
    let sink: crate::logging::Sink = match &output {
        Some(o) => o.sink(),
        None => std::sync::Arc::new(|lines: &[u8], _| {
            use std::io::Write as _;
            std::io::stderr().write_all(lines)
        }),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logging::Writer::new(sink))
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .event_format(crate::logging::JsonFormat)
            .try_init(),
    };
    output
}

/// Maps an error to the documented exit code.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<VerdictFailed>() {
            return 3;
        }
        if let Some(state::Error::Locked(_) | state::Error::Conflict { .. }) =
            cause.downcast_ref::<state::Error>()
        {
            return 4;
        }
        if let Some(crate::rotation::execute::Error::State(
            state::Error::Locked(_) | state::Error::Conflict { .. },
        )) = cause.downcast_ref::<crate::rotation::execute::Error>()
        {
            return 4;
        }
        if cause.is::<config::Error>() {
            return 2;
        }
    }
    1
}

fn execute(cli: &Cli) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    match &cli.command {
        Command::Init(args) => init(cli, args, now),
        Command::Cluster(ClusterCommand::Add { name }) => cluster_add(cli, name),
        Command::Cluster(ClusterCommand::List) => cluster_list(cli),
        Command::Issue { cluster } => issue(cli, cluster, now),
        Command::Export { cluster, out } => export(cli, cluster, out),
        Command::Bundle { format } => bundle(cli, *format),
        Command::Sign(args) => sign(cli, args, now),
        Command::Verify { dir, at } => verify(cli, dir, parse_at(at.as_deref(), now)?),
        Command::Inspect { file } => inspect(file, now),
        Command::Status { at } => status(cli, parse_at(at.as_deref(), now)?),
        Command::Serve(args) => serve(cli, args),
        Command::DevToken(args) => dev_token(cli, args, now),
        Command::Request(args) => request(cli, args),
        Command::Bench(args) => bench(cli, args),
        Command::Push(args) => push(cli, args, now),
        Command::Rotate(args) => rotate(cli, args, now),
    }
}

fn parse_at(at: Option<&str>, now: OffsetDateTime) -> Result<OffsetDateTime> {
    match at {
        None => Ok(now),
        Some(t) => OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
                format!("--at {t:?} is not an RFC 3339 time (e.g. 2027-01-31T12:00:00Z)")
            }),
    }
}

fn load_config(cli: &Cli) -> Result<Loaded> {
    Ok(Config::load(&cli.config)?)
}

fn store_for(loaded: &Loaded) -> Result<Box<dyn StateStore + Send + Sync>> {
    Ok(state::open(loaded)?)
}

fn backend_for(loaded: &Loaded) -> Result<Box<dyn RootAuthority + Send + Sync>> {
    Ok(crate::backend::open(loaded)?)
}

fn load_state(store: &dyn StateStore) -> Result<State> {
    store
        .load()?
        .ok_or_else(|| state::Error::NotInitialized(store.location()).into())
}

/// Runs `f` on the state under the store's lock and saves the result with compare-and-swap.
/// Nothing is saved if `f` fails.
fn mutate<T>(store: &dyn StateStore, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    let _guard = store.lock()?;
    let mut state = load_state(store)?;
    let out = f(&mut state)?;
    state.revision += 1;
    store.save(&state)?;
    Ok(out)
}

fn read_file(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn init(cli: &Cli, args: &InitArgs, now: OffsetDateTime) -> Result<()> {
    // With no config file, init writes a starter one, but only once the state is saved.
    let new_config = !cli.config.exists();
    let loaded = if new_config {
        let mut config = Config::default();
        if let Some(td) = &args.trust_domain {
            config.trust_domain = td.clone();
        }
        config.validate(&cli.config.display().to_string())?;
        Loaded {
            config,
            path: cli.config.clone(),
        }
    } else if args.trust_domain.is_some() {
        bail!(
            "--trust-domain only applies when init writes a new config; edit {} instead",
            cli.config.display()
        );
    } else {
        load_config(cli)?
    };
    let store = store_for(&loaded)?;
    let backend = backend_for(&loaded)?;
    // Refuse early when initialised, and build the whole new state before touching the store.
    if store.load()?.is_some() {
        return Err(state::Error::AlreadyInitialized(store.location()).into());
    }
    let mut state = State::new();
    match (&args.import_cert, &args.import_key) {
        (Some(c), Some(k)) => {
            let cert = read_file(c, "certificate")?;
            let key = zeroize::Zeroizing::new(read_file(k, "key")?);
            ca::init_imported(&mut state, &cert, &key, now)?;
        }
        _ => ca::init_generated(&mut state, &loaded.config, backend.as_ref(), now)?,
    }
    state.revision = 1;
    let _guard = store.lock()?;
    // Re-check under the lock: another process may have initialised in the meantime (the
    // compare-and-swap in `save` would refuse too).
    if store.load()?.is_some() {
        return Err(state::Error::AlreadyInitialized(store.location()).into());
    }
    store.save(&state)?;
    if new_config {
        if let Some(parent) = cli.config.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        write_config(&cli.config, &loaded.config)?;
    }
    let root = state.signing_root().ok_or(ca::Error::NoRoot)?;
    let info = pki::cert::CertInfo::from_pem_first(&root.cert_pem)?;
    output::init(
        cli.output,
        new_config.then_some(&*cli.config),
        &store.location(),
        root,
        &info,
    );
    Ok(())
}

fn write_config(path: &Path, config: &Config) -> Result<()> {
    let text = format!(
        "# cactl configuration. Durations accept e.g. 12h, 30d, 1y.\n{}",
        config.to_yaml()?
    );
    write_config_text(path, &text)
}

/// Replaces the config file atomically, keeping its permissions and writing through a symlink
/// to the file it points at.
fn write_config_text(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mode = std::fs::metadata(&target).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    fsutil::write_atomic(&target, text.as_bytes(), mode)
        .with_context(|| format!("cannot write config file {}", path.display()))
}

fn cluster_add(cli: &Cli, name: &str) -> Result<()> {
    let (mut loaded, text) = Config::load_with_text(&cli.config)?;
    config::validate_cluster_name(name).map_err(|reason| anyhow!(reason))?;
    if loaded.config.cluster(name).is_some() {
        bail!(
            "cluster {name:?} is already declared in {}",
            cli.config.display()
        );
    }
    loaded.config.clusters.push(ClusterConfig::named(name));
    let origin = cli.config.display().to_string();
    loaded.config.validate(&origin)?;
    // Edit the file in place, keeping its comments, when the edit reads back as intended.
    let edited = config::append_cluster(&text, name)
        .filter(|t| Config::parse(t, &origin).is_ok_and(|c| c == loaded.config));
    match edited {
        Some(text) => write_config_text(&cli.config, &text)?,
        None => {
            tracing::warn!(
                config = %origin,
                "the clusters list cannot be edited in place; rewriting the file without its comments"
            );
            write_config(&cli.config, &loaded.config)?;
        }
    }
    output::message(
        cli.output,
        &format!("cluster {name} added"),
        serde_json::json!({"cluster": name, "added": true}),
    );
    Ok(())
}

fn cluster_list(cli: &Cli) -> Result<()> {
    let loaded = load_config(cli)?;
    let names: Vec<&str> = loaded
        .config
        .clusters
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    match cli.output {
        OutputFormat::Text => {
            for n in &names {
                outln!("{n}");
            }
        }
        OutputFormat::Json => outln!("{}", serde_json::json!({ "clusters": names })),
    }
    Ok(())
}

fn issue(cli: &Cli, cluster: &str, now: OffsetDateTime) -> Result<()> {
    let loaded = load_config(cli)?;
    let store = store_for(&loaded)?;
    let backend = backend_for(&loaded)?;
    let record = mutate(store.as_ref(), |state| {
        Ok(ca::issue_intermediate(
            state,
            &loaded.config,
            backend.as_ref(),
            cluster,
            now,
        )?)
    })?;
    output::issued(cli.output, cluster, &record, now);
    Ok(())
}

fn export(cli: &Cli, cluster: &str, out: &Path) -> Result<()> {
    let loaded = load_config(cli)?;
    let store = store_for(&loaded)?;
    let state = load_state(store.as_ref())?;
    let files = ca::cacerts(&state, &loaded.config, cluster)?;
    let dir = out.join(cluster);
    fsutil::ensure_dir(&dir, 0o755).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, contents, mode) in files.files() {
        let path = dir.join(name);
        fsutil::write_atomic(&path, contents.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    output::message(
        cli.output,
        &format!("wrote {}/{{{}}}", dir.display(), cacerts::FILES.join(",")),
        serde_json::json!({"cluster": cluster, "dir": dir, "files": cacerts::FILES}),
    );
    Ok(())
}

fn bundle(cli: &Cli, format: BundleFormat) -> Result<()> {
    let loaded = load_config(cli)?;
    let store = store_for(&loaded)?;
    let state = load_state(store.as_ref())?;
    let roots = ca::bundle_roots(&state)?;
    match format {
        BundleFormat::Pem => out!("{}", crate::bundle::pem(&roots)),
        BundleFormat::Spiffe => {
            let refresh = loaded.config.workload.default_ttl.as_secs() / 2;
            let json = crate::bundle::spiffe_json(&roots, state.revision, refresh)?;
            outln!("{}", serde_json::to_string_pretty(&json)?);
        }
    }
    Ok(())
}

fn sign(cli: &Cli, args: &SignArgs, now: OffsetDateTime) -> Result<()> {
    let loaded = load_config(cli)?;
    let store = store_for(&loaded)?;
    let state = load_state(store.as_ref())?;
    let issuer = ca::ClusterIssuer::load(&state, &loaded.config, &args.cluster)?;
    let text = read_file(&args.csr, "CSR")?;
    let csr = pki::csr::parse_pem_and_verify(&text)
        .with_context(|| format!("CSR {}", args.csr.display()))?;
    let ttl = match &args.ttl {
        None => None,
        Some(t) => Some(config::to_time(
            humantime::parse_duration(t)
                .with_context(|| format!("--ttl {t:?} is not a duration (e.g. 24h)"))?,
        )),
    };
    let caller = match &args.identity {
        None => None,
        Some(i) => Some(SpiffeId::parse(i).context("--identity")?),
    };
    let approved = loaded
        .config
        .workload_policy()
        .evaluate(&csr, ttl, caller.as_ref())
        .context("CSR refused by policy")?;
    if approved.ttl_clamped {
        tracing::warn!(max = %loaded.config.workload_policy().max_ttl, "requested TTL above the maximum; clamped");
    }
    let issued = issuer.issue(&approved, now)?;
    let leaf = pki::cert::CertInfo::from_der(&issued.leaf)?;
    if let Some(out) = &args.out {
        fsutil::write_atomic(out, issued.chain_pem().as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    output::signed(
        cli.output,
        &args.cluster,
        &approved,
        &leaf,
        &issued,
        args.out.is_none(),
    );
    Ok(())
}

fn verify(cli: &Cli, dir: &Path, now: OffsetDateTime) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let read = |name: &str| -> Result<Option<String>> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.join(name).display())),
        }
    };
    let files = cacerts::Files {
        ca_cert: read(cacerts::CA_CERT)?,
        ca_key: read(cacerts::CA_KEY)?.map(zeroize::Zeroizing::new),
        cert_chain: read(cacerts::CERT_CHAIN)?,
        root_cert: read(cacerts::ROOT_CERT)?,
    };
    let checks = cacerts::check(&files, now);
    output::checks(cli.output, dir, &checks);
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        return Err(VerdictFailed(format!(
            "{} would not load these cacerts: {failed} check(s) failed",
            "istiod"
        ))
        .into());
    }
    Ok(())
}

fn inspect(file: &Path, now: OffsetDateTime) -> Result<()> {
    let text = read_file(file, "file")?;
    let out = pki::inspect::describe_pem(&text, now).with_context(|| file.display().to_string())?;
    out!("{out}");
    Ok(())
}

fn status(cli: &Cli, now: OffsetDateTime) -> Result<()> {
    let loaded = load_config(cli)?;
    let store = store_for(&loaded)?;
    let state = load_state(store.as_ref())?;
    // Read every reachable cluster back and compare (writes nothing).
    let reachable: Vec<String> = loaded
        .config
        .clusters
        .iter()
        .filter(|c| c.has_api_access())
        .map(|c| c.name.clone())
        .collect();
    let observed = if reachable.is_empty() {
        Vec::new()
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let opts = crate::trust::push::Options {
            dry_run: true,
            adopt: false,
            attempts: Some(1),
        };
        runtime.block_on(crate::trust::distribute::all(
            &loaded,
            &state,
            &reachable,
            opts,
            |_| {},
        ))
    };
    let last = crate::trust::distribute::PushStatus::load(&loaded);
    let obs: std::collections::BTreeMap<String, crate::rotation::execute::Observation> = loaded
        .config
        .clusters
        .iter()
        .map(|c| {
            let o = observed
                .iter()
                .find(|r| r.cluster == c.name)
                .map(crate::trust::distribute::observation)
                .unwrap_or_else(|| crate::rotation::execute::Observation {
                    reachable: false,
                    in_sync: false,
                    detail: Some("no kubeconfig or in_cluster configured".into()),
                    no_access: true,
                });
            (c.name.clone(), o)
        })
        .collect();
    let names: Vec<String> = loaded
        .config
        .clusters
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let policy = loaded.config.rotation_policy();
    let planned = crate::rotation::execute::plan_observed(&policy, &state, &names, &obs, now, true);
    let mut rotation = output::rotation_doc(&state, &loaded.config, &policy, now, &planned, &obs);
    rotation["last_run"] =
        serde_json::to_value(crate::rotation::record::LastRun::load(&loaded)).unwrap_or_default();
    output::status(cli.output, &loaded, &state, now, &observed, &last, rotation)
}

/// The embedded defaults `cactl serve` runs on when there is no config file: one cluster named
/// like Istio's default cluster ID, trusting the development token issuer, on loopback.
fn embedded_config(path: &Path) -> Loaded {
    let mut config = Config::default();
    let mut cluster = ClusterConfig::named("Kubernetes");
    cluster.auth = Some(config::ClusterAuth {
        dev_issuer: true,
        ..config::ClusterAuth::default()
    });
    config.clusters.push(cluster);
    config.serve.listen = "127.0.0.1:15012".into();
    config.serve.metrics_listen = "127.0.0.1:15014".into();
    config.serve.dns_names = vec!["localhost".into(), "cactl.cactl-system.svc".into()];
    Loaded {
        config,
        path: path.to_path_buf(),
    }
}

/// Creates the root and any missing intermediates (embedded defaults only).
fn bootstrap(loaded: &Loaded, store: &dyn StateStore, now: OffsetDateTime) -> Result<()> {
    let backend = backend_for(loaded)?;
    let _guard = store.lock()?;
    let mut state = match store.load()? {
        Some(s) => s,
        None => {
            let mut s = State::new();
            ca::init_generated(&mut s, &loaded.config, backend.as_ref(), now)?;
            s
        }
    };
    let before = state.revision;
    let mut changed = state.revision == 0;
    for c in &loaded.config.clusters {
        if state
            .clusters
            .get(&c.name)
            .and_then(|s| s.current.as_ref())
            .is_none()
        {
            ca::issue_intermediate(&mut state, &loaded.config, backend.as_ref(), &c.name, now)?;
            changed = true;
        }
    }
    if changed {
        state.revision = before + 1;
        store.save(&state)?;
    }
    Ok(())
}

fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let embedded = !cli.config.exists();
    let mut loaded = if embedded {
        embedded_config(&cli.config)
    } else {
        load_config(cli)?
    };
    if let Some(a) = &args.listen {
        loaded.config.serve.listen = a.clone();
    }
    if let Some(a) = &args.metrics_listen {
        loaded.config.serve.metrics_listen = a.clone();
    }
    if let Some(a) = &args.plaintext_listen {
        loaded.config.serve.plaintext_listen = Some(a.clone());
    }
    loaded.config.validate(&cli.config.display().to_string())?;
    let store = store_for(&loaded)?;
    if embedded {
        tracing::warn!(state = %store.location(), "no config file: serving on embedded defaults (local root, file state, cluster \"Kubernetes\", development tokens)");
        bootstrap(&loaded, store.as_ref(), OffsetDateTime::now_utc())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cactl-worker")
        .build()
        .context("cannot start the async runtime")?;
    let output = cli.output;
    runtime.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = tx.send(true);
        });
        crate::serve::run(loaded, store, rx, |bound| output::serving(output, bound)).await
    })?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn state_dir_for(cli: &Cli) -> Result<PathBuf> {
    let loaded = if cli.config.exists() {
        load_config(cli)?
    } else {
        embedded_config(&cli.config)
    };
    Ok(loaded.state_dir())
}

fn dev_token(cli: &Cli, args: &DevTokenArgs, now: OffsetDateTime) -> Result<()> {
    let ttl = humantime::parse_duration(&args.ttl)
        .with_context(|| format!("--ttl {:?} is not a duration (e.g. 1h)", args.ttl))?;
    let issuer = crate::devtoken::DevIssuer::open(&state_dir_for(cli)?)?;
    let token = issuer.token(
        &args.namespace,
        &args.service_account,
        &args.audience,
        now,
        config::to_time(ttl),
        args.node.as_deref(),
    )?;
    outln!("{token}");
    Ok(())
}

fn request(cli: &Cli, args: &RequestArgs) -> Result<()> {
    let loaded = if cli.config.exists() {
        Some(load_config(cli)?)
    } else {
        None
    };
    let ca_pem = match &args.ca_file {
        Some(p) => read_file(p, "CA file")?,
        None => {
            let l = loaded
                .clone()
                .unwrap_or_else(|| embedded_config(&cli.config));
            let state = load_state(store_for(&l)?.as_ref())?;
            crate::bundle::pem(&ca::bundle_roots(&state)?)
        }
    };
    let server_name = match &args.server_name {
        Some(n) => n.clone(),
        None => loaded
            .as_ref()
            .map(|l| l.config.serve.dns_names.clone())
            .unwrap_or_else(|| embedded_config(&cli.config).config.serve.dns_names)
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into()),
    };
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(p)) => Some(read_file(p, "token file")?.trim().to_owned()),
        (None, None) => None,
    };
    let key = match args.key_type.as_str() {
        "p256" => pki::key::SecretKey::generate(pki::key::KeyAlgorithm::EcdsaP256)?,
        "rsa2048" => pki::key::SecretKey::generate(pki::key::KeyAlgorithm::Rsa2048)?,
        other => bail!("--key-type {other:?}: use p256 or rsa2048"),
    };
    let csr = crate::client::make_csr(&key, &args.identity, args.key_type == "rsa2048")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let chain = runtime.block_on(crate::client::create_certificate(
        &args.addr,
        &ca_pem,
        &server_name,
        token.as_deref(),
        args.cluster_id.as_deref(),
        &csr,
        args.ttl_seconds,
    ))?;
    // Istio's clients refuse fewer than two elements (leaf, ..., root bundle); so do we.
    let [leaf_and_intermediates @ .., bundle] = chain.as_slice() else {
        bail!("invalid response: empty certificate chain");
    };
    if leaf_and_intermediates.is_empty() {
        bail!(
            "invalid response: {} element(s); expected the leaf, intermediates and the root bundle",
            chain.len()
        );
    }
    if let Some(dir) = &args.out {
        fsutil::ensure_dir(dir, 0o755)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        fsutil::write_atomic(&dir.join("key.pem"), key.to_pkcs8_pem().as_bytes(), 0o600)?;
        let certs: String = leaf_and_intermediates.concat();
        fsutil::write_atomic(&dir.join("cert-chain.pem"), certs.as_bytes(), 0o644)?;
        fsutil::write_atomic(&dir.join("root-cert.pem"), bundle.as_bytes(), 0o644)?;
    }
    output::requested(cli.output, &chain);
    Ok(())
}

fn bench(cli: &Cli, args: &BenchArgs) -> Result<()> {
    let dur = |t: &str, what: &str| {
        humantime::parse_duration(t).with_context(|| format!("--{what} {t:?} is not a duration"))
    };
    for s in &args.styles {
        if s != "agent" && s != "ztunnel" {
            bail!("--styles: {s:?} is neither agent nor ztunnel");
        }
    }
    let verify = match args.verify_issued.as_str() {
        "structural" => String::new(),
        "full" => "  verify_issued: full\n".to_owned(),
        other => bail!("--verify-issued {other:?}: use structural or full"),
    };
    let opts = crate::bench::Options {
        concurrency: args.concurrency.clone(),
        duration: dur(&args.duration, "duration")?,
        warmup: dur(&args.warmup, "warmup")?,
        styles: args.styles.clone(),
        connections: args.connections,
        identities: args.identities.max(1),
        server_bin: std::env::current_exe().context("cannot find the cactl binary")?,
        serve_extra: verify,
        workdir: None,
        server_cpus: args.server_cpus.clone(),
        server_nice: args.server_nice,
        raw_budget: dur(&args.raw_budget, "raw-budget")?,
        server_log_level: args.server_log_level.clone(),
        server_log_to_null: args.server_log_sink == ServerLogSink::Null,
    };
    // The load generator runs on one thread: its HTTP/2 connections and request tasks never
    // contend for locks or wake each other across cores, so it takes as little of the machine
    // from the server as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(crate::bench::run(opts, |m| eprintln!("bench: {m}")))?;
    output::bench(cli.output, &report);
    Ok(())
}

/// Issues or renews istiod's serving certificate for external clusters that want one, saving
/// it in the state before anything is pushed.
fn ensure_istiod_tls(loaded: &Loaded, store: &dyn StateStore, now: OffsetDateTime) -> Result<()> {
    let state = load_state(store)?;
    if crate::tls::istiod_tls_due(&state, &loaded.config, now).is_empty() {
        return Ok(());
    }
    mutate(store, |state| {
        crate::tls::refresh_istiod_tls(state, &loaded.config, now)?;
        Ok(())
    })
}

fn rotate(cli: &Cli, args: &RotateArgs, now: OffsetDateTime) -> Result<()> {
    use crate::rotation::execute::{self, Context, Request};
    let loaded = load_config(cli)?;
    for c in &args.clusters {
        if loaded.config.cluster(c).is_none() {
            return Err(ca::Error::UnknownCluster(c.clone()).into());
        }
    }
    let request = match (args.now, args.root, args.abort) {
        (true, _, _) => match args.clusters.as_slice() {
            [one] => Request::Emergency(one.clone()),
            _ => bail!(
                "--now replaces exactly one cluster's intermediate: name it (cactl rotate CLUSTER --now)"
            ),
        },
        (false, true, _) if !args.clusters.is_empty() => {
            bail!("--root rotates the root of the whole mesh; do not name clusters")
        }
        (false, true, true) => Request::AbortRoot,
        (false, true, false) => Request::StartRoot {
            cross_sign: args.cross_sign,
        },
        (false, false, _) => Request::Due,
    };
    let store = store_for(&loaded)?;
    let backend = backend_for(&loaded)?;
    let ctx = Context {
        config: &loaded.config,
        backend: backend.as_ref(),
        policy: loaded.config.rotation_policy(),
        fence: crate::lease::Fence::always(),
    };
    let fleet = crate::trust::distribute::KubeFleet::new(&loaded);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if args.plan {
        let at = parse_at(args.at.as_deref(), now)?;
        let state = load_state(store.as_ref())?;
        let (planned, obs) = runtime.block_on(execute::plan_only(&ctx, &state, &fleet, at));
        let doc = output::rotation_doc(&state, &loaded.config, &ctx.policy, at, &planned, &obs);
        output::rotate_plan(cli.output, &doc, at);
        return Ok(());
    }
    let output = cli.output;
    let report = runtime.block_on(execute::run(
        &ctx,
        store.as_ref(),
        &fleet,
        now,
        &args.clusters,
        &request,
        &|step| output::rotate_step(output, step),
    ));
    let record = crate::rotation::record::LastRun::after(
        &crate::rotation::record::LastRun::load(&loaded),
        "cactl rotate",
        now,
        report
            .as_ref()
            .map(|r| r.held.clone())
            .map_err(|e| e.to_string()),
        None,
    );
    if let Err(e) = record.save(&loaded) {
        tracing::warn!(error = %e, "cannot record the rotation run");
    }
    let pushes = fleet.push_reports();
    if !pushes.is_empty() {
        crate::trust::distribute::PushStatus::record(&loaded, &pushes, OffsetDateTime::now_utc())
            .context("cannot record the push status")?;
    }
    let report = report?;
    output::rotate_done(cli.output, &report);
    // Waiting for a cluster to act (istiod picking up a bundle) is not a failure; a cluster
    // that cannot be read or written is.
    let failing: Vec<String> = report
        .clusters
        .iter()
        .filter(|(n, o)| {
            let api = loaded
                .config
                .cluster(n)
                .is_some_and(ClusterConfig::has_api_access);
            let push_failed = pushes
                .iter()
                .rev()
                .find(|r| &r.cluster == *n)
                .is_some_and(|r| !r.ok());
            api && (!o.reachable || push_failed)
        })
        .map(|(n, o)| format!("{n} ({})", o.detail.as_deref().unwrap_or("not in sync")))
        .collect();
    if !failing.is_empty() {
        bail!(
            "{} cluster(s) could not be read or written (the state is saved; re-run `cactl rotate` when they are reachable): {}",
            failing.len(),
            failing.join("; ")
        );
    }
    Ok(())
}

fn push(cli: &Cli, args: &PushArgs, now: OffsetDateTime) -> Result<()> {
    let loaded = load_config(cli)?;
    for c in &args.clusters {
        if loaded.config.cluster(c).is_none() {
            return Err(ca::Error::UnknownCluster(c.clone()).into());
        }
    }
    let store = store_for(&loaded)?;
    if !args.dry_run {
        ensure_istiod_tls(&loaded, store.as_ref(), now)?;
    }
    let state = load_state(store.as_ref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let opts = crate::trust::push::Options {
        dry_run: args.dry_run,
        adopt: args.adopt,
        attempts: None,
    };
    let output = cli.output;
    let reports = runtime.block_on(crate::trust::distribute::all(
        &loaded,
        &state,
        &args.clusters,
        opts,
        |r| {
            output::push_progress(output, r);
        },
    ));
    if !args.dry_run {
        crate::trust::distribute::PushStatus::record(&loaded, &reports, OffsetDateTime::now_utc())
            .context("cannot record the push status")?;
    }
    output::push_done(output, &reports);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| {
            format!(
                "{} ({})",
                r.cluster,
                r.error
                    .clone()
                    .unwrap_or_else(|| "objects not ours; use --adopt".into())
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "push failed for {} cluster(s): {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}
