//! Rotation planning: a pure function from (now, the CA state, the policy, what the clusters
//! were observed to hold) to the actions that are due, each with its reason.
//!
//! **Intermediates** use two slots per cluster, as SPIRE does: a successor is *prepared* at
//! `NotAfter − min(life/2, 30d)` and *activated* at `NotAfter − min(life/6, 7d)`. Each cluster's
//! thresholds are moved earlier by a deterministic jitter (a hash of its name, up to
//! `policy.jitter`), so a fleet issued on one day does not rotate in one burst.
//!
//! **The root** rotates in three phases for the whole mesh: *publish* (every bundle becomes
//! {old, new}), *switch* (every cluster gets an intermediate under the new root; bundles stay
//! {old, new}), *retire* (bundles become {new}). A phase advances only when every cluster has
//! been **observed** holding the previous phase's material and the soak time has passed since
//! the phase began; an unobserved or unreachable cluster holds the whole mesh where it is.
//!
//! The planner is level-triggered: it looks only at state and observations, so running it
//! twice, or after a crash between two steps, plans the same remaining work.

pub mod execute;
pub mod record;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// Rotation thresholds and waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Cap of the preparation lead (SPIRE: 30 days).
    pub prepare_cap: Duration,
    /// Cap of the activation lead (SPIRE: 7 days).
    pub activate_cap: Duration,
    /// Largest per-cluster shift of both thresholds (earlier, never later).
    pub jitter: Duration,
    /// Time a root phase must have lasted before the next may begin.
    pub soak: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            prepare_cap: Duration::days(30),
            activate_cap: Duration::days(7),
            jitter: Duration::hours(6),
            soak: Duration::hours(48),
        }
    }
}

/// The validity of one intermediate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Serial (hex).
    pub serial: String,
    /// Root it chains to.
    pub root_id: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// A cluster's two slots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    /// In use.
    pub active: Option<Slot>,
    /// Issued, waiting for activation.
    pub prepared: Option<Slot>,
}

/// The phase of a root rotation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum RootPhase {
    /// No rotation in progress.
    #[default]
    Stable,
    /// Bundles must become {old, new}.
    Publish {
        /// The root being retired.
        old: String,
        /// The new root.
        new: String,
        /// When the phase began.
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        /// When every cluster was first observed holding the phase's material: the soak
        /// counts from here, not from `since`, so a cluster that lagged gets the full soak.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        settled: Option<OffsetDateTime>,
    },
    /// Every cluster must get an intermediate under `new`.
    Switch {
        /// The root being retired.
        old: String,
        /// The new root.
        new: String,
        /// When the phase began.
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        /// When every cluster was first observed holding the phase's material: the soak
        /// counts from here, not from `since`, so a cluster that lagged gets the full soak.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        settled: Option<OffsetDateTime>,
    },
    /// Bundles must become {new}.
    Retire {
        /// The root being retired.
        old: String,
        /// The new root.
        new: String,
        /// When the phase began.
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        /// When every cluster was first observed holding the phase's material: the soak
        /// counts from here, not from `since`, so a cluster that lagged gets the full soak.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        settled: Option<OffsetDateTime>,
    },
}

/// What a cluster was observed to hold (read back from it, never assumed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Whether the cluster could be read at all.
    pub reachable: bool,
    /// Root ids in the bundle it holds (and, in plugin mode, that istiod has picked up).
    pub bundle_roots: Vec<String>,
    /// Root of the intermediate it is using.
    pub active_root: Option<String>,
    /// Since when it has been unreachable, when it is.
    pub unreachable_since: Option<OffsetDateTime>,
    /// cactl cannot read it at all (no API access configured).
    pub no_access: bool,
}

/// One action the executor should take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Issue the successor intermediate into the prepared slot.
    Prepare {
        /// Cluster.
        cluster: String,
        /// Root to sign it with.
        root: String,
    },
    /// Make the prepared intermediate the active one (and push / swap it).
    Activate {
        /// Cluster.
        cluster: String,
    },
    /// Record that every cluster now holds the phase's material: the soak starts.
    Settle,
    /// Advance the root rotation to the next phase.
    AdvanceRoot {
        /// The phase to enter.
        to: &'static str,
    },
    /// The mesh is held in the current root phase.
    Blocked {
        /// Why (names the clusters).
        reason: String,
    },
}

/// A planned action with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Planned {
    /// What.
    pub action: Action,
    /// Why now.
    pub reason: String,
}

impl RootPhase {
    /// The phase's name: `stable`, `publish`, `switch` or `retire`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Publish { .. } => "publish",
            Self::Switch { .. } => "switch",
            Self::Retire { .. } => "retire",
        }
    }

    /// (old, new, since) of a rotation in progress.
    pub fn roots(&self) -> Option<(&str, &str, OffsetDateTime)> {
        match self {
            Self::Stable => None,
            Self::Publish {
                old, new, since, ..
            }
            | Self::Switch {
                old, new, since, ..
            }
            | Self::Retire {
                old, new, since, ..
            } => Some((old, new, *since)),
        }
    }

    /// The same phase, recorded as settled at `at`.
    pub fn settle(&self, at: OffsetDateTime) -> Self {
        let mut out = self.clone();
        match &mut out {
            Self::Stable => {}
            Self::Publish { settled, .. }
            | Self::Switch { settled, .. }
            | Self::Retire { settled, .. } => {
                settled.get_or_insert(at);
            }
        }
        out
    }

    /// The phase after this one, entered at `now`.
    pub fn next(&self, now: OffsetDateTime) -> Self {
        match self.clone() {
            Self::Stable => Self::Stable,
            Self::Publish { old, new, .. } => Self::Switch {
                old,
                new,
                since: now,
                settled: None,
            },
            Self::Switch { old, new, .. } => Self::Retire {
                old,
                new,
                since: now,
                settled: None,
            },
            Self::Retire { .. } => Self::Stable,
        }
    }
}

/// Why a root rotation cannot be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbortError {
    /// Nothing to abort.
    #[error("no root rotation is in progress")]
    NotRotating,
    /// The bundles are already losing the old root.
    #[error(
        "the root rotation has reached its final phase (retire: bundles are dropping {0}); let it finish, then start a new rotation"
    )]
    Final(String),
    /// Already moving back.
    #[error("the root rotation is already being aborted")]
    AlreadyAborted,
}

/// The phase an abort moves to, at `now`. Aborting *publish* retires the new root at once
/// (nothing chains to it yet); aborting *switch* runs the switch backwards (every cluster gets
/// an intermediate under the old root again) and then retires the new root. Bundles keep both
/// roots until every cluster is observed back on the old one, so an abort is as safe as the
/// rotation itself.
pub fn abort(
    phase: &RootPhase,
    aborted: bool,
    now: OffsetDateTime,
) -> Result<RootPhase, AbortError> {
    if aborted {
        return Err(AbortError::AlreadyAborted);
    }
    match phase.clone() {
        RootPhase::Stable => Err(AbortError::NotRotating),
        RootPhase::Publish { old, new, .. } => Ok(RootPhase::Retire {
            old: new,
            new: old,
            since: now,
            settled: None,
        }),
        RootPhase::Switch { old, new, .. } => Ok(RootPhase::Switch {
            old: new,
            new: old,
            since: now,
            settled: None,
        }),
        RootPhase::Retire { old, .. } => Err(AbortError::Final(old)),
    }
}

/// An emergency replacement of `cluster`'s intermediate (a suspected key compromise): a new
/// intermediate under the root new intermediates are due under, activated at once, whatever
/// the thresholds say. A prepared successor is replaced too, since its key sat beside the
/// compromised one.
pub fn emergency(cluster: &str, root: &RootPhase, signing_root: &str) -> Vec<Planned> {
    let target = match root {
        RootPhase::Switch { new, .. } | RootPhase::Retire { new, .. } => new.as_str(),
        RootPhase::Stable | RootPhase::Publish { .. } => signing_root,
    };
    vec![
        Planned {
            action: Action::Prepare {
                cluster: cluster.to_owned(),
                root: target.to_owned(),
            },
            reason: "emergency replacement requested (--now)".into(),
        },
        Planned {
            action: Action::Activate {
                cluster: cluster.to_owned(),
            },
            reason: "emergency replacement requested (--now)".into(),
        },
    ]
}

/// The thresholds of a slot for a cluster: (prepare at, activate at).
pub fn thresholds(slot: &Slot, cluster: &str, policy: &Policy) -> (OffsetDateTime, OffsetDateTime) {
    let life: Duration = slot.not_after - slot.not_before;
    let prepare_lead = (life / 2_i32).min(policy.prepare_cap);
    let activate_lead = (life / 6_i32).min(policy.activate_cap);
    let shift = jitter(cluster, policy.jitter);
    (
        slot.not_after - prepare_lead - shift,
        slot.not_after - activate_lead - shift,
    )
}

/// A deterministic shift in [0, max) from the cluster's name.
pub fn jitter(cluster: &str, max: Duration) -> Duration {
    if max <= Duration::ZERO {
        return Duration::ZERO;
    }
    let d = ring::digest::digest(&ring::digest::SHA256, cluster.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    let n = u64::from_be_bytes(b);
    let max_ms = max.whole_milliseconds().max(1) as u64;
    Duration::milliseconds((n % max_ms) as i64)
}

/// Plans what is due at `now`.
///
/// `signing_root` is the root new intermediates are signed by outside a root rotation.
pub fn plan(
    now: OffsetDateTime,
    clusters: &BTreeMap<String, Slots>,
    root: &RootPhase,
    signing_root: &str,
    observed: &BTreeMap<String, Observed>,
    policy: &Policy,
) -> Vec<Planned> {
    let mut out = Vec::new();
    let target_root = match root {
        RootPhase::Switch { new, .. } | RootPhase::Retire { new, .. } => new.as_str(),
        RootPhase::Stable | RootPhase::Publish { .. } => signing_root,
    };
    for (name, slots) in clusters {
        match (&slots.active, &slots.prepared) {
            (None, None) => out.push(Planned {
                action: Action::Prepare {
                    cluster: name.clone(),
                    root: target_root.to_owned(),
                },
                reason: "no intermediate yet".into(),
            }),
            (None, Some(_)) => out.push(Planned {
                action: Action::Activate {
                    cluster: name.clone(),
                },
                reason: "a prepared intermediate and no active one".into(),
            }),
            (Some(active), prepared) => {
                let (prepare_at, activate_at) = thresholds(active, name, policy);
                let wrong_root =
                    matches!(root, RootPhase::Switch { .. }) && active.root_id != target_root;
                match prepared {
                    None if wrong_root => out.push(Planned {
                        action: Action::Prepare {
                            cluster: name.clone(),
                            root: target_root.to_owned(),
                        },
                        reason: format!(
                            "root rotation (switch): active intermediate chains to {}",
                            active.root_id
                        ),
                    }),
                    None if now >= prepare_at => out.push(Planned {
                        action: Action::Prepare {
                            cluster: name.clone(),
                            root: target_root.to_owned(),
                        },
                        reason: format!("preparation threshold {prepare_at} reached"),
                    }),
                    Some(p) if wrong_root && p.root_id == target_root => out.push(Planned {
                        action: Action::Activate {
                            cluster: name.clone(),
                        },
                        reason: "root rotation (switch): successor under the new root is ready"
                            .into(),
                    }),
                    Some(p) if wrong_root => out.push(Planned {
                        action: Action::Prepare {
                            cluster: name.clone(),
                            root: target_root.to_owned(),
                        },
                        reason: format!(
                            "root rotation (switch): prepared intermediate chains to {}",
                            p.root_id
                        ),
                    }),
                    Some(_) if now >= activate_at => out.push(Planned {
                        action: Action::Activate {
                            cluster: name.clone(),
                        },
                        reason: format!("activation threshold {activate_at} reached"),
                    }),
                    _ => {}
                }
            }
        }
    }
    if let Some(p) = root_gate(now, clusters, root, observed, policy) {
        out.push(p);
    }
    out
}

/// Whether one cluster's observation satisfies the current phase.
type PhaseCheck = dyn Fn(&Observed) -> bool;

fn root_gate(
    now: OffsetDateTime,
    clusters: &BTreeMap<String, Slots>,
    root: &RootPhase,
    observed: &BTreeMap<String, Observed>,
    policy: &Policy,
) -> Option<Planned> {
    let (since, settled, next, check): (_, _, &'static str, Box<PhaseCheck>) = match root {
        RootPhase::Stable => return None,
        RootPhase::Publish {
            old,
            new,
            since,
            settled,
        } => {
            let (o, n) = (old.clone(), new.clone());
            (
                *since,
                *settled,
                "switch",
                Box::new(move |ob: &Observed| {
                    ob.bundle_roots.contains(&o) && ob.bundle_roots.contains(&n)
                }),
            )
        }
        RootPhase::Switch {
            new,
            since,
            settled,
            ..
        } => {
            let n = new.clone();
            (
                *since,
                *settled,
                "retire",
                Box::new(move |ob: &Observed| ob.active_root.as_deref() == Some(n.as_str())),
            )
        }
        RootPhase::Retire {
            old,
            new,
            since,
            settled,
        } => {
            let (o, n) = (old.clone(), new.clone());
            (
                *since,
                *settled,
                "stable",
                Box::new(move |ob: &Observed| {
                    ob.bundle_roots.contains(&n) && !ob.bundle_roots.contains(&o)
                }),
            )
        }
    };
    let mut lagging: Vec<String> = Vec::new();
    for name in clusters.keys() {
        match observed.get(name) {
            Some(o) if o.reachable && check(o) => {}
            Some(o) if o.no_access => lagging.push(format!(
                "{name} (cannot be read back: no kubeconfig or in_cluster configured)"
            )),
            Some(o) if !o.reachable => lagging.push(match o.unreachable_since {
                Some(t) if now - t >= Duration::MINUTE => {
                    format!("{name} (unreachable for {})", coarse(now - t))
                }
                _ => format!("{name} (unreachable)"),
            }),
            Some(_) => lagging.push(format!("{name} (not yet observed holding it)")),
            None => lagging.push(format!("{name} (not observed)")),
        }
    }
    Some(match (lagging.is_empty(), settled) {
        (false, _) => Planned {
            action: Action::Blocked {
                reason: format!(
                    "phase {} held since {}: {}",
                    root.name(),
                    stamp(since),
                    lagging.join(", ")
                ),
            },
            reason: "not every cluster was observed with the current phase's material".into(),
        },
        (true, None) => Planned {
            action: Action::Settle,
            reason: format!(
                "every cluster observed holding the phase's material; the soak of {} starts now",
                coarse(policy.soak)
            ),
        },
        (true, Some(t)) if now < t + policy.soak => Planned {
            action: Action::Blocked {
                reason: format!(
                    "phase {} soaking until {}",
                    root.name(),
                    stamp(t + policy.soak)
                ),
            },
            reason: "soak time not yet passed".into(),
        },
        (true, Some(_)) => Planned {
            action: Action::AdvanceRoot { to: next },
            reason: format!(
                "every cluster observed, soak of {} passed",
                coarse(policy.soak)
            ),
        },
    })
}

/// RFC 3339 to the second, for messages.
pub fn stamp(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// A duration to the minute (to the second below one minute), for messages.
pub fn coarse(d: Duration) -> String {
    let secs = d.whole_seconds().max(0) as u64;
    let secs = if secs >= 60 { secs / 60 * 60 } else { secs };
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2027-01-01 00:00 UTC);

    fn slot(root: &str, days: i64) -> Slot {
        Slot {
            serial: "01".into(),
            root_id: root.into(),
            not_before: T0,
            not_after: T0 + Duration::days(days),
        }
    }

    fn no_jitter() -> Policy {
        Policy {
            jitter: Duration::ZERO,
            ..Policy::default()
        }
    }

    fn one(slots: Slots) -> BTreeMap<String, Slots> {
        BTreeMap::from([("east".to_owned(), slots)])
    }

    fn actions(p: &[Planned]) -> Vec<Action> {
        p.iter().map(|x| x.action.clone()).collect()
    }

    #[test]
    fn thresholds_follow_spire_with_caps() {
        let p = no_jitter();
        // 1 year: caps apply (30 d / 7 d).
        let (prep, act) = thresholds(&slot("r1", 365), "east", &p);
        assert_eq!(prep, T0 + Duration::days(335));
        assert_eq!(act, T0 + Duration::days(358));
        // 24 h: half and a sixth.
        let (prep, act) = thresholds(&slot("r1", 1), "east", &p);
        assert_eq!(prep, T0 + Duration::hours(12));
        assert_eq!(act, T0 + Duration::hours(20));
    }

    #[test]
    fn prepare_then_activate_exactly_at_the_thresholds() {
        let p = no_jitter();
        let s = Slots {
            active: Some(slot("r1", 365)),
            prepared: None,
        };
        let before = T0 + Duration::days(335) - Duration::seconds(1);
        assert!(
            plan(
                before,
                &one(s.clone()),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )
            .is_empty()
        );
        let at = T0 + Duration::days(335);
        assert_eq!(
            actions(&plan(
                at,
                &one(s),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )),
            vec![Action::Prepare {
                cluster: "east".into(),
                root: "r1".into()
            }]
        );
        let s = Slots {
            active: Some(slot("r1", 365)),
            prepared: Some(slot("r1", 365 + 30)),
        };
        let before = T0 + Duration::days(358) - Duration::seconds(1);
        assert!(
            plan(
                before,
                &one(s.clone()),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )
            .is_empty()
        );
        assert_eq!(
            actions(&plan(
                T0 + Duration::days(358),
                &one(s),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )),
            vec![Action::Activate {
                cluster: "east".into()
            }]
        );
    }

    #[test]
    fn jitter_is_bounded_deterministic_and_spreads_clusters() {
        let max = Duration::hours(6);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let name = format!("cluster-{i}");
            let j = jitter(&name, max);
            assert!(j >= Duration::ZERO && j < max, "{name}: {j}");
            assert_eq!(j, jitter(&name, max));
            seen.insert(j.whole_minutes());
        }
        assert!(seen.len() > 100, "jitter should spread clusters");
        let p = Policy::default();
        let (prep, _) = thresholds(&slot("r1", 365), "east", &p);
        assert!(prep <= T0 + Duration::days(335) && prep > T0 + Duration::days(335) - max);
    }

    #[test]
    fn new_and_half_done_clusters() {
        let p = no_jitter();
        assert_eq!(
            actions(&plan(
                T0,
                &one(Slots::default()),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )),
            vec![Action::Prepare {
                cluster: "east".into(),
                root: "r1".into()
            }]
        );
        let s = Slots {
            active: None,
            prepared: Some(slot("r1", 365)),
        };
        assert_eq!(
            actions(&plan(
                T0,
                &one(s),
                &RootPhase::Stable,
                "r1",
                &BTreeMap::new(),
                &p
            )),
            vec![Action::Activate {
                cluster: "east".into()
            }]
        );
    }

    fn obs(reachable: bool, roots: &[&str], active: &str) -> Observed {
        Observed {
            reachable,
            bundle_roots: roots.iter().map(|s| (*s).to_owned()).collect(),
            active_root: Some(active.into()),
            unreachable_since: None,
            no_access: false,
        }
    }

    fn two() -> BTreeMap<String, Slots> {
        BTreeMap::from([
            (
                "east".to_owned(),
                Slots {
                    active: Some(slot("r1", 365)),
                    prepared: None,
                },
            ),
            (
                "west".to_owned(),
                Slots {
                    active: Some(slot("r1", 365)),
                    prepared: None,
                },
            ),
        ])
    }

    #[test]
    fn publish_gate_waits_for_every_cluster_and_the_soak() {
        let p = no_jitter();
        let phase = RootPhase::Publish {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        let later = T0 + Duration::hours(49);
        // One cluster still holds only the old root: blocked, named.
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r1", "r2"], "r1")),
            ("west".to_owned(), obs(true, &["r1"], "r1")),
        ]);
        match &plan(later, &two(), &phase, "r1", &o, &p)[0].action {
            Action::Blocked { reason } => assert!(
                reason.contains("west (not yet observed holding it)"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // Unreachable: blocked, never skipped.
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r1", "r2"], "r1")),
            ("west".to_owned(), obs(false, &[], "r1")),
        ]);
        match &plan(later, &two(), &phase, "r1", &o, &p)[0].action {
            Action::Blocked { reason } => {
                assert!(reason.contains("west (unreachable)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Both hold {old, new}: the soak starts now, however long the phase has lasted
        // (a cluster that lagged for days still gets the full soak).
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r1", "r2"], "r1")),
            ("west".to_owned(), obs(true, &["r2", "r1"], "r1")),
        ]);
        let days_later = T0 + Duration::days(10);
        assert_eq!(
            actions(&plan(days_later, &two(), &phase, "r1", &o, &p)),
            vec![Action::Settle]
        );
        let settled = phase.settle(days_later);
        assert_eq!(settled.settle(days_later + Duration::days(1)), settled);
        match &plan(
            days_later + Duration::hours(48) - Duration::seconds(1),
            &two(),
            &settled,
            "r1",
            &o,
            &p,
        )[0]
        .action
        {
            Action::Blocked { reason } => assert!(
                reason.contains("soaking until 2027-01-13T00:00:00Z"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // Both clear.
        assert_eq!(
            actions(&plan(
                days_later + Duration::hours(48),
                &two(),
                &settled,
                "r1",
                &o,
                &p
            )),
            vec![Action::AdvanceRoot { to: "switch" }]
        );
    }

    #[test]
    fn switch_prepares_and_activates_under_the_new_root_then_gates_on_observation() {
        let p = no_jitter();
        let phase = RootPhase::Switch {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        let o = BTreeMap::new();
        let acts = actions(&plan(T0, &two(), &phase, "r1", &o, &p));
        assert!(acts.contains(&Action::Prepare {
            cluster: "east".into(),
            root: "r2".into()
        }));
        assert!(acts.contains(&Action::Prepare {
            cluster: "west".into(),
            root: "r2".into()
        }));
        let mut c = two();
        for s in c.values_mut() {
            s.prepared = Some(slot("r2", 365));
        }
        let acts = actions(&plan(T0, &c, &phase, "r1", &o, &p));
        assert!(acts.contains(&Action::Activate {
            cluster: "east".into()
        }));
        // After activation, observed on the new intermediate everywhere + soak: advance.
        let mut c = two();
        for s in c.values_mut() {
            s.active = Some(slot("r2", 365));
        }
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r1", "r2"], "r2")),
            ("west".to_owned(), obs(true, &["r1", "r2"], "r2")),
        ]);
        assert_eq!(
            actions(&plan(T0 + Duration::days(3), &c, &phase, "r1", &o, &p)),
            vec![Action::Settle]
        );
        assert_eq!(
            actions(&plan(
                T0 + Duration::days(5),
                &c,
                &phase.settle(T0 + Duration::days(3)),
                "r1",
                &o,
                &p
            )),
            vec![Action::AdvanceRoot { to: "retire" }]
        );
    }

    #[test]
    fn retire_completes_only_when_the_old_root_is_gone_everywhere() {
        let p = no_jitter();
        let phase = RootPhase::Retire {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        let mut c = two();
        for s in c.values_mut() {
            s.active = Some(slot("r2", 365));
        }
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r2"], "r2")),
            ("west".to_owned(), obs(true, &["r1", "r2"], "r2")),
        ]);
        assert!(matches!(
            plan(T0 + Duration::days(3), &c, &phase, "r2", &o, &p)[0].action,
            Action::Blocked { .. }
        ));
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r2"], "r2")),
            ("west".to_owned(), obs(true, &["r2"], "r2")),
        ]);
        let phase = phase.settle(T0);
        assert_eq!(
            actions(&plan(T0 + Duration::days(3), &c, &phase, "r2", &o, &p)),
            vec![Action::AdvanceRoot { to: "stable" }]
        );
    }

    #[test]
    fn planning_twice_plans_the_same() {
        let p = Policy::default();
        let at = T0 + Duration::days(340);
        let a = plan(at, &two(), &RootPhase::Stable, "r1", &BTreeMap::new(), &p);
        let b = plan(at, &two(), &RootPhase::Stable, "r1", &BTreeMap::new(), &p);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn abort_runs_the_rotation_backwards_and_refuses_the_final_phase() {
        let now = T0 + Duration::days(1);
        let publish = RootPhase::Publish {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        // Publish: nothing chains to r2 yet, so it is retired at once.
        assert_eq!(
            abort(&publish, false, now),
            Ok(RootPhase::Retire {
                old: "r2".into(),
                new: "r1".into(),
                since: now,
                settled: None
            })
        );
        // Switch: the switch runs backwards to r1, with its own gate and soak.
        let switch = publish.next(T0);
        let back = abort(&switch, false, now).unwrap();
        assert_eq!(
            back,
            RootPhase::Switch {
                old: "r2".into(),
                new: "r1".into(),
                since: now,
                settled: None
            }
        );
        let mut c = two();
        for s in c.values_mut() {
            s.active = Some(slot("r2", 365));
        }
        let acts = actions(&plan(now, &c, &back, "r2", &BTreeMap::new(), &no_jitter()));
        assert!(acts.contains(&Action::Prepare {
            cluster: "east".into(),
            root: "r1".into()
        }));
        assert_eq!(abort(&back, true, now), Err(AbortError::AlreadyAborted));
        assert!(matches!(
            abort(&switch.next(now), false, now),
            Err(AbortError::Final(ref r)) if r == "r1"
        ));
        assert_eq!(
            abort(&RootPhase::Stable, false, now),
            Err(AbortError::NotRotating)
        );
    }

    #[test]
    fn emergency_replaces_now_under_the_due_root() {
        let stable = emergency("east", &RootPhase::Stable, "r1");
        assert_eq!(
            actions(&stable),
            vec![
                Action::Prepare {
                    cluster: "east".into(),
                    root: "r1".into()
                },
                Action::Activate {
                    cluster: "east".into()
                }
            ]
        );
        let switch = RootPhase::Switch {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        assert_eq!(
            actions(&emergency("east", &switch, "r1"))[0],
            Action::Prepare {
                cluster: "east".into(),
                root: "r2".into()
            }
        );
    }

    #[test]
    fn an_unreachable_cluster_is_named_with_how_long() {
        let phase = RootPhase::Publish {
            old: "r1".into(),
            new: "r2".into(),
            since: T0,
            settled: None,
        };
        let mut west = obs(false, &[], "r1");
        west.unreachable_since = Some(T0);
        let o = BTreeMap::from([
            ("east".to_owned(), obs(true, &["r1", "r2"], "r1")),
            ("west".to_owned(), west),
        ]);
        let p = plan(
            T0 + Duration::hours(3),
            &two(),
            &phase,
            "r1",
            &o,
            &no_jitter(),
        );
        match &p[0].action {
            Action::Blocked { reason } => {
                assert!(reason.contains("west (unreachable for 3h)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
