//! The configuration file (`cactl.yaml`): trust domain, key types, lifetimes, the root backend,
//! the state store and the member clusters. Every field has a default, so an empty file (or no
//! file at all, for commands that allow it) is a working local setup.

use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::pki::key::KeyAlgorithm;
use crate::pki::spiffe::validate_trust_domain;
use crate::policy::WorkloadPolicy;

/// Default config file name, looked up in the working directory.
pub const DEFAULT_PATH: &str = "cactl.yaml";

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is missing.
    #[error("config file {0} not found (create one with `cactl init`, or pass --config)")]
    NotFound(String),
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// YAML syntax or a field of the wrong type.
    #[error("config file {path} is invalid: {reason}")]
    Parse {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The config cannot be written as YAML.
    #[error("cannot write the config as YAML: {0}")]
    Serialize(String),
    /// A value out of range.
    #[error("config file {path}: {field}: {reason}")]
    Invalid {
        /// Path.
        path: String,
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SPIFFE trust domain of the mesh (Istio's `meshConfig.trustDomain`).
    pub trust_domain: String,
    /// Organisation written into CA subjects.
    pub organization: String,
    /// The mesh root.
    pub root: RootConfig,
    /// Per-cluster intermediates.
    pub intermediate: IntermediateConfig,
    /// Workload certificates.
    pub workload: WorkloadConfig,
    /// Where state is kept.
    pub state: StateConfig,
    /// The signing service (`cactl serve`).
    pub serve: ServeConfig,
    /// Distribution to clusters (`cactl push`, and `cactl serve`'s sync).
    pub push: PushConfig,
    /// Scheduled rotation (`cactl rotate`, and `cactl serve`'s timer).
    pub rotation: RotationConfig,
    /// Vault / OpenBao, for the `vault-pki` and `vault-kv` root backends and state store.
    pub vault: VaultConfig,
    /// Member clusters.
    pub clusters: Vec<ClusterConfig>,
}

/// Settings of `cactl serve`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// gRPC over TLS (`IstioCertificateService`).
    pub listen: String,
    /// Prometheus metrics, `/healthz` and `/readyz` (plain HTTP).
    pub metrics_listen: String,
    /// Plaintext h2c gRPC listener, for tests only; off unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext_listen: Option<String>,
    /// DNS names in the serving certificate (what `caAddress` points at).
    pub dns_names: Vec<String>,
    /// Cluster whose intermediate issues the serving certificate (default: the first cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_cluster: Option<String>,
    /// Lifetime of the serving certificate; renewed at two thirds of it, without a restart.
    #[serde(with = "humantime_serde")]
    pub serving_cert_lifetime: StdDuration,
    /// Cluster assumed when a request carries no `clusterid` header (default: the first cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cluster: Option<String>,
    /// Accepted token audiences (Istio: `TOKEN_AUDIENCES`).
    pub audiences: Vec<String>,
    /// Service accounts (`namespace/name`) allowed to request certificates for other
    /// identities on their node (ztunnel).
    pub trusted_node_accounts: Vec<String>,
    /// Largest accepted request, in bytes; larger ones are refused before parsing.
    pub max_message_bytes: usize,
    /// Verified tokens kept (bounded cache); 0 disables the cache.
    pub token_cache_entries: u64,
    /// Clock skew tolerated on token `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub clock_skew: StdDuration,
    /// How each issued chain is checked before it is sent. Always: the issuer chain is verified
    /// up to the bundle whenever issuers load, and each leaf's place in it is checked (issuer
    /// name, key identifier, validity, public key, identity). `full` also verifies each leaf's
    /// signature (one more signature verification per request).
    pub verify_issued: VerifyIssued,
    /// gRPC worker threads (default: one per CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// How often the state store is polled for new intermediates (hot swap).
    #[serde(with = "humantime_serde")]
    pub reload_interval: StdDuration,
}

/// See [`ServeConfig::verify_issued`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyIssued {
    /// Also verify every leaf's signature.
    Full,
    /// Issuer chains cryptographically at load, with a self-test leaf checked in full; each
    /// leaf's validity against its issuer's, before it is encoded from the issuer's template.
    Structural,
}

impl Default for ClusterAuth {
    fn default() -> Self {
        Self {
            issuer: None,
            audiences: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_from_cluster: false,
            token_review: false,
            dev_issuer: false,
            jwks_refresh: StdDuration::from_secs(300),
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15012".into(),
            metrics_listen: "0.0.0.0:15014".into(),
            plaintext_listen: None,
            dns_names: vec![
                "cactl.cactl-system.svc".into(),
                "cactl.cactl-system.svc.cluster.local".into(),
            ],
            serving_cluster: None,
            serving_cert_lifetime: StdDuration::from_secs(24 * 3600),
            default_cluster: None,
            audiences: vec!["istio-ca".into()],
            trusted_node_accounts: vec!["istio-system/ztunnel".into()],
            max_message_bytes: 64 * 1024,
            token_cache_entries: 100_000,
            clock_skew: StdDuration::from_secs(60),
            verify_issued: VerifyIssued::Structural,
            workers: None,
            reload_interval: StdDuration::from_secs(10),
        }
    }
}

/// How workloads of a cluster authenticate to `cactl serve`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterAuth {
    /// Expected `iss` of service-account tokens (the cluster's `--service-account-issuer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Audiences for this cluster (default: `serve.audiences`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// JWKS file (the output of `kubectl get --raw /openid/v1/jwks`); re-read periodically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (e.g. the issuer's `/openid/v1/jwks`); fetched periodically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Fetch the JWKS from the cluster's own `/openid/v1/jwks` through its API credentials.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub jwks_from_cluster: bool,
    /// When a token does not verify locally (unknown issuer key, no JWKS), ask the cluster
    /// with a TokenReview; verdicts are cached like verified tokens.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub token_review: bool,
    /// CA bundle (PEM) for the JWKS URL's TLS, in addition to the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Trust tokens from cactl's local development issuer (`cactl dev-token`). Demos only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dev_issuer: bool,
    /// How often JWKS are refreshed (also on an unknown `kid`).
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: StdDuration,
}

/// Root backend selection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RootBackend {
    /// The root key is generated by cactl and kept in the state store.
    Local,
    /// The root lives in a Vault / OpenBao PKI mount; its key never leaves Vault.
    VaultPki,
    /// The root certificate and key are kept in a Vault KV v2 secret and loaded only to sign.
    VaultKv,
}

/// Root settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RootConfig {
    /// Backend.
    pub backend: RootBackend,
    /// Key algorithm of new roots.
    pub key_type: KeyAlgorithm,
    /// Lifetime of new roots.
    #[serde(with = "humantime_serde")]
    pub lifetime: StdDuration,
    /// `vault-pki`: the PKI mount.
    pub pki_mount: String,
    /// `vault-pki`: adopt this existing issuer (name or id) at `cactl init` instead of
    /// generating a root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopt_issuer: Option<String>,
    /// `vault-kv`: the KV v2 mount.
    pub kv_mount: String,
    /// `vault-kv`: where root secrets live (`<kv_path>/<root id>`, fields `certificate` and
    /// `private_key`).
    pub kv_path: String,
    /// `vault-kv`: adopt the root in this existing secret at `cactl init` (fields
    /// `certificate` and `private_key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopt_secret: Option<String>,
}

/// How cactl reaches Vault or OpenBao.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// Address, e.g. `https://vault.example:8200` (unset: `VAULT_ADDR` / `BAO_ADDR`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Vault Enterprise / OpenBao namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// CA bundle (PEM) to verify Vault's TLS certificate with (unset: the system roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: StdDuration,
    /// How cactl logs in.
    pub auth: VaultAuth,
}

/// Vault login.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultAuth {
    /// `token`, `approle` or `kubernetes`.
    pub method: VaultAuthMethod,
    /// Auth mount (default: `approle` / `kubernetes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// `token`: file holding the token (unset: `VAULT_TOKEN` / `BAO_TOKEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// `approle`: the role id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_id: Option<String>,
    /// `approle`: file holding the secret id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_id_file: Option<PathBuf>,
    /// `kubernetes`: the Vault role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `kubernetes`: the service-account token to log in with.
    pub jwt_file: PathBuf,
}

/// Vault login methods.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VaultAuthMethod {
    /// A token (renewed while renewable).
    Token,
    /// AppRole (role id + secret id).
    Approle,
    /// Kubernetes service-account login.
    Kubernetes,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            address: None,
            namespace: None,
            ca_file: None,
            timeout: StdDuration::from_secs(10),
            auth: VaultAuth::default(),
        }
    }
}

impl Default for VaultAuth {
    fn default() -> Self {
        Self {
            method: VaultAuthMethod::Token,
            mount: None,
            token_file: None,
            role_id: None,
            secret_id_file: None,
            role: None,
            jwt_file: PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        }
    }
}

/// Intermediate settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntermediateConfig {
    /// Key algorithm of new intermediates.
    pub key_type: KeyAlgorithm,
    /// Lifetime of new intermediates (capped at the root's NotAfter).
    #[serde(with = "humantime_serde")]
    pub lifetime: StdDuration,
    /// Add a critical URI name constraint limiting intermediates to the trust domain.
    pub name_constraints: bool,
}

/// Workload certificate settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    /// TTL when the request gives none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: StdDuration,
    /// Longer requests are clamped to this.
    #[serde(with = "humantime_serde")]
    pub max_ttl: StdDuration,
}

/// Rotation thresholds and waits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Cap of how long before an intermediate's NotAfter its successor is prepared (the lead
    /// is half the lifetime, at most this).
    #[serde(with = "humantime_serde")]
    pub prepare_before: StdDuration,
    /// Cap of how long before an intermediate's NotAfter its successor is activated (the lead
    /// is a sixth of the lifetime, at most this).
    #[serde(with = "humantime_serde")]
    pub activate_before: StdDuration,
    /// Largest per-cluster shift of both thresholds, so a fleet does not rotate at once.
    #[serde(with = "humantime_serde")]
    pub jitter: StdDuration,
    /// How long a root phase lasts at least once every cluster holds its material; unset
    /// means `workload.max_ttl` (every workload certificate has been renewed by then).
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub soak: Option<StdDuration>,
    /// How often `cactl serve` runs the rotation executor (0 disables it).
    #[serde(with = "humantime_serde")]
    pub interval: StdDuration,
    /// Lease that elects the one `cactl serve` replica that rotates and pushes, in the
    /// namespace cactl runs in (in-cluster only; unset: every replica acts, for single
    /// replicas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            prepare_before: StdDuration::from_secs(30 * 86_400),
            activate_before: StdDuration::from_secs(7 * 86_400),
            jitter: StdDuration::from_secs(6 * 3600),
            soak: None,
            interval: StdDuration::from_secs(600),
            lease: None,
        }
    }
}

/// State store selection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Store kind.
    pub store: StoreKind,
    /// Directory for the file store (and, for every store, local records such as the last
    /// push), relative to the config file's directory.
    pub path: PathBuf,
    /// Kubernetes store: namespace of the Secret (and of the rotation Lease).
    pub namespace: String,
    /// Kubernetes store: name of the Secret holding the state.
    pub secret: String,
    /// Kubernetes store: kubeconfig of the cluster cactl keeps its state in (unset: the
    /// in-cluster service account).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes store: kubeconfig context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// `vault-kv` store: the KV v2 mount.
    pub kv_mount: String,
    /// `vault-kv` store: the secret path of the journal.
    pub kv_path: String,
}

/// State store kinds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// A directory on the local filesystem.
    File,
    /// A Secret in the cluster cactl runs in (shared by `serve` replicas).
    Kubernetes,
    /// A Vault / OpenBao KV v2 secret, written with check-and-set.
    VaultKv,
}

/// A member cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name: Istio's cluster ID (the `clusterid` header istio-agent sends).
    pub name: String,
    /// How this cluster's workloads authenticate to `cactl serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ClusterAuth>,
    /// Kubeconfig file for this cluster (relative to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig (default: its current context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Use the in-cluster service account instead of a kubeconfig.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_cluster: bool,
    /// How Istio in this cluster gets workload certificates.
    #[serde(default, skip_serializing_if = "ClusterMode::is_plugin")]
    pub mode: ClusterMode,
    /// Istio's namespace.
    #[serde(
        default = "default_istio_namespace",
        skip_serializing_if = "is_default_istio_namespace"
    )]
    pub namespace: String,
    /// External mode: label selector (`k=v,...`) of namespaces that get `istio-ca-root-cert`
    /// (default: every namespace but the ones istiod skips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// External mode: also publish istiod's serving certificate as Secret `istiod-tls`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub istiod_tls: bool,
    /// Publish the bundle as a ClusterTrustBundle (certificates.k8s.io/v1beta1) with this
    /// signer name (e.g. `istio.io/istiod-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_trust_bundle: Option<String>,
}

/// How Istio in a cluster gets workload certificates.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    /// istiod signs with the cluster's intermediate from Secret `cacerts`.
    #[default]
    Plugin,
    /// istio-agent and ztunnel call `cactl serve`; the intermediate key stays in cactl.
    External,
}

impl ClusterMode {
    fn is_plugin(&self) -> bool {
        *self == Self::Plugin
    }
}

fn default_istio_namespace() -> String {
    "istio-system".into()
}

fn is_default_istio_namespace(ns: &String) -> bool {
    ns == "istio-system"
}

/// Settings of `cactl push` and of the continuous sync in `cactl serve`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Clusters handled at once.
    pub concurrency: usize,
    /// Requests per second per cluster (client-side rate limit).
    pub qps: u32,
    /// Concurrent requests per cluster.
    pub requests_in_flight: usize,
    /// Timeout of each API request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: StdDuration,
    /// Attempts per cluster before it is reported failed.
    pub attempts: u32,
    /// `cactl serve`: full resync interval (edits are also repaired as watch events arrive).
    #[serde(with = "humantime_serde")]
    pub resync_interval: StdDuration,
    /// `cactl serve`: keep clusters in sync.
    pub sync_in_serve: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            qps: 100,
            requests_in_flight: 16,
            request_timeout: StdDuration::from_secs(10),
            attempts: 3,
            resync_interval: StdDuration::from_secs(60),
            sync_in_serve: true,
        }
    }
}

impl ClusterConfig {
    /// A cluster with no signing-service settings.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            auth: None,
            kubeconfig: None,
            context: None,
            in_cluster: false,
            mode: ClusterMode::Plugin,
            namespace: default_istio_namespace(),
            namespace_selector: None,
            istiod_tls: false,
            cluster_trust_bundle: None,
        }
    }

    /// Whether cactl can reach this cluster's API server.
    pub fn has_api_access(&self) -> bool {
        self.in_cluster || self.kubeconfig.is_some()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            organization: "cactl".into(),
            root: RootConfig::default(),
            intermediate: IntermediateConfig::default(),
            workload: WorkloadConfig::default(),
            state: StateConfig::default(),
            serve: ServeConfig::default(),
            push: PushConfig::default(),
            rotation: RotationConfig::default(),
            vault: VaultConfig::default(),
            clusters: Vec::new(),
        }
    }
}

impl Default for RootConfig {
    fn default() -> Self {
        Self {
            backend: RootBackend::Local,
            key_type: KeyAlgorithm::EcdsaP256,
            lifetime: StdDuration::from_secs(10 * 365 * 86_400),
            pki_mount: "pki".into(),
            adopt_issuer: None,
            kv_mount: "secret".into(),
            kv_path: "cactl/roots".into(),
            adopt_secret: None,
        }
    }
}

impl Default for IntermediateConfig {
    fn default() -> Self {
        Self {
            key_type: KeyAlgorithm::EcdsaP256,
            lifetime: StdDuration::from_secs(365 * 86_400),
            name_constraints: false,
        }
    }
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            default_ttl: StdDuration::from_secs(24 * 3600),
            max_ttl: StdDuration::from_secs(48 * 3600),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::File,
            path: PathBuf::from("cactl-state"),
            namespace: "cactl-system".into(),
            secret: "cactl-state".into(),
            kubeconfig: None,
            context: None,
            kv_mount: "secret".into(),
            kv_path: "cactl/state".into(),
        }
    }
}

/// A loaded configuration and where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file it was read from.
    pub path: PathBuf,
}

impl Loaded {
    /// Resolves a path from the config file against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let base = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        base.join(p)
    }

    /// The state directory, resolved against the config file's directory.
    pub fn state_dir(&self) -> PathBuf {
        if self.config.state.path.is_absolute() {
            return self.config.state.path.clone();
        }
        let base = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        base.join(&self.config.state.path)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Loaded, Error> {
        Self::load_with_text(path).map(|(loaded, _)| loaded)
    }

    /// Reads and validates a config file, returning its text too (for edits that keep it).
    pub fn load_with_text(path: &Path) -> Result<(Loaded, String), Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(path.display().to_string()));
            }
            Err(source) => {
                return Err(Error::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let config = Self::parse(&text, &path.display().to_string())?;
        let loaded = Loaded {
            config,
            path: path.to_path_buf(),
        };
        Ok((loaded, text))
    }

    /// Parses and validates YAML text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| Error::Parse {
                path: origin.to_owned(),
                reason: first_line(&e.to_string()),
            })?
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let invalid = |field, reason: String| Error::Invalid {
            path: origin.to_owned(),
            field,
            reason,
        };
        validate_trust_domain(&self.trust_domain)
            .map_err(|r| invalid("trust_domain", r.to_owned()))?;
        if self.organization.trim().is_empty() {
            return Err(invalid("organization", "must not be empty".into()));
        }
        if self.root.lifetime < StdDuration::from_secs(86_400) {
            return Err(invalid("root.lifetime", "must be at least 1 day".into()));
        }
        if self.intermediate.lifetime < StdDuration::from_secs(3600) {
            return Err(invalid(
                "intermediate.lifetime",
                "must be at least 1 hour".into(),
            ));
        }
        if self.intermediate.lifetime > self.root.lifetime {
            return Err(invalid(
                "intermediate.lifetime",
                "must not exceed root.lifetime".into(),
            ));
        }
        if self.workload.max_ttl.is_zero() || self.workload.default_ttl.is_zero() {
            return Err(invalid("workload", "TTLs must be positive".into()));
        }
        if self.workload.default_ttl > self.workload.max_ttl {
            return Err(invalid(
                "workload.default_ttl",
                "must not exceed workload.max_ttl".into(),
            ));
        }
        if self.workload.max_ttl > self.intermediate.lifetime {
            return Err(invalid(
                "workload.max_ttl",
                "must not exceed intermediate.lifetime".into(),
            ));
        }
        // A successor is activated a sixth of the lifetime (at most activate_before) before
        // its predecessor expires; a workload certificate issued just before must still fit.
        let cover = (self.intermediate.lifetime / 6).min(self.rotation.activate_before);
        if self.workload.max_ttl > cover {
            return Err(invalid(
                "workload.max_ttl",
                format!(
                    "{} is longer than an intermediate can cover: at most min(intermediate.lifetime/6, rotation.activate_before) = {} (raise intermediate.lifetime or lower workload.max_ttl)",
                    humantime_serde::format(self.workload.max_ttl),
                    humantime_serde::format(cover)
                ),
            ));
        }
        if self.root.backend == RootBackend::VaultPki && self.intermediate.name_constraints {
            return Err(invalid(
                "intermediate.name_constraints",
                "Vault's PKI engine cannot write URI name constraints; use root.backend local or vault-kv, or turn name_constraints off".into(),
            ));
        }
        let uses_vault =
            self.root.backend != RootBackend::Local || self.state.store == StoreKind::VaultKv;
        if uses_vault {
            let a = &self.vault.auth;
            match a.method {
                VaultAuthMethod::Approle if a.role_id.is_none() || a.secret_id_file.is_none() => {
                    return Err(invalid(
                        "vault.auth",
                        "approle needs role_id and secret_id_file".into(),
                    ));
                }
                VaultAuthMethod::Kubernetes if a.role.is_none() => {
                    return Err(invalid("vault.auth", "kubernetes needs role".into()));
                }
                _ => {}
            }
        }
        if self.rotation.activate_before >= self.rotation.prepare_before {
            return Err(invalid(
                "rotation.activate_before",
                "must be shorter than rotation.prepare_before".into(),
            ));
        }
        for (field, addr) in [
            ("serve.listen", Some(&self.serve.listen)),
            ("serve.metrics_listen", Some(&self.serve.metrics_listen)),
            (
                "serve.plaintext_listen",
                self.serve.plaintext_listen.as_ref(),
            ),
        ] {
            if let Some(a) = addr {
                a.parse::<std::net::SocketAddr>().map_err(|_| {
                    invalid(field, format!("{a:?} is not an address like 0.0.0.0:15012"))
                })?;
            }
        }
        if self.serve.dns_names.is_empty() {
            return Err(invalid(
                "serve.dns_names",
                "must name at least one DNS name".into(),
            ));
        }
        for a in &self.serve.trusted_node_accounts {
            match a.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {}
                _ => {
                    return Err(invalid(
                        "serve.trusted_node_accounts",
                        format!("{a:?} is not namespace/serviceaccount"),
                    ));
                }
            }
        }
        if self.serve.max_message_bytes < 1024 {
            return Err(invalid(
                "serve.max_message_bytes",
                "must be at least 1024".into(),
            ));
        }
        if self.serve.serving_cert_lifetime < StdDuration::from_secs(600) {
            return Err(invalid(
                "serve.serving_cert_lifetime",
                "must be at least 10m".into(),
            ));
        }
        for (field, name) in [
            ("serve.serving_cluster", &self.serve.serving_cluster),
            ("serve.default_cluster", &self.serve.default_cluster),
        ] {
            if let Some(n) = name
                && self.cluster(n).is_none()
            {
                return Err(invalid(field, format!("cluster {n:?} is not declared")));
            }
        }
        for c in &self.clusters {
            if let Some(auth) = &c.auth {
                let sources = [
                    auth.jwks_file.is_some(),
                    auth.jwks_url.is_some(),
                    auth.jwks_from_cluster,
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if sources > 1 {
                    return Err(invalid(
                        "clusters.auth",
                        format!(
                            "cluster {:?}: choose one of jwks_file, jwks_url, jwks_from_cluster",
                            c.name
                        ),
                    ));
                }
                if (auth.jwks_from_cluster || auth.token_review) && !c.has_api_access() {
                    return Err(invalid(
                        "clusters.auth",
                        format!(
                            "cluster {:?}: jwks_from_cluster and token_review need kubeconfig or in_cluster",
                            c.name
                        ),
                    ));
                }
                if sources > 0 && auth.issuer.is_none() {
                    return Err(invalid(
                        "clusters.auth.issuer",
                        format!(
                            "cluster {:?}: the token issuer must be set with a JWKS",
                            c.name
                        ),
                    ));
                }
                if let Some(u) = &auth.jwks_url
                    && !(u.starts_with("https://") || u.starts_with("http://"))
                {
                    return Err(invalid(
                        "clusters.auth.jwks_url",
                        format!("cluster {:?}: {u:?} is not an http(s) URL", c.name),
                    ));
                }
            }
        }
        if self.push.concurrency == 0
            || self.push.qps == 0
            || self.push.requests_in_flight == 0
            || self.push.attempts == 0
        {
            return Err(invalid(
                "push",
                "concurrency, qps, requests_in_flight and attempts must be positive".into(),
            ));
        }
        for c in &self.clusters {
            if c.mode == ClusterMode::Plugin && (c.istiod_tls || c.namespace_selector.is_some()) {
                return Err(invalid(
                    "clusters",
                    format!(
                        "cluster {:?}: istiod_tls and namespace_selector apply to external mode only",
                        c.name
                    ),
                ));
            }
            if c.in_cluster && c.kubeconfig.is_some() {
                return Err(invalid(
                    "clusters",
                    format!(
                        "cluster {:?}: set kubeconfig or in_cluster, not both",
                        c.name
                    ),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.clusters {
            validate_cluster_name(&c.name).map_err(|r| invalid("clusters", r))?;
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(
                    "clusters",
                    format!("cluster {:?} is listed twice", c.name),
                ));
            }
        }
        Ok(())
    }

    /// Serializes to YAML.
    pub fn to_yaml(&self) -> Result<String, Error> {
        serde_saphyr::to_string(self).map_err(|e| Error::Serialize(first_line(&e.to_string())))
    }

    /// The rotation policy: thresholds from `rotation`, soak defaulting to the longest
    /// workload certificate lifetime.
    pub fn rotation_policy(&self) -> crate::rotation::Policy {
        let r = &self.rotation;
        crate::rotation::Policy {
            prepare_cap: to_time(r.prepare_before),
            activate_cap: to_time(r.activate_before),
            jitter: to_time(r.jitter),
            soak: to_time(r.soak.unwrap_or(self.workload.max_ttl)),
        }
    }

    /// The workload policy this config describes.
    pub fn workload_policy(&self) -> WorkloadPolicy {
        WorkloadPolicy {
            trust_domain: self.trust_domain.clone(),
            default_ttl: to_time(self.workload.default_ttl),
            max_ttl: to_time(self.workload.max_ttl),
        }
    }

    /// Whether a cluster is declared.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// The parser's messages carry a multi-line source snippet; keep the one-line summary.
fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or(msg);
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Cluster names are Istio cluster IDs (the `clusterid` header, default `Kubernetes`) and also
/// directory names and label values: 1-63 ASCII letters, digits, '-', '_' or '.', starting and
/// ending with a letter or digit.
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok = !name.is_empty()
        && name.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid cluster name {name:?}: use 1-63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

/// `text`, a config file, with a cluster named `name` appended to its `clusters` list, edited
/// in place so that comments and layout survive. A file without the list gains one at its end.
/// `None` when the list is not a block list this edit understands (flow style, or a key with no
/// items); callers check that the result parses to the config they expect.
pub fn append_cluster(text: &str, name: &str) -> Option<String> {
    let nl = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let Some(key) = lines.iter().position(|l| l.starts_with("clusters:")) else {
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(nl);
        }
        out.push_str(&format!("clusters:{nl}- name: {name}{nl}"));
        return Some(out);
    };
    // The key must open a block (nothing after the colon but a comment), or be an empty flow
    // list, as `cactl init` writes it, which becomes a block.
    let after = lines[key]["clusters:".len()..].trim();
    if let Some(comment) = after.strip_prefix("[]").map(str::trim_start)
        && (comment.is_empty() || comment.starts_with('#'))
    {
        let mut out: String = lines[..key].concat();
        out.push_str("clusters:");
        if !comment.is_empty() {
            out.push(' ');
            out.push_str(comment);
        }
        out.push_str(&format!("{nl}- name: {name}{nl}"));
        out.extend(lines[key + 1..].iter().copied());
        return Some(out);
    }
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    let is_item = |body: &str| body.starts_with("- ") || body.trim_end() == "-";
    // The items' indentation, and the last line that belongs to the list.
    let mut indent = None;
    let mut last = key;
    for (i, line) in lines.iter().enumerate().skip(key + 1) {
        let body = line.trim_start_matches(' ');
        let depth = line.len() - body.len();
        if body.trim().is_empty() {
            continue;
        }
        if body.starts_with('#') {
            // A comment indented into the list belongs to it; one further out, to what follows.
            if indent.is_some_and(|d| depth > d || (depth == d && d > 0)) {
                last = i;
            }
            continue;
        }
        match indent {
            None if is_item(body) => indent = Some(depth),
            // The next key: `clusters:` has no items.
            None => return None,
            Some(d) if depth > d || (depth == d && is_item(body)) => {}
            Some(_) => break,
        }
        last = i;
    }
    let indent = indent?;
    let mut out: String = lines[..=last].concat();
    if !out.ends_with('\n') {
        out.push_str(nl);
    }
    out.push_str(&" ".repeat(indent));
    out.push_str(&format!("- name: {name}{nl}"));
    out.extend(lines[last + 1..].iter().copied());
    Some(out)
}

/// Converts a std duration to a `time` duration, saturating.
pub fn to_time(d: StdDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::MAX)
}

mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Formats in the largest whole unit: `3650d`, `24h`, `90m`, `5s`.
    pub(super) fn format(d: Duration) -> String {
        let secs = d.as_secs();
        match secs {
            0 => "0s".into(),
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); use e.g. 24h, 30d, 1y"
            ))
        })
    }

    /// The same for optional durations.
    pub(super) mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub(in super::super) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&super::format(*d)),
                None => s.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            let Some(text) = Option::<String>::deserialize(d)? else {
                return Ok(None);
            };
            humantime::parse_duration(&text).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); use e.g. 24h, 30d, 1y"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_cluster_keeps_comments_and_layout() {
        let text = "# mesh config\ntrust_domain: cluster.local # the mesh's domain\nclusters:\n- name: east\n  # west is run by another team\n- name: west\n# rotation settings follow\nrotation:\n  jitter: 1h\n";
        assert_eq!(
            append_cluster(text, "north").unwrap(),
            "# mesh config\ntrust_domain: cluster.local # the mesh's domain\nclusters:\n- name: east\n  # west is run by another team\n- name: west\n- name: north\n# rotation settings follow\nrotation:\n  jitter: 1h\n"
        );
        // Indented items with fields of their own, at the end of a file without a newline.
        let text =
            "clusters: # members\n  - name: east\n    jwks_file: east.json\n\n  - name: west";
        assert_eq!(
            append_cluster(text, "north").unwrap(),
            "clusters: # members\n  - name: east\n    jwks_file: east.json\n\n  - name: west\n  - name: north\n"
        );
        // A comment indented into the list after its last item stays before the new one.
        let text = "clusters:\n  - name: east\n    # more soon\n  # really\n# next\nroot: {}\n";
        assert_eq!(
            append_cluster(text, "west").unwrap(),
            "clusters:\n  - name: east\n    # more soon\n  # really\n  - name: west\n# next\nroot: {}\n"
        );
        // No list yet: one is started at the end.
        assert_eq!(
            append_cluster("# empty\ntrust_domain: x", "east").unwrap(),
            "# empty\ntrust_domain: x\nclusters:\n- name: east\n"
        );
        assert_eq!(
            append_cluster("", "east").unwrap(),
            "clusters:\n- name: east\n"
        );
        // The empty list `cactl init` writes becomes a block list.
        assert_eq!(
            append_cluster("a: 1\nclusters: [] # none yet\nb: 2\n", "east").unwrap(),
            "a: 1\nclusters: # none yet\n- name: east\nb: 2\n"
        );
        assert_eq!(
            append_cluster("clusters: []", "east").unwrap(),
            "clusters:\n- name: east\n"
        );
        // CRLF files keep their line ends.
        assert_eq!(
            append_cluster("clusters:\r\n- name: east\r\nb: 2\r\n", "west").unwrap(),
            "clusters:\r\n- name: east\r\n- name: west\r\nb: 2\r\n"
        );
        // Shapes left to a full rewrite.
        assert_eq!(append_cluster("clusters: [east]\n", "west"), None);
        assert_eq!(append_cluster("clusters:\nroot: {}\n", "west"), None);
        assert_eq!(append_cluster("clusters:\n", "west"), None);
    }

    #[test]
    fn empty_file_is_the_default_and_round_trips() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c, Config::default());
        let y = c.to_yaml().unwrap();
        assert_eq!(Config::parse(&y, "t").unwrap(), c);
    }

    #[test]
    fn parses_a_full_file() {
        let c = Config::parse(
            "trust_domain: mesh.example\norganization: Example\nroot:\n  key_type: rsa-4096\n  lifetime: 20y\nintermediate:\n  key_type: ecdsa-p384\n  lifetime: 90d\n  name_constraints: true\nworkload:\n  default_ttl: 12h\n  max_ttl: 1d\nclusters:\n  - name: east\n  - name: west\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.root.key_type, KeyAlgorithm::Rsa4096);
        assert_eq!(c.intermediate.lifetime, StdDuration::from_secs(90 * 86_400));
        assert!(c.intermediate.name_constraints);
        assert_eq!(c.clusters.len(), 2);
        assert_eq!(c.workload_policy().max_ttl, Duration::hours(24));
    }

    #[test]
    fn rejects_bad_values() {
        for (text, needle) in [
            ("trust_domain: Bad_Domain!\n", "trust_domain"),
            ("root:\n  key_type: dsa\n", "invalid"),
            ("workload:\n  max_ttl: forever\n", "invalid duration"),
            (
                "workload:\n  default_ttl: 3d\n  max_ttl: 1d\n",
                "workload.default_ttl",
            ),
            ("clusters:\n  - name: -east\n", "invalid cluster name"),
            ("clusters:\n  - name: a\n  - name: a\n", "listed twice"),
            ("unknown_key: 1\n", "unknown"),
            (
                "intermediate:\n  lifetime: 20y\n",
                "must not exceed root.lifetime",
            ),
        ] {
            let err = Config::parse(text, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
