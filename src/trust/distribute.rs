//! Pushing to every selected cluster concurrently, with a bound, per-cluster retries with
//! backoff, and a report per cluster: one unreachable or failing cluster never blocks the
//! others.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::desired::{self, Inputs};
use super::push::{self, ClusterReport, Options, Target};
use crate::config::{ClusterConfig, ClusterMode, Loaded};
use crate::rotation::execute::{Fleet, Observation};
use crate::state::State;

/// The record of the last push per cluster, kept beside the state (`push-status.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushStatus {
    /// Cluster → last outcome.
    pub clusters: BTreeMap<String, LastPush>,
}

/// One cluster's last push.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastPush {
    /// When it finished.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Whether it succeeded.
    pub ok: bool,
    /// Summary line.
    pub summary: String,
    /// Error, if any.
    pub error: Option<String>,
}

const STATUS_FILE: &str = "push-status.json";

impl PushStatus {
    /// Loads the record (empty when absent or unreadable).
    pub fn load(loaded: &Loaded) -> Self {
        std::fs::read(loaded.state_dir().join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records reports and saves atomically.
    pub fn record(
        loaded: &Loaded,
        reports: &[ClusterReport],
        now: OffsetDateTime,
    ) -> std::io::Result<()> {
        let mut st = Self::load(loaded);
        for r in reports {
            st.clusters.insert(
                r.cluster.clone(),
                LastPush {
                    at: now,
                    ok: r.ok(),
                    summary: r.summary(),
                    error: r.error.clone(),
                },
            );
        }
        let dir = loaded.state_dir();
        crate::fsutil::ensure_dir(&dir, 0o700)?;
        let bytes = serde_json::to_vec_pretty(&st).unwrap_or_default();
        crate::fsutil::write_atomic(&dir.join(STATUS_FILE), &bytes, 0o600)
    }
}

/// The inputs of a cluster that do not depend on what it holds.
struct Plan {
    bundle_pem: String,
    cacerts: Option<crate::cacerts::CaCerts>,
    istiod_tls: Option<(String, String)>,
    generation: u64,
}

fn plan(loaded: &Loaded, state: &State, c: &ClusterConfig) -> Result<Plan, String> {
    let roots = crate::ca::bundle_roots(state).map_err(|e| e.to_string())?;
    let cacerts = match c.mode {
        ClusterMode::Plugin => {
            Some(crate::ca::cacerts(state, &loaded.config, &c.name).map_err(|e| e.to_string())?)
        }
        ClusterMode::External => None,
    };
    let istiod_tls = if c.mode == ClusterMode::External && c.istiod_tls {
        let rec = state
            .clusters
            .get(&c.name)
            .and_then(|s| s.istiod_tls.as_ref())
            .ok_or_else(|| format!("no istiod-tls certificate issued for {:?} yet", c.name))?;
        Some((rec.cert_pem.clone(), rec.key_pem.expose().to_owned()))
    } else {
        None
    };
    Ok(Plan {
        bundle_pem: crate::bundle::pem(&roots),
        cacerts,
        istiod_tls,
        generation: state.revision,
    })
}

fn failed(cluster: &str, error: String) -> ClusterReport {
    ClusterReport {
        cluster: cluster.to_owned(),
        reachable: false,
        error: Some(error),
        objects: Vec::new(),
        istiod_has_bundle: None,
        writes: 0,
        attempts: 0,
        millis: 0,
    }
}

/// Reconciles one cluster, retrying with backoff.
pub async fn one(
    loaded: &Loaded,
    state: &State,
    c: &ClusterConfig,
    opts: Options,
) -> ClusterReport {
    if !c.has_api_access() {
        return failed(&c.name, "no kubeconfig or in_cluster configured".into());
    }
    let plan = match plan(loaded, state, c) {
        Ok(p) => p,
        Err(e) => return failed(&c.name, e),
    };
    let cfg = &loaded.config.push;
    // The client's own timeouts stay above ours, so a hang is reported as our timeout.
    let client = match crate::cluster::client(
        loaded,
        c,
        Some(cfg.request_timeout + Duration::from_secs(5)),
    )
    .await
    {
        Ok(cl) => cl,
        Err(e) => return failed(&c.name, e.to_string()),
    };
    let target = Target::new(client, cfg);
    let make = |namespaces: &[(String, bool, BTreeMap<String, String>)]| {
        desired::desired(&Inputs {
            mode: c.mode,
            namespace: &c.namespace,
            bundle_pem: &plan.bundle_pem,
            cacerts: plan.cacerts.as_ref(),
            istiod_tls: plan
                .istiod_tls
                .as_ref()
                .map(|(a, b)| (a.as_str(), b.as_str())),
            namespaces,
            namespace_selector: c.namespace_selector.as_deref(),
            cluster_trust_bundle: c.cluster_trust_bundle.as_deref(),
            generation: plan.generation,
        })
    };
    let external = c.mode == ClusterMode::External;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut r = push::reconcile(
            &c.name,
            &target,
            external,
            &c.namespace,
            make,
            &plan.bundle_pem,
            opts,
        )
        .await;
        r.attempts = attempt;
        let permanent = r
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("missing permission"))
            || r.objects
                .iter()
                .any(|o| matches!(o.action, push::Action::SkippedNotOurs));
        if r.error.is_none() || permanent || attempt >= opts.attempts.unwrap_or(cfg.attempts) {
            return r;
        }
        tracing::warn!(cluster = %c.name, attempt, error = ?r.error, "push failed; retrying");
        tokio::time::sleep(Duration::from_millis(300 * (1 << attempt.min(5)))).await;
    }
}

/// Pushes to `clusters` (all declared clusters when empty), at most `push.concurrency` at a
/// time, calling `progress` as each finishes.
pub async fn all(
    loaded: &Loaded,
    state: &State,
    only: &[String],
    opts: Options,
    progress: impl Fn(&ClusterReport),
) -> Vec<ClusterReport> {
    let selected: Vec<&ClusterConfig> = loaded
        .config
        .clusters
        .iter()
        .filter(|c| only.is_empty() || only.contains(&c.name))
        .collect();
    let mut out: Vec<ClusterReport> = futures::stream::iter(selected)
        .map(|c| one(loaded, state, c, opts))
        .buffer_unordered(loaded.config.push.concurrency.max(1))
        .inspect(|r| progress(r))
        .collect()
        .await;
    out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    out
}

/// The member clusters as the rotation executor sees them: observation is a dry-run push (every
/// object read back and compared with what the state says, plus istiod's pickup of the bundle
/// in plugin mode); a push writes and then observes again.
pub struct KubeFleet<'a> {
    loaded: &'a Loaded,
    reports: std::sync::Mutex<Vec<ClusterReport>>,
}

impl<'a> KubeFleet<'a> {
    /// Clusters from `loaded`'s configuration.
    pub fn new(loaded: &'a Loaded) -> Self {
        Self {
            loaded,
            reports: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The reports of the pushes made so far (for `push-status.json`).
    pub fn push_reports(&self) -> Vec<ClusterReport> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    async fn read_back(&self, state: &State, c: &ClusterConfig) -> Observation {
        let opts = Options {
            dry_run: true,
            adopt: false,
            attempts: Some(1),
        };
        observation(&one(self.loaded, state, c, opts).await)
    }
}

/// What a dry-run report says about a cluster.
pub fn observation(r: &ClusterReport) -> Observation {
    let drifted: Vec<&str> = r
        .objects
        .iter()
        .filter(|o| !matches!(o.action, push::Action::Unchanged))
        .map(|o| o.object.as_str())
        .collect();
    let detail = if let Some(e) = &r.error {
        Some(e.clone())
    } else if !drifted.is_empty() {
        Some(format!("does not hold: {}", drifted.join(", ")))
    } else if r.istiod_has_bundle == Some(false) {
        Some("istiod has not yet published the bundle in istio-ca-root-cert".into())
    } else {
        None
    };
    Observation {
        reachable: r.reachable,
        in_sync: r.reachable && detail.is_none(),
        detail,
        no_access: false,
    }
}

impl Fleet for KubeFleet<'_> {
    async fn observe(&self, state: &State, cluster: &str) -> Observation {
        match self.loaded.config.cluster(cluster) {
            Some(c) if c.has_api_access() => self.read_back(state, c).await,
            Some(_) => Observation {
                reachable: false,
                in_sync: false,
                detail: Some(
                    "no kubeconfig or in_cluster configured: cactl cannot read this cluster back"
                        .into(),
                ),
                no_access: true,
            },
            None => Observation {
                reachable: false,
                in_sync: false,
                detail: Some("not in the configuration".into()),
                no_access: true,
            },
        }
    }

    async fn push(&self, state: &State, cluster: &str) -> Observation {
        let Some(c) = self.loaded.config.cluster(cluster) else {
            return self.observe(state, cluster).await;
        };
        let r = one(self.loaded, state, c, Options::default()).await;
        let failed = !r.ok();
        let o = if failed {
            observation(&r)
        } else {
            self.read_back(state, c).await
        };
        if let Ok(mut reports) = self.reports.lock() {
            reports.push(r);
        }
        o
    }
}

/// Keeps one cluster in sync from inside `cactl serve`: reconciles at start, on every change
/// to an object cactl manages there (or to namespaces, in external mode), on a new state
/// revision, and every `push.resync_interval`.
pub async fn sync_loop(
    loaded: Loaded,
    store: std::sync::Arc<dyn crate::state::StateStore + Send + Sync>,
    cluster: ClusterConfig,
    fence: crate::lease::Fence,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    on_report: impl Fn(&ClusterReport) + Send + 'static,
) {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
    use kube::runtime::watcher;

    let (kick_tx, mut kick_rx) = tokio::sync::mpsc::channel::<()>(1);
    // Watches that only nudge the loop; the loop reads everything it needs itself.
    match crate::cluster::client(&loaded, &cluster, None).await {
        Ok(client) => {
            // Narrow watches that match the RBAC in deploy/member-cluster: by name in the Istio
            // namespace, and (external mode only) managed ConfigMaps across namespaces plus
            // namespaces themselves.
            let by_name =
                |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
            let kick = kick_tx.clone();
            let bundle: kube::Api<ConfigMap> =
                kube::Api::namespaced(client.clone(), &cluster.namespace);
            tokio::spawn(nudge(
                watcher::watcher(bundle, by_name(desired::TRUST_BUNDLE_CONFIGMAP)),
                kick,
            ));
            let secret = match cluster.mode {
                ClusterMode::Plugin => Some("cacerts"),
                ClusterMode::External if cluster.istiod_tls => Some("istiod-tls"),
                ClusterMode::External => None,
            };
            if let Some(name) = secret {
                let kick = kick_tx.clone();
                let secrets: kube::Api<Secret> =
                    kube::Api::namespaced(client.clone(), &cluster.namespace);
                tokio::spawn(nudge(watcher::watcher(secrets, by_name(name)), kick));
            }
            if cluster.mode == ClusterMode::External {
                let managed = format!("{}={}", desired::MANAGED_BY.0, desired::MANAGED_BY.1);
                let kick = kick_tx.clone();
                let cms: kube::Api<ConfigMap> = kube::Api::all(client.clone());
                tokio::spawn(nudge(
                    watcher::watcher(cms, watcher::Config::default().labels(&managed)),
                    kick,
                ));
                let kick = kick_tx.clone();
                let nss: kube::Api<Namespace> = kube::Api::all(client);
                tokio::spawn(nudge(
                    watcher::watcher(nss, watcher::Config::default()),
                    kick,
                ));
            }
        }
        Err(e) => {
            tracing::error!(cluster = %cluster.name, error = %e, "no watches; relying on periodic resync")
        }
    }
    let mut tick = tokio::time::interval(
        loaded
            .config
            .push
            .resync_interval
            .max(Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(
        loaded
            .config
            .serve
            .reload_interval
            .max(Duration::from_millis(100)),
    );
    loop {
        // Only the replica holding the lease pushes.
        while !fence.may_act() {
            tokio::select! {
                () = stopped(&mut shutdown) => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let state = match store.load() {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!("no state to push");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read state for push");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let revision = state.revision;
        let report = one(&loaded, &state, &cluster, Options::default()).await;
        if report.writes > 0 || report.error.is_some() {
            tracing::info!(cluster = %cluster.name, writes = report.writes, error = ?report.error, summary = %report.summary(), "cluster sync");
        }
        on_report(&report);
        // Wait for a reason to look again.
        loop {
            tokio::select! {
                () = stopped(&mut shutdown) => return,
                _ = tick.tick() => break,
                Some(()) = kick_rx.recv() => {
                    // Let a burst of events settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while kick_rx.try_recv().is_ok() {}
                    break;
                }
                _ = poll.tick() => {
                    if store.load().ok().flatten().is_some_and(|s| s.revision != revision) {
                        break;
                    }
                }
            }
        }
    }
}

async fn nudge<K, S>(stream: S, kick: tokio::sync::mpsc::Sender<()>)
where
    S: futures::Stream<
            Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>,
        >,
{
    use kube::runtime::watcher::Event;
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                let _ = kick.try_send(());
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
