//! The offline CA flow through the real binary: init, clusters, issue, export, bundle, sign,
//! verify, inspect, status.

mod common;

use base64::Engine as _;
use common::{Env, csr_agent, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn cert_serial(env: &Env, rel: &str) -> String {
    let info = cactl::pki::cert::CertInfo::from_pem_first(&env.read(rel)).unwrap();
    info.serial_hex
}

fn ts(v: &serde_json::Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap()
}

#[test]
fn full_offline_flow() {
    let env = Env::new();
    let out = env.ok(&["init"]);
    assert!(out.contains("wrote starter config cactl.yaml"), "{out}");
    assert!(out.contains("root root-1"), "{out}");
    assert!(env.path("cactl.yaml").is_file());
    assert!(env.path("cactl-state/state.json").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.path("cactl-state/state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "state holds keys");

    env.ok(&["cluster", "add", "east"]);
    env.ok(&["cluster", "add", "west"]);
    assert_eq!(env.ok(&["cluster", "list"]), "east\nwest\n");
    let issued = json(&env.ok(&["issue", "east", "--output", "json"]));
    assert_eq!(issued["cluster"], "east");
    assert_eq!(issued["root"], "root-1");
    env.ok(&["issue", "west"]);
    env.ok(&["export", "east", "--out", "out"]);
    env.ok(&["export", "west", "--out", "out"]);
    for c in ["east", "west"] {
        for f in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            let meta = std::fs::metadata(env.path(&format!("out/{c}/{f}"))).unwrap();
            let want = if f == "ca-key.pem" { 0o600 } else { 0o644 };
            assert_eq!(meta.permissions().mode() & 0o777, want, "{c}/{f}");
        }
    }
    assert_eq!(
        cert_serial(&env, "out/east/ca-cert.pem"),
        issued["serial"].as_str().unwrap()
    );

    // cert-chain.pem = intermediate then root; root-cert.pem = the bundle.
    let chain = cactl::pki::pem::certificates(&env.read("out/east/cert-chain.pem")).unwrap();
    let ca = cactl::pki::pem::certificates(&env.read("out/east/ca-cert.pem")).unwrap();
    let roots = cactl::pki::pem::certificates(&env.read("out/east/root-cert.pem")).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], ca[0]);
    assert_eq!(chain[1], roots[0]);
    assert_eq!(roots.len(), 1);
    assert_eq!(
        env.read("out/east/root-cert.pem"),
        env.read("out/west/root-cert.pem")
    );

    // Intermediates differ per cluster, with unique subjects naming the cluster.
    let east =
        cactl::pki::cert::CertInfo::from_pem_first(&env.read("out/east/ca-cert.pem")).unwrap();
    let west =
        cactl::pki::cert::CertInfo::from_pem_first(&env.read("out/west/ca-cert.pem")).unwrap();
    assert_ne!(east.subject, west.subject);
    assert!(east.subject.contains("OU=east"), "{}", east.subject);
    assert!(west.subject.contains("OU=west"), "{}", west.subject);
    assert_eq!(east.ca, Some(Some(0)));

    // bundle, PEM and SPIFFE.
    assert_eq!(env.ok(&["bundle"]), env.read("out/east/root-cert.pem"));
    let spiffe = json(&env.ok(&["bundle", "--format", "spiffe"]));
    let keys = spiffe["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["use"], "x509-svid");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    let x5c = base64::engine::general_purpose::STANDARD
        .decode(keys[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(x5c, roots[0]);
    assert!(spiffe["spiffe_sequence"].as_u64().unwrap() >= 1);
    assert_eq!(spiffe["spiffe_refresh_hint"], 43200);

    // verify
    let v = env.ok(&["verify", "out/east"]);
    assert_eq!(v.matches("PASS ").count(), 10, "{v}");
    assert!(
        v.contains("verdict: istiod would load these cacerts"),
        "{v}"
    );
    let vj = json(&env.ok(&["verify", "out/east", "--output", "json"]));
    assert_eq!(vj["ok"], true);

    // sign: chain to stdout, then JSON in Istio's response shape.
    env.write(
        "w.csr",
        csr_agent(
            "spiffe://cluster.local/ns/default/sa/web",
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
    );
    let pem = env.ok(&["sign", "--cluster", "east", "--csr", "w.csr"]);
    let certs = cactl::pki::pem::certificates(&pem).unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[1], ca[0]);
    let leaf = cactl::pki::cert::CertInfo::from_der(&certs[0]).unwrap();
    assert_eq!(leaf.uris, vec!["spiffe://cluster.local/ns/default/sa/web"]);
    assert_eq!(leaf.subject, "");
    assert_eq!(leaf.aki, east.ski);
    assert_eq!(
        leaf.not_after - leaf.not_before,
        time::Duration::hours(24) + time::Duration::minutes(2)
    );

    let sj = json(&env.ok(&[
        "sign",
        "--cluster",
        "east",
        "--csr",
        "w.csr",
        "--output",
        "json",
    ]));
    let elems = sj["cert_chain"].as_array().unwrap();
    assert_eq!(elems.len(), 3, "leaf, intermediate, root bundle");
    assert_eq!(
        cactl::pki::pem::certificates(elems[1].as_str().unwrap()).unwrap(),
        vec![ca[0].clone()]
    );
    assert_eq!(
        elems[2].as_str().unwrap(),
        env.read("out/east/root-cert.pem")
    );
    assert_eq!(sj["identity"], "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(sj["ttl_clamped"], false);

    // status
    let st = json(&env.ok(&["status", "--output", "json"]));
    assert_eq!(st["trust_domain"], "cluster.local");
    assert_eq!(st["roots"][0]["id"], "root-1");
    assert_eq!(st["roots"][0]["status"], "active");
    assert_eq!(st["roots"][0]["key_in_state"], true);
    assert_eq!(st["clusters"][0]["name"], "east");
    assert_eq!(
        st["clusters"][0]["intermediate"]["serial"],
        issued["serial"]
    );
    assert_eq!(st["clusters"][0]["intermediate"]["days_left"], 364);
    assert_eq!(st["clusters"][1]["name"], "west");
    let text = env.ok(&["status"]);
    assert!(
        text.contains("east") && text.contains("west") && text.contains("days left"),
        "{text}"
    );
    let later = json(&env.ok(&["status", "--output", "json", "--at", "2100-01-01T00:00:00Z"]));
    assert!(
        later["clusters"][0]["intermediate"]["days_left"]
            .as_i64()
            .unwrap()
            < 0
    );

    // inspect
    let i = env.ok(&["inspect", "out/east/cert-chain.pem"]);
    assert!(
        i.contains("[0] CERTIFICATE") && i.contains("[1] CERTIFICATE"),
        "{i}"
    );
    assert!(i.contains("CA:         yes, pathLen 0"), "{i}");
    let i = env.ok(&["inspect", "w.csr"]);
    assert!(
        i.contains("URI SAN:    spiffe://cluster.local/ns/default/sa/web"),
        "{i}"
    );
    assert!(i.contains("signature:  valid"), "{i}");
    let i = env.ok(&["inspect", "out/east/ca-key.pem"]);
    assert!(i.contains("private key: contents not shown"), "{i}");
    assert!(!i.contains("MII"), "inspect must not print key material");
}

#[test]
fn reissue_keeps_history_and_changes_serial() {
    let env = Env::new();
    env.mesh(&["east"]);
    let first = cert_serial(&env, "out/east/ca-cert.pem");
    env.ok(&["issue", "east"]);
    env.ok(&["export", "east", "--out", "out"]);
    let second = cert_serial(&env, "out/east/ca-cert.pem");
    assert_ne!(first, second);
    let st = json(&env.ok(&["status", "--output", "json"]));
    assert_eq!(st["clusters"][0]["history"], 1);
    assert_eq!(st["clusters"][0]["intermediate"]["serial"], second.as_str());
    let state = json(&env.read("cactl-state/state.json"));
    assert_eq!(state["schema"], 2);
    assert_eq!(
        state["clusters"]["east"]["history"][0]["serial"],
        first.as_str()
    );
    assert!(
        state["clusters"]["east"]["history"][0]["key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    // Unique CNs: the sequence number differs.
    let a = &state["clusters"]["east"]["history"][0]["cert_pem"];
    let b = &state["clusters"]["east"]["current"]["cert_pem"];
    let sa = cactl::pki::cert::CertInfo::from_pem_first(a.as_str().unwrap())
        .unwrap()
        .subject;
    let sb = cactl::pki::cert::CertInfo::from_pem_first(b.as_str().unwrap())
        .unwrap()
        .subject;
    assert_ne!(sa, sb);
}

#[test]
fn sign_ttl_default_explicit_clamped_and_identity() {
    let env = Env::new();
    env.mesh(&["east"]);
    env.write(
        "w.csr",
        csr_agent(
            "spiffe://cluster.local/ns/a/sa/b",
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
    );
    let life = |args: &[&str]| {
        let mut full = vec![
            "sign",
            "--cluster",
            "east",
            "--csr",
            "w.csr",
            "--output",
            "json",
        ];
        full.extend_from_slice(args);
        let j = json(&env.ok(&full));
        (
            ts(&j["not_after"]) - ts(&j["not_before"]),
            j["ttl_clamped"].as_bool().unwrap(),
        )
    };
    let two_min = time::Duration::minutes(2);
    assert_eq!(life(&[]), (time::Duration::hours(24) + two_min, false));
    assert_eq!(
        life(&["--ttl", "1h"]),
        (time::Duration::hours(1) + two_min, false)
    );
    assert_eq!(
        life(&["--ttl", "100h"]),
        (time::Duration::hours(48) + two_min, true)
    );
    life(&["--identity", "spiffe://cluster.local/ns/a/sa/b"]);
    let err = env.fails(
        &[
            "sign",
            "--cluster",
            "east",
            "--csr",
            "w.csr",
            "--identity",
            "spiffe://cluster.local/ns/a/sa/other",
        ],
        1,
    );
    assert!(
        err.contains("CSR identity spiffe://cluster.local/ns/a/sa/b does not match the caller identity spiffe://cluster.local/ns/a/sa/other"),
        "{err}"
    );
    // A CSR asking for CA:TRUE still gets a CA:FALSE leaf.
    env.write(
        "ca.csr",
        common::csr_with(
            vec![rcgen::SanType::URI(
                "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
            )],
            |p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
        ),
    );
    let pem = env.ok(&["sign", "--cluster", "east", "--csr", "ca.csr"]);
    let leaf = cactl::pki::cert::CertInfo::from_pem_first(&pem).unwrap();
    assert_eq!(leaf.ca, None);
    assert!(!leaf.key_cert_sign);
    // --out writes the chain file.
    env.ok(&[
        "sign",
        "--cluster",
        "east",
        "--csr",
        "w.csr",
        "--out",
        "chain.pem",
    ]);
    assert_eq!(
        cactl::pki::pem::certificates(&env.read("chain.pem"))
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn intermediates_never_outlive_the_root() {
    let env = Env::new();
    env.write(
        "cactl.yaml",
        "root:\n  lifetime: 30d\nintermediate:\n  lifetime: 30d\nworkload:\n  max_ttl: 1d\n",
    );
    env.ok(&["init"]);
    env.ok(&["cluster", "add", "east"]);
    env.ok(&["issue", "east"]);
    env.ok(&["export", "east", "--out", "out"]);
    let root =
        cactl::pki::cert::CertInfo::from_pem_first(&env.read("out/east/root-cert.pem")).unwrap();
    let int =
        cactl::pki::cert::CertInfo::from_pem_first(&env.read("out/east/ca-cert.pem")).unwrap();
    assert!(int.not_after <= root.not_after);
}

#[test]
fn config_written_by_cluster_add_is_reloadable_and_keeps_settings() {
    let env = Env::new();
    env.write(
        "cactl.yaml",
        "trust_domain: mesh.example\nintermediate:\n  lifetime: 90d\n",
    );
    env.ok(&["init"]);
    env.ok(&["cluster", "add", "east"]);
    let text = env.read("cactl.yaml");
    assert!(text.contains("trust_domain: mesh.example"), "{text}");
    assert!(text.contains("lifetime: 90d"), "{text}");
    assert!(text.contains("- name: east"), "{text}");
    let cfg = cactl::config::Config::parse(&text, "t").unwrap();
    assert_eq!(cfg.clusters.len(), 1);
}

#[test]
fn init_with_trust_domain_and_config_env() {
    let env = Env::new();
    env.ok(&[
        "--config",
        "sub/c.yaml",
        "init",
        "--trust-domain",
        "corp.example",
    ]);
    assert!(
        env.read("sub/c.yaml")
            .contains("trust_domain: corp.example")
    );
    // The state directory sits beside the config.
    assert!(env.path("sub/cactl-state/state.json").is_file());
}

#[test]
fn cluster_add_keeps_the_config_files_comments() {
    let env = Env::new();
    env.write(
        "cactl.yaml",
        "# Our mesh. Owner: platform team.\n\
         trust_domain: cluster.local # must match meshConfig.trustDomain\n\
         clusters:\n\
         \x20 - name: east\n\
         \x20   # west joins next quarter\n\
         # workload certificates\n\
         workload:\n\
         \x20 default_ttl: 24h\n",
    );
    let run = env.run(&["cluster", "add", "west"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "cluster west added\n");
    assert_eq!(
        run.stderr, "",
        "no warning when the file is edited in place"
    );
    assert_eq!(
        env.read("cactl.yaml"),
        "# Our mesh. Owner: platform team.\n\
         trust_domain: cluster.local # must match meshConfig.trustDomain\n\
         clusters:\n\
         \x20 - name: east\n\
         \x20   # west joins next quarter\n\
         \x20 - name: west\n\
         # workload certificates\n\
         workload:\n\
         \x20 default_ttl: 24h\n"
    );
    assert_eq!(env.ok(&["cluster", "list"]), "east\nwest\n");

    // The file keeps its permissions.
    use std::os::unix::fs::PermissionsExt;
    let config = env.path("cactl.yaml");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    env.ok(&["cluster", "add", "north"]);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    assert!(
        env.read("cactl.yaml")
            .contains("  - name: west\n  - name: north\n# workload")
    );

    // A list the edit does not understand is rewritten whole, and the user is told.
    env.write("cactl.yaml", "# flow style\nclusters: [{name: east}]\n");
    let run = env.run(&["cluster", "add", "west"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "the clusters list cannot be edited in place; rewriting the file without its comments"
        ),
        "{}",
        run.stderr
    );
    let text = env.read("cactl.yaml");
    assert!(!text.contains("# flow style"), "{text}");
    assert_eq!(env.ok(&["cluster", "list"]), "east\nwest\n");
}

#[test]
fn cluster_add_after_init_keeps_the_starter_configs_comments() {
    let env = Env::new();
    env.ok(&["init"]);
    let starter = env.read("cactl.yaml");
    assert!(starter.contains("\nclusters: []\n"), "{starter}");
    env.write("cactl.yaml", format!("# edited by hand\n{starter}"));
    let run = env.run(&["cluster", "add", "east"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "");
    let expected = format!("# edited by hand\n{starter}")
        .replace("\nclusters: []\n", "\nclusters:\n- name: east\n");
    assert_eq!(env.read("cactl.yaml"), expected);
    assert_eq!(env.ok(&["cluster", "list"]), "east\n");
}
