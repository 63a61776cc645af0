//! Access to member clusters' API servers: building a `kube` client from a kubeconfig (path and
//! context) or in-cluster credentials, and the watches the signing service keeps (the pod index
//! for node authorization).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::config::{ClusterConfig, Loaded};
use crate::grpc::node_authz::{MemoryPodIndex, PodIndex, PodInfo};

/// Errors reaching a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credentials configured.
    #[error("cluster {0:?} has no kubeconfig and is not in_cluster")]
    NoAccess(String),
    /// Kubeconfig problems.
    #[error("cluster {cluster:?}: kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// Cluster.
        cluster: String,
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// In-cluster configuration problems.
    #[error("cluster {cluster:?}: in-cluster credentials: {reason}")]
    InCluster {
        /// Cluster.
        cluster: String,
        /// Why.
        reason: String,
    },
    /// Client construction.
    #[error("cluster {cluster:?}: {reason}")]
    Client {
        /// Cluster.
        cluster: String,
        /// Why.
        reason: String,
    },
}

/// Builds a client for `cluster`, with connect and read timeouts.
pub async fn client(
    loaded: &Loaded,
    cluster: &ClusterConfig,
    read_timeout: Option<Duration>,
) -> Result<kube::Client, Error> {
    crate::tls::install_default_provider();
    let mut config = if cluster.in_cluster {
        kube::Config::incluster().map_err(|e| Error::InCluster {
            cluster: cluster.name.clone(),
            reason: e.to_string(),
        })?
    } else if let Some(path) = &cluster.kubeconfig {
        let path = loaded.resolve(path);
        let kerr = |reason: String| Error::Kubeconfig {
            cluster: cluster.name.clone(),
            path: path.display().to_string(),
            reason,
        };
        let kc = kube::config::Kubeconfig::read_from(&path).map_err(|e| kerr(e.to_string()))?;
        let opts = kube::config::KubeConfigOptions {
            context: cluster.context.clone(),
            ..Default::default()
        };
        kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|e| kerr(e.to_string()))?
    } else {
        return Err(Error::NoAccess(cluster.name.clone()));
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    if let Some(t) = read_timeout {
        config.read_timeout = Some(t);
        config.write_timeout = Some(t);
    }
    kube::Client::try_from(config).map_err(|e| Error::Client {
        cluster: cluster.name.clone(),
        reason: e.to_string(),
    })
}

/// A pod index kept current by a watch on all pods of a cluster.
#[derive(Debug, Default)]
pub struct WatchedPods {
    index: std::sync::RwLock<MemoryPodIndex>,
    synced: AtomicBool,
}

impl WatchedPods {
    /// Whether the initial list has been loaded.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}

impl PodIndex for WatchedPods {
    fn node_of(&self, namespace: &str, pod: &str) -> Option<String> {
        self.index.read().ok()?.node_of(namespace, pod)
    }

    fn has_workload(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.index
            .read()
            .map(|i| i.has_workload(node, namespace, service_account))
            .unwrap_or(false)
    }
}

fn pod_info(p: &Pod) -> Option<PodInfo> {
    let spec = p.spec.as_ref()?;
    Some(PodInfo {
        namespace: p.metadata.namespace.clone()?,
        name: p.metadata.name.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name.clone().unwrap_or_default(),
        finished: matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
    })
}

/// Starts watching pods; the index fills as events arrive, and is rebuilt on every re-list.
pub fn watch_pods(cluster: String, client: kube::Client) -> Arc<WatchedPods> {
    let pods = Arc::new(WatchedPods::default());
    let out = pods.clone();
    tokio::spawn(async move {
        let api: kube::Api<Pod> = kube::Api::all(client);
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        let mut fresh: Option<MemoryPodIndex> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => fresh = Some(MemoryPodIndex::default()),
                Ok(watcher::Event::InitApply(p)) => {
                    if let (Some(f), Some(info)) = (fresh.as_mut(), pod_info(&p)) {
                        f.upsert(info);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let (Some(f), Ok(mut idx)) = (fresh.take(), pods.index.write()) {
                        *idx = f;
                    }
                    pods.synced.store(true, Ordering::Relaxed);
                    tracing::info!(cluster = %cluster, "pod index synced");
                }
                Ok(watcher::Event::Apply(p)) => {
                    if let (Some(info), Ok(mut idx)) = (pod_info(&p), pods.index.write()) {
                        idx.upsert(info);
                    }
                }
                Ok(watcher::Event::Delete(p)) => {
                    if let (Some(ns), Some(name), Ok(mut idx)) = (
                        p.metadata.namespace.as_deref(),
                        p.metadata.name.as_deref(),
                        pods.index.write(),
                    ) {
                        idx.remove(ns, name);
                    }
                }
                Err(e) => {
                    tracing::warn!(cluster = %cluster, error = %e, "pod watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    out
}
