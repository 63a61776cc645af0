//! The Kubernetes state store: the state document in one Secret of the cluster cactl runs in,
//! so several `cactl serve` replicas (and `cactl` run as a Job) share one journal.
//!
//! Compare-and-swap has two layers: the Secret's `resourceVersion` (the API server refuses an
//! update built on a stale read with 409) and the state's own revision (checked against what
//! is stored). There is no lock beyond that: two writers can both try, and only one succeeds.
//!
//! The [`StateStore`] trait is synchronous; the store runs its requests on a
//! [`Bridge`](crate::bridge::Bridge), so it can be called from inside and outside async code.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use super::{Error, LockGuard, State, StateStore};
use crate::bridge::Bridge;

/// Key of the state document in the Secret.
pub const STATE_KEY: &str = "state.json";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Connection settings of the cluster holding the state.
#[derive(Clone, Debug)]
pub struct Home {
    /// Kubeconfig path (absolute); `None` for the in-cluster service account.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Context in the kubeconfig.
    pub context: Option<String>,
}

/// A state document in a Secret.
pub struct KubeStore {
    namespace: String,
    name: String,
    home: Home,
    /// Connected on first use, then reused.
    client: Arc<Mutex<Option<kube::Client>>>,
    bridge: Bridge,
    /// (state revision, resourceVersion) of the last document read or written.
    seen: Mutex<Option<(u64, String)>>,
}

struct NoLock;
impl LockGuard for NoLock {}

impl KubeStore {
    /// A store in Secret `namespace/name` of the cluster `home` points at. The connection is
    /// made on first use.
    pub fn new(home: Home, namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            home,
            client: Arc::new(Mutex::new(None)),
            bridge: Bridge::new("cactl-state-kube"),
            seen: Mutex::new(None),
        }
    }

    fn remote(&self, reason: impl Into<String>) -> Error {
        Error::Remote {
            location: self.location(),
            reason: reason.into(),
        }
    }

    /// Runs `f` on the Secrets API of the namespace, connecting first if needed.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Api<Secret>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, kube::Error>> + Send,
    {
        let (home, cached, ns) = (
            self.home.clone(),
            self.client.clone(),
            self.namespace.clone(),
        );
        let run = async move {
            let known = cached.lock().ok().and_then(|c| c.clone());
            let client = match known {
                Some(c) => c,
                None => {
                    let c = connect(&home).await?;
                    if let Ok(mut slot) = cached.lock() {
                        *slot = Some(c.clone());
                    }
                    c
                }
            };
            flatten(tokio::time::timeout(REQUEST_TIMEOUT, f(Api::namespaced(client, &ns))).await)
        };
        self.bridge
            .run(run, REQUEST_TIMEOUT + Duration::from_secs(10))
            .unwrap_or_else(|| Err("no answer from the Kubernetes API".into()))
            .map_err(|e| self.remote(e))
    }

    fn get(&self) -> Result<Option<Secret>, Error> {
        let name = self.name.clone();
        self.call(move |api| async move { api.get_opt(&name).await })
    }

    fn parse(&self, secret: &Secret) -> Result<State, Error> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(STATE_KEY))
            .ok_or_else(|| Error::Corrupt {
                location: self.location(),
                reason: format!("the Secret has no {STATE_KEY} key"),
            })?;
        State::from_json(&bytes.0, &self.location())
    }

    fn remember(&self, revision: u64, secret: &Secret) {
        if let (Ok(mut seen), Some(rv)) = (self.seen.lock(), &secret.metadata.resource_version) {
            *seen = Some((revision, rv.clone()));
        }
    }

    fn secret(&self, state: &State, resource_version: Option<String>) -> Secret {
        let mut data = BTreeMap::new();
        data.insert(STATE_KEY.to_owned(), ByteString(state.to_json()));
        let labels = BTreeMap::from([(
            crate::trust::desired::MANAGED_BY.0.to_owned(),
            crate::trust::desired::MANAGED_BY.1.to_owned(),
        )]);
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                resource_version,
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Secret::default()
        }
    }
}

impl StateStore for KubeStore {
    fn location(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    fn lock(&self) -> Result<Box<dyn LockGuard>, Error> {
        // Compare-and-swap on every save is the guard.
        Ok(Box::new(NoLock))
    }

    fn load(&self) -> Result<Option<State>, Error> {
        let Some(secret) = self.get()? else {
            return Ok(None);
        };
        let state = self.parse(&secret)?;
        self.remember(state.revision, &secret);
        Ok(Some(state))
    }

    fn save(&self, state: &State) -> Result<(), Error> {
        let conflict = |found: u64| Error::Conflict {
            location: self.location(),
            expected: state.revision.saturating_sub(1),
            found,
        };
        if state.revision <= 1 {
            let created = self
                .call({
                    let secret = self.secret(state, None);
                    move |api| async move { api.create(&PostParams::default(), &secret).await }
                })
                .map_err(|e| match e {
                    Error::Remote { reason, .. } if reason.contains("AlreadyExists") => conflict(0),
                    other => other,
                })?;
            self.remember(state.revision, &created);
            return Ok(());
        }
        let known = self.seen.lock().ok().and_then(|s| s.clone());
        let rv = match known {
            Some((rev, rv)) if rev + 1 == state.revision => rv,
            _ => {
                let Some(current) = self.get()? else {
                    return Err(Error::NotInitialized(self.location()));
                };
                let stored = self.parse(&current)?;
                if stored.revision + 1 != state.revision {
                    return Err(conflict(stored.revision));
                }
                current.metadata.resource_version.unwrap_or_default()
            }
        };
        let secret = self.secret(state, Some(rv));
        let name = self.name.clone();
        match self.call(move |api| async move {
            api.replace(&name, &PostParams::default(), &secret).await
        }) {
            Ok(written) => {
                self.remember(state.revision, &written);
                Ok(())
            }
            Err(Error::Remote { reason, .. }) if reason.contains("Conflict") => {
                let found = self
                    .get()
                    .ok()
                    .flatten()
                    .and_then(|s| self.parse(&s).ok())
                    .map_or(0, |s| s.revision);
                Err(conflict(found))
            }
            Err(e) => Err(e),
        }
    }
}

fn flatten<T>(r: Result<Result<T, kube::Error>, tokio::time::error::Elapsed>) -> Result<T, String> {
    match r {
        Err(_) => Err(format!(
            "the Kubernetes API did not answer within {}s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(kube::Error::Api(s))) => Err(format!("{} ({}): {}", s.reason, s.code, s.message)),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(v)) => Ok(v),
    }
}

/// A client for the cluster holding the state.
pub async fn connect(home: &Home) -> Result<kube::Client, String> {
    crate::tls::install_default_provider();
    let mut config = match &home.kubeconfig {
        None => kube::Config::incluster()
            .map_err(|e| format!("no state.kubeconfig and not running in a cluster ({e})"))?,
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            let opts = kube::config::KubeConfigOptions {
                context: home.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(REQUEST_TIMEOUT);
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
