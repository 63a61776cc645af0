//! Shared state for HA: the journal in a Secret of a (stand-in) cluster with compare-and-swap,
//! Lease leader election, and `cactl serve` rotating on its timer as the lease holder.

mod common;

use std::time::{Duration, Instant};

use cactl::lease::{Elector, Outcome};
use cactl::state::kube::{Home, KubeStore};

use common::kube_standin::StandIn;
use common::{Env, Server, json};

fn home_config(env: &Env, home: &StandIn, extra: &str) {
    home.add_namespace("cactl-system");
    home.kubeconfig(&env.path("kube/home.yaml"));
    env.write(
        "cactl.yaml",
        format!(
            "state:\n  store: kubernetes\n  kubeconfig: kube/home.yaml\n  namespace: cactl-system\n  secret: cactl-state\n{extra}"
        ),
    );
}

fn store(env: &Env) -> KubeStore {
    KubeStore::new(
        Home {
            kubeconfig: Some(env.path("kube/home.yaml")),
            context: None,
        },
        "cactl-system",
        "cactl-state",
    )
}

#[test]
fn state_lives_in_a_secret_and_concurrent_writers_cannot_both_win() {
    let home = StandIn::start("home");
    let env = Env::new();
    home_config(&env, &home, "clusters:\n- name: east\n");
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    let secret = home
        .get("secrets", "cactl-system", "cactl-state")
        .expect("state Secret");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "cactl"
    );
    assert!(!env.path("cactl-state/state.json").exists());
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["state_revision"], 2);
    assert_eq!(st["clusters"][0]["intermediate"]["root"], "root-1");
    let err = env.fails(&["init"], 1);
    assert!(
        err.contains("state already exists at Secret cactl-system/cactl-state"),
        "{err}"
    );

    // Two writers read revision 2; the first save wins, the second is refused (by the
    // revision, and by the API server's resourceVersion precondition).
    common::two_writers_one_wins(&store(&env), &store(&env));

    // The API server unreachable: a clear error naming the Secret, exit 1.
    home.faults
        .fail_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains("state at Secret cactl-system/cactl-state"),
        "{err}"
    );
}

#[test]
fn one_lease_holder_and_it_stops_before_another_starts() {
    let home = StandIn::start("home");
    let env = Env::new();
    home_config(&env, &home, "");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let home_ref = Home {
            kubeconfig: Some(env.path("kube/home.yaml")),
            context: None,
        };
        let c1 = cactl::state::kube::connect(&home_ref).await.unwrap();
        let c2 = cactl::state::kube::connect(&home_ref).await.unwrap();
        let d = Duration::from_secs(3);
        let a = Elector::new(c1, "cactl-system", "cactl-rotation", "replica-a", d);
        let b = Elector::new(c2, "cactl-system", "cactl-rotation", "replica-b", d);
        assert_eq!(a.attempt().await.unwrap(), Outcome::Leader);
        assert!(a.fence().may_act());
        assert_eq!(
            b.attempt().await.unwrap(),
            Outcome::Follower("replica-a".into())
        );
        assert!(!b.fence().may_act());
        // A renews and keeps it.
        assert_eq!(a.attempt().await.unwrap(), Outcome::Leader);
        let last_renewal = Instant::now();
        // A stops renewing (partitioned). Its fence runs out at 2/3 of the duration; B can
        // take over only after the whole duration.
        let mut a_stopped = None;
        let mut b_started = None;
        while b_started.is_none() {
            if a_stopped.is_none() && !a.fence().may_act() {
                a_stopped = Some(Instant::now());
            }
            if b.attempt().await.unwrap() == Outcome::Leader {
                b_started = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                last_renewal.elapsed() < Duration::from_secs(10),
                "B never took over"
            );
        }
        let (a_stopped, b_started) = (a_stopped.unwrap(), b_started.unwrap());
        assert!(a_stopped < b_started, "the old leader must stop first");
        assert!(b_started - last_renewal >= Duration::from_millis(2900));
        assert!(b.fence().may_act());
        let lease = home
            .get("leases", "cactl-system", "cactl-rotation")
            .unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        // A, back, finds B holding it.
        assert_eq!(
            a.attempt().await.unwrap(),
            Outcome::Follower("replica-b".into())
        );
        b.release().await;
        assert_eq!(a.attempt().await.unwrap(), Outcome::Leader);
    });
}

#[test]
fn serve_rotates_the_root_on_its_timer_as_the_lease_holder() {
    let home = StandIn::start("home");
    let env = Env::new();
    let ext = StandIn::member("ext", &env);
    home_config(
        &env,
        &home,
        "rotation:\n  interval: 1s\n  soak: 1s\n  lease: cactl-rotation\n\
         push:\n  request_timeout: 2s\n  attempts: 1\n\
         clusters:\n- name: ext\n  kubeconfig: kube/ext.yaml\n  mode: external\n  auth:\n    dev_issuer: true\n",
    );
    env.ok(&["init"]);
    env.ok(&["issue", "ext"]);
    let mut server = Server::start(&env, &[]);
    env.ok(&["rotate", "--root"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut phases = Vec::new();
    loop {
        let st = json(&env.ok(&["--output", "json", "status"]));
        let phase = st["rotation"]["root_rotation"]["phase"]
            .as_str()
            .unwrap()
            .to_owned();
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
        }
        if phase == "stable" {
            assert_eq!(st["roots"][0]["status"], "retired", "{st}");
            assert_eq!(
                st["clusters"][0]["intermediate"]["root"],
                st["roots"][1]["id"]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not finish the rotation: {phases:?}\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(phases.first().map(String::as_str), Some("publish"));
    let lease = home
        .get("leases", "cactl-system", "cactl-rotation")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].as_str().is_some());
    let (_, metrics) = common::http_get(&server.metrics, "/metrics");
    assert!(metrics.contains("cactl_leader 1"), "{metrics}");
    assert!(
        metrics.contains("cactl_rotation_runs_total{reason=\"ok\"}"),
        "{metrics}"
    );
    // The pushed bundle holds only the new root, and the server signs under it.
    assert_eq!(ext.istio_root_count("default"), 1);
    assert_eq!(server.terminate(), 0);
    // On shutdown the lease is released.
    let lease = home
        .get("leases", "cactl-system", "cactl-rotation")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}
