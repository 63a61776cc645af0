//! Every bad input gets a one-line specific message, the documented exit code, and leaves every
//! file (state, config, exported cacerts) byte-for-byte unchanged.

mod common;

use common::{Env, csr_agent, csr_with};
use rcgen::SanType;

/// Runs a failing command and checks message, exit code and that nothing changed on disk.
fn refuses(env: &Env, args: &[&str], code: i32, needle: &str) {
    let before = env.snapshot();
    let err = env.fails(args, code);
    assert!(
        err.contains(needle),
        "cactl {args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one-line message: {err:?}"
    );
    assert!(err.starts_with("error: "), "{err:?}");
    let after = env.snapshot();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files added or removed by {args:?}"
    );
    for (k, v) in &before {
        assert!(after[k] == *v, "{} changed by {args:?}", k.display());
    }
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

#[test]
fn missing_and_invalid_config() {
    let env = Env::new();
    refuses(&env, &["status"], 2, "config file cactl.yaml not found");
    env.write("cactl.yaml", "trust_domain: [unclosed\n");
    refuses(&env, &["status"], 2, "config file cactl.yaml is invalid");
    env.write("cactl.yaml", "trust_domain: UPPER\n");
    refuses(
        &env,
        &["status"],
        2,
        "trust_domain: trust domain may only hold",
    );
    env.write("cactl.yaml", "workload:\n  max_ttl: soon\n");
    refuses(&env, &["issue", "x"], 2, "invalid duration \"soon\"");
    env.write("cactl.yaml", "frobnicate: true\n");
    refuses(&env, &["init"], 2, "unknown field");
    // Config fine but no state yet.
    env.write("cactl.yaml", "");
    refuses(
        &env,
        &["status"],
        1,
        "no state found at ./cactl-state: run `cactl init` first",
    );
}

#[test]
fn state_errors() {
    let env = Env::new();
    env.mesh(&["east"]);
    refuses(&env, &["init"], 1, "state already exists at ./cactl-state");
    refuses(&env, &["issue", "nope"], 1, "unknown cluster \"nope\"");
    refuses(
        &env,
        &["export", "nope", "--out", "out"],
        1,
        "unknown cluster \"nope\"",
    );
    env.ok(&["cluster", "add", "west"]);
    refuses(
        &env,
        &["export", "west", "--out", "out"],
        1,
        "cluster \"west\" has no intermediate yet",
    );
    refuses(
        &env,
        &["cluster", "add", "east"],
        1,
        "cluster \"east\" is already declared",
    );
    refuses(
        &env,
        &["cluster", "add", "bad name!"],
        1,
        "invalid cluster name \"bad name!\"",
    );

    // A state written by a newer cactl is refused, not rewritten.
    let original = env.read("cactl-state/state.json");
    env.write(
        "cactl-state/state.json",
        original.replacen("\"schema\": 2", "\"schema\": 99", 1),
    );
    refuses(
        &env,
        &["issue", "east"],
        1,
        "written by a newer cactl (schema 99; this cactl reads up to 2)",
    );
    refuses(&env, &["status"], 1, "written by a newer cactl");
    env.write("cactl-state/state.json", "{\"schema\": 1, \"revision\": ");
    refuses(&env, &["issue", "east"], 1, "is corrupt");
    env.write("cactl-state/state.json", original);
    env.ok(&["issue", "east"]);
}

#[test]
fn concurrent_process_is_locked_out() {
    let env = Env::new();
    env.mesh(&["east"]);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(env.path("cactl-state/lock"))
        .unwrap();
    lock.lock().unwrap();
    refuses(
        &env,
        &["issue", "east"],
        4,
        "locked by another cactl process",
    );
    drop(lock);
    env.ok(&["issue", "east"]);
}

#[test]
fn bad_csrs() {
    let env = Env::new();
    env.mesh(&["east"]);
    fn sign(name: &str) -> Vec<&str> {
        vec!["sign", "--cluster", "east", "--csr", name]
    }

    refuses(&env, &sign("missing.csr"), 1, "cannot read CSR missing.csr");
    env.write("garbage.csr", "hello world\n");
    refuses(
        &env,
        &sign("garbage.csr"),
        1,
        "no CERTIFICATE REQUEST PEM block found",
    );
    env.write(
        "damaged.csr",
        "-----BEGIN CERTIFICATE REQUEST-----\n%%%%\n-----END CERTIFICATE REQUEST-----\n",
    );
    refuses(&env, &sign("damaged.csr"), 1, "malformed PEM");
    env.write(
        "notder.csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    refuses(&env, &sign("notder.csr"), 1, "malformed CSR");

    // Tamper with the signed part of a good CSR.
    let good = csr_agent(
        "spiffe://cluster.local/ns/a/sa/b",
        &rcgen::PKCS_ECDSA_P256_SHA256,
    );
    let mut der = cactl::pki::pem::csr(&good).unwrap();
    let pos = der.windows(6).position(|w| w == b"ns/a/s").unwrap();
    der[pos + 3] = b'x';
    env.write(
        "tampered.csr",
        cactl::pki::pem::encode("CERTIFICATE REQUEST", &der),
    );
    refuses(
        &env,
        &sign("tampered.csr"),
        1,
        "CSR signature does not verify",
    );

    let table: Vec<(&str, String, &str)> = vec![
        (
            "dns.csr",
            csr_with(
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    SanType::DnsName("a.example".try_into().unwrap()),
                ],
                |_| {},
            ),
            "CSR refused by policy: CSR requests DNS names (a.example)",
        ),
        (
            "ip.csr",
            csr_with(
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    SanType::IpAddress("10.0.0.1".parse().unwrap()),
                ],
                |_| {},
            ),
            "CSR requests IP addresses",
        ),
        (
            "email.csr",
            csr_with(
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    SanType::Rfc822Name("a@b.example".try_into().unwrap()),
                ],
                |_| {},
            ),
            "CSR requests e-mail addresses (a@b.example)",
        ),
        (
            "two.csr",
            csr_with(
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    uri("spiffe://cluster.local/ns/a/sa/c"),
                ],
                |_| {},
            ),
            "CSR requests 2 URIs; exactly one SPIFFE ID is allowed",
        ),
        (
            "http.csr",
            csr_with(vec![uri("https://cluster.local/ns/a/sa/b")], |_| {}),
            "is not a SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>: scheme must be spiffe://",
        ),
        (
            "foreign.csr",
            csr_with(vec![uri("spiffe://evil.example/ns/a/sa/b")], |_| {}),
            "CSR identity spiffe://evil.example/ns/a/sa/b is outside the trust domain \"cluster.local\"",
        ),
        (
            "none.csr",
            csr_with(vec![], |_| {}),
            "CSR has no SPIFFE URI SAN",
        ),
    ];
    for (name, pem, needle) in table {
        env.write(name, pem);
        refuses(&env, &sign(name), 1, needle);
    }

    // RSA-1024 from an independent tool.
    let r = common::openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "weak.key",
            "-subj",
            "/O=x",
            "-addext",
            "subjectAltName=critical,URI:spiffe://cluster.local/ns/a/sa/b",
            "-out",
            "weak.csr",
        ],
        env.dir.path(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_file(env.path("weak.key")).unwrap();
    refuses(
        &env,
        &sign("weak.csr"),
        1,
        "weak key: RSA-1024 (RSA keys need at least 2048 bits)",
    );

    env.write("w.csr", good);
    refuses(
        &env,
        &[
            "sign",
            "--cluster",
            "east",
            "--csr",
            "w.csr",
            "--ttl",
            "soon",
        ],
        1,
        "--ttl \"soon\" is not a duration",
    );
    refuses(
        &env,
        &[
            "sign",
            "--cluster",
            "east",
            "--csr",
            "w.csr",
            "--identity",
            "bob",
        ],
        1,
        "--identity: invalid SPIFFE ID \"bob\"",
    );
    refuses(
        &env,
        &["sign", "--cluster", "nope", "--csr", "w.csr"],
        1,
        "unknown cluster \"nope\"",
    );
}

#[test]
fn bad_imports() {
    let env = Env::new();
    let ossl = |args: &[&str]| {
        let r = common::openssl(args, env.dir.path());
        assert_eq!(r.code, 0, "openssl {args:?}: {}", r.stderr);
    };
    // A proper CA, an unrelated key, and a non-CA certificate.
    ossl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ca.key",
    ]);
    ossl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/O=Corp/CN=Corp Root",
        "-days",
        "30",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    ossl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "other.key",
    ]);
    ossl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "other.key",
        "-subj",
        "/CN=leaf",
        "-days",
        "30",
        "-out",
        "leaf.pem",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
    ]);
    env.write("cactl.yaml", "");
    refuses(
        &env,
        &[
            "init",
            "--import-cert",
            "ca.pem",
            "--import-key",
            "other.key",
        ],
        1,
        "cannot import root: the private key does not match the certificate's public key",
    );
    refuses(
        &env,
        &[
            "init",
            "--import-cert",
            "leaf.pem",
            "--import-key",
            "other.key",
        ],
        1,
        "cannot import root: the certificate is not a CA",
    );
    refuses(
        &env,
        &["init", "--import-cert", "ca.key", "--import-key", "ca.key"],
        1,
        "cannot import root: no CERTIFICATE PEM block found",
    );
    refuses(
        &env,
        &["init", "--import-cert", "ca.pem", "--import-key", "ca.pem"],
        1,
        "cannot import root: no PRIVATE KEY PEM block found",
    );
    refuses(
        &env,
        &[
            "init",
            "--import-cert",
            "nope.pem",
            "--import-key",
            "ca.key",
        ],
        1,
        "cannot read certificate nope.pem",
    );
    // And the good pair is adopted (SEC1 "EC PRIVATE KEY" input).
    let out = env.ok(&["init", "--import-cert", "ca.pem", "--import-key", "ca.key"]);
    assert!(
        out.contains("root root-1 (Imported): O=Corp, CN=Corp Root"),
        "{out}"
    );
}

#[test]
fn verify_reports_each_broken_check() {
    let env = Env::new();
    env.mesh(&["east", "west"]);
    env.ok(&["verify", "out/east"]);

    // Wrong key.
    std::fs::copy(
        env.path("out/west/ca-key.pem"),
        env.path("out/east/ca-key.pem"),
    )
    .unwrap();
    let r = env.run(&["verify", "out/east"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout
            .contains("FAIL key matches ca-cert.pem: ca-key.pem is not the key of ca-cert.pem"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("verdict: istiod would NOT load these cacerts"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr
            .contains("istiod would not load these cacerts: 1 check(s) failed"),
        "{}",
        r.stderr
    );

    // Missing file.
    env.ok(&["export", "east", "--out", "out"]);
    std::fs::remove_file(env.path("out/east/cert-chain.pem")).unwrap();
    let r = env.run(&["verify", "out/east"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout
            .contains("FAIL all four files present: missing: cert-chain.pem"),
        "{}",
        r.stdout
    );

    // A root bundle without our root.
    env.ok(&["export", "east", "--out", "out"]);
    let other = Env::new();
    other.mesh(&["east"]);
    std::fs::copy(
        other.path("out/east/root-cert.pem"),
        env.path("out/east/root-cert.pem"),
    )
    .unwrap();
    let r = env.run(&["verify", "out/east"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout
            .contains("FAIL chain verifies to root-cert.pem: chain does not validate"),
        "{}",
        r.stdout
    );

    // Expired (evaluated in the future).
    env.ok(&["export", "east", "--out", "out"]);
    let r = env.run(&["verify", "out/east", "--at", "2100-01-01T00:00:00Z"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout.contains("FAIL signing cert not expired"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("expired at"), "{}", r.stdout);

    // Garbage key, not a directory.
    env.write("out/east/ca-key.pem", "nope");
    let r = env.run(&["verify", "out/east"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stdout
            .contains("FAIL ca-key.pem parses: no PRIVATE KEY PEM block found"),
        "{}",
        r.stdout
    );
    refuses(
        &env,
        &["verify", "nowhere"],
        1,
        "nowhere is not a directory",
    );
    refuses(
        &env,
        &["verify", "out/east", "--at", "yesterday"],
        1,
        "--at \"yesterday\" is not an RFC 3339 time",
    );
    refuses(
        &env,
        &["inspect", "cactl.yaml"],
        1,
        "no CERTIFICATE or CERTIFICATE REQUEST PEM block found",
    );
}
