//! The active issuers of the signing service, swapped atomically when the state changes.
//!
//! Requests load the current [`IssuerSet`] once (an `Arc`), so a request that started before a
//! swap finishes with the issuer it started with, and one that starts after uses the new one:
//! no request fails or mixes the two.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use time::OffsetDateTime;

use crate::ca::ClusterIssuer;
use crate::config::Config;
use crate::state::State;

/// Issuers by cluster, from one state revision.
#[derive(Debug, Default)]
pub struct IssuerSet {
    /// State revision these came from.
    pub revision: u64,
    /// Cluster → issuer.
    pub issuers: BTreeMap<String, Arc<ClusterIssuer>>,
    /// Clusters whose issuer could not be loaded, with the reason.
    pub unavailable: BTreeMap<String, String>,
    /// The trust bundle as PEM.
    pub bundle_pem: String,
    /// The trust bundle (DER roots).
    pub roots: Vec<Vec<u8>>,
}

impl IssuerSet {
    /// Builds the set from state: every declared cluster with a usable intermediate.
    pub fn build(state: &State, config: &Config, now: OffsetDateTime) -> Self {
        let mut set = Self {
            revision: state.revision,
            ..Self::default()
        };
        if let Ok(roots) = crate::ca::bundle_roots(state) {
            set.bundle_pem = crate::bundle::pem(&roots);
            set.roots = roots;
        }
        for c in &config.clusters {
            match ClusterIssuer::load_at(state, config, &c.name, now) {
                Ok(i) => {
                    set.issuers.insert(c.name.clone(), Arc::new(i));
                }
                Err(e) => {
                    tracing::warn!(cluster = %c.name, error = %e, "no usable issuer for cluster");
                    set.unavailable.insert(c.name.clone(), e.to_string());
                }
            }
        }
        set
    }

    /// The issuer for a cluster.
    pub fn get(&self, cluster: &str) -> Option<&Arc<ClusterIssuer>> {
        self.issuers.get(cluster)
    }
}

/// The current issuer set, swappable.
#[derive(Debug)]
pub struct Authority {
    current: ArcSwap<IssuerSet>,
}

impl Authority {
    /// Starts with `set`.
    pub fn new(set: IssuerSet) -> Self {
        Self {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// The current set.
    pub fn current(&self) -> Arc<IssuerSet> {
        self.current.load_full()
    }

    /// Replaces the set atomically.
    pub fn swap(&self, set: IssuerSet) {
        self.current.store(Arc::new(set));
    }
}
