//! Pushing desired objects into a cluster: observe (read back), compare, and write only the
//! difference, one object at a time, with resourceVersion preconditions and a re-read on 409.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use serde::Serialize;

use super::desired::{self, Desired, Kind, Observed, Sync};
use crate::config::PushConfig;

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Already in sync; nothing written.
    Unchanged,
    /// Created (201).
    Created,
    /// Updated (200).
    Updated,
    /// Would be created or updated (dry run).
    WouldWrite,
    /// Present but not created by cactl, and adoption was not asked for.
    SkippedNotOurs,
    /// The write failed.
    Failed(String),
}

/// One object's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectReport {
    /// `Kind namespace/name`.
    pub object: String,
    /// How it compared before the push.
    pub before: Sync,
    /// What was done.
    pub action: Action,
}

/// One cluster's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    /// Cluster name.
    pub cluster: String,
    /// Whether the API server answered.
    pub reachable: bool,
    /// Failure that stopped the cluster, if any.
    pub error: Option<String>,
    /// Per object.
    pub objects: Vec<ObjectReport>,
    /// Plugin mode: whether istiod's `istio-ca-root-cert` holds the whole bundle.
    pub istiod_has_bundle: Option<bool>,
    /// Writes sent.
    pub writes: usize,
    /// Attempts made.
    pub attempts: u32,
    /// Wall time.
    pub millis: u128,
}

impl ClusterReport {
    /// Whether everything is in place (or would be, in a dry run).
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self
                .objects
                .iter()
                .all(|o| !matches!(o.action, Action::Failed(_) | Action::SkippedNotOurs))
    }

    /// Counts by action, for progress lines.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &self.objects {
            let k = match &o.action {
                Action::Unchanged => "unchanged",
                Action::Created => "created",
                Action::Updated => "updated",
                Action::WouldWrite => "would write",
                Action::SkippedNotOurs => "not ours (use --adopt)",
                Action::Failed(_) => "failed",
            };
            *counts.entry(k).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!("{} object(s): {}", self.objects.len(), parts.join(", "))
    }
}

/// Errors talking to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A permission is missing.
    #[error(
        "missing permission: cannot {verb} {resource} {name} (403 Forbidden); see deploy/kubernetes/rbac.yaml"
    )]
    Forbidden {
        /// Verb.
        verb: &'static str,
        /// Resource.
        resource: String,
        /// Name (or namespace/name).
        name: String,
    },
    /// 409: changed or created concurrently.
    #[error("conflict on {0}")]
    Conflict(String),
    /// The API server failed or could not be reached.
    #[error("{0}")]
    Api(String),
    /// Timed out.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
}

/// A cluster's API with a client-side rate limit and request timeout.
#[derive(Clone)]
pub struct Target {
    client: kube::Client,
    limiter: Arc<tokio::sync::Mutex<Instant>>,
    interval: Duration,
    timeout: Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Target {
    /// Wraps a client with the push settings.
    pub fn new(client: kube::Client, cfg: &PushConfig) -> Self {
        Self {
            client,
            limiter: Arc::new(tokio::sync::Mutex::new(Instant::now())),
            interval: Duration::from_secs(1) / cfg.qps.max(1),
            timeout: cfg.request_timeout,
            in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.requests_in_flight.max(1))),
        }
    }

    async fn call<T, F>(
        &self,
        verb: &'static str,
        resource: &str,
        name: &str,
        f: F,
    ) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| Error::Api(e.to_string()))?;
        {
            let mut next = self.limiter.lock().await;
            let now = Instant::now();
            if *next > now {
                tokio::time::sleep(*next - now).await;
            }
            *next = Instant::now().max(*next) + self.interval;
        }
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(Error::Timeout(self.timeout)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                Err(Error::Conflict(format!("{resource} {name}")))
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 403 => Err(Error::Forbidden {
                verb,
                resource: resource.to_owned(),
                name: name.to_owned(),
            }),
            Ok(Err(e)) => Err(Error::Api(e.to_string())),
        }
    }
}

/// What a cluster holds, read back. No `Debug`: it holds Secrets as read.
#[derive(Clone, Default)]
pub struct ClusterView {
    /// Namespaces: name, terminating, labels.
    pub namespaces: Vec<(String, bool, BTreeMap<String, String>)>,
    /// Observed objects by (kind, namespace, name).
    pub objects: BTreeMap<(Kind, String, String), Observed>,
    /// istiod's `istio-ca-root-cert` content in the Istio namespace.
    pub istiod_root_cert: Option<String>,
    /// The objects as read, for updates that keep what cactl does not manage.
    pub raw: BTreeMap<(Kind, String, String), Raw>,
}

/// An object as read from the API. No `Debug`: a Secret's data would show.
#[derive(Clone)]
pub enum Raw {
    /// A ConfigMap.
    ConfigMap(Box<ConfigMap>),
    /// A Secret.
    Secret(Box<Secret>),
    /// A ClusterTrustBundle.
    ClusterTrustBundle(Box<ClusterTrustBundle>),
}

fn meta_maps(m: &ObjectMeta) -> (BTreeMap<String, String>, BTreeMap<String, String>, String) {
    (
        m.labels.clone().unwrap_or_default(),
        m.annotations.clone().unwrap_or_default(),
        m.resource_version.clone().unwrap_or_default(),
    )
}

fn observe_cm(cm: &ConfigMap) -> Observed {
    let (labels, annotations, resource_version) = meta_maps(&cm.metadata);
    Observed {
        data: cm.data.clone().unwrap_or_default(),
        labels,
        annotations,
        resource_version,
    }
}

fn observe_secret(s: &Secret) -> Observed {
    let (labels, annotations, resource_version) = meta_maps(&s.metadata);
    let data = s
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    Observed {
        data,
        labels,
        annotations,
        resource_version,
    }
}

fn observe_ctb(c: &ClusterTrustBundle) -> Observed {
    let (labels, annotations, resource_version) = meta_maps(&c.metadata);
    let mut data = BTreeMap::new();
    data.insert("trustBundle".to_owned(), c.spec.trust_bundle.clone());
    if let Some(s) = &c.spec.signer_name {
        data.insert("signerName".to_owned(), s.clone());
    }
    Observed {
        data,
        labels,
        annotations,
        resource_version,
    }
}

async fn get_opt<T, F>(t: &Target, resource: &str, name: &str, f: F) -> Result<Option<T>, Error>
where
    F: std::future::Future<Output = Result<Option<T>, kube::Error>>,
{
    t.call("get", resource, name, f).await
}

/// Reads back everything `want` refers to, plus namespaces (external mode) and istiod's
/// `istio-ca-root-cert` in `istio_ns`. Reads only: lists where one list covers many objects.
pub async fn observe(
    t: &Target,
    want_external: bool,
    istio_ns: &str,
    make_desired: &impl Fn(&[(String, bool, BTreeMap<String, String>)]) -> Vec<Desired>,
) -> Result<ClusterView, Error> {
    let mut view = ClusterView::default();
    if want_external {
        let nss: Api<Namespace> = Api::all(t.client.clone());
        let list = t
            .call("list", "namespaces", "", nss.list(&ListParams::default()))
            .await?;
        for n in list.items {
            let name = n.metadata.name.clone().unwrap_or_default();
            let terminating = n.metadata.deletion_timestamp.is_some()
                || n.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
            view.namespaces.push((
                name,
                terminating,
                n.metadata.labels.clone().unwrap_or_default(),
            ));
        }
        let cms: Api<ConfigMap> = Api::all(t.client.clone());
        let lp = ListParams::default()
            .fields(&format!("metadata.name={}", desired::ROOT_CERT_CONFIGMAP));
        let list = t
            .call(
                "list",
                "configmaps",
                desired::ROOT_CERT_CONFIGMAP,
                cms.list(&lp),
            )
            .await?;
        for cm in list.items {
            let ns = cm.metadata.namespace.clone().unwrap_or_default();
            let key = (Kind::ConfigMap, ns, desired::ROOT_CERT_CONFIGMAP.to_owned());
            view.objects.insert(key.clone(), observe_cm(&cm));
            view.raw.insert(key, Raw::ConfigMap(Box::new(cm)));
        }
    } else {
        let cms: Api<ConfigMap> = Api::namespaced(t.client.clone(), istio_ns);
        let name = desired::ROOT_CERT_CONFIGMAP;
        if let Some(cm) = get_opt(
            t,
            "configmaps",
            &format!("{istio_ns}/{name}"),
            cms.get_opt(name),
        )
        .await?
        {
            view.istiod_root_cert = cm
                .data
                .as_ref()
                .and_then(|d| d.get("root-cert.pem").cloned());
            let key = (Kind::ConfigMap, istio_ns.to_owned(), name.to_owned());
            view.objects.insert(key.clone(), observe_cm(&cm));
            view.raw.insert(key, Raw::ConfigMap(Box::new(cm)));
        }
    }
    let want = make_desired(&view.namespaces);
    for d in &want {
        let key = (d.kind, d.namespace.clone(), d.name.clone());
        if view.objects.contains_key(&key)
            || (want_external && d.name == desired::ROOT_CERT_CONFIGMAP)
        {
            continue;
        }
        if let Some(raw) = read(t, d).await? {
            view.objects.insert(key.clone(), raw.observed());
            view.raw.insert(key, raw);
        }
    }
    Ok(view)
}

impl Raw {
    fn observed(&self) -> Observed {
        match self {
            Self::ConfigMap(o) => observe_cm(o),
            Self::Secret(o) => observe_secret(o),
            Self::ClusterTrustBundle(o) => observe_ctb(o),
        }
    }
}

/// Reads the current version of `d`'s object.
async fn read(t: &Target, d: &Desired) -> Result<Option<Raw>, Error> {
    let id = format!("{}/{}", d.namespace, d.name);
    Ok(match d.kind {
        Kind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(t.client.clone(), &d.namespace);
            get_opt(t, "configmaps", &id, api.get_opt(&d.name))
                .await?
                .map(|o| Raw::ConfigMap(Box::new(o)))
        }
        Kind::Secret => {
            let api: Api<Secret> = Api::namespaced(t.client.clone(), &d.namespace);
            get_opt(t, "secrets", &id, api.get_opt(&d.name))
                .await?
                .map(|o| Raw::Secret(Box::new(o)))
        }
        Kind::ClusterTrustBundle => {
            let api: Api<ClusterTrustBundle> = Api::all(t.client.clone());
            get_opt(t, "clustertrustbundles", &d.name, api.get_opt(&d.name))
                .await?
                .map(|o| Raw::ClusterTrustBundle(Box::new(o)))
        }
    })
}

fn stamp(meta: &mut ObjectMeta, d: &Desired) {
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(
        desired::MANAGED_BY.0.to_owned(),
        desired::MANAGED_BY.1.to_owned(),
    );
    for (k, v) in &d.labels {
        labels.insert(k.clone(), v.clone());
    }
    let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(desired::HASH_ANNOTATION.to_owned(), d.hash.clone());
    ann.insert(
        desired::GENERATION_ANNOTATION.to_owned(),
        d.generation.to_string(),
    );
}

/// Writes one object: create if absent, otherwise update `current` (keeping keys, labels and
/// annotations cactl does not manage) with its resourceVersion as precondition; on 409 the
/// object is read again and the write retried.
async fn write(t: &Target, d: &Desired, current: Option<Raw>) -> Result<Action, Error> {
    let mut current = current;
    let pp = PostParams::default();
    let id = format!("{}/{}", d.namespace, d.name);
    for _attempt in 0..5 {
        let result = match current.take() {
            None => match d.kind {
                Kind::ConfigMap => {
                    let api: Api<ConfigMap> = Api::namespaced(t.client.clone(), &d.namespace);
                    let mut cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(d.name.clone()),
                            namespace: Some(d.namespace.clone()),
                            ..Default::default()
                        },
                        data: Some(d.data.clone()),
                        ..Default::default()
                    };
                    stamp(&mut cm.metadata, d);
                    t.call("create", "configmaps", &id, api.create(&pp, &cm))
                        .await
                        .map(|_| Action::Created)
                }
                Kind::Secret => {
                    let api: Api<Secret> = Api::namespaced(t.client.clone(), &d.namespace);
                    let mut s = Secret {
                        metadata: ObjectMeta {
                            name: Some(d.name.clone()),
                            namespace: Some(d.namespace.clone()),
                            ..Default::default()
                        },
                        data: Some(secret_bytes(&d.data)),
                        type_: Some(if d.name == "istiod-tls" {
                            "kubernetes.io/tls".into()
                        } else {
                            "Opaque".into()
                        }),
                        ..Default::default()
                    };
                    stamp(&mut s.metadata, d);
                    t.call("create", "secrets", &id, api.create(&pp, &s))
                        .await
                        .map(|_| Action::Created)
                }
                Kind::ClusterTrustBundle => {
                    let api: Api<ClusterTrustBundle> = Api::all(t.client.clone());
                    let mut c = ClusterTrustBundle {
                        metadata: ObjectMeta {
                            name: Some(d.name.clone()),
                            ..Default::default()
                        },
                        spec: ctb_spec(d),
                    };
                    stamp(&mut c.metadata, d);
                    t.call(
                        "create",
                        "clustertrustbundles",
                        &d.name,
                        api.create(&pp, &c),
                    )
                    .await
                    .map(|_| Action::Created)
                }
            },
            Some(Raw::ConfigMap(mut cm)) => {
                let api: Api<ConfigMap> = Api::namespaced(t.client.clone(), &d.namespace);
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .extend(d.data.clone());
                stamp(&mut cm.metadata, d);
                t.call("update", "configmaps", &id, api.replace(&d.name, &pp, &cm))
                    .await
                    .map(|_| Action::Updated)
            }
            Some(Raw::Secret(mut s)) => {
                let api: Api<Secret> = Api::namespaced(t.client.clone(), &d.namespace);
                s.data
                    .get_or_insert_with(BTreeMap::new)
                    .extend(secret_bytes(&d.data));
                stamp(&mut s.metadata, d);
                t.call("update", "secrets", &id, api.replace(&d.name, &pp, &s))
                    .await
                    .map(|_| Action::Updated)
            }
            Some(Raw::ClusterTrustBundle(mut c)) => {
                let api: Api<ClusterTrustBundle> = Api::all(t.client.clone());
                c.spec = ctb_spec(d);
                stamp(&mut c.metadata, d);
                t.call(
                    "update",
                    "clustertrustbundles",
                    &d.name,
                    api.replace(&d.name, &pp, &c),
                )
                .await
                .map(|_| Action::Updated)
            }
        };
        match result {
            Ok(a) => return Ok(a),
            // Changed (or created) by someone else since we read it: read again and retry.
            Err(Error::Conflict(_)) => {
                tracing::debug!(object = %d.id(), "conflict; re-reading");
                current = read(t, d).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Api(format!(
        "{}: still conflicting after 5 attempts",
        d.id()
    )))
}

fn secret_bytes(m: &BTreeMap<String, String>) -> BTreeMap<String, ByteString> {
    m.iter()
        .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn ctb_spec(d: &Desired) -> ClusterTrustBundleSpec {
    ClusterTrustBundleSpec {
        signer_name: d.data.get("signerName").cloned(),
        trust_bundle: d.data.get("trustBundle").cloned().unwrap_or_default(),
    }
}

/// Options of a push.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Compare only; write nothing.
    pub dry_run: bool,
    /// Take over objects cactl did not create.
    pub adopt: bool,
    /// Overrides `push.attempts` (e.g. 1 for `status`).
    pub attempts: Option<u32>,
}

/// Observes the cluster, compares, and writes what differs. Returns the report of this one
/// pass (the caller retries failed clusters).
pub async fn reconcile(
    cluster: &str,
    t: &Target,
    external: bool,
    istio_ns: &str,
    make_desired: impl Fn(&[(String, bool, BTreeMap<String, String>)]) -> Vec<Desired>,
    bundle_pem: &str,
    opts: Options,
) -> ClusterReport {
    let start = Instant::now();
    let mut report = ClusterReport {
        cluster: cluster.to_owned(),
        reachable: false,
        error: None,
        objects: Vec::new(),
        istiod_has_bundle: None,
        writes: 0,
        attempts: 1,
        millis: 0,
    };
    let view = match observe(t, external, istio_ns, &make_desired).await {
        Ok(v) => v,
        Err(e) => {
            report.reachable = matches!(e, Error::Forbidden { .. });
            report.error = Some(e.to_string());
            report.millis = start.elapsed().as_millis();
            return report;
        }
    };
    report.reachable = true;
    let want = make_desired(&view.namespaces);
    if !external {
        report.istiod_has_bundle = Some(desired::istiod_has_bundle(
            bundle_pem,
            view.istiod_root_cert.as_deref(),
        ));
    }
    let results = futures::future::join_all(want.iter().map(|d| {
        let key = (d.kind, d.namespace.clone(), d.name.clone());
        let before = desired::compare(d, view.objects.get(&key));
        let raw = view.raw.get(&key).cloned();
        async move {
            let action = match (&before, opts.dry_run, opts.adopt) {
                (Sync::InSync, _, _) => Action::Unchanged,
                (Sync::NotOurs, _, false) => Action::SkippedNotOurs,
                (_, true, _) => Action::WouldWrite,
                (_, false, _) => write(t, d, raw)
                    .await
                    .unwrap_or_else(|e| Action::Failed(e.to_string())),
            };
            ObjectReport {
                object: d.id(),
                before,
                action,
            }
        }
    }))
    .await;
    report.writes = results
        .iter()
        .filter(|r| matches!(r.action, Action::Created | Action::Updated))
        .count();
    report.objects = results;
    if let Some(f) = report.objects.iter().find_map(|o| match &o.action {
        Action::Failed(m) => Some(format!("{}: {m}", o.object)),
        _ => None,
    }) {
        report.error = Some(f);
    }
    report.millis = start.elapsed().as_millis();
    report
}
