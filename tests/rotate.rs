//! `cactl rotate` end to end, through the real binary against stand-in clusters: planning
//! changes nothing, a cross-signed root rotation goes through publish, switch and retire with
//! `status` at every step (istiod's pickup emulated in the plugin cluster), an emergency
//! replacement, and two concurrent runs.

mod common;

use std::time::Duration;

use common::kube_standin::StandIn;
use common::{Env, json};
use serde_json::{Value, json};

const SOAK: Duration = Duration::from_millis(2100);

struct Mesh {
    env: Env,
    east: StandIn,
    ext: StandIn,
}

fn mesh() -> Mesh {
    let env = Env::new();
    let east = StandIn::member("east", &env);
    let ext = StandIn::member("ext", &env);
    env.write(
        "cactl.yaml",
        "push:\n  request_timeout: 2s\n  attempts: 1\nrotation:\n  soak: 2s\nclusters:\n\
         - name: east\n  kubeconfig: kube/east.yaml\n\
         - name: ext\n  kubeconfig: kube/ext.yaml\n  mode: external\n",
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    env.ok(&["issue", "ext"]);
    env.ok(&["push"]);
    Mesh { env, east, ext }
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// What istiod does after it reloads `cacerts`: rewrites `istio-ca-root-cert`.
fn istiod_reloads(east: &StandIn) {
    let sec = east.get("secrets", "istio-system", "cacerts").unwrap();
    let roots = b64(&sec["data"]["root-cert.pem"]);
    east.put(
        "configmaps",
        "istio-system",
        json!({"metadata": {"name": "istio-ca-root-cert"}, "data": {"root-cert.pem": roots}}),
    );
}

fn pem_count(text: &str) -> usize {
    text.matches("-----BEGIN CERTIFICATE-----").count()
}

fn cacerts(east: &StandIn, key: &str) -> String {
    b64(&east.get("secrets", "istio-system", "cacerts").unwrap()["data"][key])
}

fn ext_roots(ext: &StandIn) -> String {
    ext.get("configmaps", "default", "istio-ca-root-cert")
        .unwrap()["data"]["root-cert.pem"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn status(env: &Env) -> Value {
    json(&env.ok(&["--output", "json", "status"]))
}

fn rotate(env: &Env) -> Value {
    json(&env.ok(&["--output", "json", "rotate"]))
}

fn steps(report: &Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let kind = s["step"].as_str().unwrap().to_owned();
            match s["cluster"].as_str() {
                Some(c) => format!("{kind} {c}"),
                None => match s["phase"].as_str() {
                    Some(p) => format!("{kind} {p}"),
                    None => kind,
                },
            }
        })
        .collect()
}

#[test]
fn plan_changes_nothing_and_names_thresholds() {
    let m = mesh();
    istiod_reloads(&m.east);
    let before = m.env.snapshot();
    let writes = m.east.writes() + m.ext.writes();
    let plan = json(&m.env.ok(&["--output", "json", "rotate", "--plan"]));
    assert_eq!(plan["root_rotation"]["phase"], "stable");
    for c in plan["clusters"].as_array().unwrap() {
        assert_eq!(c["due"], json!([]), "{plan}");
        assert_eq!(c["observed"]["in_sync"], true, "{plan}");
    }
    // A year ahead: both clusters are due, with the threshold named.
    let plan = json(&m.env.ok(&[
        "--output",
        "json",
        "rotate",
        "--plan",
        "--at",
        "2100-01-01T00:00:00Z",
    ]));
    let east = &plan["clusters"][0];
    assert_eq!(east["name"], "east");
    assert_eq!(east["due"][0]["action"]["action"], "prepare", "{plan}");
    assert!(
        east["due"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("preparation threshold"),
        "{plan}"
    );
    let text = m.env.ok(&["rotate", "--plan"]);
    assert!(text.contains("(nothing is changed)"), "{text}");
    assert!(text.contains("east             active"), "{text}");
    assert_eq!(
        m.env.snapshot(),
        before,
        "--plan must not change local files"
    );
    assert_eq!(
        m.east.writes() + m.ext.writes(),
        writes,
        "--plan must not write"
    );
    // Nothing due: a run changes nothing either.
    let r = rotate(&m.env);
    assert_eq!(r["steps"], json!([]), "{r}");
    assert_eq!(m.east.writes() + m.ext.writes(), writes);
    // Bad combinations are refused.
    m.env.fails(&["rotate", "east", "ext", "--now"], 1);
    m.env.fails(&["rotate", "east", "--root"], 1);
    m.env.fails(&["rotate", "--abort"], 2);
    m.env.fails(&["rotate", "nowhere"], 1);
    let err = m.env.fails(&["rotate", "--root", "--abort"], 1);
    assert!(err.contains("no root rotation is in progress"), "{err}");
}

#[test]
fn cross_signed_root_rotation_through_every_phase() {
    let m = mesh();
    istiod_reloads(&m.east);
    let old_root = m.env.ok(&["bundle"]);
    assert_eq!(pem_count(&old_root), 1);

    // Publish: bundles become {old, new}; the intermediates stay.
    let r = json(
        &m.env
            .ok(&["--output", "json", "rotate", "--root", "--cross-sign"]),
    );
    assert_eq!(steps(&r)[0], "root-started");
    assert!(steps(&r).contains(&"pushed east".to_owned()), "{r}");
    assert_eq!(r["phase"]["phase"], "publish");
    // istiod has not reloaded yet: the mesh is held, and says why.
    assert!(
        r["held"][0]
            .as_str()
            .unwrap()
            .contains("east (not yet observed holding it)"),
        "{r}"
    );
    assert_eq!(pem_count(&cacerts(&m.east, "root-cert.pem")), 2);
    assert_eq!(pem_count(&ext_roots(&m.ext)), 2);
    assert!(cacerts(&m.east, "root-cert.pem").contains(old_root.trim()));
    let st = status(&m.env);
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "publish");
    assert_eq!(st["rotation"]["root_rotation"]["cross_sign"], true);
    assert_eq!(st["roots"].as_array().unwrap().len(), 2);
    let intermediate_before = cacerts(&m.east, "ca-cert.pem");

    // istiod reloads: every cluster holds {old, new}; the soak starts.
    istiod_reloads(&m.east);
    let r = rotate(&m.env);
    assert_eq!(steps(&r), ["settled publish"], "{r}");
    assert!(
        r["held"][0].as_str().unwrap().contains("soaking until"),
        "{r}"
    );
    let r = rotate(&m.env);
    assert_eq!(steps(&r), Vec::<String>::new(), "soaking: nothing to do");

    // Switch: every cluster gets an intermediate under the new root.
    std::thread::sleep(SOAK);
    let r = rotate(&m.env);
    let s = steps(&r);
    for want in [
        "phase-entered switch",
        "prepared east",
        "prepared ext",
        "activated east",
        "activated ext",
        "pushed east",
        "settled switch",
    ] {
        assert!(s.contains(&want.to_owned()), "{want} missing from {s:?}");
    }
    assert_ne!(cacerts(&m.east, "ca-cert.pem"), intermediate_before);
    // cert-chain.pem: intermediate, the new root cross-signed by the old one, the new root.
    let chain = cacerts(&m.east, "cert-chain.pem");
    assert_eq!(pem_count(&chain), 3, "{chain}");
    // istiod would load it, and a peer that trusts only the old root validates it.
    m.env.ok(&["export", "east", "--out", "out"]);
    m.env.ok(&["verify", "out/east"]);
    m.env.write("old-root.pem", &old_root);
    let certs: Vec<&str> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    m.env.write("cross.pem", certs[1]);
    m.env.write("int.pem", certs[0]);
    let v = common::openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "old-root.pem",
            "-untrusted",
            "cross.pem",
            "int.pem",
        ],
        &m.env.path(""),
    );
    assert_eq!(v.code, 0, "openssl: {}{}", v.stdout, v.stderr);
    let st = status(&m.env);
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "switch");
    let new_root_id = st["rotation"]["root_rotation"]["new"]
        .as_str()
        .unwrap()
        .to_owned();
    for c in st["clusters"].as_array().unwrap() {
        assert_eq!(c["intermediate"]["root"], new_root_id.as_str(), "{st}");
    }

    // Retire: bundles become {new}.
    std::thread::sleep(SOAK);
    let r = rotate(&m.env);
    assert!(
        steps(&r).contains(&"phase-entered retire".to_owned()),
        "{r}"
    );
    assert_eq!(pem_count(&cacerts(&m.east, "root-cert.pem")), 1);
    assert!(!cacerts(&m.east, "root-cert.pem").contains(old_root.trim()));
    assert_eq!(pem_count(&ext_roots(&m.ext)), 1);
    assert!(r["held"][0].as_str().unwrap().contains("east"), "{r}");
    let st = status(&m.env);
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "retire");
    assert_eq!(st["roots"][0]["status"], "retired");
    assert_eq!(st["roots"][1]["status"], "active");
    assert_eq!(
        st["clusters"][0]["sync"]["istiod_has_bundle"], false,
        "{st}"
    );
    istiod_reloads(&m.east);
    let r = rotate(&m.env);
    assert_eq!(steps(&r), ["settled retire"], "{r}");
    std::thread::sleep(SOAK);
    let r = rotate(&m.env);
    assert_eq!(steps(&r), ["phase-entered stable"], "{r}");

    let st = status(&m.env);
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "stable");
    let roots = st["roots"].as_array().unwrap();
    assert_eq!(roots[0]["status"], "retired");
    assert_eq!(roots[1]["status"], "active");
    assert_eq!(m.env.ok(&["bundle"]).trim(), ext_roots(&m.ext).trim());
    let text = m.env.ok(&["status"]);
    assert!(text.contains("root rotation: none in progress"), "{text}");
}

#[test]
fn unreachable_cluster_fails_the_run_but_keeps_the_state() {
    let m = mesh();
    istiod_reloads(&m.east);
    m.ext
        .faults
        .fail_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = m.env.run(&["rotate", "--root"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("ext ("), "{}", r.stderr);
    // The new root is saved and east holds it; the mesh is held in publish, naming ext.
    assert_eq!(pem_count(&cacerts(&m.east, "root-cert.pem")), 2);
    let st = status(&m.env);
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "publish");
    let held = st["rotation"]["root_rotation"]["due"][0]["action"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(held.contains("ext (unreachable"), "{st}");
    m.ext
        .faults
        .fail_all
        .store(false, std::sync::atomic::Ordering::SeqCst);
    istiod_reloads(&m.east);
    let r = rotate(&m.env);
    assert!(steps(&r).contains(&"pushed ext".to_owned()), "{r}");
    assert_eq!(pem_count(&ext_roots(&m.ext)), 2);
}

#[test]
fn emergency_replacement_and_concurrent_runs() {
    let m = mesh();
    istiod_reloads(&m.east);
    let before = cacerts(&m.east, "ca-cert.pem");
    let out = m.env.ok(&["rotate", "east", "--now"]);
    assert!(out.contains("rotation: 1 change(s)"), "{out}");
    assert_ne!(cacerts(&m.east, "ca-cert.pem"), before);
    let st = status(&m.env);
    assert_eq!(st["clusters"][0]["history"], 1);
    assert_eq!(st["clusters"][1]["history"], 0);

    // Two runs at once: the second finds the state locked and changes nothing.
    m.east
        .faults
        .latency_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let bin = env!("CARGO_BIN_EXE_cactl");
    let first = std::process::Command::new(bin)
        .args(["rotate", "east", "--now"])
        .current_dir(m.env.path(""))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let err = m.env.fails(&["rotate", "ext", "--now"], 4);
    assert!(err.contains("locked by another cactl process"), "{err}");
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    let st = status(&m.env);
    assert_eq!(st["clusters"][0]["history"], 2);
    assert_eq!(st["clusters"][1]["history"], 0);
}

#[test]
fn a_workload_ttl_no_intermediate_can_cover_is_refused() {
    let env = Env::new();
    env.write(
        "cactl.yaml",
        "intermediate:\n  lifetime: 6d\nworkload:\n  max_ttl: 48h\n",
    );
    let err = env.fails(&["rotate", "--plan"], 2);
    assert!(
        err.contains("workload.max_ttl")
            && err.contains("2d is longer than an intermediate can cover")
            && err.contains("rotation.activate_before) = 1d "),
        "{err}"
    );
}
