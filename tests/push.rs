//! Distribution to stand-in clusters through the real binary: first push creates everything,
//! a second push writes nothing, drift is repaired without clobbering unrelated keys or labels,
//! a concurrent writer is handled by re-reading on 409, objects cactl did not create are left
//! alone unless adopted, and one failing cluster never blocks the others.

mod common;

use std::sync::atomic::Ordering;

use common::kube_standin::StandIn;
use common::{Env, json};
use serde_json::json;

struct Mesh {
    env: Env,
    east: StandIn,
    west: StandIn,
    ext: StandIn,
}

fn mesh() -> Mesh {
    let east = StandIn::start("east");
    let west = StandIn::start("west");
    let ext = StandIn::start("ext");
    for s in [&east, &west, &ext] {
        for ns in [
            "istio-system",
            "default",
            "kube-system",
            "kube-public",
            "kube-node-lease",
        ] {
            s.add_namespace(ns);
        }
    }
    ext.add_namespace("shop");
    let env = Env::new();
    for s in [&east, &west, &ext] {
        s.kubeconfig(&env.path(&format!("kube/{}.yaml", s.name)));
    }
    env.write(
        "cactl.yaml",
        "push:\n  request_timeout: 2s\n  attempts: 2\nclusters:\n\
         - name: east\n  kubeconfig: kube/east.yaml\n\
         - name: west\n  kubeconfig: kube/west.yaml\n\
         - name: ext\n  kubeconfig: kube/ext.yaml\n  mode: external\n  cluster_trust_bundle: istio.io/istiod-ca\n",
    );
    env.ok(&["init"]);
    for c in ["east", "west", "ext"] {
        env.ok(&["issue", c]);
    }
    env.ok(&["export", "east", "--out", "out"]);
    env.ok(&["export", "west", "--out", "out"]);
    Mesh {
        env,
        east,
        west,
        ext,
    }
}

fn b64(v: &serde_json::Value) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn first_push_creates_second_writes_nothing_and_drift_is_repaired() {
    let m = mesh();
    let out = m.env.ok(&["push"]);
    assert!(out.contains("east: ok, 2 object(s): 2 created"), "{out}");
    assert!(out.contains("ext: ok, 6 object(s): 6 created"), "{out}");
    let bundle = m.env.ok(&["bundle"]);

    // Plugin clusters: cacerts exactly as `cactl export` writes it, and the trust bundle.
    for (s, c) in [(&m.east, "east"), (&m.west, "west")] {
        let sec = s
            .get("secrets", "istio-system", "cacerts")
            .expect("cacerts");
        for f in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            assert_eq!(
                b64(&sec["data"][f]),
                m.env.read(&format!("out/{c}/{f}")),
                "{c} {f}"
            );
        }
        assert_eq!(
            sec["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "cactl"
        );
        assert_eq!(
            sec["metadata"]["annotations"]["cactl.io/content-hash"]
                .as_str()
                .unwrap()
                .len(),
            64
        );
        let tb = s
            .get("configmaps", "istio-system", "cactl-trust-bundle")
            .expect("bundle");
        assert_eq!(tb["data"]["root-cert.pem"], bundle.as_str());
    }
    // External cluster: istio-ca-root-cert everywhere istiod would put it, not in skipped ones.
    for ns in ["istio-system", "default", "kube-system", "shop"] {
        let cm = m
            .ext
            .get("configmaps", ns, "istio-ca-root-cert")
            .unwrap_or_else(|| panic!("{ns}"));
        assert_eq!(cm["data"]["root-cert.pem"], bundle.as_str());
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
    }
    for ns in ["kube-public", "kube-node-lease"] {
        assert!(
            m.ext.get("configmaps", ns, "istio-ca-root-cert").is_none(),
            "{ns}"
        );
    }
    assert!(
        m.ext.get("secrets", "istio-system", "cacerts").is_none(),
        "no key leaves cactl in external mode"
    );
    let ctb = m
        .ext
        .get(
            "clustertrustbundles",
            "",
            "istio.io:istiod-ca:cactl:root-bundle",
        )
        .expect("CTB");
    assert_eq!(ctb["spec"]["signerName"], "istio.io/istiod-ca");
    assert_eq!(ctb["spec"]["trustBundle"], bundle.as_str());

    // Second push: zero writes anywhere.
    let before: Vec<u64> = [&m.east, &m.west, &m.ext]
        .iter()
        .map(|s| s.writes())
        .collect();
    let out = m.env.ok(&["push"]);
    assert!(out.contains("0 write(s)"), "{out}");
    let after: Vec<u64> = [&m.east, &m.west, &m.ext]
        .iter()
        .map(|s| s.writes())
        .collect();
    assert_eq!(before, after, "a no-op push must not write");

    // A namespace created later gets the ConfigMap on the next push.
    m.ext.add_namespace("payments");
    m.env.ok(&["push", "ext"]);
    assert!(
        m.ext
            .get("configmaps", "payments", "istio-ca-root-cert")
            .is_some()
    );

    // Drift: someone edits our key and adds their own key and label; another deletes.
    let mut cm = m
        .ext
        .get("configmaps", "shop", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("tampered");
    cm["data"]["theirs.txt"] = json!("keep me");
    cm["metadata"]["labels"]["team"] = json!("shop");
    m.ext.put("configmaps", "shop", cm);
    m.east
        .remove("configmaps", "istio-system", "cactl-trust-bundle");
    let dry = m.env.ok(&["push", "--dry-run"]);
    assert!(dry.contains("would write"), "{dry}");
    assert_eq!(
        m.ext
            .get("configmaps", "shop", "istio-ca-root-cert")
            .unwrap()["data"]["root-cert.pem"],
        "tampered",
        "dry run writes nothing"
    );
    m.env.ok(&["push"]);
    let cm = m
        .ext
        .get("configmaps", "shop", "istio-ca-root-cert")
        .unwrap();
    assert_eq!(cm["data"]["root-cert.pem"], bundle.as_str());
    assert_eq!(cm["data"]["theirs.txt"], "keep me");
    assert_eq!(cm["metadata"]["labels"]["team"], "shop");
    assert!(
        m.east
            .get("configmaps", "istio-system", "cactl-trust-bundle")
            .is_some()
    );

    // JSON report and the recorded last push.
    let j = json(&m.env.ok(&["--output", "json", "push", "--dry-run"]));
    assert_eq!(j["clusters"].as_array().unwrap().len(), 3);
    assert_eq!(j["clusters"][0]["objects"][0]["before"]["state"], "in-sync");
    let status = json(&m.env.read("cactl-state/push-status.json"));
    assert_eq!(status["clusters"]["east"]["ok"], true);
}

#[test]
fn concurrent_writer_is_retried_and_unrelated_changes_survive() {
    let m = mesh();
    m.env.ok(&["push", "east"]);
    // Make our content stale so the next push must update cacerts.
    let mut sec = m.east.get("secrets", "istio-system", "cacerts").unwrap();
    sec["data"]["root-cert.pem"] = json!("c3RhbGU=");
    m.east.put("secrets", "istio-system", sec);
    *m.east.faults.race_after_get.lock().unwrap() =
        Some(("secrets".into(), "istio-system".into(), "cacerts".into()));
    let conflicts = m.east.counters.conflicts.load(Ordering::SeqCst);
    m.env.ok(&["push", "east"]);
    assert!(
        m.east.counters.conflicts.load(Ordering::SeqCst) > conflicts,
        "the race must have produced a 409"
    );
    let sec = m.east.get("secrets", "istio-system", "cacerts").unwrap();
    assert_eq!(
        b64(&sec["data"]["root-cert.pem"]),
        m.env.read("out/east/root-cert.pem")
    );
    assert_eq!(
        sec["metadata"]["labels"]["racer"], "1",
        "the other writer's change is kept"
    );
}

#[test]
fn objects_not_created_by_cactl_are_left_alone_unless_adopted() {
    let m = mesh();
    m.west.put(
        "secrets",
        "istio-system",
        json!({"metadata": {"name": "cacerts"}, "data": {"ca-cert.pem": "aGFuZG1hZGU="}}),
    );
    let r = m.env.run(&["push", "west"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("not ours (use --adopt)"), "{}", r.stdout);
    assert!(
        r.stderr.contains("push failed for 1 cluster(s): west"),
        "{}",
        r.stderr
    );
    assert_eq!(
        m.west.get("secrets", "istio-system", "cacerts").unwrap()["data"]["ca-cert.pem"],
        "aGFuZG1hZGU="
    );
    m.env.ok(&["push", "west", "--adopt"]);
    let sec = m.west.get("secrets", "istio-system", "cacerts").unwrap();
    assert_eq!(
        b64(&sec["data"]["ca-cert.pem"]),
        m.env.read("out/west/ca-cert.pem")
    );
    assert_eq!(
        sec["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "cactl"
    );
}

#[test]
fn a_failing_cluster_never_blocks_the_others_and_recovers() {
    let m = mesh();
    m.west.faults.fail_all.store(true, Ordering::SeqCst);
    m.ext.faults.latency_ms.store(5_000, Ordering::SeqCst); // hangs past the 2 s timeout
    let r = m.env.run(&["push"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("east: ok"), "{}", r.stdout);
    assert!(
        r.stdout.contains("west: FAILED after 2 attempt(s)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("ext: FAILED after 2 attempt(s): request timed out"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr
            .contains("push failed for 2 cluster(s): ext (request timed out after 2s); west ("),
        "{}",
        r.stderr
    );
    assert!(m.east.get("secrets", "istio-system", "cacerts").is_some());
    assert!(
        m.west.get("secrets", "istio-system", "cacerts").is_none(),
        "nothing half-written"
    );
    // Recovery.
    m.west.faults.fail_all.store(false, Ordering::SeqCst);
    m.ext.faults.latency_ms.store(0, Ordering::SeqCst);
    m.env.ok(&["push"]);
    assert!(m.west.get("secrets", "istio-system", "cacerts").is_some());
    // Dropped connections: reported, others fine, repaired after recovery.
    m.ext.faults.drop_connections.store(true, Ordering::SeqCst);
    let mut cm = m
        .ext
        .get("configmaps", "default", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("edited");
    m.ext.put("configmaps", "default", cm);
    let r = m.env.run(&["push"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("ext: FAILED after 2 attempt(s)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("east: ok") && r.stdout.contains("west: ok"),
        "{}",
        r.stdout
    );
    m.ext.faults.drop_connections.store(false, Ordering::SeqCst);
    m.env.ok(&["push", "ext"]);
    assert_ne!(
        m.ext
            .get("configmaps", "default", "istio-ca-root-cert")
            .unwrap()["data"]["root-cert.pem"],
        "edited"
    );
    // Unreachable (nothing listens) and forbidden.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kc = m
        .env
        .read("kube/west.yaml")
        .replace(&m.west.addr.to_string(), &dead.to_string());
    m.env.write("kube/west.yaml", kc);
    m.east.forbid("secrets", "cacerts");
    let mut sec = m.east.get("secrets", "istio-system", "cacerts").unwrap();
    sec["data"]["root-cert.pem"] = json!("c3RhbGU=");
    m.east.put("secrets", "istio-system", sec);
    let r = m.env.run(&["push"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("west: FAILED"), "{}", r.stdout);
    assert!(r.stdout.contains("east: FAILED after 1 attempt(s): missing permission: cannot get secrets istio-system/cacerts"), "{}", r.stdout);
    assert!(r.stdout.contains("ext: ok"), "{}", r.stdout);
}

#[test]
fn status_reports_drift_istiod_pickup_and_last_push() {
    let m = mesh();
    let st = json(&m.env.ok(&["--output", "json", "status"]));
    assert_eq!(st["clusters"][0]["name"], "east");
    assert_eq!(st["clusters"][0]["sync"]["missing"], 2, "{st}");
    assert_eq!(st["clusters"][0]["sync"]["istiod_has_bundle"], false);
    assert!(st["clusters"][0]["last_push"].is_null());
    m.env.ok(&["push"]);
    // istiod rewrites istio-ca-root-cert after it reloads cacerts.
    let bundle = m.env.ok(&["bundle"]);
    m.east.put(
        "configmaps",
        "istio-system",
        json!({"metadata": {"name": "istio-ca-root-cert"}, "data": {"root-cert.pem": bundle}}),
    );
    let mut cm = m
        .ext
        .get("configmaps", "default", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("edited");
    m.ext.put("configmaps", "default", cm);
    let st = json(&m.env.ok(&["--output", "json", "status"]));
    let east = &st["clusters"][0];
    assert_eq!(east["sync"]["in_sync"], 2, "{st}");
    assert_eq!(east["sync"]["istiod_has_bundle"], true);
    assert_eq!(east["last_push"]["ok"], true);
    let ext = &st["clusters"][2];
    assert_eq!(ext["sync"]["drifted"], 1, "{st}");
    assert_eq!(
        ext["sync"]["out_of_sync"],
        json!(["ConfigMap default/istio-ca-root-cert"])
    );
    let text = m.env.ok(&["status"]);
    assert!(
        text.contains("sync: OUT OF SYNC: 1 drifted, 0 missing, 0 not ours"),
        "{text}"
    );
    assert!(
        text.contains("istiod: istio-ca-root-cert holds the bundle"),
        "{text}"
    );
    // An unreachable cluster is reported, not fatal.
    m.west.faults.fail_all.store(true, Ordering::SeqCst);
    let text = m.env.ok(&["status"]);
    assert!(text.contains("sync: UNREACHABLE or failing"), "{text}");
}

#[test]
fn serve_keeps_clusters_in_sync_and_repairs_edits_and_deletions() {
    let m = mesh();
    let cfg = m
        .env
        .read("cactl.yaml")
        .replace("push:\n", "push:\n  resync_interval: 30s\n");
    m.env.write("cactl.yaml", cfg);
    let _server = common::Server::start(&m.env, &[]);
    let bundle = m.env.ok(&["bundle"]);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        for _ in 0..100 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("not repaired within 10 s: {what}");
    };
    wait("initial sync", &|| {
        m.east.get("secrets", "istio-system", "cacerts").is_some()
            && m.ext
                .get("configmaps", "shop", "istio-ca-root-cert")
                .is_some()
    });
    // Deletion and edit are repaired by the watch, well before the 30 s resync.
    m.east.remove("secrets", "istio-system", "cacerts");
    wait("deleted cacerts", &|| {
        m.east.get("secrets", "istio-system", "cacerts").is_some()
    });
    let mut cm = m
        .ext
        .get("configmaps", "shop", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("edited");
    m.ext.put("configmaps", "shop", cm);
    wait("edited ConfigMap", &|| {
        m.ext
            .get("configmaps", "shop", "istio-ca-root-cert")
            .unwrap()["data"]["root-cert.pem"]
            == bundle.as_str()
    });
    // A new namespace gets its ConfigMap.
    m.ext.add_namespace("late");
    wait("new namespace", &|| {
        m.ext
            .get("configmaps", "late", "istio-ca-root-cert")
            .is_some()
    });
}
