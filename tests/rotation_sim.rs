//! Rotation under a simulated clock: three clusters, 400 days, workloads renewing 24 h
//! certificates continuously, scheduled intermediate rotations and a full root rotation (with
//! and without cross-signing), with the mesh-wide invariants checked at every simulated hour;
//! and crash safety: a failure injected at every step of a root rotation in turn, then re-runs
//! until the mesh converges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use cactl::backend::local::LocalRoot;
use cactl::ca::{self, ClusterIssuer};
use cactl::config::{ClusterConfig, ClusterMode, Config};
use cactl::pki::cert::CertInfo;
use cactl::pki::chain;
use cactl::pki::key::{KeyAlgorithm, SecretKey};
use cactl::pki::spiffe::SpiffeId;
use cactl::policy::Approved;
use cactl::rotation::RootPhase;
use cactl::rotation::execute::{self, Context, Fleet, Observation, Request};
use cactl::state::{self, LockGuard, RootStatus, State, StateStore};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const T0: OffsetDateTime = datetime!(2027-01-01 00:00 UTC);
const CLUSTERS: [&str; 3] = ["east", "west", "south"];

/// Where a failure is injected: the n-th operation (saves and pushes counted together).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The save is refused before anything is written (a crash before persisting).
    SaveBefore(usize),
    /// The save is written, then the run dies (a crash right after persisting).
    SaveAfter(usize),
    /// A push fails without touching the cluster.
    Push(usize),
}

#[derive(Default)]
struct Ops {
    count: usize,
    fired: bool,
}

struct World {
    fault: Fault,
    ops: Mutex<Ops>,
    stored: Mutex<Option<Vec<u8>>>,
    /// What each cluster holds: a snapshot of the state as last pushed to it.
    held: Mutex<BTreeMap<String, State>>,
    unreachable: Mutex<BTreeSet<String>>,
}

impl World {
    fn new(fault: Fault) -> Self {
        Self {
            fault,
            ops: Mutex::new(Ops::default()),
            stored: Mutex::new(None),
            held: Mutex::new(BTreeMap::new()),
            unreachable: Mutex::new(BTreeSet::new()),
        }
    }

    /// Counts an operation; true when it is the one to fail.
    fn tick(&self, save: Option<bool>) -> bool {
        let mut ops = self.ops.lock().unwrap();
        let n = ops.count;
        ops.count += 1;
        let hit = match (self.fault, save) {
            (Fault::SaveBefore(k), Some(true)) | (Fault::SaveAfter(k), Some(false)) => k == n,
            (Fault::Push(k), None) => k == n,
            _ => false,
        };
        if hit && !ops.fired {
            ops.fired = true;
            return true;
        }
        false
    }

    fn held(&self, cluster: &str) -> Option<State> {
        self.held.lock().unwrap().get(cluster).cloned()
    }
}

struct NoLock;
impl LockGuard for NoLock {}

struct Store<'a>(&'a World);

impl StateStore for Store<'_> {
    fn location(&self) -> String {
        "memory".into()
    }

    fn lock(&self) -> Result<Box<dyn LockGuard>, state::Error> {
        Ok(Box::new(NoLock))
    }

    fn load(&self) -> Result<Option<State>, state::Error> {
        match &*self.0.stored.lock().unwrap() {
            None => Ok(None),
            Some(b) => State::from_json(b, "memory").map(Some),
        }
    }

    fn save(&self, s: &State) -> Result<(), state::Error> {
        let injected = || state::Error::Io {
            location: "memory".into(),
            source: std::io::Error::other("injected failure"),
        };
        let before = matches!(self.0.fault, Fault::SaveBefore(_));
        if before && self.0.tick(Some(true)) {
            return Err(injected());
        }
        {
            let mut stored = self.0.stored.lock().unwrap();
            let found = match &*stored {
                None => 0,
                Some(b) => State::from_json(b, "memory")?.revision,
            };
            if found + 1 != s.revision {
                return Err(state::Error::Conflict {
                    location: "memory".into(),
                    expected: s.revision - 1,
                    found,
                });
            }
            *stored = Some(s.to_json());
        }
        if !before && self.0.tick(Some(false)) {
            return Err(injected());
        }
        Ok(())
    }
}

fn in_sync(held: &State, want: &State, cluster: &str) -> bool {
    let serial = |s: &State| {
        s.clusters
            .get(cluster)
            .and_then(|c| c.current.as_ref())
            .map(|r| r.serial.clone())
    };
    ca::bundle_roots(held).ok() == ca::bundle_roots(want).ok() && serial(held) == serial(want)
}

impl Fleet for World {
    async fn observe(&self, state: &State, cluster: &str) -> Observation {
        if self.unreachable.lock().unwrap().contains(cluster) {
            return Observation {
                reachable: false,
                in_sync: false,
                detail: Some("connection refused".into()),
                no_access: false,
            };
        }
        let ok = self
            .held(cluster)
            .is_some_and(|h| in_sync(&h, state, cluster));
        Observation {
            reachable: true,
            in_sync: ok,
            detail: (!ok).then(|| "drifted".to_owned()),
            no_access: false,
        }
    }

    async fn push(&self, state: &State, cluster: &str) -> Observation {
        if self.unreachable.lock().unwrap().contains(cluster) || self.tick(None) {
            return Observation {
                reachable: true,
                in_sync: false,
                detail: Some("push failed".into()),
                no_access: false,
            };
        }
        self.held
            .lock()
            .unwrap()
            .insert(cluster.to_owned(), state.clone());
        self.observe(state, cluster).await
    }
}

fn config(intermediate_days: u64) -> Config {
    let mut c = Config::default();
    c.intermediate.lifetime = std::time::Duration::from_secs(intermediate_days * 86_400);
    c.workload.default_ttl = std::time::Duration::from_secs(24 * 3600);
    c.workload.max_ttl = std::time::Duration::from_secs(24 * 3600);
    for n in CLUSTERS {
        let mut cc = ClusterConfig::named(n);
        cc.mode = ClusterMode::Plugin;
        c.clusters.push(cc);
    }
    c.validate("test").unwrap();
    c
}

/// A fresh mesh at `T0`: root, one intermediate per cluster, every cluster holding it.
fn bootstrap(world: &World, config: &Config) {
    let backend = LocalRoot::new();
    let mut s = State::new();
    ca::init_generated(&mut s, config, &backend, T0).unwrap();
    for n in CLUSTERS {
        ca::issue_intermediate(&mut s, config, &backend, n, T0).unwrap();
    }
    s.revision = 1;
    *world.stored.lock().unwrap() = Some(s.to_json());
    for n in CLUSTERS {
        world.held.lock().unwrap().insert(n.to_owned(), s.clone());
    }
}

fn run(
    world: &World,
    config: &Config,
    now: OffsetDateTime,
    request: &Request,
) -> Result<execute::Report, execute::Error> {
    let backend = LocalRoot::new();
    let ctx = Context {
        config,
        backend: &backend,
        policy: config.rotation_policy(),
        fence: cactl::lease::Fence::always(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(execute::run(
        &ctx,
        &Store(world),
        world,
        now,
        &[],
        request,
        &|_| {},
    ))
}

/// Starts a root rotation (without cross-signing) at `T0`.
fn start_root(world: &World, config: &Config) {
    run(world, config, T0, &Request::StartRoot { cross_sign: false }).unwrap();
}

fn stored(world: &World) -> State {
    State::from_json(world.stored.lock().unwrap().as_ref().unwrap(), "memory").unwrap()
}

/// A workload certificate as its proxy holds it.
struct Workload {
    issued: OffsetDateTime,
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    not_after: OffsetDateTime,
    intermediate_not_after: OffsetDateTime,
    root_id: String,
}

fn root_ids(s: &State) -> Vec<String> {
    s.active_roots().map(|r| r.id.clone()).collect()
}

/// Three clusters for 400 days; the root rotation starts on day 150.
fn simulate(cross_sign: bool) {
    let config = config(150);
    let world = World::new(Fault::None);
    bootstrap(&world, &config);
    let old_root = stored(&world).roots[0].id.clone();
    let old_root_der = cactl::pki::pem::certificates(&stored(&world).roots[0].cert_pem).unwrap();
    let probe_key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let mut issuers: BTreeMap<String, ClusterIssuer> = BTreeMap::new();
    let mut workloads: BTreeMap<String, Vec<Workload>> = BTreeMap::new();
    let mut verified: BTreeSet<(Vec<u8>, Vec<Vec<u8>>)> = BTreeSet::new();
    let mut phases_seen: Vec<String> = Vec::new();
    let mut activations = 0;
    for hour in 0..400 * 24 {
        let now = T0 + Duration::hours(hour);
        let request = if hour == 150 * 24 {
            Request::StartRoot { cross_sign }
        } else {
            Request::Due
        };
        let report = run(&world, &config, now, &request).unwrap();
        activations += report
            .steps
            .iter()
            .filter(|s| matches!(s, execute::Step::Activated { .. }))
            .count();
        let phase = report.phase.name().to_owned();
        if phases_seen.last() != Some(&phase) {
            phases_seen.push(phase);
        }
        // Workloads renew at half their lifetime, signed by what their cluster holds.
        for n in CLUSTERS {
            let held = world.held(n).unwrap();
            let record = held.clusters[n].current.clone().unwrap();
            // Always an active issuer in every cluster.
            assert!(
                record.not_before.unwrap() <= now && now < record.not_after,
                "{n} has no valid issuer at {now}"
            );
            let list = workloads.entry(n.to_owned()).or_default();
            let due = list
                .last()
                .is_none_or(|w| now >= w.issued + Duration::hours(12));
            if due {
                let fresh = issuers.get(n).is_none_or(|i| i.serial() != record.serial);
                if fresh {
                    issuers.insert(
                        n.to_owned(),
                        ClusterIssuer::load_at(&held, &config, n, now).unwrap(),
                    );
                }
                let issuer = &issuers[n];
                let approved = Approved {
                    identity: SpiffeId::new("cluster.local", n, "app").unwrap(),
                    spki: probe_key.public_key_spki(),
                    rsa_key: false,
                    ttl: Duration::hours(24),
                    ttl_clamped: false,
                };
                let issued = issuer.issue(&approved, now).unwrap();
                let info = CertInfo::from_der(&issued.leaf).unwrap();
                list.push(Workload {
                    issued: now,
                    not_after: info.not_after,
                    leaf: issued.leaf,
                    intermediate_not_after: CertInfo::from_der(&issued.intermediates[0])
                        .unwrap()
                        .not_after,
                    intermediates: issued.intermediates,
                    root_id: record.root_id.clone(),
                });
            }
            list.retain(|w| w.not_after >= now);
        }
        // Mutual trust: every live workload certificate verifies under every cluster's bundle.
        let bundles: BTreeMap<&str, Vec<Vec<u8>>> = CLUSTERS
            .iter()
            .map(|n| (*n, ca::bundle_roots(&world.held(n).unwrap()).unwrap()))
            .collect();
        for (a, list) in &workloads {
            for w in list {
                // No certificate outlives its issuer.
                assert!(
                    w.not_after <= w.intermediate_not_after,
                    "{a}: leaf outlives issuer"
                );
                for (b, bundle) in &bundles {
                    let key = (w.leaf.clone(), bundle.clone());
                    if verified.contains(&key) {
                        // Same certificate, same bundle: only time can change the verdict.
                        assert!(now <= w.not_after);
                        continue;
                    }
                    let mut chain_ders = vec![w.leaf.clone()];
                    chain_ders.extend(w.intermediates.iter().cloned());
                    chain::verify(&chain_ders, bundle, now).unwrap_or_else(|e| {
                        panic!(
                            "hour {hour} ({now}): workload of {a} (root {}) does not verify in {b} holding {:?}: {e}",
                            w.root_id,
                            root_ids(&world.held(b).unwrap())
                        )
                    });
                    verified.insert(key);
                }
                // Cross-signing: during the rotation, a certificate under the new root also
                // verifies for a peer that trusts only the old root.
                let rotating = matches!(report.phase.name(), "switch" | "retire");
                if cross_sign && rotating && w.root_id != old_root {
                    let mut chain_ders = vec![w.leaf.clone()];
                    chain_ders.extend(w.intermediates.iter().cloned());
                    assert!(
                        w.intermediates.len() == 2,
                        "cross-signed root missing from chain"
                    );
                    chain::verify(&chain_ders, &old_root_der, now).unwrap();
                }
            }
        }
        // Roots never outlive their use: every held intermediate sits under a held root.
        for n in CLUSTERS {
            let held = world.held(n).unwrap();
            let root = &held.clusters[n].current.as_ref().unwrap().root_id;
            assert!(
                root_ids(&held).contains(root),
                "{n} uses a root it does not trust"
            );
        }
    }
    assert_eq!(
        phases_seen,
        ["stable", "publish", "switch", "retire", "stable"]
    );
    let end = stored(&world);
    assert_eq!(end.roots.len(), 2);
    assert_eq!(end.roots[0].status, RootStatus::Retired);
    assert!(end.roots[0].retired_at.is_some());
    assert!(
        end.roots[0].key_pem.is_some(),
        "the old root is kept in history"
    );
    assert_eq!(end.roots[1].status, RootStatus::Active);
    assert_eq!(end.root_rotation.phase, RootPhase::Stable);
    for n in CLUSTERS {
        let cs = &end.clusters[n];
        assert_eq!(cs.current.as_ref().unwrap().root_id, end.roots[1].id);
        // Two scheduled rotations (days ~143 and ~286 after each issue) plus the switch.
        assert!(
            cs.history.len() >= 3,
            "{n}: {} earlier intermediates",
            cs.history.len()
        );
        assert_eq!(
            root_ids(&world.held(n).unwrap()),
            vec![end.roots[1].id.clone()]
        );
    }
    assert!(activations >= 9, "{activations} activations");
}

#[test]
fn four_hundred_days_with_a_root_rotation() {
    simulate(false);
}

#[test]
fn four_hundred_days_with_a_cross_signed_root_rotation() {
    simulate(true);
}

/// Drives a root rotation to the end with hourly runs, checking at every hour that no cluster
/// trusts less than it must. Returns the number of operations (saves and pushes) it took.
fn drive_root_rotation(world: &World, config: &Config, cross_sign: bool) -> usize {
    let mut started = false;
    for hour in 0..24 * 10 {
        let now = T0 + Duration::hours(hour);
        let request = if started {
            Request::Due
        } else {
            Request::StartRoot { cross_sign }
        };
        match run(world, config, now, &request) {
            Ok(_) => started = true,
            Err(e) => {
                // A crash: the next run starts from whatever was saved.
                let s = stored(world);
                started = s.root_rotation.phase != RootPhase::Stable || s.roots.len() > 1;
                assert!(e.to_string().contains("injected"), "{e}");
            }
        }
        let s = stored(world);
        // Every cluster trusts the root of every cluster's intermediate in use.
        for a in CLUSTERS {
            let held_a = world.held(a).unwrap();
            let root = held_a.clusters[a].current.as_ref().unwrap().root_id.clone();
            for b in CLUSTERS {
                assert!(
                    root_ids(&world.held(b).unwrap()).contains(&root),
                    "hour {hour}: {b} does not trust {root}, which {a} signs under"
                );
            }
        }
        // No lost key: every intermediate and root the state holds has its key.
        for r in &s.roots {
            assert!(r.key_pem.is_some());
        }
        for cs in s.clusters.values() {
            for rec in cs.current.iter().chain(cs.prepared.iter()) {
                let key = SecretKey::from_pem(rec.key_pem.expose()).unwrap();
                let cert = cactl::pki::pem::certificates(&rec.cert_pem).unwrap();
                assert_eq!(
                    CertInfo::from_der(&cert[0]).unwrap().spki,
                    key.public_key_spki()
                );
            }
        }
        if started && s.root_rotation.phase == RootPhase::Stable && s.roots.len() == 2 {
            break;
        }
    }
    world.ops.lock().unwrap().count
}

fn assert_converged(world: &World, label: &str) {
    let s = stored(world);
    assert_eq!(s.root_rotation.phase, RootPhase::Stable, "{label}");
    assert_eq!(s.roots.len(), 2, "{label}: roots {:?}", root_ids(&s));
    assert_eq!(s.roots[0].status, RootStatus::Retired, "{label}");
    assert_eq!(s.roots[1].status, RootStatus::Active, "{label}");
    for n in CLUSTERS {
        let held = world.held(n).unwrap();
        assert!(
            in_sync(&held, &s, n),
            "{label}: {n} does not hold the final state"
        );
        assert_eq!(
            held.clusters[n].current.as_ref().unwrap().root_id,
            s.roots[1].id,
            "{label}"
        );
    }
}

#[test]
fn a_failure_at_every_step_of_a_root_rotation_still_converges() {
    let config = config(365);
    // A clean run counts the steps.
    let clean = World::new(Fault::None);
    bootstrap(&clean, &config);
    let total = drive_root_rotation(&clean, &config, true);
    assert_converged(&clean, "clean");
    assert!(total > 10, "{total} operations");
    let mut injected = 0;
    for k in 0..total {
        for fault in [Fault::SaveBefore(k), Fault::SaveAfter(k), Fault::Push(k)] {
            let world = World::new(fault);
            bootstrap(&world, &config);
            drive_root_rotation(&world, &config, true);
            if world.ops.lock().unwrap().fired {
                injected += 1;
            }
            assert_converged(&world, &format!("{fault:?}"));
        }
    }
    assert!(injected >= total, "only {injected} failures were injected");
    eprintln!(
        "root rotation: {total} saves and pushes; {injected} runs with a failure injected, all converged"
    );
}

#[test]
fn an_unreachable_cluster_holds_the_mesh_and_is_named() {
    let config = config(365);
    let world = World::new(Fault::None);
    bootstrap(&world, &config);
    world.unreachable.lock().unwrap().insert("west".into());
    start_root(&world, &config);
    let report = run(&world, &config, T0 + Duration::days(5), &Request::Due).unwrap();
    assert_eq!(report.phase.name(), "publish");
    assert_eq!(report.held.len(), 1);
    assert!(
        report.held[0].contains("west (unreachable for 5days)"),
        "{:?}",
        report.held
    );
    assert!(!report.clusters["west"].reachable);
    // It comes back: the soak starts only then, so west gets the whole soak.
    world.unreachable.lock().unwrap().clear();
    let report = run(&world, &config, T0 + Duration::days(6), &Request::Due).unwrap();
    assert_eq!(report.phase.name(), "publish");
    assert!(
        report.held[0].contains("soaking until 2027-01-08T00:00:00Z"),
        "{:?}",
        report.held
    );
    let report = run(&world, &config, T0 + Duration::days(8), &Request::Due).unwrap();
    assert_eq!(report.phase.name(), "switch");
}

#[test]
fn abort_in_switch_moves_every_cluster_back_and_retires_the_new_root() {
    let config = config(365);
    let world = World::new(Fault::None);
    bootstrap(&world, &config);
    start_root(&world, &config);
    let r = run(&world, &config, T0 + Duration::days(1), &Request::Due).unwrap();
    assert_eq!(r.phase.name(), "switch");
    let new_root = stored(&world).roots[1].id.clone();
    for n in CLUSTERS {
        assert_eq!(
            world.held(n).unwrap().clusters[n]
                .current
                .as_ref()
                .unwrap()
                .root_id,
            new_root
        );
    }
    let r = run(
        &world,
        &config,
        T0 + Duration::days(1) + Duration::hours(1),
        &Request::AbortRoot,
    )
    .unwrap();
    assert!(
        r.steps
            .iter()
            .any(|s| matches!(s, execute::Step::Aborted { .. }))
    );
    // Everybody is back on the old root while both roots are still trusted.
    let old_root = stored(&world).roots[0].id.clone();
    for n in CLUSTERS {
        let held = world.held(n).unwrap();
        assert_eq!(held.clusters[n].current.as_ref().unwrap().root_id, old_root);
        assert_eq!(root_ids(&held).len(), 2);
    }
    let err = run(&world, &config, T0 + Duration::days(2), &Request::AbortRoot).unwrap_err();
    assert!(err.to_string().contains("already being aborted"), "{err}");
    for day in 5..10 {
        run(&world, &config, T0 + Duration::days(day), &Request::Due).unwrap();
    }
    let s = stored(&world);
    assert_eq!(s.root_rotation.phase, RootPhase::Stable);
    assert_eq!(s.roots[1].status, RootStatus::Retired);
    assert_eq!(s.roots[0].status, RootStatus::Active);
    for n in CLUSTERS {
        assert_eq!(root_ids(&world.held(n).unwrap()), vec![old_root.clone()]);
    }
}

#[test]
fn emergency_replacement_is_immediate_and_recorded() {
    let config = config(365);
    let world = World::new(Fault::None);
    bootstrap(&world, &config);
    let before = stored(&world).clusters["east"].current.clone().unwrap();
    let r = run(
        &world,
        &config,
        T0 + Duration::hours(1),
        &Request::Emergency("east".into()),
    )
    .unwrap();
    let s = stored(&world);
    let now = s.clusters["east"].current.clone().unwrap();
    assert_ne!(now.serial, before.serial);
    assert_eq!(
        s.clusters["east"].history.last().unwrap().serial,
        before.serial
    );
    assert!(
        s.clusters["east"]
            .history
            .last()
            .unwrap()
            .replaced_early_at
            .is_some()
    );
    assert!(
        matches!(&r.steps[0], execute::Step::Replaced { replaced: Some(x), .. } if *x == before.serial)
    );
    // Pushed in the same run; the other clusters are untouched.
    assert_eq!(
        world.held("east").unwrap().clusters["east"]
            .current
            .as_ref()
            .unwrap()
            .serial,
        now.serial
    );
    assert_eq!(s.clusters["west"].history.len(), 0);
}
