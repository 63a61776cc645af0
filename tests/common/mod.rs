//! Helpers shared by the integration tests: a temporary working directory, running the real
//! `cactl` binary in it, and locating the interop oracles.
#![allow(dead_code)]

pub mod kube_standin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary directory in which `cactl` runs.
pub struct Env {
    pub dir: tempfile::TempDir,
}

/// The outcome of one `cactl` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, contents).unwrap();
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = Command::new(env!("CARGO_BIN_EXE_cactl"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("CACTL_CONFIG")
            .env_remove("CACTL_LOG")
            .output()
            .expect("run cactl");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, 0,
            "cactl {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    /// Runs and asserts failure with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, code,
            "cactl {args:?}: want exit {code}\nstdout:\n{}\nstderr:\n{}",
            r.stdout, r.stderr
        );
        r.stderr
    }

    /// Every file under the directory with its bytes, for byte-for-byte comparisons.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.insert(
                        p.strip_prefix(base).unwrap().to_path_buf(),
                        std::fs::read(&p).unwrap(),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    /// `cactl dev-token` for demo/app, then `cactl request` of that identity from `addr`
    /// (as `server_name`, for `cluster`) into `got/`; returns stdout.
    pub fn request_demo_app(&self, addr: &str, server_name: &str, cluster: Option<&str>) -> String {
        let token = self.ok(&[
            "dev-token",
            "--namespace",
            "demo",
            "--service-account",
            "app",
        ]);
        let mut args = vec![
            "request",
            "--addr",
            addr,
            "--server-name",
            server_name,
            "--token",
            token.trim(),
            "--identity",
            "spiffe://cluster.local/ns/demo/sa/app",
            "--out",
            "got",
        ];
        if let Some(c) = cluster {
            args.extend(["--cluster-id", c]);
        }
        self.ok(&args)
    }

    /// init + clusters + issue + export: a ready mesh with `clusters` exported to out/.
    pub fn mesh(&self, clusters: &[&str]) {
        self.ok(&["init"]);
        for c in clusters {
            self.ok(&["cluster", "add", c]);
            self.ok(&["issue", c]);
            self.ok(&["export", c, "--out", "out"]);
        }
    }
}

/// Whether missing oracles are a failure (set by the test command) or a skip.
fn required() -> bool {
    std::env::var_os("CACTL_REQUIRE_INTEROP").is_some()
}

fn missing(tool: &str) -> Option<PathBuf> {
    if required() {
        panic!("{tool} is required (CACTL_REQUIRE_INTEROP is set) but was not found");
    }
    eprintln!("SKIP: {tool} not found; run tests/run.sh to install the interop oracles");
    None
}

/// The Go crypto/x509 checker: `CACTL_GOCHECK`, or built from tests/interop/gocheck with `go`.
pub fn gocheck() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACTL_GOCHECK") {
        return Some(PathBuf::from(p));
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gocheck");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/gocheck");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&src)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env(
            "GOCACHE",
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gocache"),
        )
        .status();
    match status {
        Ok(s) if s.success() => Some(out),
        _ => missing("go (for the crypto/x509 checker)"),
    }
}

/// pkilint's `lint_pkix_cert`: `CACTL_PKILINT` or on PATH.
pub fn pkilint() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACTL_PKILINT") {
        return Some(PathBuf::from(p));
    }
    match Command::new("lint_pkix_cert").arg("--help").output() {
        Ok(o) if o.status.success() => Some(PathBuf::from("lint_pkix_cert")),
        _ => missing("pkilint (lint_pkix_cert)"),
    }
}

/// openssl on PATH (always required: it is part of every supported machine).
pub fn openssl(args: &[&str], dir: &Path) -> Run {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a tool and returns (exit code, stdout + stderr).
pub fn tool(bin: &Path, args: &[&str], dir: &Path) -> (i32, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// An istio-agent style CSR (subject O="", critical URI SAN) made with rcgen.
pub fn csr_agent(uri: &str, alg: &'static rcgen::SignatureAlgorithm) -> String {
    agent_csr_for(uri, &rcgen::KeyPair::generate_for(alg).unwrap())
}

/// An istio-agent-style CSR (`O=`, one URI SAN) signed by `key`.
fn agent_csr_for(uri: &str, key: &rcgen::KeyPair) -> String {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// An istio-agent-style CSR with an RSA-2048 key.
pub fn csr_agent_rsa(uri: &str) -> String {
    use cactl::pki::key::{KeyAlgorithm, SecretKey};
    let secret = SecretKey::generate(KeyAlgorithm::Rsa2048).unwrap();
    let der = secret.to_pkcs8_der();
    agent_csr_for(uri, &rcgen::KeyPair::try_from(&der[..]).unwrap())
}

/// A CSR with arbitrary SANs and subject, for policy tests.
pub fn csr_with(
    sans: Vec<rcgen::SanType>,
    params_fn: impl FnOnce(&mut rcgen::CertificateParams),
) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    params_fn(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Parses the `--output json` of a command.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A running `cactl serve`, killed on drop.
pub struct Server {
    pub child: std::process::Child,
    pub grpc: String,
    pub metrics: String,
    pub plaintext: Option<String>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts `cactl serve` in `env` (config `cactl.yaml`) on loopback ports chosen by the OS.
    pub fn start(env: &Env, extra: &[&str]) -> Self {
        use std::io::BufRead as _;
        let stderr_path = env.path(&format!("serve-{}.log", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut args = vec![
            "--output",
            "json",
            "--log-level",
            "info",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cactl"))
            .args(&args)
            .current_dir(env.dir.path())
            .env_remove("CACTL_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn cactl serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => {
                let _ = child.wait();
                panic!(
                    "cactl serve did not start: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["event"], "listening", "{line}");
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            grpc: v["bound"]["grpc"].as_str().unwrap().to_owned(),
            metrics: v["bound"]["metrics"].as_str().unwrap().to_owned(),
            plaintext: v["bound"]["plaintext"].as_str().map(str::to_owned),
            stderr_path,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for exit; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("cactl serve did not stop on SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET on loopback (for /metrics, /healthz, /readyz): (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A token signer with its JWK (ES256 or RS256), for JWKS files in tests.
pub struct TokenKey {
    pub kid: String,
    pub alg: jsonwebtoken::Algorithm,
    pub encoding: jsonwebtoken::EncodingKey,
    pub jwk: serde_json::Value,
}

impl TokenKey {
    pub fn new(kid: &str, rsa: bool) -> Self {
        use base64::Engine as _;
        use cactl::pki::key::{KeyAlgorithm, SecretKey};
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = SecretKey::generate(if rsa {
            KeyAlgorithm::Rsa2048
        } else {
            KeyAlgorithm::EcdsaP256
        })
        .unwrap();
        let spki = key.public_key_spki();
        use x509_parser::prelude::FromDer as _;
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let pem = key.to_pkcs8_pem();
        if rsa {
            let Ok(x509_parser::public_key::PublicKey::RSA(r)) = parsed.parsed() else {
                panic!()
            };
            let strip = |b: &[u8]| {
                b.iter()
                    .skip_while(|x| **x == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            Self {
                kid: kid.into(),
                alg: jsonwebtoken::Algorithm::RS256,
                encoding: jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                jwk: serde_json::json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                    "n": b64.encode(strip(r.modulus)), "e": b64.encode(strip(r.exponent))}),
            }
        } else {
            let point = &spki[spki.len() - 65..];
            Self {
                kid: kid.into(),
                alg: jsonwebtoken::Algorithm::ES256,
                encoding: jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
                jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                    "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..])}),
            }
        }
    }

    /// Mints a projected-SA-style token; `mutate` edits the claims first.
    pub fn token(
        &self,
        iss: &str,
        ns: &str,
        sa: &str,
        mutate: impl FnOnce(&mut serde_json::Value),
    ) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut claims = serde_json::json!({
            "iss": iss, "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 3600,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        });
        mutate(&mut claims);
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

pub fn jwks(keys: &[&TokenKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// The Python interpreter of the interop venv: `CACTL_PYTHON`, or `python3` if it has grpcio.
pub fn python_with_grpc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACTL_PYTHON") {
        return Some(PathBuf::from(p));
    }
    match Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools, cryptography.x509.verification",
        ])
        .output()
    {
        Ok(o) if o.status.success() => Some(PathBuf::from("python3")),
        _ => missing("python3 with grpcio, grpcio-tools and cryptography"),
    }
}

/// Two writers of one store: of two saves built on the same revision only the first
/// succeeds; and a writer whose read went stale at the store (resourceVersion, KV version)
/// after another save is refused too. Starts from a stored revision 2.
pub fn two_writers_one_wins(a: &dyn cactl::state::StateStore, b: &dyn cactl::state::StateStore) {
    use cactl::state::Error;
    let mut sa = a.load().unwrap().unwrap();
    let mut sb = b.load().unwrap().unwrap();
    assert_eq!(sa.revision, 2);
    sa.revision += 1;
    sa.sequence += 100;
    sb.revision += 1;
    a.save(&sa).unwrap();
    match b.save(&sb) {
        Err(Error::Conflict {
            expected: 2,
            found: 3,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(b.load().unwrap().unwrap().sequence, sa.sequence);
    let mut next = a.load().unwrap().unwrap();
    let mut racer = b.load().unwrap().unwrap();
    racer.revision += 1;
    racer.sequence += 1;
    b.save(&racer).unwrap();
    next.revision += 1;
    assert!(matches!(a.save(&next), Err(Error::Conflict { .. })));
}
