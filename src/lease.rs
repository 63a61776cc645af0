//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several `cactl serve`
//! replicas exactly one rotates and pushes (every replica signs).
//!
//! A replica holds the lease by renewing `renewTime` with a `resourceVersion` precondition; a
//! challenger takes it over only once `renewTime + leaseDurationSeconds` has passed by its own
//! clock. The holder stops acting earlier than that: it may act only until a fence set, at each
//! successful renewal, to the moment the request was *sent* plus two thirds of the duration.
//! So a leader that loses contact stops acting before anybody else can start, with a third of
//! the duration left for clock drift and in-flight work.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

/// Whether this replica may act now.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    until: Arc<Mutex<Option<Instant>>>,
    /// No election: this process may always act.
    always: bool,
}

impl Fence {
    /// A fence that always allows (no election configured).
    pub fn always() -> Self {
        Self {
            until: Arc::new(Mutex::new(None)),
            always: true,
        }
    }

    /// True while the lease is held with margin.
    pub fn may_act(&self) -> bool {
        self.always
            || self
                .until
                .lock()
                .ok()
                .and_then(|u| *u)
                .is_some_and(|u| Instant::now() < u)
    }

    fn set(&self, until: Option<Instant>) {
        if let Ok(mut u) = self.until.lock() {
            *u = until;
        }
    }
}

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    fence: Fence,
}

/// What an attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// We hold the lease.
    Leader,
    /// Somebody else does.
    Follower(String),
}

impl Elector {
    /// A participant named `identity` for Lease `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: duration.max(Duration::from_secs(3)),
            fence: Fence::default(),
        }
    }

    /// The fence this participant keeps.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Tries once to acquire or renew; updates the fence.
    pub async fn attempt(&self) -> Result<Outcome, kube::Error> {
        let sent = Instant::now();
        let result = self.try_once().await;
        match &result {
            Ok(Outcome::Leader) => self.fence.set(Some(sent + self.duration * 2 / 3)),
            Ok(Outcome::Follower(_)) => self.fence.set(None),
            // Keep the fence: it runs out on its own if renewals keep failing.
            Err(_) => {}
        }
        result
    }

    /// Gives the lease up (on shutdown), so another replica need not wait for it to expire.
    pub async fn release(&self) {
        self.fence.set(None);
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
    }

    async fn try_once(&self) -> Result<Outcome, kube::Error> {
        let now = time_now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower(
                    "another replica (created concurrently)".into(),
                )),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_for = spec.lease_duration_seconds.map_or(self.duration, |s| {
            Duration::from_secs(u64::try_from(s).unwrap_or(0))
        });
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.checked_add(held_for).is_ok_and(|until| until < now));
        match holder {
            Some(h) if h == self.identity => {}
            Some(h) if !expired => return Ok(Outcome::Follower(h)),
            _ => {
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // The resourceVersion read above is the precondition: a concurrent taker wins or we do.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Outcome::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower(
                "another replica (concurrent update)".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// Keeps trying every third of the duration until `shutdown`; releases the lease then.
    pub async fn run(
        self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        on_change: impl Fn(bool) + Send,
    ) {
        let mut was = false;
        loop {
            let is = match self.attempt().await {
                Ok(Outcome::Leader) => true,
                Ok(Outcome::Follower(h)) => {
                    tracing::debug!(holder = %h, "not the leader");
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease renewal failed");
                    self.fence.may_act()
                }
            };
            if is != was {
                tracing::info!(leader = is, lease = %self.name, identity = %self.identity, "leadership changed");
                on_change(is);
                was = is;
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                () = tokio::time::sleep(self.duration / 3) => {}
            }
        }
        self.release().await;
        on_change(false);
    }
}

fn time_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
