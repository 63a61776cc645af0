//! The rotation executor: performs what the planner says is due, one durable step at a time.
//!
//! Every round reads the state, reads every cluster back (through a [`Fleet`]), pushes to the
//! clusters that do not hold what the state says, plans, and applies the planned state changes
//! in one compare-and-swap save **before** anything acts on them; the next round's push is the
//! action. A crash anywhere leaves either the old state (nothing happened) or the new state
//! (the next run pushes it), and since the planner looks only at state and observations, a
//! re-run finishes the same work. The store's lock keeps two runs from acting at once; the
//! compare-and-swap refuses a save built on a stale read even without it.

use std::collections::BTreeMap;

use serde::Serialize;
use time::OffsetDateTime;

use super::{Action, Observed, Planned, Policy, RootPhase, Slot, Slots};
use crate::backend::RootAuthority;
use crate::config::Config;
use crate::state::{self, RootStatus, State, StateStore};

/// Rounds after which a run stops even if more is due (each round saves at most once).
const MAX_ROUNDS: usize = 16;

/// Errors of the executor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state store failed.
    #[error(transparent)]
    State(#[from] state::Error),
    /// A CA operation failed.
    #[error(transparent)]
    Ca(#[from] crate::ca::Error),
    /// The root backend failed.
    #[error(transparent)]
    Backend(#[from] crate::backend::Error),
    /// An abort is not possible now.
    #[error(transparent)]
    Abort(#[from] super::AbortError),
    /// The request does not fit the state.
    #[error("{0}")]
    Refused(String),
}

/// What a run was asked to do besides what is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Only what is due.
    Due,
    /// Replace this cluster's intermediate now.
    Emergency(String),
    /// Start a root rotation.
    StartRoot {
        /// Carry the new root cross-signed by the old one in new chains.
        cross_sign: bool,
    },
    /// Back out of the root rotation in progress.
    AbortRoot,
}

/// One cluster as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observation {
    /// It answered.
    pub reachable: bool,
    /// It holds exactly what the state says it should (and, in plugin mode, istiod has
    /// picked up the bundle).
    pub in_sync: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// cactl has no way to read this cluster (no API access configured): it is not
    /// "unreachable", it was never reachable, and it holds root phases all the same.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_access: bool,
}

/// The clusters, as the executor sees them.
pub trait Fleet {
    /// Reads `cluster` back and compares it with what `state` says it should hold.
    fn observe(&self, state: &State, cluster: &str) -> impl Future<Output = Observation> + Send;

    /// Makes `cluster` hold what `state` says, then reads it back.
    fn push(&self, state: &State, cluster: &str) -> impl Future<Output = Observation> + Send;
}

/// Something a run did, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// A successor intermediate was issued into the prepared slot.
    Prepared {
        /// Cluster.
        cluster: String,
        /// Its serial.
        serial: String,
        /// Its root.
        root: String,
        /// Why.
        reason: String,
    },
    /// The prepared intermediate became the active one.
    Activated {
        /// Cluster.
        cluster: String,
        /// Its serial.
        serial: String,
        /// Why.
        reason: String,
    },
    /// An emergency replacement.
    Replaced {
        /// Cluster.
        cluster: String,
        /// The new serial.
        serial: String,
        /// The replaced serial.
        replaced: Option<String>,
    },
    /// A new root was created and the mesh entered *publish*.
    RootStarted {
        /// Old root.
        old: String,
        /// New root.
        new: String,
        /// With cross-signing.
        cross_sign: bool,
    },
    /// The mesh entered a root phase.
    PhaseEntered {
        /// The phase.
        phase: String,
    },
    /// Every cluster holds the phase's material; its soak started.
    Settled {
        /// The phase.
        phase: String,
    },
    /// The root rotation was aborted.
    Aborted {
        /// The phase the abort moved to.
        phase: String,
    },
    /// A cluster was pushed.
    Pushed {
        /// Cluster.
        cluster: String,
        /// Read back in sync afterwards.
        in_sync: bool,
        /// Why not.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was done, in order.
    pub steps: Vec<Step>,
    /// Every cluster as last read back.
    pub clusters: BTreeMap<String, Observation>,
    /// The root phase at the end.
    pub phase: RootPhase,
    /// Why the mesh is held where it is (root rotation).
    pub held: Vec<String>,
    /// The state revision at the end.
    pub revision: u64,
}

/// What the executor needs besides the store and the fleet.
pub struct Context<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// Where the root lives.
    pub backend: &'a dyn RootAuthority,
    /// Thresholds and soak.
    pub policy: Policy,
    /// Whether this process may still act (leader election); checked before every save and
    /// every push.
    pub fence: crate::lease::Fence,
}

impl Context<'_> {
    fn may_act(&self) -> Result<(), Error> {
        if self.fence.may_act() {
            Ok(())
        } else {
            Err(Error::Refused(
                "this replica no longer holds the rotation lease; stopping before acting".into(),
            ))
        }
    }
}

/// The slots of the clusters in `names`, from the state.
pub fn slots(state: &State, names: &[String]) -> BTreeMap<String, Slots> {
    let slot = |r: &state::IntermediateRecord| Slot {
        serial: r.serial.clone(),
        root_id: r.root_id.clone(),
        not_before: r.not_before.unwrap_or(r.created_at),
        not_after: r.not_after,
    };
    names
        .iter()
        .map(|n| {
            let cs = state.clusters.get(n);
            (
                n.clone(),
                Slots {
                    active: cs.and_then(|c| c.current.as_ref()).map(slot),
                    prepared: cs.and_then(|c| c.prepared.as_ref()).map(slot),
                },
            )
        })
        .collect()
}

/// What the planner needs to know of a cluster: a cluster that holds exactly what the state
/// says holds the state's bundle and its active intermediate; one that does not is not
/// credited with anything.
pub fn observed(state: &State, name: &str, o: &Observation) -> Observed {
    let in_sync = o.reachable && o.in_sync;
    Observed {
        reachable: o.reachable,
        bundle_roots: if in_sync {
            state.active_roots().map(|r| r.id.clone()).collect()
        } else {
            Vec::new()
        },
        active_root: state
            .clusters
            .get(name)
            .and_then(|c| c.current.as_ref())
            .filter(|_| in_sync)
            .map(|r| r.root_id.clone()),
        unreachable_since: state.clusters.get(name).and_then(|c| c.unreachable_since),
        no_access: o.no_access,
    }
}

/// Plans without acting: reads every cluster back and returns what is due at `at`.
pub async fn plan_only<F: Fleet + Sync>(
    ctx: &Context<'_>,
    state: &State,
    fleet: &F,
    at: OffsetDateTime,
) -> (Vec<Planned>, BTreeMap<String, Observation>) {
    let names = cluster_names(ctx.config);
    let obs = observe_all(fleet, state, &names).await;
    let planned = plan_observed(&ctx.policy, state, &names, &obs, at, true);
    (planned, obs)
}

fn cluster_names(config: &Config) -> Vec<String> {
    config.clusters.iter().map(|c| c.name.clone()).collect()
}

async fn observe_all<F: Fleet + Sync>(
    fleet: &F,
    state: &State,
    names: &[String],
) -> BTreeMap<String, Observation> {
    let results = futures::future::join_all(names.iter().map(|n| fleet.observe(state, n))).await;
    names.iter().cloned().zip(results).collect()
}

/// Plans from the state and what the clusters in `names` were observed to hold. With
/// `whole_mesh` false (a run limited to some clusters), root phases neither gate nor advance.
pub fn plan_observed(
    policy: &Policy,
    state: &State,
    names: &[String],
    obs: &BTreeMap<String, Observation>,
    now: OffsetDateTime,
    whole_mesh: bool,
) -> Vec<Planned> {
    let observed: BTreeMap<String, Observed> = obs
        .iter()
        .map(|(n, o)| (n.clone(), observed(state, n, o)))
        .collect();
    let signing = state
        .signing_root()
        .map(|r| r.id.clone())
        .unwrap_or_default();
    let phase = if whole_mesh {
        state.root_rotation.phase.clone()
    } else {
        // A run limited to some clusters moves only their intermediates, never the mesh.
        match &state.root_rotation.phase {
            p @ (RootPhase::Switch { .. } | RootPhase::Retire { .. }) => p.clone(),
            _ => RootPhase::Stable,
        }
    };
    let mut planned = super::plan(
        now,
        &slots(state, names),
        &phase,
        &signing,
        &observed,
        policy,
    );
    if !whole_mesh {
        planned.retain(|p| {
            !matches!(
                p.action,
                Action::AdvanceRoot { .. } | Action::Settle | Action::Blocked { .. }
            )
        });
    }
    planned
}

/// Runs the executor at `now`: applies `request`, then does what is due until nothing is, or
/// only a root phase gate holds the mesh. `only` limits intermediate work to those clusters
/// (and then never advances the root phase).
pub async fn run<F: Fleet + Sync>(
    ctx: &Context<'_>,
    store: &dyn StateStore,
    fleet: &F,
    now: OffsetDateTime,
    only: &[String],
    request: &Request,
    progress: &(dyn Fn(&Step) + Sync),
) -> Result<Report, Error> {
    for c in only {
        if ctx.config.cluster(c).is_none() {
            return Err(crate::ca::Error::UnknownCluster(c.clone()).into());
        }
    }
    let _guard = store.lock()?;
    let mut state = store
        .load()?
        .ok_or_else(|| state::Error::NotInitialized(store.location()))?;
    let mut steps = Vec::new();
    let emit = |s: Step, steps: &mut Vec<Step>| {
        progress(&s);
        steps.push(s);
    };
    // The request's own change is saved before anything else happens.
    ctx.may_act()?;
    if let Some(step) = apply_request(ctx, &mut state, request, now)? {
        ctx.may_act()?;
        save(store, &mut state)?;
        emit(step, &mut steps);
    }
    let names: Vec<String> = if only.is_empty() {
        cluster_names(ctx.config)
    } else {
        only.to_vec()
    };
    let whole_mesh = only.is_empty();
    let mut obs = BTreeMap::new();
    let mut held = Vec::new();
    for _ in 0..MAX_ROUNDS {
        obs = observe_all(fleet, &state, &names).await;
        // Push where the cluster does not hold what the state says; read back after.
        let stale: Vec<String> = obs
            .iter()
            .filter(|(_, o)| o.reachable && !o.in_sync)
            .map(|(n, _)| n.clone())
            .collect();
        let pushed = futures::future::join_all(stale.iter().map(|n| fleet.push(&state, n))).await;
        for (n, o) in stale.into_iter().zip(pushed) {
            emit(
                Step::Pushed {
                    cluster: n.clone(),
                    in_sync: o.in_sync,
                    detail: o.detail.clone(),
                },
                &mut steps,
            );
            obs.insert(n, o);
        }
        if note_reachability(&mut state, &obs, now) {
            ctx.may_act()?;
            save(store, &mut state)?;
        }
        let planned = plan_observed(&ctx.policy, &state, &names, &obs, now, whole_mesh);
        held = planned
            .iter()
            .filter_map(|p| match &p.action {
                Action::Blocked { reason } => Some(reason.clone()),
                _ => None,
            })
            .collect();
        let mut changed = Vec::new();
        for p in &planned {
            if let Some(step) = apply(ctx, &mut state, p, now)? {
                changed.push(step);
            }
        }
        // istiod's serving certificate follows its cluster's intermediate.
        let renewed = crate::tls::refresh_istiod_tls(&mut state, ctx.config, now)?;
        if changed.is_empty() && renewed.is_empty() {
            break;
        }
        ctx.may_act()?;
        save(store, &mut state)?;
        for s in changed {
            emit(s, &mut steps);
        }
    }
    // A retired root loses its right to issue at the backend too, once the state says so.
    let retired: Vec<String> = state
        .roots
        .iter()
        .filter(|r| r.status == RootStatus::Retired && !r.backend_retired)
        .map(|r| r.id.clone())
        .collect();
    for id in retired {
        let Some(root) = state.root(&id).cloned() else {
            continue;
        };
        match ctx.backend.retire_root(&root) {
            Ok(()) => {
                if let Some(r) = state.roots.iter_mut().find(|r| r.id == id) {
                    r.backend_retired = true;
                }
                ctx.may_act()?;
                save(store, &mut state)?;
            }
            Err(e) => {
                tracing::warn!(root = %id, error = %e, "cannot retire the root at its backend; will retry");
                held.push(format!(
                    "root {id} is retired but its backend refused to stop it issuing: {e}"
                ));
            }
        }
    }
    Ok(Report {
        steps,
        clusters: obs,
        phase: state.root_rotation.phase.clone(),
        held,
        revision: state.revision,
    })
}

fn save(store: &dyn StateStore, state: &mut State) -> Result<(), Error> {
    state.revision += 1;
    if let Err(e) = store.save(state) {
        state.revision -= 1;
        return Err(e.into());
    }
    Ok(())
}

/// Records when clusters became unreachable (and forgets it when they answer again). Returns
/// whether anything changed.
fn note_reachability(
    state: &mut State,
    obs: &BTreeMap<String, Observation>,
    now: OffsetDateTime,
) -> bool {
    let mut changed = false;
    for (n, o) in obs {
        let Some(cs) = state.clusters.get_mut(n) else {
            continue;
        };
        if o.no_access {
            continue;
        }
        match (o.reachable, cs.unreachable_since) {
            (false, None) => {
                cs.unreachable_since = Some(now);
                changed = true;
            }
            (true, Some(_)) => {
                cs.unreachable_since = None;
                changed = true;
            }
            _ => {}
        }
    }
    changed
}

fn apply_request(
    ctx: &Context<'_>,
    state: &mut State,
    request: &Request,
    now: OffsetDateTime,
) -> Result<Option<Step>, Error> {
    match request {
        Request::Due => Ok(None),
        Request::Emergency(cluster) => {
            let plan = super::emergency(
                cluster,
                &state.root_rotation.phase,
                &state
                    .signing_root()
                    .map(|r| r.id.clone())
                    .ok_or(crate::ca::Error::NoRoot)?,
            );
            let Some(Action::Prepare { root, .. }) = plan.first().map(|p| &p.action) else {
                return Err(Error::Refused("emergency plan is empty".into()));
            };
            let record =
                crate::ca::mint_intermediate(state, ctx.config, ctx.backend, cluster, root, now)?;
            let serial = record.serial.clone();
            let entry = state.clusters.entry(cluster.clone()).or_default();
            let mut replaced = None;
            for mut old in [entry.current.take(), entry.prepared.take()]
                .into_iter()
                .flatten()
            {
                replaced.get_or_insert_with(|| old.serial.clone());
                old.replaced_early_at = Some(now);
                entry.history.push(old);
            }
            entry.current = Some(record);
            Ok(Some(Step::Replaced {
                cluster: cluster.clone(),
                serial,
                replaced,
            }))
        }
        Request::StartRoot { cross_sign } => {
            if state.root_rotation.phase != RootPhase::Stable {
                return Err(Error::Refused(format!(
                    "a root rotation is already in progress (phase {}); run `cactl rotate` to advance it or `cactl rotate --root --abort`",
                    state.root_rotation.phase.name()
                )));
            }
            if *cross_sign && !ctx.backend.can_cross_sign() {
                return Err(Error::Refused(format!(
                    "the {} root backend cannot cross-sign (the new root's key never leaves it); start the rotation without --cross-sign",
                    ctx.backend.name()
                )));
            }
            let old = state
                .signing_root()
                .ok_or(crate::ca::Error::NoRoot)?
                .id
                .clone();
            let seq = state.next_sequence();
            let id = format!("root-{seq}");
            let spec = crate::pki::template::RootSpec {
                organization: ctx.config.organization.clone(),
                common_name: format!("{} mesh root {seq} {}", ctx.config.organization, now.date()),
                now,
                lifetime: crate::config::to_time(ctx.config.root.lifetime),
            };
            let record = ctx
                .backend
                .create_root(&id, &spec, ctx.config.root.key_type, now)?;
            state.roots.push(record);
            state.root_rotation = state::RootRotation {
                phase: RootPhase::Publish {
                    old: old.clone(),
                    new: id.clone(),
                    since: now,
                    settled: None,
                },
                cross_sign: *cross_sign,
                aborted: false,
            };
            Ok(Some(Step::RootStarted {
                old,
                new: id,
                cross_sign: *cross_sign,
            }))
        }
        Request::AbortRoot => {
            let rr = &state.root_rotation;
            let next = super::abort(&rr.phase, rr.aborted, now)?;
            if let RootPhase::Retire { old, .. } = &next {
                retire_root(state, &old.clone(), now);
            }
            state.root_rotation = state::RootRotation {
                phase: next.clone(),
                cross_sign: false,
                aborted: true,
            };
            Ok(Some(Step::Aborted {
                phase: next.name().to_owned(),
            }))
        }
    }
}

fn retire_root(state: &mut State, id: &str, now: OffsetDateTime) {
    if let Some(r) = state.roots.iter_mut().find(|r| r.id == id) {
        r.status = RootStatus::Retired;
        r.retired_at.get_or_insert(now);
    }
}

/// Applies one planned action to the state (nothing outside the state changes here, except
/// that minting asks the root backend to sign). Returns the step, or `None` for no change.
fn apply(
    ctx: &Context<'_>,
    state: &mut State,
    p: &Planned,
    now: OffsetDateTime,
) -> Result<Option<Step>, Error> {
    match &p.action {
        Action::Prepare { cluster, root } => {
            let record =
                crate::ca::mint_intermediate(state, ctx.config, ctx.backend, cluster, root, now)?;
            let step = Step::Prepared {
                cluster: cluster.clone(),
                serial: record.serial.clone(),
                root: root.clone(),
                reason: p.reason.clone(),
            };
            let entry = state.clusters.entry(cluster.clone()).or_default();
            // A prepared intermediate under the wrong root is never used; keep it on record.
            if let Some(old) = entry.prepared.replace(record) {
                entry.history.push(old);
            }
            Ok(Some(step))
        }
        Action::Activate { cluster } => {
            let entry = state.clusters.entry(cluster.clone()).or_default();
            let Some(next) = entry.prepared.take() else {
                return Ok(None);
            };
            let serial = next.serial.clone();
            if let Some(prev) = entry.current.replace(next) {
                entry.history.push(prev);
            }
            Ok(Some(Step::Activated {
                cluster: cluster.clone(),
                serial,
                reason: p.reason.clone(),
            }))
        }
        Action::AdvanceRoot { .. } => {
            let rr = state.root_rotation.clone();
            let next = rr.phase.next(now);
            match (&rr.phase, &next) {
                (RootPhase::Publish { old, new, .. }, RootPhase::Switch { .. })
                    if rr.cross_sign && !rr.aborted =>
                {
                    crate::ca::cross_sign(state, ctx.backend, old, new, now)?;
                }
                (RootPhase::Switch { old, .. }, RootPhase::Retire { .. }) => {
                    retire_root(state, old, now);
                }
                _ => {}
            }
            state.root_rotation.phase = next.clone();
            if next == RootPhase::Stable {
                state.root_rotation = state::RootRotation::default();
            }
            Ok(Some(Step::PhaseEntered {
                phase: next.name().to_owned(),
            }))
        }
        Action::Settle => {
            state.root_rotation.phase = state.root_rotation.phase.settle(now);
            Ok(Some(Step::Settled {
                phase: state.root_rotation.phase.name().to_owned(),
            }))
        }
        Action::Blocked { .. } => Ok(None),
    }
}
