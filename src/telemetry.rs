//! Observability: Prometheus metrics and the `/healthz` and `/readyz` endpoints, served on their
//! own thread and runtime so they stay responsive while every gRPC worker is busy signing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Cluster (empty when the request failed before the cluster was known).
    pub cluster: String,
    /// gRPC status code name.
    pub code: String,
}

/// A cluster label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Cluster name.
    pub cluster: String,
}

/// A root label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RootLabel {
    /// Root id.
    pub root: String,
}

/// A reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// All metrics of `cactl serve`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `cactl_requests_total{cluster,code}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `cactl_sign_duration_seconds`: from request arrival to response, successful requests.
    pub sign_seconds: Histogram,
    /// `cactl_issuer_not_after_timestamp_seconds{cluster}`.
    pub issuer_not_after: Family<ClusterLabel, Gauge>,
    /// `cactl_root_not_after_timestamp_seconds{root}`.
    pub root_not_after: Family<RootLabel, Gauge>,
    /// `cactl_serving_cert_not_after_timestamp_seconds`.
    pub serving_not_after: Gauge,
    /// `cactl_auth_cache_hits_total`.
    pub auth_cache_hits: Counter,
    /// `cactl_auth_cache_misses_total`.
    pub auth_cache_misses: Counter,
    /// `cactl_auth_failures_total{reason}`.
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// `cactl_issuer_reloads_total`.
    pub reloads: Counter,
    /// `cactl_cluster_in_sync{cluster}`: 1 when the last sync left the cluster as it should be.
    pub cluster_sync: Family<ClusterLabel, Gauge>,
    /// `cactl_push_writes_total{cluster}`: objects written to clusters.
    pub push_writes: Family<ClusterLabel, Counter>,
    /// `cactl_rotation_runs_total{reason}`: rotation executor runs by outcome (`ok`, `held`,
    /// `failed`).
    pub rotation_runs: Family<ReasonLabel, Counter>,
    /// `cactl_root_rotation_phase`: 0 stable, 1 publish, 2 switch, 3 retire.
    pub root_phase: Gauge,
    /// `cactl_leader`: 1 while this replica holds the rotation lease (or no lease is used).
    pub leader: Gauge,
    /// Whether the service is ready (issuers and serving certificate loaded).
    pub ready: AtomicBool,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cactl");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "CreateCertificate requests by cluster and gRPC code",
            requests.clone(),
        );
        let sign_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "sign_duration_seconds",
            "Time to answer a successful CreateCertificate",
            sign_seconds.clone(),
        );
        let issuer_not_after = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "issuer_not_after_timestamp_seconds",
            "NotAfter of each cluster's active intermediate",
            issuer_not_after.clone(),
        );
        let root_not_after = Family::<RootLabel, Gauge>::default();
        registry.register(
            "root_not_after_timestamp_seconds",
            "NotAfter of each trusted root",
            root_not_after.clone(),
        );
        let serving_not_after = Gauge::default();
        registry.register(
            "serving_cert_not_after_timestamp_seconds",
            "NotAfter of the gRPC serving certificate",
            serving_not_after.clone(),
        );
        let auth_cache_hits = Counter::default();
        registry.register(
            "auth_cache_hits",
            "Requests authenticated from the verified-token cache",
            auth_cache_hits.clone(),
        );
        let auth_cache_misses = Counter::default();
        registry.register(
            "auth_cache_misses",
            "Requests whose token needed a signature check",
            auth_cache_misses.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "Authentication failures by reason",
            auth_failures.clone(),
        );
        let cluster_sync = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "cluster_in_sync",
            "1 when the last sync left the cluster holding what it should",
            cluster_sync.clone(),
        );
        let push_writes = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "push_writes",
            "Objects written to member clusters",
            push_writes.clone(),
        );
        let reloads = Counter::default();
        registry.register(
            "issuer_reloads",
            "Issuer sets loaded (start and every state change)",
            reloads.clone(),
        );
        let rotation_runs = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rotation_runs",
            "Rotation executor runs by outcome (ok, held, failed)",
            rotation_runs.clone(),
        );
        let root_phase = Gauge::default();
        registry.register(
            "root_rotation_phase",
            "Root rotation phase: 0 stable, 1 publish, 2 switch, 3 retire",
            root_phase.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica rotates and pushes (holds the lease, or no lease is used)",
            leader.clone(),
        );
        Self {
            registry,
            requests,
            sign_seconds,
            issuer_not_after,
            root_not_after,
            serving_not_after,
            auth_cache_hits,
            auth_cache_misses,
            auth_failures,
            reloads,
            cluster_sync,
            push_writes,
            rotation_runs,
            root_phase,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Invariant: encoding into a String cannot fail (fmt::Write to String is infallible).
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` from a dedicated thread until
/// `shutdown` resolves. Returns the bound address.
pub fn spawn_http(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let handle = std::thread::Builder::new()
        .name("cactl-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the metrics runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics listener");
                        return;
                    }
                };
                use axum::routing::get;
                let m1 = metrics.clone();
                let m2 = metrics.clone();
                let app = axum::Router::new()
                    .route("/healthz", get(|| async { "ok\n" }))
                    .route(
                        "/readyz",
                        get(move || async move {
                            if m1.ready.load(Ordering::Relaxed) {
                                (axum::http::StatusCode::OK, "ready\n")
                            } else {
                                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                            }
                        }),
                    )
                    .route(
                        "/metrics",
                        get(move || async move {
                            (
                                [(
                                    axum::http::header::CONTENT_TYPE,
                                    "text/plain; version=0.0.4; charset=utf-8",
                                )],
                                m2.encode(),
                            )
                        }),
                    );
                let mut shutdown = shutdown;
                let stop = async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!(error = %e, "metrics server failed");
                }
            });
        })?;
    Ok((addr, handle))
}
