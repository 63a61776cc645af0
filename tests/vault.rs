//! Vault-backed deployments against a real OpenBao dev server: the root in the PKI engine (its
//! key never leaves it), the journal in KV v2 with check-and-set, token renewal, AppRole login
//! with the documented least-privilege policy, root rotation across two issuers, and faults
//! (sealed, token revoked, server stopped) that change nothing and leave signing running.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cactl::config::{VaultAuth, VaultConfig};

use cactl::vault::Vault;
use common::kube_standin::StandIn;
use common::{Env, Server, json};
use serde_json::Value;

/// A running `bao server -dev` on a loopback port, stopped on drop.
struct Bao {
    bin: PathBuf,
    child: Option<Child>,
    addr: String,
    /// With TLS: the directory holding `vault-ca.pem`.
    tls: Option<tempfile::TempDir>,
    /// Namespace for CLI calls.
    namespace: Option<String>,
}

fn bao_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACTL_BAO") {
        return Some(PathBuf::from(p));
    }
    if Command::new("bao")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("bao"));
    }
    if std::env::var_os("CACTL_REQUIRE_INTEROP").is_some() {
        panic!("OpenBao (bao) is required (CACTL_REQUIRE_INTEROP is set) but was not found");
    }
    eprintln!("SKIP: OpenBao (bao) not found; run tests/run.sh to install it");
    None
}

impl Bao {
    fn start() -> Option<Self> {
        Self::start_with(false)
    }

    fn start_with(tls: bool) -> Option<Self> {
        let bin = bao_bin()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tls = tls.then(|| tempfile::tempdir().unwrap());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = format!("{scheme}://127.0.0.1:{port}");
        let mut args = vec![
            "server".to_owned(),
            "-dev".to_owned(),
            "-dev-root-token-id=root".to_owned(),
            format!("-dev-listen-address=127.0.0.1:{port}"),
        ];
        if let Some(d) = &tls {
            args.push("-dev-tls".into());
            args.push(format!("-dev-tls-cert-dir={}", d.path().display()));
        }
        let child = Command::new(&bin)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao");
        let bao = Self {
            bin,
            child: Some(child),
            addr,
            tls,
            namespace: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while bao.cli(&["status"]).0 != 0 {
            assert!(Instant::now() < deadline, "OpenBao did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        bao.pki();
        Some(bao)
    }

    fn pki(&self) {
        self.ok(&["secrets", "enable", "pki"]);
        self.ok(&["secrets", "tune", "-max-lease-ttl=87600h", "pki"]);
    }

    fn ca(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|d| d.path().join("vault-ca.pem"))
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "root")
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN");
        if let Some(ca) = self.ca() {
            cmd.env("BAO_CACERT", ca);
        }
        match &self.namespace {
            Some(ns) => cmd.env("BAO_NAMESPACE", ns),
            None => cmd.env_remove("BAO_NAMESPACE"),
        };
        let out = cmd.output().expect("run bao");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "bao {args:?}: {out}{err}");
        out
    }

    /// Runs with `-format=json` placed before the first flag or path.
    fn json(&self, args: &[&str]) -> Value {
        let at = args
            .iter()
            .position(|a| a.starts_with('-') || a.contains('/'))
            .unwrap_or(args.len());
        let mut a = args[..at].to_vec();
        a.push("-format=json");
        a.extend_from_slice(&args[at..]);
        json(&self.ok(&a))
    }

    /// A token with `policy` (renewable, `ttl`).
    fn token(&self, policy: &str, ttl: &str) -> String {
        let v = self.json(&[
            "token",
            "create",
            &format!("-policy={policy}"),
            &format!("-ttl={ttl}"),
            "-explicit-max-ttl=1h",
        ]);
        v["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    fn policy(&self) {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/vault/cactl-policy.hcl");
        self.ok(&["policy", "write", "cactl", p]);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A config using `bao` with a token of the cactl policy in `vault-token`.
fn setup(env: &Env, bao: &Bao, extra: &str) {
    bao.policy();
    env.write("vault-token", bao.token("cactl", "1h"));
    env.write(
        "cactl.yaml",
        format!(
            "vault:\n  address: {}\n  auth:\n    method: token\n    token_file: vault-token\n{extra}",
            bao.addr
        ),
    );
}

/// Makes a self-signed P-256 CA with openssl (`<name>.pem`, `<name>.key` in the env) and
/// stores it in KV v2 at `kv` with the fields the vault-kv root backend reads.
fn openssl_root_into_kv(bao: &Bao, env: &Env, subject: &str, name: &str, kv: &str) {
    let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
    let made = common::openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-days",
            "365",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &env.path(""),
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    bao.ok(&[
        "kv",
        "put",
        kv,
        &format!("certificate=@{}", env.path(&cert).display()),
        &format!("private_key=@{}", env.path(&key).display()),
    ]);
}

/// The state document, byte for byte.
fn state_dir(env: &Env) -> String {
    env.read("cactl-state/state.json")
}

#[test]
fn the_root_lives_in_vault_pki_and_intermediates_chain_to_it() {
    let Some(bao) = Bao::start() else { return };
    let env = Env::new();
    setup(
        &env,
        &bao,
        "root:\n  backend: vault-pki\nclusters:\n- name: east\n- name: west\n",
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    // Debug logs of a Vault-backed command never carry the token.
    let token = env.read("vault-token");
    let r = env.run(&["--log-level", "trace", "issue", "west"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The HTTP client's own trace lines are there, so the check below has something to see.
    assert!(r.stderr.contains("reqwest::connect"), "{}", r.stderr);
    assert!(
        !r.stderr.contains(token.trim()),
        "the Vault token was logged"
    );
    assert!(!r.stdout.contains(token.trim()));
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["roots"][0]["key_in_state"], false, "{st}");
    // The bundle is Vault's issuer, byte for byte.
    let issuers = bao.json(&["list", "pki/issuers"]);
    let ids = issuers.as_array().unwrap();
    assert_eq!(ids.len(), 1);
    let issuer = bao.json(&["read", &format!("pki/issuer/{}", ids[0].as_str().unwrap())]);
    let vault_root = issuer["data"]["certificate"]
        .as_str()
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(env.ok(&["bundle"]).trim(), vault_root);
    assert_eq!(issuer["data"]["issuer_name"], "root-1");
    // Its key is Vault's own: the issuer names a key of Vault's, and nothing in cactl's state
    // holds a key for it (the two private keys are the intermediates').
    let key_id = issuer["data"]["key_id"].as_str().unwrap();
    let key = bao.json(&["read", &format!("pki/key/{key_id}")]);
    assert_eq!(key["data"]["key_type"], "ec");
    let state_text = env.read("cactl-state/state.json");
    assert_eq!(state_text.matches("PRIVATE KEY-----\\n").count() / 2, 2);
    // Interop oracles: istiod's load checks, openssl -x509_strict against Vault's root, Go.
    env.write("vault-root.pem", format!("{vault_root}\n"));
    for c in ["east", "west"] {
        env.ok(&["export", c, "--out", "out"]);
        env.ok(&["verify", &format!("out/{c}")]);
        let v = common::openssl(
            &[
                "verify",
                "-x509_strict",
                "-CAfile",
                "vault-root.pem",
                &format!("out/{c}/ca-cert.pem"),
            ],
            &env.path(""),
        );
        assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
        if let Some(bin) = common::gocheck() {
            let (code, out) = common::tool(
                &bin,
                &["cacerts", env.path(&format!("out/{c}")).to_str().unwrap()],
                &env.path(""),
            );
            assert_eq!(code, 0, "{out}");
        }
    }
    // Vault signing with another issuer than the pinned root is caught, and nothing changes.
    let other = bao.json(&[
        "write",
        "pki/issuers/generate/root/internal",
        "common_name=other",
        "key_type=ec",
    ]);
    let other_id = other["data"]["issuer_id"].as_str().unwrap();
    let root_id = issuer["data"]["issuer_id"].as_str().unwrap();
    let tampered = env
        .read("cactl-state/state.json")
        .replace(root_id, other_id);
    env.write("cactl-state/state.json", &tampered);
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains("was not issued by the pinned root root-1"),
        "{err}"
    );
    assert_eq!(env.read("cactl-state/state.json"), tampered);
    // Name constraints cannot be written by Vault: refused up front.
    env.write(
        "cactl.yaml",
        format!("vault:\n  address: {}\nroot:\n  backend: vault-pki\nintermediate:\n  name_constraints: true\n", bao.addr),
    );
    let err = env.fails(&["status"], 2);
    assert!(err.contains("cannot write URI name constraints"), "{err}");
}

#[test]
fn state_in_vault_kv_with_check_and_set_and_applole_login() {
    let Some(bao) = Bao::start() else { return };
    bao.policy();
    bao.ok(&["auth", "enable", "approle"]);
    bao.ok(&[
        "write",
        "auth/approle/role/cactl",
        "token_policies=cactl",
        "token_ttl=5m",
    ]);
    let role_id = bao.json(&["read", "auth/approle/role/cactl/role-id"])["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = bao.json(&["write", "-f", "auth/approle/role/cactl/secret-id"]);
    let env = Env::new();
    env.write("secret-id", secret["data"]["secret_id"].as_str().unwrap());
    env.write(
        "cactl.yaml",
        format!(
            "vault:\n  address: {}\n  auth:\n    method: approle\n    role_id: {role_id}\n    secret_id_file: secret-id\n\
             root:\n  backend: vault-kv\nstate:\n  store: vault-kv\nclusters:\n- name: east\n",
            bao.addr
        ),
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    assert!(!env.path("cactl-state/state.json").exists());
    // The journal is split into fields of one KV version; the root is in its own secret.
    let kv = bao.json(&["kv", "get", "secret/cactl/state"]);
    let fields = kv["data"]["data"].as_object().unwrap();
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["cluster.east", "meta", "roots"]);
    assert_eq!(kv["data"]["metadata"]["version"], 2);
    assert!(!fields["roots"].as_str().unwrap().contains("PRIVATE KEY"));
    let root = bao.json(&["kv", "get", "secret/cactl/roots/root-1"]);
    assert!(
        root["data"]["data"]["private_key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["state_revision"], 2);
    assert_eq!(st["clusters"][0]["intermediate"]["root"], "root-1");
    let err = env.fails(&["init"], 1);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["export", "east", "--out", "out"]);
    env.ok(&["verify", "out/east"]);

    // Two writers read revision 2: the first save wins, the second is refused by Vault.
    let cfg = VaultConfig {
        address: Some(bao.addr.clone()),
        auth: VaultAuth {
            method: cactl::config::VaultAuthMethod::Token,
            token_file: Some(env.write("root-token", "root")),
            ..VaultAuth::default()
        },
        ..VaultConfig::default()
    };
    let store = || {
        cactl::vault::kv::VaultKvStore::new(
            Vault::new(&cfg, &env.path("")).unwrap(),
            "secret",
            "cactl/state",
        )
    };
    common::two_writers_one_wins(&store(), &store());
}

#[test]
fn a_renewable_token_is_renewed() {
    let Some(bao) = Bao::start() else { return };
    bao.policy();
    let env = Env::new();
    env.write("t", bao.token("cactl", "30s"));
    let cfg = VaultConfig {
        address: Some(bao.addr.clone()),
        auth: VaultAuth {
            token_file: Some(env.path("t")),
            ..VaultAuth::default()
        },
        ..VaultConfig::default()
    };
    let v = Vault::new(&cfg, &env.path("")).unwrap();
    let before = v.lookup_self().unwrap();
    assert!(before.renewable && before.creation_ttl == 30, "{before:?}");
    std::thread::sleep(Duration::from_secs(3));
    let aged = v.lookup_self().unwrap();
    assert!(aged.ttl <= 27, "{aged:?}");
    let renewed = v.renew().unwrap();
    assert!(
        renewed.ttl >= 29,
        "renewal did not extend the token: {renewed:?}"
    );
}

#[test]
fn faults_change_nothing_and_signing_continues() {
    let Some(mut bao) = Bao::start() else { return };
    let env = Env::new();
    setup(
        &env,
        &bao,
        "root:\n  backend: vault-pki\nrotation:\n  interval: 0s\nclusters:\n- name: east\n  auth:\n    dev_issuer: true\n",
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    let before = state_dir(&env);
    // A revoked token: denied, named, nothing changed.
    let token = env.read("vault-token");
    bao.ok(&["token", "revoke", token.trim()]);
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains(&format!("Vault at {} denied pki/issuer/", bao.addr))
            && err.contains("sign-intermediate"),
        "{err}"
    );
    assert_eq!(state_dir(&env), before);
    env.write("vault-token", bao.token("cactl", "1h"));
    // Sealed: named, nothing changed.
    bao.ok(&["operator", "seal"]);
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains(&format!("Vault at {} is sealed", bao.addr)),
        "{err}"
    );
    assert_eq!(state_dir(&env), before);
    // Vault gone while the signing service runs: signing goes on with the intermediates it has.
    let server = Server::start(&env, &["--plaintext-listen", "127.0.0.1:0"]);
    bao.stop();
    let err = env.fails(&["rotate", "east", "--now"], 1);
    assert!(
        err.contains(&format!("Vault at {} is unreachable", bao.addr)),
        "{err}"
    );
    assert_eq!(state_dir(&env), before);
    let out = env.request_demo_app(&server.grpc, "cactl.cactl-system.svc", Some("east"));
    assert!(out.contains("got 3 element(s)"), "{out}");
}

#[test]
fn root_rotation_with_vault_pki_uses_two_issuers_and_retires_the_old_one() {
    let Some(bao) = Bao::start() else { return };
    let env = Env::new();
    let _ext = StandIn::member("ext", &env);
    setup(
        &env,
        &bao,
        "root:\n  backend: vault-pki\nrotation:\n  soak: 1s\npush:\n  attempts: 1\n\
         clusters:\n- name: ext\n  kubeconfig: kube/ext.yaml\n  mode: external\n",
    );
    env.ok(&["init"]);
    env.ok(&["issue", "ext"]);
    env.ok(&["push"]);
    let err = env.fails(&["rotate", "--root", "--cross-sign"], 1);
    assert!(err.contains("cannot cross-sign"), "{err}");
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(
        st["rotation"]["root_rotation"]["phase"], "stable",
        "a refused start changes nothing"
    );
    env.ok(&["rotate", "--root"]);
    let issuers = bao.json(&["list", "pki/issuers"]);
    assert_eq!(issuers.as_array().unwrap().len(), 2, "{issuers}");
    assert_eq!(env.ok(&["bundle"]).matches("BEGIN CERTIFICATE").count(), 2);
    let mut phases = vec!["publish".to_owned()];
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(1100));
        let r = json(&env.ok(&["--output", "json", "rotate"]));
        let p = r["phase"]["phase"].as_str().unwrap().to_owned();
        if phases.last() != Some(&p) {
            phases.push(p.clone());
        }
        if p == "stable" {
            break;
        }
    }
    assert_eq!(phases, ["publish", "switch", "retire", "stable"]);
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["roots"][0]["status"], "retired");
    let bundle = env.ok(&["bundle"]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    // The old issuer stays in the mount but may no longer issue; the new one signs.
    let old = bao.json(&["read", "pki/issuer/root-1"]);
    assert_eq!(old["data"]["usage"], "crl-signing,read-only", "{old}");
    let new_id = st["roots"][1]["id"].as_str().unwrap();
    let new = bao.json(&["read", &format!("pki/issuer/{new_id}")]);
    assert_eq!(
        new["data"]["certificate"].as_str().unwrap().trim(),
        bundle.trim()
    );
    assert_eq!(st["clusters"][0]["intermediate"]["root"], new_id);
}

#[test]
fn kubernetes_login_over_tls_in_a_namespace() {
    let Some(mut bao) = Bao::start_with(true) else {
        return;
    };
    let home = StandIn::start("home");
    let env = Env::new();
    bao.ok(&["namespace", "create", "team-a"]);
    bao.namespace = Some("team-a".into());
    bao.pki();
    bao.policy();
    bao.ok(&["auth", "enable", "kubernetes"]);
    env.write("home-ca.pem", &home.ca_pem);
    let reviewer = common::kube_standin::ADMIN_TOKEN;
    bao.ok(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host=https://{}", home.addr),
        &format!("kubernetes_ca_cert=@{}", env.path("home-ca.pem").display()),
        &format!("token_reviewer_jwt={reviewer}"),
        "disable_local_ca_jwt=true",
    ]);
    bao.ok(&[
        "write",
        "auth/kubernetes/role/cactl",
        "bound_service_account_names=cactl",
        "bound_service_account_namespaces=cactl-system",
        "token_policies=cactl",
        "token_ttl=5m",
    ]);
    env.write(
        "sa-token",
        home.token("cactl-system", "cactl", None, "vault", 600),
    );
    let ca = bao.ca().unwrap();
    let config = |ca_line: &str| {
        format!(
            "vault:\n  address: {}\n  namespace: team-a\n{ca_line}  auth:\n    method: kubernetes\n    role: cactl\n    jwt_file: sa-token\n\
             root:\n  backend: vault-pki\nclusters:\n- name: east\n",
            bao.addr
        )
    };
    env.write(
        "cactl.yaml",
        config(&format!("  ca_file: {}\n", ca.display())),
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    // The issuer lives in the namespace, not in the root namespace.
    let issuers = bao.json(&["list", "pki/issuers"]);
    assert_eq!(issuers.as_array().unwrap().len(), 1, "{issuers}");
    bao.namespace = None;
    assert_ne!(bao.cli(&["list", "pki/issuers"]).0, 0);
    // Without the CA file, Vault's certificate is not trusted: a clear error, nothing changed.
    let before = state_dir(&env);
    env.write("cactl.yaml", config(""));
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains(&format!("Vault at {} is unreachable", bao.addr))
            && err.contains("certificate"),
        "{err}"
    );
    assert_eq!(state_dir(&env), before);
    // A service-account token Vault's role does not accept: login fails, named.
    env.write(
        "sa-token",
        home.token("default", "intruder", None, "vault", 600),
    );
    env.write(
        "cactl.yaml",
        config(&format!("  ca_file: {}\n", ca.display())),
    );
    let err = env.fails(&["issue", "east"], 1);
    assert!(
        err.contains("login failed") && err.contains("auth/kubernetes/login"),
        "{err}"
    );
    assert_eq!(state_dir(&env), before);
    bao.stop();
}

/// Stop this process at the n-th request whose first line contains the pattern.
type KillAt = (
    &'static str,
    usize,
    std::sync::Arc<std::sync::Mutex<Option<Child>>>,
);

/// A TCP proxy in front of OpenBao that can delay every chunk it forwards, or stop OpenBao the
/// moment the n-th request whose first line contains a pattern arrives.
struct Proxy {
    addr: String,
}

impl Proxy {
    fn start(upstream: &str, delay: Duration, kill_at: Option<KillAt>) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let kill_at = std::sync::Arc::new(kill_at);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                let seen = seen.clone();
                let kill_at = kill_at.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some((pattern, nth, child)) = kill_at.as_ref() {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let first = text.lines().next().unwrap_or("");
                            if first.contains(pattern)
                                && seen.fetch_add(1, Ordering::SeqCst) + 1 == *nth
                            {
                                if let Some(mut c) = child.lock().unwrap().take() {
                                    let _ = c.kill();
                                    let _ = c.wait();
                                }
                                break;
                            }
                        }
                        std::thread::sleep(delay);
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self { addr }
    }
}

#[test]
fn vault_stopped_mid_rotation_leaves_no_partial_state() {
    let Some(mut bao) = Bao::start() else { return };
    let env = Env::new();
    let names = ["a", "b", "c"];
    let standins: Vec<StandIn> = names.iter().map(|n| StandIn::member(n, &env)).collect();
    let mut clusters = String::new();
    for s in &standins {
        clusters.push_str(&format!(
            "- name: {n}\n  kubeconfig: kube/{n}.yaml\n  mode: external\n",
            n = s.name
        ));
    }
    let child = std::sync::Arc::new(std::sync::Mutex::new(bao.child.take()));
    // OpenBao dies as the second intermediate of the three-cluster switch is being signed
    // (three were signed by `cactl issue` before).
    let proxy = Proxy::start(
        &bao.addr,
        Duration::ZERO,
        Some(("sign-intermediate", 5, child.clone())),
    );
    bao.policy();
    env.write("vault-token", bao.token("cactl", "1h"));
    env.write(
        "cactl.yaml",
        format!(
            "vault:\n  address: {}\n  auth:\n    token_file: vault-token\nroot:\n  backend: vault-pki\nrotation:\n  soak: 1s\npush:\n  attempts: 1\nclusters:\n{clusters}",
            proxy.addr
        ),
    );
    env.ok(&["init"]);
    for c in names {
        env.ok(&["issue", c]);
    }
    env.ok(&["push"]);
    env.ok(&["rotate", "--root"]);
    std::thread::sleep(Duration::from_millis(1100));
    let err = env.fails(&["rotate"], 1);
    assert!(
        err.contains(&format!("Vault at {} is unreachable", proxy.addr))
            && err.contains("sign-intermediate"),
        "{err}"
    );
    assert!(
        child.lock().unwrap().is_none(),
        "OpenBao was not stopped mid-command"
    );
    // The switch was entered and saved before any signing; the round that signed one
    // intermediate and failed on the next saved nothing: no slot holds a half-done rotation.
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["rotation"]["root_rotation"]["phase"], "switch", "{st}");
    for c in st["rotation"]["clusters"].as_array().unwrap() {
        assert!(c["prepared"].is_null(), "{st}");
        assert_eq!(c["active"]["root"], "root-1", "{st}");
    }
    assert_eq!(st["rotation"]["last_run"]["ok"], false);
    // Every cluster still holds {old, new} and its old intermediate: nothing lost trust.
    for s in &standins {
        assert_eq!(s.istio_root_count("default"), 2, "{}", s.name);
    }
}

#[test]
fn a_slow_vault_times_out_with_a_clear_error() {
    let Some(bao) = Bao::start() else { return };
    let env = Env::new();
    let proxy = Proxy::start(&bao.addr, Duration::from_millis(1500), None);
    bao.policy();
    env.write("vault-token", bao.token("cactl", "1h"));
    env.write(
        "cactl.yaml",
        format!(
            "vault:\n  address: {}\n  timeout: 1s\n  auth:\n    token_file: vault-token\nroot:\n  backend: vault-pki\n",
            proxy.addr
        ),
    );
    let started = Instant::now();
    let err = env.fails(&["init"], 1);
    assert!(
        err.contains(&format!("Vault at {} is unreachable", proxy.addr))
            && err.contains("(pki/issuer/root-1)")
            && err.contains("timed out"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        !env.path("cactl-state/state.json").exists(),
        "nothing saved"
    );
}

#[test]
fn a_root_already_kept_in_vault_kv_is_adopted() {
    let Some(bao) = Bao::start() else { return };
    let env = Env::new();
    openssl_root_into_kv(
        &bao,
        &env,
        "/O=corp/CN=corp root",
        "root",
        "secret/corp/mesh-root",
    );
    setup(
        &env,
        &bao,
        "root:\n  backend: vault-kv\n  adopt_secret: corp/mesh-root\nclusters:\n- name: east\n",
    );
    // The cactl policy does not reach this path: adopting needs a token that may read it.
    let err = env.fails(&["init"], 1);
    assert!(err.contains("denied secret/data/corp/mesh-root"), "{err}");
    env.write("vault-token", "root");
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    let st = json(&env.ok(&["--output", "json", "status"]));
    assert_eq!(st["roots"][0]["origin"], "imported", "{st}");
    assert_eq!(st["roots"][0]["key_in_state"], false);
    assert_eq!(st["roots"][0]["backend_ref"], "corp/mesh-root");
    assert_eq!(env.ok(&["bundle"]).trim(), env.read("root.pem").trim());
    env.ok(&["export", "east", "--out", "out"]);
    let v = common::openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "out/east/ca-cert.pem",
        ],
        &env.path(""),
    );
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
}

#[test]
fn a_root_created_by_a_run_that_died_before_saving_is_taken_not_duplicated() {
    let Some(bao) = Bao::start() else { return };
    for backend in ["vault-pki", "vault-kv"] {
        let env = Env::new();
        let path = format!("cactl/roots-{backend}");
        setup(
            &env,
            &bao,
            &format!("root:\n  backend: {backend}\n  kv_path: {path}\nclusters:\n- name: east\n"),
        );
        env.write("vault-token", "root");
        env.ok(&["init"]);
        env.ok(&["issue", "east"]);
        // A run created root-3 at the backend and died before saving: simulate it.
        let leftover = if backend == "vault-pki" {
            let v = bao.json(&[
                "write",
                "pki/issuers/generate/root/internal",
                "common_name=leftover",
                "issuer_name=root-3",
                "key_type=ec",
            ]);
            v["data"]["certificate"].as_str().unwrap().to_owned()
        } else {
            openssl_root_into_kv(
                &bao,
                &env,
                "/O=cactl/CN=leftover",
                "l",
                &format!("secret/{path}/root-3"),
            );
            env.read("l.pem")
        };
        env.ok(&["rotate", "--root"]);
        let st = json(&env.ok(&["--output", "json", "status"]));
        assert_eq!(st["roots"][1]["id"], "root-3", "{backend}: {st}");
        let bundle = env.ok(&["bundle"]);
        assert!(
            bundle.contains(leftover.trim()),
            "{backend}: the leftover root was not taken"
        );
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{backend}");
    }
    let issuers = bao.json(&["list", "pki/issuers"]);
    assert_eq!(
        issuers.as_array().unwrap().len(),
        2,
        "no duplicate issuer: {issuers}"
    );
}
