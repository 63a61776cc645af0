//! `cactl serve`: the workload signing service, wired together.
//!
//! Start-up loads the issuers from the state store, issues the serving certificate, binds the
//! listeners and then runs until SIGTERM/SIGINT, when it stops accepting and finishes in-flight
//! requests. Background tasks poll the state store and swap issuers atomically when a new
//! intermediate appears, renew the serving certificate at two thirds of its life, and refresh
//! JWKS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower_service::Service as _;

use crate::authority::{Authority, IssuerSet};
use crate::config::{Config, Loaded, to_time};
use crate::grpc::authn::TokenAuthenticator;
use crate::grpc::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::grpc::{CaService, PeerCertificates};
use crate::state::StateStore;
use crate::telemetry::{ClusterLabel, Metrics, RootLabel};
use crate::tls::{self, SwappableCert};

/// Errors starting the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// State problems.
    #[error(transparent)]
    State(#[from] crate::state::Error),
    /// No cluster has a usable issuer.
    #[error("no cluster has a usable intermediate: {0}")]
    NoIssuer(String),
    /// TLS set-up.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// Listener set-up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Token authentication set-up.
    #[error("token authentication: {0}")]
    Auth(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(String),
    /// Leader election or the rotation timer could not start.
    #[error("rotation lease: {0}")]
    Lease(String),
}

/// Where the service listens (after binding: the real ports).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Bound {
    /// gRPC over TLS.
    pub grpc: SocketAddr,
    /// Metrics and health.
    pub metrics: SocketAddr,
    /// Plaintext gRPC (tests only).
    pub plaintext: Option<SocketAddr>,
    /// Serial of the serving certificate.
    pub serving_serial: String,
}

struct Shared {
    loaded: Loaded,
    store: Box<dyn StateStore + Send + Sync>,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    cert: Arc<SwappableCert>,
    tls_config: ArcSwap<ServerConfig>,
    serving: std::sync::Mutex<tls::Serving>,
}

/// Runs the service until `shutdown` turns true. `on_bound` is called once the listeners are
/// bound.
pub async fn run(
    loaded: Loaded,
    store: Box<dyn StateStore + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
    on_bound: impl FnOnce(&Bound),
) -> Result<(), Error> {
    tls::install_default_provider();
    let config = loaded.config.clone();
    let metrics = Arc::new(Metrics::new());
    let now = OffsetDateTime::now_utc();

    let state = store
        .load()?
        .ok_or_else(|| crate::state::Error::NotInitialized(store.location()))?;
    let set = IssuerSet::build(&state, &config, now);
    if set.issuers.is_empty() {
        let why: Vec<String> = set
            .unavailable
            .iter()
            .map(|(c, e)| format!("{c}: {e}"))
            .collect();
        return Err(Error::NoIssuer(if why.is_empty() {
            "no clusters are declared".into()
        } else {
            why.join("; ")
        }));
    }
    record_set(&metrics, &set, &state);
    let authority = Arc::new(Authority::new(set));

    // Token verification.
    let dev_jwks = if config
        .clusters
        .iter()
        .any(|c| c.auth.as_ref().is_some_and(|a| a.dev_issuer))
    {
        tracing::warn!("the development token issuer is trusted; never do this in a real mesh");
        let dev = crate::devtoken::DevIssuer::open(&loaded.state_dir())
            .map_err(|e| Error::Auth(e.to_string()))?;
        Some(Arc::new(
            dev.jwks().map_err(|e| Error::Auth(e.to_string()))?,
        ))
    } else {
        None
    };
    let tokens = Arc::new(
        TokenAuthenticator::from_loaded(
            &loaded,
            dev_jwks,
            metrics.auth_cache_hits.clone(),
            metrics.auth_cache_misses.clone(),
        )
        .await
        .map_err(Error::Auth)?,
    );
    for c in tokens.clusters() {
        c.refresh_if_stale().await;
    }

    // Serving certificate and TLS.
    let serving = issue_serving(&config, &authority.current(), now)?;
    metrics
        .serving_not_after
        .set(serving.not_after.unix_timestamp());
    let cert = Arc::new(SwappableCert::new(serving.key.clone()));
    let tls_config = tls::server_config(cert.clone(), &authority.current().roots)?;
    let serving_serial = serving.serial.clone();

    let shared = Arc::new(Shared {
        loaded: loaded.clone(),
        store,
        authority: authority.clone(),
        metrics: metrics.clone(),
        cert,
        tls_config: ArcSwap::new(tls_config),
        serving: std::sync::Mutex::new(serving),
    });

    // Listeners.
    let bind = |addr: &str| -> Result<std::net::TcpListener, Error> {
        std::net::TcpListener::bind(addr).map_err(|source| Error::Bind {
            addr: addr.to_owned(),
            source,
        })
    };
    let grpc_std = bind(&config.serve.listen)?;
    grpc_std
        .set_nonblocking(true)
        .map_err(|source| Error::Bind {
            addr: config.serve.listen.clone(),
            source,
        })?;
    let grpc_addr = grpc_std.local_addr().map_err(|source| Error::Bind {
        addr: config.serve.listen.clone(),
        source,
    })?;
    // Each worker registers a clone of this listener with its own runtime.
    let plaintext = match &config.serve.plaintext_listen {
        Some(a) => {
            let l = bind(a)?;
            l.set_nonblocking(true).map_err(|source| Error::Bind {
                addr: a.clone(),
                source,
            })?;
            Some(TcpListener::from_std(l).map_err(|source| Error::Bind {
                addr: a.clone(),
                source,
            })?)
        }
        None => None,
    };
    let plaintext_addr = plaintext.as_ref().and_then(|l| l.local_addr().ok());
    let (metrics_addr, metrics_thread) = crate::telemetry::spawn_http(
        bind(&config.serve.metrics_listen)?,
        metrics.clone(),
        shutdown.clone(),
    )
    .map_err(|source| Error::Bind {
        addr: config.serve.metrics_listen.clone(),
        source,
    })?;

    // Pod indexes for node authorization (ztunnel impersonation), where the cluster is reachable.
    let mut pods: HashMap<String, Arc<dyn crate::grpc::node_authz::PodIndex>> = HashMap::new();
    if !config.serve.trusted_node_accounts.is_empty() {
        for c in config.clusters.iter().filter(|c| c.has_api_access()) {
            match crate::cluster::client(&loaded, c, None).await {
                Ok(client) => {
                    pods.insert(
                        c.name.clone(),
                        crate::cluster::watch_pods(c.name.clone(), client),
                    );
                }
                Err(e) => {
                    tracing::error!(cluster = %c.name, error = %e, "no pod index: impersonation will be denied")
                }
            }
        }
    }
    let service = Arc::new(CaService::new(
        &config,
        authority,
        tokens.clone(),
        pods,
        metrics.clone(),
    ));
    let max = config.serve.max_message_bytes;
    let make_svc = || {
        IstioCertificateServiceServer::from_arc(service.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(4 * 1024 * 1024)
    };

    // One single-threaded runtime per core, each serving the connections it is handed. With a
    // FIFO scheduler and coalesced connections (`crate::coalesce`), the responses of all
    // streams that finish in one pass go out in one send, instead of one send per response.
    // One acceptor deals connections to the workers in turn: clients keep few, long-lived
    // connections (a ztunnel per node), and workers racing for them on a shared listener can
    // leave a core idle.
    let workers = config
        .serve
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let mut worker_threads = Vec::with_capacity(workers);
    let mut hand_off = Vec::with_capacity(workers);
    for n in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        hand_off.push(tx);
        let shared = shared.clone();
        let svc = make_svc();
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(format!("cactl-grpc-{n}"))
            .spawn(move || grpc_worker(rx, shared, svc, shutdown))
            .map_err(|source| Error::Bind {
                addr: config.serve.listen.clone(),
                source,
            })?;
        worker_threads.push(handle);
    }
    let acceptor = tokio::spawn(accept_loop(
        TcpListener::from_std(grpc_std).map_err(|source| Error::Bind {
            addr: config.serve.listen.clone(),
            source,
        })?,
        hand_off,
        shutdown.clone(),
    ));

    // With a lease, one replica rotates and pushes; every replica signs.
    let mut elector_task = None;
    let fence = match &config.rotation.lease {
        None => {
            let _ = metrics.leader.set(1);
            crate::lease::Fence::always()
        }
        Some(name) => {
            let s = &config.state;
            let home = crate::state::kube::Home {
                kubeconfig: s.kubeconfig.as_ref().map(|p| loaded.resolve(p)),
                context: s.context.clone(),
            };
            let client = crate::state::kube::connect(&home)
                .await
                .map_err(|e| Error::Lease(format!("{name}: {e}")))?;
            let identity = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| format!("cactl-{}", std::process::id()));
            let elector =
                crate::lease::Elector::new(client, &s.namespace, name, &identity, LEASE_DURATION);
            let fence = elector.fence();
            let m = metrics.clone();
            elector_task = Some(tokio::spawn(elector.run(shutdown.clone(), move |is| {
                m.leader.set(i64::from(is));
            })));
            fence
        }
    };

    // Scheduled rotation on its own thread (the executor's store and backend are synchronous).
    if !config.rotation.interval.is_zero() {
        let (loaded, fence, shutdown, metrics) = (
            loaded.clone(),
            fence.clone(),
            shutdown.clone(),
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("cactl-rotate".into())
            .spawn(move || rotation_thread(loaded, fence, shutdown, metrics))
            .map_err(|e| Error::Lease(format!("cannot start the rotation thread: {e}")))?;
    }

    // Continuous distribution to every cluster cactl can reach.
    if config.push.sync_in_serve {
        let sync_store: Arc<dyn StateStore + Send + Sync> = Arc::from(crate::state::open(&loaded)?);
        for c in config.clusters.iter().filter(|c| c.has_api_access()) {
            let metrics = metrics.clone();
            tokio::spawn(crate::trust::distribute::sync_loop(
                loaded.clone(),
                sync_store.clone(),
                c.clone(),
                fence.clone(),
                shutdown.clone(),
                move |r| {
                    metrics
                        .cluster_sync
                        .get_or_create(&crate::telemetry::ClusterLabel {
                            cluster: r.cluster.clone(),
                        })
                        .set(i64::from(r.ok()));
                    metrics
                        .push_writes
                        .get_or_create(&crate::telemetry::ClusterLabel {
                            cluster: r.cluster.clone(),
                        })
                        .inc_by(r.writes as u64);
                },
            ));
        }
    }

    // Background maintenance.
    let maint = tokio::spawn(maintain(shared.clone(), tokens, shutdown.clone()));

    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    on_bound(&Bound {
        grpc: grpc_addr,
        metrics: metrics_addr,
        plaintext: plaintext_addr,
        serving_serial,
    });
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, "serving");

    let stop = {
        let mut s = shutdown.clone();
        async move {
            let _ = s.wait_for(|v| *v).await;
        }
    };
    match plaintext {
        Some(l) => plaintext_loop(l, make_svc(), shutdown.clone()).await,
        None => stop.await,
    }
    acceptor.abort();
    let worker_results = tokio::task::spawn_blocking(move || {
        worker_threads
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker panicked".to_owned()))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = shutdown.wait_for(|v| *v).await;
    maint.abort();
    let _ = tokio::task::spawn_blocking(move || metrics_thread.join()).await;
    // Give the lease up before exiting, so another replica need not wait for it to expire.
    if let Some(t) = elector_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    for r in worker_results {
        r.map_err(Error::Server)?;
    }
    Ok(())
}

fn issue_serving(
    config: &Config,
    set: &IssuerSet,
    now: OffsetDateTime,
) -> Result<tls::Serving, Error> {
    let issuer = config
        .serve
        .serving_cluster
        .as_deref()
        .and_then(|c| set.get(c))
        .or_else(|| set.issuers.values().next())
        .ok_or_else(|| Error::NoIssuer("no issuer for the serving certificate".into()))?;
    Ok(tls::issue_serving(
        issuer,
        &config.organization,
        &config.serve.dns_names,
        to_time(config.serve.serving_cert_lifetime),
        now,
    )?)
}

fn record_set(metrics: &Metrics, set: &IssuerSet, state: &crate::state::State) {
    for (cluster, issuer) in &set.issuers {
        metrics
            .issuer_not_after
            .get_or_create(&ClusterLabel {
                cluster: cluster.clone(),
            })
            .set(issuer.not_after().unix_timestamp());
    }
    for r in state.active_roots() {
        if let Ok(info) = crate::pki::cert::CertInfo::from_pem_first(&r.cert_pem) {
            metrics
                .root_not_after
                .get_or_create(&RootLabel { root: r.id.clone() })
                .set(info.not_after.unix_timestamp());
        }
    }
    metrics.reloads.inc();
}

/// Polls the state store, swaps issuers, renews the serving certificate, refreshes JWKS.
async fn maintain(
    shared: Arc<Shared>,
    tokens: Arc<TokenAuthenticator>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = shared.loaded.config.clone();
    let mut tick =
        tokio::time::interval(config.serve.reload_interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let now = OffsetDateTime::now_utc();
        let mut renew = false;
        match shared.store.load() {
            Ok(Some(state)) if state.revision != shared.authority.current().revision => {
                let set = IssuerSet::build(&state, &config, now);
                if set.issuers.is_empty() {
                    tracing::error!(
                        revision = state.revision,
                        "new state has no usable issuer; keeping the current ones"
                    );
                } else {
                    let bundle_changed = set.roots != shared.authority.current().roots;
                    record_set(&shared.metrics, &set, &state);
                    tracing::info!(
                        revision = state.revision,
                        clusters = set.issuers.len(),
                        "issuers swapped"
                    );
                    shared.authority.swap(set);
                    renew = true;
                    if bundle_changed {
                        match tls::server_config(
                            shared.cert.clone(),
                            &shared.authority.current().roots,
                        ) {
                            Ok(c) => shared.tls_config.store(c),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot rebuild TLS config for the new bundle")
                            }
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read state; keeping the current issuers"),
        }
        let due = shared
            .serving
            .lock()
            .map(|s| now >= s.renew_at())
            .unwrap_or(true);
        if renew || due {
            match issue_serving(&config, &shared.authority.current(), now) {
                Ok(s) => {
                    shared.cert.swap(s.key.clone());
                    shared
                        .metrics
                        .serving_not_after
                        .set(s.not_after.unix_timestamp());
                    tracing::info!(serial = %s.serial, not_after = %s.not_after, "serving certificate renewed");
                    if let Ok(mut cur) = shared.serving.lock() {
                        *cur = s;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "serving certificate renewal failed; will retry")
                }
            }
        }
        for c in tokens.clusters() {
            c.refresh_if_stale().await;
        }
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The gRPC service as the workers run it.
type GrpcService = IstioCertificateServiceServer<CaService>;

/// How long a stopping server waits for in-flight requests before it closes what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// Serves gRPC over HTTP/2 on one connection until it closes. When `watcher`'s shutdown
/// starts, the connection sends GOAWAY, takes no new streams and ends once those in flight have
/// been answered. `peer` (an mTLS client's verified chain) is attached to every request.
///
/// This is hyper's HTTP/2 server driving the tonic service directly: tonic's own transport
/// adds a router, timeout and error-recovery layers and per-request connection info that this
/// single-service server does not need, and they cost a few percent of the machine per
/// certificate at full load.
async fn serve_connection<IO>(
    io: IO,
    svc: GrpcService,
    peer: Option<PeerCertificates>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            if let Some(p) = &peer {
                request.extensions_mut().insert(p.clone());
            }
            // Invariant: tonic's generated servers are always ready (`poll_ready` returns
            // `Ready(Ok)`), so `call` may be used without polling readiness first.
            svc.clone().call(request)
        });
    let mut http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    // Large flow-control windows: requests and responses are a few KiB, so WINDOW_UPDATE frames
    // (and the writes that carry them) become rare.
    // No `date` header: gRPC clients do not read it (gRPC servers commonly omit it), and it
    // cost a clock read and a changing header to encode on every response.
    http2
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(1024)
        .auto_date_header(false);
    let conn = http2.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Waits for the connections watched by `graceful` to finish their in-flight requests, for at
/// most [`DRAIN_TIMEOUT`].
async fn drain(graceful: hyper_util::server::graceful::GracefulShutdown) {
    let open = graceful.count();
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = open,
            "in-flight requests did not finish in time; closing their connections"
        );
    }
}

/// Serves plaintext HTTP/2 (h2c, for tests only) on `listener` until shutdown, then drains.
async fn plaintext_loop(
    listener: TcpListener,
    svc: GrpcService,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve_connection(tcp, svc.clone(), None, graceful.watcher()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drain(graceful).await;
}

/// How long a rotation lease lasts without renewal (renewed every third of it).
const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the rotation executor every `rotation.interval` while this replica may act.
fn rotation_thread(
    loaded: Loaded,
    fence: crate::lease::Fence,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    use crate::rotation::execute::{self, Context, Request};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("cannot start the rotation runtime; scheduled rotation is off");
        return;
    };
    rt.block_on(async move {
        let (store, backend) = match (
            crate::state::open(&loaded),
            crate::backend::open(&loaded),
        ) {
            (Ok(s), Ok(b)) => (s, b),
            (Err(e), _) => {
                tracing::error!(error = %e, "scheduled rotation is off: cannot open the state store");
                return;
            }
            (_, Err(e)) => {
                tracing::error!(error = %e, "scheduled rotation is off: cannot open the root backend");
                return;
            }
        };
        let interval = loaded.config.rotation.interval;
        let mut wait = std::time::Duration::ZERO;
        let mut last = crate::rotation::record::LastRun::load(&loaded);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            if !fence.may_act() {
                continue;
            }
            let ctx = Context {
                config: &loaded.config,
                backend: backend.as_ref(),
                policy: loaded.config.rotation_policy(),
                fence: fence.clone(),
            };
            let fleet = crate::trust::distribute::KubeFleet::new(&loaded);
            let now = time::OffsetDateTime::now_utc();
            let result = execute::run(&ctx, store.as_ref(), &fleet, now, &[], &Request::Due, &|s| {
                tracing::info!(step = ?s, "rotation");
            })
            .await;
            let outcome = match &result {
                Ok(r) => {
                    metrics.root_phase.set(match r.phase.name() {
                        "publish" => 1,
                        "switch" => 2,
                        "retire" => 3,
                        _ => 0,
                    });
                    for h in &r.held {
                        tracing::warn!(held = %h, "root rotation held");
                    }
                    if r.held.iter().any(|h| !h.contains("soaking")) { "held" } else { "ok" }
                }
                Err(_) => "failed",
            };
            let failures = if result.is_ok() { 0 } else { last.failures + 1 };
            wait = crate::rotation::record::backoff(failures, interval);
            if let Err(e) = &result {
                tracing::warn!(error = %e, retry_in = ?wait, "rotation run failed; retrying with backoff");
            }
            last = crate::rotation::record::LastRun::after(
                &last,
                "cactl serve",
                now,
                result.map(|r| r.held).map_err(|e| e.to_string()),
                time::Duration::try_from(wait).ok().map(|w| now + w),
            );
            if let Err(e) = last.save(&loaded) {
                tracing::warn!(error = %e, "cannot record the rotation run");
            }
            metrics
                .rotation_runs
                .get_or_create(&crate::telemetry::ReasonLabel {
                    reason: outcome.into(),
                })
                .inc();
        }
    });
}

/// Accepts connections and hands them to the workers in turn until shutdown.
async fn accept_loop(
    listener: TcpListener,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, std::net::SocketAddr)>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next = 0usize;
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                // Moves the socket out of this runtime (it stays non-blocking) into a worker's.
                let tcp = match tcp.into_std() {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot hand a connection to a worker");
                        continue;
                    }
                };
                let Some(worker) = workers.get(next % workers.len().max(1)) else {
                    break;
                };
                next = next.wrapping_add(1);
                if worker.send((tcp, peer)).is_err() {
                    tracing::warn!(%peer, "a gRPC worker has stopped; connection dropped");
                }
            }
        }
    }
}

/// One gRPC worker: a current-thread runtime that handshakes and serves the connections it is
/// handed until shutdown, then lets in-flight requests finish.
fn grpc_worker(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, std::net::SocketAddr)>,
    shared: Arc<Shared>,
    svc: IstioCertificateServiceServer<CaService>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    // This worker's log lines go out in batches: when it runs out of work, when a batch is
    // full, at least every `FLUSH_INTERVAL`, and when it ends (the guard).
    let _batch = crate::logging::batch_this_thread();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(crate::logging::flush_this_thread)
        .build()
        .map_err(|e| format!("worker runtime: {e}"))?;
    rt.block_on(async move {
        tokio::spawn(async {
            let mut tick = tokio::time::interval(crate::logging::FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                crate::logging::flush_this_thread();
            }
        });
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                handed = incoming.recv() => {
                    let Some((tcp, peer)) = handed else { break };
                    let tcp = match tokio::net::TcpStream::from_std(tcp) {
                        Ok(t) => crate::coalesce::Coalesced::new(t),
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot adopt a connection");
                            continue;
                        }
                    };
                    let acceptor = TlsAcceptor::from(shared.tls_config.load_full());
                    let (svc, watcher) = (svc.clone(), graceful.watcher());
                    // The handshake runs in the connection's own task so a slow client never
                    // holds up the others.
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let certs = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|c| PeerCertificates(Arc::new(c.to_vec())));
                                serve_connection(tls, svc, certs, watcher).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        drain(graceful).await;
        Ok(())
    })
}
