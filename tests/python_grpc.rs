//! End to end with an independent client: Python `grpcio` calls CreateCertificate over TLS
//! like istio-agent (RSA-2048, subject `O=`) and ztunnel (P-256, empty subject) and checks the
//! chain shape, the leaf's fields and path validation against the root bundle (`cryptography`'s
//! X.509 verifier).

mod common;

use common::{Env, Server, TokenKey, jwks, python_with_grpc, tool};

const ISS: &str = "https://east.example";

fn run_client(
    python: &std::path::Path,
    env: &Env,
    server: &Server,
    args: &[&str],
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/grpc_client.py");
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let mut all = vec![
        script,
        "--proto",
        proto,
        "--addr",
        &server.grpc,
        "--ca",
        "bundle.pem",
        "--server-name",
        "cactl.test.svc",
    ];
    all.extend_from_slice(args);
    let (code, out) = tool(python, &all, env.dir.path());
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: exit {code}: {out}"));
    assert_eq!(code == 0, v["ok"] == true, "{out}");
    v
}

#[test]
fn grpcio_client_gets_valid_chains_in_both_styles() {
    let Some(python) = python_with_grpc() else {
        return;
    };
    let env = Env::new();
    let key = TokenKey::new("k1", false);
    env.write("jwks.json", jwks(&[&key]));
    env.write(
        "cactl.yaml",
        format!("serve:\n  dns_names: [cactl.test.svc]\nclusters:\n- name: east\n  auth: {{issuer: \"{ISS}\", jwks_file: jwks.json}}\n"),
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    env.write("bundle.pem", env.ok(&["bundle"]));
    let server = Server::start(&env, &[]);
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let token = key.token(ISS, "shop", "web", |_| {});

    for (style, key_enc) in [("agent", true), ("ztunnel", false)] {
        let v = run_client(
            &python,
            &env,
            &server,
            &[
                "--token",
                &token,
                "--cluster",
                "east",
                "--identity",
                id,
                "--style",
                style,
                "--ttl",
                "7200",
            ],
        );
        assert_eq!(v["elements"], 3, "{v}");
        assert_eq!(v["intermediates"], 1, "{v}");
        assert_eq!(v["roots"], 1, "{v}");
        assert_eq!(v["verified_chain_length"], 3, "{v}");
        assert_eq!(v["leaf_uris"], serde_json::json!([id]), "{v}");
        assert_eq!(
            v["client_verified_subjects"],
            serde_json::json!([id]),
            "{v}"
        );
        assert_eq!(v["leaf_san_critical"], true);
        assert_eq!(v["leaf_subject_empty"], true);
        assert_eq!(v["leaf_ca"], false);
        assert_eq!(v["leaf_bc_critical"], true);
        assert_eq!(v["leaf_ku_critical"], true);
        assert_eq!(v["leaf_key_encipherment"], key_enc, "{style}");
        assert_eq!(
            v["leaf_eku"],
            serde_json::json!(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"])
        );
        assert_eq!(v["leaf_validity_seconds"], 7200 + 120);
    }

    // The independent client sees the same status codes.
    let v = run_client(
        &python,
        &env,
        &server,
        &["--cluster", "east", "--identity", id, "--style", "ztunnel"],
    );
    assert_eq!(v["code"], "UNAUTHENTICATED", "{v}");
    let v = run_client(
        &python,
        &env,
        &server,
        &[
            "--token",
            &token,
            "--cluster",
            "east",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/db",
            "--style",
            "ztunnel",
        ],
    );
    assert_eq!(v["code"], "PERMISSION_DENIED", "{v}");
}
