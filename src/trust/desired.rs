//! The desired objects of a cluster and their comparison with what was observed: pure
//! functions over values.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cacerts::CaCerts;
use crate::config::ClusterMode;

/// Label marking objects cactl manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "cactl");
/// Annotation with the SHA-256 of the managed content.
pub const HASH_ANNOTATION: &str = "cactl.io/content-hash";
/// Annotation with the state revision (bundle generation) the content came from.
pub const GENERATION_ANNOTATION: &str = "cactl.io/generation";
/// Istio's label on `istio-ca-root-cert`.
pub const ISTIO_CONFIG_LABEL: (&str, &str) = ("istio.io/config", "true");
/// The ConfigMap Istio's proxies mount to verify the CA and istiod.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The trust bundle ConfigMap cactl keeps in every cluster's Istio namespace.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "cactl-trust-bundle";
/// Namespaces istiod does not publish `istio-ca-root-cert` into.
pub const SKIPPED_NAMESPACES: [&str; 3] = ["kube-public", "kube-node-lease", "local-path-storage"];

/// Kinds of objects cactl pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// core/v1 Secret.
    Secret,
    /// core/v1 ConfigMap.
    ConfigMap,
    /// certificates.k8s.io/v1beta1 ClusterTrustBundle (cluster-scoped).
    ClusterTrustBundle,
}

/// One object a cluster should hold. `Debug` shows data keys, never values (a Secret's values
/// include private keys).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// Kind.
    pub kind: Kind,
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The data keys cactl manages (for a ClusterTrustBundle: `trustBundle`, and `signerName`).
    #[serde(skip)]
    pub data: BTreeMap<String, String>,
    /// Labels cactl sets (besides the managed-by label).
    pub labels: BTreeMap<String, String>,
    /// SHA-256 (hex) of `data`.
    pub hash: String,
    /// State revision the content came from.
    pub generation: u64,
}

impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desired")
            .field("kind", &self.kind)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("data_keys", &self.data.keys().collect::<Vec<_>>())
            .field("labels", &self.labels)
            .field("hash", &self.hash)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Desired {
    /// A display name, `Kind namespace/name`.
    pub fn id(&self) -> String {
        if self.namespace.is_empty() {
            format!("{:?} {}", self.kind, self.name)
        } else {
            format!("{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Hash of managed content: keys and values in order, length-prefixed.
pub fn content_hash(data: &BTreeMap<String, String>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (k, v) in data {
        ctx.update(&(k.len() as u64).to_be_bytes());
        ctx.update(k.as_bytes());
        ctx.update(&(v.len() as u64).to_be_bytes());
        ctx.update(v.as_bytes());
    }
    hex::encode(ctx.finish())
}

fn object(
    kind: Kind,
    namespace: &str,
    name: &str,
    data: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    generation: u64,
) -> Desired {
    Desired {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        hash: content_hash(&data),
        data,
        labels,
        generation,
    }
}

/// What one cluster needs, as inputs to [`desired`].
#[derive(Clone)]
pub struct Inputs<'a> {
    /// Delivery mode.
    pub mode: ClusterMode,
    /// Istio's namespace in the cluster.
    pub namespace: &'a str,
    /// The trust bundle (PEM, every root trusted mesh-wide).
    pub bundle_pem: &'a str,
    /// The cluster's `cacerts` (plugin mode).
    pub cacerts: Option<&'a CaCerts>,
    /// istiod's serving certificate and key (external mode, when configured): tls.crt,
    /// tls.key, ca.crt.
    pub istiod_tls: Option<(&'a str, &'a str)>,
    /// Namespaces that exist (external mode), with whether they are terminating and their
    /// labels.
    pub namespaces: &'a [(String, bool, BTreeMap<String, String>)],
    /// Label selector (`k=v,...`) limiting which namespaces get `istio-ca-root-cert`.
    pub namespace_selector: Option<&'a str>,
    /// ClusterTrustBundle signer name, when one should be published.
    pub cluster_trust_bundle: Option<&'a str>,
    /// State revision.
    pub generation: u64,
}

/// Whether a namespace's labels match an equality-based selector (`a=b,c!=d,e`).
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

/// Every object the cluster should hold.
pub fn desired(inp: &Inputs<'_>) -> Vec<Desired> {
    let mut out = Vec::new();
    let no_labels = BTreeMap::new;
    // Every cluster: the trust bundle in Istio's namespace.
    out.push(object(
        Kind::ConfigMap,
        inp.namespace,
        TRUST_BUNDLE_CONFIGMAP,
        BTreeMap::from([("root-cert.pem".to_owned(), inp.bundle_pem.to_owned())]),
        no_labels(),
        inp.generation,
    ));
    match inp.mode {
        ClusterMode::Plugin => {
            if let Some(c) = inp.cacerts {
                let data = c
                    .files()
                    .iter()
                    .map(|(name, content, _)| ((*name).to_owned(), (*content).to_owned()))
                    .collect();
                out.push(object(
                    Kind::Secret,
                    inp.namespace,
                    "cacerts",
                    data,
                    no_labels(),
                    inp.generation,
                ));
            }
        }
        ClusterMode::External => {
            let labels = BTreeMap::from([(
                ISTIO_CONFIG_LABEL.0.to_owned(),
                ISTIO_CONFIG_LABEL.1.to_owned(),
            )]);
            let data = BTreeMap::from([("root-cert.pem".to_owned(), inp.bundle_pem.to_owned())]);
            let mut targets: Vec<&str> = inp
                .namespaces
                .iter()
                .filter(|(name, terminating, labels)| {
                    !terminating
                        && !SKIPPED_NAMESPACES.contains(&name.as_str())
                        && inp
                            .namespace_selector
                            .is_none_or(|s| selector_matches(s, labels))
                })
                .map(|(n, _, _)| n.as_str())
                .collect();
            if !targets.contains(&inp.namespace) {
                targets.push(inp.namespace);
            }
            targets.sort_unstable();
            for ns in targets {
                out.push(object(
                    Kind::ConfigMap,
                    ns,
                    ROOT_CERT_CONFIGMAP,
                    data.clone(),
                    labels.clone(),
                    inp.generation,
                ));
            }
            if let Some((chain, key)) = inp.istiod_tls {
                let data = BTreeMap::from([
                    ("tls.crt".to_owned(), chain.to_owned()),
                    ("tls.key".to_owned(), key.to_owned()),
                    ("ca.crt".to_owned(), inp.bundle_pem.to_owned()),
                ]);
                out.push(object(
                    Kind::Secret,
                    inp.namespace,
                    "istiod-tls",
                    data,
                    no_labels(),
                    inp.generation,
                ));
            }
        }
    }
    if let Some(signer) = inp.cluster_trust_bundle {
        let name = format!("{}:cactl:root-bundle", signer.replace('/', ":"));
        let data = BTreeMap::from([
            ("signerName".to_owned(), signer.to_owned()),
            ("trustBundle".to_owned(), inp.bundle_pem.to_owned()),
        ]);
        out.push(object(
            Kind::ClusterTrustBundle,
            "",
            &name,
            data,
            no_labels(),
            inp.generation,
        ));
    }
    out
}

/// An object as read back from a cluster. `Debug` shows data keys, never values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Data (decoded for Secrets).
    pub data: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// resourceVersion.
    pub resource_version: String,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("data_keys", &self.data.keys().collect::<Vec<_>>())
            .field("labels", &self.labels)
            .field("annotations", &self.annotations)
            .field("resource_version", &self.resource_version)
            .finish()
    }
}

impl Observed {
    /// Whether cactl manages it.
    pub fn managed(&self) -> bool {
        self.labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
    }
}

/// How an object compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Sync {
    /// Holds exactly the desired content.
    InSync,
    /// Absent.
    Missing,
    /// Present, managed by cactl, with other content (the keys that differ).
    Drifted {
        /// Keys whose content differs (or labels).
        keys: Vec<String>,
    },
    /// Present but not created by cactl.
    NotOurs,
}

/// Compares a desired object with what the cluster holds. Looks at the content itself, not
/// only at the hash annotation, so an edit that leaves the annotation alone is still drift.
pub fn compare(want: &Desired, have: Option<&Observed>) -> Sync {
    let Some(have) = have else {
        return Sync::Missing;
    };
    if !have.managed() {
        return Sync::NotOurs;
    }
    let mut keys: Vec<String> = want
        .data
        .iter()
        .filter(|(k, v)| have.data.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    for (k, v) in &want.labels {
        if have.labels.get(k) != Some(v) {
            keys.push(format!("label {k}"));
        }
    }
    if keys.is_empty() && have.annotations.get(HASH_ANNOTATION) != Some(&want.hash) {
        keys.push(format!("annotation {HASH_ANNOTATION}"));
    }
    if keys.is_empty() {
        Sync::InSync
    } else {
        Sync::Drifted { keys }
    }
}

/// Whether istiod has picked up the bundle: its `istio-ca-root-cert` in the Istio namespace
/// holds exactly the roots of the desired bundle (plugin mode): every one of them, and no root
/// that has been retired.
pub fn istiod_has_bundle(bundle_pem: &str, observed_root_cert: Option<&str>) -> bool {
    let Ok(want) = crate::pki::pem::certificates(bundle_pem) else {
        return false;
    };
    let Some(have) = observed_root_cert.and_then(|t| crate::pki::pem::certificates(t).ok()) else {
        return false;
    };
    want.iter().all(|w| have.contains(w)) && have.iter().all(|h| want.contains(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(
        mode: ClusterMode,
        ns: &'a [(String, bool, BTreeMap<String, String>)],
    ) -> Inputs<'a> {
        Inputs {
            mode,
            namespace: "istio-system",
            bundle_pem: "ROOTS",
            cacerts: None,
            istiod_tls: None,
            namespaces: ns,
            namespace_selector: None,
            cluster_trust_bundle: None,
            generation: 7,
        }
    }

    #[test]
    fn external_mode_covers_namespaces_istio_expects() {
        let ns = vec![
            ("default".to_owned(), false, BTreeMap::new()),
            ("kube-system".to_owned(), false, BTreeMap::new()),
            ("kube-public".to_owned(), false, BTreeMap::new()),
            ("kube-node-lease".to_owned(), false, BTreeMap::new()),
            ("dying".to_owned(), true, BTreeMap::new()),
            (
                "shop".to_owned(),
                false,
                BTreeMap::from([("team".to_owned(), "a".to_owned())]),
            ),
        ];
        let d = desired(&inputs(ClusterMode::External, &ns));
        let ids: Vec<String> = d.iter().map(Desired::id).collect();
        assert_eq!(
            ids,
            vec![
                "ConfigMap istio-system/cactl-trust-bundle",
                "ConfigMap default/istio-ca-root-cert",
                "ConfigMap istio-system/istio-ca-root-cert",
                "ConfigMap kube-system/istio-ca-root-cert",
                "ConfigMap shop/istio-ca-root-cert",
            ]
        );
        assert_eq!(
            d[1].labels.get("istio.io/config").map(String::as_str),
            Some("true")
        );
        assert_eq!(d[1].data["root-cert.pem"], "ROOTS");
        let mut inp = inputs(ClusterMode::External, &ns);
        inp.namespace_selector = Some("team=a");
        let ids: Vec<String> = desired(&inp).iter().map(Desired::id).collect();
        assert_eq!(
            ids,
            vec![
                "ConfigMap istio-system/cactl-trust-bundle",
                "ConfigMap istio-system/istio-ca-root-cert",
                "ConfigMap shop/istio-ca-root-cert"
            ]
        );
    }

    #[test]
    fn compare_detects_every_kind_of_difference() {
        let d = &desired(&inputs(ClusterMode::External, &[]))[1];
        assert_eq!(compare(d, None), Sync::Missing);
        let mut have = Observed {
            data: d.data.clone(),
            labels: BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                ("istio.io/config".to_owned(), "true".to_owned()),
                ("unrelated".to_owned(), "x".to_owned()),
            ]),
            annotations: BTreeMap::from([(HASH_ANNOTATION.to_owned(), d.hash.clone())]),
            resource_version: "1".into(),
        };
        assert_eq!(compare(d, Some(&have)), Sync::InSync);
        have.data.insert("extra".into(), "kept".into());
        assert_eq!(
            compare(d, Some(&have)),
            Sync::InSync,
            "unmanaged keys are not drift"
        );
        have.data.insert("root-cert.pem".into(), "EDITED".into());
        assert_eq!(
            compare(d, Some(&have)),
            Sync::Drifted {
                keys: vec!["root-cert.pem".into()]
            }
        );
        have.data.insert("root-cert.pem".into(), "ROOTS".into());
        have.labels.remove("istio.io/config");
        assert_eq!(
            compare(d, Some(&have)),
            Sync::Drifted {
                keys: vec!["label istio.io/config".into()]
            }
        );
        have.labels.remove(MANAGED_BY.0);
        assert_eq!(compare(d, Some(&have)), Sync::NotOurs);
    }

    #[test]
    fn debug_never_shows_values() {
        let d = object(
            Kind::Secret,
            "istio-system",
            "cacerts",
            BTreeMap::from([(
                "ca-key.pem".to_owned(),
                "-----BEGIN PRIVATE KEY-----".to_owned(),
            )]),
            BTreeMap::new(),
            1,
        );
        let o = Observed {
            data: d.data.clone(),
            ..Observed::default()
        };
        for shown in [format!("{d:?}"), format!("{o:?}")] {
            assert!(shown.contains("ca-key.pem"), "{shown}");
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        }
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = BTreeMap::from([("a".to_owned(), "bc".to_owned())]);
        let b = BTreeMap::from([("ab".to_owned(), "c".to_owned())]);
        assert_ne!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
    }

    #[test]
    fn selectors() {
        let l = BTreeMap::from([("a".to_owned(), "1".to_owned())]);
        assert!(selector_matches("a=1", &l));
        assert!(selector_matches("a", &l));
        assert!(!selector_matches("a!=1", &l));
        assert!(selector_matches("!b", &l));
        assert!(!selector_matches("a=1,b", &l));
    }
}
