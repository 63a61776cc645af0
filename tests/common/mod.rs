//! Helpers shared by the integration tests: a temporary working directory, running the real
//! `cactl` binary in it, and locating the interop oracles.
#![allow(dead_code)]

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
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
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
