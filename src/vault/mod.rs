//! A small client for the parts of Vault's (and OpenBao's) HTTP API that cactl uses: login
//! (token, AppRole, Kubernetes), token renewal, KV v2 with check-and-set, and the PKI engine.
//!
//! It speaks JSON over reqwest directly rather than through typed endpoint crates: the PKI
//! responses cactl must accept come in more than one shape (`ca_chain` as a list or as one
//! PEM string, depending on the server and its version), and every failure must name Vault's
//! address and the path, which one thin layer does uniformly. Callers are synchronous; the
//! requests run on a [`Bridge`](crate::bridge::Bridge) thread.
//!
//! Credentials (tokens, secret ids, service-account JWTs) live only in zeroized strings and are
//! never logged or shown by `Debug`.

pub mod kv;
pub mod pki;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::bridge::Bridge;
use crate::config::{VaultAuthMethod, VaultConfig};

/// How often a long-lived client checks whether its token needs renewing.
const RENEW_CHECK: Duration = Duration::from_secs(60);

/// Errors talking to Vault. Every message names Vault's address and the path.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No connection.
    #[error("Vault at {addr} is unreachable ({path}): {reason}")]
    Unreachable {
        /// Address.
        addr: String,
        /// API path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Sealed, uninitialised or standby.
    #[error("Vault at {addr} is sealed or not ready ({path}): {detail}")]
    Sealed {
        /// Address.
        addr: String,
        /// API path.
        path: String,
        /// Vault's message.
        detail: String,
    },
    /// 403.
    #[error(
        "Vault at {addr} denied {path}: {detail} (token revoked or expired, or the policy lacks this path)"
    )]
    Denied {
        /// Address.
        addr: String,
        /// API path.
        path: String,
        /// Vault's message.
        detail: String,
    },
    /// A check-and-set write lost.
    #[error("Vault at {addr}: {path} changed concurrently (check-and-set refused)")]
    CasMismatch {
        /// Address.
        addr: String,
        /// API path.
        path: String,
    },
    /// Any other refusal.
    #[error("Vault at {addr} refused {path} (HTTP {code}): {detail}")]
    Status {
        /// Address.
        addr: String,
        /// API path.
        path: String,
        /// HTTP status.
        code: u16,
        /// Vault's message.
        detail: String,
    },
    /// Login failed or no credentials.
    #[error("Vault at {addr}: login failed: {reason}")]
    Login {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// An answer cactl cannot use.
    #[error("Vault at {addr} answered {path} with something unusable: {reason}")]
    Invalid {
        /// Address.
        addr: String,
        /// API path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The configuration cannot work.
    #[error("vault configuration: {0}")]
    Config(String),
}

/// A Vault client. Cheap to share behind a reference; requests are serialised on its thread.
pub struct Vault {
    inner: Arc<Inner>,
    bridge: Bridge,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

struct Credentials {
    method: VaultAuthMethod,
    mount: String,
    token_file: Option<std::path::PathBuf>,
    role_id: Option<String>,
    secret_id_file: Option<std::path::PathBuf>,
    role: Option<String>,
    jwt_file: std::path::PathBuf,
}

struct Inner {
    http: reqwest::Client,
    addr: String,
    namespace: Option<String>,
    creds: Credentials,
    token: Mutex<Option<Zeroizing<String>>>,
    last_renew_check: Mutex<Option<Instant>>,
    timeout: Duration,
}

/// What `auth/token/lookup-self` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Seconds left.
    pub ttl: u64,
    /// Whether it can be renewed.
    pub renewable: bool,
    /// Seconds it was created with.
    pub creation_ttl: u64,
}

impl Vault {
    /// A client for `cfg`; relative paths resolve against `base` (the config file's directory).
    pub fn new(cfg: &VaultConfig, base: &Path) -> Result<Self, Error> {
        crate::tls::install_default_provider();
        let addr = cfg
            .address
            .clone()
            .or_else(|| std::env::var("VAULT_ADDR").ok())
            .or_else(|| std::env::var("BAO_ADDR").ok())
            .ok_or_else(|| {
                Error::Config("no vault.address (and neither VAULT_ADDR nor BAO_ADDR set)".into())
            })?;
        let addr = addr.trim_end_matches('/').to_owned();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &cfg.ca_file {
            let path = base.join(ca);
            let pem = std::fs::read(&path)
                .map_err(|e| Error::Config(format!("vault.ca_file {}: {e}", path.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Config(format!("vault.ca_file {}: {e}", path.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let a = &cfg.auth;
        let creds = Credentials {
            method: a.method,
            mount: a.mount.clone().unwrap_or_else(|| {
                match a.method {
                    VaultAuthMethod::Token => "token",
                    VaultAuthMethod::Approle => "approle",
                    VaultAuthMethod::Kubernetes => "kubernetes",
                }
                .to_owned()
            }),
            token_file: a.token_file.as_ref().map(|p| base.join(p)),
            role_id: a.role_id.clone(),
            secret_id_file: a.secret_id_file.as_ref().map(|p| base.join(p)),
            role: a.role.clone(),
            jwt_file: base.join(&a.jwt_file),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                addr,
                namespace: cfg.namespace.clone(),
                creds,
                token: Mutex::new(None),
                last_renew_check: Mutex::new(None),
                timeout: cfg.timeout,
            }),
            bridge: Bridge::new("cactl-vault"),
        })
    }

    /// Vault's address, for messages.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    fn run<T: Send + 'static>(
        &self,
        path: &str,
        fut: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        // Login, a retry after re-login and the request itself each get the timeout.
        let limit = self.inner.timeout * 4 + Duration::from_secs(5);
        self.bridge.run(fut, limit).unwrap_or_else(|| {
            Err(Error::Unreachable {
                addr: self.inner.addr.clone(),
                path: path.to_owned(),
                reason: "no answer in time".into(),
            })
        })
    }

    /// Reads `path` (`GET /v1/<path>`); `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Value>, Error> {
        let inner = self.inner.clone();
        let p = path.to_owned();
        self.run(path, async move {
            inner.maybe_renew().await;
            inner.request(reqwest::Method::GET, &p, None).await
        })
    }

    /// Writes `body` to `path` (`POST /v1/<path>`); returns the answer, if any.
    pub fn write(&self, path: &str, body: Value) -> Result<Option<Value>, Error> {
        let inner = self.inner.clone();
        let p = path.to_owned();
        self.run(path, async move {
            inner.maybe_renew().await;
            inner.request(reqwest::Method::POST, &p, Some(body)).await
        })
    }

    /// Updates fields of `path` (`PATCH /v1/<path>`, a JSON merge patch).
    pub fn patch(&self, path: &str, body: Value) -> Result<Option<Value>, Error> {
        let inner = self.inner.clone();
        let p = path.to_owned();
        self.run(path, async move {
            inner.maybe_renew().await;
            inner.request(reqwest::Method::PATCH, &p, Some(body)).await
        })
    }

    /// `auth/token/lookup-self`.
    pub fn lookup_self(&self) -> Result<TokenInfo, Error> {
        let inner = self.inner.clone();
        self.run("auth/token/lookup-self", async move {
            inner.lookup_self().await
        })
    }

    /// Renews the token now (`auth/token/renew-self`), or logs in again when it cannot be
    /// renewed and was obtained by login.
    pub fn renew(&self) -> Result<TokenInfo, Error> {
        let inner = self.inner.clone();
        self.run("auth/token/renew-self", async move {
            inner.renew().await?;
            inner.lookup_self().await
        })
    }
}

impl Inner {
    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.addr, path.trim_start_matches('/'))
    }

    fn unreachable(&self, path: &str, e: &reqwest::Error) -> Error {
        // The error chain of reqwest names the cause (connection refused, TLS, timeout).
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason = format!("{reason}: {s}");
            src = s.source();
        }
        Error::Unreachable {
            addr: self.addr.clone(),
            path: path.to_owned(),
            reason,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value), Error> {
        let patch = method == reqwest::Method::PATCH;
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            let content_type = if patch {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| self.unreachable(path, &e))?;
        let code = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(path, &e))?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((code, value))
    }

    fn detail(v: &Value) -> String {
        match v["errors"].as_array() {
            Some(list) if !list.is_empty() => list
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; "),
            _ => "no detail".into(),
        }
    }

    fn classify(&self, path: &str, code: u16, v: &Value) -> Error {
        let detail = Self::detail(v);
        match code {
            403 => Error::Denied {
                addr: self.addr.clone(),
                path: path.to_owned(),
                detail,
            },
            503 => Error::Sealed {
                addr: self.addr.clone(),
                path: path.to_owned(),
                detail,
            },
            400 if detail.contains("check-and-set") => Error::CasMismatch {
                addr: self.addr.clone(),
                path: path.to_owned(),
            },
            _ => Error::Status {
                addr: self.addr.clone(),
                path: path.to_owned(),
                code,
                detail,
            },
        }
    }

    /// One request with the current token; on 403 after a login-based token, logs in again
    /// once and retries. 404 is `Ok(None)`.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, Error> {
        let mut relogged = false;
        loop {
            let token = self.token().await?;
            let (code, v) = self
                .send(method.clone(), path, body.as_ref(), Some(&token))
                .await?;
            match code {
                200..=299 => return Ok(Some(v)),
                404 => return Ok(None),
                403 if !relogged && self.creds.method != VaultAuthMethod::Token => {
                    relogged = true;
                    if let Ok(mut t) = self.token.lock() {
                        *t = None;
                    }
                }
                _ => return Err(self.classify(path, code, &v)),
            }
        }
    }

    fn login_error(&self, reason: impl Into<String>) -> Error {
        Error::Login {
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }

    fn read_secret_file(&self, p: &Path, what: &str) -> Result<Zeroizing<String>, Error> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| self.login_error(format!("cannot read {what} {}: {e}", p.display())))?;
        Ok(Zeroizing::new(text.trim().to_owned()))
    }

    /// The current token, logging in first when there is none.
    async fn token(&self) -> Result<Zeroizing<String>, Error> {
        if let Some(t) = self.token.lock().ok().and_then(|t| t.clone()) {
            return Ok(t);
        }
        let c = &self.creds;
        let token = match c.method {
            VaultAuthMethod::Token => match &c.token_file {
                Some(p) => self.read_secret_file(p, "vault.auth.token_file")?,
                None => std::env::var("VAULT_TOKEN")
                    .or_else(|_| std::env::var("BAO_TOKEN"))
                    .map(Zeroizing::new)
                    .map_err(|_| {
                        self.login_error(
                            "no token: set vault.auth.token_file, VAULT_TOKEN or BAO_TOKEN",
                        )
                    })?,
            },
            VaultAuthMethod::Approle => {
                let secret_id = match &c.secret_id_file {
                    Some(p) => self.read_secret_file(p, "vault.auth.secret_id_file")?,
                    None => return Err(self.login_error("approle needs secret_id_file")),
                };
                // The request body is handed to the HTTP client, which does not zeroize; the
                // secret id lives in it only for this one request.
                let body = json!({
                    "role_id": c.role_id.clone().unwrap_or_default(),
                    "secret_id": secret_id.as_str(),
                });
                self.login(&format!("auth/{}/login", c.mount), &body)
                    .await?
            }
            VaultAuthMethod::Kubernetes => {
                let jwt = self.read_secret_file(&c.jwt_file, "vault.auth.jwt_file")?;
                let body = json!({
                    "role": c.role.clone().unwrap_or_default(),
                    "jwt": jwt.as_str(),
                });
                self.login(&format!("auth/{}/login", c.mount), &body)
                    .await?
            }
        };
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token.clone());
        }
        Ok(token)
    }

    async fn login(&self, path: &str, body: &Value) -> Result<Zeroizing<String>, Error> {
        let (code, v) = self
            .send(reqwest::Method::POST, path, Some(body), None)
            .await?;
        if !(200..=299).contains(&code) {
            return Err(self.login_error(format!("{path}: {}", self.classify(path, code, &v))));
        }
        v["auth"]["client_token"]
            .as_str()
            .map(|t| Zeroizing::new(t.to_owned()))
            .ok_or_else(|| self.login_error(format!("{path}: no client_token in the answer")))
    }

    async fn lookup_self(&self) -> Result<TokenInfo, Error> {
        let path = "auth/token/lookup-self";
        let v = self
            .request(reqwest::Method::GET, path, None)
            .await?
            .ok_or_else(|| Error::Invalid {
                addr: self.addr.clone(),
                path: path.into(),
                reason: "not found".into(),
            })?;
        let d = &v["data"];
        Ok(TokenInfo {
            ttl: d["ttl"].as_u64().unwrap_or(0),
            renewable: d["renewable"].as_bool().unwrap_or(false),
            creation_ttl: d["creation_ttl"].as_u64().unwrap_or(0),
        })
    }

    async fn renew(&self) -> Result<(), Error> {
        let info = self.lookup_self().await?;
        if info.renewable {
            self.request(
                reqwest::Method::POST,
                "auth/token/renew-self",
                Some(json!({})),
            )
            .await?;
            tracing::debug!(addr = %self.addr, "vault token renewed");
        } else if self.creds.method != VaultAuthMethod::Token {
            if let Ok(mut t) = self.token.lock() {
                *t = None;
            }
            self.token().await?;
            tracing::debug!(addr = %self.addr, "vault login renewed");
        }
        Ok(())
    }

    /// At most every [`RENEW_CHECK`]: renews a renewable token that has used half its TTL
    /// (or logs in again); failures are left for the request itself to report.
    async fn maybe_renew(&self) {
        let due = self
            .last_renew_check
            .lock()
            .map(|mut last| {
                let due = last.is_none_or(|t| t.elapsed() >= RENEW_CHECK);
                if due {
                    *last = Some(Instant::now());
                }
                due
            })
            .unwrap_or(false);
        if !due || self.token.lock().map(|t| t.is_none()).unwrap_or(true) {
            return;
        }
        if let Ok(info) = self.lookup_self().await
            && info.creation_ttl > 0
            && info.ttl < info.creation_ttl / 2
            && let Err(e) = self.renew().await
        {
            tracing::warn!(error = %e, "vault token renewal failed");
        }
    }
}
