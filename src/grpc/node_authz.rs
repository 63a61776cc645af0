//! Node authorization for impersonation: ztunnel asks for certificates of the workloads on its
//! node (`ImpersonatedIdentity` metadata). The decision is a pure function over a pod index.
//!
//! Allowed only when the caller's service account is a configured trusted node account
//! (default `istio-system/ztunnel`), the caller's node is known (from its token's node claim,
//! or by looking its pod up in the index), the requested identity is in the mesh's trust
//! domain, and a pod that is not finished runs on that node under the requested service
//! account in the same cluster.

use std::collections::HashMap;

use super::authn::Caller;
use crate::pki::spiffe::SpiffeId;

/// Why impersonation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// The caller is not a trusted node account.
    #[error("{0} is not a trusted node account")]
    NotTrusted(String),
    /// The requested identity is malformed or foreign.
    #[error("impersonated identity {0:?} is not a SPIFFE ID of this mesh")]
    BadIdentity(String),
    /// The caller's node cannot be determined.
    #[error("the caller's node is unknown (no node claim in its token and its pod is not indexed)")]
    UnknownNode,
    /// No such workload on the node.
    #[error("no running pod with service account {sa} in namespace {ns} on node {node}")]
    NotOnNode {
        /// Namespace.
        ns: String,
        /// Service account.
        sa: String,
        /// Node.
        node: String,
    },
    /// The pod index for the cluster is not available.
    #[error("no pod index for cluster {0:?}")]
    NoIndex(String),
}

/// A pod as the index records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account.
    pub service_account: String,
    /// Node it is scheduled on.
    pub node: String,
    /// Whether it has finished (phase Succeeded or Failed).
    pub finished: bool,
}

/// Read access to the pods of one cluster.
pub trait PodIndex: Send + Sync {
    /// The node a pod runs on.
    fn node_of(&self, namespace: &str, pod: &str) -> Option<String>;
    /// Whether a pod that has not finished runs on `node` with the service account.
    fn has_workload(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// A pod index held in memory (filled from a watch, or directly in tests).
#[derive(Debug, Default, Clone)]
pub struct MemoryPodIndex {
    pods: HashMap<(String, String), PodInfo>,
}

impl MemoryPodIndex {
    /// Inserts or replaces a pod.
    pub fn upsert(&mut self, pod: PodInfo) {
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
    }

    /// Removes a pod.
    pub fn remove(&mut self, namespace: &str, name: &str) {
        self.pods.remove(&(namespace.to_owned(), name.to_owned()));
    }
}

impl PodIndex for MemoryPodIndex {
    fn node_of(&self, namespace: &str, pod: &str) -> Option<String> {
        self.pods
            .get(&(namespace.to_owned(), pod.to_owned()))
            .map(|p| p.node.clone())
    }

    fn has_workload(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.pods.values().any(|p| {
            !p.finished
                && p.node == node
                && p.namespace == namespace
                && p.service_account == service_account
        })
    }
}

/// Decides whether `caller` may obtain a certificate for `requested`.
pub fn authorize(
    caller: &Caller,
    requested: &str,
    trust_domain: &str,
    trusted_accounts: &[String],
    index: Option<&dyn PodIndex>,
) -> Result<SpiffeId, Denied> {
    let account = format!(
        "{}/{}",
        caller.identity.namespace(),
        caller.identity.service_account()
    );
    if !trusted_accounts.contains(&account) {
        return Err(Denied::NotTrusted(account));
    }
    let id = SpiffeId::parse(requested).map_err(|_| Denied::BadIdentity(requested.to_owned()))?;
    if id.trust_domain() != trust_domain {
        return Err(Denied::BadIdentity(requested.to_owned()));
    }
    let index = index.ok_or_else(|| Denied::NoIndex(caller.cluster.clone()))?;
    let node = match (&caller.node, &caller.pod) {
        (Some(n), _) => n.clone(),
        (None, Some(pod)) => index
            .node_of(caller.identity.namespace(), pod)
            .ok_or(Denied::UnknownNode)?,
        (None, None) => return Err(Denied::UnknownNode),
    };
    if !index.has_workload(&node, id.namespace(), id.service_account()) {
        return Err(Denied::NotOnNode {
            ns: id.namespace().to_owned(),
            sa: id.service_account().to_owned(),
            node,
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::authn::Method;

    fn caller(ns: &str, sa: &str, pod: Option<&str>, node: Option<&str>) -> Caller {
        Caller {
            identity: SpiffeId::new("cluster.local", ns, sa).unwrap(),
            cluster: "east".into(),
            method: Method::Jwt,
            pod: pod.map(str::to_owned),
            node: node.map(str::to_owned),
        }
    }

    fn index() -> MemoryPodIndex {
        let mut i = MemoryPodIndex::default();
        for (ns, name, sa, node, finished) in [
            ("istio-system", "ztunnel-a", "ztunnel", "node-a", false),
            ("istio-system", "ztunnel-b", "ztunnel", "node-b", false),
            ("shop", "web-1", "web", "node-a", false),
            ("shop", "batch-1", "batch", "node-a", true),
            ("shop", "db-1", "db", "node-b", false),
        ] {
            i.upsert(PodInfo {
                namespace: ns.into(),
                name: name.into(),
                service_account: sa.into(),
                node: node.into(),
                finished,
            });
        }
        i
    }

    const TRUSTED: &[&str] = &["istio-system/ztunnel"];

    fn trusted() -> Vec<String> {
        TRUSTED.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn allows_workload_on_the_callers_node() {
        let idx = index();
        let z = caller("istio-system", "ztunnel", Some("ztunnel-a"), None);
        let id = authorize(
            &z,
            "spiffe://cluster.local/ns/shop/sa/web",
            "cluster.local",
            &trusted(),
            Some(&idx),
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        // The node claim alone is enough.
        let z = caller("istio-system", "ztunnel", None, Some("node-b"));
        authorize(
            &z,
            "spiffe://cluster.local/ns/shop/sa/db",
            "cluster.local",
            &trusted(),
            Some(&idx),
        )
        .unwrap();
    }

    #[test]
    fn denials() {
        let idx = index();
        let z = caller("istio-system", "ztunnel", Some("ztunnel-a"), None);
        let web = caller("shop", "web", Some("web-1"), None);
        let cases: Vec<(&Caller, &str, Denied)> = vec![
            (
                &web,
                "spiffe://cluster.local/ns/shop/sa/db",
                Denied::NotTrusted("shop/web".into()),
            ),
            (
                &z,
                "spiffe://cluster.local/ns/shop/sa/db",
                Denied::NotOnNode {
                    ns: "shop".into(),
                    sa: "db".into(),
                    node: "node-a".into(),
                },
            ),
            (
                &z,
                "spiffe://cluster.local/ns/shop/sa/batch",
                Denied::NotOnNode {
                    ns: "shop".into(),
                    sa: "batch".into(),
                    node: "node-a".into(),
                },
            ),
            (
                &z,
                "spiffe://other.td/ns/shop/sa/web",
                Denied::BadIdentity("spiffe://other.td/ns/shop/sa/web".into()),
            ),
            (&z, "not-a-uri", Denied::BadIdentity("not-a-uri".into())),
        ];
        for (c, req, want) in cases {
            assert_eq!(
                authorize(c, req, "cluster.local", &trusted(), Some(&idx)).unwrap_err(),
                want,
                "{req}"
            );
        }
        let ghost = caller("istio-system", "ztunnel", Some("ztunnel-zzz"), None);
        assert_eq!(
            authorize(
                &ghost,
                "spiffe://cluster.local/ns/shop/sa/web",
                "cluster.local",
                &trusted(),
                Some(&idx)
            )
            .unwrap_err(),
            Denied::UnknownNode
        );
        let bare = caller("istio-system", "ztunnel", None, None);
        assert_eq!(
            authorize(
                &bare,
                "spiffe://cluster.local/ns/shop/sa/web",
                "cluster.local",
                &trusted(),
                Some(&idx)
            )
            .unwrap_err(),
            Denied::UnknownNode
        );
        assert_eq!(
            authorize(
                &z,
                "spiffe://cluster.local/ns/shop/sa/web",
                "cluster.local",
                &trusted(),
                None
            )
            .unwrap_err(),
            Denied::NoIndex("east".into())
        );
    }
}
