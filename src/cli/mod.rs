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
use crate::backend::local::LocalRoot;
use crate::config::{self, ClusterConfig, Config, Loaded, RootBackend, StoreKind};
use crate::pki::spiffe::SpiffeId;
use crate::state::file::FileStore;
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
    /// Log verbosity (error, warn, info, debug, trace); logs go to stderr.
    #[arg(long, global = true, env = "CACTL_LOG", default_value = "warn")]
    pub log_level: String,
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
    /// Show roots and every cluster's intermediate.
    Status {
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
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
    init_logging(&cli.log_level);
    match execute(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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

fn store_for(loaded: &Loaded) -> Box<dyn StateStore> {
    match loaded.config.state.store {
        StoreKind::File => Box::new(FileStore::new(loaded.state_dir())),
    }
}

fn backend_for(loaded: &Loaded) -> Box<dyn RootAuthority> {
    match loaded.config.root.backend {
        RootBackend::Local => Box::new(LocalRoot::new()),
    }
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
    let store = store_for(&loaded);
    let backend = backend_for(&loaded);
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
        config.to_yaml()
    );
    fsutil::write_atomic(path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write config file {}", path.display()))
}

fn cluster_add(cli: &Cli, name: &str) -> Result<()> {
    let mut loaded = load_config(cli)?;
    config::validate_cluster_name(name).map_err(|reason| anyhow!(reason))?;
    if loaded.config.cluster(name).is_some() {
        bail!(
            "cluster {name:?} is already declared in {}",
            cli.config.display()
        );
    }
    loaded.config.clusters.push(ClusterConfig {
        name: name.to_owned(),
    });
    loaded.config.validate(&cli.config.display().to_string())?;
    write_config(&cli.config, &loaded.config)?;
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
    let store = store_for(&loaded);
    let backend = backend_for(&loaded);
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
    let store = store_for(&loaded);
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
    let store = store_for(&loaded);
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
    let store = store_for(&loaded);
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
    let store = store_for(&loaded);
    let state = load_state(store.as_ref())?;
    output::status(cli.output, &loaded, &state, now)
}
