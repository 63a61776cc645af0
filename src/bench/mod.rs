//! `cactl bench`: a load generator for the signing service, and the raw crypto cost measured in
//! the same run, so throughput is reported as a ratio against the physical limit of the machine.
//!
//! By default it starts a `cactl serve` child process (P-256 CA key) on loopback with a JWKS
//! made for the run, pre-generates CSRs in both client styles (istio-agent: RSA-2048, subject
//! `O=`; ztunnel: P-256, empty subject) and one token per identity (so after the first request
//! per identity, authentication is the cached path), then drives the server over TLS at each
//! concurrency for a fixed time. It reads the server's CPU time from `/proc` to report CPU per
//! certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::Serialize;

use crate::client;

mod wire;
use crate::pki::key::{KeyAlgorithm, SecretKey};

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Set-up failed.
    #[error("bench set-up: {0}")]
    Setup(String),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Concurrency levels (in-flight requests).
    pub concurrency: Vec<usize>,
    /// Time per level.
    pub duration: Duration,
    /// Warm-up per level.
    pub warmup: Duration,
    /// Client styles to mix: "agent", "ztunnel".
    pub styles: Vec<String>,
    /// HTTP/2 connections to spread streams over.
    pub connections: usize,
    /// Distinct identities (and tokens).
    pub identities: usize,
    /// The cactl binary to run as the server.
    pub server_bin: PathBuf,
    /// Extra config lines under `serve:` (e.g. `verify_issued: full`).
    pub serve_extra: String,
    /// Where to keep the server's files (a temporary directory is used when `None`).
    pub workdir: Option<PathBuf>,
    /// Pin the server to these CPUs (taskset list), if set.
    pub server_cpus: Option<String>,
    /// Run the server this much nicer than the load generator (0 = the same priority).
    pub server_nice: u8,
    /// Time for each raw crypto measurement (taken before the first level and after each).
    pub raw_budget: Duration,
    /// The server's `--log-level` (its logs are JSON, read and discarded as a log collector
    /// would).
    pub server_log_level: String,
    /// Send the server's logs to `/dev/null` instead of a pipe the bench reads.
    pub server_log_to_null: bool,
}

/// Raw crypto cost of one certificate: verify a P-256 CSR signature, make one P-256 signature.
///
/// Measured twice: on one thread (the cost of the operations) and on every core at once (the
/// limit of the machine). Cores of a virtual machine often share physical cores or caches with
/// each other or with other tenants, so all cores together usually do less than cores × one.
#[derive(Clone, Debug, Serialize)]
pub struct RawCost {
    /// µs per P-256 verify.
    pub verify_us: f64,
    /// µs per P-256 sign.
    pub sign_us: f64,
    /// µs per RSA-2048 verify (istio-agent CSRs).
    pub rsa_verify_us: f64,
    /// Certificates per second per core: 1 / (verify + sign), P-256 CSRs.
    pub limit_per_core: f64,
    /// Same with RSA-2048 CSRs.
    pub limit_per_core_rsa_csr: f64,
    /// Threads run at once for `limit_all_cores` (one per available core).
    pub threads: usize,
    /// P-256-CSR certificates per second with every thread verifying and signing at once.
    pub limit_all_cores: f64,
}

impl RawCost {
    /// Raw µs per certificate on one thread for a mix with `rsa_share` RSA-2048 CSRs.
    fn mix_us(&self, rsa_share: f64) -> f64 {
        rsa_share * (self.rsa_verify_us + self.sign_us)
            + (1.0 - rsa_share) * (self.verify_us + self.sign_us)
    }

    /// Certificates per second on all cores for the mix: the measured all-core P-256 limit,
    /// scaled by the mix's single-thread cost.
    fn mix_limit_all_cores(&self, rsa_share: f64) -> f64 {
        let mix = self.mix_us(rsa_share);
        if mix > 0.0 {
            self.limit_all_cores * (self.verify_us + self.sign_us) / mix
        } else {
            0.0
        }
    }
}

/// One concurrency level's result.
#[derive(Clone, Debug, Serialize)]
pub struct LevelResult {
    /// In-flight requests.
    pub concurrency: usize,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Requests per second.
    pub throughput: f64,
    /// Latency percentiles in ms.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Server CPU seconds per certificate, in µs.
    pub server_cpu_us_per_cert: f64,
    /// The raw limit for this level: certificates per second on all cores for the request mix,
    /// the mean of the measurements just before and just after the level.
    pub limit: f64,
    /// Throughput ÷ `limit`.
    pub ratio_to_limit: f64,
    /// Throughput ÷ (one thread's raw limit × cores): the ratio as if cores added up perfectly.
    pub ratio_to_cores_times_one: f64,
    /// Server CPU per certificate ÷ raw crypto cost per certificate on one thread (for the mix).
    pub cpu_over_raw: f64,
    /// Server CPU per certificate ÷ raw crypto cost per certificate per thread with all cores
    /// busy (threads ÷ `limit`): what the crypto itself costs under the same load.
    pub cpu_over_raw_loaded: f64,
    /// Server resident memory at the end of the level, KiB.
    pub server_rss_kib: u64,
    /// Each client connection's share. The server deals connections to its workers in turn,
    /// so connection `i` is served by worker `i mod workers`: a worker that lags shows as a
    /// tail on its connections only.
    pub connections: Vec<ConnectionResult>,
    /// Each signing worker thread of the server during the level, from `/proc/.../schedstat`.
    pub workers: Vec<WorkerResult>,
}

/// One client connection's share of a level.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionResult {
    /// Successful requests.
    pub ok: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// The longest time between two successful answers on the connection, ms.
    pub longest_gap_ms: f64,
}

/// One server signing worker thread during a level.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerResult {
    /// Thread name (`cactl-grpc-N`).
    pub thread: String,
    /// Time it ran on a CPU, ms.
    pub cpu_ms: f64,
    /// Time it was runnable but waited for a CPU (the guest's run queue), ms.
    pub run_queue_wait_ms: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// CPUs available.
    pub cores: usize,
    /// Request mix.
    pub styles: Vec<String>,
    /// Raw crypto cost measured before the levels.
    pub raw: RawCost,
    /// Raw crypto cost measured after the last level.
    pub raw_after: RawCost,
    /// Per level.
    pub levels: Vec<LevelResult>,
    /// `serve.verify_issued` in effect.
    pub verify_issued: String,
    /// The nice values the server's threads ran at (distinct, ascending), read from `/proc` at
    /// the end of the last level.
    pub server_nice: Vec<i64>,
    /// The server's log level and where its logs went (`pipe` or `null`).
    pub server_log: String,
}

/// Measures the raw crypto cost with ring for about `budget`: half of it each operation on one
/// thread, half of it verify + sign pairs on `threads` threads at once.
pub fn raw_cost(budget: Duration, threads: usize) -> Result<RawCost, Error> {
    let rng = SystemRandom::new();
    let kp = p256_key(&rng)?;
    let msg = [7u8; 512];
    let per = budget / 6;
    let t = Instant::now();
    let mut n = 0u64;
    let mut sig = Vec::new();
    while t.elapsed() < per {
        sig = kp
            .sign(&rng, &msg)
            .map_err(|_| Error::Setup("sign".into()))?
            .as_ref()
            .to_vec();
        n += 1;
    }
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let pk = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        kp.public_key().as_ref().to_vec(),
    );
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < per {
        pk.verify(&msg, &sig)
            .map_err(|_| Error::Setup("verify".into()))?;
        n += 1;
    }
    let verify_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // RSA-2048 verify.
    let rsa =
        SecretKey::generate(KeyAlgorithm::Rsa2048).map_err(|e| Error::Setup(e.to_string()))?;
    let rsa_kp = signature::RsaKeyPair::from_pkcs8(&rsa.to_pkcs8_der())
        .map_err(|_| Error::Setup("rsa".into()))?;
    let mut rsa_sig = vec![0u8; rsa_kp.public().modulus_len()];
    rsa_kp
        .sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut rsa_sig)
        .map_err(|_| Error::Setup("rsa sign".into()))?;
    let rsa_pk = signature::UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        rsa_kp.public().as_ref().to_vec(),
    );
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < per {
        rsa_pk
            .verify(&msg, &rsa_sig)
            .map_err(|_| Error::Setup("rsa verify".into()))?;
        n += 1;
    }
    let rsa_verify_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let threads = threads.max(1);
    let limit_all_cores = all_cores(budget / 2, threads)?;
    Ok(RawCost {
        verify_us,
        sign_us,
        rsa_verify_us,
        limit_per_core: 1e6 / (verify_us + sign_us),
        limit_per_core_rsa_csr: 1e6 / (rsa_verify_us + sign_us),
        threads,
        limit_all_cores,
    })
}

fn p256_key(rng: &SystemRandom) -> Result<EcdsaKeyPair, Error> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| Error::Setup("keygen".into()))?;
    EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        rng,
    )
    .map_err(|_| Error::Setup("key".into()))
}

/// Certificates' worth of crypto (one P-256 verify + one P-256 sign) per second, with `threads`
/// threads doing it at once for `dur`.
fn all_cores(dur: Duration, threads: usize) -> Result<f64, Error> {
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<f64, Error> {
                let rng = SystemRandom::new();
                let kp = p256_key(&rng)?;
                let pk = signature::UnparsedPublicKey::new(
                    &signature::ECDSA_P256_SHA256_ASN1,
                    kp.public_key().as_ref().to_vec(),
                );
                let msg = [7u8; 512];
                let t = Instant::now();
                let mut n = 0u64;
                while t.elapsed() < dur {
                    let sig = kp
                        .sign(&rng, &msg)
                        .map_err(|_| Error::Setup("sign".into()))?;
                    pk.verify(&msg, sig.as_ref())
                        .map_err(|_| Error::Setup("verify".into()))?;
                    n += 1;
                }
                Ok(n as f64 / t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut total = 0.0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| Error::Setup("a raw crypto thread panicked".into()))??;
    }
    Ok(total)
}

struct Work {
    /// (token, csr) pairs; the CSR's identity is the token's.
    items: Vec<(String, String)>,
}

struct ServerProc {
    child: std::process::Child,
    addr: String,
    bundle: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))
}

fn start_server(opts: &Options, jwks: &str) -> Result<ServerProc, Error> {
    use std::io::BufRead as _;
    let (dir, tmp) = match &opts.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::Setup(e.to_string()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::tempdir().map_err(|e| Error::Setup(e.to_string()))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    write(&dir.join("jwks.json"), jwks)?;
    write(
        &dir.join("cactl.yaml"),
        &format!(
            "serve:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  dns_names: [cactl.bench.svc]\n{}clusters:\n- name: bench\n  auth: {{issuer: bench-issuer, jwks_file: jwks.json}}\n",
            opts.serve_extra
        ),
    )?;
    let run = |args: &[&str]| -> Result<String, Error> {
        let out = std::process::Command::new(&opts.server_bin)
            .args(args)
            .current_dir(&dir)
            .output()
            .map_err(|e| Error::Setup(e.to_string()))?;
        if !out.status.success() {
            return Err(Error::Setup(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    if !dir.join("cactl-state/state.json").exists() {
        run(&["init"])?;
        run(&["issue", "bench"])?;
    }
    let bundle = run(&["bundle"])?;
    // `nice` and `taskset` set the priority and CPUs before they exec the server, so every
    // thread it starts inherits them.
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if opts.server_nice > 0 {
        argv.extend([
            "nice".into(),
            "-n".into(),
            opts.server_nice.to_string().into(),
        ]);
    }
    if let Some(cpus) = &opts.server_cpus {
        argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
    }
    argv.push(opts.server_bin.clone().into_os_string());
    let program = argv
        .first()
        .map_or(opts.server_bin.as_os_str(), |p| p.as_os_str())
        .to_owned();
    let mut cmd = std::process::Command::new(&program);
    cmd.args(argv.iter().skip(1));
    let mut child = cmd
        .args(["--output", "json", "--log-format", "json", "--log-level"])
        .arg(&opts.server_log_level)
        .arg("serve")
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(if opts.server_log_to_null {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::piped()
        })
        .spawn()
        .map_err(|e| {
            Error::Setup(format!(
                "start server ({}): {e}",
                std::path::Path::new(&program).display()
            ))
        })?;
    // The server's logs go through a pipe, as in a container, and are read and dropped.
    if let Some(mut stderr) = child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Setup("no stdout".into()))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| Error::Setup("server did not start".into()))?;
    std::thread::spawn(move || for _ in lines {});
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| Error::Setup(format!("{e}: {line}")))?;
    let addr = v["bound"]["grpc"]
        .as_str()
        .ok_or_else(|| Error::Setup(line.clone()))?
        .to_owned();
    Ok(ServerProc {
        child,
        addr,
        bundle,
        _dir: tmp,
    })
}

/// utime+stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // utime and stime are fields 14 and 15 of stat.
    let ticks = |n: usize| {
        stat_field(&stat, n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/.../stat` line, for `n` ≥ 3: fields after the
/// command name (which may contain spaces and parentheses) are counted from the last ')'. The
/// pid and the command name (fields 1 and 2) give `None`.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The distinct nice values of a process's threads, ascending.
fn thread_nice(pid: u32) -> Vec<i64> {
    let mut values = std::collections::BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some(n) = stat_field(&stat, 19).and_then(|v| v.parse().ok()) {
            values.insert(n);
        }
    }
    values.into_iter().collect()
}

/// (thread name, ns on a CPU, ns waiting for one) of each `cactl-grpc-N` thread of a process,
/// in order of N.
fn worker_schedstats(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let name = name.trim_end();
        if !name.starts_with("cactl-grpc-") {
            continue;
        }
        let Ok(sched) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let mut fields = sched.split_whitespace().map(|v| v.parse::<u64>().ok());
        if let (Some(Some(run)), Some(Some(wait))) = (fields.next(), fields.next()) {
            out.push((name.to_owned(), run, wait));
        }
    }
    // By worker number, so entry n is worker n however many there are.
    out.sort_by_key(|(name, _, _)| {
        name.trim_start_matches("cactl-grpc-")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    out
}

/// What each worker did between two [`worker_schedstats`] readings.
fn worker_deltas(before: &[(String, u64, u64)], after: &[(String, u64, u64)]) -> Vec<WorkerResult> {
    after
        .iter()
        .filter_map(|(name, run, wait)| {
            let (_, run0, wait0) = before.iter().find(|(n, _, _)| n == name)?;
            Some(WorkerResult {
                thread: name.clone(),
                cpu_ms: run.saturating_sub(*run0) as f64 / 1e6,
                run_queue_wait_ms: wait.saturating_sub(*wait0) as f64 / 1e6,
            })
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn make_work(opts: &Options, key: &jsonwebtoken::EncodingKey, kid: &str) -> Result<Work, Error> {
    let mut items = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for i in 0..opts.identities {
        let sa = format!("sa-{i}");
        let claims = serde_json::json!({
            "iss": "bench-issuer", "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 7200,
            "sub": format!("system:serviceaccount:bench:{sa}"),
            "kubernetes.io": {"namespace": "bench", "serviceaccount": {"name": sa, "uid": "u"}},
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let token =
            jsonwebtoken::encode(&header, &claims, key).map_err(|e| Error::Setup(e.to_string()))?;
        let identity = format!("spiffe://cluster.local/ns/bench/sa/{sa}");
        for style in &opts.styles {
            let agent = style == "agent";
            let wk = SecretKey::generate(if agent {
                KeyAlgorithm::Rsa2048
            } else {
                KeyAlgorithm::EcdsaP256
            })
            .map_err(|e| Error::Setup(e.to_string()))?;
            let csr =
                client::make_csr(&wk, &identity, agent).map_err(|e| Error::Setup(e.to_string()))?;
            items.push((token.clone(), csr));
        }
    }
    Ok(Work { items })
}

/// Runs the benchmark.
pub async fn run(opts: Options, progress: impl Fn(&str)) -> Result<Report, Error> {
    crate::tls::install_default_provider();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    progress("measuring raw crypto cost");
    let raw_budget = opts.raw_budget;
    let raw = tokio::task::spawn_blocking(move || raw_cost(raw_budget, cores))
        .await
        .map_err(|e| Error::Setup(e.to_string()))??;

    let token_key =
        SecretKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| Error::Setup(e.to_string()))?;
    let dev = jwk_for(&token_key, "bench-1")?;
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(token_key.to_pkcs8_pem().as_bytes())
        .map_err(|e| Error::Setup(e.to_string()))?;
    progress("generating CSRs and tokens");
    let opts2 = opts.clone();
    let work = Arc::new(
        tokio::task::spawn_blocking(move || make_work(&opts2, &enc, "bench-1"))
            .await
            .map_err(|e| Error::Setup(e.to_string()))??,
    );
    progress("starting cactl serve");
    let server = start_server(&opts, &dev)?;
    let pid = server.child.id();
    let authority = "cactl.bench.svc";
    let encoded = Arc::new(prepare(&work, authority).await?);
    let mut connections = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let tls = tls_connect(&server.addr, &server.bundle, authority).await?;
        connections.push(
            wire::Connection::start(tls)
                .await
                .map_err(|e| Error::Setup(format!("HTTP/2 to {}: {e}", server.addr)))?,
        );
    }
    // Share of RSA CSRs in the mix, for the raw cost of the mix.
    let rsa_share = opts.styles.iter().filter(|s| *s == "agent").count() as f64
        / opts.styles.len().max(1) as f64;

    let mut levels = Vec::new();
    // The machine's speed drifts (other tenants, clocks), so each level is compared with raw
    // measurements taken right before and right after it.
    let mut before = raw.clone();
    for &conc in &opts.concurrency {
        progress(&format!("concurrency {conc}: warm-up"));
        let _ = drive(&mut connections, &encoded, conc, opts.warmup).await;
        progress(&format!(
            "concurrency {conc}: measuring {:?}",
            opts.duration
        ));
        let cpu0 = cpu_seconds(pid);
        let sched0 = worker_schedstats(pid);
        let (ok, errors, mut lat, elapsed, per_connection) =
            drive(&mut connections, &encoded, conc, opts.duration).await;
        let cpu = cpu_seconds(pid) - cpu0;
        let workers = worker_deltas(&sched0, &worker_schedstats(pid));
        let rss = rss_kib(pid);
        progress(&format!("concurrency {conc}: measuring raw crypto cost"));
        let after = tokio::task::spawn_blocking(move || raw_cost(raw_budget, cores))
            .await
            .map_err(|e| Error::Setup(e.to_string()))??;
        lat.sort_unstable();
        let pct = |p: f64| percentile_ms(&lat, p);
        let raw_us = (before.mix_us(rsa_share) + after.mix_us(rsa_share)) / 2.0;
        let limit =
            (before.mix_limit_all_cores(rsa_share) + after.mix_limit_all_cores(rsa_share)) / 2.0;
        let loaded_us = if limit > 0.0 {
            cores as f64 * 1e6 / limit
        } else {
            0.0
        };
        let throughput = ok as f64 / elapsed;
        let cpu_us = if ok > 0 { cpu * 1e6 / ok as f64 } else { 0.0 };
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        levels.push(LevelResult {
            concurrency: conc,
            ok,
            errors,
            throughput,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            server_cpu_us_per_cert: cpu_us,
            limit,
            ratio_to_limit: div(throughput, limit),
            ratio_to_cores_times_one: throughput * raw_us / 1e6 / cores as f64,
            cpu_over_raw: div(cpu_us, raw_us),
            cpu_over_raw_loaded: div(cpu_us, loaded_us),
            server_rss_kib: rss,
            connections: per_connection,
            workers,
        });
        before = after;
    }
    let server_nice = thread_nice(pid);
    drop(server);
    let raw_after = before;
    let verify_issued = if opts.serve_extra.contains("full") {
        "full"
    } else {
        "structural"
    };
    Ok(Report {
        cores,
        styles: opts.styles,
        raw,
        raw_after,
        levels,
        verify_issued: verify_issued.into(),
        server_nice,
        server_log: format!(
            "{}, {}",
            opts.server_log_level,
            if opts.server_log_to_null {
                "null"
            } else {
                "pipe"
            }
        ),
    })
}

/// The gRPC path of `CreateCertificate`.
const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Encodes every work item as istio-agent would send it (`authorization`, `clusterid`, the
/// CSR and `CertSigner: ""` metadata), header blocks as h2 encodes them.
async fn prepare(work: &Work, authority: &str) -> Result<wire::Encoded, Error> {
    use prost::Message as _;
    let setup = |e: &dyn std::fmt::Display| Error::Setup(e.to_string());
    let uri = format!("https://{authority}{CREATE_CERTIFICATE}")
        .parse::<http::Uri>()
        .map_err(|e| setup(&e))?;
    let mut requests = Vec::with_capacity(work.items.len());
    let mut bodies = Vec::with_capacity(work.items.len());
    for (token, csr) in &work.items {
        let req = client::request(csr, 0, Some(token), Some("bench")).map_err(|e| setup(&e))?;
        let mut headers = req.metadata().clone().into_headers();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers;
        requests.push(request);
        let msg = req.into_inner().encode_to_vec();
        let len = u32::try_from(msg.len()).map_err(|e| setup(&e))?;
        let mut body = Vec::with_capacity(5 + msg.len());
        body.push(0); // not compressed
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&msg);
        bodies.push(bytes::Bytes::from(body));
    }
    wire::record_header_blocks(&requests, bodies)
        .await
        .map_err(Error::Setup)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens a TLS connection (ALPN `h2`), trusting `bundle_pem`.
async fn tls_connect(addr: &str, bundle_pem: &str, server_name: &str) -> Result<Tls, Error> {
    let setup = |e: &dyn std::fmt::Display| Error::Setup(format!("connect {addr}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for der in crate::pki::pem::certificates(bundle_pem).map_err(|e| setup(&e))? {
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .map_err(|e| setup(&e))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name =
        rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| setup(&e))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| setup(&e))?;
    tcp.set_nodelay(true).map_err(|e| setup(&e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| setup(&e))?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(setup(&"the server did not negotiate h2"));
    }
    Ok(tls)
}

/// The `p` quantile of sorted latencies in µs, in ms (0 when there are none).
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

/// Keeps `conc` requests in flight, spread over the connections, for `dur`; returns (ok,
/// errors, latencies µs, seconds, each connection's share).
async fn drive(
    connections: &mut Vec<wire::Connection<Tls>>,
    encoded: &Arc<wire::Encoded>,
    conc: usize,
    dur: Duration,
) -> (u64, u64, Vec<u64>, f64, Vec<ConnectionResult>) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let count = connections.len().max(1);
    let mut tasks = Vec::new();
    for (c, mut conn) in std::mem::take(connections).into_iter().enumerate() {
        let load = wire::Load {
            encoded: encoded.clone(),
            first: c,
            stride: count,
            in_flight: conc / count + usize::from(c < conc % count),
            stop: stop.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let tally = conn.run(&load).await;
            (conn, tally)
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed_at_stop = start.elapsed().as_secs_f64();
    let (mut ok, mut errors, mut all, mut shares) = (0, 0, Vec::new(), Vec::new());
    for t in tasks {
        match t.await {
            Ok((conn, mut tally)) => {
                if let Some(f) = &tally.failure {
                    tracing::warn!(error = %f, "bench connection failed");
                }
                ok += tally.ok;
                errors += tally.errors;
                tally.latencies_us.sort_unstable();
                shares.push(ConnectionResult {
                    ok: tally.ok,
                    p50_ms: percentile_ms(&tally.latencies_us, 0.50),
                    p99_ms: percentile_ms(&tally.latencies_us, 0.99),
                    longest_gap_ms: tally.longest_gap_us as f64 / 1000.0,
                });
                all.extend(tally.latencies_us);
                connections.push(conn);
            }
            Err(_) => errors += 1,
        }
    }
    // Requests finishing after the stop flag are counted; the window ends when the last does.
    let elapsed = start.elapsed().as_secs_f64().max(elapsed_at_stop);
    (ok, errors, all, elapsed, shares)
}

fn jwk_for(key: &SecretKey, kid: &str) -> Result<String, Error> {
    use base64::Engine as _;
    let spki = key.public_key_spki();
    let point = spki
        .get(spki.len().saturating_sub(65)..)
        .ok_or_else(|| Error::Setup("spki".into()))?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    Ok(
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..])}]})
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_nice_reads_every_thread_of_a_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own: i64 = stat_field(&stat, 19).unwrap().parse().unwrap();
        // A second thread, alive while the threads are read.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert_eq!(thread_nice(std::process::id()), vec![own]);
        drop(tx);
        let _ = t.join();
        assert!(thread_nice(u32::MAX).is_empty());
    }

    #[test]
    fn stat_fields_count_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 10 0 0 0 250 75 0 0 20 5 3";
        assert_eq!(stat_field(stat, 1), None);
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 14), Some("250"));
        assert_eq!(stat_field(stat, 15), Some("75"));
        assert_eq!(stat_field(stat, 19), Some("5"));
        assert_eq!(stat_field(stat, 30), None);
    }

    #[test]
    fn worker_schedstats_find_the_named_threads_of_a_process() {
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (idle_tx, idle_rx) = std::sync::mpsc::channel::<()>();
        // Named to sort after worker 7 by number and before it as text.
        let idle = std::thread::Builder::new()
            .name("cactl-grpc-10".into())
            .spawn(move || idle_rx.recv())
            .unwrap();
        let t = std::thread::Builder::new()
            .name("cactl-grpc-7".into())
            .spawn(move || {
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                let _ = spun_tx.send(());
                done_rx.recv()
            })
            .unwrap();
        // Once it has spun and gone to sleep, its CPU time is on record.
        spun_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let stats = worker_schedstats(std::process::id());
        drop(done_tx);
        drop(idle_tx);
        let _ = t.join();
        let _ = idle.join();
        assert_eq!(stats.len(), 2, "{stats:?}");
        assert_eq!(stats[0].0, "cactl-grpc-7");
        assert_eq!(stats[1].0, "cactl-grpc-10");
        // Some CPU time, however busy the machine (the spin is timed by the wall clock).
        assert!(stats[0].1 > 0, "{stats:?}");
        assert!(worker_schedstats(u32::MAX).is_empty());
    }

    #[test]
    fn worker_deltas_pair_threads_by_name() {
        let before = vec![
            ("cactl-grpc-0".to_owned(), 1_000_000, 500_000),
            ("cactl-grpc-1".to_owned(), 2_000_000, 0),
        ];
        let after = vec![
            ("cactl-grpc-0".to_owned(), 3_500_000, 1_500_000),
            ("cactl-grpc-1".to_owned(), 2_250_000, 4_000_000),
            ("cactl-grpc-2".to_owned(), 9_000_000, 9_000_000),
        ];
        let d = worker_deltas(&before, &after);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].thread.as_str(), d[0].cpu_ms, d[0].run_queue_wait_ms),
            ("cactl-grpc-0", 2.5, 1.0)
        );
        assert_eq!(
            (d[1].thread.as_str(), d[1].cpu_ms, d[1].run_queue_wait_ms),
            ("cactl-grpc-1", 0.25, 4.0)
        );
    }

    #[test]
    fn percentiles_index_the_sorted_latencies() {
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
        let lat: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&lat, 0.50), 50.0);
        assert_eq!(percentile_ms(&lat, 0.99), 99.0);
        assert_eq!(percentile_ms(&lat, 0.999), 100.0);
        assert_eq!(percentile_ms(&[7], 0.5), 0.007);
    }
}
